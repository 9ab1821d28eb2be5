using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// Packed, cache-blocked single-precision GEMM (the BLIS loop nest) behind every matmul of the CPU backend:
/// C(M,N) = (accumulate ? C : 0) + alpha·op(A)(M,K)·op(B)(K,N) [+ bias(N)], f32 accumulation.
/// </summary>
/// <remarks>
/// op(A)(i,p) = aTrans ? A[p·lda + i] : A[i·lda + p] (f32); op(B)(p,j) = bTrans ? B[j·ldb + p] : B[p·ldb + j]
/// (f32 or bf16, converted while packing). The three nn.Linear products map onto it as
/// forward y = x·Wᵀ (bTrans), input gradient dx = dy·W, weight gradient dW += dyᵀ·x (aTrans).
/// Loop nest (variant 3b, see bench/Variants/README.md): K is split evenly into slices of at most KCMax; for each
/// column block (NBlock) × group of K slices (all of K unless the packed panels would pass RegionFloats) × row block
/// (MBlock) ONE parallel region runs: the threads take (TileRows × TileCols) tiles of C in column-major order, and
/// each tile walks the group's slices itself, packing on first use the NR-wide B panels and MR-tall A panels it needs
/// (per-panel claim flags: a panel is packed once, by whichever thread needs it first, and shared; a thread that finds
/// a panel still being packed packs a private copy rather than wait; B panels are kept for the next row block). Inside a tile the A micro-panel (MR·kc floats) stays in L1 while the B micro-panels stream
/// from L2; the 12×32 micro-kernel keeps its C tile in 24 Vector512 registers (8 for A-broadcast/B loads left of
/// the 32) and broadcasts A from memory. An optional rank-R term (RankUpdate, the LoRA s·u·Bᵀ and s·g·A) runs as R
/// more depth steps of the last slice.
/// Without AVX-512 the micro-kernel is 6×16 on Vector256 (12 accumulators of the 16 ymm registers).
/// </remarks>
internal static unsafe class Gemm
{
    /// <summary>
    /// A low-rank term added to a product: scale·U(M,R)·op(V)(R,N), U row-major (stride LdU), op(V)(p,j) = VTrans ?
    /// V[j·LdV + p] : V[p·LdV + j]. R = 0 means none. The LoRA linear's s·u·Bᵀ (forward) and s·g·A (input gradient).
    /// </summary>
    public readonly struct RankUpdate(float* u, long ldU, float* v, long ldV, bool vTrans, int r, float scale)
    {
        public readonly float* U = u, V = v;
        public readonly long LdU = ldU, LdV = ldV;
        public readonly bool VTrans = vTrans;
        public readonly int R = r;
        public readonly float Scale = scale;
    }

    public static readonly bool Wide = Vector512.IsHardwareAccelerated;
    public static readonly int MR = Wide ? 12 : 6;
    public static readonly int NR = Wide ? 32 : 16;
    /// <summary>Deepest K slice: 256 keeps the A micro-panel (12·256·4 B = 12 KiB) in L1 with room for B lines.</summary>
    public const int KCMax = 256;
    /// <summary>Rows of A packed at once (2 MiB at KC 256).</summary>
    public const int MBlock = 2040;
    /// <summary>Columns of B packed at once (4 MiB at KC 256): the LM head's 49152 columns go in 12 blocks.</summary>
    public const int NBlock = 4096;
    /// <summary>Columns of a compute tile: its B (kc·256·4 B = 256 KiB) stays in the 1 MiB L2 across the tile's rows.</summary>
    public const int TileCols = 256;

    /// <summary>
    /// The compute tiles of one row block (shared with <see cref="GemmBf16"/>): enough of them for the threads to
    /// balance (about 4 per thread), each at most <paramref name="tileCols"/> wide and 8 row panels tall.
    /// </summary>
    internal static (int TileRows, int TilesM, int TileCols, int TilesN) TileGrid(int rowPanels, int colPanels, int mr, int nr, int tileCols, int threads)
    {
        int colsPad = colPanels * nr;
        int tn = Math.Min(tileCols, colsPad);
        int tilesN = (colsPad + tn - 1) / tn;
        int wantM = Math.Max(1, (4 * threads + tilesN - 1) / tilesN);
        int tileRowPanels = Math.Max(1, Math.Min((rowPanels + wantM - 1) / wantM, 8));
        if (threads == 1) tileRowPanels = Math.Min(rowPanels, 8);
        return (tileRowPanels * mr, (rowPanels + tileRowPanels - 1) / tileRowPanels, tn, tilesN);
    }

    /// <summary>Floats of per-thread scratch one GEMM needs (edge tile, small-M paths).</summary>
    public static long ScratchFloats(int k) => Math.Max(16 * 64 + Math.Max(k, 1) + 64, PrivateOffset + PrivateFloats);

    /// <summary>
    /// Per-thread private panels (after the edge tile in the scratch): a tile that finds one of its panels being packed
    /// by another thread packs its own copy here instead of waiting (a descheduled packer on a loaded machine would
    /// otherwise stall it for a time slice): TileCols / NR B panels and one A panel, KCMax deep.
    /// </summary>
    private const int PrivateOffset = 16 * 64 + 64;
    private static readonly int PrivateFloats = (TileCols / NR) * NR * KCMax + MR * KCMax;

    private struct Ctx
    {
        public float* A; public long Lda; public bool ATrans;
        public void* B; public bool BBf16; public long Ldb; public bool BTrans;
        public float* C; public long Ldc;
        public float Alpha; public bool Accumulate; public float* Bias;
        public int M, N, K;
        // the block being worked on: columns [Jc, Jc+Nc), rows [Ic, Ic+Mc), K slices [S0, S1) of Kcs each (the last shorter)
        public int Jc, Nc, Ic, Mc, S0, S1, Kcs;
        /// <summary>Packed panels of the region's slices: slice g (from S0) at Ap + g·ASliceStride, panel p at + p·MR·kc.</summary>
        public float* Ap, Bp; public long ASliceStride, BSliceStride;
        /// <summary>Per (slice, panel) pack state, 0 = not packed, 1 = being packed, 2 = ready: the tile that first needs a panel packs it.</summary>
        public int* AFlags, BFlags; public int AFlagStride, BFlagStride;
        public int APanels, BPanels;
        public int TileRows, TileColsNow, TilesM, TilesN;
        // small-M paths
        public int NC, NBlocks, ChunkRows;
        public float* Scratch; public long ScratchStride;
        public bool CTrans;
        /// <summary>op(B) is row-major f32: full NR-wide panels are read in place (row stride Ldb), only a ragged edge panel is packed.</summary>
        public bool BDirect;
        /// <summary>The rank update as an extra K2-deep segment of the last K slice: U packed in MR panels (scaled by Scale/Alpha), op(V) in NR panels, over all of M and N.</summary>
        public float* Up, Vp; public int K2;
    }

    /// <summary>
    /// C (+)= alpha·op(A)·op(B) [+ bias] [+ update.Scale·U·op(V)]. On the packed path the update is folded into the
    /// micro-kernel as R more depth steps of the last K slice (its C tile is still in registers: no second pass over C,
    /// no second parallel region); elsewhere it runs as a second product accumulated into C.
    /// </summary>
    public static void Run(CpuBackend be, int m, int n, int k,
        float* a, long lda, bool aTrans, void* b, bool bBf16, long ldb, bool bTrans,
        float* c, long ldc, float alpha, bool accumulate, float* bias, RankUpdate update = default)
    {
        if (m == 0 || n == 0) return;
        if (update.R > 0 && (alpha == 0f || !Packed(m, n, k, aTrans, bTrans)))
        {
            Run(be, m, n, k, a, lda, aTrans, b, bBf16, ldb, bTrans, c, ldc, alpha, accumulate, bias);
            Run(be, m, n, update.R, update.U, update.LdU, false, update.V, false, update.LdV, update.VTrans, c, ldc, update.Scale, true, null);
            return;
        }
        // bf16 compute mode (GemmBf16.cs): the activation-by-weight products on AVX512_BF16 (false = not taken: f32 below)
        if (be.MatMulCompute == DType.BF16 && GemmBf16.TryRun(be, m, n, k, a, lda, aTrans, b, bBf16, ldb, bTrans, c, ldc, alpha, accumulate, bias, update)) return;
        be.EnsureScratch(ScratchFloats(k));
        var ctx = new Ctx
        {
            A = a, Lda = lda, ATrans = aTrans, B = b, BBf16 = bBf16, Ldb = ldb, BTrans = bTrans,
            C = c, Ldc = ldc, Alpha = alpha, Accumulate = accumulate, Bias = bias, M = m, N = n, K = k,
            Scratch = be.ScratchBase, ScratchStride = be.ScratchStride,
        };
        int threads = be.Threads;
        if (k == 0)
        {
            ctx.ChunkRows = 1;
            be.Pool.For(m, &ZeroKRow, &ctx);
            return;
        }
        // Few rows, weight read as rows (decode, small batches): one dot product per output, reading W once.
        if (!aTrans && bTrans && m <= 4)
        {
            ctx.NC = 64;
            ctx.NBlocks = (n + ctx.NC - 1) / ctx.NC;
            be.Pool.For(ctx.NBlocks, &SmallMBody, &ctx);
            return;
        }
        // Few rows times a row-major B (dx = dy·W for one token): axpy over the rows of B, threads over columns.
        if (!aTrans && !bTrans && m <= 4)
        {
            ctx.NC = 256;
            ctx.NBlocks = (n + ctx.NC - 1) / ctx.NC;
            be.Pool.For(ctx.NBlocks, &SmallMAxpyBody, &ctx);
            return;
        }
        // At most 16 columns (the LoRA products u = x·Aᵀ and g = dy·B): no packing of the tall A, whose rows are read
        // in place; B (k × 16) packed once by the caller; 12 rows × 16 columns per kernel call over the whole depth.
        if (Wide && n <= 16 && m > 4 && (!aTrans || m >= 12))
        {
            be.GemmBuffers(0, (long)k * 16, out _, out ctx.Bp);
            PackSkinnyB(&ctx);
            ctx.ChunkRows = 96;
            be.Pool.For((m + 95) / 96, &SkinnyBody, &ctx);
            return;
        }
        int mr = MR, nr = NR;
        ctx.BDirect = Wide && !bTrans && !bBf16;
        if (update.R > 0) PackUpdate(be, &ctx, update);
        int slices = (k + KCMax - 1) / KCMax;
        int kcs = (k + slices - 1) / slices;
        int ncMax = Math.Min(RoundUp(n, nr), NBlock);
        int mcMax = Math.Min(RoundUp(m, mr), MBlock);
        // One parallel region per (column block, row block, group of K slices): every slice of the group that fits
        // RegionFloats of packed A + B (all of K at the LoRA and LM-head shapes) runs inside one pool.For, each tile
        // task walking the slices itself and packing the panels it is the first to need.
        int group = (int)Math.Clamp(RegionFloats / ((long)(ncMax + mcMax) * kcs), 1, slices);
        ctx.Kcs = kcs;
        ctx.ASliceStride = (long)mcMax * kcs;
        ctx.BSliceStride = (long)ncMax * kcs;
        ctx.AFlagStride = mcMax / mr;
        ctx.BFlagStride = ncMax / nr;
        be.GemmBuffers(ctx.ASliceStride * group, ctx.BSliceStride * group, out ctx.Ap, out ctx.Bp);
        int* flags = be.GemmFlags(group * (ctx.AFlagStride + ctx.BFlagStride));
        ctx.AFlags = flags;
        ctx.BFlags = flags + group * ctx.AFlagStride;
        for (int jc = 0; jc < n; jc += NBlock)
        {
            int nc = Math.Min(NBlock, n - jc);
            ctx.Jc = jc; ctx.Nc = nc;
            ctx.BPanels = (nc + nr - 1) / nr;
            for (int s0 = 0; s0 < slices; s0 += group)
            {
                ctx.S0 = s0; ctx.S1 = Math.Min(slices, s0 + group);
                // B panels are packed once per (column block, slice group) and reused by every row block
                new Span<int>(ctx.BFlags, group * ctx.BFlagStride).Clear();
                for (int ic = 0; ic < m; ic += MBlock)
                {
                    int mc = Math.Min(MBlock, m - ic);
                    ctx.Ic = ic; ctx.Mc = mc;
                    ctx.APanels = (mc + mr - 1) / mr;
                    new Span<int>(ctx.AFlags, group * ctx.AFlagStride).Clear();
                    (ctx.TileRows, ctx.TilesM, ctx.TileColsNow, ctx.TilesN) = TileGrid(ctx.APanels, ctx.BPanels, mr, nr, TileCols, threads);
                    be.Pool.For(ctx.TilesM * ctx.TilesN, &TileBody, &ctx);
                }
            }
        }
    }

    /// <summary>Packed A + B floats one parallel region may hold (16 MiB): bounds the buffers for deep products (the weight gradient over 4096 rows: 3 regions).</summary>
    public const long RegionFloats = 4L << 20;

    /// <summary>Whether <see cref="Run"/> takes the packed loop nest for this shape (the others are the small-M and ≤ 16-column paths).</summary>
    private static bool Packed(int m, int n, int k, bool aTrans, bool bTrans) =>
        k > 0 && !(!aTrans && m <= 4) && !(Wide && n <= 16 && m > 4 && (!aTrans || m >= 12));

    /// <summary>
    /// Packs the rank update for the whole product, once: (Scale/Alpha)·U into MR-row panels (R deep, zero rows past M)
    /// and op(V) into NR-column panels (zero columns past N). R·(M + N) floats, single-threaded (R = 16 at 512 × 576:
    /// 17 K floats, a few microseconds against the product's milliseconds).
    /// </summary>
    private static void PackUpdate(CpuBackend be, Ctx* x, RankUpdate upd)
    {
        int mr = MR, nr = NR, r = upd.R, m = x->M, n = x->N;
        long aFloats = (long)RoundUp(m, mr) * r, bFloats = (long)RoundUp(n, nr) * r;
        float* buf = be.GemmUpdateBuffer(aFloats + bFloats);
        x->Up = buf; x->Vp = buf + aFloats; x->K2 = r;
        float f = upd.Scale / x->Alpha;
        for (int i0 = 0; i0 < m; i0 += mr)
        {
            float* d = x->Up + (long)i0 * r;
            int mv = Math.Min(mr, m - i0);
            for (int q = 0; q < r; q++)
            {
                int rr = 0;
                for (; rr < mv; rr++) d[q * mr + rr] = f * upd.U[(i0 + rr) * upd.LdU + q];
                for (; rr < mr; rr++) d[q * mr + rr] = 0f;
            }
        }
        for (int j0 = 0; j0 < n; j0 += nr)
        {
            float* d = x->Vp + (long)j0 * r;
            int nv = Math.Min(nr, n - j0);
            for (int q = 0; q < r; q++)
            {
                int cc = 0;
                if (upd.VTrans) for (; cc < nv; cc++) d[q * nr + cc] = upd.V[(j0 + cc) * upd.LdV + q];
                else for (; cc < nv; cc++) d[q * nr + cc] = upd.V[q * upd.LdV + j0 + cc];
                for (; cc < nr; cc++) d[q * nr + cc] = 0f;
            }
        }
    }

    /// <summary>
    /// dw(N,K) += alpha·dy(M,N)ᵀ·x(M,K) for N ≤ 16 (the LoRA dA = s·gᵀ·x) computed as dwᵀ = xᵀ·dy on the unpacked
    /// path, x read in place and dw written transposed; false (nothing done) where that path does not apply.
    /// </summary>
    public static bool TryWeightGradFewRows(CpuBackend be, float* dw, float* dy, float* x, int m, int n, int k, float alpha)
    {
        if (!Wide || n > 16 || n == 0 || k < 12 || m == 0) return false;
        be.EnsureScratch(ScratchFloats(m));
        var ctx = new Ctx
        {
            A = x, Lda = k, ATrans = true, B = dy, Ldb = n, BTrans = false, C = dw, Ldc = k, Alpha = alpha, Accumulate = true,
            M = k, N = n, K = m, CTrans = true, Scratch = be.ScratchBase, ScratchStride = be.ScratchStride,
        };
        be.GemmBuffers(0, (long)m * 16, out _, out ctx.Bp);
        PackSkinnyB(&ctx);
        ctx.ChunkRows = 96;
        be.Pool.For((k + 95) / 96, &SkinnyBody, &ctx);
        return true;
    }

    private static int RoundUp(int x, int r) => (x + r - 1) / r * r;

    private static void ZeroKRow(void* p, int i, int worker)
    {
        var x = (Ctx*)p;
        float* row = x->C + i * x->Ldc;
        for (int j = 0; j < x->N; j++) row[j] = (x->Accumulate ? row[j] : 0f) + (x->Bias != null ? x->Bias[j] : 0f);
    }

    private static void SmallMBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        float* scratch = x->Scratch + worker * x->ScratchStride;
        int j0 = task * x->NC, j1 = Math.Min(x->N, j0 + x->NC), k = x->K;
        for (int j = j0; j < j1; j++)
        {
            float* w;
            if (x->BBf16) { HalfConvert.Bf16ToF32((ushort*)x->B + j * x->Ldb, scratch, k); w = scratch; }
            else w = (float*)x->B + j * x->Ldb;
            var wspan = new ReadOnlySpan<float>(w, k);
            for (int i = 0; i < x->M; i++)
            {
                float d = x->Alpha * TensorPrimitives.Dot(new ReadOnlySpan<float>(x->A + i * x->Lda, k), wspan);
                float* cij = x->C + i * x->Ldc + j;
                *cij = (x->Accumulate ? *cij : 0f) + d + (x->Bias != null ? x->Bias[j] : 0f);
            }
        }
    }

    private static void SmallMAxpyBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        int j0 = task * x->NC, nj = Math.Min(x->NC, x->N - j0);
        float* acc = stackalloc float[4 * 256];
        float* row = stackalloc float[256];
        new Span<float>(acc, 4 * 256).Clear();
        for (int q = 0; q < x->K; q++)
        {
            long off = q * x->Ldb + j0;
            float* b;
            if (x->BBf16) { HalfConvert.Bf16ToF32((ushort*)x->B + off, row, nj); b = row; }
            else b = (float*)x->B + off;
            var bs = new ReadOnlySpan<float>(b, nj);
            for (int i = 0; i < x->M; i++)
            {
                var a = new Span<float>(acc + i * 256, nj);
                TensorPrimitives.MultiplyAdd(bs, x->A[i * x->Lda + q], a, a);
            }
        }
        for (int i = 0; i < x->M; i++)
        {
            float* c = x->C + i * x->Ldc + j0;
            for (int j = 0; j < nj; j++)
                c[j] = x->Alpha * acc[i * 256 + j] + (x->Accumulate ? c[j] : 0f) + (x->Bias != null ? x->Bias[j0 + j] : 0f);
        }
    }

    /// <summary>op(B) (k × n ≤ 16) into 16-wide rows, zero columns past n.</summary>
    private static void PackSkinnyB(Ctx* x)
    {
        int k = x->K, n = x->N;
        float* dst = x->Bp;
        new Span<float>(dst, k * 16).Clear();
        for (int j = 0; j < n; j++)
            for (int q = 0; q < k; q++)
            {
                long off = x->BTrans ? j * x->Ldb + q : q * x->Ldb + j;
                dst[q * 16 + j] = x->BBf16 ? BitConverter.Int32BitsToSingle(((ushort*)x->B)[off] << 16) : ((float*)x->B)[off];
            }
    }

    private static void SkinnyBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        float* tile = x->Scratch + worker * x->ScratchStride;
        int r0 = task * x->ChunkRows, r1 = Math.Min(x->M, r0 + x->ChunkRows);
        for (int i = r0; i < r1; i += 12)
        {
            int mv = Math.Min(12, r1 - i);
            float* t = tile;
            if (x->ATrans)
            {
                // a ragged last block computes the 12 rows ending at M (M >= 12) so that no read passes row M
                int i0 = Math.Min(i, x->M - 12);
                SkinnyKernelT(x->K, x->A + i0, x->Lda, x->Bp, tile);
                t = tile + (i - i0) * 16;
            }
            else SkinnyKernel(x->K, x->A + i * x->Lda, x->Lda, mv, x->Bp, tile);
            if (x->CTrans) StoreEdgeT(t, x->C + i, x->Ldc, x->Alpha, x->Accumulate, mv, x->N);
            else StoreEdge(t, 16, x->C + i * x->Ldc, x->Ldc, x->Alpha, x->Accumulate, x->Bias, mv, x->N);
        }
    }

    /// <summary>
    /// C[0..mv, 0..nv] (+)= alpha·A[0..mv, 0..k]·B(k × 16) [+ bias], A row-major read in place (rows past mv alias
    /// the last row and are not stored), 12 Vector512 accumulators, one B row load per depth step.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SkinnyKernel(int k, float* a, long lda, int mv, float* b, float* tile)
    {
        float* a0 = a, a1 = a + Math.Min(1, mv - 1) * lda, a2 = a + Math.Min(2, mv - 1) * lda, a3 = a + Math.Min(3, mv - 1) * lda,
            a4 = a + Math.Min(4, mv - 1) * lda, a5 = a + Math.Min(5, mv - 1) * lda, a6 = a + Math.Min(6, mv - 1) * lda,
            a7 = a + Math.Min(7, mv - 1) * lda, a8 = a + Math.Min(8, mv - 1) * lda, a9 = a + Math.Min(9, mv - 1) * lda,
            a10 = a + Math.Min(10, mv - 1) * lda, a11 = a + Math.Min(11, mv - 1) * lda;
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default,
            c6 = default, c7 = default, c8 = default, c9 = default, c10 = default, c11 = default;
        for (int q = 0; q < k; q++)
        {
            var bv = Vector512.Load(b + q * 16);
            c0 = Vector512.FusedMultiplyAdd(Vector512.Create(a0[q]), bv, c0);
            c1 = Vector512.FusedMultiplyAdd(Vector512.Create(a1[q]), bv, c1);
            c2 = Vector512.FusedMultiplyAdd(Vector512.Create(a2[q]), bv, c2);
            c3 = Vector512.FusedMultiplyAdd(Vector512.Create(a3[q]), bv, c3);
            c4 = Vector512.FusedMultiplyAdd(Vector512.Create(a4[q]), bv, c4);
            c5 = Vector512.FusedMultiplyAdd(Vector512.Create(a5[q]), bv, c5);
            c6 = Vector512.FusedMultiplyAdd(Vector512.Create(a6[q]), bv, c6);
            c7 = Vector512.FusedMultiplyAdd(Vector512.Create(a7[q]), bv, c7);
            c8 = Vector512.FusedMultiplyAdd(Vector512.Create(a8[q]), bv, c8);
            c9 = Vector512.FusedMultiplyAdd(Vector512.Create(a9[q]), bv, c9);
            c10 = Vector512.FusedMultiplyAdd(Vector512.Create(a10[q]), bv, c10);
            c11 = Vector512.FusedMultiplyAdd(Vector512.Create(a11[q]), bv, c11);
        }
        c0.Store(tile); c1.Store(tile + 16); c2.Store(tile + 32); c3.Store(tile + 48); c4.Store(tile + 64); c5.Store(tile + 80);
        c6.Store(tile + 96); c7.Store(tile + 112); c8.Store(tile + 128); c9.Store(tile + 144); c10.Store(tile + 160); c11.Store(tile + 176);
    }

    /// <summary>
    /// tile(12 × 16) = Σ_q A(·, q)·B(q, ·) with A transposed in memory: A(r, q) = a[q·lda + r], the 12 values of a depth
    /// step contiguous (dy rows for dB = dyᵀ·u; x rows for dAᵀ = xᵀ·g). Reads 12 values per step: the caller shifts
    /// a ragged last block back so that they all exist.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void SkinnyKernelT(int k, float* a, long lda, float* b, float* tile)
    {
        Vector512<float> c0 = default, c1 = default, c2 = default, c3 = default, c4 = default, c5 = default,
            c6 = default, c7 = default, c8 = default, c9 = default, c10 = default, c11 = default;
        for (int q = 0; q < k; q++)
        {
            var bv = Vector512.Load(b + q * 16);
            float* ap = a + q * lda;
            c0 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[0]), bv, c0);
            c1 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[1]), bv, c1);
            c2 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[2]), bv, c2);
            c3 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[3]), bv, c3);
            c4 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[4]), bv, c4);
            c5 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[5]), bv, c5);
            c6 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[6]), bv, c6);
            c7 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[7]), bv, c7);
            c8 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[8]), bv, c8);
            c9 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[9]), bv, c9);
            c10 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[10]), bv, c10);
            c11 = Vector512.FusedMultiplyAdd(Vector512.Create(ap[11]), bv, c11);
        }
        c0.Store(tile); c1.Store(tile + 16); c2.Store(tile + 32); c3.Store(tile + 48); c4.Store(tile + 64); c5.Store(tile + 80);
        c6.Store(tile + 96); c7.Store(tile + 112); c8.Store(tile + 128); c9.Store(tile + 144); c10.Store(tile + 160); c11.Store(tile + 176);
    }

    /// <summary>C stored transposed: C[j·ldc + r] (+)= alpha·tile[r·16 + j] (dA from dAᵀ = xᵀ·g).</summary>
    private static void StoreEdgeT(float* tile, float* c, long ldc, float alpha, bool beta, int mv, int nv)
    {
        for (int j = 0; j < nv; j++)
        {
            float* col = c + j * ldc;
            for (int r = 0; r < mv; r++) col[r] = alpha * tile[r * 16 + j] + (beta ? col[r] : 0f);
        }
    }

    /// <summary>
    /// Panel pack states: the first thread to need a panel claims it (0 → 1), packs it and publishes it (→ 2).
    /// TryClaim: true when the caller must pack it now; false when it is ready or being packed by another thread
    /// (then the caller packs a private copy: nobody ever waits on another thread inside a region).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool TryClaim(int* flag) => Volatile.Read(ref *flag) == 0 && Interlocked.CompareExchange(ref *flag, 1, 0) == 0;

    /// <summary>Rows [Ic + panel·MR, +MR) of op(A), depth [pc, pc+kc), p-major inside the panel (at dst), zero rows past M.</summary>
    private static void PackAPanel(Ctx* x, int panel, int pc, int kc, float* dst)
    {
        int mr = MR;
        int i0 = x->Ic + panel * mr;
        int mv = Math.Min(mr, x->Ic + x->Mc - i0);
        if (!x->ATrans)
        {
            // A transpose. The MR source rows are read a 16-float line at a time, all MR lines of a block first (MR
            // misses in flight instead of one row's stream at a time: the row-by-row loop was memory-latency bound,
            // ~15% of a 4096×576×576 product), through a 16×MR tile on the stack that stays in L1.
            float* t = stackalloc float[16 * 16];
            int q0 = 0;
            if (Vector512.IsHardwareAccelerated && mv == mr)
            {
                for (; q0 + 16 <= kc; q0 += 16)
                {
                    for (int r = 0; r < mr; r++) Vector512.Load(x->A + (i0 + r) * x->Lda + pc + q0).Store(t + r * 16);
                    float* d = dst + q0 * mr;
                    for (int q = 0; q < 16; q++)
                        for (int r = 0; r < mr; r++) d[q * mr + r] = t[r * 16 + q];
                }
            }
            for (int r = 0; r < mv; r++)
            {
                float* src = x->A + (i0 + r) * x->Lda + pc;
                for (int q = q0; q < kc; q++) dst[q * mr + r] = src[q];
            }
            for (int r = mv; r < mr; r++)
                for (int q = q0; q < kc; q++) dst[q * mr + r] = 0f;
        }
        else
        {
            if (mv == 12)
            {
                // one 12-float row of the panel per depth step: an 8-wide and a 4-wide vector copy (v2c)
                for (int q = 0; q < kc; q++)
                {
                    float* src = x->A + (pc + q) * x->Lda + i0;
                    float* d = dst + q * 12;
                    Vector256.Load(src).Store(d);
                    Vector128.Load(src + 8).Store(d + 8);
                }
                return;
            }
            for (int q = 0; q < kc; q++)
            {
                float* src = x->A + (pc + q) * x->Lda + i0;
                float* d = dst + q * mr;
                int r = 0;
                for (; r < mv; r++) d[r] = src[r];
                for (; r < mr; r++) d[r] = 0f;
            }
        }
    }

    /// <summary>Columns [Jc + panel·NR, +NR) of op(B), depth [pc, pc+kc), p-major inside the panel (at dst), zero columns past N.</summary>
    private static void PackBPanel(Ctx* x, int panel, int pc, int kc, float* dst)
    {
        int nr = NR;
        int j0 = x->Jc + panel * nr;
        int nv = Math.Min(nr, x->Jc + x->Nc - j0);
        if (!x->BTrans)
        {
            for (int q = 0; q < kc; q++)
            {
                long off = (pc + q) * x->Ldb + j0;
                float* d = dst + q * nr;
                if (x->BBf16) HalfConvert.Bf16ToF32((ushort*)x->B + off, d, nv);
                else Buffer.MemoryCopy((float*)x->B + off, d, nv * 4, nv * 4);
                for (int cc = nv; cc < nr; cc++) d[cc] = 0f;
            }
        }
        else
        {
            // A transpose, q in blocks of 16: the NR source lines of a block are loaded first (NR misses in flight) into
            // an NR×16 tile on the stack, then written transposed into the 16 rows of the panel, all in L1. Column by
            // column over the whole depth (v2) revisited a kc·128 B panel NR times and was latency bound.
            if (nv < nr) new Span<float>(dst, kc * nr).Clear();
            float* t = stackalloc float[32 * 16];
            int q0 = 0;
            if (Vector512.IsHardwareAccelerated)
            {
                for (; q0 + 16 <= kc; q0 += 16)
                {
                    for (int cc = 0; cc < nv; cc++)
                    {
                        long off = (j0 + cc) * x->Ldb + pc + q0;
                        if (x->BBf16)
                        {
                            var (lo, hi) = Vector256.Widen(Vector256.Load((ushort*)x->B + off));
                            Vector512.ShiftLeft(Vector512.Create(lo, hi), 16).AsSingle().Store(t + cc * 16);
                        }
                        else Vector512.Load((float*)x->B + off).Store(t + cc * 16);
                    }
                    float* d = dst + q0 * nr;
                    for (int q = 0; q < 16; q++)
                        for (int cc = 0; cc < nv; cc++) d[q * nr + cc] = t[cc * 16 + q];
                }
            }
            for (int cc = 0; cc < nv; cc++)
            {
                long off = (j0 + cc) * x->Ldb + pc;
                float* d = dst + cc;
                if (x->BBf16)
                {
                    ushort* src = (ushort*)x->B + off;
                    for (int q = q0; q < kc; q++) d[q * nr] = BitConverter.Int32BitsToSingle(src[q] << 16);
                }
                else
                {
                    float* src = (float*)x->B + off;
                    for (int q = q0; q < kc; q++) d[q * nr] = src[q];
                }
            }
        }
    }

    private static void TileBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        int mr = MR, nr = NR;
        // column-major tile order: the threads work down the same columns (sharing B panels, which stay in L2 across
        // a thread's consecutive tiles) on different rows (each row's A panels packed by one of them, no waiting)
        int tm = task % x->TilesM, tn = task / x->TilesM;
        int r0 = tm * x->TileRows, r1 = Math.Min(x->Mc, r0 + x->TileRows);
        int c0 = tn * x->TileColsNow, c1 = Math.Min(x->Nc, c0 + x->TileColsNow);
        float* tile = x->Scratch + worker * x->ScratchStride;
        float* priv = tile + PrivateOffset;
        float** bPtr = stackalloc float*[TileCols / 16];
        float alpha = x->Alpha;
        for (int s = x->S0; s < x->S1; s++)
        {
            int g = s - x->S0, pc = s * x->Kcs, kc = Math.Min(x->Kcs, x->K - pc);
            bool beta = pc > 0 || x->Accumulate;
            float* biasNow = pc == 0 ? x->Bias : null;
            int k2 = pc + kc == x->K ? x->K2 : 0;
            float* ap = x->Ap + g * x->ASliceStride, bp = x->Bp + g * x->BSliceStride;
            int* aFlags = x->AFlags + g * x->AFlagStride, bFlags = x->BFlags + g * x->BFlagStride;
            // the tile's B panels of this slice (a full panel of a row-major f32 B is read in place): pack every one
            // nobody has claimed; one that another thread is still packing after that gets a private copy (no waiting)
            for (int jr = c0; jr < c1; jr += nr)
            {
                int panel = jr / nr;
                bPtr[(jr - c0) / nr] = bp + (long)panel * nr * kc;
                if (x->BDirect && jr + nr <= x->Nc) continue;
                if (TryClaim(bFlags + panel))
                {
                    PackBPanel(x, panel, pc, kc, bp + (long)panel * nr * kc);
                    Volatile.Write(ref bFlags[panel], 2);
                }
            }
            for (int jr = c0; jr < c1; jr += nr)
            {
                int panel = jr / nr, t = (jr - c0) / nr;
                if ((x->BDirect && jr + nr <= x->Nc) || Volatile.Read(ref bFlags[panel]) == 2) continue;
                bPtr[t] = priv + (long)t * nr * KCMax;
                PackBPanel(x, panel, pc, kc, bPtr[t]);
            }
            for (int ir = r0; ir < r1; ir += mr)
            {
                int mv = Math.Min(mr, r1 - ir);
                int panelA = ir / mr;
                float* aPanel = ap + (long)panelA * mr * kc;
                if (TryClaim(aFlags + panelA))
                {
                    PackAPanel(x, panelA, pc, kc, aPanel);
                    Volatile.Write(ref aFlags[panelA], 2);
                }
                else if (Volatile.Read(ref aFlags[panelA]) != 2)
                {
                    aPanel = priv + (TileCols / NR) * NR * KCMax;
                    PackAPanel(x, panelA, pc, kc, aPanel);
                }
                float* cRow = x->C + (x->Ic + ir) * x->Ldc + x->Jc;
                float* a2 = k2 > 0 ? x->Up + (long)(x->Ic + ir) * k2 : null;
                for (int jr = c0; jr < c1; jr += nr)
                {
                    int nv = Math.Min(nr, c1 - jr);
                    float* bPanel = bPtr[(jr - c0) / nr];
                    float* biasJ = biasNow != null ? biasNow + x->Jc + jr : null;
                    float* b2 = k2 > 0 ? x->Vp + (long)(x->Jc + jr) * k2 : null;
                    if (Wide)
                    {
                        long bStride = 32;
                        if (x->BDirect && nv == 32) { bPanel = (float*)x->B + pc * x->Ldb + x->Jc + jr; bStride = x->Ldb; }
                        Kernel512(kc, aPanel, bPanel, bStride, k2, a2, b2, cRow + jr, x->Ldc, alpha, beta, biasJ, mv, nv, tile);
                    }
                    else Kernel256(kc, aPanel, bPanel, k2, a2, b2, cRow + jr, x->Ldc, alpha, beta, biasJ, mv, nv, tile);
                }
            }
        }
    }

    /// <summary>
    /// 12×32 tile: C[0..12, 0..32] (+)= alpha·(Σ_q a[q·12 + r]·b[q·bStride + j] + Σ_q a2[q·12 + r]·b2[q·32 + j]) [+ bias]
    /// (bStride 32 for a packed panel); the second, k2-deep segment (packed rank update, 0 for none) runs through the
    /// same loop with its own pointers.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel512(int kc, float* a, float* b, long bStride, int k2, float* a2, float* b2, float* c, long ldc, float alpha, bool beta, float* bias, int mv, int nv, float* tile)
    {
        Vector512<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default,
            c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default,
            c60 = default, c61 = default, c70 = default, c71 = default, c80 = default, c81 = default,
            c90 = default, c91 = default, ca0 = default, ca1 = default, cb0 = default, cb1 = default;
        while (true)
        {
            for (int q = 0; q < kc; q++)
            {
                var b0 = Vector512.Load(b);
                var b1 = Vector512.Load(b + 16);
                var av = Vector512.Create(a[0]);
                c00 = Vector512.FusedMultiplyAdd(av, b0, c00); c01 = Vector512.FusedMultiplyAdd(av, b1, c01);
                av = Vector512.Create(a[1]);
                c10 = Vector512.FusedMultiplyAdd(av, b0, c10); c11 = Vector512.FusedMultiplyAdd(av, b1, c11);
                av = Vector512.Create(a[2]);
                c20 = Vector512.FusedMultiplyAdd(av, b0, c20); c21 = Vector512.FusedMultiplyAdd(av, b1, c21);
                av = Vector512.Create(a[3]);
                c30 = Vector512.FusedMultiplyAdd(av, b0, c30); c31 = Vector512.FusedMultiplyAdd(av, b1, c31);
                av = Vector512.Create(a[4]);
                c40 = Vector512.FusedMultiplyAdd(av, b0, c40); c41 = Vector512.FusedMultiplyAdd(av, b1, c41);
                av = Vector512.Create(a[5]);
                c50 = Vector512.FusedMultiplyAdd(av, b0, c50); c51 = Vector512.FusedMultiplyAdd(av, b1, c51);
                av = Vector512.Create(a[6]);
                c60 = Vector512.FusedMultiplyAdd(av, b0, c60); c61 = Vector512.FusedMultiplyAdd(av, b1, c61);
                av = Vector512.Create(a[7]);
                c70 = Vector512.FusedMultiplyAdd(av, b0, c70); c71 = Vector512.FusedMultiplyAdd(av, b1, c71);
                av = Vector512.Create(a[8]);
                c80 = Vector512.FusedMultiplyAdd(av, b0, c80); c81 = Vector512.FusedMultiplyAdd(av, b1, c81);
                av = Vector512.Create(a[9]);
                c90 = Vector512.FusedMultiplyAdd(av, b0, c90); c91 = Vector512.FusedMultiplyAdd(av, b1, c91);
                av = Vector512.Create(a[10]);
                ca0 = Vector512.FusedMultiplyAdd(av, b0, ca0); ca1 = Vector512.FusedMultiplyAdd(av, b1, ca1);
                av = Vector512.Create(a[11]);
                cb0 = Vector512.FusedMultiplyAdd(av, b0, cb0); cb1 = Vector512.FusedMultiplyAdd(av, b1, cb1);
                a += 12; b += bStride;
            }
            if (k2 == 0) break;
            a = a2; b = b2; bStride = 32; kc = k2; k2 = 0;
        }
        if (mv == 12 && nv == 32)
        {
            var al = Vector512.Create(alpha);
            Store512(c, c00, c01, al, beta, bias);
            Store512(c + ldc, c10, c11, al, beta, bias);
            Store512(c + 2 * ldc, c20, c21, al, beta, bias);
            Store512(c + 3 * ldc, c30, c31, al, beta, bias);
            Store512(c + 4 * ldc, c40, c41, al, beta, bias);
            Store512(c + 5 * ldc, c50, c51, al, beta, bias);
            Store512(c + 6 * ldc, c60, c61, al, beta, bias);
            Store512(c + 7 * ldc, c70, c71, al, beta, bias);
            Store512(c + 8 * ldc, c80, c81, al, beta, bias);
            Store512(c + 9 * ldc, c90, c91, al, beta, bias);
            Store512(c + 10 * ldc, ca0, ca1, al, beta, bias);
            Store512(c + 11 * ldc, cb0, cb1, al, beta, bias);
            return;
        }
        c00.Store(tile); c01.Store(tile + 16); c10.Store(tile + 32); c11.Store(tile + 48);
        c20.Store(tile + 64); c21.Store(tile + 80); c30.Store(tile + 96); c31.Store(tile + 112);
        c40.Store(tile + 128); c41.Store(tile + 144); c50.Store(tile + 160); c51.Store(tile + 176);
        c60.Store(tile + 192); c61.Store(tile + 208); c70.Store(tile + 224); c71.Store(tile + 240);
        c80.Store(tile + 256); c81.Store(tile + 272); c90.Store(tile + 288); c91.Store(tile + 304);
        ca0.Store(tile + 320); ca1.Store(tile + 336); cb0.Store(tile + 352); cb1.Store(tile + 368);
        StoreEdge(tile, 32, c, ldc, alpha, beta, bias, mv, nv);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store512(float* c, Vector512<float> v0, Vector512<float> v1, Vector512<float> al, bool beta, float* bias)
    {
        v0 *= al; v1 *= al;
        if (beta) { v0 += Vector512.Load(c); v1 += Vector512.Load(c + 16); }
        if (bias != null) { v0 += Vector512.Load(bias); v1 += Vector512.Load(bias + 16); }
        v0.Store(c); v1.Store(c + 16);
    }

    /// <summary>6×16 tile on Vector256 (no AVX-512): 12 accumulators of the 16 ymm registers.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel256(int kc, float* a, float* b, int k2, float* aU, float* bU, float* c, long ldc, float alpha, bool beta, float* bias, int mv, int nv, float* tile)
    {
        Vector256<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default,
            c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default;
        while (true)
        {
            for (int q = 0; q < kc; q++)
            {
                var b0 = Vector256.Load(b);
                var b1 = Vector256.Load(b + 8);
                var a0 = Vector256.Create(a[0]);
                c00 = Vector256.FusedMultiplyAdd(a0, b0, c00); c01 = Vector256.FusedMultiplyAdd(a0, b1, c01);
                var a1 = Vector256.Create(a[1]);
                c10 = Vector256.FusedMultiplyAdd(a1, b0, c10); c11 = Vector256.FusedMultiplyAdd(a1, b1, c11);
                var a2 = Vector256.Create(a[2]);
                c20 = Vector256.FusedMultiplyAdd(a2, b0, c20); c21 = Vector256.FusedMultiplyAdd(a2, b1, c21);
                var a3 = Vector256.Create(a[3]);
                c30 = Vector256.FusedMultiplyAdd(a3, b0, c30); c31 = Vector256.FusedMultiplyAdd(a3, b1, c31);
                var a4 = Vector256.Create(a[4]);
                c40 = Vector256.FusedMultiplyAdd(a4, b0, c40); c41 = Vector256.FusedMultiplyAdd(a4, b1, c41);
                var a5 = Vector256.Create(a[5]);
                c50 = Vector256.FusedMultiplyAdd(a5, b0, c50); c51 = Vector256.FusedMultiplyAdd(a5, b1, c51);
                a += 6; b += 16;
            }
            if (k2 == 0) break;
            a = aU; b = bU; kc = k2; k2 = 0;
        }
        c00.Store(tile); c01.Store(tile + 8); c10.Store(tile + 16); c11.Store(tile + 24);
        c20.Store(tile + 32); c21.Store(tile + 40); c30.Store(tile + 48); c31.Store(tile + 56);
        c40.Store(tile + 64); c41.Store(tile + 72); c50.Store(tile + 80); c51.Store(tile + 88);
        StoreEdge(tile, 16, c, ldc, alpha, beta, bias, mv, nv);
    }

    private static void StoreEdge(float* tile, int nr, float* c, long ldc, float alpha, bool beta, float* bias, int mv, int nv)
    {
        for (int r = 0; r < mv; r++)
        {
            float* row = c + r * ldc;
            for (int j = 0; j < nv; j++)
                row[j] = alpha * tile[r * nr + j] + (beta ? row[j] : 0f) + (bias != null ? bias[j] : 0f);
        }
    }
}
