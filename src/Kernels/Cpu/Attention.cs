using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

// Causal grouped-query attention; reference: AttentionReference.
public sealed unsafe partial class CpuBackend
{
    private struct AttnCtx
    {
        public float* O, Lse, Q, K, V, DQ, DK, DV, DO, D;
        public int B, Tq, Tkv, KvLen, NH, NKV, HS, Group, RowBlocks;
        public float Scale;
        public float* Scratch; public long Stride;
    }

    private float* _attnD;
    private long _attnDLength;
    private float* _attnWide;     // f32 copies of bf16/f16 q, k, v (grown once to the largest call, then reused)
    private long _attnWideLength;

    /// <summary>
    /// q, k and v as f32 pointers: f32 tensors as they are; bf16/f16 ones widened (exactly) into one backend-owned
    /// buffer, in parallel chunks, so the blocked kernels below see f32 and the numbers equal an f32 call on the
    /// rounded values (PyTorch's bf16 SDPA: bf16 inputs, f32 accumulation and softmax).
    /// </summary>
    private void AttnInputs(string op, Tensor q, long qn, Tensor k, Tensor v, long kn, out float* pq, out float* pk, out float* pv)
    {
        long wide = Widened(op, q, qn, "q") + Widened(op, k, kn, "k") + Widened(op, v, kn, "v");
        if (wide > _attnWideLength)
        {
            if (_attnWide != null) NativeMemory.AlignedFree(_attnWide);
            _attnWide = (float*)NativeMemory.AlignedAlloc((nuint)(wide * sizeof(float)), 64);
            _attnWideLength = wide;
        }
        long at = 0;
        pq = Widen(q, qn, "q", ref at);
        pk = Widen(k, kn, "k", ref at);
        pv = Widen(v, kn, "v", ref at);
    }

    /// <summary>Checks one attention input; returns the floats its widened copy takes (0 for f32).</summary>
    private long Widened(string op, Tensor t, long n, string name)
    {
        Ptr(t, name);
        if (t.DType is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"{op}: {name} {t.Describe()} must be f32, bf16 or f16", name);
        CheckLength(t, n, name, op);
        return t.DType == DType.F32 ? 0 : (n + 15) & ~15L;
    }

    private float* Widen(Tensor t, long n, string name, ref long at)
    {
        if (t.DType == DType.F32) return (float*)Ptr(t, name);
        float* dst = _attnWide + at;
        var ctx = new WidenCtx { Src = (ushort*)Ptr(t, name), Dst = dst, N = n, F16 = t.DType == DType.F16 };
        _pool.For((int)((n + WidenChunk - 1) / WidenChunk), &WidenBody, &ctx);
        at += (n + 15) & ~15L;
        return dst;
    }

    private struct WidenCtx
    {
        public ushort* Src;
        public float* Dst;
        public long N;
        public bool F16;
    }

    private const int WidenChunk = 1 << 15;

    private static void WidenBody(void* p, int task, int worker)
    {
        var c = (WidenCtx*)p;
        long i0 = (long)task * WidenChunk, n = Math.Min(WidenChunk, c->N - i0);
        if (c->F16) HalfConvert.F16ToF32(c->Src + i0, c->Dst + i0, n);
        else HalfConvert.Bf16ToF32(c->Src + i0, c->Dst + i0, n);
    }

    private static void CheckAttention(string op, int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize)
    {
        Dims(op, (nameof(batch), batch), (nameof(tq), tq), (nameof(tkv), tkv), (nameof(kvLen), kvLen), (nameof(headSize), headSize));
        if (nHeads <= 0 || nKvHeads <= 0 || nHeads % nKvHeads != 0)
            throw new ArgumentException($"{op}: NH={nHeads} must be a positive multiple of NKV={nKvHeads}");
        if (kvLen > tkv || tq > kvLen) throw new ArgumentException($"{op}: need Tq={tq} <= kvLen={kvLen} <= Tkv={tkv}");
    }

    /// <summary>
    /// Causal GQA: out(B,Tq,NH,HS) = softmax(scale·q·kᵀ)·v over keys 0..kvLen-Tq+t. Saves lse(B,NH,Tq) = log Σ exp(score),
    /// one float per row, from which the backward rebuilds every probability without storing the T×T matrix.
    /// </summary>
    /// <remarks>Blocked online softmax (flash-attention style): per-thread scratch of O(16·64 + HS·64) floats, never T×T.</remarks>
    public void AttentionForward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "AttentionForward";
        CheckAttention(op, batch, tq, tkv, kvLen, nHeads, nKvHeads, headSize);
        long qn = (long)batch * tq * nHeads * headSize, kn = (long)batch * tkv * nKvHeads * headSize;
        EnsureScratch(AttnForwardScratch(headSize));
        AttnInputs(op, q, qn, k, v, kn, out float* pq, out float* pk, out float* pv);
        var ctx = new AttnCtx
        {
            O = F32(output, qn, nameof(output), op), Lse = lse != null ? F32(lse, (long)batch * nHeads * tq, nameof(lse), op) : null,
            Q = pq, K = pk, V = pv,
            B = batch, Tq = tq, Tkv = tkv, KvLen = kvLen, NH = nHeads, NKV = nKvHeads, HS = headSize, Group = nHeads / nKvHeads,
            RowBlocks = (tq + AttnBr - 1) / AttnBr, Scale = scale, Scratch = ScratchBase, Stride = ScratchStride,
        };
        _pool.For(batch * nHeads * ctx.RowBlocks, &AttnForwardBody, &ctx);
    }

    private const int AttnBr = 16; // query rows per task
    private const int AttnBc = 64; // keys per block: four Vector512 of scores per row

    /// <summary>Scratch floats per thread for the blocked forward.</summary>
    private static long AttnForwardScratch(int hs) => (long)hs * AttnBc + AttnBr * AttnBc + AttnBr * (long)hs + 2 * AttnBr + hs + 64;

    /// <summary>
    /// One (batch, head, block of 16 query rows): keys in blocks of 64 packed transposed (HS × 64), scores for one row as
    /// four Vector512 accumulators over HS, online softmax (running max m, sum l, rescaled output), then O += P·V with
    /// four rows sharing each loaded V vector.
    /// </summary>
    private static void AttnForwardBody(void* p, int task, int worker)
    {
        var c = (AttnCtx*)p;
        int rb = task % c->RowBlocks, bh = task / c->RowBlocks, h = bh % c->NH, b = bh / c->NH;
        int kh = h / c->Group, hs = c->HS;
        long kvStride = (long)c->NKV * hs;
        float* kBase = c->K + ((long)b * c->Tkv * c->NKV + kh) * hs;
        float* vBase = c->V + ((long)b * c->Tkv * c->NKV + kh) * hs;
        float* kt = c->Scratch + worker * c->Stride;      // (HS, BC)
        float* sc = kt + hs * AttnBc;                     // (BR, BC) scores, then probabilities
        float* o = sc + AttnBr * AttnBc;                  // (BR, HS) unnormalised output
        float* mRow = o + AttnBr * hs;                    // (BR) running max
        float* lRow = mRow + AttnBr;                      // (BR) running sum
        float* qs = lRow + AttnBr;                        // (HS) scaled query row
        int t0 = rb * AttnBr, rows = Math.Min(AttnBr, c->Tq - t0);
        int pos0 = c->KvLen - c->Tq + t0, posLast = pos0 + rows - 1;
        new Span<float>(o, rows * hs).Clear();
        for (int r = 0; r < rows; r++) { mRow[r] = float.NegativeInfinity; lRow[r] = 0; }
        for (int j0 = 0; j0 <= posLast; j0 += AttnBc)
        {
            int nc = Math.Min(AttnBc, posLast + 1 - j0);
            // pack K[j0..j0+nc) transposed; zero the padding keys
            for (int cc = 0; cc < nc; cc++)
            {
                float* krow = kBase + (j0 + cc) * kvStride;
                for (int d = 0; d < hs; d++) kt[d * AttnBc + cc] = krow[d];
            }
            if (nc < AttnBc)
                for (int d = 0; d < hs; d++) new Span<float>(kt + d * AttnBc + nc, AttnBc - nc).Clear();
            int firstRow = Math.Max(0, j0 - pos0); // rows before this see none of the block
            for (int r = firstRow; r < rows; r++)
            {
                float* qrow = c->Q + (((long)b * c->Tq + t0 + r) * c->NH + h) * hs;
                for (int d = 0; d < hs; d++) qs[d] = qrow[d] * c->Scale;
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
                float* kd = kt;
                for (int d = 0; d < hs; d++, kd += AttnBc)
                {
                    var qd = Vector512.Create(qs[d]);
                    a0 = Vector512.FusedMultiplyAdd(qd, Vector512.Load(kd), a0);
                    a1 = Vector512.FusedMultiplyAdd(qd, Vector512.Load(kd + 16), a1);
                    a2 = Vector512.FusedMultiplyAdd(qd, Vector512.Load(kd + 32), a2);
                    a3 = Vector512.FusedMultiplyAdd(qd, Vector512.Load(kd + 48), a3);
                }
                float* srow = sc + r * AttnBc;
                a0.Store(srow); a1.Store(srow + 16); a2.Store(srow + 32); a3.Store(srow + 48);
                int valid = Math.Min(nc, pos0 + r - j0 + 1);
                var sv = new Span<float>(srow, valid);
                float mNew = Math.Max(mRow[r], TensorPrimitives.Max(sv));
                float corr = MathF.Exp(mRow[r] - mNew); // 0 on the first block (m = -inf)
                mRow[r] = mNew;
                TensorPrimitives.Subtract(sv, mNew, sv);
                TensorPrimitives.Exp(sv, sv);
                new Span<float>(srow + valid, AttnBc - valid).Clear();
                lRow[r] = lRow[r] * corr + TensorPrimitives.Sum(sv);
                if (corr != 1f)
                {
                    var orow = new Span<float>(o + r * hs, hs);
                    TensorPrimitives.Multiply(orow, corr, orow);
                }
            }
            for (int r = 0; r < firstRow; r++) new Span<float>(sc + r * AttnBc, AttnBc).Clear();
            AccumulatePV(sc, vBase + j0 * kvStride, kvStride, o, rows, nc, hs);
        }
        for (int r = 0; r < rows; r++)
        {
            long qo = (((long)b * c->Tq + t0 + r) * c->NH + h) * hs;
            var orow = new ReadOnlySpan<float>(o + r * hs, hs);
            TensorPrimitives.Multiply(orow, 1f / lRow[r], new Span<float>(c->O + qo, hs));
            if (c->Lse != null) c->Lse[((long)b * c->NH + h) * c->Tq + t0 + r] = mRow[r] + MathF.Log(lRow[r]);
        }
    }

    /// <summary>o(rows, HS) += P(rows, BC)·V(nc, HS): four rows share every loaded 16-channel slice of V.</summary>
    private static void AccumulatePV(float* pm, float* v, long vStride, float* o, int rows, int nc, int hs)
    {
        int hv = hs & ~15;
        for (int r0 = 0; r0 < rows; r0 += 4)
        {
            int nr = Math.Min(4, rows - r0);
            float* p0 = pm + r0 * AttnBc, p1 = p0 + (nr > 1 ? AttnBc : 0), p2 = p0 + (nr > 2 ? 2 * AttnBc : 0), p3 = p0 + (nr > 3 ? 3 * AttnBc : 0);
            for (int d = 0; d < hv; d += 16)
            {
                float* o0 = o + r0 * hs + d;
                Vector512<float> acc0 = Vector512.Load(o0), acc1 = default, acc2 = default, acc3 = default;
                if (nr > 1) acc1 = Vector512.Load(o0 + hs);
                if (nr > 2) acc2 = Vector512.Load(o0 + 2 * hs);
                if (nr > 3) acc3 = Vector512.Load(o0 + 3 * hs);
                float* vd = v + d;
                for (int cc = 0; cc < nc; cc++, vd += vStride)
                {
                    var vv = Vector512.Load(vd);
                    acc0 = Vector512.FusedMultiplyAdd(Vector512.Create(p0[cc]), vv, acc0);
                    acc1 = Vector512.FusedMultiplyAdd(Vector512.Create(p1[cc]), vv, acc1);
                    acc2 = Vector512.FusedMultiplyAdd(Vector512.Create(p2[cc]), vv, acc2);
                    acc3 = Vector512.FusedMultiplyAdd(Vector512.Create(p3[cc]), vv, acc3);
                }
                acc0.Store(o0);
                if (nr > 1) acc1.Store(o0 + hs);
                if (nr > 2) acc2.Store(o0 + 2 * hs);
                if (nr > 3) acc3.Store(o0 + 3 * hs);
            }
            for (int d = hv; d < hs; d++)
                for (int r = 0; r < nr; r++)
                {
                    float* pr = pm + (r0 + r) * AttnBc;
                    float acc = o[(r0 + r) * hs + d];
                    for (int cc = 0; cc < nc; cc++) acc += pr[cc] * v[cc * vStride + d];
                    o[(r0 + r) * hs + d] = acc;
                }
        }
    }

    /// <summary>
    /// Backward for training, every key used (kvLen == Tkv; Tq &lt; Tkv puts P = Tkv - Tq prefix keys before the
    /// sequence, seen by every query). dq, dk, dv are overwritten; dk/dv sum over the query heads of their group.
    /// Probabilities are rebuilt from lse; D_i = dOut_i·out_i is kept per row (B·NH·Tq floats).
    /// </summary>
    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int nHeads, int nKvHeads, int headSize, float scale)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "AttentionBackward";
        CheckAttention(op, batch, tq, tkv, tkv, nHeads, nKvHeads, headSize);
        int t = tq;
        long qn = (long)batch * tq * nHeads * headSize, kn = (long)batch * tkv * nKvHeads * headSize, rows = (long)batch * nHeads * tq;
        AttnInputs(op, q, qn, k, v, kn, out float* pq, out float* pk, out float* pv);
        var ctx = new AttnCtx
        {
            DQ = F32(dq, qn, nameof(dq), op), DK = F32(dk, kn, nameof(dk), op), DV = F32(dv, kn, nameof(dv), op),
            DO = F32(dOut, qn, nameof(dOut), op), O = F32(output, qn, nameof(output), op), Lse = F32(lse, rows, nameof(lse), op),
            Q = pq, K = pk, V = pv,
            B = batch, Tq = tq, Tkv = tkv, KvLen = tkv, NH = nHeads, NKV = nKvHeads, HS = headSize, Group = nHeads / nKvHeads,
            RowBlocks = (t + AttnBr - 1) / AttnBr, Scale = scale,
        };
        EnsureScratch(AttnBackwardScratch(headSize));
        ctx.Scratch = ScratchBase; ctx.Stride = ScratchStride;
        if (_attnDLength < rows)
        {
            if (_attnD != null) NativeMemory.AlignedFree(_attnD);
            _attnD = (float*)NativeMemory.AlignedAlloc((nuint)(rows * sizeof(float)), 64);
            _attnDLength = rows;
        }
        ctx.D = _attnD;
        _pool.For(batch * nHeads * ctx.RowBlocks, &AttnBackwardQBody, &ctx);
        ctx.RowBlocks = (tkv + AttnBc - 1) / AttnBc; // key blocks for the dk/dv pass
        _pool.For(batch * nKvHeads * ctx.RowBlocks, &AttnBackwardKvBody, &ctx);
    }

    /// <summary>Scratch floats per thread for the blocked backward.</summary>
    private static long AttnBackwardScratch(int hs) => 4L * hs * AttnBc + 2 * AttnBr * AttnBc + (long)AttnBr * hs + 2L * hs + 64;

    /// <summary>out[c] = Σ_d x[d]·t[d·64 + c] for the 64 keys of a packed transposed block (four Vector512 accumulators).</summary>
    private static void RowTimesPacked(float* x, float* t, int hs, float* out64)
    {
        Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
        for (int d = 0; d < hs; d++, t += AttnBc)
        {
            var xd = Vector512.Create(x[d]);
            a0 = Vector512.FusedMultiplyAdd(xd, Vector512.Load(t), a0);
            a1 = Vector512.FusedMultiplyAdd(xd, Vector512.Load(t + 16), a1);
            a2 = Vector512.FusedMultiplyAdd(xd, Vector512.Load(t + 32), a2);
            a3 = Vector512.FusedMultiplyAdd(xd, Vector512.Load(t + 48), a3);
        }
        a0.Store(out64); a1.Store(out64 + 16); a2.Store(out64 + 32); a3.Store(out64 + 48);
    }

    /// <summary>Packs rows src[j0..j0+nc) (stride) transposed into t(HS, 64), zero padding keys.</summary>
    private static void PackTransposed(float* src, long stride, int nc, int hs, float* t)
    {
        for (int cc = 0; cc < nc; cc++)
        {
            float* row = src + cc * stride;
            for (int d = 0; d < hs; d++) t[d * AttnBc + cc] = row[d];
        }
        if (nc < AttnBc)
            for (int d = 0; d < hs; d++) new Span<float>(t + d * AttnBc + nc, AttnBc - nc).Clear();
    }

    /// <summary>
    /// For query row i against the packed key block at j0: p = exp(scale·q·k - lse_i), ds = p·(dOut_i·v - D_i)·scale,
    /// both zero past the causal edge and the block end. Returns nothing; fills p64 and ds64.
    /// </summary>
    private static void ProbsAndScoreGrads(AttnCtx* c, float* q, float* dO, float lse, float di, int valid, float* kt, float* vt, float* tmp, float* p64, float* ds64)
    {
        int hs = c->HS;
        for (int d = 0; d < hs; d++) tmp[d] = q[d] * c->Scale;
        RowTimesPacked(tmp, kt, hs, p64);
        RowTimesPacked(dO, vt, hs, ds64);
        var pv = new Span<float>(p64, valid);
        var dv = new Span<float>(ds64, valid);
        TensorPrimitives.Subtract(pv, lse, pv);
        TensorPrimitives.Exp(pv, pv);
        TensorPrimitives.Subtract(dv, di, dv);
        TensorPrimitives.Multiply(dv, pv, dv);
        TensorPrimitives.Multiply(dv, c->Scale, dv);
        new Span<float>(p64 + valid, AttnBc - valid).Clear();
        new Span<float>(ds64 + valid, AttnBc - valid).Clear();
    }

    /// <summary>dq for (batch, head, 16 query rows): dq_i = Σ_blocks dS(i, :)·K_block, and D_i = dOut_i·out_i.</summary>
    private static void AttnBackwardQBody(void* p, int task, int worker)
    {
        var c = (AttnCtx*)p;
        int rb = task % c->RowBlocks, bh = task / c->RowBlocks, h = bh % c->NH, b = bh / c->NH;
        int kh = h / c->Group, hs = c->HS, T = c->Tq, prefix = c->Tkv - c->Tq; // query i sits at position prefix + i
        long kvStride = (long)c->NKV * hs;
        float* kBase = c->K + ((long)b * c->Tkv * c->NKV + kh) * hs;
        float* vBase = c->V + ((long)b * c->Tkv * c->NKV + kh) * hs;
        float* kt = c->Scratch + worker * c->Stride, vt = kt + hs * AttnBc;
        float* pm = vt + hs * AttnBc, dsm = pm + AttnBr * AttnBc, acc = dsm + AttnBr * AttnBc, tmp = acc + AttnBr * hs;
        int t0 = rb * AttnBr, rows = Math.Min(AttnBr, T - t0), last = prefix + t0 + rows - 1; // last key any row sees
        long rowBase = ((long)b * c->NH + h) * T;
        for (int r = 0; r < rows; r++)
        {
            long qo = (((long)b * T + t0 + r) * c->NH + h) * hs;
            c->D[rowBase + t0 + r] = TensorPrimitives.Dot(new ReadOnlySpan<float>(c->DO + qo, hs), new ReadOnlySpan<float>(c->O + qo, hs));
        }
        new Span<float>(acc, rows * hs).Clear();
        for (int j0 = 0; j0 <= last; j0 += AttnBc)
        {
            int nc = Math.Min(AttnBc, last + 1 - j0);
            PackTransposed(kBase + j0 * kvStride, kvStride, nc, hs, kt);
            PackTransposed(vBase + j0 * kvStride, kvStride, nc, hs, vt);
            for (int r = 0; r < rows; r++)
            {
                int i = t0 + r, pos = prefix + i;
                float* dsr = dsm + r * AttnBc;
                if (pos < j0) { new Span<float>(dsr, AttnBc).Clear(); continue; }
                long qo = (((long)b * T + i) * c->NH + h) * hs;
                ProbsAndScoreGrads(c, c->Q + qo, c->DO + qo, c->Lse[rowBase + i], c->D[rowBase + i], Math.Min(nc, pos - j0 + 1),
                    kt, vt, tmp, pm, dsr);
            }
            AccumulatePV(dsm, kBase + j0 * kvStride, kvStride, acc, rows, nc, hs);
        }
        for (int r = 0; r < rows; r++)
        {
            long qo = (((long)b * T + t0 + r) * c->NH + h) * hs;
            new ReadOnlySpan<float>(acc + r * hs, hs).CopyTo(new Span<float>(c->DQ + qo, hs));
        }
    }

    /// <summary>
    /// dk, dv for (batch, kv head, 64 keys): over every query head of the group and every row i ≥ j0, in blocks of 16
    /// rows: dV_block += Pᵀ·dOut_rows, dK_block += dSᵀ·Q_rows.
    /// </summary>
    private static void AttnBackwardKvBody(void* p, int task, int worker)
    {
        var c = (AttnCtx*)p;
        int kb = task % c->RowBlocks, bk = task / c->RowBlocks, kh = bk % c->NKV, b = bk / c->NKV;
        int hs = c->HS, T = c->Tq, TK = c->Tkv, prefix = TK - T; // query i sits at position prefix + i
        long kvStride = (long)c->NKV * hs, qStride = (long)c->NH * hs;
        int j0 = kb * AttnBc, nc = Math.Min(AttnBc, TK - j0);
        float* kt = c->Scratch + worker * c->Stride, vt = kt + hs * AttnBc;
        float* dkAcc = vt + hs * AttnBc, dvAcc = dkAcc + hs * AttnBc;
        float* pm = dvAcc + hs * AttnBc, dsm = pm + AttnBr * AttnBc, tmp = dsm + AttnBr * AttnBc;
        float* kBlock = c->K + (((long)b * TK + j0) * c->NKV + kh) * hs;
        float* vBlock = c->V + (((long)b * TK + j0) * c->NKV + kh) * hs;
        PackTransposed(kBlock, kvStride, nc, hs, kt);
        PackTransposed(vBlock, kvStride, nc, hs, vt);
        new Span<float>(dkAcc, AttnBc * hs).Clear();
        new Span<float>(dvAcc, AttnBc * hs).Clear();
        for (int g = 0; g < c->Group; g++)
        {
            int h = kh * c->Group + g;
            float* qBase = c->Q + ((long)b * T * c->NH + h) * hs;
            float* doBase = c->DO + ((long)b * T * c->NH + h) * hs;
            long rowBase = ((long)b * c->NH + h) * T;
            // the first query that sees key j0 sits at position j0: row j0 - prefix (every row sees a prefix key)
            for (int i0 = Math.Max(0, j0 - prefix); i0 < T; i0 += AttnBr)
            {
                int rows = Math.Min(AttnBr, T - i0);
                for (int r = 0; r < rows; r++)
                {
                    int i = i0 + r;
                    ProbsAndScoreGrads(c, qBase + i * qStride, doBase + i * qStride, c->Lse[rowBase + i], c->D[rowBase + i],
                        Math.Min(nc, prefix + i - j0 + 1), kt, vt, tmp, pm + r * AttnBc, dsm + r * AttnBc);
                }
                AccumulateTransposed(pm, rows, doBase + i0 * qStride, qStride, dvAcc, nc, hs);
                AccumulateTransposed(dsm, rows, qBase + i0 * qStride, qStride, dkAcc, nc, hs);
            }
        }
        for (int cc = 0; cc < nc; cc++)
        {
            long ko = (((long)b * TK + j0 + cc) * c->NKV + kh) * hs;
            new ReadOnlySpan<float>(dkAcc + cc * hs, hs).CopyTo(new Span<float>(c->DK + ko, hs));
            new ReadOnlySpan<float>(dvAcc + cc * hs, hs).CopyTo(new Span<float>(c->DV + ko, hs));
        }
    }

    /// <summary>acc(64, HS) += Pᵀ·X: acc[c, :] += Σ_r P[r, c]·x_r, four keys share every loaded 16-channel slice of x_r.</summary>
    private static void AccumulateTransposed(float* pm, int rows, float* x, long xStride, float* acc, int nc, int hs)
    {
        int hv = hs & ~15;
        for (int c0 = 0; c0 < nc; c0 += 4)
        {
            // keys past nc have P = 0 and land in acc rows that are never copied out (acc has 64 rows)
            for (int d = 0; d < hv; d += 16)
            {
                float* a = acc + c0 * hs + d;
                var acc0 = Vector512.Load(a); var acc1 = Vector512.Load(a + hs);
                var acc2 = Vector512.Load(a + 2 * hs); var acc3 = Vector512.Load(a + 3 * hs);
                for (int r = 0; r < rows; r++)
                {
                    var xv = Vector512.Load(x + r * xStride + d);
                    float* pr = pm + r * AttnBc + c0;
                    acc0 = Vector512.FusedMultiplyAdd(Vector512.Create(pr[0]), xv, acc0);
                    acc1 = Vector512.FusedMultiplyAdd(Vector512.Create(pr[1]), xv, acc1);
                    acc2 = Vector512.FusedMultiplyAdd(Vector512.Create(pr[2]), xv, acc2);
                    acc3 = Vector512.FusedMultiplyAdd(Vector512.Create(pr[3]), xv, acc3);
                }
                acc0.Store(a); acc1.Store(a + hs); acc2.Store(a + 2 * hs); acc3.Store(a + 3 * hs);
            }
            for (int d = hv; d < hs; d++)
                for (int k = 0; k < 4; k++)
                {
                    float s = acc[(c0 + k) * hs + d];
                    for (int r = 0; r < rows; r++) s += pm[r * AttnBc + c0 + k] * x[r * xStride + d];
                    acc[(c0 + k) * hs + d] = s;
                }
        }
    }
}
