using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench.Variants;

/// <summary>
/// VARIANT 1 (main until 2026-11-29, kept for comparison): MR×NR = 6×32, KC=128, MC=96, NC≤256; every (column block × row chunk)
/// task packs its own B and A with scalar loops. Measured: see bench/Variants/README.md.
/// 
/// Packed, cache-blocked single-precision GEMM (the BLIS loop nest) behind every matmul of the CPU backend:
/// C(M,N) = (accumulate ? C : 0) + alpha·op(A)(M,K)·op(B)(K,N) [+ bias(N)], f32 accumulation.
/// </summary>
/// <remarks>
/// op(A)(i,p) = aTrans ? A[p·lda + i] : A[i·lda + p] (f32); op(B)(p,j) = bTrans ? B[j·ldb + p] : B[p·ldb + j]
/// (f32 or bf16, converted while packing). The three nn.Linear products map onto it as
/// forward y = x·Wᵀ (bTrans), input gradient dx = dy·W, weight gradient dW += dyᵀ·x (aTrans).
/// Loop nest: tasks = (column block of NC) × (row chunk); per task, for each KC slice, B is packed once into
/// NR-wide panels and reused by every MC block of A packed into MR-tall panels; the MR×NR micro-kernel keeps
/// its tile of C in registers (12 Vector512 accumulators, or 12 Vector256 without AVX-512).
/// KC = 128 keeps one B micro-panel (128·32·4 B = 16 KiB) in a 32 KiB L1 next to the A micro-panel.
/// </remarks>
internal static unsafe class GemmV1
{
    public const int MR = 6;
    public static readonly int NR = Vector512.IsHardwareAccelerated ? 32 : 16;
    public const int KC = 128;
    public const int MC = 96;
    public const int NCMax = 256;

    /// <summary>Floats of per-thread scratch one GEMM needs.</summary>
    public static long ScratchFloats(int k) => (long)MC * KC + (long)KC * (NCMax + 32) + MR * 32 + Math.Max(k, 1) + 64;

    private struct Ctx
    {
        public float* A; public long Lda; public bool ATrans;
        public void* B; public bool BBf16; public long Ldb; public bool BTrans;
        public float* C; public long Ldc;
        public float Alpha; public bool Accumulate; public float* Bias;
        public int M, N, K;
        public int NC, NBlocks, ChunkRows;
        public float* Scratch; public long ScratchStride;
    }

    public static void Run(CpuBackend be, int m, int n, int k,
        float* a, long lda, bool aTrans, void* b, bool bBf16, long ldb, bool bTrans,
        float* c, long ldc, float alpha, bool accumulate, float* bias)
    {
        if (m == 0 || n == 0) return;
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
        int nr = NR;
        int nBlocks = (n + NCMax - 1) / NCMax;
        int nc = RoundUp((n + nBlocks - 1) / nBlocks, nr);
        nBlocks = (n + nc - 1) / nc;
        int want = Math.Max(1, (4 * threads + nBlocks - 1) / nBlocks);
        int mChunks = Math.Min(want, (m + MR - 1) / MR);
        if (threads == 1) mChunks = 1;
        int chunkRows = RoundUp((m + mChunks - 1) / mChunks, MR);
        mChunks = (m + chunkRows - 1) / chunkRows;
        ctx.NC = nc; ctx.NBlocks = nBlocks; ctx.ChunkRows = chunkRows;
        be.Pool.For(nBlocks * mChunks, &TaskBody, &ctx);
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

    private static void TaskBody(void* p, int task, int worker)
    {
        var x = (Ctx*)p;
        int nr = NR;
        int jb = task % x->NBlocks, mb = task / x->NBlocks;
        int jc = jb * x->NC, nc = Math.Min(x->NC, x->N - jc);
        int i0 = mb * x->ChunkRows, i1 = Math.Min(x->M, i0 + x->ChunkRows);
        float* ap = x->Scratch + worker * x->ScratchStride;
        float* bp = ap + MC * KC;
        float* tile = bp + KC * (NCMax + 32);
        for (int pc = 0; pc < x->K; pc += KC)
        {
            int kc = Math.Min(KC, x->K - pc);
            PackB(x, bp, pc, kc, jc, nc, nr);
            bool beta = pc > 0 || x->Accumulate;
            float* bias = pc == 0 ? x->Bias : null;
            for (int ic = i0; ic < i1; ic += MC)
            {
                int mc = Math.Min(MC, i1 - ic);
                PackA(x, ap, ic, mc, pc, kc);
                for (int jr = 0; jr < nc; jr += nr)
                {
                    int nv = Math.Min(nr, nc - jr);
                    float* bPanel = bp + jr * kc;
                    float* biasJ = bias != null ? bias + jc + jr : null;
                    for (int ir = 0; ir < mc; ir += MR)
                    {
                        int mv = Math.Min(MR, mc - ir);
                        float* cTile = x->C + (ic + ir) * x->Ldc + jc + jr;
                        if (nr == 32) Kernel512(kc, ap + ir * kc, bPanel, cTile, x->Ldc, x->Alpha, beta, biasJ, mv, nv, tile);
                        else Kernel256(kc, ap + ir * kc, bPanel, cTile, x->Ldc, x->Alpha, beta, biasJ, mv, nv, tile);
                    }
                }
            }
        }
    }

    /// <summary>A[ic:ic+mc, pc:pc+kc] into MR-tall panels, p-major inside a panel, zero rows past the edge.</summary>
    private static void PackA(Ctx* x, float* ap, int ic, int mc, int pc, int kc)
    {
        for (int ir = 0; ir < mc; ir += MR)
        {
            int mv = Math.Min(MR, mc - ir);
            float* dst = ap + ir * kc;
            if (!x->ATrans)
            {
                for (int r = 0; r < mv; r++)
                {
                    float* src = x->A + (ic + ir + r) * x->Lda + pc;
                    for (int q = 0; q < kc; q++) dst[q * MR + r] = src[q];
                }
                for (int r = mv; r < MR; r++)
                    for (int q = 0; q < kc; q++) dst[q * MR + r] = 0f;
            }
            else
            {
                for (int q = 0; q < kc; q++)
                {
                    float* src = x->A + (pc + q) * x->Lda + ic + ir;
                    float* d = dst + q * MR;
                    int r = 0;
                    for (; r < mv; r++) d[r] = src[r];
                    for (; r < MR; r++) d[r] = 0f;
                }
            }
        }
    }

    /// <summary>B[pc:pc+kc, jc:jc+nc] into NR-wide panels, p-major inside a panel, zero columns past the edge.</summary>
    private static void PackB(Ctx* x, float* bp, int pc, int kc, int jc, int nc, int nr)
    {
        for (int jr = 0; jr < nc; jr += nr)
        {
            int nv = Math.Min(nr, nc - jr);
            float* dst = bp + jr * kc;
            if (!x->BTrans)
            {
                for (int q = 0; q < kc; q++)
                {
                    long off = (pc + q) * x->Ldb + jc + jr;
                    float* d = dst + q * nr;
                    if (x->BBf16) HalfConvert.Bf16ToF32((ushort*)x->B + off, d, nv);
                    else Buffer.MemoryCopy((float*)x->B + off, d, nv * 4, nv * 4);
                    for (int cc = nv; cc < nr; cc++) d[cc] = 0f;
                }
            }
            else
            {
                if (nv < nr) new Span<float>(dst, kc * nr).Clear();
                for (int cc = 0; cc < nv; cc++)
                {
                    long off = (jc + jr + cc) * x->Ldb + pc;
                    if (x->BBf16)
                    {
                        ushort* src = (ushort*)x->B + off;
                        for (int q = 0; q < kc; q++) dst[q * nr + cc] = BitConverter.Int32BitsToSingle(src[q] << 16);
                    }
                    else
                    {
                        float* src = (float*)x->B + off;
                        for (int q = 0; q < kc; q++) dst[q * nr + cc] = src[q];
                    }
                }
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel512(int kc, float* a, float* b, float* c, long ldc, float alpha, bool beta, float* bias, int mv, int nv, float* tile)
    {
        Vector512<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default,
            c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default;
        for (int q = 0; q < kc; q++)
        {
            var b0 = Vector512.Load(b);
            var b1 = Vector512.Load(b + 16);
            var a0 = Vector512.Create(a[0]);
            c00 = Vector512.FusedMultiplyAdd(a0, b0, c00); c01 = Vector512.FusedMultiplyAdd(a0, b1, c01);
            var a1 = Vector512.Create(a[1]);
            c10 = Vector512.FusedMultiplyAdd(a1, b0, c10); c11 = Vector512.FusedMultiplyAdd(a1, b1, c11);
            var a2 = Vector512.Create(a[2]);
            c20 = Vector512.FusedMultiplyAdd(a2, b0, c20); c21 = Vector512.FusedMultiplyAdd(a2, b1, c21);
            var a3 = Vector512.Create(a[3]);
            c30 = Vector512.FusedMultiplyAdd(a3, b0, c30); c31 = Vector512.FusedMultiplyAdd(a3, b1, c31);
            var a4 = Vector512.Create(a[4]);
            c40 = Vector512.FusedMultiplyAdd(a4, b0, c40); c41 = Vector512.FusedMultiplyAdd(a4, b1, c41);
            var a5 = Vector512.Create(a[5]);
            c50 = Vector512.FusedMultiplyAdd(a5, b0, c50); c51 = Vector512.FusedMultiplyAdd(a5, b1, c51);
            a += MR; b += 32;
        }
        if (mv == MR && nv == 32)
        {
            Store512(c, c00, c01, alpha, beta, bias);
            Store512(c + ldc, c10, c11, alpha, beta, bias);
            Store512(c + 2 * ldc, c20, c21, alpha, beta, bias);
            Store512(c + 3 * ldc, c30, c31, alpha, beta, bias);
            Store512(c + 4 * ldc, c40, c41, alpha, beta, bias);
            Store512(c + 5 * ldc, c50, c51, alpha, beta, bias);
            return;
        }
        c00.Store(tile); c01.Store(tile + 16); c10.Store(tile + 32); c11.Store(tile + 48);
        c20.Store(tile + 64); c21.Store(tile + 80); c30.Store(tile + 96); c31.Store(tile + 112);
        c40.Store(tile + 128); c41.Store(tile + 144); c50.Store(tile + 160); c51.Store(tile + 176);
        StoreEdge(tile, 32, c, ldc, alpha, beta, bias, mv, nv);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store512(float* c, Vector512<float> v0, Vector512<float> v1, float alpha, bool beta, float* bias)
    {
        var al = Vector512.Create(alpha);
        v0 *= al; v1 *= al;
        if (beta) { v0 += Vector512.Load(c); v1 += Vector512.Load(c + 16); }
        if (bias != null) { v0 += Vector512.Load(bias); v1 += Vector512.Load(bias + 16); }
        v0.Store(c); v1.Store(c + 16);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Kernel256(int kc, float* a, float* b, float* c, long ldc, float alpha, bool beta, float* bias, int mv, int nv, float* tile)
    {
        Vector256<float> c00 = default, c01 = default, c10 = default, c11 = default, c20 = default, c21 = default,
            c30 = default, c31 = default, c40 = default, c41 = default, c50 = default, c51 = default;
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
            a += MR; b += 16;
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
