using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Shape and epilogue of one decode GEMV: y(i, j) = Σ_k x(i, k)·W(j, k) [+ bias(j)] [+ y(i, j) or residual(i, j)].</summary>
public struct GemvArgs
{
    /// <summary>Rows of x (1..<see cref="MatMulGemvKernels.MaxRows"/>), output columns, reduction length.</summary>
    public int M, N, K;
    public int Accumulate, HasBias;
    /// <summary>W is GGUF Q8_0/Q4_0 blocks (<see cref="DeviceFloats.QuantLoad"/>), else f32/bf16/f16 (<see cref="DeviceFloats.Load"/>).</summary>
    public int Quantized;
    /// <summary>
    /// 16-byte x loads and 16-byte (f32) or 8-byte (bf16/f16) weight loads, four k per lane and step: set by
    /// <see cref="MatMulGemvKernels.CanVectorize"/> (K % 4 == 0, x f32, both views aligned to 4 elements).
    /// </summary>
    public int Vec;
}

/// <summary>
/// y(M, N) (+)= x(M, K)·W(N, K)ᵀ [+ bias] [+ residual] for M ≤ <see cref="MaxRows"/> rows (decode: one token per sequence):
/// a memory-bound matrix-vector product that reads every weight element once.
/// </summary>
/// <remarks>
/// One warp per output column j, <see cref="WarpsPerGroup"/> columns per group. The lanes stride K (lane l reads
/// W(j, l), W(j, l + warp), ...: consecutive lanes read consecutive elements, so each warp's loads coalesce; when
/// <see cref="CanVectorize"/>, runs of 4: one 16-byte x load per row and one 16- or 8-byte weight load per lane and step), each
/// weight element is widened to f32 once (bf16/f16 exactly, Q8_0/Q4_0 as q·d through <see cref="DeviceFloats.QuantLoad"/>)
/// and multiplied into all M rows' accumulators (registers, one per row); x is read through L1 (M·K floats, shared by the
/// columns of a group). The lane partials are summed with <see cref="GroupReduce.WarpSum(float)"/> (any warp size) and lane 0
/// applies the epilogue. All arithmetic is f32: unlike the tensor-core kernel, x is not rounded to 16 bits, so it matches
/// MatMulReference to f32 accuracy for every weight dtype.
/// Why M ≤ 8: every weight load feeds M FMAs from M live accumulators; at M = 8 a warp streams 8·4 B of x (L1) per weight
/// element, and above it the tiled / tensor-core kernels' reuse of W across 64-128 rows wins over a single pass.
/// </remarks>
internal sealed class MatMulGemvKernels
{
    public const int MaxRows = 8, WarpsPerGroup = 4;

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, GemvArgs> _gemv;

    public MatMulGemvKernels(IlgpuBackend b)
    {
        _b = b;
        _gemv = b.Accelerator.LoadStreamKernel<DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, GemvArgs>(MatMulGemvKernel);
    }

    [GpuKernel(true)]
    public static void MatMulGemvKernel(DeviceFloats x, DeviceFloats w, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, GemvArgs p)
    {
        int lanes = Warp.WarpSize, lane = Warp.LaneIdx;
        int j = Grid.IdxX * (Group.DimX / lanes) + Warp.WarpIdx;
        if (j >= p.N) return; // uniform over the warp: no lane of it takes part in a shuffle
        int m = p.M, k = p.K;
        long row = (long)j * k, count = (long)p.N * k;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
        if (p.Vec != 0)
        {
            // four k per lane and step: x as Float4, W as Float4 (f32) or one 8-byte word of four 16-bit values
            var x4 = x.F32.Cast<Float4>();
            int k4 = k >> 2;
            long row4 = row >> 2;
            for (int c = lane; c < k4; c += lanes)
            {
                float w0, w1, w2, w3;
                if (w.Kind == DeviceFloats.KindF32)
                {
                    var f = w.F32.Cast<Float4>()[row4 + c];
                    w0 = f.X; w1 = f.Y; w2 = f.Z; w3 = f.W;
                }
                else
                {
                    ulong d = w.U16.Cast<ulong>()[row4 + c];
                    bool bf = w.Kind == DeviceFloats.KindBF16;
                    w0 = Widen(bf, (ushort)d); w1 = Widen(bf, (ushort)(d >> 16)); w2 = Widen(bf, (ushort)(d >> 32)); w3 = Widen(bf, (ushort)(d >> 48));
                }
                a0 += Dot4(x4[c], w0, w1, w2, w3);
                if (m > 1) a1 += Dot4(x4[k4 + c], w0, w1, w2, w3);
                if (m > 2) a2 += Dot4(x4[2L * k4 + c], w0, w1, w2, w3);
                if (m > 3) a3 += Dot4(x4[3L * k4 + c], w0, w1, w2, w3);
                if (m > 4) a4 += Dot4(x4[4L * k4 + c], w0, w1, w2, w3);
                if (m > 5) a5 += Dot4(x4[5L * k4 + c], w0, w1, w2, w3);
                if (m > 6) a6 += Dot4(x4[6L * k4 + c], w0, w1, w2, w3);
                if (m > 7) a7 += Dot4(x4[7L * k4 + c], w0, w1, w2, w3);
            }
        }
        else for (int c = lane; c < k; c += lanes)
        {
            float wv = p.Quantized != 0 ? w.QuantLoad(row + c, count) : w.Load(row + c);
            a0 += x.Load(c) * wv;
            if (m > 1) a1 += x.Load(k + c) * wv;
            if (m > 2) a2 += x.Load(2L * k + c) * wv;
            if (m > 3) a3 += x.Load(3L * k + c) * wv;
            if (m > 4) a4 += x.Load(4L * k + c) * wv;
            if (m > 5) a5 += x.Load(5L * k + c) * wv;
            if (m > 6) a6 += x.Load(6L * k + c) * wv;
            if (m > 7) a7 += x.Load(7L * k + c) * wv;
        }
        Store(p, output, residual, bias, 0, j, GroupReduce.WarpSum(a0), lane);
        if (m > 1) Store(p, output, residual, bias, 1, j, GroupReduce.WarpSum(a1), lane);
        if (m > 2) Store(p, output, residual, bias, 2, j, GroupReduce.WarpSum(a2), lane);
        if (m > 3) Store(p, output, residual, bias, 3, j, GroupReduce.WarpSum(a3), lane);
        if (m > 4) Store(p, output, residual, bias, 4, j, GroupReduce.WarpSum(a4), lane);
        if (m > 5) Store(p, output, residual, bias, 5, j, GroupReduce.WarpSum(a5), lane);
        if (m > 6) Store(p, output, residual, bias, 6, j, GroupReduce.WarpSum(a6), lane);
        if (m > 7) Store(p, output, residual, bias, 7, j, GroupReduce.WarpSum(a7), lane);
    }

    private static float Widen(bool bf16, ushort h) => bf16 ? HalfMath.Bf16ToF32(h) : HalfMath.F16ToF32(h);

    private static float Dot4(Float4 x, float w0, float w1, float w2, float w3) => x.X * w0 + x.Y * w1 + x.Z * w2 + x.W * w3;

    /// <summary>
    /// Whether the GEMV may read 4 k at a time: K % 4 == 0, x f32 and W f32/bf16/f16, both starting at a multiple of 4
    /// elements (pool ranges are 256-byte aligned, so the views are 16-byte (x, f32 W) or 8-byte (16-bit W) aligned).
    /// </summary>
    internal static bool CanVectorize(Tensor x, Tensor w, int k)
        => k % 4 == 0 && x.DType == DType.F32 && x.Offset % 4 == 0 && w.Offset % 4 == 0 &&
           (w.DType == DType.F32 || w.DType == DType.BF16 || w.DType == DType.F16);

    private static void Store(GemvArgs p, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, int i, int j, float acc, int lane)
    {
        if (lane != 0) return;
        long idx = (long)i * p.N + j;
        float v = acc;
        if (p.HasBias != 0) v += bias.Load(j);
        if (p.Accumulate != 0) v += residual[idx]; // the output itself for +=, or the residual stream (see Launch)
        output[idx] = v;
    }

    /// <summary>
    /// Launches the GEMV (callers validate shapes; 1 ≤ M ≤ <see cref="MaxRows"/>). With a <paramref name="residual"/>
    /// (M, N) it writes y = residual + x·Wᵀ [+ bias]; without one, <paramref name="accumulate"/> adds y's previous value.
    /// </summary>
    internal void Launch(DeviceFloats x, DeviceFloats w, ArrayView<float> y, DeviceFloats bias, int m, int n, int k, bool accumulate, bool hasBias,
        bool vectorized, ArrayView<float> residual = default)
    {
        if (m < 1 || m > MaxRows) throw new ArgumentOutOfRangeException(nameof(m), $"GEMV takes 1..{MaxRows} rows, got {m}");
        var p = new GemvArgs
        {
            M = m, N = n, K = k, Accumulate = accumulate ? 1 : 0, HasBias = hasBias ? 1 : 0,
            Quantized = w.Kind == DeviceFloats.KindQ8_0 || w.Kind == DeviceFloats.KindQ4_0 ? 1 : 0,
            Vec = vectorized ? 1 : 0,
        };
        if (residual.Length > 0) p.Accumulate = 1;
        else residual = y;
        int group = WarpsPerGroup * _b.Accelerator.WarpSize;
        _gemv(new KernelConfig(IlgpuBackend.CheckedCount((n + WarpsPerGroup - 1) / WarpsPerGroup, "MatMul"), group), x, w, y, residual, bias, p);
    }
}
