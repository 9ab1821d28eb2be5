using System.Diagnostics;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench;

/// <summary>
/// A fast sanity timer for kernel work between BenchmarkDotNet runs (best of N, no statistics):
/// dotnet run -c Release --project bench -- quick [threads] [attention|rope]
/// </summary>
internal static class Quick
{
    public static void Run(string[] args)
    {
        int threads = args.Length > 1 ? int.Parse(args[1]) : 0;
        using var b = new CpuBackend(threads);
        Console.WriteLine($"cpu threads={b.Threads} Vector512={System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated}");
        bool onlyAttention = args.Length > 2 && args[2] == "attention";
        RopeStore(b);
        if (args.Length > 2 && args[2] == "rope") return;
        foreach (var a in new[] { new AttentionShape(8, 512, 9, 3, 64), new AttentionShape(3, 333, 6, 2, 40) })
        {
            using var q = BenchEnv.Random(b, DType.F32, 1, a.B, a.T, a.T, a.NH, a.HS);
            using var k = BenchEnv.Random(b, DType.F32, 2, a.B, a.T, a.NKV, a.HS);
            using var v = BenchEnv.Random(b, DType.F32, 3, a.B, a.T, a.NKV, a.HS);
            using var o = b.Allocate(DType.F32, a.B, a.T, a.T, a.NH, a.HS);
            using var lse = b.Allocate(DType.F32, a.B, a.NH, a.T);
            using var dq = b.Allocate(DType.F32, a.B, a.T, a.T, a.NH, a.HS);
            using var dk = b.Allocate(DType.F32, a.B, a.T, a.NKV, a.HS);
            using var dv = b.Allocate(DType.F32, a.B, a.T, a.NKV, a.HS);
            float sc = 1f / MathF.Sqrt(a.HS);
            double f = Time(() => b.AttentionForward(o, lse, q, k, v, a.B, a.T, a.T, a.T, a.NH, a.NKV, a.HS, sc));
            double bw = Time(() => b.AttentionBackward(dq, dk, dv, o, o, lse, q, k, v, a.B, a.T, a.T, a.NH, a.NKV, a.HS, sc));
            Console.WriteLine($"attention {a,-18} fwd {a.Flops / f / 1e9,7:F1}  bwd {2.5 * a.Flops / bw / 1e9,7:F1} GFLOP/s (bwd counted as 2.5x fwd flops)");
            // bf16 q, k, v (bf16 attention): the same kernels after one widening pass per call
            using var q16 = b.Allocate(DType.BF16, (int)q.Length);
            using var k16 = b.Allocate(DType.BF16, (int)k.Length);
            using var v16 = b.Allocate(DType.BF16, (int)v.Length);
            b.Copy(q16, q); b.Copy(k16, k); b.Copy(v16, v);
            double f16 = Time(() => b.AttentionForward(o, lse, q16, k16, v16, a.B, a.T, a.T, a.T, a.NH, a.NKV, a.HS, sc));
            double bw16 = Time(() => b.AttentionBackward(dq, dk, dv, o, o, lse, q16, k16, v16, a.B, a.T, a.T, a.NH, a.NKV, a.HS, sc));
            Console.WriteLine($"attention {a,-18} bf16 q,k,v: fwd {a.Flops / f16 / 1e9,7:F1}  bwd {2.5 * a.Flops / bw16 / 1e9,7:F1} GFLOP/s ({f16 / f:F2}x / {bw16 / bw:F2}x the f32 time)");
        }
        if (onlyAttention) return;
        foreach (var s in new[] { new MatMulShape(1024, 1024, 1024), new MatMulShape(4096, 576, 576), new MatMulShape(512, 49152, 576), new MatMulShape(1000, 333, 517), new MatMulShape(1, 49152, 576) })
            foreach (var dt in new[] { DType.F32, DType.BF16 })
            {
                using var x = BenchEnv.Random(b, DType.F32, 1, s.M, s.K);
                using var w = BenchEnv.Random(b, dt, 2, s.N, s.K);
                using var y = b.Allocate(DType.F32, s.M, s.N);
                using var dw = b.Allocate(DType.F32, s.N, s.K);
                double f = Time(() => b.MatMul(y, x, w, null, s.M, s.N, s.K, false));
                double bi = Time(() => b.MatMulBackwardInput(x, y, w, s.M, s.N, s.K, false));
                double bw = dt == DType.F32 ? Time(() => b.MatMulBackwardWeight(dw, null, y, x, s.M, s.N, s.K)) : double.NaN;
                Console.WriteLine($"matmul {s,-16} {dt.Name(),-5} fwd {s.Flops / f / 1e9,7:F1}  bwdIn {s.Flops / bi / 1e9,7:F1}  bwdW {s.Flops / bw / 1e9,7:F1} GFLOP/s");
            }
    }

    /// <summary>
    /// bf16 attention's q, k, v store after the projections: the two-pass path (RoPE in place on the f32 q and k, then
    /// one rounding Copy each of q, k, v) against RopeInto (RoPE writes bf16 directly; v keeps its one Copy).
    /// Shapes: SmolLM2-135M (NH 9, NKV 3) and Llama-3.2-1B (NH 32, NKV 8) at head 64, 4096 tokens.
    /// </summary>
    private static void RopeStore(CpuBackend b)
    {
        foreach (var (m, nh, nkv, hs) in new[] { (4096, 9, 3, 64), (4096, 32, 8, 64) })
        {
            using var q = BenchEnv.Random(b, DType.F32, 1, m, nh, hs);
            using var k = BenchEnv.Random(b, DType.F32, 2, m, nkv, hs);
            using var v = BenchEnv.Random(b, DType.F32, 3, m, nkv, hs);
            using var q16 = b.Allocate(DType.BF16, m, nh, hs);
            using var k16 = b.Allocate(DType.BF16, m, nkv, hs);
            using var v16 = b.Allocate(DType.BF16, m, nkv, hs);
            using var pos = b.Allocate(DType.I32, m);
            b.Upload(pos, Enumerable.Range(0, m).Select(i => i % 512).ToArray());
            double twoPass = Time(() =>
            {
                b.Rope(q, pos, m, nh, hs, 10000f, RopeLayout.RotateHalf, inverse: false);
                b.Rope(k, pos, m, nkv, hs, 10000f, RopeLayout.RotateHalf, inverse: false);
                b.Copy(q16, q); b.Copy(k16, k); b.Copy(v16, v);
            });
            double fused = Time(() =>
            {
                b.RopeInto(q16, q, pos, m, nh, hs, 10000f, RopeLayout.RotateHalf);
                b.RopeInto(k16, k, pos, m, nkv, hs, 10000f, RopeLayout.RotateHalf);
                b.Copy(v16, v);
            });
            Console.WriteLine($"rope+bf16 store M{m} h{nh}/{nkv} d{hs}: two-pass {twoPass * 1e3,7:F3} ms  fused {fused * 1e3,7:F3} ms  ({twoPass / fused:F2}x)");
        }
    }

    /// <summary>
    /// Best of up to 20 runs. With FTN_CPUTIME=1 the process CPU time (summed over threads) replaces the wall clock, so
    /// the rate is per core-second: on a loaded shared machine it estimates what one idle core does.
    /// </summary>
    private static double Time(Action a) => BestOf(a, Environment.GetEnvironmentVariable("FTN_CPUTIME") == "1", 1, 20, 1.5);

    /// <summary>
    /// Seconds of the best of up to <paramref name="runs"/> runs of <paramref name="a"/> (after one warm-up run), stopping
    /// once <paramref name="budgetSeconds"/> of wall time are spent. With <paramref name="cpuTime"/> the process CPU time
    /// divided by <paramref name="cpuDivisor"/> replaces the wall clock.
    /// </summary>
    internal static double BestOf(Action a, bool cpuTime, int cpuDivisor, int runs, double budgetSeconds)
    {
        var proc = Process.GetCurrentProcess();
        a();
        double best = double.MaxValue, total = 0;
        for (int i = 0; i < runs && total < budgetSeconds; i++)
        {
            proc.Refresh();
            var c0 = proc.TotalProcessorTime;
            var sw = Stopwatch.StartNew();
            a();
            double t = sw.Elapsed.TotalSeconds;
            proc.Refresh();
            double ct = (proc.TotalProcessorTime - c0).TotalSeconds / cpuDivisor;
            total += t;
            best = Math.Min(best, cpuTime ? ct : t);
        }
        return best;
    }
}
