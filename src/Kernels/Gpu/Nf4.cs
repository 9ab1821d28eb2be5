using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// The nn.Linear products over an NF4 weight on ILGPU: a simple dequantization kernel (one thread per element)
/// writes a block of W's rows into an f32 panel, and the tiled matmul (<see cref="MatMulKernels"/>) consumes the
/// panel. The full f32 weight never exists (the panel holds at most <see cref="PanelFloats"/> floats).
/// </summary>
/// <remarks>
/// Storage layout: <see cref="Nf4"/>. The f32 tail of the storage (group absmaxes, then the offset) is passed as one
/// float view; the 16 levels and the 256-entry dynamic map are uploaded once per backend into a 272-float table.
/// Matches Nf4Reference + MatMulReference. On CUDA sm_80+ the products instead run on the tensor-core kernel,
/// which dequantizes NF4 inside its tile loads (<see cref="Fused"/>; tested on the simulator in TensorCoreSimulatorTests).
/// </remarks>
internal sealed class Nf4Kernels : IDisposable
{
    public const int PanelFloats = 1 << 20;
    /// <summary>Tests set this (per calling thread) to force several panels at small shapes; results do not depend on it.</summary>
    [ThreadStatic] internal static int PanelFloatsOverride;

    private readonly IlgpuBackend _b;
    private readonly MatMulKernels _mm;
    private readonly Action<Index1D, ArrayView<byte>, ArrayView<float>, ArrayView<float>, Nf4Args, ArrayView<float>> _dequant;
    private readonly MemoryBuffer1D<float, Stride1D.Dense> _tables;
    private MemoryBuffer1D<float, Stride1D.Dense>? _panel;
    private MemoryBuffer1D<float, Stride1D.Dense>? _fused;

    public Nf4Kernels(IlgpuBackend b)
    {
        _b = b;
        _mm = b.Kernels(x => new MatMulKernels(x));
        _dequant = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<byte>, ArrayView<float>, ArrayView<float>, Nf4Args, ArrayView<float>>(DequantKernel);
        var tables = new float[16 + 256];
        Nf4.Levels.CopyTo(tables, 0);
        Nf4.DynamicMap.CopyTo(tables, 16);
        _tables = b.AllocateScratch<float>(tables.Length);
        _tables.CopyFromCPU(tables);
    }

    public struct Nf4Args
    {
        /// <summary>First element dequantized (flat index into the tensor).</summary>
        public long Start;
        /// <summary>Byte offset of the absmax codes.</summary>
        public long AbsmaxOffset;
        /// <summary>Number of groups: stats[0, Groups) are the group absmaxes, stats[Groups] the offset.</summary>
        public long Groups;
    }

    /// <summary>dst[i] = level[q(Start + i)] · (map[c(block)] · groupAbsmax + offset); tables = 16 levels then the 256-entry map.</summary>
    [GpuKernel(false)]
    public static void DequantKernel(Index1D i, ArrayView<byte> s, ArrayView<float> stats, ArrayView<float> tables, Nf4Args a, ArrayView<float> dst)
    {
        int ii = i;
        long e = a.Start + ii;
        int v = s[e >> 1];
        int q = (e & 1) == 0 ? v >> 4 : v & 15;
        long block = e / Nf4.BlockSize;
        int code = s[a.AbsmaxOffset + block];
        float absmax = tables[16 + code] * stats[block / Nf4.GroupSize] + stats[a.Groups];
        dst[i] = tables[q] * absmax;
    }

    private ArrayView<float> Panel(long floats)
    {
        if (_panel is null || _panel.Length < floats)
        {
            _b.WaitForDevice(); // earlier launches may still read the old panel
            _panel?.Dispose();
            _fused?.Dispose();
            _fused = null; // Fused() rebuilds it: a disposed buffer must not be handed to the next launch
            _panel = _b.AllocateScratch<float>(Math.Max(floats, 1));
        }
        return _panel.View;
    }

    /// <summary>panel(rows, K) = dequantized rows [row0, row0 + rows) of the NF4 weight w (N, K).</summary>
    private ArrayView<float> DequantRows(Tensor w, long n, int k, long row0, int rows)
    {
        var raw = _b.RawView(w, "w");
        long gOff = Nf4.GroupAbsmaxOffset(n);
        var stats = raw.SubView(gOff, raw.Length - gOff).Cast<float>();
        var panel = Panel((long)rows * k);
        int count = IlgpuBackend.CheckedCount((long)rows * k, "NF4 dequantize");
        if (count > 0) _dequant(count, raw, stats, _tables.View, new Nf4Args { Start = row0 * k, AbsmaxOffset = Nf4.AbsmaxOffset(n), Groups = Nf4.Groups(n) }, panel);
        return panel;
    }

    private static int PanelRows(int n, int k) =>
        Math.Clamp((PanelFloatsOverride > 0 ? PanelFloatsOverride : PanelFloats) / Math.Max(k, 1), 1, Math.Max(1, n));

    private static void CheckWeight(Tensor w, long needed, string op)
    {
        if (w.DType != DType.NF4) throw new ArgumentException($"{op}: w ({w.Describe()}) must be nf4");
        if (w.Length != needed) throw new ArgumentException($"{op}: w ({w.Describe()}) has {w.Length} elements, expected {needed}");
    }

    /// <summary>
    /// W as the tensor-core matmul reads NF4 (<see cref="DeviceFloats.KindNF4"/>): its bytes, and a float table of the
    /// 16 levels, the dynamic map and a copy of W's group absmaxes and offset (copied on the stream, device to device).
    /// </summary>
    internal DeviceFloats Fused(Tensor w)
    {
        long n = w.Length;
        var raw = _b.RawView(w, "w");
        long gOff = Nf4.GroupAbsmaxOffset(n);
        var stats = raw.SubView(gOff, raw.Length - gOff).Cast<float>(); // groups + offset
        long need = DeviceFloats.Nf4TableFloats + stats.Length;
        if (_fused is null || _fused.Length < need)
        {
            _b.WaitForDevice(); // earlier launches may still read the old table
            _fused?.Dispose();
            _fused = _b.AllocateScratch<float>(need);
            _tables.View.CopyTo(_b.Stream, _fused.View.SubView(0, DeviceFloats.Nf4TableFloats));
        }
        ((ArrayView1D<float, Stride1D.Dense>)stats).CopyTo(_b.Stream, _fused.View.SubView(DeviceFloats.Nf4TableFloats, stats.Length));
        return new DeviceFloats(_fused.View, raw.Cast<ushort>(), DeviceFloats.KindNF4);
    }

    /// <summary>y(M,N) (+)= alpha·x(M,K)·Wᵀ [+ bias] for an NF4 W(N,K).</summary>
    public void Forward(Tensor w, ArrayView<float> x, ArrayView<float> y, Tensor? bias, int m, int n, int k, float alpha, bool accumulate, string op)
    {
        CheckWeight(w, (long)n * k, op);
        if (m == 0 || n == 0) return;
        if (_b.TensorCores)
        {
            // CUDA: dequantized inside the tensor-core kernel's tile loads, no panel
            var p = MatMulTensorCoreKernels.From(MatMulKernels.Nt(m, n, k, alpha, accumulate));
            p.HasBias = bias is null ? 0 : 1;
            TensorCore.Launch(false, new DeviceFloats(x, ArrayView<ushort>.Empty, DeviceFloats.KindF32), Fused(w), y,
                bias is null ? MatMulKernels.None : _b.Floats(bias, "bias"), ArrayView<float>.Empty, MatMulKernels.None, p);
            return;
        }
        var biasView = bias is null ? ArrayView<float>.Empty : _b.F32(bias, "bias");
        int rows = PanelRows(n, k);
        for (int j0 = 0; j0 < n; j0 += rows)
        {
            int nb = Math.Min(rows, n - j0);
            var panel = DequantRows(w, (long)n * k, k, j0, nb);
            var p = MatMulKernels.Nt(m, nb, k, alpha, accumulate);
            p.Ldo = n;
            p.HasBias = bias is null ? 0 : 1;
            var biasPart = bias is null ? MatMulKernels.None : new DeviceFloats(biasView.SubView(j0, nb), ArrayView<ushort>.Empty, DeviceFloats.KindF32);
            _mm.Launch(x, new DeviceFloats(panel, ArrayView<ushort>.Empty, DeviceFloats.KindF32), y.SubView(j0, y.Length - j0), biasPart, p);
        }
    }

    /// <summary>dx(M,K) (+)= dy(M,N)·W for an NF4 W(N,K), summed over row panels.</summary>
    public void BackwardInput(Tensor w, ArrayView<float> dy, ArrayView<float> dx, int m, int n, int k, bool accumulate, string op)
    {
        CheckWeight(w, (long)n * k, op);
        if (m == 0 || k == 0) return;
        if (n == 0)
        {
            if (!accumulate) dx.SubView(0, (long)m * k).MemSetToZero(_b.Stream);
            return;
        }
        if (_b.TensorCores)
        {
            TensorCore.Launch(false, new DeviceFloats(dy, ArrayView<ushort>.Empty, DeviceFloats.KindF32), Fused(w), dx, MatMulKernels.None,
                ArrayView<float>.Empty, MatMulKernels.None, MatMulTensorCoreKernels.From(MatMulKernels.Nn(m, k, n, 1f, accumulate)));
            return;
        }
        int rows = PanelRows(n, k);
        for (int j0 = 0; j0 < n; j0 += rows)
        {
            int nb = Math.Min(rows, n - j0);
            var panel = DequantRows(w, (long)n * k, k, j0, nb);
            var p = MatMulKernels.Nn(m, k, nb, 1f, accumulate || j0 > 0);
            p.Sai = n; // A(i, r) = dy[i·N + j0 + r]
            _mm.Launch(dy.SubView(j0, dy.Length - j0), new DeviceFloats(panel, ArrayView<ushort>.Empty, DeviceFloats.KindF32), dx, MatMulKernels.None, p);
        }
    }

    /// <summary>Dequantized rows of an NF4 weight as an f32 panel view (valid until the next call), for the DoRA norm.</summary>
    public ArrayView<float> Rows(Tensor w, int n, int k, int row0, int rows) => DequantRows(w, (long)n * k, k, row0, rows);

    public static int RowsPerPanel(int n, int k) => PanelRows(n, k);

    private MatMulTensorCoreKernels TensorCore => _b.Kernels(x => new MatMulTensorCoreKernels(x));

    public void Dispose()
    {
        _panel?.Dispose();
        _panel = null;
        _tables.Dispose();
    }
}
