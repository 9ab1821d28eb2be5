using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// NF4 (bitsandbytes layout): the levels and the double-quantisation map, quantize/dequantize against the
/// independent double reference, and every matmul that takes an NF4 weight against MatMulReference on the
/// dequantized weight, on every backend.
/// </summary>
public class Nf4Tests
{
    /// <summary>Normal-ish weights (sum of uniforms), a few outliers, and an all-zero block.</summary>
    private static float[] Weights(int n, int seed)
    {
        var rng = new Random(seed);
        var x = new float[n];
        for (int i = 0; i < n; i++)
        {
            double s = 0;
            for (int j = 0; j < 4; j++) s += rng.NextDouble() - 0.5;
            x[i] = (float)(s * 0.05 * (i % 97 == 0 ? 8 : 1));
        }
        if (n >= 192) Array.Clear(x, 128, 64); // block 2 all zeros
        return x;
    }

    [Fact]
    public void Levels_and_dynamic_map_are_bitsandbytes()
    {
        Assert.Equal(16, Nf4.Levels.Length);
        for (int i = 0; i < 16; i++) Assert.Equal((float)Nf4Reference.Levels[i], Nf4.Levels[i]);
        Assert.Equal(-1f, Nf4.Levels[0]);
        Assert.Equal(0f, Nf4.Levels[7]);
        Assert.Equal(1f, Nf4.Levels[15]);
        for (int i = 1; i < 16; i++) Assert.True(Nf4.Levels[i] > Nf4.Levels[i - 1]);

        // create_dynamic_map(signed=True): 127 negative values, 0, 127 positive values below 1, and 1; the smallest
        // magnitude is 1e-6 · 0.55 (the one midpoint of linspace(0.1, 1, 2)), the largest negative -(1 - 0.9/128).
        var map = Nf4.DynamicMap;
        Assert.Equal(256, map.Length);
        for (int i = 1; i < 256; i++) Assert.True(map[i] > map[i - 1], $"map not strictly increasing at {i}");
        Assert.Equal(127, map.Count(v => v < 0));
        Assert.Equal(0f, map[127]);
        Assert.Equal(1f, map[255]);
        Assert.Equal(0.55e-6, map[128], 1e-12);
        Assert.Equal(-(1 - 0.9 / 128), map[0], 1e-6);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(63)]
    [InlineData(64)]
    [InlineData(65)]
    [InlineData(1000)]
    [InlineData(64 * 256 + 77)] // two absmax groups, ragged last block
    public void Quantize_matches_the_double_reference(int n)
    {
        var x = Weights(n, n);
        var s = Nf4.Quantize(x);
        Assert.Equal(Nf4Reference.Layout(n).Total, s.LongLength);
        Assert.Equal(DType.NF4.StorageBytes(n), s.LongLength);

        // dequantization: the kernel's f32 loop equals the double reference rounded once
        var y = Nf4.Dequantize(s, n);
        var yr = Nf4Reference.Dequantize(s, n);
        NumericAssert.Close(yr, y, 0, 1e-6, $"dequantize n={n}");

        // codes: each element's code is the level nearest to x / absmax(block) (exhaustive search in double)
        var absmaxTrue = new double[(n + 63) / 64];
        for (int i = 0; i < n; i++) absmaxTrue[i / 64] = Math.Max(absmaxTrue[i / 64], Math.Abs(x[i]));
        var absmaxRec = Nf4Reference.BlockAbsmax(s, n);
        int mismatches = 0;
        for (int i = 0; i < n; i++)
        {
            double a = absmaxTrue[i / 64];
            int expected = a == 0 ? 7 : Nf4Reference.NearestLevel(x[i] / a);
            if (Nf4Reference.Code(s, i) != expected) mismatches++;
        }
        Assert.Equal(0, mismatches);

        // double quantisation of the absmaxes: 8-bit dynamic codes, error within the map's spacing (≤ 1/64 of the
        // group's largest |absmax - mean| at the top decade, where 64 midpoints span [0.1, 1])
        double groupMaxDev = 0, mean = absmaxTrue.Average();
        foreach (var a in absmaxTrue) groupMaxDev = Math.Max(groupMaxDev, Math.Abs(a - mean));
        for (int b = 0; b < absmaxTrue.Length; b++)
            Assert.True(Math.Abs(absmaxRec[b] - absmaxTrue[b]) <= groupMaxDev / 64 + 1e-7,
                $"block {b}: absmax {absmaxTrue[b]} reconstructed as {absmaxRec[b]}");

        // round trip: |x - y| ≤ absmax · (largest half-gap between NF4 levels, 0.1519) + absmax error
        for (int i = 0; i < n; i++)
        {
            double bound = absmaxTrue[i / 64] * 0.152 + groupMaxDev / 64 + 1e-7;
            Assert.True(Math.Abs(x[i] - y[i]) <= bound, $"element {i}: {x[i]} -> {y[i]} (bound {bound})");
        }
    }

    [Fact]
    public void Known_values_quantize_to_the_levels_themselves()
    {
        // one block whose absmax is 2: the values 2·level are reproduced exactly (absmax reconstructs exactly for a
        // single block: offset = absmax, and absmax - offset = 0 is the map's exact 0)
        var x = new float[64];
        for (int i = 0; i < 64; i++) x[i] = 2f * Nf4.Levels[i % 16];
        var s = Nf4.Quantize(x);
        Assert.Equal(x, Nf4.Dequantize(s, 64));
        Assert.Equal(0x01, s[0]); // elements 0 and 1: codes 0 and 1, the first in the high nibble
        Assert.Equal(0x23, s[1]);
    }

    [Fact]
    public unsafe void Dequantize_any_range_equals_the_whole()
    {
        const int n = 1000;
        var s = Nf4.Quantize(Weights(n, 3));
        var all = Nf4.Dequantize(s, n);
        foreach (var (start, count) in new[] { (0, 1), (1, 1), (1, 64), (63, 2), (127, 130), (999, 1), (0, 1000), (5, 0) })
        {
            var part = new float[count];
            fixed (byte* p = s)
            fixed (float* d = part)
                Nf4.Dequantize(p, n, start, count, d);
            Assert.Equal(all.AsSpan(start, count).ToArray(), part);
        }
    }

    private static Tensor UpNf4(IBackend b, float[] w, int n, int k, out double[] dequantized)
    {
        var bytes = Nf4.Quantize(w);
        dequantized = Nf4Reference.Dequantize(bytes, (long)n * k);
        var t = b.Allocate(DType.NF4, n, k);
        b.UploadRaw(t, bytes);
        return t;
    }

    public static readonly (int M, int N, int K)[] Shapes = { (1, 5, 64), (3, 7, 50), (9, 40, 33), (5, 3, 130) };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void MatMul_with_an_nf4_weight_matches_the_reference_on_the_dequantized_weight(string backend)
    {
        var b = Backend(backend);
        CpuBackend.Nf4PanelFloatsOverride = Nf4Kernels.PanelFloatsOverride = 256; // several row panels even at these shapes (this thread only)
        try
        {
            int seed = 40;
            // the simulator pays per launch (each panel is two launches): two shapes there, still several panels and ragged blocks
            foreach (var (m, n, k) in TestBackends.IsSimulator(backend) ? Shapes[1..2].Concat(Shapes[3..]).ToArray() : Shapes)
            {
                string what = $"M={m} N={n} K={k}";
                using var w = UpNf4(b, Weights(n * k, seed++), n, k, out var wd);
                var xd = Rand(m * k, seed++); var bd = Rand(n, seed++); var dyd = Rand(m * n, seed++);
                using var x = Up(b, xd, m, k); using var bias = Up(b, bd, n); using var dy = Up(b, dyd, m, n);

                // on tensor cores x (dy) and the dequantized W are rounded to bf16 (MatMulInput, Nf4Operand)
                var (rx, rdy, rw) = (MatMulInput(b, DType.NF4, xd), MatMulInput(b, DType.NF4, dyd), Nf4Operand(b, wd, "w " + what));
                using var y = Up(b, Rand(m * n, seed++, 5), m, n);
                b.MatMul(y, x, w, bias, m, n, k, accumulate: false);
                Close(MatMulReference.Forward(rx, rw, bd, m, n, k), y, "forward " + what);

                var y0 = Rand(m * n, seed++);
                using var ya = Up(b, y0, m, n);
                b.MatMul(ya, x, w, null, m, n, k, accumulate: true);
                Close(Plus(y0, MatMulReference.Forward(rx, rw, null, m, n, k)), ya, "forward += " + what);

                using var dx = Up(b, Rand(m * k, seed++, 5), m, k);
                b.MatMulBackwardInput(dx, dy, w, m, n, k, accumulate: false);
                Close(MatMulReference.BackwardInput(rdy, rw, m, n, k), dx, "dx " + what);

                var dx0 = Rand(m * k, seed++);
                using var dxa = Up(b, dx0, m, k);
                b.MatMulBackwardInput(dxa, dy, w, m, n, k, accumulate: true);
                Close(Plus(dx0, MatMulReference.BackwardInput(rdy, rw, m, n, k)), dxa, "dx += " + what);
            }
        }
        finally
        {
            CpuBackend.Nf4PanelFloatsOverride = Nf4Kernels.PanelFloatsOverride = 0;
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void LoraLinear_over_an_nf4_base_matches_the_reference(string backend)
    {
        var b = Backend(backend);
        const int m = 6, n = 11, k = 70, r = 3;
        const float scale = 1.5f;
        using var w = UpNf4(b, Weights(n * k, 9), n, k, out var wd);
        var xd = Rand(m * k, 1); var ad = Rand(r * k, 2); var bbd = Rand(n * r, 3); var dyd = Rand(m * n, 4);
        using var x = Up(b, xd, m, k); using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r); using var dy = Up(b, dyd, m, n);
        using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r); using var g = b.Allocate(DType.F32, m, r);
        using var dx = b.Allocate(DType.F32, m, k); using var dA = b.Allocate(DType.F32, r, k); using var dB = b.Allocate(DType.F32, n, r);
        var lora = new LoraParams(a, bb, scale, 0, 0);
        // on tensor cores the base product x·Wᵀ (dy·W) takes bf16-rounded x (dy) and W; the rank-r term stays f32 SIMT
        var rw = Nf4Operand(b, wd, "w");
        var baseY = Minus(MatMulReference.Forward(MatMulInput(b, DType.NF4, xd), rw, null, m, n, k), MatMulReference.Forward(xd, wd, null, m, n, k));
        var baseDx = Minus(MatMulReference.BackwardInput(MatMulInput(b, DType.NF4, dyd), rw, m, n, k), MatMulReference.BackwardInput(dyd, wd, m, n, k));
        b.LoraLinearForward(y, x, w, null, lora, u, null, m, n, k, r);
        Close(Plus(LoraLinearReference.Forward(xd, wd, null, ad, bbd, scale, 0, 0, m, n, k, r).Y, baseY), y, "y");
        b.LoraLinearBackward(dx, dy, x, w, lora, u, null, g, dA, dB, null, null, m, n, k, r, accumulate: false);
        var e = LoraLinearReference.Backward(dyd, xd, wd, ad, bbd, scale, 0, 0, m, n, k, r);
        Close(Plus(e.DX, baseDx), dx, "dx");
        Close(e.DA, dA, "dA");
        Close(e.DB, dB, "dB");
    }

    [Fact]
    public void Nf4_tensors_have_no_views_and_no_float_access()
    {
        var b = Backend("cpu");
        using var t = b.Allocate(DType.NF4, 4, 64);
        Assert.Equal(Nf4.StorageBytes(256), t.Bytes);
        Assert.Throws<InvalidOperationException>(() => t.Slice(0, 1));
        Assert.Throws<InvalidOperationException>(() => t.View(0, 64));
        Assert.ThrowsAny<ArgumentException>(() => t.ToArray());
        using var y = b.Allocate(DType.F32, 1, 3);
        using var x = b.Allocate(DType.F32, 1, 64);
        ThrowsNaming("w", () => b.MatMul(y, x, t, null, 1, 3, 64, false)); // 3·64 elements expected, the tensor has 256
    }
}
