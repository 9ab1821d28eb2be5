using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>RMSNorm: y = x / sqrt(mean(x²) + eps) ⊙ w, one group per row with a group reduction.</summary>
/// <remarks>
/// Forward saves rstd(M) = 1/sqrt(mean(x²)+eps) (one float per row; the backward then needs no reduction
/// over x², only the dot Σ w·dy·x). Matches RmsNormReference.
/// </remarks>
internal sealed class RmsNormKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, ArrayView<float>, DeviceFloats, ArrayView<float>, ArrayView<float>, int, float> _forward;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, int, int> _backwardInput;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int> _backwardWeight;

    public RmsNormKernels(IlgpuBackend b)
    {
        _b = b;
        var acc = b.Accelerator;
        _forward = acc.LoadStreamKernel<ArrayView<float>, DeviceFloats, ArrayView<float>, ArrayView<float>, int, float>(RmsNormForwardKernel);
        _backwardInput = acc.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, int, int>(RmsNormBackwardInputKernel);
        _backwardWeight = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, int, int>(RmsNormBackwardWeightKernel);
    }

    /// <summary>Group = row m: rstd[m] = 1/sqrt(Σx²/C + eps); y[m, :] = x[m, :]·rstd[m]·w.</summary>
    [GpuKernel(true)]
    public static void RmsNormForwardKernel(ArrayView<float> x, DeviceFloats w, ArrayView<float> y, ArrayView<float> rstd, int c, float eps)
    {
        var scratch = SharedMemory.Allocate<float>(GroupReduce.MaxWarps);
        long row = Grid.IdxX;
        long baseIdx = row * c;
        float ss = 0;
        for (int i = Group.IdxX; i < c; i += Group.DimX)
        {
            float v = x[baseIdx + i];
            ss += v * v;
        }
        ss = GroupReduce.Sum(ss, scratch);
        float r = 1f / MathF.Sqrt(ss / c + eps);
        if (Group.IdxX == 0) rstd[row] = r;
        for (int i = Group.IdxX; i < c; i += Group.DimX) y[baseIdx + i] = x[baseIdx + i] * r * w.Load(i);
    }

    /// <summary>Group = row m: dx = rstd·w⊙dy − rstd³·x·(Σ w⊙dy⊙x)/C  (= or += by <paramref name="accumulate"/>).</summary>
    [GpuKernel(true)]
    public static void RmsNormBackwardInputKernel(ArrayView<float> dx, ArrayView<float> dy, ArrayView<float> x, DeviceFloats w, ArrayView<float> rstd, int c, int accumulate)
    {
        var scratch = SharedMemory.Allocate<float>(GroupReduce.MaxWarps);
        long row = Grid.IdxX;
        long baseIdx = row * c;
        float dot = 0;
        for (int i = Group.IdxX; i < c; i += Group.DimX) dot += w.Load(i) * dy[baseIdx + i] * x[baseIdx + i];
        dot = GroupReduce.Sum(dot, scratch);
        float r = rstd[row];
        float k = r * r * r * dot / c;
        for (int i = Group.IdxX; i < c; i += Group.DimX)
        {
            float v = r * w.Load(i) * dy[baseIdx + i] - k * x[baseIdx + i];
            if (accumulate != 0) v += dx[baseIdx + i];
            dx[baseIdx + i] = v;
        }
    }

    /// <summary>Thread = column j: dw[j] += Σ_m dy[m, j]·x[m, j]·rstd[m] (rows in order: deterministic).</summary>
    [GpuKernel(false)]
    public static void RmsNormBackwardWeightKernel(Index1D j, ArrayView<float> dw, ArrayView<float> dy, ArrayView<float> x, ArrayView<float> rstd, int m, int c)
    {
        float s = 0;
        for (int row = 0; row < m; row++)
        {
            long idx = (long)row * c + j;
            s += dy[idx] * x[idx] * rstd[row];
        }
        dw[j] += s;
    }

    public void Forward(Tensor y, Tensor rstd, Tensor x, Tensor w, int m, int c, float eps)
    {
        const string op = "RmsNormForward";
        IlgpuBackend.Positive(op, ("m", m), ("c", c));
        IlgpuBackend.Need(y, (long)m * c, "y", op);   // (M, C)
        IlgpuBackend.Need(x, (long)m * c, "x", op);   // (M, C)
        IlgpuBackend.Need(w, c, "w", op);             // (C)
        IlgpuBackend.Need(rstd, m, "rstd", op);       // (M)
        if (m == 0) return;
        _forward(new KernelConfig(m, _b.RowGroupSize), _b.F32(x, "x"), _b.Floats(w, "w"), _b.F32(y, "y"), _b.F32(rstd, "rstd"), c, eps);
    }

    public void Backward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor rstd, int m, int c, bool accumulate)
    {
        const string op = "RmsNormBackward";
        IlgpuBackend.Positive(op, ("m", m), ("c", c));
        IlgpuBackend.Need(dx, (long)m * c, "dx", op); // (M, C)
        IlgpuBackend.Need(dy, (long)m * c, "dy", op); // (M, C)
        IlgpuBackend.Need(x, (long)m * c, "x", op);   // (M, C)
        IlgpuBackend.Need(w, c, "w", op);             // (C)
        IlgpuBackend.Need(dw, c, "dw", op);           // (C)
        IlgpuBackend.Need(rstd, m, "rstd", op);       // (M)
        if (m == 0 || c == 0) return;
        var dyv = _b.F32(dy, "dy");
        var xv = _b.F32(x, "x");
        var rv = _b.F32(rstd, "rstd");
        _backwardInput(new KernelConfig(m, _b.RowGroupSize), _b.F32(dx, "dx"), dyv, xv, _b.Floats(w, "w"), rv, c, accumulate ? 1 : 0);
        _backwardWeight(c, _b.F32(dw, "dw"), dyv, xv, rv, m, c);
    }
}
