using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// DoRA's dropout backward and NEFTune's noise run on the backend (no host buffers, no per-step closures, the DoRA
/// scratch views cached by the workspace): a DoRA step with lora_dropout, with and without NEFTune over row lengths, and a
/// LoRA step with NEFTune allocate nothing on the step's threads of the 2-thread cpu backend (before the cached views:
/// 4032 B per DoRA step). Runs with TrainingStepAllocationTests, outside xunit's parallel phase.
/// </summary>
[Collection(nameof(TrainingStepAllocationTests))]
public sealed class DeviceNoiseAllocationTests(ITestOutputHelper output)
{
    [Theory]
    [InlineData(true, 5f)]
    [InlineData(true, 0f)]
    [InlineData(false, 5f)]
    public void Dora_dropout_and_neftune_step_allocates_nothing(bool dora, float neftune)
    {
        using var cpu = Backends.Create("cpu:2");
        using var w = TinyModel.Weights(cpu);
        using var model = new LlamaModel(w, cpu) { NeftuneAlpha = neftune };
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1f, UseDora = dora }, 3);
        const int B = 2, T = 12;
        var tokens = new int[B * T];
        var targets = new int[B * T];
        for (int i = 0; i < tokens.Length; i++) { tokens[i] = (i * 7) % 40; targets[i] = (i * 11) % 40; }
        var lengths = new[] { 12, 7 };
        for (int warm = 0; warm < 100; warm++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)warm, rowLengths: lengths);
        const int steps = 20;
        var (windows, process) = StepAllocations.Count((CpuBackend)cpu, 5, steps,
            s => model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)s, rowLengths: lengths));
        output.WriteLine($"dora={dora} neftune={neftune}: bytes allocated per {steps} steps on the step's threads: {string.Join(", ", windows)}; whole process: {string.Join(", ", process)}");
        Assert.Equal(0, windows.Sum());
    }
}
