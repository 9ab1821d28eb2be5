using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Rotary position embedding, in place, one thread per channel pair.</summary>
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
    private readonly Dictionary<(float Theta, int HeadSize), MemoryBuffer1D<double, Stride1D.Dense>> _invFreq = new();

    public RopeKernels(IlgpuBackend b)
    {
        _b = b;
        _rope = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<int>, ArrayView<double>, RopeArgs>(RopeKernel);
    }

    /// <summary>Thread = (row m, head, pair i): (x_a, x_b) ← (x_a·cos − x_b·sin, x_a·sin + x_b·cos).</summary>
    [GpuKernel(false)]
    public static void RopeKernel(Index1D idx, ArrayView<float> x, ArrayView<int> positions, ArrayView<double> invFreq, RopeArgs a)
    {
        int half = a.HeadSize / 2;
        int pair = idx % half;
        int rowHead = idx / half;
        int row = rowHead / a.NHeads;
        long baseIdx = (long)rowHead * a.HeadSize;
        long ia = a.Interleaved != 0 ? baseIdx + 2 * pair : baseIdx + pair;
        long ib = a.Interleaved != 0 ? ia + 1 : ia + half;
        const double TwoPi = 2.0 * Math.PI;
        double angle = positions[row] * invFreq[pair];
        angle -= TwoPi * Math.Floor(angle / TwoPi);
        float c = MathF.Cos((float)angle);
        float s = a.Sign * MathF.Sin((float)angle);
        float x0 = x[ia], x1 = x[ib];
        x[ia] = x0 * c - x1 * s;
        x[ib] = x0 * s + x1 * c;
    }

    public void Apply(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse)
    {
        const string op = "Rope";
        IlgpuBackend.Positive(op, ("m", m), ("nHeads", nHeads), ("headSize", headSize));
        if (headSize % 2 != 0) throw new ArgumentException($"{op}: head size {headSize} must be even");
        IlgpuBackend.Need(x, (long)m * nHeads * headSize, "x", op); // (M, NH, HS)
        IlgpuBackend.Need(positions, m, "positions", op);          // (M)
        int count = IlgpuBackend.CheckedCount((long)m * nHeads * (headSize / 2), op);
        if (count == 0) return;
        if (!_invFreq.TryGetValue((theta, headSize), out var freq))
        {
            var f = new double[headSize / 2];
            for (int i = 0; i < f.Length; i++) f[i] = Math.Pow(theta, -2.0 * i / headSize);
            _invFreq[(theta, headSize)] = freq = _b.AllocateScratch<double>(f.Length);
            freq.CopyFromCPU(f);
        }
        var args = new RopeArgs { NHeads = nHeads, HeadSize = headSize, Interleaved = layout == RopeLayout.Interleaved ? 1 : 0, Sign = inverse ? -1f : 1f };
        _rope(count, _b.F32(x, "x"), _b.I32(positions, "positions"), freq.View, args);
    }

    public void Dispose()
    {
        foreach (var f in _invFreq.Values) f.Dispose();
        _invFreq.Clear();
    }
}
