using System.Numerics.Tensors;

namespace FineTuneNative.Kernels.Cpu;

// The LoRA linear y = x·Wᵀ [+ bias] + s·(drop(x)·Aᵀ)·Bᵀ as GEMMs (the rank-R terms s·u·Bᵀ and s·g·A folded into the
// base products' micro-kernel, Gemm.RankUpdate) plus a fused dropout pass;
// reference: LoraLinearReference.
public sealed unsafe partial class CpuBackend
{
    /// <summary>
    /// y(M,N) = x·wᵀ [+ bias] + s·(drop(x)·Aᵀ)·Bᵀ. Saves u(M,R) = drop(x)·Aᵀ (needed for dB) and, when Dropout &gt; 0,
    /// xDrop(M,K) = drop(x) (needed for dA; regenerating it from the hash would cost a pass over x per backward).
    /// </summary>
    public void LoraLinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "LoraLinearForward";
        Dims(op, (nameof(m), m), (nameof(n), n), (nameof(k), k), (nameof(r), r));
        CheckDropout(lora, op);
        float* py = F32(y, (long)m * n, nameof(y), op);
        float* px = F32(x, (long)m * k, nameof(x), op);
        bool wNf4 = w.DType == DType.NF4, wBf16 = false;
        void* pw = wNf4 ? Nf4Weight(w, (long)n * k, nameof(w), op) : Weight(w, (long)n * k, nameof(w), op, out wBf16);
        float* pbias = bias != null ? F32(bias, n, nameof(bias), op) : null;
        float* pa = F32(lora.A, (long)r * k, "lora.A", op);
        float* pb = F32(lora.B, (long)n * r, "lora.B", op);
        float* pu = F32(u, (long)m * r, nameof(u), op);
        float* pxd = px;
        if (lora.Dropout > 0)
        {
            if (xDrop is null) throw new ArgumentException($"{op}: xDrop (M={m}, K={k}) is required when dropout {lora.Dropout} > 0", nameof(xDrop));
            pxd = F32(xDrop, (long)m * k, nameof(xDrop), op);
            var ctx = new DropCtx { X = px, XDrop = pxd, M = m, K = k, P = lora.Dropout, Seed = lora.Seed };
            _pool.For(m, &DropRowBody, &ctx);
        }
        Gemm.Run(this, m, r, k, pxd, k, false, pa, false, k, true, pu, r, 1f, false, null);             // u = xd·Aᵀ
        if (wNf4)
        {
            Nf4Forward(w, op, m, n, k, px, py, 1f, false, pbias);
            Gemm.Run(this, m, n, r, pu, r, false, pb, false, r, true, py, n, lora.Scale, true, null);
        }
        // y = x·wᵀ + bias + s·u·Bᵀ: the rank-R term is R more depth steps of the base product's last K slice
        else Gemm.Run(this, m, n, k, px, k, false, pw, wBf16, k, true, py, n, 1f, false, pbias, new Gemm.RankUpdate(pu, r, pb, r, true, r, lora.Scale));
    }

    /// <summary>
    /// Backward of <see cref="LoraLinearForward"/>. Overwrites g(M,R) = dy·B (scratch). Accumulates (+=) the parameter
    /// gradients dB(N,R) += s·dyᵀ·u, dA(R,K) += s·gᵀ·drop(x), and dW(N,K) += dyᵀ·x, dBias(N) += Σ dy when given.
    /// dx(M,K) = dy·w + s·mask⊙(g·A)/(1-p), overwritten unless <paramref name="accumulate"/>.
    /// </summary>
    public void LoraLinearBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, LoraParams lora, Tensor u, Tensor? xDrop, Tensor g,
        Tensor dA, Tensor dB, Tensor? dW, Tensor? dBias, int m, int n, int k, int r, bool accumulate)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "LoraLinearBackward";
        Dims(op, (nameof(m), m), (nameof(n), n), (nameof(k), k), (nameof(r), r));
        CheckDropout(lora, op);
        float* pdx = F32(dx, (long)m * k, nameof(dx), op);
        float* pdy = F32(dy, (long)m * n, nameof(dy), op);
        float* px = F32(x, (long)m * k, nameof(x), op);
        bool wNf4 = w.DType == DType.NF4, wBf16 = false;
        void* pw = wNf4 ? Nf4Weight(w, (long)n * k, nameof(w), op) : Weight(w, (long)n * k, nameof(w), op, out wBf16);
        float* pa = F32(lora.A, (long)r * k, "lora.A", op);
        float* pb = F32(lora.B, (long)n * r, "lora.B", op);
        float* pu = F32(u, (long)m * r, nameof(u), op);
        float* pg = F32(g, (long)m * r, nameof(g), op);
        float* pdA = F32(dA, (long)r * k, nameof(dA), op);
        float* pdB = F32(dB, (long)n * r, nameof(dB), op);
        float* pdW = dW != null ? F32(dW, (long)n * k, nameof(dW), op) : null;
        float* pdBias = dBias != null ? F32(dBias, n, nameof(dBias), op) : null;
        float* pxd = px;
        if (lora.Dropout > 0)
        {
            if (xDrop is null) throw new ArgumentException($"{op}: xDrop (M={m}, K={k}) is required when dropout {lora.Dropout} > 0", nameof(xDrop));
            pxd = F32(xDrop, (long)m * k, nameof(xDrop), op);
        }
        float s = lora.Scale;
        Gemm.Run(this, m, r, n, pdy, n, false, pb, false, r, false, pg, r, 1f, false, null);    // g = dy·B
        WeightGrad(pdB, null, pdy, pu, m, n, r, s);                                              // dB += s·dyᵀ·u
        WeightGrad(pdA, null, pg, pxd, m, r, k, s);                                              // dA += s·gᵀ·xd
        bool fused = !wNf4 && lora.Dropout == 0;
        if (wNf4) Nf4BackwardInput(w, op, m, n, k, pdy, pdx, accumulate);                        // dx (+)= dy·w
        else if (fused)                                                                          // dx (+)= dy·w + s·g·A in one product
            Gemm.Run(this, m, k, n, pdy, n, false, pw, wBf16, k, false, pdx, k, 1f, accumulate, null, new Gemm.RankUpdate(pg, r, pa, k, false, r, s));
        else Gemm.Run(this, m, k, n, pdy, n, false, pw, wBf16, k, false, pdx, k, 1f, accumulate, null);
        if (lora.Dropout > 0)
        {
            EnsureScratch(k);
            var ctx = new LoraDxCtx
            {
                Dx = pdx, G = pg, A = pa, M = m, K = k, R = r, Scale = s, P = lora.Dropout, Seed = lora.Seed,
                Scratch = ScratchBase, Stride = ScratchStride,
            };
            _pool.For(m, &LoraDxDropBody, &ctx);
        }
        else if (!fused)
        {
            Gemm.Run(this, m, k, r, pg, r, false, pa, false, k, false, pdx, k, s, true, null);   // dx += s·g·A
        }
        if (pdW != null) WeightGrad(pdW, pdBias, pdy, px, m, n, k, 1f);
        else if (pdBias != null) ColumnSum(pdBias, pdy, m, n, 1f);
    }

    private static void CheckDropout(LoraParams lora, string op)
    {
        if (!(lora.Dropout >= 0 && lora.Dropout < 1)) throw new ArgumentException($"{op}: dropout {lora.Dropout} must be in [0, 1)");
    }

    private struct DropCtx { public float* X, XDrop; public int M, K; public float P; public ulong Seed; }

    private static void DropRowBody(void* p, int i, int worker)
    {
        var c = (DropCtx*)p;
        long o = (long)i * c->K;
        float keepScale = 1f / (1f - c->P);
        for (int j = 0; j < c->K; j++)
            c->XDrop[o + j] = DropoutHash.Keep(c->Seed, o + j, c->P) ? c->X[o + j] * keepScale : 0f;
    }

    private struct LoraDxCtx
    {
        public float* Dx, G, A; public int M, K, R; public float Scale, P; public ulong Seed;
        public float* Scratch; public long Stride;
    }

    /// <summary>dx(i,:) += s·mask(i,:)⊙(g(i,:)·A)/(1-p), one row per index, the mask regenerated from the hash.</summary>
    private static void LoraDxDropBody(void* p, int i, int worker)
    {
        var c = (LoraDxCtx*)p;
        int k = c->K;
        var tmp = new Span<float>(c->Scratch + worker * c->Stride, k);
        tmp.Clear();
        for (int q = 0; q < c->R; q++)
            TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(c->A + (long)q * k, k), c->G[(long)i * c->R + q], tmp, tmp);
        long o = (long)i * k;
        float f = c->Scale / (1f - c->P);
        for (int j = 0; j < k; j++)
            if (DropoutHash.Keep(c->Seed, o + j, c->P)) c->Dx[o + j] += f * tmp[j];
    }
}
