using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Reductions: Σ t² for the gradient norm, and column sums (bias gradients).</summary>
internal sealed class ReduceKernels : IDisposable
{
    /// <summary>Groups of the sum-of-squares launch; their partial sums are added on the host in double.</summary>
    private const int MaxPartials = 256;

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, DeviceFloats, long, ArrayView<double>> _sumSquares;
    private readonly MemoryBuffer1D<double, Stride1D.Dense> _partials;
    private readonly double[] _host = new double[MaxPartials];

    public ReduceKernels(IlgpuBackend b)
    {
        _b = b;
        _sumSquares = b.Accelerator.LoadStreamKernel<DeviceFloats, long, ArrayView<double>>(SumOfSquaresKernel);
        _partials = b.Accelerator.Allocate1D<double>(MaxPartials);
    }

    /// <summary>partials[group] = Σ t[i]² over the elements this group strides over, accumulated in double.</summary>
    [GpuKernel(true)]
    public static void SumOfSquaresKernel(DeviceFloats t, long n, ArrayView<double> partials)
    {
        var scratch = SharedMemory.Allocate<double>(GroupReduce.MaxWarps);
        double acc = 0;
        long stride = (long)Grid.DimX * Group.DimX;
        for (long i = Grid.GlobalIndex.X; i < n; i += stride)
        {
            double x = t.Load(i);
            acc += x * x;
        }
        acc = GroupReduce.Sum(acc, scratch);
        if (Group.IdxX == 0) partials[Grid.IdxX] = acc;
    }

    public double SumOfSquares(Tensor t)
    {
        if (t.Length == 0) return 0;
        int group = _b.RowGroupSize;
        int groups = (int)Math.Min(MaxPartials, (t.Length + group - 1) / group);
        _sumSquares(new KernelConfig(groups, group), _b.Floats(t, "t"), t.Length, _partials.View);
        _b.Stream.Synchronize();
        _partials.View.SubView(0, groups).CopyToCPU(_b.Stream, _host.AsSpan(0, groups)); // the Span overload pins _host (see IlgpuBackend.CopyIn)
        double s = 0;
        for (int g = 0; g < groups; g++) s += _host[g];
        return s;
    }

    public void Dispose() => _partials.Dispose();
}

/// <summary>dst(N) += alpha · Σ_m src(M, N)[m, :] — one thread per column, rows in order (deterministic).</summary>
internal sealed class ColumnSumKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, ArrayView<float>, int, int, ArrayView<float>> _columnSum;

    public ColumnSumKernels(IlgpuBackend b)
    {
        _b = b;
        _columnSum = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, int, int, ArrayView<float>>(ColumnSumKernel);
    }

    [GpuKernel(false)]
    public static void ColumnSumKernel(Index1D j, ArrayView<float> src, int rows, int cols, ArrayView<float> dst)
    {
        float s = 0;
        for (int i = 0; i < rows; i++) s += src[(long)i * cols + j];
        dst[j] += s;
    }

    /// <summary>dst(cols) += Σ_rows src(rows, cols).</summary>
    public void Accumulate(Tensor dst, Tensor src, int rows, int cols, string op)
    {
        IlgpuBackend.Need(dst, cols, "dBias", op);
        IlgpuBackend.Need(src, (long)rows * cols, "dy", op);
        if (cols == 0) return;
        _columnSum(cols, _b.F32(src, "dy"), rows, cols, _b.F32(dst, "dBias"));
    }
}
