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
        // Warm up past tiered JIT's rejit of the step's methods (30 calls), which allocates on background threads.
        for (int warm = 0; warm < 100; warm++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)warm);
        // The counter covers every thread of the process: take the best of a few windows so that a runtime
        // background allocation (JIT, timers) in one window cannot fail a step that allocates nothing.
        const int steps = 20;
        var windows = new long[5];
        for (int wi = 0; wi < windows.Length; wi++)
        {
            long before = GC.GetTotalAllocatedBytes(precise: true);
            for (int s = 0; s < steps; s++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)s);
            windows[wi] = GC.GetTotalAllocatedBytes(precise: true) - before;
        }
        long perStep = windows.Min() / steps;
        output.WriteLine($"bytes allocated per {steps} LoRA forward+backward steps (all threads), 5 windows: {string.Join(", ", windows)}");
        Assert.Equal(0, perStep);
    }
}

