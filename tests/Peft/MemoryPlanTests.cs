using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Tests.Peft;

/// <summary>Activation checkpointing changes memory, not results; the memory plan matches what is allocated and refuses what does not fit.</summary>
[Collection("PeftModel")]
public class MemoryPlanTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    [Fact]
    public void Activation_checkpointing_gives_identical_losses_and_gradients_with_less_memory()
    {
        var samples = TinyModel.Samples(8, 4, 12, seed: 40);
        var config = TinyModel.Config() with { NumLayers = 3 };
        using var w = TinyModel.Weights(Cpu, 3, config);
        (IReadOnlyList<double> Losses, float[][] Grads, long Bytes) Run(bool ckpt, bool full)
        {
            using var model = new LlamaModel(w, Cpu);
            using var writable = full ? FullFineTune.CloneWritable(w, Cpu) : null;
            using var fmodel = full ? new LlamaModel(writable!, Cpu) : null;
            var m = fmodel ?? model;
            using ITrainableMethod method = full ? new FullFineTune(m) : LoraAdapter.Create(m, new LoraConfig { Rank = 2, Dropout = 0.1f }, 2);
            using var trainer = new Trainer(m, method, new TrainOptions { MicroBatch = 4, MaxSteps = 3, LearningRate = 1e-2, ActivationCheckpointing = ckpt, Seed = 3 });
            var r = trainer.Train(samples, Array.Empty<TokenizedSample>(), 0);
            Assert.Equal(ckpt, m.ActivationCheckpointing);
            var plan = MemoryPlan.Estimate(m, method, new TrainOptions { MicroBatch = 4, Optimizer = "adamw" }, trainer.SeqLenFor(samples));
            // The plan's activation estimate is what the workspace really allocated.
            Assert.Equal(m.WorkspaceBytes, plan.ActivationBytes);
            Assert.Equal(trainer.OptimizerStateBytes, plan.OptimizerBytes);
            return (r.StepLosses, method.Trainable.Select(t => t.Grad.ToArray()).ToArray(), m.WorkspaceBytes);
        }
        foreach (bool full in new[] { false, true })
        {
            var plain = Run(false, full);
            var ckpt = Run(true, full);
            Assert.Equal(plain.Losses, ckpt.Losses);
            for (int i = 0; i < plain.Grads.Length; i++) Assert.Equal(plain.Grads[i], ckpt.Grads[i]);
            Assert.True(ckpt.Bytes < plain.Bytes, $"{ckpt.Bytes} vs {plain.Bytes}");
        }
    }

    [Fact]
    public void The_plan_counts_weights_gradients_optimizer_and_refuses_a_run_that_does_not_fit()
    {
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var full = new FullFineTune(model);
        var plan = MemoryPlan.Estimate(model, full, new TrainOptions { MicroBatch = 4 }, 16);
        long n = w.ParameterCount;
        Assert.Equal(4 * n, plan.WeightBytes);
        Assert.Equal(0, plan.TrainableBytes);     // f32 weights are their own masters
        Assert.Equal(4 * n, plan.GradientBytes);
        Assert.Equal(8 * n, plan.OptimizerBytes);
        Assert.True(plan.ActivationBytesCheckpointed < plan.ActivationBytes);
        Assert.Null(plan.Refusal(plan.TotalBytes, "--max-memory"));
        string msg = plan.Refusal(plan.TotalBytes - 1, "--max-memory 1K")!;
        Assert.Contains("--activation-checkpointing", msg);
        Assert.Contains("--batch-size", msg);
        Assert.Contains("allows", msg);
        Assert.Contains("total", plan.Describe());

        Assert.Equal(16L << 30, MemoryPlan.ParseSize("16G"));
        Assert.Equal(1536L << 20, MemoryPlan.ParseSize("1.5GiB"));
        Assert.Equal(512L << 20, MemoryPlan.ParseSize("512M"));
        Assert.Equal(1000, MemoryPlan.ParseSize("1000"));
        Assert.Throws<ArgumentException>(() => MemoryPlan.ParseSize("lots"));
        Assert.NotNull(MemoryPlan.DetectAvailable(Cpu, 0));
    }
}
