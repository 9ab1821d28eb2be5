using System.Numerics.Tensors;
using System.Runtime.InteropServices;

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
    /// <remarks>Per query row the scores of its visible keys go to a per-thread row buffer (O(Tkv), never T×T).</remarks>
    public void AttentionForward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "AttentionForward";
        CheckAttention(op, batch, tq, tkv, kvLen, nHeads, nKvHeads, headSize);
        long qn = (long)batch * tq * nHeads * headSize, kn = (long)batch * tkv * nKvHeads * headSize;
        EnsureScratch(tkv + headSize);
        var ctx = new AttnCtx
        {
            O = F32(output, qn, nameof(output), op), Lse = lse != null ? F32(lse, (long)batch * nHeads * tq, nameof(lse), op) : null,
            Q = F32(q, qn, nameof(q), op), K = F32(k, kn, nameof(k), op), V = F32(v, kn, nameof(v), op),
            B = batch, Tq = tq, Tkv = tkv, KvLen = kvLen, NH = nHeads, NKV = nKvHeads, HS = headSize, Group = nHeads / nKvHeads,
            RowBlocks = (tq + AttnRows - 1) / AttnRows, Scale = scale, Scratch = ScratchBase, Stride = ScratchStride,
        };
        _pool.For(batch * nHeads * ctx.RowBlocks, &AttnForwardBody, &ctx);
    }

    private static void AttnForwardBody(void* p, int task, int worker)
    {
        var c = (AttnCtx*)p;
        int rb = task % c->RowBlocks, bh = task / c->RowBlocks, h = bh % c->NH, b = bh / c->NH;
        int kh = h / c->Group, hs = c->HS;
        float* s = c->Scratch + worker * c->Stride;
        long kvStride = (long)c->NKV * hs;
        float* kBase = c->K + ((long)b * c->Tkv * c->NKV + kh) * hs;
        float* vBase = c->V + ((long)b * c->Tkv * c->NKV + kh) * hs;
        int t1 = Math.Min(c->Tq, (rb + 1) * AttnRows);
        for (int t = rb * AttnRows; t < t1; t++)
        {
            int pos = c->KvLen - c->Tq + t;
            long qo = (((long)b * c->Tq + t) * c->NH + h) * hs;
            var qrow = new ReadOnlySpan<float>(c->Q + qo, hs);
            float max = float.NegativeInfinity;
            for (int j = 0; j <= pos; j++)
            {
                float d = TensorPrimitives.Dot(qrow, new ReadOnlySpan<float>(kBase + j * kvStride, hs)) * c->Scale;
                s[j] = d;
                if (d > max) max = d;
            }
            var sp = new Span<float>(s, pos + 1);
            TensorPrimitives.Subtract(sp, max, sp);
            TensorPrimitives.Exp(sp, sp);
            float sum = TensorPrimitives.Sum(sp);
            var o = new Span<float>(c->O + qo, hs);
            o.Clear();
            float inv = 1f / sum;
            for (int j = 0; j <= pos; j++)
                TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(vBase + j * kvStride, hs), s[j] * inv, o, o);
            if (c->Lse != null) c->Lse[((long)b * c->NH + h) * c->Tq + t] = max + MathF.Log(sum);
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
