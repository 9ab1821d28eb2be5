using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Full fine-tuning of a model whose every matrix is larger than half a pool chunk, as a big model's are on a GPU
/// (the simulator's chunks made 512 bytes): loaded as is, each weight gets a chunk of its own, more than the 8 one
/// multi-tensor launch covers; the writable copy, the gradients with the f32 masters, and the optimizer moments are each
/// reserved as one range before they are allocated, so a step takes one gradient-norm launch and one AdamW launch,
/// and trains as on the CPU.
/// </summary>
[Collection("PeftModel")]
public class FullFineTuneChunkLaunchTests(ITestOutputHelper output)
{
    private const long ChunkBytes = 512; // bf16 q_proj (16x16) is 512 B, an f32 one 1 KiB: every matrix > half a chunk

    private static LlamaWeights Loaded(IBackend b)
    {
        using var cpu = Backends.Create("cpu:1");
        using var src = TinyModel.Weights(cpu, seed: 5);
        var w = LlamaWeights.Allocate(TinyModel.Config(), b, DType.BF16);
        var dst = w.Named().ToDictionary(x => x.Name, x => x.Tensor);
        foreach (var (name, t) in src.Named()) b.Upload(dst[name], t.ToArray());
        return w;
    }

    private sealed record Run(double[] Losses, double[] Norms, float[][] Params, float[][] Rounded);

    private Run Train(IBackend b, int steps)
    {
        var sim = b as IlgpuBackend;
        using var loaded = Loaded(b);
        using var w = FullFineTune.CloneWritable(loaded, b); // as `ftn train --method full` does
        using var model = new LlamaModel(w, b);
        using var full = new FullFineTune(model);
        using var trainer = new Trainer(model, full, new TrainOptions { MicroBatch = 2, GradAccum = 2, ClipNorm = 0.05, WeightDecay = 0.1, Seed = 4 });
        var window = Batching.Batches(TinyModel.Samples(4, 4, 8, seed: 7), 2, 8, 0).ToList();
        var losses = new double[steps];
        var norms = new double[steps];
        for (int s = 0; s < steps; s++)
        {
            (losses[s], norms[s]) = trainer.Step(window, 2e-2);
            if (sim is not null) Assert.Equal((1, 1), sim.LastMultiTensorLaunches);
        }
        if (sim is not null)
        {
            int Chunks(IEnumerable<Tensor> ts) => ts.Select(t => sim.Placement(t, t.Name ?? "tensor").Chunk).Distinct().Count();
            int loadedChunks = Chunks(loaded.Named().Select(x => x.Tensor));
            int state = Chunks(full.Trainable.SelectMany(t => new[] { t.Param, t.Grad }.Concat(t.Rounded is null ? [] : [t.Rounded])));
            output.WriteLine($"loaded weights in {loadedChunks} pool chunks; parameters, masters, gradients and bf16 copies in {state}");
            Assert.True(loadedChunks > MultiTensorBases.Count, $"the test needs weights spread over more than {MultiTensorBases.Count} chunks (got {loadedChunks})");
            Assert.True(state <= 3, $"the trainable state lies in {state} chunks");
        }
        return new Run(losses, norms, full.Trainable.Select(t => t.Param.ToArray()).ToArray(),
            full.Trainable.Where(t => t.Rounded is not null).Select(t => t.Rounded!.ToArray()).ToArray());
    }

    [Fact]
    public void Full_fine_tuning_of_tensors_larger_than_a_pool_chunk_takes_one_launch_per_step_and_matches_the_cpu()
    {
        Run cpu;
        using (var c = Backends.Create("cpu:1")) cpu = Train(c, 2);
        Run run;
        using (var sim = IlgpuBackend.CreateSimulator(4, ChunkBytes)) run = Train(sim, 2);
        // Tolerances as TrainerDeviceTests' full fine-tuning (Adam's normalized update and bf16 rounding boundaries).
        NumericAssert.Close(cpu.Losses, GradCheck.ToFloat(run.Losses), 1e-5, 1e-4, "losses");
        NumericAssert.Close(cpu.Norms, GradCheck.ToFloat(run.Norms), 1e-5, 1e-4, "gradient norms");
        Assert.Equal(cpu.Params.Length, run.Params.Length);
        for (int i = 0; i < cpu.Params.Length; i++)
            NumericAssert.Close(GradCheck.ToDouble(cpu.Params[i]), run.Params[i], 1e-4, 1e-4, $"param {i}");
        Assert.Equal(2 * 7 + 1, run.Rounded.Length);
        for (int i = 0; i < cpu.Rounded.Length; i++)
            NumericAssert.Close(GradCheck.ToDouble(cpu.Rounded[i]), run.Rounded[i], 1e-4, 1e-2, $"bf16 weight {i}");
    }

    [Theory]
    [InlineData(false, false, DType.F32)]
    [InlineData(true, true, DType.BF16)]
    public void AllocationBytes_is_every_tensor_plus_the_pool_alignment_slack(bool bias, bool tied, DType linear)
    {
        using var cpu = Backends.Create("cpu:1");
        var c = TinyModel.Config() with { AttentionBias = bias, TieWordEmbeddings = tied };
        using var w = LlamaWeights.Allocate(c, cpu, linear);
        var tensors = w.Named().Select(x => x.Tensor).ToList();
        Assert.Equal(tensors.Sum(t => t.Bytes) + tensors.Count * LlamaWeights.TensorSlackBytes, LlamaWeights.AllocationBytes(c, linear));
    }
}
