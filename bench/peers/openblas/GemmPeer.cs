using System.Diagnostics;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench.Peers;

/// <summary>
/// <c>peers gemm [threads] [fwd|bwdIn|bwdW|lora|head]</c>: ftn's CPU GEMM against OpenBLAS cblas_sgemm on the same buffers, same process, same
/// thread count (default 2), interleaved rounds, best time of each. Prints GFLOP/s of both and ftn/OpenBLAS.
/// </summary>
/// <remarks>
/// Rows: the issue's shapes in the forward layout y = x·Wᵀ; the three training layouts (forward NT, input gradient
/// NN, weight gradient TN with accumulation) at the transformer shapes; the LoRA linear forward and backward
/// against the same five products as separate sgemm calls; the LM head with cross-entropy (ftn's chunked head,
/// as LlamaModel runs it) against one full-logits sgemm + the same softmax pass + the input-gradient sgemm.
/// </remarks>
internal static unsafe class GemmPeer
{
    public sealed record Row(string Name, double Flops, double FtnSeconds, double PeerSeconds)
    {
        public double FtnGflops => Flops / FtnSeconds / 1e9;
        public double PeerGflops => Flops / PeerSeconds / 1e9;
        public double Ratio => PeerSeconds / FtnSeconds;
    }

    public static int Run(string[] args)
    {
        int threads = args.Length > 2 && int.TryParse(args[2], out int t) ? t : 2;
        string filter = args.Length > 3 ? args[3] : "";
        var blas = OpenBlas.TryLoad(out string why);
        if (blas is null) { Console.WriteLine($"peers gemm: SKIPPED - {why}"); return 2; }
        blas.SetThreads(threads);
        CpuThreads = threads;
        using var be = new CpuBackend(threads);
        Console.WriteLine($"peers gemm: threads={threads}  ftn Vector512={System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated}  OpenBLAS {blas.Path} [{blas.Config}]");
        if (Environment.GetEnvironmentVariable("FTN_CPUTIME") == "1") Console.WriteLine("timing: process CPU time / threads (FTN_CPUTIME=1)");
        Console.WriteLine($"{"case",-44} {"ftn GF/s",9} {"OpenBLAS",9} {"ratio",6}");
        var rows = new List<Row>();
        void Print(Row r)
        {
            rows.Add(r);
            Console.WriteLine($"{r.Name,-44} {r.FtnGflops,9:F1} {r.PeerGflops,9:F1} {r.Ratio,6:F2}");
        }
        bool Want(string name) => filter.Length == 0 ? name != "lora-base" : filter.Contains(name, StringComparison.OrdinalIgnoreCase);

        // the issue's shapes, forward layout (what the targets name)
        foreach (var (m, n, k) in new[] { (1024, 1024, 1024), (4096, 576, 576), (4096, 1536, 576), (4096, 576, 1536), (512, 49152, 576) })
            if (Want("fwd")) Print(Layout(be, blas, "fwd  y=x·Wᵀ", m, n, k, 0));
        // the training layouts at the transformer shapes (SmolLM2-135M batch 2×256 = 512 rows, and 4096 rows)
        foreach (var (m, n, k) in new[] { (4096, 576, 576), (4096, 1536, 576), (4096, 576, 1536), (512, 1536, 576), (512, 576, 1536) })
        {
            if (Want("bwdIn")) Print(Layout(be, blas, "bwdIn dx=dy·W", m, n, k, 1));
            if (Want("bwdW")) Print(Layout(be, blas, "bwdW dW+=dyᵀ·x", m, n, k, 2));
        }
        foreach (var (m, n, k, r) in new[] { (512, 1536, 576, 16), (512, 576, 576, 16), (1024, 768, 288, 16), (4096, 576, 576, 16) })
            if (Want("lora"))
            {
                Print(LoraFwd(be, blas, m, n, k, r));
                if (Want("lora-base")) Print(Layout(be, blas, "(base of lora fwd)", m, n, k, 0));
                Print(LoraBwd(be, blas, m, n, k, r));
                if (Want("lora-base")) Print(Layout(be, blas, "(base of lora bwd: dx)", m, k, n, 1));
            }
        foreach (var (m, v, c) in new[] { (512, 49152, 576), (1024, 32000, 288) })
            if (Want("head")) Print(HeadCe(be, blas, m, v, c));
        if (rows.Count == 0) { Console.WriteLine($"no case matches '{filter}' (fwd, bwdIn, bwdW, lora, head)"); return 1; }
        double geo = Math.Exp(rows.Average(r => Math.Log(r.Ratio)));
        Console.WriteLine($"geometric mean ftn/OpenBLAS over {rows.Count} cases: {geo:F2}");
        return 0;
    }

    /// <summary>C(M,N) = op(A)·op(B) in layout 0 = NT (forward), 1 = NN (input gradient), 2 = TN accumulate (weight gradient).</summary>
    public static Row Layout(CpuBackend be, OpenBlas blas, string label, int m, int n, int k, int layout)
    {
        using var a = Rand(be, 1, layout == 2 ? new[] { k, m } : new[] { m, k });
        using var b = Rand(be, 2, layout == 0 ? new[] { n, k } : new[] { k, n });
        using var c = Rand(be, 3, m, n);
        float* pa = P(be, a), pb = P(be, b), pc = P(be, c);
        Action ftn = layout switch
        {
            0 => () => be.MatMul(c, a, b, null, m, n, k, false),
            1 => () => be.MatMulBackwardInput(c, a, b, m, k, n, false),
            _ => () => be.MatMulBackwardWeight(c, null, a, b, k, m, n),
        };
        Action peer = layout switch
        {
            0 => () => blas.Sgemm(false, true, m, n, k, 1f, pa, k, pb, k, 0f, pc, n),
            1 => () => blas.Sgemm(false, false, m, n, k, 1f, pa, k, pb, n, 0f, pc, n),
            _ => () => blas.Sgemm(true, false, m, n, k, 1f, pa, m, pb, n, 1f, pc, n),
        };
        var (tf, tp) = Race(ftn, peer, 2.0 * m * n * k);
        return new Row($"{label} {m}x{n}x{k}", 2.0 * m * n * k, tf, tp);
    }

    /// <summary>LoRA forward y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ: ftn's LoraLinearForward against three sgemm calls.</summary>
    public static Row LoraFwd(CpuBackend be, OpenBlas blas, int m, int n, int k, int r)
    {
        using var x = Rand(be, 1, m, k); using var w = Rand(be, 2, n, k); using var la = Rand(be, 3, r, k); using var lb = Rand(be, 4, n, r);
        using var y = Rand(be, 5, m, n); using var u = Rand(be, 6, m, r);
        float* px = P(be, x), pw = P(be, w), pa = P(be, la), pb = P(be, lb), py = P(be, y), pu = P(be, u);
        const float s = 2f;
        var lp = new LoraParams(la, lb, s, 0f, 0);
        double flops = 2.0 * m * n * k + 2.0 * m * r * k + 2.0 * m * n * r;
        var (tf, tp) = Race(() => be.LoraLinearForward(y, x, w, null, lp, u, null, m, n, k, r), () =>
        {
            blas.Sgemm(false, true, m, n, k, 1f, px, k, pw, k, 0f, py, n);
            blas.Sgemm(false, true, m, r, k, 1f, px, k, pa, k, 0f, pu, r);
            blas.Sgemm(false, true, m, n, r, s, pu, r, pb, r, 1f, py, n);
        }, flops);
        return new Row($"lora fwd {m}x{n}x{k} r{r}", flops, tf, tp);
    }

    /// <summary>LoRA backward (dx, dA, dB; base frozen): ftn's LoraLinearBackward against five sgemm calls.</summary>
    public static Row LoraBwd(CpuBackend be, OpenBlas blas, int m, int n, int k, int r)
    {
        using var x = Rand(be, 1, m, k); using var w = Rand(be, 2, n, k); using var la = Rand(be, 3, r, k); using var lb = Rand(be, 4, n, r);
        using var dy = Rand(be, 5, m, n); using var u = Rand(be, 6, m, r); using var g = Rand(be, 7, m, r);
        using var dx = Rand(be, 8, m, k); using var da = Rand(be, 9, r, k); using var db = Rand(be, 10, n, r);
        float* px = P(be, x), pw = P(be, w), pa = P(be, la), pb = P(be, lb), pdy = P(be, dy), pu = P(be, u), pg = P(be, g),
            pdx = P(be, dx), pda = P(be, da), pdb = P(be, db);
        const float s = 2f;
        var lp = new LoraParams(la, lb, s, 0f, 0);
        double flops = 2.0 * m * n * k + 2.0 * (2.0 * m * n * r + 2.0 * m * r * k);
        var (tf, tp) = Race(() => be.LoraLinearBackward(dx, dy, x, w, lp, u, null, g, da, db, null, null, m, n, k, r, false), () =>
        {
            blas.Sgemm(false, false, m, r, n, 1f, pdy, n, pb, r, 0f, pg, r);      // g = dy·B
            blas.Sgemm(true, false, n, r, m, s, pdy, n, pu, r, 1f, pdb, r);       // dB += s·dyᵀ·u
            blas.Sgemm(true, false, r, k, m, s, pg, r, px, k, 1f, pda, k);        // dA += s·gᵀ·x
            blas.Sgemm(false, false, m, k, n, 1f, pdy, n, pw, k, 0f, pdx, k);     // dx = dy·W
            blas.Sgemm(false, false, m, k, r, s, pg, r, pa, k, 1f, pdx, k);       // dx += s·g·A
        }, flops);
        return new Row($"lora bwd {m}x{n}x{k} r{r}", flops, tf, tp);
    }

    /// <summary>
    /// LM head + cross-entropy + input gradient. ftn: the chunked sequence of LlamaModel (logits of
    /// LlamaModel.DefaultLogitsChunkElements floats at a time). Peer: one sgemm for all logits, the same softmax-cross-entropy pass, one sgemm for dX.
    /// </summary>
    public static Row HeadCe(CpuBackend be, OpenBlas blas, int m, int v, int c)
    {
        using var x = Rand(be, 1, m, c); using var w = Rand(be, 2, v, c); using var dx = Rand(be, 3, m, c);
        using var logits = be.Allocate(DType.F32, m, v); using var targets = be.Allocate(DType.I32, m); using var losses = be.Allocate(DType.F32, m);
        var tg = new int[m]; var rng = new Random(5); for (int i = 0; i < m; i++) tg[i] = rng.Next(v);
        be.Upload(targets, tg);
        int chunk = Math.Max(1, FineTuneNative.Runtime.Model.LlamaModel.DefaultLogitsChunkElements / v);
        var chunks = new List<(Tensor X, Tensor L, Tensor T, Tensor Ls, Tensor Dx, int Rows)>();
        for (int r0 = 0; r0 < m; r0 += chunk)
        {
            int rows = Math.Min(chunk, m - r0);
            chunks.Add((x.Slice(r0, rows), logits.Slice(r0, rows), targets.Slice(r0, rows), losses.Slice(r0, rows), dx.Slice(r0, rows), rows));
        }
        float* px = P(be, x), pw = P(be, w), pdx = P(be, dx), pl = P(be, logits);
        double flops = 4.0 * m * v * c;
        var (tf, tp) = Race(() =>
        {
            foreach (var ch in chunks)
            {
                be.MatMul(ch.L, ch.X, w, null, ch.Rows, v, c, false);
                be.CrossEntropy(ch.L, ch.T, ch.Ls, ch.Rows, v, -100, 1f / m, true);
                be.MatMulBackwardInput(ch.Dx, ch.L, w, ch.Rows, v, c, false);
            }
        }, () =>
        {
            blas.Sgemm(false, true, m, v, c, 1f, px, c, pw, c, 0f, pl, v);
            be.CrossEntropy(logits, targets, losses, m, v, -100, 1f / m, true);
            blas.Sgemm(false, false, m, c, v, 1f, pl, v, pw, c, 0f, pdx, c);
        }, flops);
        return new Row($"head+CE fwd+dX {m}x{v}x{c}", flops, tf, tp);
    }

    private static Tensor Rand(CpuBackend be, int seed, params int[] shape) => BenchEnv.Random(be, DType.F32, seed, shape);

    private static float* P(CpuBackend be, Tensor t) => (float*)be.Ptr(t, "t");

    /// <summary>
    /// Alternates ftn and the peer (one warm-up each, then rounds until ~2.4 s or 15 rounds) and returns the best time
    /// of each. Interleaving keeps a burst of load on the shared machine from favouring one side; a 20 ms pause after
    /// OpenBLAS lets its OpenMP threads stop spinning before ftn runs. With FTN_CPUTIME=1 the time is the process CPU
    /// time divided by the thread count (a per-core rate that survives a loaded machine; meaningful at 1 thread, where
    /// no OpenMP thread spins).
    /// </summary>
    public static (double Ftn, double Peer) Race(Action ftn, Action peer, double flops)
    {
        bool cpu = Environment.GetEnvironmentVariable("FTN_CPUTIME") == "1";
        var proc = Process.GetCurrentProcess();
        double Once(Action a)
        {
            proc.Refresh();
            var c0 = proc.TotalProcessorTime;
            var sw = Stopwatch.StartNew();
            a();
            double wall = sw.Elapsed.TotalSeconds;
            if (!cpu) return wall;
            proc.Refresh();
            return (proc.TotalProcessorTime - c0).TotalSeconds / CpuThreads;
        }
        ftn(); peer(); Thread.Sleep(20);
        double bf = double.MaxValue, bp = double.MaxValue, total = 0;
        for (int i = 0; i < 15 && total < 2.4; i++)
        {
            double t = Once(ftn); bf = Math.Min(bf, t); total += t;
            t = Once(peer); bp = Math.Min(bp, t); total += t;
            Thread.Sleep(20);
        }
        return (bf, bp);
    }

    /// <summary>Threads both sides run with (for the CPU-time mode).</summary>
    public static int CpuThreads { get; internal set; } = 1;
}
