using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

// NEFTune's noise on the embedding output, drawn where it is added (no host buffer); definition: NeftuneHash.
public sealed unsafe partial class CpuBackend
{
    /// <summary>
    /// x(B, S, C) += NEFTune noise over each row's real tokens (see IBackend.NeftuneNoise), one (b, t) row per task:
    /// sixteen hashes at a time in Vector512&lt;ulong&gt;, converted to double exactly, scaled, rounded to f32 and added.
    /// </summary>
    public void NeftuneNoise(Tensor x, Tensor lengths, float alpha, int batch, int seqLen, int hidden, int offset, ulong seed)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "NeftuneNoise";
        NeftuneHash.Check(x, lengths, alpha, batch, seqLen, hidden, offset, op);
        var ctx = new NeftuneCtx
        {
            X = F32(x, (long)batch * seqLen * hidden, nameof(x), op), Lengths = I32(lengths, batch, nameof(lengths), op),
            Alpha = alpha, S = seqLen, C = hidden, Offset = offset, Stream = NeftuneHash.Stream(seed),
        };
        NeftuneHash.CheckLengths(new ReadOnlySpan<int>(ctx.Lengths, batch), seqLen, offset, op);
        _pool.For(batch * seqLen, &NeftuneRowBody, &ctx);
    }

    private struct NeftuneCtx { public float* X; public int* Lengths; public float Alpha; public int S, C, Offset; public ulong Stream; }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)] // Vector512 code: never run at tier 0 (about 20x slower)
    private static void NeftuneRowBody(void* p, int row, int worker)
    {
        var c = (NeftuneCtx*)p;
        int b = row / c->S, t = row % c->S, len = c->Lengths[b];
        if (t < c->Offset || t >= c->Offset + len) return;
        double mag = NeftuneHash.Magnitude(c->Alpha, len, c->C);
        long first = (long)row * c->C;
        float* x = c->X + first;
        const ulong Phi = 0x9E3779B97F4A7C15UL, Phi8 = unchecked(8 * Phi);
        var lanes = Vector512.Create(0UL, 1, 2, 3, 4, 5, 6, 7) * Phi;
        var magV = Vector512.Create(mag);
        var unit = Vector512.Create(1.0 / (1UL << 53));
        int j = 0;
        for (; j + 16 <= c->C; j += 16)
        {
            // Mix64(s0 + (i+1)·φ) for i = first + j .. + 15
            var z0 = Vector512.Create(c->Stream + (ulong)(first + j + 1) * Phi) + lanes;
            var z1 = z0 + Vector512.Create(Phi8);
            var lo = (Vector512.ConvertToDouble(Vector512.ShiftRightLogical(Mix64(z0), 11)) * unit * 2.0 - Vector512<double>.One) * magV;
            var hi = (Vector512.ConvertToDouble(Vector512.ShiftRightLogical(Mix64(z1), 11)) * unit * 2.0 - Vector512<double>.One) * magV;
            (Vector512.Load(x + j) + Vector512.Narrow(lo, hi)).Store(x + j);
        }
        for (; j < c->C; j++) x[j] += NeftuneHash.Noise(c->Stream, first + j, mag);
    }

    /// <summary>NeftuneHash.Mix64 (φ added, then the splitmix64 finaliser), eight lanes at once.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<ulong> Mix64(Vector512<ulong> x)
    {
        var z = x + Vector512.Create(0x9E3779B97F4A7C15UL);
        z = (z ^ Vector512.ShiftRightLogical(z, 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ Vector512.ShiftRightLogical(z, 27)) * 0x94D049BB133111EBUL;
        return z ^ Vector512.ShiftRightLogical(z, 31);
    }
}
