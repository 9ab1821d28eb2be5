using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class MatMulTests
{
    // (M, N, K): M=1, sizes off the vector width, K across the GEMM depth block (128), M across the row block (96),
    // N <= 16 with M > 4 (the CPU GEMM's unpacked LoRA-rank path, ragged 12-row edge).
    public static readonly (int M, int N, int K)[] Shapes =
    {
        (1, 1, 1), (1, 37, 19), (3, 5, 7), (2, 3, 4), (7, 33, 17), (13, 65, 40), (6, 32, 16), (20, 70, 130), (97, 40, 21),
        (29, 16, 45), (14, 5, 33),
    };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_LiteralCase(string backend)
    {
        var b = Backend(backend);
        using var x = Up(b, new float[] { 1, 2, 3, 4 }, 2, 2);
        using var w = Up(b, new float[] { 1, 0, 0, 1, 1, 1 }, 3, 2);
        using var bias = Up(b, new float[] { 0.5f, -1, 2 }, 3);
        using var y = b.Allocate(DType.F32, 2, 3);
        b.MatMul(y, x, w, bias, 2, 3, 2, false);
        Close(new double[] { 1.5, 1, 5, 3.5, 3, 9 }, y, "y");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_MatchesReference(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (var (m, n, k) in Shapes)
            foreach (bool withBias in new[] { false, true })
                foreach (bool acc in new[] { false, true })
                {
                    string what = $"y M={m} N={n} K={k} bias={withBias} acc={acc}";
                    var xd = Rand((long)m * k, seed++); var wd = Rand((long)n * k, seed++); var bd = Rand(n, seed++); var y0 = Rand((long)m * n, seed++);
                    using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var bias = Up(b, bd, n); using var y = Up(b, y0, m, n);
                    b.MatMul(y, x, w, withBias ? bias : null, m, n, k, acc);
                    var expected = MatMulReference.Forward(xd, wd, withBias ? bd : null, m, n, k);
                    Close(acc ? Plus(expected, y0) : expected, y, what);
                }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_Bf16Weights(string backend)
    {
        var b = Backend(backend);
        int seed = 100;
        foreach (var (m, n, k) in Shapes)
        {
            var xd = Rand((long)m * k, seed++); var wd = RoundBf16(Rand((long)n * k, seed++));
            using var x = Up(b, xd, m, k); using var w = UpBf16(b, GradCheck.ToFloat(wd), n, k); using var y = b.Allocate(DType.F32, m, n);
            b.MatMul(y, x, w, null, m, n, k, false);
            // the reference sees the same bf16-rounded weights (and on tensor cores x rounded to bf16 too, as the mma reads
            // it, unless M is a decode GEMV's few rows: f32), so only f32 accumulation error remains
            Close(MatMulReference.Forward(MatMulForwardInput(b, DType.BF16, xd, m), wd, null, m, n, k), y, $"y bf16 M={m} N={n} K={k}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void BackwardInput_MatchesReference_OverwritesOrAccumulates(string backend)
    {
        var b = Backend(backend);
        int seed = 200;
        foreach (var (m, n, k) in Shapes)
            foreach (bool acc in new[] { false, true })
                foreach (bool bf16 in new[] { false, true })
                {
                    var dyd = Rand((long)m * n, seed++); var wd = Rand((long)n * k, seed++);
                    if (bf16) wd = RoundBf16(wd);
                    var garbage = Rand((long)m * k, seed++, 50);
                    using var dy = Up(b, dyd, m, n);
                    using var w = bf16 ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
                    using var dx = Up(b, garbage, m, k);
                    b.MatMulBackwardInput(dx, dy, w, m, n, k, acc);
                    var expected = MatMulReference.BackwardInput(bf16 ? MatMulInput(b, DType.BF16, dyd) : dyd, wd, m, n, k); // tensor cores round dy
                    Close(acc ? Plus(expected, garbage) : expected, dx, $"dx M={m} N={n} K={k} acc={acc} bf16={bf16}");
                }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void BackwardWeight_MatchesReference_Accumulates(string backend)
    {
        var b = Backend(backend);
        int seed = 300;
        foreach (var (m, n, k) in Shapes.Append((130, 9, 20)))
            foreach (bool withBias in new[] { false, true })
            {
                var dyd = Rand((long)m * n, seed++); var xd = Rand((long)m * k, seed++);
                var dw0 = Rand((long)n * k, seed++, 3); var db0 = Rand(n, seed++, 3);
                using var dy = Up(b, dyd, m, n); using var x = Up(b, xd, m, k);
                using var dw = Up(b, dw0, n, k); using var db = Up(b, db0, n);
                b.MatMulBackwardWeight(dw, withBias ? db : null, dy, x, m, n, k);
                Close(Plus(dw0, MatMulReference.BackwardWeight(dyd, xd, m, n, k)), dw, $"dw M={m} N={n} K={k}");
                Close(withBias ? Plus(db0, MatMulReference.BackwardBias(dyd, m, n)) : db0, db, $"dBias M={m} N={n} K={k}");
            }
    }

    /// <summary>
    /// The weight gradient of a weight trained in bf16 (MatMulBackwardWeightBf16, autocast semantics): on tensor cores dy
    /// and x rounded to bf16 with f32 accumulation, elsewhere the exact f32 product; dBias the exact column sum of dy.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void BackwardWeightBf16_MatchesReferenceOnItsOperands_Accumulates(string backend)
    {
        var b = Backend(backend);
        int seed = 400;
        foreach (var (m, n, k) in new[] { (1, 1, 1), (5, 3, 7), (37, 20, 44) }) // ragged, and row runs of 4 (vector loads)
        {
            var dyd = Rand((long)m * n, seed++); var xd = Rand((long)m * k, seed++);
            var dw0 = Rand((long)n * k, seed++, 3); var db0 = Rand(n, seed++, 3);
            using var dy = Up(b, dyd, m, n); using var x = Up(b, xd, m, k);
            using var dw = Up(b, dw0, n, k); using var db = Up(b, db0, n);
            b.MatMulBackwardWeightBf16(dw, db, dy, x, m, n, k);
            var (rdy, rx) = (MatMulInput(b, DType.BF16, dyd), MatMulInput(b, DType.BF16, xd)); // as the mma reads them
            Close(Plus(dw0, MatMulReference.BackwardWeight(rdy, rx, m, n, k)), dw, $"dw M={m} N={n} K={k}");
            Close(Plus(db0, MatMulReference.BackwardBias(dyd, m, n)), db, $"dBias M={m} N={n} K={k}");
        }
    }

    /// <summary>
    /// The CPU GEMM's block boundaries (cpu only: the sizes are too big for the simulator): several K slices of at most
    /// 256 (K=600 → 3 slices of 200), more rows than one packed A block (2040: B is packed once and reused by the
    /// second row block), more columns than one packed B block (4096), f32 and bf16 weights, every layout; and K slices
    /// in more than one parallel region (13×4200×2000: Gemm.RegionFloats holds 4 of the 8 slices of a 4096-column block).
    /// </summary>
    [Theory]
    [InlineData(13, 4200, 2000)]
    [InlineData(2100, 40, 600)]
    [InlineData(13, 4200, 20)]
    [InlineData(30, 70, 1030)]
    public void Cpu_BlockBoundaries_MatchReference(int m, int n, int k)
    {
        var b = Backend("cpu");
        var xd = Rand((long)m * k, 1); var wd = RoundBf16(Rand((long)n * k, 2)); var dyd = Rand((long)m * n, 3);
        foreach (bool bf16 in new[] { false, true })
        {
            using var x = Up(b, xd, m, k);
            using var w = bf16 ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
            using var y = b.Allocate(DType.F32, m, n);
            b.MatMul(y, x, w, null, m, n, k, false);
            Close(MatMulReference.Forward(xd, wd, null, m, n, k), y, $"y M={m} N={n} K={k} bf16={bf16}");
            using var dy = Up(b, dyd, m, n);
            using var dx = b.Allocate(DType.F32, m, k);
            b.MatMulBackwardInput(dx, dy, w, m, n, k, false);
            Close(MatMulReference.BackwardInput(dyd, wd, m, n, k), dx, $"dx M={m} N={n} K={k} bf16={bf16}");
        }
        using var dyT = Up(b, dyd, m, n); using var xT = Up(b, xd, m, k);
        using var dw = b.Allocate(DType.F32, n, k);
        b.MatMulBackwardWeight(dw, null, dyT, xT, m, n, k);
        Close(MatMulReference.BackwardWeight(dyd, xd, m, n, k), dw, $"dw M={m} N={n} K={k}");
    }

    [Fact]
    public void ReferenceBackward_MatchesFiniteDifferences()
    {
        const int m = 3, n = 4, k = 5;
        var x = Rand(m * k, 1); var w = Rand(n * k, 2); var bias = Rand(n, 3); var dy = Rand(m * n, 4);
        GradMatches(p => MatMulReference.Forward(p, w, bias, m, n, k), x, dy, MatMulReference.BackwardInput(dy, w, m, n, k), "dx");
        GradMatches(p => MatMulReference.Forward(x, p, bias, m, n, k), w, dy, MatMulReference.BackwardWeight(dy, x, m, n, k), "dw");
        GradMatches(p => MatMulReference.Forward(x, w, p, m, n, k), bias, dy, MatMulReference.BackwardBias(dy, m, n), "dBias");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void TooSmallTensor_ThrowsNamingIt(string backend)
    {
        var b = Backend(backend);
        using var x = b.Allocate(DType.F32, 4, 3);
        using var w = b.Allocate(DType.F32, 5, 3);
        using var y = b.Allocate(DType.F32, 4, 4);
        y.Name = "smallOutput";
        ThrowsNaming("smallOutput", () => b.MatMul(y, x, w, null, 4, 5, 3, false));
        using var y2 = b.Allocate(DType.F32, 4, 5);
        using var x2 = b.Allocate(DType.F32, 2, 3);
        x2.Name = "smallInput";
        ThrowsNaming("smallInput", () => b.MatMul(y2, x2, w, null, 4, 5, 3, false));
        using var dw = b.Allocate(DType.F32, 5, 2);
        dw.Name = "smallGrad";
        ThrowsNaming("smallGrad", () => b.MatMulBackwardWeight(dw, null, y2, x, 4, 5, 3));
    }
}
