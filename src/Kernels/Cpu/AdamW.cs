using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

// Decoupled AdamW; reference: AdamWReference.
public sealed unsafe partial class CpuBackend
{
    private struct AdamCtx { public float* P, G, M, V; public long N; public float Lr, B1, B2, Eps, Wd, GradScale, C1, C2; }

    /// <summary>
    /// m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²; p -= lr·(m̂/(sqrt(v̂)+eps) + wd·p), g = gradScale·grad,
    /// bias corrections for 1-based <paramref name="step"/>. Updates param, m and v in place.
    /// </summary>
    public void AdamW(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "AdamW";
        if (step < 1) throw new ArgumentOutOfRangeException(nameof(step), step, $"{op}: step is 1-based");
        long n = param.Length;
        var ctx = new AdamCtx
        {
            P = F32(param, n, nameof(param), op), G = F32(grad, n, nameof(grad), op), M = F32(m, n, nameof(m), op), V = F32(v, n, nameof(v), op),
            N = n, Lr = lr, B1 = beta1, B2 = beta2, Eps = eps, Wd = weightDecay, GradScale = gradScale,
            C1 = (float)(1 - Math.Pow(beta1, step)), C2 = (float)(1 - Math.Pow(beta2, step)),
        };
        _pool.For(Chunks(n), &AdamBody, &ctx);
    }

    /// <summary>
    /// AdamW over every tensor of the list (the multi-tensor form the ILGPU backend runs in one launch): gradScale = clip[1],
    /// nothing written when it is not finite; each tensor's Rounded copy (bf16/f16) receives its updated parameter.
    /// </summary>
    public void AdamWMultiTensor(IReadOnlyList<AdamWTensor> tensors, AdamWHyper h, Tensor clip)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "AdamWMultiTensor";
        if (h.Step < 1) throw new ArgumentOutOfRangeException(nameof(h), h.Step, $"{op}: step is 1-based");
        float scale = F32(clip, 2, nameof(clip), op)[1];
        if (!float.IsFinite(scale)) return;
        float c1 = (float)(1 - Math.Pow(h.Beta1, h.Step)), c2 = (float)(1 - Math.Pow(h.Beta2, h.Step));
        for (int i = 0; i < tensors.Count; i++)
        {
            var t = tensors[i];
            long n = t.Param.Length;
            var ctx = new AdamCtx
            {
                P = F32(t.Param, n, "param", op), G = F32(t.Grad, n, "grad", op), M = F32(t.M, n, "m", op), V = F32(t.V, n, "v", op),
                N = n, Lr = h.Lr, B1 = h.Beta1, B2 = h.Beta2, Eps = h.Eps, Wd = t.Decay ? h.WeightDecay : 0f, GradScale = scale, C1 = c1, C2 = c2,
            };
            if (t.Grad.Length != n || t.M.Length != n || t.V.Length != n)
                throw new ArgumentException($"{op}: {t.Param.Describe()} needs grad, m and v of {n} elements ({t.Grad.Describe()}, {t.M.Describe()}, {t.V.Describe()})");
            _pool.For(Chunks(n), &AdamBody, &ctx);
            if (t.Rounded is { } r)
            {
                if (r.Length != n || (r.DType != DType.BF16 && r.DType != DType.F16))
                    throw new ArgumentException($"{op}: rounded copy {r.Describe()} of {t.Param.Describe()} must be bf16 or f16 with {n} elements");
                var dst = (ushort*)Ptr(r, "rounded");
                if (r.DType == DType.BF16) HalfConvert.F32ToBf16(ctx.P, dst, n);
                else for (long j = 0; j < n; j++) dst[j] = HalfBits.F32ToF16(ctx.P[j]);
            }
        }
    }

    private static void AdamBody(void* p, int chunk, int worker)
    {
        var c = (AdamCtx*)p;
        long s = (long)chunk * ElementChunk, e = Math.Min(c->N, s + ElementChunk);
        float ic1 = 1f / c->C1, ic2 = 1f / c->C2;
        long i = s;
        if (Vector512.IsHardwareAccelerated)
        {
            var b1 = Vector512.Create(c->B1); var b1c = Vector512.Create(1 - c->B1);
            var b2 = Vector512.Create(c->B2); var b2c = Vector512.Create(1 - c->B2);
            var gs = Vector512.Create(c->GradScale); var vic1 = Vector512.Create(ic1); var vic2 = Vector512.Create(ic2);
            var eps = Vector512.Create(c->Eps); var lr = Vector512.Create(c->Lr); var wd = Vector512.Create(c->Wd);
            for (; i + 16 <= e; i += 16)
            {
                var g = gs * Vector512.Load(c->G + i);
                var mi = b1 * Vector512.Load(c->M + i) + b1c * g;
                var vi = b2 * Vector512.Load(c->V + i) + b2c * g * g;
                mi.Store(c->M + i); vi.Store(c->V + i);
                var pi = Vector512.Load(c->P + i);
                (pi - lr * (mi * vic1 / (Vector512.Sqrt(vi * vic2) + eps) + wd * pi)).Store(c->P + i);
            }
        }
        for (; i < e; i++)
        {
            float g = c->GradScale * c->G[i];
            float mi = c->B1 * c->M[i] + (1 - c->B1) * g;
            float vi = c->B2 * c->V[i] + (1 - c->B2) * g * g;
            c->M[i] = mi; c->V[i] = vi;
            c->P[i] -= c->Lr * (mi * ic1 / (MathF.Sqrt(vi * ic2) + c->Eps) + c->Wd * c->P[i]);
        }
    }
}
