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

    /// <summary>
    /// <c>quick-lora [threads] [cpu]</c>: the LoRA linear's two fused products (forward y = x·Wᵀ + s·u·Bᵀ and input gradient
    /// dx = dy·W + s·g·A, u and g given) as v2c (base product, then the rank-R product accumulated into C), v3a (the rank
    /// term folded into the last K slice, two parallel regions per slice) and src (v3b: one parallel region per block).
    /// </summary>
    public static void RunLora(string[] args)
    {
        int threads = args.Length > 1 ? int.Parse(args[1]) : 2;
        bool cpu = args.Length > 2 && args[2] == "cpu";
        using var be = new CpuBackend(threads);
        Console.WriteLine($"LoRA fused products, threads={threads}, {(cpu ? "CPU time (GFLOP per core-second x threads)" : "wall time")}, GFLOP/s");
        const int r = 16;
        const float s = 2f;
        foreach (var (m, n, k) in new[] { (512, 1536, 576), (512, 576, 576), (1024, 768, 288), (4096, 576, 576) })
        {
            using var x = BenchEnv.Random(be, DType.F32, 1, m, k);
            using var w = BenchEnv.Random(be, DType.F32, 2, n, k);
            using var la = BenchEnv.Random(be, DType.F32, 3, r, k);
            using var lb = BenchEnv.Random(be, DType.F32, 4, n, r);
            using var u = BenchEnv.Random(be, DType.F32, 5, m, r);
            using var y = be.Allocate(DType.F32, m, n);
            using var dx = be.Allocate(DType.F32, m, k);
            float* px = (float*)be.Ptr(x, "x"), pw = (float*)be.Ptr(w, "w"), pa = (float*)be.Ptr(la, "a"), pb = (float*)be.Ptr(lb, "b"),
                pu = (float*)be.Ptr(u, "u"), py = (float*)be.Ptr(y, "y"), pdx = (float*)be.Ptr(dx, "dx");
            double ff = 2.0 * m * n * (k + r), fb = 2.0 * m * k * (n + r);
            // forward: y = x·Wᵀ + s·u·Bᵀ (u stands for x·Aᵀ); input gradient: dx = y·W + s·u·A (y stands for dy, u for g)
            double f2 = Time(() =>
            {
                GemmV3a.Run(be, m, n, k, px, k, false, pw, false, k, true, py, n, 1f, false, null);
                GemmV3a.Run(be, m, n, r, pu, r, false, pb, false, r, true, py, n, s, true, null);
            }, cpu, threads);
            double f3 = Time(() => GemmV3a.Run(be, m, n, k, px, k, false, pw, false, k, true, py, n, 1f, false, null,
                new GemmV3a.RankUpdate(pu, r, pb, r, true, r, s)), cpu, threads);
            double fs = Time(() => Gemm.Run(be, m, n, k, px, k, false, pw, false, k, true, py, n, 1f, false, null,
                new Gemm.RankUpdate(pu, r, pb, r, true, r, s)), cpu, threads);
            double b2 = Time(() =>
            {
                GemmV3a.Run(be, m, k, n, py, n, false, pw, false, k, false, pdx, k, 1f, false, null);
                GemmV3a.Run(be, m, k, r, pu, r, false, pa, false, k, false, pdx, k, s, true, null);
            }, cpu, threads);
            double b3 = Time(() => GemmV3a.Run(be, m, k, n, py, n, false, pw, false, k, false, pdx, k, 1f, false, null,
                new GemmV3a.RankUpdate(pu, r, pa, k, false, r, s)), cpu, threads);
            double bs = Time(() => Gemm.Run(be, m, k, n, py, n, false, pw, false, k, false, pdx, k, 1f, false, null,
                new Gemm.RankUpdate(pu, r, pa, k, false, r, s)), cpu, threads);
            Console.WriteLine($"{m}x{n}x{k,-5} fwd v2c {ff / f2 / 1e9,6:F1}  v3a {ff / f3 / 1e9,6:F1}  src {ff / fs / 1e9,6:F1}   " +
                $"dx v2c {fb / b2 / 1e9,6:F1}  v3a {fb / b3 / 1e9,6:F1}  src {fb / bs / 1e9,6:F1}");
        }
    }

    /// <summary>
    /// <c>quick-head [threads] [cpu]</c>: the parts of the LM head + cross-entropy at the SmolLM2 shape (512×49152×576, one
    /// 341-row chunk as LlamaModel runs it), per row so that chunk and full-batch numbers compare: ftn's forward product,
    /// cross-entropy and dX product on the chunk and on all 512 rows; OpenBLAS's forward and dX products over all 512 rows.
    /// </summary>
    public static void RunHead(string[] args)
    {
        int threads = args.Length > 1 ? int.Parse(args[1]) : 2;
        bool cpu = args.Length > 2 && args[2] == "cpu";
        using var be = new CpuBackend(threads);
        var blas = Peers.OpenBlas.TryLoad(out string why);
        blas?.SetThreads(threads);
        const int m = 512, v = 49152, c = 576, rows = 341;
        using var x = BenchEnv.Random(be, DType.F32, 1, m, c);
        using var w = BenchEnv.Random(be, DType.F32, 2, v, c);
        using var logits = be.Allocate(DType.F32, m, v);
        using var dx = be.Allocate(DType.F32, m, c);
        using var targets = be.Allocate(DType.I32, m);
        using var losses = be.Allocate(DType.F32, m);
        be.Upload(targets, Enumerable.Range(0, m).Select(i => (i * 7919) % v).ToArray());
        var xs = x.Slice(0, rows); var ls = logits.Slice(0, rows); var ts = targets.Slice(0, rows); var los = losses.Slice(0, rows); var dxs = dx.Slice(0, rows);
        float* px = (float*)be.Ptr(x, "x"), pw = (float*)be.Ptr(w, "w"), pl = (float*)be.Ptr(logits, "l"), pdx = (float*)be.Ptr(dx, "dx");
        double us(double sec, int r) => sec / r * 1e6;
        Console.WriteLine($"LM head parts {m}x{v}x{c} (chunk {rows} rows), threads={threads}, {(cpu ? "CPU time" : "wall time")}, microseconds per row");
        double f = Time(() => be.MatMul(ls, xs, w, null, rows, v, c, false), cpu, threads);
        double ce = Time(() => be.CrossEntropy(ls, ts, los, rows, v, -100, 1f / m, true), cpu, threads);
        double d = Time(() => be.MatMulBackwardInput(dxs, ls, w, rows, v, c, false), cpu, threads);
        double f512 = Time(() => be.MatMul(logits, x, w, null, m, v, c, false), cpu, threads);
        double d512 = Time(() => be.MatMulBackwardInput(dx, logits, w, m, v, c, false), cpu, threads);
        Console.WriteLine($"ftn  fwd {us(f, rows),7:F1}  CE {us(ce, rows),6:F1}  dX {us(d, rows),7:F1}   (all 512 rows at once: fwd {us(f512, m),7:F1}  dX {us(d512, m),7:F1})");
        if (blas is null) { Console.WriteLine("OpenBLAS: " + why); return; }
        double bf = Time(() => blas.Sgemm(false, true, m, v, c, 1f, px, c, pw, c, 0f, pl, v), cpu, threads);
        double bce = Time(() => be.CrossEntropy(logits, targets, losses, m, v, -100, 1f / m, true), cpu, threads);
        double bd = Time(() => blas.Sgemm(false, false, m, c, v, 1f, pl, v, pw, c, 0f, pdx, c), cpu, threads);
        Console.WriteLine($"peer fwd {us(bf, m),7:F1}  CE {us(bce, m),6:F1}  dX {us(bd, m),7:F1}   (512 rows; CE is ftn's on all rows)");
    }

    private static double Time(Action a, bool cpu, int threads) => Quick.BestOf(a, cpu, threads, 10, 1.0);
}
