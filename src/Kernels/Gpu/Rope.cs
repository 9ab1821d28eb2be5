using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Rotary position embedding, in place or into another tensor (any float dtype), one thread per channel pair.</summary>
/// <remarks>
/// Pair i of a head rotates by pos·θ^(-2i/HS). The inverse frequencies are computed once on the host in double
/// and cached per (θ, HS); the angle is formed and reduced modulo 2π in double, so large positions lose no
/// precision before the f32 sin/cos. Matches RopeReference for both layouts; inverse = the backward.
/// </remarks>
internal sealed class RopeKernels : IDisposable
{
    public struct RopeArgs
    {
        public int NHeads, HeadSize, Interleaved;
        /// <summary>+1 forward, -1 inverse (backward).</summary>
        public float Sign;
    }

    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<int>, ArrayView<double>, RopeArgs> _rope;
    private readonly Action<Index1D, DeviceFloats, ArrayView<float>, ArrayView<int>, ArrayView<double>, RopeArgs> _ropeInto;
    private readonly Dictionary<(float Theta, int HeadSize), MemoryBuffer1D<double, Stride1D.Dense>> _invFreq = new();

    public RopeKernels(IlgpuBackend b)
    {
        _b = b;
        _rope = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<int>, ArrayView<double>, RopeArgs>(RopeKernel);
        _ropeInto = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, ArrayView<float>, ArrayView<int>, ArrayView<double>, RopeArgs>(RopeIntoKernel);
    }

    /// <summary>Thread = (row m, head, pair i): (x_a, x_b) ← (x_a·cos − x_b·sin, x_a·sin + x_b·cos).</summary>
    [GpuKernel(false)]
    public static void RopeKernel(Index1D idx, ArrayView<float> x, ArrayView<int> positions, ArrayView<double> invFreq, RopeArgs a)
    {
        Pair(idx, positions, invFreq, a, out long ia, out long ib, out float c, out float s);
        float x0 = x[ia], x1 = x[ib];
        x[ia] = x0 * c - x1 * s;
        x[ib] = x0 * s + x1 * c;
    }

    /// <summary>
    /// As <see cref="RopeKernel"/> (forward), but the rotated pair goes to dst in its dtype (rounded to nearest even
    /// as the converting Copy rounds) and x is only read: bf16 attention's q and k in one pass.
    /// </summary>
    [GpuKernel(false)]
    public static void RopeIntoKernel(Index1D idx, DeviceFloats dst, ArrayView<float> x, ArrayView<int> positions, ArrayView<double> invFreq, RopeArgs a)
    {
        Pair(idx, positions, invFreq, a, out long ia, out long ib, out float c, out float s);
        float x0 = x[ia], x1 = x[ib];
        dst.Store(ia, x0 * c - x1 * s);
        dst.Store(ib, x0 * s + x1 * c);
    }

    /// <summary>Thread idx's two elements (ia, ib) and its rotation (cos, sign·sin).</summary>
    private static void Pair(int idx, ArrayView<int> positions, ArrayView<double> invFreq, RopeArgs a, out long ia, out long ib, out float c, out float s)
    {
        int half = a.HeadSize / 2;
        int pair = idx % half;
        int rowHead = idx / half;
        int row = rowHead / a.NHeads;
        long baseIdx = (long)rowHead * a.HeadSize;
        ia = a.Interleaved != 0 ? baseIdx + 2 * pair : baseIdx + pair;
        ib = a.Interleaved != 0 ? ia + 1 : ia + half;
        const double TwoPi = 2.0 * Math.PI;
        double angle = positions[row] * invFreq[pair];
        angle -= TwoPi * Math.Floor(angle / TwoPi);
        c = MathF.Cos((float)angle);
        s = a.Sign * MathF.Sin((float)angle);
    }

    public void Apply(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse)
    {
        var (count, freq, args) = Prepare("Rope", x, positions, m, nHeads, headSize, theta, layout, inverse);
        if (count == 0) return;
        _rope(count, _b.F32(x, "x"), _b.I32(positions, "positions"), freq, args);
    }

    /// <summary>dst(M, NH, HS) f32/bf16/f16 = RoPE(x(M, NH, HS) f32), forward; x is read only.</summary>
    public void ApplyInto(Tensor dst, Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout)
    {
        var (count, freq, args) = Prepare("RopeInto", x, positions, m, nHeads, headSize, theta, layout, inverse: false);
        IlgpuBackend.Need(dst, (long)m * nHeads * headSize, "dst", "RopeInto"); // (M, NH, HS)
        var d = _b.Floats(dst, "dst");
        if (count == 0) return;
        _ropeInto(count, d, _b.F32(x, "x"), _b.I32(positions, "positions"), freq, args);
    }

    private (int Count, ArrayView<double> InvFreq, RopeArgs Args) Prepare(string op, Tensor x, Tensor positions, int m, int nHeads, int headSize,
        float theta, RopeLayout layout, bool inverse)
    {
        IlgpuBackend.Positive(op, ("m", m), ("nHeads", nHeads), ("headSize", headSize));
        if (headSize % 2 != 0) throw new ArgumentException($"{op}: head size {headSize} must be even");
        IlgpuBackend.Need(x, (long)m * nHeads * headSize, "x", op); // (M, NH, HS)
        IlgpuBackend.Need(positions, m, "positions", op);          // (M)
        int count = IlgpuBackend.CheckedCount((long)m * nHeads * (headSize / 2), op);
        if (!_invFreq.TryGetValue((theta, headSize), out var freq))
        {
            var f = new double[headSize / 2];
            for (int i = 0; i < f.Length; i++) f[i] = Math.Pow(theta, -2.0 * i / headSize);
            _invFreq[(theta, headSize)] = freq = _b.AllocateScratch<double>(f.Length);
            freq.CopyFromCPU(f);
        }
        var args = new RopeArgs { NHeads = nHeads, HeadSize = headSize, Interleaved = layout == RopeLayout.Interleaved ? 1 : 0, Sign = inverse ? -1f : 1f };
        return (count, freq.View, args);
    }

    public void Dispose()
    {
        foreach (var f in _invFreq.Values) f.Dispose();
        _invFreq.Clear();
    }
}
