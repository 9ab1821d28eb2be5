using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Elementwise kernels: fill, dtype-converting copy, and the generic maps over <see cref="IBinaryOp"/> structs
/// (the same op structs the CPU loops use). One thread per element.
/// </summary>
internal sealed class ElementwiseKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, DeviceFloats, float> _fill;
    private readonly Action<Index1D, ArrayView<int>, int> _fillInt;
    private readonly Action<Index1D, DeviceFloats, DeviceFloats> _convert;
    private readonly Action<Index1D, DeviceFloats, DeviceFloats, DeviceFloats> _add;
    private readonly Action<Index1D, DeviceFloats, float> _scale;

    public ElementwiseKernels(IlgpuBackend b)
    {
        _b = b;
        var acc = b.Accelerator;
        _fill = acc.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, float>(FillKernel);
        _fillInt = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<int>, int>(FillIntKernel);
        _convert = acc.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, DeviceFloats>(ConvertKernel);
        _add = acc.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, DeviceFloats, DeviceFloats>(BinaryKernel<AddOp>);
        _scale = acc.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, float>(ScalarKernel<MulOp>);
    }

    /// <summary>t[i] = value.</summary>
    [GpuKernel(false)]
    public static void FillKernel(Index1D i, DeviceFloats t, float value) => t.Store(i, value);

    [GpuKernel(false)]
    public static void FillIntKernel(Index1D i, ArrayView<int> t, int value) => t[i] = value;

    /// <summary>dst[i] = src[i], converting between float dtypes (round to nearest even).</summary>
    [GpuKernel(false)]
    public static void ConvertKernel(Index1D i, DeviceFloats dst, DeviceFloats src) => dst.Store(i, src.Load(i));

    /// <summary>dst[i] = Op(a[i], b[i]).</summary>
    [GpuKernel(false, typeof(AddOp), typeof(SwiGluOp))]
    public static void BinaryKernel<TOp>(Index1D i, DeviceFloats dst, DeviceFloats a, DeviceFloats b) where TOp : struct, IBinaryOp
        => dst.Store(i, TOp.Apply(a.Load(i), b.Load(i)));

    /// <summary>t[i] = Op(t[i], s).</summary>
    [GpuKernel(false, typeof(MulOp))]
    public static void ScalarKernel<TOp>(Index1D i, DeviceFloats t, float s) where TOp : struct, IBinaryOp
        => t.Store(i, TOp.Apply(t.Load(i), s));

    public void Fill(Tensor t, float value)
    {
        int n = IlgpuBackend.CheckedCount(t.Length, "Fill");
        if (n == 0) return;
        if (t.DType == DType.I32) _fillInt(n, _b.I32(t, "t"), (int)value);
        else _fill(n, _b.Floats(t, "t"), value);
    }

    public void Copy(Tensor dst, Tensor src)
    {
        IlgpuBackend.Need(dst, src.Length, "dst", "Copy");
        int n = IlgpuBackend.CheckedCount(src.Length, "Copy");
        if (n == 0) return;
        if (dst.DType == src.DType)
        {
            _b.RawView(src, "src").CopyTo(_b.Stream, _b.RawView(dst, "dst"));
            return;
        }
        if (dst.DType == DType.I32 || src.DType == DType.I32)
            throw new ArgumentException($"Copy: cannot convert between {src.Describe()} and {dst.Describe()}");
        _convert(n, _b.Floats(dst, "dst"), _b.Floats(src, "src"));
    }

    public void Add(Tensor dst, Tensor a, Tensor b)
    {
        IlgpuBackend.Need(a, dst.Length, "a", "Add");
        IlgpuBackend.Need(b, dst.Length, "b", "Add");
        int n = IlgpuBackend.CheckedCount(dst.Length, "Add");
        if (n == 0) return;
        _add(n, _b.Floats(dst, "dst"), _b.Floats(a, "a"), _b.Floats(b, "b"));
    }

    public void Scale(Tensor t, float s)
    {
        int n = IlgpuBackend.CheckedCount(t.Length, "Scale");
        if (n == 0) return;
        _scale(n, _b.Floats(t, "t"), s);
    }
}
