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
        _partials = b.AllocateScratch<double>(MaxPartials);
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
        _b.WaitForDevice();
        _partials.View.SubView(0, groups).CopyToCPU(_b.Stream, _host.AsSpan(0, groups)); // the Span overload pins _host (see IlgpuBackend.CopyIn)
        double s = 0;
        for (int g = 0; g < groups; g++) s += _host[g];
        return s;
    }

    // ---------------------------------------------------------------- global gradient norm over many tensors

    private Action<KernelConfig, MultiTensorBases, ArrayView<MultiTensorEntry>, ArrayView<MultiTensorChunk>, ArrayView<double>>? _normPartials;
    private Action<Index1D, ArrayView<double>, int, float, ArrayView<float>>? _normFinish;
    private Tensor[] _normOf = Array.Empty<Tensor>();
    private MultiTensorTable? _normTable;
    private MemoryBuffer1D<double, Stride1D.Dense>? _normPartialsBuffer;

    /// <summary>Launches of the partial-sum kernel in the last <see cref="GradNormClip"/> (1 while the grads span at most MultiTensorBases.Count pool chunks).</summary>
    public int LastNormLaunches { get; private set; }

    /// <summary>
    /// partials[Grid.IdxX] = Σ g² (double) over the work chunks this group takes (g, g + grid, ...) of every tensor of
    /// the table; one launch covers every gradient of the table, whichever of its base chunks it lives in.
    /// </summary>
    [GpuKernel(true)]
    public static void SumOfSquaresMultiTensorKernel(MultiTensorBases x, ArrayView<MultiTensorEntry> entries, ArrayView<MultiTensorChunk> chunks,
        ArrayView<double> partials)
    {
        var scratch = SharedMemory.Allocate<double>(GroupReduce.MaxWarps);
        double acc = 0;
        for (int c = Grid.IdxX; c < chunks.IntLength; c += Grid.DimX)
        {
            var w = chunks[c];
            var e = entries[w.Entry];
            var g = x.Get(e.GSlot).Cast<float>().SubView(e.G + w.Start);
            for (int j = Group.IdxX; j < w.Count; j += Group.DimX)
            {
                double v = g[j];
                acc += v * v;
            }
        }
        acc = GroupReduce.Sum(acc, scratch);
        if (Group.IdxX == 0) partials[Grid.IdxX] = acc;
    }

    /// <summary>
    /// The finish (one thread): the partials added in order (deterministic), clip[0] = ‖g‖, clip[1] = the clipping
    /// scale maxNorm / (‖g‖ + 1e-6) when 0 &lt; maxNorm &lt; ‖g‖, else 1; NaN when ‖g‖ is not finite. Same formula as
    /// MultiTensorHost.ClipScale, in double.
    /// </summary>
    [GpuKernel(false)]
    public static void GradNormFinishKernel(Index1D i, ArrayView<double> partials, int count, float maxNorm, ArrayView<float> clip)
    {
        double sq = 0;
        for (int k = 0; k < count; k++) sq += partials[k];
        double norm = Math.Sqrt(sq);
        double scale = !(norm - norm == 0) ? double.NaN : maxNorm > 0 && norm > maxNorm ? maxNorm / (norm + 1e-6) : 1.0;
        clip[0] = (float)norm;
        clip[1] = (float)scale;
    }

    public void GradNormClip(IReadOnlyList<Tensor> grads, Tensor clip, float maxNorm)
    {
        const string op = "GradNormClip";
        IlgpuBackend.Need(clip, 2, "clip", op);
        var clipView = _b.F32(clip, "clip");
        _normPartials ??= _b.Accelerator.LoadStreamKernel<MultiTensorBases, ArrayView<MultiTensorEntry>, ArrayView<MultiTensorChunk>, ArrayView<double>>(SumOfSquaresMultiTensorKernel);
        _normFinish ??= _b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<double>, int, float, ArrayView<float>>(GradNormFinishKernel);
        if (!SameGrads(grads))
        {
            for (int i = 0; i < grads.Count; i++) _b.F32(grads[i], $"grads[{i}]");
            _normTable?.Dispose();
            _normTable = null;
            _normPartialsBuffer?.Dispose();
            _normPartialsBuffer = null;
            var list = grads.ToArray();
            // The gradient is operand role 1 (G) of the table.
            _normTable = MultiTensorTable.Build(_b, list.Length, i => new Tensor?[] { null, list[i] }, _ => 0f, op);
            _normPartialsBuffer = _b.AllocateScratch<double>(Math.Max(1, _normTable.Launches.Count * MaxPartials));
            _normOf = list;
        }
        int group = _b.RowGroupSize;
        int count = 0;
        LastNormLaunches = 0;
        foreach (var l in _normTable!.Launches)
        {
            int groups = Math.Min(MaxPartials, MultiTensorTable.Groups(_b, l.ChunkCount));
            _normPartials(new KernelConfig(groups, group), l.Views(), l.Entries.View, l.Chunks.View,
                _normPartialsBuffer!.View.SubView(count, groups));
            count += groups;
            LastNormLaunches++;
        }
        _normFinish(1, _normPartialsBuffer!.View, count, maxNorm, clipView);
    }

    private bool SameGrads(IReadOnlyList<Tensor> grads)
    {
        if (_normTable is null || grads.Count != _normOf.Length) return false;
        for (int i = 0; i < _normOf.Length; i++)
            if (!ReferenceEquals(grads[i], _normOf[i])) return false;
        return true;
    }

    public void Dispose()
    {
        _partials.Dispose();
        _normTable?.Dispose();
        _normPartialsBuffer?.Dispose();
    }
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
