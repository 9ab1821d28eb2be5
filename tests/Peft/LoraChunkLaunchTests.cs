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
/// A LoRA adapter whose tensors straddle two pool chunks on the simulator (the first chunk nearly full when it is
/// created): the trainer's step still runs one gradient-norm launch and one AdamW launch, and trains as on the CPU.
/// </summary>
[Collection("PeftModel")]
public class LoraChunkLaunchTests(ITestOutputHelper output)
{
    private static readonly LoraConfig Lora = new() { Rank = 4, Alpha = 8 };
    private static readonly TrainOptions Options = new() { MicroBatch = 2, ClipNorm = 0.05, WeightDecay = 0.1, Seed = 4 };

    private static LlamaWeights Weights(IBackend b)
    {
        using var cpu = Backends.Create("cpu:1");
        using var src = TinyModel.Weights(cpu, seed: 5);
        var w = LlamaWeights.Allocate(TinyModel.Config(), b, DType.F32);
        var dst = w.Named().ToDictionary(x => x.Name, x => x.Tensor);
        foreach (var (name, t) in src.Named()) b.Upload(dst[name], t.ToArray());
        return w;
    }

    private static (double Loss, float[][] Params) Train(IBackend b, LlamaModel model, LoraAdapter lora)
    {
        using var trainer = new Trainer(model, lora, Options);
        var window = Batching.Batches(TinyModel.Samples(2, 4, 8, seed: 7), 2, 8, 0).ToList();
        var (loss, _) = trainer.Step(window, 2e-2);
        return (loss, lora.Trainable.Select(t => t.Param.ToArray()).ToArray());
    }

    [Fact]
    public void Lora_trainables_in_two_pool_chunks_take_one_launch_each_and_train_as_on_the_cpu()
    {
        using var sim = (IlgpuBackend)Backends.Create("ilgpu-sim:4");
        using var w = Weights(sim);
        using var model = new LlamaModel(w, sim);
        long before = sim.PoolBytes.Used;
        long adapterBytes;
        using (LoraAdapter.Create(model, Lora, 3)) adapterBytes = sim.PoolBytes.Used - before;
        // Fill the first chunk so that about half of the adapter fits in it (fillers of at most half a chunk share it).
        var (reserved, used) = sim.PoolBytes;
        var fillers = new List<Tensor>();
        for (long fill = reserved - used - adapterBytes / 2; fill > 1024; )
        {
            int floats = (int)Math.Min(fill, 1L << 20) / 4;
            fillers.Add(sim.Allocate(DType.F32, floats));
            fill -= floats * 4L;
        }
        using var lora = LoraAdapter.Create(model, Lora, 3);
        var chunks = lora.Trainable.Select(t => sim.Placement(t.Param, t.Name).Chunk).Distinct().Count();
        Assert.True(chunks == 2, $"the adapter's parameters lie in {chunks} pool chunks, the test needs 2");
        var (simLoss, simParams) = Train(sim, model, lora);
        Assert.Equal((1, 1), sim.LastMultiTensorLaunches);
        fillers.ForEach(t => t.Dispose());

        using var cpu = Backends.Create("cpu:1");
        using var cw = Weights(cpu);
        using var cmodel = new LlamaModel(cw, cpu);
        using var clora = LoraAdapter.Create(cmodel, Lora, 3);
        var (cpuLoss, cpuParams) = Train(cpu, cmodel, clora);
        Assert.Equal(cpuLoss, simLoss, 1e-5);
        for (int i = 0; i < cpuParams.Length; i++) NumericAssert.Close(cpuParams[i], simParams[i], 1e-5, 1e-4, $"trainable {i}");
        output.WriteLine($"adapter {adapterBytes} B over 2 chunks: 1 norm launch, 1 AdamW launch; loss cpu {cpuLoss}, sim {simLoss}");
    }
}
