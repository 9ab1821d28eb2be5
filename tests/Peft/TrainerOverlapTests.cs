using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// A training step waits for the device once: the per-token losses of every micro-batch stay on the device and come
/// back with the gradient norm in one download after the update is queued, and uploads go through the pinned staging
/// ring without waiting. The loss it reports is, bit for bit, the one of reading each micro-batch's losses back alone.
/// </summary>
[Collection("PeftModel")]
public class TrainerOverlapTests(ITestOutputHelper output)
{
    private const int GradAccum = 4;

    private sealed record Run(double[] Losses, double[] Norms, double[] OldWayLosses, long[] Syncs, long[] Allocations, float[][] Params);

    private static Run Train(string device, int steps)
    {
        using var b = Backends.Create(device);
        using var w = LlamaWeights.Allocate(TinyModel.Config(), b, DType.F32);
        using (var cpu = Backends.Create("cpu:1"))
        using (var src = TinyModel.Weights(cpu, seed: 5))
        {
            var dst = w.Named().ToDictionary(x => x.Name, x => x.Tensor);
            foreach (var (name, t) in src.Named()) b.Upload(dst[name], t.ToArray());
        }
        using var model = new LlamaModel(w, b);
        using var lora = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1f }, 3);
        ulong state = 11;
        foreach (var m in lora.Modules)
        {
            var v = new float[m.Slot.B.Length];
            for (int i = 0; i < v.Length; i++) v[i] = (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) - 0.5) * 0.2f;
            b.Upload(m.Slot.B, v);
        }
        var options = new TrainOptions { MicroBatch = 1, GradAccum = GradAccum, ClipNorm = 0.05, WeightDecay = 0.1, Seed = 4 };
        using var trainer = new Trainer(model, lora, options);
        var window = Batching.Batches(TinyModel.Samples(GradAccum, 4, 8, seed: 7), 1, 8, 0).ToList();
        Assert.Equal(GradAccum, window.Count);
        var gpu = b as IlgpuBackend;
        var run = new Run(new double[steps], new double[steps], new double[steps], new long[steps], new long[steps], []);
        for (int s = 0; s < steps; s++)
        {
            // The loss as each micro-batch read back alone gives it (ForwardBackward downloads its losses), with the
            // dropout seeds the trainer uses for step s + 1; its gradients are zeroed again by the step.
            double sum = 0;
            for (int i = 0; i < window.Count; i++)
            {
                ulong seed = options.Seed * 0x9E3779B97F4A7C15UL + (ulong)(s + 1) * 0x100000001B3UL + (ulong)i;
                sum += model.ForwardBackward(window[i].Tokens, window[i].Targets, 1, 8, 1f, seed).LossSum;
            }
            run.OldWayLosses[s] = sum / window.Sum(x => x.TargetCount);
            long syncs = gpu?.BlockingSyncs ?? 0, allocations = gpu?.DeviceAllocations ?? 0;
            (run.Losses[s], run.Norms[s]) = trainer.Step(window, 2e-2);
            run.Syncs[s] = (gpu?.BlockingSyncs ?? 0) - syncs;
            run.Allocations[s] = (gpu?.DeviceAllocations ?? 0) - allocations;
        }
        return run with { Params = lora.Trainable.Select(t => t.Param.ToArray()).ToArray() };
    }

    [Fact]
    public void Lora_step_with_accumulation_4_on_ilgpu_sim_waits_once_allocates_nothing_and_matches_the_cpu()
    {
        var cpu = Train("cpu", 2);
        var sim = Train("ilgpu-sim:4", 2);
        output.WriteLine($"losses cpu {string.Join(", ", cpu.Losses)}; sim {string.Join(", ", sim.Losses)}");
        output.WriteLine($"sim per step: blocking syncs {string.Join(", ", sim.Syncs)}; device allocations {string.Join(", ", sim.Allocations)}");
        // after the first step (kernel sets, the readback tensor and the staging ring are made then): one wait, no allocation
        Assert.Equal([1L], sim.Syncs[1..]);
        Assert.Equal([0L], sim.Allocations[1..]);
        // the loss the step reports is what reading every micro-batch back alone gave, to the last bit, on both backends
        Assert.Equal(cpu.OldWayLosses, cpu.Losses);
        Assert.Equal(sim.OldWayLosses, sim.Losses);
        // and the backends agree as in TrainerDeviceTests (f32 summation order differs)
        NumericAssert.Close(cpu.Losses, GradCheck.ToFloat(sim.Losses), 1e-5, 1e-4, "losses");
        NumericAssert.Close(cpu.Norms, GradCheck.ToFloat(sim.Norms), 1e-5, 1e-4, "gradient norms");
        Assert.True(cpu.Norms.All(n => n > 0.05), $"the test needs norms above the clip: {string.Join(", ", cpu.Norms)}");
        for (int i = 0; i < cpu.Params.Length; i++)
            NumericAssert.Close(GradCheck.ToDouble(cpu.Params[i]), sim.Params[i], 1e-5, 1e-4, $"param {i}");
        Assert.False(CudaDriverEvents.IsLoaded, "the simulator path resolved the CUDA driver");
    }

    [Theory]
    [InlineData("cpu")]
    [InlineData("ilgpu-sim:4")]
    public void Evaluation_reads_the_losses_back_once_and_matches_reading_each_batch(string device)
    {
        using var b = Backends.Create(device);
        using var w = TinyModel.Weights(b, seed: 5);
        using var model = new LlamaModel(w, b);
        using var lora = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8 }, 3);
        using var trainer = new Trainer(model, lora, new TrainOptions { MicroBatch = 2, Seed = 4 });
        var samples = TinyModel.Samples(9, 3, 8, seed: 9); // 5 batches, the last one short
        double sum = 0;
        long count = 0;
        foreach (var x in Batching.Batches(samples, 2, 8, 0))
        {
            var (ls, c) = model.Loss(x.Tokens, x.Targets, x.BatchSize, x.SeqLen);
            sum += ls;
            count += c;
        }
        long syncs = (b as IlgpuBackend)?.BlockingSyncs ?? 0;
        var r = trainer.Evaluate(samples, 8, 0);
        if (b is IlgpuBackend gpu) Assert.Equal(syncs + 1, gpu.BlockingSyncs); // 5 batches, one wait
        Assert.Equal(sum / count, r.Loss); // bit for bit
        Assert.Equal((int)count, r.Targets);
    }

    [Theory]
    [InlineData("cpu")]
    [InlineData("ilgpu-sim:4")]
    public void A_non_finite_loss_skips_the_update_on_the_device(string device)
    {
        // Losses Inf and NaN with finite gradients: the probe turns the clipping scale NaN, which the fused AdamW skips on.
        using var b = Backends.Create(device);
        using var clip = b.Allocate(DType.F32, 2);
        using var losses = b.Allocate(DType.F32, 1, 5);
        using var zeros = b.Allocate(DType.F32, 1, 5);
        foreach (var (values, finite) in new[] { (new[] { 1f, 2.5f, 0f, 7f, -0f }, true), (new[] { 1f, float.PositiveInfinity, 0, 0, 0 }, false), (new[] { 0f, 0, 0, 0, float.NaN }, false) })
        {
            b.Upload(clip, [3.25f, 0.123456f]);
            b.Upload(losses, values);
            StepReadback.FlagNonFiniteLoss(b, clip.View(1, 1), losses, zeros, 5);
            var c = clip.ToArray();
            Assert.Equal(3.25f, c[0]);
            if (finite) Assert.Equal(0.123456f, c[1]); // bit for bit
            else Assert.True(float.IsNaN(c[1]), $"{string.Join(", ", values)} gave scale {c[1]}");
        }
    }
}
