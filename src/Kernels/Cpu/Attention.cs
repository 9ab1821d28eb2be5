using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

// Causal grouped-query attention; reference: AttentionReference.
public sealed unsafe partial class CpuBackend
{
    private const int AttnRows = 8; // query rows per task

    private struct AttnCtx
    {
        public float* O, Lse, Q, K, V, DQ, DK, DV, DO, D;
        public int B, Tq, Tkv, KvLen, NH, NKV, HS, Group, RowBlocks;
        public float Scale;
        public float* Scratch; public long Stride;
    }

    private float* _attnD;
    private long _attnDLength;

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
        var ctx = new AttnCtx
        {
            O = F32(output, qn, nameof(output), op), Lse = lse != null ? F32(lse, (long)batch * nHeads * tq, nameof(lse), op) : null,
            Q = F32(q, qn, nameof(q), op), K = F32(k, kn, nameof(k), op), V = F32(v, kn, nameof(v), op),
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
    /// Backward for training (Tq == Tkv == kvLen == T). dq, dk, dv are overwritten; dk/dv sum over the query heads
    /// of their group. Probabilities are rebuilt from lse; D_i = dOut_i·out_i is kept per row (B·NH·T floats).
    /// </summary>
    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
        int batch, int t, int nHeads, int nKvHeads, int headSize, float scale)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "AttentionBackward";
        CheckAttention(op, batch, t, t, t, nHeads, nKvHeads, headSize);
        long qn = (long)batch * t * nHeads * headSize, kn = (long)batch * t * nKvHeads * headSize, rows = (long)batch * nHeads * t;
        var ctx = new AttnCtx
        {
            DQ = F32(dq, qn, nameof(dq), op), DK = F32(dk, kn, nameof(dk), op), DV = F32(dv, kn, nameof(dv), op),
            DO = F32(dOut, qn, nameof(dOut), op), O = F32(output, qn, nameof(output), op), Lse = F32(lse, rows, nameof(lse), op),
            Q = F32(q, qn, nameof(q), op), K = F32(k, kn, nameof(k), op), V = F32(v, kn, nameof(v), op),
            B = batch, Tq = t, Tkv = t, KvLen = t, NH = nHeads, NKV = nKvHeads, HS = headSize, Group = nHeads / nKvHeads,
            RowBlocks = (t + AttnRows - 1) / AttnRows, Scale = scale,
        };
        if (_attnDLength < rows)
        {
            if (_attnD != null) NativeMemory.AlignedFree(_attnD);
            _attnD = (float*)NativeMemory.AlignedAlloc((nuint)(rows * sizeof(float)), 64);
            _attnDLength = rows;
        }
        ctx.D = _attnD;
        _pool.For(batch * nHeads * ctx.RowBlocks, &AttnBackwardQBody, &ctx);
        _pool.For(batch * nKvHeads * ctx.RowBlocks, &AttnBackwardKvBody, &ctx);
    }

    /// <summary>dq_i = scale·Σ_{j≤i} p_ij (dOut_i·v_j - D_i) k_j, and D_i.</summary>
    private static void AttnBackwardQBody(void* p, int task, int worker)
    {
        var c = (AttnCtx*)p;
        int rb = task % c->RowBlocks, bh = task / c->RowBlocks, h = bh % c->NH, b = bh / c->NH;
        int kh = h / c->Group, hs = c->HS, T = c->Tq;
        long kvStride = (long)c->NKV * hs;
        float* kBase = c->K + ((long)b * T * c->NKV + kh) * hs;
        float* vBase = c->V + ((long)b * T * c->NKV + kh) * hs;
        int i1 = Math.Min(T, (rb + 1) * AttnRows);
        for (int i = rb * AttnRows; i < i1; i++)
        {
            long qo = (((long)b * T + i) * c->NH + h) * hs;
            long row = ((long)b * c->NH + h) * T + i;
            var qrow = new ReadOnlySpan<float>(c->Q + qo, hs);
            var dorow = new ReadOnlySpan<float>(c->DO + qo, hs);
            float di = TensorPrimitives.Dot(dorow, new ReadOnlySpan<float>(c->O + qo, hs));
            c->D[row] = di;
            float l = c->Lse[row];
            var dqrow = new Span<float>(c->DQ + qo, hs);
            dqrow.Clear();
            for (int j = 0; j <= i; j++)
            {
                var krow = new ReadOnlySpan<float>(kBase + j * kvStride, hs);
                float pij = MathF.Exp(TensorPrimitives.Dot(qrow, krow) * c->Scale - l);
                float dp = TensorPrimitives.Dot(dorow, new ReadOnlySpan<float>(vBase + j * kvStride, hs));
                TensorPrimitives.MultiplyAdd(krow, pij * (dp - di) * c->Scale, dqrow, dqrow);
            }
        }
    }

    /// <summary>dk_j = scale·Σ_h Σ_{i≥j} ds_ij q_i; dv_j = Σ_h Σ_{i≥j} p_ij dOut_i (h over the group of kv head).</summary>
    private static void AttnBackwardKvBody(void* p, int task, int worker)
    {
        var c = (AttnCtx*)p;
        int rb = task % c->RowBlocks, bk = task / c->RowBlocks, kh = bk % c->NKV, b = bk / c->NKV;
        int hs = c->HS, T = c->Tq;
        long kvStride = (long)c->NKV * hs, qStride = (long)c->NH * hs;
        int j1 = Math.Min(T, (rb + 1) * AttnRows);
        for (int j = rb * AttnRows; j < j1; j++)
        {
            long ko = (((long)b * T + j) * c->NKV + kh) * hs;
            var krow = new ReadOnlySpan<float>(c->K + ko, hs);
            var vrow = new ReadOnlySpan<float>(c->V + ko, hs);
            var dkrow = new Span<float>(c->DK + ko, hs);
            var dvrow = new Span<float>(c->DV + ko, hs);
            dkrow.Clear(); dvrow.Clear();
            for (int g = 0; g < c->Group; g++)
            {
                int h = kh * c->Group + g;
                float* qBase = c->Q + ((long)b * T * c->NH + h) * hs;
                float* doBase = c->DO + ((long)b * T * c->NH + h) * hs;
                long rowBase = ((long)b * c->NH + h) * T;
                for (int i = j; i < T; i++)
                {
                    var qrow = new ReadOnlySpan<float>(qBase + i * qStride, hs);
                    var dorow = new ReadOnlySpan<float>(doBase + i * qStride, hs);
                    float pij = MathF.Exp(TensorPrimitives.Dot(qrow, krow) * c->Scale - c->Lse[rowBase + i]);
                    float dp = TensorPrimitives.Dot(dorow, vrow);
                    TensorPrimitives.MultiplyAdd(dorow, pij, dvrow, dvrow);
                    TensorPrimitives.MultiplyAdd(qrow, pij * (dp - c->D[rowBase + i]) * c->Scale, dkrow, dkrow);
                }
            }
        }
    }
}
