namespace FineTuneNative.Kernels;

/// <summary>
/// NEFTune's noise (Jain et al. 2023) as a pure function of (seed, element index), so every backend, thread count and
/// chunking draws the same values and a resumed run draws the noise it would have drawn: element i of the embedding
/// output gets (float)((2u − 1)·α/√(L·C)), u = the top 53 bits of splitmix64(s0 + (i + 1)·φ) as a double in [0, 1),
/// s0 = splitmix64(seed ^ "NEFTUNE") (a stream independent of the dropout masks), L the row's real tokens, C the hidden
/// size. Every step is exact in double but the product by the magnitude (one rounding) and the conversion to f32 (one
/// rounding), so any IEEE backend gives the same bits. Usable inside ILGPU kernels.
/// </summary>
public static class NeftuneHash
{
    private const ulong Phi = 0x9E3779B97F4A7C15UL;

    /// <summary>One splitmix64 step: x + φ, then the finaliser.</summary>
    public static ulong Mix64(ulong x)
    {
        ulong z = x + Phi;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>The stream of a step's seed ("NEFTUNE" in ASCII mixed in).</summary>
    public static ulong Stream(ulong seed) => Mix64(seed ^ 0x4E454654554E45UL);

    /// <summary>α/√(L·C) in double: the half-width of the uniform noise of a row of <paramref name="length"/> real tokens.</summary>
    public static double Magnitude(float alpha, int length, int hidden) => alpha / Math.Sqrt((double)length * hidden);

    /// <summary>The noise of element <paramref name="index"/>: (2u − 1)·mag rounded to f32, in [−mag, mag].</summary>
    public static float Noise(ulong stream, long index, double mag)
    {
        double u = (Mix64(stream + (ulong)(index + 1) * Phi) >> 11) * (1.0 / (1UL << 53));
        return (float)((2 * u - 1) * mag);
    }

    /// <summary>The argument checks of every backend's NeftuneNoise.</summary>
    public static void Check(Tensor x, Tensor lengths, float alpha, int batch, int seqLen, int hidden, int offset, string op)
    {
        if (batch < 0 || seqLen < 0 || hidden < 0 || offset < 0 || offset > seqLen)
            throw new ArgumentOutOfRangeException(nameof(batch), $"{op}: batch {batch}, seqLen {seqLen}, hidden {hidden}, offset {offset} (0 <= offset <= seqLen)");
        if (!(alpha >= 0 && float.IsFinite(alpha))) throw new ArgumentOutOfRangeException(nameof(alpha), $"{op}: alpha must be finite and >= 0, got {alpha}");
        if (x.DType != DType.F32 || x.Length != (long)batch * seqLen * hidden)
            throw new ArgumentException($"{op}: x ({x.Describe()}) must be f32 with batch·seqLen·hidden = {(long)batch * seqLen * hidden} elements");
        if (lengths.DType != DType.I32 || lengths.Length != batch)
            throw new ArgumentException($"{op}: lengths ({lengths.Describe()}) must be i32 with batch = {batch} elements");
    }

    /// <summary>Throws unless every length is in [0, seqLen − offset].</summary>
    public static void CheckLengths(ReadOnlySpan<int> lengths, int seqLen, int offset, string op)
    {
        for (int b = 0; b < lengths.Length; b++)
            if (lengths[b] < 0 || lengths[b] > seqLen - offset)
                throw new ArgumentException($"{op}: lengths[{b}] = {lengths[b]} is outside [0, {seqLen - offset}] (the row's tokens after {offset} virtual ones)");
    }

    /// <summary>The host form of IBackend.NeftuneNoise (Download, add, Upload): the default, and the definition.</summary>
    public static void AddHost(IBackend be, Tensor x, Tensor lengths, float alpha, int batch, int seqLen, int hidden, int offset, ulong seed)
    {
        const string op = "NeftuneNoise";
        Check(x, lengths, alpha, batch, seqLen, hidden, offset, op);
        var len = new int[batch];
        be.Download(lengths, len);
        CheckLengths(len, seqLen, offset, op);
        var xh = x.ToArray();
        ulong s0 = Stream(seed);
        for (int b = 0; b < batch; b++)
        {
            if (len[b] == 0) continue;
            double mag = Magnitude(alpha, len[b], hidden);
            for (int t = offset; t < offset + len[b]; t++)
                for (int c = 0; c < hidden; c++)
                {
                    long i = ((long)b * seqLen + t) * hidden + c;
                    xh[i] += Noise(s0, i, mag);
                }
        }
        be.Upload(x, xh);
    }
}
