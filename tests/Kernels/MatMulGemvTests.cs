using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// The decode matmul (M ≤ <see cref="MatMulGemvKernels.MaxRows"/> rows): y (+)= x·Wᵀ [+ bias] [+ residual] against
/// MatMulReference for every weight dtype, on every backend. On ILGPU the GEMV must have run (per-thread record of the
/// path) and, being f32 throughout, matches the unrounded reference also where tensor cores would round x; one row
/// more (MaxRows + 1) takes the tiled / tensor-core kernels again.
/// </summary>
public class MatMulGemvTests
{
    private const int Max = MatMulGemvKernels.MaxRows;

    // (M, N, K): K below, at and across the warp (19 < 32; 130 = 4 warps + a tail), odd K for 16-bit weights, N ragged,
    // M = 1, 3 and the bound; K % 4 == 0 takes the 4-wide loads (8: 2 runs, fewer than a warp; 132: 33 runs, one warp of
    // 32 plus one); M = Max + 1 goes to the old path
    private static readonly (int M, int N, int K)[] Shapes =
        { (1, 1, 1), (1, 37, 19), (3, 33, 17), (Max, 5, 45), (1, 3, 130), (3, 9, 132), (Max, 6, 8), (1, 5, 4), (Max + 1, 13, 21), (Max + 1, 7, 12) };

    // Q8_0/Q4_0 rows are whole 32-element blocks
    private static readonly (int M, int N, int K)[] QuantShapes = { (1, 37, 64), (3, 5, 96), (Max, 11, 32), (Max + 1, 7, 64) };

    /// <summary>The ILGPU backends (the CPU's Q8_0/Q4_0 matmul quantizes x to Q8 per block: tests/Kernels/Quant).</summary>
    public static IEnumerable<object[]> Ilgpu() => TestBackends.Names().Where(n => n != "cpu").Select(n => new object[] { n });

    private static void AssertPath(IBackend b, int m, int k, bool quantized, string what)
    {
        if (b is not IlgpuBackend) return;
        var path = MatMulKernels.LastForwardPathOnThisThread;
        // runs of 4 k where K % 4 == 0 (f32/16-bit weights; the tensors here start at offset 0)
        var gemv = k % 4 == 0 && !quantized ? MatMulPath.GemvVectorized : MatMulPath.Gemv;
        if (m <= Max) Assert.True(path == gemv, $"{what}: ran {path}, not {gemv}");
        else Assert.True(path is MatMulPath.Tiled or MatMulPath.TensorCore, $"{what}: ran {path} above the GEMV's {Max} rows");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_FloatWeights_MatchReference_WithBiasAccumulateResidual(string backend)
    {
        var b = Backend(backend);
        int seed = 500;
        // the CPU backend's MatMul takes f32/bf16 weights (CpuBackend.Weight); f16 on the ILGPU backends
        var dtypes = b is IlgpuBackend ? new[] { DType.F32, DType.BF16, DType.F16 } : new[] { DType.F32, DType.BF16 };
        foreach (var dtype in dtypes)
            foreach (var (m, n, k) in Shapes)
                foreach (int variant in new[] { 0, 1, 2 }) // plain; bias + accumulate; residual + bias
                {
                    string what = $"{backend} {dtype} M={m} N={n} K={k} variant={variant}";
                    var xd = Rand((long)m * k, seed++);
                    var wd = Rand((long)n * k, seed++);
                    wd = dtype == DType.BF16 ? RoundBf16(wd) : dtype == DType.F16 ? RoundF16(wd) : wd;
                    var bd = Rand(n, seed++); var y0 = Rand((long)m * n, seed++); var rd = Rand((long)m * n, seed++);
                    using var x = Up(b, xd, m, k); using var w = UpAs(b, dtype, wd, n, k); using var bias = Up(b, bd, n);
                    using var y = Up(b, y0, m, n); using var r = Up(b, rd, m, n);
                    if (variant == 2) b.MatMulResidual(y, r, x, w, bias, m, n, k);
                    else b.MatMul(y, x, w, variant == 1 ? bias : null, m, n, k, accumulate: variant == 1);
                    AssertPath(b, m, k, false, what);
                    // the GEMV multiplies in f32 on every accelerator (x exact); above it tensor cores round x (MatMulInput)
                    var expected = MatMulReference.Forward(MatMulForwardInput(b, dtype, xd, m), wd, variant == 0 ? null : bd, m, n, k);
                    if (variant == 1) expected = Plus(expected, y0);
                    if (variant == 2) expected = Plus(expected, rd);
                    Close(expected, y, what);
                }
    }

    /// <summary>
    /// At one row a bf16-weight matmul is exact in f32 on the tensor-core dispatch too: far (20 f32 atol) from the
    /// reference on x rounded to bf16, so the check above could not pass by rounding x.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(Ilgpu))]
    public void Decode_Bf16Weights_DoNotRoundX(string backend)
    {
        var b = Backend(backend);
        const int m = 1, n = 7, k = 67;
        var xd = Rand(m * k, 41); var wd = RoundBf16(Rand(n * k, 42));
        using var x = Up(b, xd, m, k); using var w = UpAs(b, DType.BF16, wd, n, k); using var y = b.Allocate(DType.F32, m, n);
        b.MatMul(y, x, w, null, m, n, k, accumulate: false);
        AssertPath(b, m, k, false, backend);
        var got = y.ToArray();
        Close(MatMulReference.Forward(xd, wd, null, m, n, k), y, "exact");
        var rounded = MatMulReference.Forward(RoundBf16(xd), wd, null, m, n, k);
        double off = rounded.Select((e, i) => Math.Abs(e - got[i])).Max();
        Assert.True(off > 20 * Tolerance.F32.Atol, $"within {off:G3} of the rounded-x product");
    }

    /// <summary>
    /// Views that start off a 4-element boundary (x at element 1, or a bf16 W at element 2) keep the scalar loads
    /// although K % 4 == 0; one starting on it (W at a whole number of rows of K = 8) takes the 4-wide loads.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(Ilgpu))]
    public void Decode_Views_VectorizeOnlyWhenAligned(string backend)
    {
        var b = Backend(backend);
        const int m = 3, n = 5, k = 8;
        foreach (var (xOff, wOff) in new[] { (1, 0), (0, 2), (0, k), (4, k) })
        {
            var xd = Rand(xOff + m * k, 61 + xOff); var wd = RoundBf16(Rand(wOff + n * k, 62 + wOff));
            using var xAll = Up(b, xd, xOff + m * k); using var wAll = UpAs(b, DType.BF16, wd, wOff + n * k);
            using var y = b.Allocate(DType.F32, m, n);
            b.MatMul(y, xAll.View(xOff, m * k), wAll.View(wOff, n * k), null, m, n, k, accumulate: false);
            var path = MatMulKernels.LastForwardPathOnThisThread;
            var expectedPath = xOff % 4 == 0 && wOff % 4 == 0 ? MatMulPath.GemvVectorized : MatMulPath.Gemv;
            Assert.True(path == expectedPath, $"x at {xOff}, W at {wOff}: ran {path}, not {expectedPath}");
            Close(MatMulReference.Forward(xd[xOff..], wd[wOff..], null, m, n, k), y, $"x at {xOff}, W at {wOff}");
        }
    }

    /// <summary>
    /// GGUF Q8_0/Q4_0 weights: the GEMV dequantizes q·d in f32 (exact), reference QuantBlocks.Dequantize (the CPU's) in
    /// double; above the bound the tensor-core kernel (every accelerator) rounds x and q·d to bf16.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(Ilgpu))]
    public void Forward_QuantizedWeights_MatchReference_WithBiasAccumulateResidual(string backend)
    {
        var b = Backend(backend);
        int seed = 700;
        foreach (var type in new[] { DType.Q8_0, DType.Q4_0 })
            foreach (var (m, n, k) in QuantShapes)
                foreach (int variant in new[] { 0, 1, 2 })
                {
                    string what = $"{backend} {type} M={m} N={n} K={k} variant={variant}";
                    var wf = GradCheck.ToFloat(Rand((long)n * k, seed++));
                    var raw = new byte[type.StorageBytes((long)n * k)];
                    QuantBlocks.Quantize(type, wf, raw);
                    var deq = new float[n * k];
                    QuantBlocks.Dequantize(type, raw, deq);
                    var wd = GradCheck.ToDouble(deq);
                    var xd = Rand((long)m * k, seed++); var bd = Rand(n, seed++); var y0 = Rand((long)m * n, seed++); var rd = Rand((long)m * n, seed++);
                    using var w = b.Allocate(type, n, k);
                    b.UploadRaw(w, raw);
                    using var x = Up(b, xd, m, k); using var bias = Up(b, bd, n); using var y = Up(b, y0, m, n); using var r = Up(b, rd, m, n);
                    if (variant == 2) b.MatMulResidual(y, r, x, w, bias, m, n, k);
                    else b.MatMul(y, x, w, variant == 1 ? bias : null, m, n, k, accumulate: variant == 1);
                    AssertPath(b, m, k, true, what);
                    var expected = m <= Max
                        ? MatMulReference.Forward(xd, wd, variant == 0 ? null : bd, m, n, k)
                        : MatMulReference.Forward(RoundBf16(xd), RoundBf16(wd), variant == 0 ? null : bd, m, n, k);
                    if (variant == 1) expected = Plus(expected, y0);
                    if (variant == 2) expected = Plus(expected, rd);
                    Close(expected, y, what);
                }
    }
}
