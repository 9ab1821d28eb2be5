using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// bf16-product GEMM on AVX512_BF16 (VDPBF16PS): C(M,N) = (accumulate ? C : 0) + alpha·Σ_p bf16(op(A)(i,p))·bf16(op(B)(p,j))
/// [+ bias(N)], every product exact in f32 (8-bit × 8-bit significands) and accumulated in f32 - what PyTorch's bf16
/// autocast computes for a linear layer. Runs only when the backend's <see cref="CpuBackend.MatMulCompute"/> is BF16.
/// </summary>
/// <remarks>
/// Layouts are those of <see cref="Gemm.Run"/> with op(A) row-major (A not transposed): the forward y = x·Wᵀ
/// (bTrans) and the input gradient dx = dy·W. A (f32 activations) is rounded to bf16 (nearest even, NaN kept) while
/// it is packed; B may be f32 (rounded while packing) or bf16 (the bf16 weight storage, copied bit for bit).
/// Both are packed in the "VNNI" pair layout the instruction reads: each 32-bit lane holds the k-pair (2q, 2q+1) of
/// one row of A or one column of B, the even k in the low half; an odd K is padded with a zero pair half.
/// Loop nest as in Gemm (BLIS): column blocks of NBlock, depth slices of at most KCMax (even) shared by the threads
/// for B, row blocks of MBlock for A, tiles of C on the pool; the 12×32 register tile is the machine-code kernel of
/// <see cref="GemmBf16Asm"/> (24 zmm accumulators). A rank update (the LoRA term of a fused LoRA linear) is added
/// in f32 to each C tile after the last depth slice, while the tile is in L1. VDPBF16PS treats bf16 denormal inputs as zero and flushes
/// denormal results (DAZ/FTZ, per the instruction's definition): values below 1.2e-38 in magnitude count as 0.
/// Reference: MatMulReference on bf16-rounded inputs (tests/Kernels/Cpu/GemmBf16Tests.cs).
/// </remarks>
internal static unsafe class GemmBf16
{
    /// <summary>
    /// Deepest K slice (even): the A micro-panel (12 rows · 288 pairs · 4 B = 13.5 KiB) stays in L1, a tile's B (256 columns
    /// · 288 pairs · 4 B = 288 KiB) in L2; 576 takes K = 576 (the SmolLM2 hidden size) in one slice (1 thread, CPU time:
    /// 4096×576×576 187 → 202 GFLOP/s against 512).
    /// </summary>
    public const int KCMax = 576;
    /// <summary>Rows of A packed at once (a multiple of MR).</summary>
    public const int MBlock = 2040;
    /// <summary>Columns of B packed at once.</summary>
    public const int NBlock = 4096;
    /// <summary>Columns of a compute tile (its packed B stays in L2, see KCMax).</summary>
    public const int TileCols = 256;
    private const int MR = GemmBf16Asm.MR, NR = GemmBf16Asm.NR;

    /// <summary>Tests: run the f32 path even where the bf16 kernel exists (proves the fallback).</summary>
    internal static bool ForceFallback;

    /// <summary>True when the machine-code kernel is usable here (x64 Linux with AVX512_BF16).</summary>
    public static bool IsAvailable => GemmBf16Asm.Kernel != null && !ForceFallback;

    /// <summary>
    /// The products bf16 compute takes: A read row-major (activations: forward and input gradient), more than 4 rows,
    /// more than 16 columns and a depth of at least 32. Weight gradients (A transposed) and the rank-r LoRA products
    /// (16 columns or a depth of r) stay f32.
    /// </summary>
    public static bool Applies(int m, int n, int k, bool aTrans) => !aTrans && m > 4 && n > 16 && k >= 32;

    private struct Ctx
    {
        public float* A; public long Lda;
        public void* B; public bool BBf16; public long Ldb; public bool BTrans;
        public float* C; public long Ldc;
        public float Alpha; public float* Bias;
        public int M, N, K;
        public int Jc, Nc, Pc, Kc, Kp, Ic, Mc;
        public bool Beta; public float* BiasNow;
        public uint* Ap, Bp;
        public int APanels, BPanels, PanelsPerTask, APackTasks, BPackTasks;
        public int TileRows, TileColsNow, TilesM, TilesN;
        public float* Scratch; public long ScratchStride;
        /// <summary>Rank update C += UScale·U·op(V) (f32), added to each C tile after the last depth slice: U (M × R, row stride LdU) read in place, op(V) packed R × VpStride.</summary>
        public float* U, Vp; public long LdU; public int R, VpStride; public float UScale;
    }

    /// <summary>
    /// Runs the product in bf16 when <see cref="IsAvailable"/> and <see cref="Applies"/>; false (nothing done) otherwise,
    /// and the caller runs the f32 GEMM. Arguments as <see cref="Gemm.Run"/>.
    /// </summary>
    public static bool TryRun(CpuBackend be, int m, int n, int k,
        float* a, long lda, bool aTrans, void* b, bool bBf16, long ldb, bool bTrans,
        float* c, long ldc, float alpha, bool accumulate, float* bias, Gemm.RankUpdate update = default)
    {
        if (!IsAvailable || !Applies(m, n, k, aTrans)) return false;
        Run(be, m, n, k, a, lda, b, bBf16, ldb, bTrans, c, ldc, alpha, accumulate, bias, update);
        return true;
    }

    private static int RoundUp(int x, int r) => (x + r - 1) / r * r;

    private static void Run(CpuBackend be, int m, int n, int k, float* a, long lda, void* b, bool bBf16, long ldb, bool bTrans,
        float* c, long ldc, float alpha, bool accumulate, float* bias, Gemm.RankUpdate update)
    {
        be.EnsureScratch(MR * NR);
        var ctx = new Ctx
        {
            A = a, Lda = lda, B = b, BBf16 = bBf16, Ldb = ldb, BTrans = bTrans, C = c, Ldc = ldc, Alpha = alpha, Bias = bias,
            M = m, N = n, K = k, Scratch = be.ScratchBase, ScratchStride = be.ScratchStride,
        };
        int threads = be.Threads;
        int slices = (k + KCMax - 1) / KCMax;
        int kcs = RoundUp((k + slices - 1) / slices, 2);
        int kpMax = kcs / 2;
        int ncMax = Math.Min(RoundUp(n, NR), NBlock);
        int mcMax = Math.Min(RoundUp(m, MR), MBlock);
        // packed panels are dwords (one k-pair each): the f32 GEMM's buffers hold them (4 bytes per element)
        be.GemmBuffers((long)mcMax * kpMax, (long)ncMax * kpMax, out float* ap, out float* bp);
        ctx.Ap = (uint*)ap; ctx.Bp = (uint*)bp;
        if (update.R > 0)
        {
            // the LoRA term s·u·Bᵀ (forward) or s·g·A (input gradient) stays f32: op(V) packed k-major, added per C tile
            int nPad = RoundUp(n, NR);
            ctx.R = update.R; ctx.U = update.U; ctx.LdU = update.LdU; ctx.UScale = update.Scale; ctx.VpStride = nPad;
            ctx.Vp = be.GemmUpdateBuffer((long)update.R * nPad);
            for (int q = 0; q < update.R; q++)
            {
                float* row = ctx.Vp + (long)q * nPad;
                for (int j = 0; j < n; j++) row[j] = update.VTrans ? update.V[j * update.LdV + q] : update.V[q * update.LdV + j];
                for (int j = n; j < nPad; j++) row[j] = 0f;
            }
        }
        for (int jc = 0; jc < n; jc += NBlock)
        {
            int nc = Math.Min(NBlock, n - jc);
            for (int pc = 0; pc < k; pc += kcs)
            {
                int kc = Math.Min(kcs, k - pc);
                ctx.Jc = jc; ctx.Nc = nc; ctx.Pc = pc; ctx.Kc = kc; ctx.Kp = (kc + 1) / 2;
                ctx.Beta = pc > 0 || accumulate;
                ctx.BiasNow = pc == 0 ? bias : null;
                ctx.BPanels = (nc + NR - 1) / NR;
                bool packB = true;
                for (int ic = 0; ic < m; ic += MBlock)
                {
                    int mc = Math.Min(MBlock, m - ic);
                    ctx.Ic = ic; ctx.Mc = mc;
                    ctx.APanels = (mc + MR - 1) / MR;
                    ctx.PanelsPerTask = 4;
                    ctx.APackTasks = (ctx.APanels + 3) / 4;
                    ctx.BPackTasks = packB ? (ctx.BPanels + 3) / 4 : 0;
                    be.Pool.For(ctx.APackTasks + ctx.BPackTasks, &PackBody, &ctx);
                    packB = false;
                    (ctx.TileRows, ctx.TilesM, ctx.TileColsNow, ctx.TilesN) = Gemm.TileGrid(ctx.APanels, ctx.BPanels, MR, NR, TileCols, threads);
                    be.Pool.For(ctx.TilesM * ctx.TilesN, &TileBody, &ctx);
                }
            }
        }
    }

    private static void PackBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        int per = x->PanelsPerTask;
        if (task < x->APackTasks)
        {
            int p0 = task * per, p1 = Math.Min(x->APanels, p0 + per);
            for (int panel = p0; panel < p1; panel++) PackAPanel(x, panel);
        }
        else
        {
            int p0 = (task - x->APackTasks) * per, p1 = Math.Min(x->BPanels, p0 + per);
            for (int panel = p0; panel < p1; panel++) PackBPanel(x, panel);
        }
    }

    // ------------------------------------------------------------------ f32 → bf16 pairs

    /// <summary>bf16 bits (round to nearest even, NaN kept quiet) of 16 floats, in the low half of each lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<uint> ToBf16(Vector512<float> v)
    {
        var bits = v.AsUInt32();
        var rounded = (bits + Vector512.Create(0x7FFFu) + ((bits >> 16) & Vector512<uint>.One)) >> 16;
        var nan = Vector512.GreaterThan(bits & Vector512.Create(0x7FFFFFFFu), Vector512.Create(0x7F800000u));
        return Vector512.ConditionalSelect(nan, (bits >> 16) | Vector512.Create(0x40u), rounded);
    }

    /// <summary>The 16 k-pairs of 32 consecutive floats: lane q = bf16(s[2q]) | bf16(s[2q+1]) &lt;&lt; 16.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<uint> Pairs32(float* s) =>
        Vector512.Narrow(ToBf16(Vector512.Load(s)), ToBf16(Vector512.Load(s + 16))).AsUInt32();

    /// <summary>Scalar pair of two f32 values (same rounding as <see cref="ToBf16"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Pair(float lo, float hi) => HalfBits.F32ToBf16(lo) | (uint)HalfBits.F32ToBf16(hi) << 16;

    // ------------------------------------------------------------------ packing

    /// <summary>Rows [Ic + panel·12, +12) of A, depth [Pc, Pc+Kc): kp × 12 pair lanes, zero rows past M and a zero odd tail.</summary>
    private static void PackAPanel(Ctx* x, int panel)
    {
        int kc = x->Kc, kp = x->Kp;
        int i0 = x->Ic + panel * MR;
        int mv = Math.Min(MR, x->Ic + x->Mc - i0);
        uint* dst = x->Ap + (long)panel * MR * kp;
        int q0 = 0;
        if (mv == MR)
        {
            // 12 rows × 32 floats at a time (12 lines in flight), converted to 16 pairs each, transposed through L1
            uint* t = stackalloc uint[16 * 16];
            new Span<uint>(t + MR * 16, (16 - MR) * 16).Clear(); // rows 12..15 of the 16×16 transpose stay zero
            for (; 2 * (q0 + 16) <= kc; q0 += 16)
            {
                for (int r = 0; r < MR; r++) Pairs32(x->A + (i0 + r) * x->Lda + x->Pc + 2 * q0).Store(t + r * 16);
                Transpose16(t, 16, dst + q0 * MR, MR, 12);
            }
        }
        for (int r = 0; r < MR; r++)
        {
            if (r >= mv) { for (int q = q0; q < kp; q++) dst[q * MR + r] = 0; continue; }
            float* src = x->A + (i0 + r) * x->Lda + x->Pc;
            for (int q = q0; q < kp; q++) dst[q * MR + r] = Pair(src[2 * q], 2 * q + 1 < kc ? src[2 * q + 1] : 0f);
        }
    }

    /// <summary>Columns [Jc + panel·32, +32) of op(B), depth [Pc, Pc+Kc): kp × 32 pair lanes, zero columns past N.</summary>
    private static void PackBPanel(Ctx* x, int panel)
    {
        int kc = x->Kc, kp = x->Kp;
        int j0 = x->Jc + panel * NR;
        int nv = Math.Min(NR, x->Jc + x->Nc - j0);
        uint* dst = x->Bp + (long)panel * NR * kp;
        if (nv < NR) new Span<uint>(dst, kp * NR).Clear();
        if (x->BTrans)
        {
            // op(B)(p, j) = B[j·ldb + p]: a column's k-pairs are adjacent in memory (one dword each in bf16).
            // 16 pairs of each of the 32 columns at a time (32 lines in flight), transposed through L1.
            uint* t = stackalloc uint[NR * 16];
            int q0 = 0;
            for (; 2 * (q0 + 16) <= kc; q0 += 16)
            {
                for (int cc = 0; cc < nv; cc++)
                {
                    long off = (j0 + cc) * x->Ldb + x->Pc + 2 * q0;
                    if (x->BBf16) Vector512.Load((uint*)((ushort*)x->B + off)).Store(t + cc * 16);
                    else Pairs32((float*)x->B + off).Store(t + cc * 16);
                }
                uint* d = dst + q0 * NR;
                if (nv == NR)
                {
                    Transpose16(t, 16, d, NR, 16);
                    Transpose16(t + 16 * 16, 16, d + 16, NR, 16);
                    continue;
                }
                for (int q = 0; q < 16; q++)
                    for (int cc = 0; cc < nv; cc++) d[q * NR + cc] = t[cc * 16 + q];
            }
            for (int cc = 0; cc < nv; cc++)
            {
                long off = (j0 + cc) * x->Ldb + x->Pc;
                for (int q = q0; q < kp; q++)
                {
                    bool two = 2 * q + 1 < kc;
                    dst[q * NR + cc] = x->BBf16
                        ? ((ushort*)x->B)[off + 2 * q] | (two ? (uint)((ushort*)x->B)[off + 2 * q + 1] << 16 : 0u)
                        : Pair(((float*)x->B)[off + 2 * q], two ? ((float*)x->B)[off + 2 * q + 1] : 0f);
                }
            }
        }
        else
        {
            // op(B)(p, j) = B[p·ldb + j]: the pair (2q, 2q+1) of a column sits in two consecutive rows: interleave them.
            for (int q = 0; q < kp; q++)
            {
                long r0 = (x->Pc + 2 * q) * x->Ldb + j0;
                bool two = 2 * q + 1 < kc;
                long r1 = r0 + x->Ldb;
                uint* d = dst + q * NR;
                if (nv == NR)
                {
                    if (x->BBf16)
                    {
                        ushort* s = (ushort*)x->B;
                        for (int h = 0; h < 2; h++)
                        {
                            var lo = Vector512.WidenLower(Vector512.Create(Vector256.Load(s + r0 + 16 * h), Vector256<ushort>.Zero));
                            var hi = two ? Vector512.WidenLower(Vector512.Create(Vector256.Load(s + r1 + 16 * h), Vector256<ushort>.Zero)) : Vector512<uint>.Zero;
                            (lo | (hi << 16)).Store(d + 16 * h);
                        }
                    }
                    else
                    {
                        float* s = (float*)x->B;
                        for (int h = 0; h < 2; h++)
                        {
                            var lo = ToBf16(Vector512.Load(s + r0 + 16 * h));
                            var hi = two ? ToBf16(Vector512.Load(s + r1 + 16 * h)) : Vector512<uint>.Zero;
                            (lo | (hi << 16)).Store(d + 16 * h);
                        }
                    }
                    continue;
                }
                for (int cc = 0; cc < nv; cc++)
                    d[cc] = x->BBf16
                        ? ((ushort*)x->B)[r0 + cc] | (two ? (uint)((ushort*)x->B)[r1 + cc] << 16 : 0u)
                        : Pair(((float*)x->B)[r0 + cc], two ? ((float*)x->B)[r1 + cc] : 0f);
            }
        }
    }

    /// <summary>
    /// dst[c·dstStride + r] = src[r·srcStride + c] for a 16×16 block of dwords, the first <paramref name="cols"/> (12 or 16)
    /// of each dst row written: 32-bit then 64-bit interleaves inside 128-bit lanes, then two rounds of 128-bit lane
    /// shuffles (64 register ops instead of 256 scalar moves).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose16(uint* src, long srcStride, uint* dst, long dstStride, int cols)
    {
        var t = stackalloc Vector512<uint>[16];
        for (int i = 0; i < 8; i++)
        {
            var a = Vector512.Load(src + 2 * i * srcStride);
            var b = Vector512.Load(src + (2 * i + 1) * srcStride);
            t[2 * i] = Avx512F.UnpackLow(a, b);      // lane l: a[4l], b[4l], a[4l+1], b[4l+1]
            t[2 * i + 1] = Avx512F.UnpackHigh(a, b); // lane l: a[4l+2], b[4l+2], a[4l+3], b[4l+3]
        }
        var u = stackalloc Vector512<uint>[16];
        for (int j = 0; j < 4; j++)
        {
            // u[4j+e] lane l = column 4l+e of rows 4j..4j+3
            u[4 * j] = Avx512F.UnpackLow(t[4 * j].AsUInt64(), t[4 * j + 2].AsUInt64()).AsUInt32();
            u[4 * j + 1] = Avx512F.UnpackHigh(t[4 * j].AsUInt64(), t[4 * j + 2].AsUInt64()).AsUInt32();
            u[4 * j + 2] = Avx512F.UnpackLow(t[4 * j + 1].AsUInt64(), t[4 * j + 3].AsUInt64()).AsUInt32();
            u[4 * j + 3] = Avx512F.UnpackHigh(t[4 * j + 1].AsUInt64(), t[4 * j + 3].AsUInt64()).AsUInt32();
        }
        for (int e = 0; e < 4; e++)
        {
            var v1 = Avx512F.Shuffle4x128(u[e], u[4 + e], 0x44);      // u[e].l0, u[e].l1, u[4+e].l0, u[4+e].l1
            var v2 = Avx512F.Shuffle4x128(u[e], u[4 + e], 0xEE);      // lanes 2, 3
            var w1 = Avx512F.Shuffle4x128(u[8 + e], u[12 + e], 0x44);
            var w2 = Avx512F.Shuffle4x128(u[8 + e], u[12 + e], 0xEE);
            Row(Avx512F.Shuffle4x128(v1, w1, 0x88), dst + e * dstStride, cols);        // column e (lanes 0 of each)
            Row(Avx512F.Shuffle4x128(v1, w1, 0xDD), dst + (4 + e) * dstStride, cols);  // column 4+e
            Row(Avx512F.Shuffle4x128(v2, w2, 0x88), dst + (8 + e) * dstStride, cols);  // column 8+e
            Row(Avx512F.Shuffle4x128(v2, w2, 0xDD), dst + (12 + e) * dstStride, cols); // column 12+e
        }

        static void Row(Vector512<uint> v, uint* d, int cols)
        {
            if (cols == 16) { v.Store(d); return; }
            v.GetLower().Store(d);                        // 12 dwords: never past the row (panels are packed by several threads)
            v.GetUpper().GetLower().Store(d + 8);
        }
    }

    // ------------------------------------------------------------------ compute

    private static void TileBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        var kernel = GemmBf16Asm.Kernel;
        int kp = x->Kp;
        int tm = task / x->TilesN, tn = task % x->TilesN;
        int r0 = tm * x->TileRows, r1 = Math.Min(x->Mc, r0 + x->TileRows);
        int c0 = tn * x->TileColsNow, c1 = Math.Min(x->Nc, c0 + x->TileColsNow);
        float* tile = x->Scratch + worker * x->ScratchStride;
        bool direct = x->Alpha == 1f && x->BiasNow == null;
        long beta = x->Beta ? 1 : 0;
        bool update = x->R > 0 && x->Pc + x->Kc == x->K;
        for (int ir = r0; ir < r1; ir += MR)
        {
            int mv = Math.Min(MR, r1 - ir);
            uint* aPanel = x->Ap + (long)(ir / MR) * MR * kp;
            float* cRow = x->C + (x->Ic + ir) * x->Ldc + x->Jc;
            for (int jr = c0; jr < c1; jr += NR)
            {
                int nv = Math.Min(NR, c1 - jr);
                uint* bPanel = x->Bp + (long)(jr / NR) * NR * kp;
                if (direct && mv == MR && nv == NR) kernel(kp, aPanel, bPanel, cRow + jr, x->Ldc * sizeof(float), beta);
                else
                {
                    kernel(kp, aPanel, bPanel, tile, NR * sizeof(float), 0);
                    float* bias = x->BiasNow != null ? x->BiasNow + x->Jc + jr : null;
                    StoreEdge(tile, cRow + jr, x->Ldc, x->Alpha, x->Beta, bias, mv, nv);
                }
                if (update) AddUpdate(x, cRow + jr, x->Ic + ir, x->Jc + jr, mv, nv); // the C tile is still in L1
            }
        }
    }

    /// <summary>C tile (mv × nv at row i0, column j0) += UScale·U(i0.., :)·op(V)(:, j0..), f32.</summary>
    private static void AddUpdate(Ctx* x, float* c, int i0, int j0, int mv, int nv)
    {
        int r = x->R;
        long vs = x->VpStride;
        float* v = x->Vp + j0;
        for (int i = 0; i < mv; i++)
        {
            float* u = x->U + (i0 + i) * x->LdU;
            float* row = c + i * x->Ldc;
            if (nv == NR)
            {
                Vector512<float> a0 = default, a1 = default;
                for (int q = 0; q < r; q++)
                {
                    var uq = Vector512.Create(u[q]);
                    a0 = Vector512.FusedMultiplyAdd(uq, Vector512.Load(v + q * vs), a0);
                    a1 = Vector512.FusedMultiplyAdd(uq, Vector512.Load(v + q * vs + 16), a1);
                }
                var s = Vector512.Create(x->UScale);
                Vector512.FusedMultiplyAdd(s, a0, Vector512.Load(row)).Store(row);
                Vector512.FusedMultiplyAdd(s, a1, Vector512.Load(row + 16)).Store(row + 16);
                continue;
            }
            for (int j = 0; j < nv; j++)
            {
                float acc = 0f;
                for (int q = 0; q < r; q++) acc += u[q] * v[q * vs + j];
                row[j] += x->UScale * acc;
            }
        }
    }

    private static void StoreEdge(float* tile, float* c, long ldc, float alpha, bool beta, float* bias, int mv, int nv)
    {
        for (int r = 0; r < mv; r++)
        {
            float* row = c + r * ldc;
            for (int j = 0; j < nv; j++)
                row[j] = alpha * tile[r * NR + j] + (beta ? row[j] : 0f) + (bias != null ? bias[j] : 0f);
        }
    }
}

// The compute-precision switch of the CPU backend's matmuls (bf16 products, see GemmBf16).
public sealed unsafe partial class CpuBackend
{
    private DType _matMulCompute = DType.F32;

    /// <summary>
    /// Precision of the products in the activation-by-weight matmuls: F32 (default, exact f32 GEMM) or BF16 (both
    /// operands rounded to bf16, products accumulated in f32, as PyTorch's bf16 autocast; see <see cref="GemmBf16.Applies"/>
    /// for which products). BF16 needs AVX512_BF16 on x64 Linux (<see cref="Bf16ComputeAvailable"/>); elsewhere the f32
    /// GEMM runs (same formula without the rounding).
    /// </summary>
    public DType MatMulCompute
    {
        get => _matMulCompute;
        set
        {
            if (value != DType.F32 && value != DType.BF16) throw new ArgumentException($"matmul compute must be f32 or bf16, not {value.Name()}", nameof(value));
            _matMulCompute = value;
        }
    }

    /// <summary>True when bf16 compute runs the AVX512_BF16 kernel here; false: <see cref="Bf16ComputeUnavailableReason"/>.</summary>
    public static bool Bf16ComputeAvailable => GemmBf16Asm.Kernel != null;

    /// <summary>Why bf16 compute falls back to f32 on this machine (empty when it does not).</summary>
    public static string Bf16ComputeUnavailableReason => GemmBf16Asm.Unavailable;
}
