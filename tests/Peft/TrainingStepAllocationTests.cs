using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;
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
        // Counted on the threads that run the step: this thread plus the backend's pool workers (each records its own
        // counter at the end of every job). The process-wide counter is only reported: on a loaded machine the runtime's
        // own threads allocate a few hundred bytes now and then, which says nothing about the step.
        var pool = ((FineTuneNative.Kernels.Cpu.CpuBackend)cpu).Pool;
        const int steps = 20;
        var windows = new long[5];
        var process = new long[windows.Length];
        for (int wi = 0; wi < windows.Length; wi++)
        {
            long beforeAll = GC.GetTotalAllocatedBytes(precise: true);
            long before = GC.GetAllocatedBytesForCurrentThread() + pool.WorkerAllocatedBytes();
            for (int s = 0; s < steps; s++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)s);
            windows[wi] = GC.GetAllocatedBytesForCurrentThread() + pool.WorkerAllocatedBytes() - before;
            process[wi] = GC.GetTotalAllocatedBytes(precise: true) - beforeAll;
        }
        output.WriteLine($"bytes allocated per {steps} LoRA forward+backward steps on the step's {pool.Threads} threads, 5 windows: {string.Join(", ", windows)}; whole process: {string.Join(", ", process)}");
        Assert.Equal(0, windows.Sum());
    }
}

