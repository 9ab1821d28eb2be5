using FineTuneNative.Peft.Training;

namespace FineTuneNative.Tests.Peft;

public class LrScheduleTests
{
    [Fact]
    public void Warmup_is_linear_then_cosine_decays_to_the_floor()
    {
        // total 10, warmup 2, peak 1: steps 1-2 ramp 0.5, 1; steps 3..10 follow (1 + cos(pi·j/8))/2, j = 0..7.
        double[] expected =
        {
            0.5, 1.0,
            1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449,
            0.5, 0.3086582838174551, 0.1464466094067262, 0.0380602337443566,
        };
        for (int s = 1; s <= 10; s++) Assert.Equal(expected[s - 1], LrSchedule.At(s, 10, 2, 1.0), 12);

        // A floor: min + (peak - min)·cos term.
        Assert.Equal(2e-4 * (0.1 + 0.9 * 0.5), LrSchedule.At(7, 10, 2, 2e-4, minRatio: 0.1), 15);
        // No warmup: the first step is at the peak.
        Assert.Equal(3e-4, LrSchedule.At(1, 5, 0, 3e-4), 15);
        // One step: the peak.
        Assert.Equal(1.0, LrSchedule.At(1, 1, 0, 1.0));
        Assert.Throws<ArgumentOutOfRangeException>(() => LrSchedule.At(0, 10, 2, 1.0));
        Assert.Throws<ArgumentOutOfRangeException>(() => LrSchedule.At(11, 10, 2, 1.0));
    }

    [Fact]
    public void Step_counts_follow_epochs_batches_and_accumulation()
    {
        Assert.Equal(3, Trainer.TotalSteps(new TrainOptions { MicroBatch = 4, GradAccum = 2 }, 17));      // ceil(17/8)
        Assert.Equal(6, Trainer.TotalSteps(new TrainOptions { MicroBatch = 4, GradAccum = 2, Epochs = 2 }, 17));
        Assert.Equal(50, Trainer.TotalSteps(new TrainOptions { MaxSteps = 50, Epochs = 1 }, 17));
        Assert.Equal(5, Trainer.WarmupFor(new TrainOptions { WarmupRatio = 0.1 }, 50));
        Assert.Equal(7, Trainer.WarmupFor(new TrainOptions { WarmupSteps = 7, WarmupRatio = 0.5 }, 50));
        Assert.Throws<ArgumentException>(() => new TrainOptions { MicroBatch = 0 }.Validate());
        Assert.Throws<ArgumentException>(() => new TrainOptions { EvalFraction = 1.0 }.Validate());
    }
}
