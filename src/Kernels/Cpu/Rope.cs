using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

// Rotary position embedding; reference: RopeReference.
public sealed unsafe partial class CpuBackend
{
    private struct RopeCtx
    {
        public float* X;
        /// <summary>null: rotate X in place; else the rotated rows go here in <see cref="DstType"/> and X is only read.</summary>
        public byte* Dst;
        public DType DstType;
        public int* Pos;
        /// <summary>θ^(-2i/HS) for the HS/2 pairs, formed once per call on the caller's stack.</summary>
        public double* InvFreq;
        public int NH, HS;
        public bool Interleaved, Inverse;
    }

    /// <summary>
    /// Rotates x(M, NH, HS) in place: pair i turns by pos(m)·θ^(-2i/HS) (negated when inverse, the backward).
    /// Angles are formed in double so long positions keep their precision.
    /// </summary>
    public void Rope(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "Rope";
        Dims(op, (nameof(m), m), (nameof(nHeads), nHeads), (nameof(headSize), headSize));
        if (headSize % 2 != 0) throw new ArgumentException($"{op}: head size {headSize} must be even");
        var ctx = new RopeCtx
        {
            X = F32(x, (long)m * nHeads * headSize, nameof(x), op), Pos = I32(positions, m, nameof(positions), op),
            NH = nHeads, HS = headSize, Interleaved = layout == RopeLayout.Interleaved, Inverse = inverse,
        };
        double* invFreq = stackalloc double[headSize / 2];
        ctx.InvFreq = InverseFrequencies(invFreq, theta, headSize);
        _pool.For(m, &RopeRow, &ctx);
    }

    /// <summary>
    /// dst(M, NH, HS) = the forward rotation of x(M, NH, HS) f32 in dst's dtype (f32/bf16/f16, round to nearest even);
    /// x is read only. Each head is rotated as <see cref="Rope"/> does (same f32 products) into a stack row and
    /// converted by the routine <see cref="Copy"/> uses, so dst equals Rope + Copy bit for bit in one pass.
    /// </summary>
    public void RopeInto(Tensor dst, Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "RopeInto";
        Dims(op, (nameof(m), m), (nameof(nHeads), nHeads), (nameof(headSize), headSize));
        if (headSize % 2 != 0) throw new ArgumentException($"{op}: head size {headSize} must be even");
        long n = (long)m * nHeads * headSize;
        byte* d = Ptr(dst, nameof(dst));
        if (dst.DType is not (DType.F32 or DType.BF16 or DType.F16)) throw new ArgumentException($"{op}: dst {dst.Describe()} must be f32, bf16 or f16", nameof(dst));
        CheckLength(dst, n, nameof(dst), op);
        var ctx = new RopeCtx
        {
            X = F32(x, n, nameof(x), op), Dst = d, DstType = dst.DType, Pos = I32(positions, m, nameof(positions), op),
            NH = nHeads, HS = headSize, Interleaved = layout == RopeLayout.Interleaved, Inverse = false,
        };
        double* invFreq = stackalloc double[headSize / 2];
        ctx.InvFreq = InverseFrequencies(invFreq, theta, headSize);
        _pool.For(m, &RopeRow, &ctx);
    }

    /// <summary>f[i] = θ^(-2i/HS): the same Math.Pow the rows formed each for themselves before (same bits, once per call).</summary>
    private static double* InverseFrequencies(double* f, double theta, int hs)
    {
        for (int i = 0; i < hs / 2; i++) f[i] = Math.Pow(theta, -2.0 * i / hs);
        return f;
    }

    private static void RopeRow(void* p, int t, int worker)
    {
        var r = (RopeCtx*)p;
        int hs = r->HS, half = hs / 2;
        float* cs = stackalloc float[half];
        float* sn = stackalloc float[half];
        double pos = r->Pos[t];
        for (int i = 0; i < half; i++)
        {
            double angle = pos * r->InvFreq[i];
            (double s, double c) = Math.SinCos(angle);
            cs[i] = (float)c;
            sn[i] = r->Inverse ? (float)-s : (float)s;
        }
        long rowStart = (long)t * r->NH * hs;
        float* row = r->X + rowStart;
        float* buf = stackalloc float[hs];
        float* y = r->Dst == null ? null : buf;
        for (int h = 0; h < r->NH; h++)
        {
            float* x = row + h * hs;
            float* o = y == null ? x : y; // in place, or one head's rotation on the stack
            if (r->Interleaved)
            {
                for (int i = 0; i < half; i++)
                {
                    float a = x[2 * i], b = x[2 * i + 1];
                    o[2 * i] = a * cs[i] - b * sn[i];
                    o[2 * i + 1] = a * sn[i] + b * cs[i];
                }
            }
            else
            {
                int i = 0;
                if (Vector512.IsHardwareAccelerated) // per lane the scalar products and sums (no FMA): the same bits
                    for (; i + 16 <= half; i += 16)
                    {
                        var a = Vector512.Load(x + i);
                        var b = Vector512.Load(x + i + half);
                        var c = Vector512.Load(cs + i);
                        var sv = Vector512.Load(sn + i);
                        (a * c - b * sv).Store(o + i);
                        (a * sv + b * c).Store(o + i + half);
                    }
                for (; i < half; i++)
                {
                    float a = x[i], b = x[i + half];
                    o[i] = a * cs[i] - b * sn[i];
                    o[i + half] = a * sn[i] + b * cs[i];
                }
            }
            if (y == null) continue;
            long at = rowStart + (long)h * hs;
            if (r->DstType == DType.F32) Buffer.MemoryCopy(y, (float*)r->Dst + at, hs * 4L, hs * 4L);
            else if (r->DstType == DType.BF16) HalfConvert.F32ToBf16(y, (ushort*)r->Dst + at, hs);
            else HalfConvert.F32ToF16(y, (ushort*)r->Dst + at, hs);
        }
    }
}
