using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Kernels.Quant;

/// <summary>
/// y(M, N) (+)= x(M, K)·Wᵀ (+ bias) with W a <see cref="PackedMatrix"/>: the small-M GEMM of prefill (M = the prompt
/// chunk) and, with M = 1, the decode matvec. For Q8_0/Q4_0 weights the activation rows are quantized once to 8 bits
/// per 32-block (<see cref="QuantizeActivations"/>, llama.cpp's q8 activations) and the dots are integer; each weight
/// vector loaded (16 rows) is reused by 8 activation rows.
/// </summary>
/// <remarks>
/// Per 32-block of 16 weight rows and one activation row (AVX-512BW, .NET 10 exposes no AVX512-VNNI):
/// <list type="bullet">
/// <item>Q4_0: the nibbles are the unsigned operand of vpmaddubsw (u8 × s8 → pairs summed into s16): 8 of them
/// cover the block, their s16 sums add without overflow (8 · 2 · 15 · 127 = 30480 &lt; 32767), one vpmaddwd by 1 widens
/// to s32, and the -8 offset is taken off once per block as 8·Σq_x: Σ(q-8)·q_x = Σq·q_x - 8·Σq_x.</item>
/// <item>Q8_0: int8 weights sign-extended to int16 (once per vector, shared by the 8 rows), vpmaddwd against the
/// broadcast int16 activation pair, 16 per block (int8 × int8 pairs would overflow vpmaddubsw's s16 sum).</item>
/// <item>then acc += f32(dot) · (d_w[16] · d_x): 16 outputs per FMA.</item>
/// <item>F32: acc += W[k][16] · x[k] (broadcast), 8 rows × 2 panels per tile; F16 panels are widened to an f32
/// panel in per-thread scratch first (once per panel, reused by all M rows).</item>
/// </list>
/// Threads split the panels (output columns); a thread runs all row tiles of a panel while it sits in L1/L2.
/// Reference: the double product on the dequantized blocks and the quantized activations
/// (<see cref="Reference.QuantReference.MatVecQ8Activations"/>).
/// </remarks>
public static unsafe class PackedGemm
{
    /// <summary>The kernels need AVX-512BW; without it the callers keep the row-major paths.</summary>
    public static bool IsSupported => Avx512BW.IsSupported;

    /// <summary>Rows of a tile (activation rows sharing one loaded weight vector).</summary>
    public const int MR = 8;

    // ------------------------------------------------------------------------------------------- activations

    /// <summary>
    /// x(M, K) to 8-bit blocks like <see cref="MatVec.QuantizeActivations"/> (d = max|x|/127, q = round-half-even(x·127/max|x|)),
    /// written as int8 (q8, for Q4_0 and vpmaddubsw) and int16 (q16, for Q8_0 and vpmaddwd), with d(M, K/32) and
    /// s8(M, K/32) = 8·Σq (the Q4_0 offset term).
    /// </summary>
    public static void QuantizeActivations(float* x, long ldx, int m, int k, sbyte* q8, short* q16, float* d, int* s8)
    {
        if (k % 32 != 0) throw new ArgumentException($"QuantizeActivations: K = {k} is not a multiple of 32");
        int nb = k / 32;
        for (int i = 0; i < m; i++)
        {
            for (int b = 0; b < nb; b++)
            {
                float* xb = x + i * ldx + b * 32;
                long o = (long)i * k + b * 32, ob = (long)i * nb + b;
                if (Vector512.IsHardwareAccelerated)
                {
                    var x0 = Vector512.Load(xb);
                    var x1 = Vector512.Load(xb + 16);
                    float amax = Vector512.Max(Vector512.Abs(x0), Vector512.Abs(x1)).MaxAcross();
                    float id = amax > 0 ? 127f / amax : 0f;
                    var vid = Vector512.Create(id);
                    var i0 = Avx512F.ConvertToVector512Int32(x0 * vid);   // round to nearest even (MXCSR default)
                    var i1 = Avx512F.ConvertToVector512Int32(x1 * vid);
                    Avx512F.ConvertToVector128SByte(i0).Store(q8 + o);
                    Avx512F.ConvertToVector128SByte(i1).Store(q8 + o + 16);
                    Avx512F.ConvertToVector256Int16(i0).Store(q16 + o);
                    Avx512F.ConvertToVector256Int16(i1).Store(q16 + o + 16);
                    d[ob] = amax / 127f;
                    s8[ob] = 8 * Vector512.Sum(i0 + i1);
                }
                else
                {
                    float amax = 0;
                    for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(xb[j]));
                    float id = amax > 0 ? 127f / amax : 0f;
                    int sum = 0;
                    for (int j = 0; j < 32; j++)
                    {
                        int v = (int)MathF.Round(xb[j] * id, MidpointRounding.ToEven);
                        q8[o + j] = (sbyte)v;
                        q16[o + j] = (short)v;
                        sum += v;
                    }
                    d[ob] = amax / 127f;
                    s8[ob] = 8 * sum;
                }
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float MaxAcross(this Vector512<float> v)
    {
        var m = Vector256.Max(v.GetLower(), v.GetUpper());
        var m2 = Vector128.Max(m.GetLower(), m.GetUpper());
        m2 = Vector128.Max(m2, Vector128.Shuffle(m2, Vector128.Create(2, 3, 0, 1)));
        m2 = Vector128.Max(m2, Vector128.Shuffle(m2, Vector128.Create(1, 0, 3, 2)));
        return m2.ToScalar();
    }

    /// <summary>Quantized activations of up to <c>maxM</c> rows of depth up to <c>maxK</c>, plus per-thread f32 panels.</summary>
    public sealed class Workspace : IDisposable
    {
        private readonly List<nint> _blocks = new();
        public int MaxM { get; }
        public int MaxK { get; }
        public sbyte* Q8 { get; }
        public short* Q16 { get; }
        public float* D { get; }
        public int* S8 { get; }
        /// <summary>Per thread, two f32 panels (32·maxK floats) for widened F16 weights.</summary>
        public float* Panels { get; }
        public int Threads { get; }

        public Workspace(int maxM, int maxK, int threads)
        {
            maxK = (maxK + 31) / 32 * 32;
            MaxM = maxM; MaxK = maxK; Threads = threads;
            Q8 = (sbyte*)Alloc((long)maxM * maxK);
            Q16 = (short*)Alloc((long)maxM * maxK * 2);
            D = (float*)Alloc((long)maxM * (maxK / 32) * 4);
            S8 = (int*)Alloc((long)maxM * (maxK / 32) * 4);
            Panels = (float*)Alloc(128L * maxK * threads);
        }

        private void* Alloc(long bytes)
        {
            void* p = NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 64), 64);
            NativeMemory.Clear(p, (nuint)Math.Max(bytes, 64));
            _blocks.Add((nint)p);
            return p;
        }

        public void Dispose()
        {
            foreach (var p in _blocks) NativeMemory.AlignedFree((void*)p);
            _blocks.Clear();
        }
    }

    // ------------------------------------------------------------------------------------------- the threaded GEMM

    private struct Ctx
    {
        public byte* W; public DType Type; public int N, K, M; public long PanelBytes;
        public float* X; public long Ldx;
        public sbyte* Q8; public short* Q16; public float* D; public int* S8;
        public float* Y; public long Ldy; public float* Bias; public bool Accumulate;
        public float* Panels; public long PanelStride; public int PanelsPerTask;
    }

    /// <summary>
    /// y(M, N) (+)= x(M, K)·Wᵀ (+ bias) on the backend's threads. For Q8_0/Q4_0 weights the activations must have been
    /// quantized into <paramref name="ws"/> by <see cref="QuantizeInput"/> from the same x (q, k and v share one).
    /// </summary>
    public static void Run(CpuBackend be, PackedMatrix w, Workspace ws, int m, float* x, long ldx, float* y, long ldy, float* bias, bool accumulate)
    {
        if (m <= 0) return;
        if (m > ws.MaxM || w.K > ws.MaxK) throw new ArgumentException($"{w.Name}: workspace holds ({ws.MaxM}, {ws.MaxK}), needs ({m}, {w.K})");
        if (ws.Threads < be.Threads) throw new ArgumentException($"workspace made for {ws.Threads} threads, backend has {be.Threads}");
        var ctx = new Ctx
        {
            W = w.Data, Type = w.Type, N = w.N, K = w.K, M = m, PanelBytes = w.PanelBytes, X = x, Ldx = ldx,
            Q8 = ws.Q8, Q16 = ws.Q16, D = ws.D, S8 = ws.S8, Y = y, Ldy = ldy, Bias = bias, Accumulate = accumulate, Panels = ws.Panels, PanelStride = ws.MaxK,
        };
        // F32 tiles take 2 panels; a task is a run of panels (a multiple of 2) sized to give each thread ~4 tasks.
        int threads = be.Threads;
        int per = Math.Max(2, (w.Panels + 4 * threads - 1) / (4 * threads));
        per += per & 1;
        ctx.PanelsPerTask = per;
        be.Pool.For((w.Panels + per - 1) / per, &Body, &ctx);
    }

    /// <summary>Quantizes x(M, K) into <paramref name="ws"/> for the Q8_0/Q4_0 products that follow.</summary>
    public static void QuantizeInput(Workspace ws, float* x, long ldx, int m, int k)
    {
        if (m > ws.MaxM || k > ws.MaxK) throw new ArgumentException($"workspace holds ({ws.MaxM}, {ws.MaxK}), needs ({m}, {k})");
        QuantizeActivations(x, ldx, m, k, ws.Q8, ws.Q16, ws.D, ws.S8);
    }

    private static void Body(void* p, int task, int worker)
    {
        var c = (Ctx*)p;
        int p0 = task * c->PanelsPerTask, p1 = Math.Min(p0 + c->PanelsPerTask, (c->N + 15) / 16);
        int k = c->K, nb = k / 32;
        if (c->Type is DType.F32 or DType.F16)
        {
            float* scratch = c->Panels + (long)worker * 32 * c->PanelStride;   // two widened panels per thread
            for (int pp = p0; pp < p1; pp += 2)
            {
                bool two = pp + 1 < p1;
                float* a, b;
                if (c->Type == DType.F32)
                {
                    a = (float*)(c->W + pp * c->PanelBytes);
                    b = two ? (float*)(c->W + (pp + 1) * c->PanelBytes) : a;
                }
                else
                {
                    // widen both panels once (reused by every row tile): 16·k floats each, adjacent in scratch
                    a = scratch;
                    WidenF16((ushort*)(c->W + pp * c->PanelBytes), a, 16L * k);
                    b = a;
                    if (two) { b = scratch + 16L * k; WidenF16((ushort*)(c->W + (pp + 1) * c->PanelBytes), b, 16L * k); }
                }
                for (int i0 = 0; i0 < c->M; i0 += MR)
                    TileF32(a, b, two, k, c->X + i0 * c->Ldx, c->Ldx, Math.Min(MR, c->M - i0), c->Y + i0 * c->Ldy, c->Ldy, pp * 16, c->N, c->Bias, c->Accumulate);
            }
            return;
        }
        for (int pp = p0; pp < p1; pp++)
        {
            byte* panel = c->W + pp * c->PanelBytes;
            for (int i0 = 0; i0 < c->M; i0 += MR)
            {
                int mr = Math.Min(MR, c->M - i0);
                float* y = c->Y + i0 * c->Ldy;
                if (c->Type == DType.Q4_0)
                    TileQ4(panel, nb, c->Q8 + (long)i0 * k, k, c->D + (long)i0 * nb, c->S8 + (long)i0 * nb, nb, mr, y, c->Ldy, pp * 16, c->N, c->Bias, c->Accumulate);
                else
                    TileQ8(panel, nb, c->Q16 + (long)i0 * k, k, c->D + (long)i0 * nb, nb, mr, y, c->Ldy, pp * 16, c->N, c->Bias, c->Accumulate);
            }
        }
    }

    // ------------------------------------------------------------------------------------------- stores

    /// <summary>y[col0 + l] (+)= v[l] (+ bias[col0 + l]) for the lanes l with col0 + l in [lo, hi).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreLanes(float* y, Vector512<float> v, int col0, int lo, int hi, float* bias, bool accumulate)
    {
        if (col0 >= lo && col0 + 16 <= hi)
        {
            if (bias != null) v += Vector512.Load(bias + col0);
            if (accumulate) v += Vector512.Load(y + col0);
            v.Store(y + col0);
            return;
        }
        StorePartial(y, v, col0, lo, hi, bias, accumulate);
    }

    private static void StorePartial(float* y, Vector512<float> v, int col0, int lo, int hi, float* bias, bool accumulate)
    {
        for (int l = 0; l < 16; l++)
        {
            int col = col0 + l;
            if (col < lo || col >= hi) continue;
            float s = v.GetElement(l);
            if (bias != null) s += bias[col];
            y[col] = accumulate ? y[col] + s : s;
        }
    }

    // ------------------------------------------------------------------------------------------- Q4_0

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<sbyte> Bcast(sbyte* p) => Vector512.Create(*(int*)p).AsSByte();

    /// <summary>One activation row's block against the 16 rows of one Q4_0 panel block (nibbles already split).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> RowQ4(Vector512<byte> l0, Vector512<byte> l1, Vector512<byte> l2, Vector512<byte> l3,
        Vector512<byte> h0, Vector512<byte> h1, Vector512<byte> h2, Vector512<byte> h3,
        sbyte* xb, float d, int s8, Vector512<float> ws, Vector512<float> acc)
    {
        var t = Avx512BW.MultiplyAddAdjacent(l0, Bcast(xb));
        t += Avx512BW.MultiplyAddAdjacent(l1, Bcast(xb + 4));
        t += Avx512BW.MultiplyAddAdjacent(l2, Bcast(xb + 8));
        t += Avx512BW.MultiplyAddAdjacent(l3, Bcast(xb + 12));
        t += Avx512BW.MultiplyAddAdjacent(h0, Bcast(xb + 16));
        t += Avx512BW.MultiplyAddAdjacent(h1, Bcast(xb + 20));
        t += Avx512BW.MultiplyAddAdjacent(h2, Bcast(xb + 24));
        t += Avx512BW.MultiplyAddAdjacent(h3, Bcast(xb + 28));
        var dot = Avx512BW.MultiplyAddAdjacent(t, Vector512.Create((short)1)) - Vector512.Create(s8);
        return Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(dot), ws * Vector512.Create(d), acc);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<byte> Hi(Vector512<byte> v) => Vector512.ShiftRightLogical(v.AsUInt16(), 4).AsByte() & Vector512.Create((byte)15);

    /// <summary>Rows [0, mr) (mr ≤ 8) of y (ldy apart) at columns col0..col0+15 (those below n) from one Q4_0 panel.</summary>
    private static void TileQ4(byte* panel, int nb, sbyte* xq, long ldq, float* xd, int* xs, long ldb, int mr,
        float* y, long ldy, int col0, int n, float* bias, bool accumulate)
    {
        // rows past mr repeat the last one (computed, not stored)
        long q1 = Math.Min(1, mr - 1) * ldq, q2 = Math.Min(2, mr - 1) * ldq, q3 = Math.Min(3, mr - 1) * ldq, q4 = Math.Min(4, mr - 1) * ldq,
             q5 = Math.Min(5, mr - 1) * ldq, q6 = Math.Min(6, mr - 1) * ldq, q7 = Math.Min(7, mr - 1) * ldq;
        long b1 = Math.Min(1, mr - 1) * ldb, b2 = Math.Min(2, mr - 1) * ldb, b3 = Math.Min(3, mr - 1) * ldb, b4 = Math.Min(4, mr - 1) * ldb,
             b5 = Math.Min(5, mr - 1) * ldb, b6 = Math.Min(6, mr - 1) * ldb, b7 = Math.Min(7, mr - 1) * ldb;
        Vector512<float> f0 = default, f1 = default, f2 = default, f3 = default, f4 = default, f5 = default, f6 = default, f7 = default;
        var mask = Vector512.Create((byte)15);
        for (int b = 0; b < nb; b++)
        {
            byte* o = panel + b * 320L;
            var ws = Vector512.Load((float*)o);
            var v0 = Vector512.Load(o + 64); var v1 = Vector512.Load(o + 128); var v2 = Vector512.Load(o + 192); var v3 = Vector512.Load(o + 256);
            var l0 = v0 & mask; var l1 = v1 & mask; var l2 = v2 & mask; var l3 = v3 & mask;
            var h0 = Hi(v0); var h1 = Hi(v1); var h2 = Hi(v2); var h3 = Hi(v3);
            sbyte* x = xq + b * 32;
            f0 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x, xd[b], xs[b], ws, f0);
            f1 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q1, xd[b + b1], xs[b + b1], ws, f1);
            f2 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q2, xd[b + b2], xs[b + b2], ws, f2);
            f3 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q3, xd[b + b3], xs[b + b3], ws, f3);
            if (mr > 4)
            {
                f4 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q4, xd[b + b4], xs[b + b4], ws, f4);
                f5 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q5, xd[b + b5], xs[b + b5], ws, f5);
                f6 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q6, xd[b + b6], xs[b + b6], ws, f6);
                f7 = RowQ4(l0, l1, l2, l3, h0, h1, h2, h3, x + q7, xd[b + b7], xs[b + b7], ws, f7);
            }
        }
        StoreTile(y, ldy, mr, col0, n, bias, accumulate, f0, f1, f2, f3, f4, f5, f6, f7);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreTile(float* y, long ldy, int mr, int col0, int n, float* bias, bool accumulate,
        Vector512<float> f0, Vector512<float> f1, Vector512<float> f2, Vector512<float> f3,
        Vector512<float> f4, Vector512<float> f5, Vector512<float> f6, Vector512<float> f7)
    {
        StoreLanes(y, f0, col0, 0, n, bias, accumulate);
        if (mr > 1) StoreLanes(y + ldy, f1, col0, 0, n, bias, accumulate);
        if (mr > 2) StoreLanes(y + 2 * ldy, f2, col0, 0, n, bias, accumulate);
        if (mr > 3) StoreLanes(y + 3 * ldy, f3, col0, 0, n, bias, accumulate);
        if (mr > 4) StoreLanes(y + 4 * ldy, f4, col0, 0, n, bias, accumulate);
        if (mr > 5) StoreLanes(y + 5 * ldy, f5, col0, 0, n, bias, accumulate);
        if (mr > 6) StoreLanes(y + 6 * ldy, f6, col0, 0, n, bias, accumulate);
        if (mr > 7) StoreLanes(y + 7 * ldy, f7, col0, 0, n, bias, accumulate);
    }

    /// <summary>
    /// Decode (M = 1): y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1) from Q4_0 panels; x quantized to int8 (xq, K),
    /// its block scales xd and 8·Σq xs.
    /// </summary>
    public static void RowsQ4_0(byte* w, int k, int r0, int r1, sbyte* xq, float* xd, int* xs, float* y, float* bias, bool accumulate)
    {
        if (r1 <= r0) return;
        int nb = k / 32;
        long panelBytes = nb * 320L;
        var mask = Vector512.Create((byte)15);
        for (int p = r0 / 16; p * 16 < r1; p++)
        {
            byte* o = w + p * panelBytes;
            Vector512<float> f0 = default, f1 = default;   // two chains: even and odd blocks
            int b = 0;
            for (; b < nb; b++, o += 320)
            {
                MatVecPrefetch(o + 1280);
                var ws = Vector512.Load((float*)o);
                var v0 = Vector512.Load(o + 64); var v1 = Vector512.Load(o + 128); var v2 = Vector512.Load(o + 192); var v3 = Vector512.Load(o + 256);
                var r = RowQ4(v0 & mask, v1 & mask, v2 & mask, v3 & mask, Hi(v0), Hi(v1), Hi(v2), Hi(v3), xq + b * 32, xd[b], xs[b], ws, f0);
                f0 = f1; f1 = r;
            }
            StoreLanes(y, f0 + f1, p * 16, r0, r1, bias, accumulate);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void MatVecPrefetch(byte* p)
    {
        if (!Sse.IsSupported) return;
        Sse.Prefetch0(p); Sse.Prefetch0(p + 64); Sse.Prefetch0(p + 128); Sse.Prefetch0(p + 192); Sse.Prefetch0(p + 256);
    }

    // ------------------------------------------------------------------------------------------- Q8_0

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<short> Pair(short* p) => Vector512.Create(*(int*)p).AsInt16();

    /// <summary>Rows [0, mr) (mr ≤ 8) of y at columns col0..col0+15 from one Q8_0 panel (int16 activations).</summary>
    private static void TileQ8(byte* panel, int nb, short* xq, long ldq, float* xd, long ldb, int mr,
        float* y, long ldy, int col0, int n, float* bias, bool accumulate)
    {
        long q1 = Math.Min(1, mr - 1) * ldq, q2 = Math.Min(2, mr - 1) * ldq, q3 = Math.Min(3, mr - 1) * ldq, q4 = Math.Min(4, mr - 1) * ldq,
             q5 = Math.Min(5, mr - 1) * ldq, q6 = Math.Min(6, mr - 1) * ldq, q7 = Math.Min(7, mr - 1) * ldq;
        long b1 = Math.Min(1, mr - 1) * ldb, b2 = Math.Min(2, mr - 1) * ldb, b3 = Math.Min(3, mr - 1) * ldb, b4 = Math.Min(4, mr - 1) * ldb,
             b5 = Math.Min(5, mr - 1) * ldb, b6 = Math.Min(6, mr - 1) * ldb, b7 = Math.Min(7, mr - 1) * ldb;
        Vector512<float> f0 = default, f1 = default, f2 = default, f3 = default, f4 = default, f5 = default, f6 = default, f7 = default;
        for (int b = 0; b < nb; b++)
        {
            byte* o = panel + b * 576L;
            short* x = xq + b * 32;
            Vector512<int> a0 = default, a1 = default, a2 = default, a3 = default, a4 = default, a5 = default, a6 = default, a7 = default;
            for (int t = 0; t < 16; t++)
            {
                var wv = Avx512BW.ConvertToVector512Int16(Vector256.Load((sbyte*)o + 64 + 32 * t));
                short* xt = x + 2 * t;
                a0 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt));
                a1 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q1));
                a2 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q2));
                a3 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q3));
                a4 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q4));
                a5 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q5));
                a6 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q6));
                a7 += Avx512BW.MultiplyAddAdjacent(wv, Pair(xt + q7));
            }
            var ws = Vector512.Load((float*)o);
            f0 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a0), ws * Vector512.Create(xd[b]), f0);
            f1 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a1), ws * Vector512.Create(xd[b + b1]), f1);
            f2 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a2), ws * Vector512.Create(xd[b + b2]), f2);
            f3 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a3), ws * Vector512.Create(xd[b + b3]), f3);
            f4 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a4), ws * Vector512.Create(xd[b + b4]), f4);
            f5 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a5), ws * Vector512.Create(xd[b + b5]), f5);
            f6 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a6), ws * Vector512.Create(xd[b + b6]), f6);
            f7 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a7), ws * Vector512.Create(xd[b + b7]), f7);
        }
        StoreTile(y, ldy, mr, col0, n, bias, accumulate, f0, f1, f2, f3, f4, f5, f6, f7);
    }

    /// <summary>Decode (M = 1): y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1) from Q8_0 panels; x as int16 (xq, K) and xd.</summary>
    public static void RowsQ8_0(byte* w, int k, int r0, int r1, short* xq, float* xd, float* y, float* bias, bool accumulate)
    {
        if (r1 <= r0) return;
        int nb = k / 32;
        long panelBytes = nb * 576L;
        for (int p = r0 / 16; p * 16 < r1; p++)
        {
            byte* o = w + p * panelBytes;
            Vector512<float> f0 = default;
            for (int b = 0; b < nb; b++, o += 576)
            {
                MatVecPrefetch(o + 2304);
                MatVecPrefetch(o + 2304 + 320);
                short* x = xq + b * 32;
                Vector512<int> a0 = default, a1 = default;
                for (int t = 0; t < 16; t += 2)
                {
                    a0 += Avx512BW.MultiplyAddAdjacent(Avx512BW.ConvertToVector512Int16(Vector256.Load((sbyte*)o + 64 + 32 * t)), Pair(x + 2 * t));
                    a1 += Avx512BW.MultiplyAddAdjacent(Avx512BW.ConvertToVector512Int16(Vector256.Load((sbyte*)o + 96 + 32 * t)), Pair(x + 2 * t + 2));
                }
                f0 = Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(a0 + a1), Vector512.Load((float*)o) * Vector512.Create(xd[b]), f0);
            }
            StoreLanes(y, f0, p * 16, r0, r1, bias, accumulate);
        }
    }

    /// <summary>True where <see cref="RowsF16"/> runs (its machine code: x64 Linux with AVX-512F).</summary>
    public static bool F16DecodeAvailable => Cpu.MatVecF16Asm.Panel16 != null;

    /// <summary>
    /// Decode (M = 1): y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1) from F16 panels: one contiguous stream per panel
    /// (the row-major f16 rows read 4 streams), VCVTPH2PS on 16 rows at a time against the broadcast x[k], the next
    /// panel prefetched (<see cref="Cpu.MatVecF16Asm.Panel16"/>); the K % 4 tail here. Only where
    /// <see cref="F16DecodeAvailable"/>. Summation: four chains over k mod 4, not the row kernels' order.
    /// </summary>
    public static void RowsF16(byte* w, int k, int r0, int r1, float* x, float* y, float* bias, bool accumulate)
    {
        if (r1 <= r0) return;
        if (!F16DecodeAvailable) throw new InvalidOperationException($"packed f16 decode needs the VCVTPH2PS kernel ({Cpu.MatVecF16Asm.Unavailable})");
        long panelBytes = 32L * k;
        int k4 = k & ~3;
        float* t = stackalloc float[16];
        for (int p = r0 / 16; p * 16 < r1; p++)
        {
            byte* o = w + p * panelBytes;
            Vector512<float> f = default;
            if (k4 > 0)
            {
                Cpu.MatVecF16Asm.Panel16((ushort*)o, x, t, k4 / 4, o + panelBytes);
                f = Vector512.Load(t);
            }
            for (int kk = k4; kk < k; kk++)
            {
                Cpu.MatVecF16Asm.Widen((ushort*)(o + 32L * kk), t, 1);
                f = Avx512F.FusedMultiplyAdd(Vector512.Load(t), Vector512.Create(x[kk]), f);
            }
            StoreLanes(y, f, p * 16, r0, r1, bias, accumulate);
        }
    }

    // ------------------------------------------------------------------------------------------- F32 / F16

    /// <summary>
    /// f16 bits to f32, 16 at a time, exact for every finite value (the 2^112 rebias of <see cref="QuantBlocks.F16ToF32"/>):
    /// sign-extending to 32 bits and shifting left by 13 puts the sign in bit 31 and exponent+mantissa in bits 13..27;
    /// masking the bits between and multiplying by 2^112 gives the value (4 instructions, no F16C in .NET).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> F16x16(ushort* p)
    {
        var h = Avx512F.ConvertToVector512Int32(Vector256.Load((short*)p));
        var bits = Vector512.ShiftLeft(h, 13) & Vector512.Create(unchecked((int)0x8FFFE000));
        return bits.AsSingle() * Vector512.Create(5.192296858534828e33f);   // 2^112
    }

    private static void WidenF16(ushort* src, float* dst, long n)
    {
        long i = 0;
        if (n >= 16 && Cpu.MatVecF16Asm.IsAvailable)
        {
            Cpu.MatVecF16Asm.Widen(src, dst, n / 16);   // VCVTPH2PS: one instruction per 16 halves
            i = n & ~15L;
        }
        if (Vector512.IsHardwareAccelerated)
            for (; i + 16 <= n; i += 16) F16x16(src + i).Store(dst + i);
        for (; i < n; i++) dst[i] = QuantBlocks.F16ToF32(src[i]);
    }

    /// <summary>Rows [0, mr) of y at columns col0..col0+31 (panels a, b; b only when <paramref name="two"/>) from f32 panels.</summary>
    private static void TileF32(float* a, float* b, bool two, int k, float* x, long ldx, int mr, float* y, long ldy, int col0, int n, float* bias, bool accumulate)
    {
        long x1 = Math.Min(1, mr - 1) * ldx, x2 = Math.Min(2, mr - 1) * ldx, x3 = Math.Min(3, mr - 1) * ldx, x4 = Math.Min(4, mr - 1) * ldx,
             x5 = Math.Min(5, mr - 1) * ldx, x6 = Math.Min(6, mr - 1) * ldx, x7 = Math.Min(7, mr - 1) * ldx;
        Vector512<float> f0 = default, f1 = default, f2 = default, f3 = default, f4 = default, f5 = default, f6 = default, f7 = default;
        Vector512<float> g0 = default, g1 = default, g2 = default, g3 = default, g4 = default, g5 = default, g6 = default, g7 = default;
        for (int j = 0; j < k; j++)
        {
            var wa = Vector512.Load(a + 16L * j);
            var wb = Vector512.Load(b + 16L * j);
            float* xj = x + j;
            var s = Vector512.Create(xj[0]); f0 = Avx512F.FusedMultiplyAdd(wa, s, f0); g0 = Avx512F.FusedMultiplyAdd(wb, s, g0);
            s = Vector512.Create(xj[x1]); f1 = Avx512F.FusedMultiplyAdd(wa, s, f1); g1 = Avx512F.FusedMultiplyAdd(wb, s, g1);
            s = Vector512.Create(xj[x2]); f2 = Avx512F.FusedMultiplyAdd(wa, s, f2); g2 = Avx512F.FusedMultiplyAdd(wb, s, g2);
            s = Vector512.Create(xj[x3]); f3 = Avx512F.FusedMultiplyAdd(wa, s, f3); g3 = Avx512F.FusedMultiplyAdd(wb, s, g3);
            s = Vector512.Create(xj[x4]); f4 = Avx512F.FusedMultiplyAdd(wa, s, f4); g4 = Avx512F.FusedMultiplyAdd(wb, s, g4);
            s = Vector512.Create(xj[x5]); f5 = Avx512F.FusedMultiplyAdd(wa, s, f5); g5 = Avx512F.FusedMultiplyAdd(wb, s, g5);
            s = Vector512.Create(xj[x6]); f6 = Avx512F.FusedMultiplyAdd(wa, s, f6); g6 = Avx512F.FusedMultiplyAdd(wb, s, g6);
            s = Vector512.Create(xj[x7]); f7 = Avx512F.FusedMultiplyAdd(wa, s, f7); g7 = Avx512F.FusedMultiplyAdd(wb, s, g7);
        }
        StoreTile(y, ldy, mr, col0, n, bias, accumulate, f0, f1, f2, f3, f4, f5, f6, f7);
        if (two) StoreTile(y, ldy, mr, col0 + 16, n, bias, accumulate, g0, g1, g2, g3, g4, g5, g6, g7);
    }
}
