using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench.Peers;

/// <summary>
/// <c>peers gemm-bf16 [threads]</c>: ftn's bf16-compute GEMM (AVX512_BF16 kernel, GemmBf16) against ftn's f32 GEMM and
/// OpenBLAS cblas_sgemm, same process, same buffers, interleaved rounds, best of each (GemmPeer.Race; FTN_CPUTIME=1
/// for CPU time). Weights in bf16 storage for both ftn rows (what the bf16 training mode holds); OpenBLAS reads the
/// same values widened to f32.
/// </summary>
internal static unsafe class GemmBf16Peer
{
    public static int Run(string[] args)
    {
        int threads = args.Length > 2 && int.TryParse(args[2], out int t) ? t : 2;
        if (!CpuBackend.Bf16ComputeAvailable) { Console.WriteLine($"peers gemm-bf16: SKIPPED - {CpuBackend.Bf16ComputeUnavailableReason}"); return 2; }
        var blas = OpenBlas.TryLoad(out string why);
        if (blas is null) { Console.WriteLine($"peers gemm-bf16: SKIPPED - {why}"); return 2; }
        blas.SetThreads(threads);
        GemmPeer.CpuThreads = threads;
        using var f32 = new CpuBackend(threads);
        using var bf = new CpuBackend(threads) { MatMulCompute = DType.BF16 };
        Console.WriteLine($"peers gemm-bf16: threads={threads}  OpenBLAS {blas.Path} [{blas.Config}]");
        if (Environment.GetEnvironmentVariable("FTN_CPUTIME") == "1") Console.WriteLine("timing: process CPU time / threads (FTN_CPUTIME=1)");
        Console.WriteLine($"{"case (bf16 weights)",-36} {"bf16 GF/s",10} {"f32 GF/s",9} {"OpenBLAS",9} {"bf16/f32",9} {"bf16/BLAS",10}");
        var ratios = new List<double>();
        var cases = new List<(string Name, int M, int N, int K, bool Fwd)>();
        foreach (var (m, n, k) in new[] { (1024, 1024, 1024), (4096, 576, 576), (4096, 1536, 576), (4096, 576, 1536), (512, 49152, 576), (512, 1536, 576), (512, 576, 1536), (1024, 768, 288) })
            cases.Add(("fwd  y=x·Wᵀ", m, n, k, true));
        foreach (var (m, n, k) in new[] { (512, 1536, 576), (512, 576, 1536), (1024, 768, 288), (512, 49152, 576) })
            cases.Add(("bwdIn dx=dy·W", m, n, k, false));
        foreach (var (name, m, n, k, fwd) in cases)
        {
            using var x = BenchEnv.Random(f32, DType.F32, 1, m, fwd ? k : n);
            using var wB = BenchEnv.Random(f32, DType.BF16, 2, n, k);
            using var wF = f32.Allocate(DType.F32, n, k);
            var host = new float[(long)n * k];
            f32.Download(wB, host);
            f32.Upload(wF, host);
            using var y = f32.Allocate(DType.F32, m, fwd ? n : k);
            float* px = (float*)f32.Ptr(x, "x"), pw = (float*)f32.Ptr(wF, "w"), py = (float*)f32.Ptr(y, "y");
            Action run(CpuBackend be) => fwd ? () => be.MatMul(y, x, wB, null, m, n, k, false) : () => be.MatMulBackwardInput(y, x, wB, m, n, k, false);
            Action peer = fwd
                ? () => blas.Sgemm(false, true, m, n, k, 1f, px, k, pw, k, 0f, py, n)
                : () => blas.Sgemm(false, false, m, k, n, 1f, px, n, pw, k, 0f, py, k);
            double flops = 2.0 * m * n * k;
            var (tb, tp) = GemmPeer.Race(run(bf), peer, flops);
            var (tf, tp2) = GemmPeer.Race(run(f32), peer, flops);
            tp = Math.Min(tp, tp2);
            ratios.Add(tp / tb);
            Console.WriteLine($"{name + $" {m}x{n}x{k}",-36} {flops / tb / 1e9,10:F1} {flops / tf / 1e9,9:F1} {flops / tp / 1e9,9:F1} {tf / tb,9:F2} {tp / tb,10:F2}");
        }
        Console.WriteLine($"geometric mean bf16-compute/OpenBLAS over {ratios.Count} cases: {Math.Exp(ratios.Average(Math.Log)):F2}");
        return 0;
    }
}
