using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// NEFTune in the model: the noise covers a row's real tokens only and is scaled by its unpadded length, so a sample
/// padded to T trains exactly as the same sample alone (its noise is the same element for element); batches carry their
/// row lengths to the model; and the simulator's training loss with NEFTune is the CPU's.
/// </summary>
[Collection("PeftModel")]
public class NeftuneModelTests
{
    [Fact]
    public void A_padded_row_gets_the_noise_of_the_sample_alone()
    {
        var b = PeftBackend.Cpu;
        using var weights = TinyModel.Weights(b);
        using var model = new LlamaModel(weights, b) { NeftuneAlpha = 5f };
        var s = TinyModel.Samples(1, 9, 9, seed: 3)[0];
        const int T = 14;
        var batch = Batching.Pad(new[] { s }, 1, T, 0);
        Assert.Equal(new[] { s.Length }, batch.RowLengths);
        var (alone, n) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 21);
        var (padded, n2) = model.ForwardBackward(batch.Tokens, batch.Targets, 1, T, 1f, 21, rowLengths: batch.RowLengths);
        Assert.Equal(n, n2);
        Assert.Equal(alone, padded, 1e-5); // causal attention: the real tokens never see the padding; same noise, same scale
        // Scaled by the padded length and noisy padding (no row lengths): another loss.
        var (allT, _) = model.ForwardBackward(batch.Tokens, batch.Targets, 1, T, 1f, 21);
        Assert.True(Math.Abs(allT - alone) > 1e-4, $"NEFTune over the padded length gave {allT}, over the sample {alone}");
        model.NeftuneAlpha = 0;
        var (plain, _) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 21);
        Assert.True(Math.Abs(plain - alone) > 1e-4, "the noise changes the loss");
        Assert.Throws<ArgumentException>(() => { model.NeftuneAlpha = 5f; model.ForwardBackward(batch.Tokens, batch.Targets, 1, T, 1f, 21, rowLengths: new[] { T + 1 }); });
    }

    [Fact]
    public void Training_loss_with_neftune_on_ilgpu_sim_equals_the_cpu()
    {
        var samples = TinyModel.Samples(3, 4, 8, seed: 5);
        var batch = Batching.Pad(samples, 3, 8, 0);
        double Loss(IBackend b)
        {
            using var cpu = Backends.Create("cpu:1");
            using var src = TinyModel.Weights(cpu, seed: 5);
            using var w = LlamaWeights.Allocate(TinyModel.Config(), b, DType.F32);
            var dst = w.Named().ToDictionary(x => x.Name, x => x.Tensor);
            foreach (var (name, t) in src.Named()) b.Upload(dst[name], t.ToArray());
            using var model = new LlamaModel(w, b) { NeftuneAlpha = 5f };
            return model.ForwardBackward(batch.Tokens, batch.Targets, 3, 8, 1f, 77, batch.Positions, batch.RowLengths).LossSum;
        }
        double cpuLoss;
        using (var c = Backends.Create("cpu:1")) cpuLoss = Loss(c);
        using var sim = Backends.Create("ilgpu-sim:4");
        Assert.Equal(cpuLoss, Loss(sim), 1e-4);
    }
}
