using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Tests.Peft;

/// <summary>The <see cref="ITrainableMethod"/> contract as LoRA implements it.</summary>
[Collection("PeftModel")]
public class TrainableMethodTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    private static double EvalLoss(LlamaModel model, IReadOnlyList<TokenizedSample> samples)
    {
        double sum = 0; long n = 0;
        foreach (var b in Batching.Batches(samples, 4, 10, 0)) { var (l, c) = model.Loss(b.Tokens, b.Targets, b.BatchSize, b.SeqLen); sum += l; n += c; }
        return sum / n;
    }

    [Fact]
    public void Lora_detach_attach_and_load_values()
    {
        var samples = TinyModel.Samples(6, 4, 10, seed: 3);
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        double baseLoss = EvalLoss(model, samples);
        using var tmp = new TempDir();
        using ITrainableMethod lora = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0 }, 1);
        Assert.Equal("lora", lora.Kind);
        Assert.All(lora.Trainable, t => Assert.True(t.WeightDecay && t.Param.DType == DType.F32));
        Assert.Equal(lora.Trainable.Sum(t => t.Param.Length), lora.ParameterCount);
        // Train a few steps so B != 0 and the adapter changes the loss.
        using (var trainer = new Trainer(model, lora, new TrainOptions { MicroBatch = 3, MaxSteps = 4, LearningRate = 5e-2, Seed = 2 }))
            trainer.Train(samples, Array.Empty<TokenizedSample>(), 0, tmp.Path);
        double trained = EvalLoss(model, samples);
        Assert.NotEqual(baseLoss, trained);

        lora.Detach();
        Assert.False(lora.IsAttached);
        Assert.Equal(baseLoss, EvalLoss(model, samples));
        Assert.Throws<InvalidOperationException>(() => new Trainer(model, lora, new TrainOptions()));
        lora.Attach();
        Assert.Equal(trained, EvalLoss(model, samples));

        // LoadValues restores the saved values over changed ones.
        var saved = lora.Trainable.Select(t => t.Param.ToArray()).ToArray();
        foreach (var t in lora.Trainable) Cpu.Fill(t.Param, 0.01f);
        Assert.NotEqual(trained, EvalLoss(model, samples));
        lora.LoadValues(tmp.Path);
        for (int i = 0; i < saved.Length; i++) Assert.Equal(saved[i], lora.Trainable[i].Param.ToArray());
        Assert.Equal(trained, EvalLoss(model, samples));

        // A different rank is refused naming the file.
        using var model2 = new LlamaModel(w, Cpu);
        using var other = LoraAdapter.Create(model2, new LoraConfig { Rank = 3, Alpha = 4, Dropout = 0 }, 1);
        var e = Assert.ThrowsAny<Exception>(() => other.LoadValues(tmp.Path));
        Assert.Contains("adapter_", e.Message);
    }
}
