using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Token embedding lookup and its scatter-add backward (atomic adds: repeated tokens collide).</summary>
/// <remarks>
/// Token ids are checked on the host before a launch (a bad id names its position), because a kernel cannot
/// throw and an out-of-range id would read or write outside the table: against what the host uploaded into the
/// tensor (no device round trip), or by reading them back when something else wrote it. Matches EmbeddingReference.
/// </remarks>
internal sealed class EmbeddingKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<int>, DeviceFloats, int> _forward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, int> _backward;

    public EmbeddingKernels(IlgpuBackend b)
    {
        _b = b;
        _forward = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<int>, DeviceFloats, int>(EmbeddingForwardKernel);
        _backward = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<int>, int>(EmbeddingBackwardKernel);
    }

    /// <summary>Thread = (m, c): out[m, c] = table[tokens[m], c].</summary>
    [GpuKernel(false)]
    public static void EmbeddingForwardKernel(Index1D idx, ArrayView<float> output, ArrayView<int> tokens, DeviceFloats table, int c)
    {
        int row = idx / c, col = idx % c;
        output[idx] = table.Load((long)tokens[row] * c + col);
    }

    /// <summary>Thread = (m, c): dTable[tokens[m], c] += dOut[m, c] (atomic).</summary>
    [GpuKernel(false)]
    public static void EmbeddingBackwardKernel(Index1D idx, ArrayView<float> dTable, ArrayView<float> dOut, ArrayView<int> tokens, int c)
    {
        int row = idx / c, col = idx % c;
        Atomic.Add(ref dTable[(long)tokens[row] * c + col], dOut[idx]);
    }

    private void CheckTokens(Tensor tokens, int m, long vocab, string op)
    {
        IlgpuBackend.Need(tokens, m, "tokens", op);
        if (_b.FindBadId(tokens, "tokens", vocab, ignore: null) is (int i, int id))
            throw new ArgumentOutOfRangeException(nameof(tokens), $"{op}: token id {id} at position {i} is outside the vocabulary [0, {vocab})");
    }

    private static long Vocab(Tensor table, int c, string name, string op)
    {
        if (c <= 0 || table.Length % c != 0)
            throw new ArgumentException($"{op}: {name} ({table.Describe()}) is not a (V, {c}) table");
        return table.Length / c;
    }

    public void Forward(Tensor output, Tensor tokens, Tensor table, int m, int c)
    {
        const string op = "EmbeddingForward";
        IlgpuBackend.Positive(op, ("m", m), ("c", c));
        IlgpuBackend.Need(output, (long)m * c, "output", op); // (M, C)
        if (m == 0) return;
        long vocab = Vocab(table, c, "table", op);           // (V, C)
        CheckTokens(tokens, m, vocab, op);
        int n = IlgpuBackend.CheckedCount((long)m * c, op);
        _forward(n, _b.F32(output, "output"), _b.I32(tokens, "tokens"), _b.Floats(table, "table"), c);
    }

    public void Backward(Tensor dTable, Tensor dOut, Tensor tokens, int m, int c)
    {
        const string op = "EmbeddingBackward";
        IlgpuBackend.Positive(op, ("m", m), ("c", c));
        IlgpuBackend.Need(dOut, (long)m * c, "dOut", op); // (M, C)
        if (m == 0) return;
        long vocab = Vocab(dTable, c, "dTable", op);     // (V, C)
        CheckTokens(tokens, m, vocab, op);
        int n = IlgpuBackend.CheckedCount((long)m * c, op);
        _backward(n, _b.F32(dTable, "dTable"), _b.F32(dOut, "dOut"), _b.I32(tokens, "tokens"), c);
    }
}
