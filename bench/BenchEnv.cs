using FineTuneNative.Kernels;

namespace FineTuneNative.Bench;

internal static class BenchEnv
{
    /// <summary>Threads for the CPU backend: FTN_THREADS, or 0 (all cores).</summary>
    public static int Threads => int.TryParse(Environment.GetEnvironmentVariable("FTN_THREADS"), out int t) ? t : 0;

    public static Tensor Random(IBackend b, DType dtype, int seed, params int[] shape)
    {
        var t = b.Allocate(dtype, shape);
        var rng = new Random(seed);
        var data = new float[t.Length];
        for (int i = 0; i < data.Length; i++) data[i] = (float)(rng.NextDouble() * 2 - 1);
        b.Upload(t, data);
        return t;
    }
}
