using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Issue 3: no allocation inside a training step. Forward + backward of a LoRA model (with dropout) on the 2-thread
/// cpu backend, counted after warm-up on the calling thread and on the pool's worker threads (the class still runs
/// alone, outside xunit's parallel phase, so that the whole-process figure it reports means something).
/// </summary>
[CollectionDefinition(nameof(TrainingStepAllocationTests), DisableParallelization = true)]
[Collection(nameof(TrainingStepAllocationTests))]
public sealed class TrainingStepAllocationTests(ITestOutputHelper output)
{
    [Theory]
    [InlineData(DType.F32)]
    [InlineData(DType.BF16)] // bf16 attention: q, k, v widened into a buffer the backend grows once
    public void Lora_ForwardBackward_Step_Allocates_Nothing(DType attention)
    {
        using var cpu = Backends.Create("cpu:2");
        using var w = TinyModel.Weights(cpu);
        using var model = new LlamaModel(w, cpu) { AttentionDType = attention };
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1f }, 3);
        const int B = 2, T = 12;
        var tokens = new int[B * T];
        var targets = new int[B * T];
        for (int i = 0; i < tokens.Length; i++) { tokens[i] = (i * 7) % 40; targets[i] = (i * 11) % 40; }
        // Warm up past tiered JIT's rejit of the step's methods (30 calls), which allocates on background threads.
        for (int warm = 0; warm < 100; warm++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)warm);
        // counted on the step's own threads (StepAllocations); the whole-process figure is only reported
        const int steps = 20;
        var (windows, process) = StepAllocations.Count((CpuBackend)cpu, 5, steps, s => model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)s));
        output.WriteLine($"bytes allocated per {steps} LoRA forward+backward steps on the step's threads, {windows.Length} windows: {string.Join(", ", windows)}; whole process: {string.Join(", ", process)}");
        Assert.Equal(0, windows.Sum());
    }
}

