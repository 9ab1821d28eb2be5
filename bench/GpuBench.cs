using System.Diagnostics;
using System.Globalization;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;

namespace FineTuneNative.Bench;

/// <summary>
/// `bench gpu [--shape smollm2|llama1b|qwen7b] [--tokens N] [--iters N]`: times every ILGPU op on the CUDA device with
/// device events (ILGPU profiling markers on the stream around N launches after 2 warm-up launches) and prints the
/// achieved TFLOP/s or TB/s against the H100 floor of the same work (989 TFLOP/s dense bf16, 3.35 TB/s). Without a
/// CUDA device it says so and exits 0. No network, no Python. docs/kernels.md documents the command.
/// </summary>
internal static class GpuBench
{
    private const double PeakFlops = 989e12, PeakBytes = 3.35e12;

    private sealed record Shape(string Name, int C, int F, int NH, int NKV, int HS, int V);

    private static readonly Shape[] Shapes =
    {
        new("smollm2", 576, 1536, 9, 3, 64, 49152),
        new("llama1b", 2048, 8192, 32, 8, 64, 128256),
        new("qwen7b", 3584, 18944, 28, 4, 128, 152064),
    };

    public static int Run(string[] args)
    {
        string shapeName = Arg(args, "--shape") ?? "llama1b";
        int batch = 8, seq = 2048;
        int tokens = int.Parse(Arg(args, "--tokens") ?? (batch * seq).ToString(CultureInfo.InvariantCulture), CultureInfo.InvariantCulture);
        int iters = int.Parse(Arg(args, "--iters") ?? "10", CultureInfo.InvariantCulture);
        var shape = Shapes.FirstOrDefault(s => s.Name == shapeName)
                    ?? throw new ArgumentException($"--shape {shapeName}: expected one of {string.Join(", ", Shapes.Select(s => s.Name))}");
        if (IlgpuBackend.CudaDeviceCount() == 0)
        {
            Console.WriteLine("bench gpu: no CUDA device (no NVIDIA GPU or no driver): the GPU benchmark is skipped.");
            return 0;
        }
        using var b = IlgpuBackend.CreateCuda(0);
        Console.WriteLine($"bench gpu: {b.Name} ({b.DeviceName}), shape {shape.Name} (C={shape.C}, F={shape.F}, NH={shape.NH}, NKV={shape.NKV}, HS={shape.HS}, V={shape.V}), " +
                          $"M={tokens} tokens, {iters} timed launches after 2 warm-up; tensor cores: {b.TensorCores}");
        Console.WriteLine($"{"op",-34} {"ms",9} {"TFLOP/s",9} {"TB/s",7} {"floor ms",9} {"of floor",9}");
        var run = new Runner(b, iters);
        int m = tokens, c = shape.C, f = shape.F, qkv = (shape.NH + 2 * shape.NKV) * shape.HS;

        using var x = Rand(b, DType.F32, m, Math.Max(c, f));
        using var y = b.Allocate(DType.F32, m, Math.Max(2 * f, qkv));
        foreach (var (name, n, k) in new[] { ("q,k,v", qkv, c), ("o", c, c), ("gate+up", 2 * f, c), ("down", c, f) })
        {
            using var w = Rand(b, DType.BF16, n, k);
            run.Op($"MatMul bf16 {name} {m}x{n}x{k}", 2.0 * m * n * k, 4.0 * m * k + 2.0 * n * k + 4.0 * m * n,
                () => b.MatMul(View(y, m * n), View(x, m * k), w, null, m, n, k, false));
        }
        // decode: the GEMV (MatMulGemvKernels, M <= 8 rows) at one token and at 8 sequences, against the tensor-core kernel at
        // 9 rows (the first count above the GEMV's bound: its launch shape at M = 1, ceil(N/128) groups); floor: W's bytes
        foreach (var (name, n, k) in new[] { ("q,k,v", qkv, c), ("o", c, c), ("gate+up", 2 * f, c), ("down", c, f) })
        {
            using var w = Rand(b, DType.BF16, n, k);
            foreach (int dm in new[] { 1, 8, 9 })
                run.Op($"MatMul bf16 decode {name} {dm}x{n}x{k}{(dm <= 8 ? " (GEMV)" : " (tile kernel)")}", 2.0 * dm * n * k, 4.0 * dm * k + 2.0 * n * k + 4.0 * dm * n,
                    () => b.MatMul(View(y, dm * n), View(x, dm * k), w, null, dm, n, k, false));
        }
        using (var w = Rand(b, DType.BF16, c, f))
            run.Op($"MatMulBackwardInput bf16 down {m}x{f}x{c}", 2.0 * m * f * c, 4.0 * m * c + 2.0 * f * c + 4.0 * m * f,
                () => b.MatMulBackwardInput(View(y, m * f), View(x, m * c), w, m, c, f, false));
        using (var w = Rand(b, DType.F32, c, c))
            run.Op($"MatMul f32 (SIMT) o {m}x{c}x{c}", 2.0 * m * c * c, 8.0 * m * c + 4.0 * c * c,
                () => b.MatMul(View(y, m * c), View(x, m * c), w, null, m, c, c, false));
        using (var w = Rand(b, DType.BF16, c, c))
        using (var la = Rand(b, DType.F32, 16, c))
        using (var lb = Rand(b, DType.F32, c, 16))
        using (var u = b.Allocate(DType.F32, m, 16))
        {
            var lora = new LoraParams(la, lb, 2f, 0f, 1);
            run.Op($"LoraLinearForward bf16 o r16", 2.0 * m * c * c + 4.0 * m * 16 * c, 8.0 * m * c + 2.0 * c * c,
                () => b.LoraLinearForward(View(y, m * c), View(x, m * c), w, null, lora, u, null, m, c, c, 16));
        }
        // o_proj / down_proj write the residual stream: the add fused into the epilogue against the matmul, then Add
        // (both against the fused op's floor: the unfused pair moves 8·M·C bytes more)
        using (var res = Rand(b, DType.F32, m, c))
        using (var la = Rand(b, DType.F32, 16, c))
        using (var lb = Rand(b, DType.F32, c, 16))
        using (var u = b.Allocate(DType.F32, m, 16))
        {
            foreach (var (name, k) in new[] { ("o", c), ("down", f) })
            {
                using var w = Rand(b, DType.BF16, c, k);
                double flops = 2.0 * m * c * k, bytes = 4.0 * m * k + 2.0 * c * k + 8.0 * m * c;
                run.Op($"MatMulResidual bf16 {name} {m}x{c}x{k}", flops, bytes,
                    () => b.MatMulResidual(View(y, m * c), res, View(x, m * k), w, null, m, c, k));
                run.Op($"MatMul+Add bf16 {name} (unfused)", flops, bytes, () =>
                {
                    b.MatMul(View(y, m * c), View(x, m * k), w, null, m, c, k, false);
                    b.Add(View(y, m * c), View(y, m * c), res);
                });
            }
            using var wo = Rand(b, DType.BF16, c, c);
            var lora = new LoraParams(la, lb, 2f, 0f, 1);
            run.Op($"LoraLinearForwardResidual bf16 o r16", 2.0 * m * c * c + 4.0 * m * 16 * c, 12.0 * m * c + 2.0 * c * c,
                () => b.LoraLinearForwardResidual(View(y, m * c), res, View(x, m * c), wo, null, lora, u, null, m, c, c, 16));
        }
        // The LoRA backward (o_proj, r = 16): dx on the tensor cores with the rank-r term in the epilogue; g = dy·B; dB and dA
        // reduce over all M tokens into one row of tiles (split-K); and dB alone as a weight-gradient-shaped product.
        using (var w = Rand(b, DType.BF16, c, c))
        using (var la = Rand(b, DType.F32, 16, c))
        using (var lb = Rand(b, DType.F32, c, 16))
        using (var u = Rand(b, DType.F32, m, 16))
        using (var g = b.Allocate(DType.F32, m, 16))
        using (var dA = b.Allocate(DType.F32, 16, c))
        using (var dB = b.Allocate(DType.F32, c, 16))
        {
            var lora = new LoraParams(la, lb, 2f, 0f, 1);
            run.Op($"LoraLinearBackward bf16 o r16", 2.0 * m * c * c + 4 * 2.0 * m * 16 * c, 12.0 * m * c + 2.0 * c * c + 12.0 * m * 16,
                () => b.LoraLinearBackward(View(y, m * c), View(x, m * c), View(x, m * c), w, lora, u, null, g, dA, dB, null, null, m, c, c, 16, false));
            run.Op($"MatMulBackwardWeight f32 (split-K) dB {c}x16 over {m}", 2.0 * m * c * 16, 4.0 * m * c + 4.0 * m * 16 + 8.0 * c * 16,
                () => b.MatMulBackwardWeight(dB, null, View(x, m * c), u, m, c, 16));
        }
        using (var nw = Rand(b, DType.F32, c))
        using (var rstd = b.Allocate(DType.F32, m))
            run.Op("RmsNormForward", 4.0 * m * c, 8.0 * m * c, () => b.RmsNormForward(View(y, m * c), rstd, View(x, m * c), nw, m, c, 1e-5f));
        run.Op("SwiGluForward", 6.0 * m * f, 12.0 * m * f, () => b.SwiGluForward(View(y, m * f), View(x, m * f), View(x, m * f), (long)m * f));
        using (var pos = b.Allocate(DType.I32, m))
        {
            b.Upload(pos, Enumerable.Range(0, m).Select(i => i % seq).ToArray());
            run.Op("Rope q", 6.0 * m * shape.NH * shape.HS, 8.0 * m * shape.NH * shape.HS,
                () => b.Rope(View(y, m * shape.NH * shape.HS), pos, m, shape.NH, shape.HS, 10000f, RopeLayout.RotateHalf, false));
        }
        int bt = Math.Max(1, m / seq), t = Math.Min(seq, m);
        using (var q = Rand(b, DType.F32, bt * t * shape.NH * shape.HS))
        using (var kv = Rand(b, DType.F32, bt * t * shape.NKV * shape.HS))
        using (var o = b.Allocate(DType.F32, bt * t * shape.NH * shape.HS))
        using (var dq = b.Allocate(DType.F32, bt * t * shape.NH * shape.HS))
        using (var dkv = b.Allocate(DType.F32, bt * t * shape.NKV * shape.HS))
        using (var dkv2 = b.Allocate(DType.F32, bt * t * shape.NKV * shape.HS))
        using (var lse = b.Allocate(DType.F32, bt * shape.NH * t))
        {
            double pairs = (double)bt * shape.NH * t * (t + 1) / 2;
            double qBytes = 4.0 * bt * t * shape.NH * shape.HS, kvBytes = 4.0 * bt * t * shape.NKV * shape.HS;
            float scale = 1f / MathF.Sqrt(shape.HS);
            run.Op($"AttentionForward B{bt} T{t}", 4 * pairs * shape.HS, 2 * qBytes + 2 * kvBytes,
                () => b.AttentionForward(o, lse, q, kv, kv, bt, t, t, t, shape.NH, shape.NKV, shape.HS, scale));
            run.Op($"AttentionBackward B{bt} T{t}", 10 * pairs * shape.HS, 4 * qBytes + 4 * kvBytes,
                () => b.AttentionBackward(dq, dkv, dkv2, o, o, lse, q, kv, kv, bt, t, t, shape.NH, shape.NKV, shape.HS, scale));
            if (b.TensorCores)
            {
                // bf16 q, k, v: the tensor-core kernel on sm_80+ (AttentionTensorCore.cs)
                using var q16 = Rand(b, DType.BF16, bt * t * shape.NH * shape.HS);
                using var kv16 = Rand(b, DType.BF16, bt * t * shape.NKV * shape.HS);
                run.Op($"AttentionForward bf16 (mma) B{bt} T{t}", 4 * pairs * shape.HS, qBytes / 2 + kvBytes + qBytes,
                    () => b.AttentionForward(o, lse, q16, kv16, kv16, bt, t, t, t, shape.NH, shape.NKV, shape.HS, scale));
                // head <= 64: AttentionTensorCoreBackward.cs; 65..128: the head-split kernels (AttentionTensorCoreBackwardWide.cs)
                run.Op($"AttentionBackward bf16 (mma{(shape.HS > 64 ? ", head split" : "")}) B{bt} T{t}", 10 * pairs * shape.HS, 2 * qBytes + kvBytes + 2 * kvBytes,
                    () => b.AttentionBackward(dq, dkv, dkv2, o, o, lse, q16, kv16, kv16, bt, t, t, shape.NH, shape.NKV, shape.HS, scale));
            }
            // decode: one new token per sequence over a full f32 cache of t rows (AttentionDecode.cs, split-K)
            run.Op($"AttentionDecode B{bt} cache {t}", 4.0 * bt * shape.NH * t * shape.HS, 2 * kvBytes + 8.0 * bt * shape.NH * shape.HS,
                () => b.AttentionForward(View(o, bt * shape.NH * shape.HS), null, View(q, bt * shape.NH * shape.HS), kv, kv, bt, 1, t, t,
                    shape.NH, shape.NKV, shape.HS, scale));
        }
        int rows = Math.Min(m, 2048); // the LM head's chunk
        using (var logits = Rand(b, DType.F32, rows, shape.V))
        using (var targets = b.Allocate(DType.I32, rows))
        using (var losses = b.Allocate(DType.F32, rows))
            run.Op($"CrossEntropy {rows}x{shape.V}", 5.0 * rows * shape.V, 8.0 * rows * shape.V,
                () => b.CrossEntropy(logits, targets, losses, rows, shape.V, -100, 1f, true));
        int nParams = 16 * 1024 * 1024;
        using (var p = Rand(b, DType.F32, nParams))
        using (var g = Rand(b, DType.F32, nParams))
        using (var m1 = b.Allocate(DType.F32, nParams))
        using (var v1 = b.Allocate(DType.F32, nParams))
            run.Op($"AdamW {nParams} params", 12.0 * nParams, 28.0 * nParams, () => b.AdamW(p, g, m1, v1, 1e-4f, 0.9f, 0.999f, 1e-8f, 0f, 1, 1f));
        // The trainer's step over 168 LoRA-sized tensors (16 x C or 16 x F) in one gradient-norm reduction and one fused AdamW.
        {
            var sizes = Enumerable.Range(0, 7 * 24).Select(i => 16 * (i % 7 < 4 ? c : i % 7 == 6 ? f : c)).ToArray();
            long total = sizes.Sum(n => (long)n);
            b.Reserve(16 * total + (1 << 20)); // one pool chunk: one launch each
            var ts = sizes.Select(n => (P: Rand(b, DType.F32, n), G: Rand(b, DType.F32, n), M: b.Allocate(DType.F32, n), V: b.Allocate(DType.F32, n))).ToArray();
            using var clip = b.Allocate(DType.F32, 2);
            var grads = ts.Select(e => e.G).ToArray();
            var list = ts.Select(e => new AdamWTensor(e.P, e.G, e.M, e.V, true)).ToArray();
            run.Op($"GradNormClip {sizes.Length} tensors {total}", 2.0 * total, 4.0 * total, () => b.GradNormClip(grads, clip, 1f));
            run.Op($"AdamWMultiTensor {sizes.Length} tensors {total}", 12.0 * total, 28.0 * total,
                () => b.AdamWMultiTensor(list, new AdamWHyper(1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f, 1), clip));
            foreach (var e in ts) { e.P.Dispose(); e.G.Dispose(); e.M.Dispose(); e.V.Dispose(); }
        }
        Console.WriteLine("Floors: max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s) of an H100 SXM; on another GPU read 'of floor' relative to its own peaks.");
        return 0;
    }

    private static string? Arg(string[] args, string name)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
    }

    private static Tensor View(Tensor t, int n) => t.View(0, n);

    private static Tensor Rand(IBackend b, DType dtype, params int[] shape)
    {
        var t = b.Allocate(dtype, shape);
        var rng = new Random(1);
        var data = new float[t.Length];
        for (int i = 0; i < data.Length; i++) data[i] = (float)(rng.NextDouble() * 2 - 1);
        b.Upload(t, data);
        return t;
    }

    private sealed class Runner(IlgpuBackend b, int iters)
    {
        public void Op(string name, double flops, double bytes, Action launch)
        {
            launch();
            launch();
            var (start, end) = (default(ILGPU.Runtime.ProfilingMarker), default(ILGPU.Runtime.ProfilingMarker));
            b.Synchronize();
            var wall = Stopwatch.StartNew();
            start = b.Marker();
            for (int i = 0; i < iters; i++) launch();
            end = b.Marker();
            double ms = end.MeasureFrom(start).TotalMilliseconds / iters;
            wall.Stop();
            start.Dispose();
            end.Dispose();
            double floor = Math.Max(flops / PeakFlops, bytes / PeakBytes) * 1e3;
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{name,-34} {ms,9:0.000} {flops / ms / 1e9,9:0.0} {bytes / ms / 1e9,7:0.00} {floor,9:0.000} {floor / ms,8:0%}"));
        }
    }
}
