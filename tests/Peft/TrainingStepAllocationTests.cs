using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;
using Xunit;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Issue 3: no allocation inside a training step. Forward + backward of a LoRA model (with dropout) on the 2-thread
/// cpu backend, counted over all threads by the runtime's allocation counter after warm-up (so the class runs alone,
/// outside xunit's parallel phase).
/// </summary>
[CollectionDefinition(nameof(TrainingStepAllocationTests), DisableParallelization = true)]
[Collection(nameof(TrainingStepAllocationTests))]
public sealed class TrainingStepAllocationTests(ITestOutputHelper output)
{
    [Fact]
    public void Lora_ForwardBackward_Step_Allocates_Nothing()
    {
        using var cpu = Backends.Create("cpu:2");
        using var w = TinyModel.Weights(cpu);
        using var model = new LlamaModel(w, cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1f }, 3);
        const int B = 2, T = 12;
        var tokens = new int[B * T];
        var targets = new int[B * T];
        for (int i = 0; i < tokens.Length; i++) { tokens[i] = (i * 7) % 40; targets[i] = (i * 11) % 40; }
        for (int warm = 0; warm < 3; warm++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)warm);
        const int steps = 20;
        long before = GC.GetTotalAllocatedBytes(precise: true);
        for (int s = 0; s < steps; s++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)s);
        long perStep = (GC.GetTotalAllocatedBytes(precise: true) - before) / steps;
        output.WriteLine($"bytes allocated per LoRA forward+backward step (all threads): {perStep}");
        Assert.Equal(0, perStep);
    }
}

