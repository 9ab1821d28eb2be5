using System.Diagnostics;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench.Variants;

/// <summary>
/// <c>quick-gemm [threads] [cpu]</c>: every numbered GEMM variant (bench/Variants/README.md) against the one in src/ on
/// the issue's shapes, forward layout. "cpu" times process CPU time instead of wall time (per core-second rate).
/// </summary>
internal static unsafe class GemmVariants
{
    public static void Run(string[] args)
    {
        int threads = args.Length > 1 ? int.Parse(args[1]) : 2;
        bool cpu = args.Length > 2 && args[2] == "cpu";
        using var be = new CpuBackend(threads);
        Console.WriteLine($"GEMM variants, threads={threads}, {(cpu ? "CPU time (GFLOP per core-second x threads)" : "wall time")}");
        foreach (var (m, n, k) in new[] { (1024, 1024, 1024), (4096, 576, 576), (4096, 1536, 576), (4096, 576, 1536), (512, 49152, 576) })
        {
            using var x = BenchEnv.Random(be, DType.F32, 1, m, k);
            using var w = BenchEnv.Random(be, DType.F32, 2, n, k);
            using var y = be.Allocate(DType.F32, m, n);
            float* px = (float*)be.Ptr(x, "x"), pw = (float*)be.Ptr(w, "w"), py = (float*)be.Ptr(y, "y");
            double f = 2.0 * m * n * k;
            double v1 = Time(() => GemmV1.Run(be, m, n, k, px, k, false, pw, false, k, true, py, n, 1f, false, null), cpu, threads);
            double cur = Time(() => be.MatMul(y, x, w, null, m, n, k, false), cpu, threads);
            Console.WriteLine($"{m}x{n}x{k,-6} v1 {f / v1 / 1e9,7:F1}   src {f / cur / 1e9,7:F1} GFLOP/s");
        }
    }

    private static double Time(Action a, bool cpu, int threads) => Quick.BestOf(a, cpu, threads, 10, 1.0);
}
