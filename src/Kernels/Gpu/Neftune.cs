using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// NEFTune's noise drawn on the device where it is added to the embedding output: one thread per element, the counter
/// hash of NeftuneHash (64-bit integer ops, an exact conversion to double, one rounded product, one rounding to f32, one
/// f32 sum), so the CPU backend gives the same bits. Nothing crosses the bus but the B row lengths.
/// </summary>
internal sealed class NeftuneKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<int>, NeftuneArgs> _noise;

    public NeftuneKernels(IlgpuBackend b)
    {
        _b = b;
        _noise = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<int>, NeftuneArgs>(NeftuneNoiseKernel);
    }

    public struct NeftuneArgs
    {
        public ulong Stream;
        public float Alpha;
        public int S, C, Offset;
    }

    /// <summary>x[i] += NeftuneHash.Noise(Stream, i, α/√(L_b·C)) where i's token t of row b has Offset ≤ t &lt; Offset + L_b.</summary>
    [GpuKernel(false)]
    public static void NeftuneNoiseKernel(Index1D i, ArrayView<float> x, ArrayView<int> lengths, NeftuneArgs a)
    {
        int row = i / a.C;
        int b = row / a.S, t = row - b * a.S;
        int len = lengths[b];
        if (t < a.Offset || t >= a.Offset + len) return;
        x[i] += NeftuneHash.Noise(a.Stream, i, NeftuneHash.Magnitude(a.Alpha, len, a.C));
    }

    public void Add(Tensor x, Tensor lengths, float alpha, int batch, int seqLen, int hidden, int offset, ulong seed)
    {
        const string op = "NeftuneNoise";
        NeftuneHash.Check(x, lengths, alpha, batch, seqLen, hidden, offset, op);
        int n = IlgpuBackend.CheckedCount(x.Length, op);
        if (n == 0) return;
        _noise(n, _b.F32(x, "x"), _b.I32(lengths, "lengths"),
            new NeftuneArgs { Stream = NeftuneHash.Stream(seed), Alpha = alpha, S = seqLen, C = hidden, Offset = offset });
    }
}
