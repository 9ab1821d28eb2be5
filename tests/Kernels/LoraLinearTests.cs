using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class LoraLinearTests
{
    // (M, N, K, R, dropout)
    public static readonly (int M, int N, int K, int R, float P)[] Cases =
    {
        (1, 3, 5, 1, 0f), (4, 7, 9, 2, 0f), (13, 19, 33, 4, 0f), (5, 8, 6, 3, 0.3f), (17, 35, 40, 8, 0.1f), (1, 5, 4, 2, 0.5f),
    };

    private const float Scale = 2.5f;
    private const ulong Seed = 0xC0FFEE;

    [Fact]
    public void ReferenceDropMask_IsDropoutHash()
    {
        var x = Rand(600, 1);
        var xd = LoraLinearReference.Drop(x, 20, 30, 0.25f, 42);
        int dropped = 0;
        for (int i = 0; i < x.Length; i++)
        {
            bool keep = DropoutHash.Keep(42, i, 0.25f);
            Assert.Equal(keep ? x[i] / 0.75 : 0.0, xd[i], 12);
            if (!keep) dropped++;
        }
        Assert.InRange(dropped, 100, 200); // 150 expected
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_MatchesReference(string backend)
    {
        var b = Backend(backend);
        int seed = 10;
        foreach (var (m, n, k, r, p) in Cases)
            foreach (bool withBias in new[] { false, true })
            {
                string what = $"M={m} N={n} K={k} R={r} p={p} bias={withBias}";
                var xd = Rand(m * k, seed++); var wd = Rand(n * k, seed++); var bd = Rand(n, seed++);
                var ad = Rand(r * k, seed++); var bbd = Rand(n * r, seed++);
                using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var bias = Up(b, bd, n);
                using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r);
                using var y = Up(b, Rand(m * n, seed++, 9), m, n); // garbage: the forward overwrites
                using var u = b.Allocate(DType.F32, m, r);
                using var xDrop = b.Allocate(DType.F32, m, k);
                var lora = new LoraParams(a, bb, Scale, p, Seed);
                b.LoraLinearForward(y, x, w, withBias ? bias : null, lora, u, p > 0 ? xDrop : null, m, n, k, r);
                var (ey, eu, exd) = LoraLinearReference.Forward(xd, wd, withBias ? bd : null, ad, bbd, Scale, p, Seed, m, n, k, r);
                Close(ey, y, "y " + what);
                Close(eu, u, "u " + what);
                if (p > 0) Close(exd, xDrop, "xDrop " + what); // the exact DropoutHash mask
            }
    }

    /// <summary>The 16-bit base weights a backend's LoRA takes: the CPU backend's LoRA linears read f32 or bf16 only.</summary>
    private static DType[] HalfWeights(string backend) => backend == "cpu" ? new[] { DType.BF16 } : new[] { DType.BF16, DType.F16 };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_HalfBaseWeight(string backend)
    {
        var b = Backend(backend);
        const int m = 6, n = 11, k = 13, r = 3;
        foreach (var dt in HalfWeights(backend))
        {
            Func<double[], double[]> round = dt == DType.BF16 ? RoundBf16 : RoundF16; // what a tensor core's operand holds
            var xd = Rand(m * k, 1); var wd = round(Rand(n * k, 2)); var ad = Rand(r * k, 3); var bbd = Rand(n * r, 4);
            var bd = Rand(n, 5); var rd = Rand(m * n, 6);
            using var x = Up(b, xd, m, k); using var w = UpAs(b, dt, wd, n, k);
            using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r); using var bias = Up(b, bd, n); using var res = Up(b, rd, m, n);
            using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r);
            using var yr = Up(b, Enumerable.Repeat(float.NaN, m * n).ToArray(), m, n); using var u2 = b.Allocate(DType.F32, m, r);
            var lora = new LoraParams(a, bb, Scale, 0, 0);
            b.LoraLinearForward(y, x, w, null, lora, u, null, m, n, k, r);
            b.LoraLinearForwardResidual(yr, res, x, w, bias, lora, u2, null, m, n, k, r); // bias and residual in the same epilogue
            var e = LoraLinearReference.Forward(xd, wd, null, ad, bbd, Scale, 0, 0, m, n, k, r);
            Close(e.U, u, $"u {dt.Name()}");
            Close(e.U, u2, $"u residual {dt.Name()}");
            var ey = e.Y;
            var eyr = Plus(LoraLinearReference.Forward(xd, wd, bd, ad, bbd, Scale, 0, 0, m, n, k, r).Y, rd);
            if (TestBackends.RoundsOperands(b))
            {
                // tensor cores: one mma over [x | s·u]·[W | B]ᵀ with x, s·u and B rounded to W's type (MatMulTensorCoreKernels.WithLoraInMma);
                // s·u is formed in f32 from the device's u (checked above) as the kernel forms it, so the rounding is the kernel's
                var su = round(Array.ConvertAll(u.ToArray(), v => (double)(Scale * v)));
                var low = MatMulReference.Forward(su, round(bbd), null, m, n, r);
                ey = Plus(MatMulReference.Forward(round(xd), wd, null, m, n, k), low);
                eyr = Plus(Plus(MatMulReference.Forward(round(xd), wd, bd, m, n, k), low), rd);
            }
            Close(ey, y, $"y {dt.Name()}");
            Close(eyr, yr, $"y residual + bias {dt.Name()}");
        }
    }

    /// <summary>
    /// The backward over a bf16 (f16) base weight, with dropout and accumulation: on tensor cores dx = dy·W (dy rounded to W's type)
    /// plus the rank-r term s·mask⊙(g·A)/(1−p) in the same launch's f32 epilogue (LoraLinearKernels.Backward).
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Backward_HalfBaseWeight_WithDropout(string backend)
    {
        var b = Backend(backend);
        const int m = 6, n = 11, k = 13, r = 3;
        const float p = 0.3f;
        foreach (var dt in HalfWeights(backend))
        {
            var xd = Rand(m * k, 11); var wd = dt == DType.BF16 ? RoundBf16(Rand(n * k, 12)) : RoundF16(Rand(n * k, 12)); var ad = Rand(r * k, 13); var bbd = Rand(n * r, 14);
            var dyd = Rand(m * n, 15); var dx0 = Rand(m * k, 16, 3); var dA0 = Rand(r * k, 17, 3); var dB0 = Rand(n * r, 18, 3);
            using var x = Up(b, xd, m, k); using var w = UpAs(b, dt, wd, n, k);
            using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r); using var dy = Up(b, dyd, m, n);
            using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r); using var xDrop = b.Allocate(DType.F32, m, k);
            using var g = b.Allocate(DType.F32, m, r);
            using var dx = Up(b, dx0, m, k); using var dA = Up(b, dA0, r, k); using var dB = Up(b, dB0, n, r);
            var lora = new LoraParams(a, bb, Scale, p, Seed);
            b.LoraLinearForward(y, x, w, null, lora, u, xDrop, m, n, k, r);
            b.LoraLinearBackward(dx, dy, x, w, lora, u, xDrop, g, dA, dB, null, null, m, n, k, r, accumulate: true);
            var e = LoraLinearReference.Backward(dyd, xd, wd, ad, bbd, Scale, p, Seed, m, n, k, r);
            // the base term's input as the backend multiplies it (rounded to W's type on tensor cores): the reference's dy·W replaced
            var baseDx = Minus(MatMulReference.BackwardInput(MatMulInput(b, dt, dyd), wd, m, n, k), MatMulReference.BackwardInput(dyd, wd, m, n, k));
            Close(MatMulReference.BackwardInput(dyd, bbd, m, n, r), g, $"g {dt.Name()}");
            Close(Plus(dx0, Plus(e.DX, baseDx)), dx, $"dx += {dt.Name()}");
            Close(Plus(dA0, e.DA), dA, $"dA += {dt.Name()}");
            Close(Plus(dB0, e.DB), dB, $"dB += {dt.Name()}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Backward_MatchesReference_AccumulatesParameterGrads(string backend)
    {
        var b = Backend(backend);
        int seed = 500;
        foreach (var (m, n, k, r, p) in Cases)
            foreach (var (acc, trainBase) in new[] { (false, false), (true, true) }) // both flags, both values; fewer simulator runs
                {
                    string what = $"M={m} N={n} K={k} R={r} p={p} acc={acc} base={trainBase}";
                    var xd = Rand(m * k, seed++); var wd = Rand(n * k, seed++); var ad = Rand(r * k, seed++); var bbd = Rand(n * r, seed++);
                    var dyd = Rand(m * n, seed++);
                    var dx0 = Rand(m * k, seed++, 7); var dA0 = Rand(r * k, seed++, 3); var dB0 = Rand(n * r, seed++, 3);
                    var dW0 = Rand(n * k, seed++, 3); var dBias0 = Rand(n, seed++, 3);
                    using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k);
                    using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r);
                    using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r); using var xDrop = b.Allocate(DType.F32, m, k);
                    using var dy = Up(b, dyd, m, n); using var g = Up(b, Rand(m * r, seed++, 5), m, r);
                    using var dx = Up(b, dx0, m, k); using var dA = Up(b, dA0, r, k); using var dB = Up(b, dB0, n, r);
                    using var dW = Up(b, dW0, n, k); using var dBias = Up(b, dBias0, n);
                    var lora = new LoraParams(a, bb, Scale, p, Seed);
                    var xDropOrNull = p > 0 ? xDrop : null;
                    b.LoraLinearForward(y, x, w, null, lora, u, xDropOrNull, m, n, k, r);
                    b.LoraLinearBackward(dx, dy, x, w, lora, u, xDropOrNull, g, dA, dB, trainBase ? dW : null, trainBase ? dBias : null, m, n, k, r, acc);
                    var e = LoraLinearReference.Backward(dyd, xd, wd, ad, bbd, Scale, p, Seed, m, n, k, r);
                    Close(MatMulReference.BackwardInput(dyd, bbd, m, n, r), g, "g " + what);
                    Close(acc ? Plus(e.DX, dx0) : e.DX, dx, "dx " + what);
                    Close(Plus(e.DA, dA0), dA, "dA " + what);
                    Close(Plus(e.DB, dB0), dB, "dB " + what);
                    Close(trainBase ? Plus(e.DW, dW0) : dW0, dW, "dW " + what);
                    Close(trainBase ? Plus(e.DBias, dBias0) : dBias0, dBias, "dBias " + what);
                }
    }

    /// <summary>dx, dA, dB, dW, dBias of the whole y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ path against central differences.</summary>
    [Theory]
    [InlineData(0f)]
    [InlineData(0.4f)]
    public void ReferenceBackward_MatchesFiniteDifferences(float p)
    {
        const int m = 3, n = 4, k = 5, r = 2;
        var x = Rand(m * k, 1); var w = Rand(n * k, 2); var bias = Rand(n, 3); var a = Rand(r * k, 4); var bb = Rand(n * r, 5); var dy = Rand(m * n, 6);
        var e = LoraLinearReference.Backward(dy, x, w, a, bb, Scale, p, Seed, m, n, k, r);
        double[] Y(double[] xx, double[] ww, double[] bi, double[] aa, double[] b2) => LoraLinearReference.Forward(xx, ww, bi, aa, b2, Scale, p, Seed, m, n, k, r).Y;
        GradMatches(q => Y(q, w, bias, a, bb), x, dy, e.DX, "dx");
        GradMatches(q => Y(x, q, bias, a, bb), w, dy, e.DW, "dW");
        GradMatches(q => Y(x, w, q, a, bb), bias, dy, e.DBias, "dBias");
        GradMatches(q => Y(x, w, bias, q, bb), a, dy, e.DA, "dA");
        GradMatches(q => Y(x, w, bias, a, q), bb, dy, e.DB, "dB");
    }

    /// <summary>The scale enters y linearly: ∂(Σ dy⊙y)/∂s (central differences of the reference) = Σ dy ⊙ (u·Bᵀ) with the backend's u.</summary>
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Scale_DerivativeMatchesBackendLowRankPath(string backend)
    {
        var b = Backend(backend);
        const int m = 4, n = 6, k = 7, r = 3;
        const float p = 0.25f;
        var xd = Rand(m * k, 1); var wd = Rand(n * k, 2); var ad = Rand(r * k, 3); var bbd = Rand(n * r, 4); var dyd = Rand(m * n, 5);
        using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r);
        using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r); using var xDrop = b.Allocate(DType.F32, m, k);
        b.LoraLinearForward(y, x, w, null, new LoraParams(a, bb, Scale, p, Seed), u, xDrop, m, n, k, r);
        var numeric = GradCheck.Numeric(s => Dot(dyd, LoraLinearReference.Forward(xd, wd, null, ad, bbd, s[0], p, Seed, m, n, k, r).Y), new double[] { Scale });
        double analytic = Dot(dyd, MatMulReference.Forward(Down(u), bbd, null, m, n, r));
        Assert.Equal(numeric[0], analytic, 4);
        // and y itself: y(s) - x·Wᵀ = s·u·Bᵀ
        var baseY = MatMulReference.Forward(xd, wd, null, m, n, k);
        var low = MatMulReference.Forward(Down(u), bbd, null, m, n, r);
        var expected = new double[m * n];
        for (int i = 0; i < expected.Length; i++) expected[i] = baseY[i] + Scale * low[i];
        Close(expected, y, "y = x·Wᵀ + s·u·Bᵀ");
    }

    /// <summary>
    /// The CPU GEMM folds s·u·Bᵀ (forward) and s·g·A (dx) into the base product's last K slice (Gemm.RankUpdate); cpu only
    /// (too big for the simulator): ragged 12-row and 32-column edges, several K slices (300 → 2, 4200 → 17), two
    /// packed row blocks (2100 > 2040: the update's row panels are indexed across blocks), two column blocks (4200 >
    /// 4096), odd ranks, bias, accumulate and pre-filled gradients, bf16 base weight, and dropout (the unfused dx path).
    /// </summary>
    [Theory]
    [InlineData(29, 70, 300, 16, 0f, false)]
    [InlineData(2100, 40, 33, 5, 0f, false)]
    [InlineData(13, 4200, 20, 3, 0f, true)]
    [InlineData(13, 20, 4200, 3, 0f, false)]
    [InlineData(50, 96, 64, 16, 0.2f, false)]
    [InlineData(37, 33, 257, 1, 0f, true)]
    public void Cpu_FusedRankUpdate_MatchesReference(int m, int n, int k, int r, float p, bool bf16)
    {
        var b = Backend("cpu");
        var xd = Rand((long)m * k, 1); var wd = RoundBf16(Rand((long)n * k, 2)); var bd = Rand(n, 3);
        var ad = Rand((long)r * k, 4); var bbd = Rand((long)n * r, 5); var dyd = Rand((long)m * n, 6);
        var dx0 = Rand((long)m * k, 7); var dA0 = Rand((long)r * k, 8); var dB0 = Rand((long)n * r, 9);
        string what = $"M={m} N={n} K={k} R={r} p={p} bf16={bf16}";
        using var x = Up(b, xd, m, k); using var bias = Up(b, bd, n);
        using var w = bf16 ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
        using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r);
        using var y = Up(b, Rand((long)m * n, 10, 9), m, n); using var u = b.Allocate(DType.F32, m, r);
        using var xDrop = b.Allocate(DType.F32, m, k);
        var lora = new LoraParams(a, bb, Scale, p, Seed);
        var xDropOrNull = p > 0 ? xDrop : null;
        b.LoraLinearForward(y, x, w, bias, lora, u, xDropOrNull, m, n, k, r);
        var ef = LoraLinearReference.Forward(xd, wd, bd, ad, bbd, Scale, p, Seed, m, n, k, r);
        Close(ef.Y, y, "y " + what, DepthTolerance(k + r));
        Close(ef.U, u, "u " + what, DepthTolerance(k));
        foreach (bool acc in new[] { false, true })
        {
            using var dy = Up(b, dyd, m, n); using var g = b.Allocate(DType.F32, m, r);
            using var dx = Up(b, dx0, m, k); using var dA = Up(b, dA0, r, k); using var dB = Up(b, dB0, n, r);
            b.LoraLinearBackward(dx, dy, x, w, lora, u, xDropOrNull, g, dA, dB, null, null, m, n, k, r, acc);
            var e = LoraLinearReference.Backward(dyd, xd, wd, ad, bbd, Scale, p, Seed, m, n, k, r);
            Close(acc ? Plus(e.DX, dx0) : e.DX, dx, $"dx acc={acc} " + what, DepthTolerance(n + r));
            Close(Plus(e.DA, dA0), dA, "dA " + what, DepthTolerance(m));
            Close(Plus(e.DB, dB0), dB, "dB " + what, DepthTolerance(m + k)); // its terms hold u, itself a K-deep sum
        }
    }

    /// <summary>
    /// Tolerance.F32 is set for sums of up to ~128 terms; an f32 sum of <paramref name="depth"/> terms in [-1, 1] carries
    /// a rounding error that grows with the depth (up to depth·ε in sequence: the ≤ 16-column kernels accumulate a
    /// whole 2100-row reduction in one chain), so both tolerances scale with depth / 128 (first seen: dA at M = 2100,
    /// |e| = 6.1, error 8.0e-4; y at K = 4200, error 2.7e-4).
    /// </summary>
    private static (double Atol, double Rtol) DepthTolerance(int depth)
    {
        double f = Math.Max(1.0, depth / 128.0);
        return (Tolerance.F32.Atol * f, Tolerance.F32.Rtol * f);
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void DropoutWithoutXDrop_Throws(string backend)
    {
        var b = Backend(backend);
        using var x = b.Allocate(DType.F32, 2, 3); using var w = b.Allocate(DType.F32, 4, 3);
        using var a = b.Allocate(DType.F32, 1, 3); using var bb = b.Allocate(DType.F32, 4, 1);
        using var y = b.Allocate(DType.F32, 2, 4); using var u = b.Allocate(DType.F32, 2, 1);
        ThrowsNaming("xDrop", () => b.LoraLinearForward(y, x, w, null, new LoraParams(a, bb, 1, 0.1f, 1), u, null, 2, 4, 3, 1));
    }
}
