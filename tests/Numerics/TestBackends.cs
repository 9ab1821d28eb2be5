using FineTuneNative.Kernels;

namespace FineTuneNative.Tests.Numerics;

/// <summary>
/// The backends every op test runs on: the CPU SIMD backend always, and ILGPU's CPU simulator shaped like an
/// NVIDIA GPU (warp 32) and with a small warp (4), so code that assumes a warp size fails in one of them.
/// CUDA joins when a GPU is present.
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
        if (Backends.CudaAvailable()) yield return "cuda";
    }

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
}
