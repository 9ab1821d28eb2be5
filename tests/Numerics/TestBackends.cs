using FineTuneNative.Kernels;

namespace FineTuneNative.Tests.Numerics;

/// <summary>
/// The backends every op test runs on: the CPU SIMD backend always, and ILGPU's CPU simulator shaped like an
/// NVIDIA GPU (warp 32) and with a small warp (4), so code that assumes a warp size fails in one of them.
/// CUDA joins when a GPU is present. The simulator dispatching like CUDA sm_80+ ("ilgpu-sim-tc": bf16/f16 matmuls, NF4
/// and bf16 attention on the tensor-core kernels' scalar paths) runs them too, so CI checks what a GPU's first run
/// computes without a GPU (about 2 minutes of the suite; FTN_TEST_TC_SIM=0 leaves it out for a quicker local run).
/// </summary>
public static class TestBackends
{
    private static readonly Dictionary<string, IBackend> Cache = new();
    private static readonly object Gate = new();

    public static IEnumerable<object[]> All()
    {
        foreach (var name in Names()) yield return new object[] { name };
    }

    public static IEnumerable<string> Names()
    {
        yield return "cpu";
        yield return "ilgpu-sim:32";
        yield return "ilgpu-sim:4";
        if (TensorCoreSimulator) yield return "ilgpu-sim-tc";
        if (Backends.CudaAvailable()) yield return "cuda";
    }

    /// <summary>Op tests also run on "ilgpu-sim-tc" unless FTN_TEST_TC_SIM=0.</summary>
    public static readonly bool TensorCoreSimulator = Environment.GetEnvironmentVariable("FTN_TEST_TC_SIM") != "0";

    /// <summary>One shared instance per name (ILGPU contexts are expensive to create).</summary>
    public static IBackend Get(string name)
    {
        lock (Gate)
        {
            if (!Cache.TryGetValue(name, out var b)) Cache[name] = b = Backends.Create(name);
            return b;
        }
    }

    public static bool IsSimulator(string name) => name.StartsWith("ilgpu-sim", StringComparison.Ordinal);

    /// <summary>
    /// Whether the backend multiplies on tensor cores (IlgpuBackend.TensorCores: CUDA sm_80+ and "ilgpu-sim-tc", the same
    /// dispatch): matmuls against bf16/f16 weights round the activations to the weight's type, NF4 matmuls round the input
    /// and the dequantized weight to bf16, the LoRA forward's rank-r term rounds s·u and B, bf16/f16 attention rounds P
    /// (and dO, dS in the backward) to 16 bits. Asked of the backend itself, so a pre-sm_80 GPU (f32 SIMT) keeps f32 checks.
    /// </summary>
    public static bool RoundsOperands(string name) => RoundsOperands(Get(name));

    public static bool RoundsOperands(IBackend b) => b is FineTuneNative.Kernels.Gpu.IlgpuBackend { TensorCores: true };

    /// <summary>
    /// Whether float results may differ in the last bits from the CPU's for the same operation order: ptxas contracts
    /// a·b + c into one FFMA (one rounding) on CUDA, where the CPU and the simulator (.NET, no contraction) round twice.
    /// </summary>
    public static bool Contracts(string name) => name.StartsWith("cuda", StringComparison.Ordinal);
}
