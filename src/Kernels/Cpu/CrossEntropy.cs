using System.Numerics.Tensors;

namespace FineTuneNative.Kernels.Cpu;

// Softmax cross-entropy with an ignore index; reference: CrossEntropyReference.
public sealed unsafe partial class CpuBackend
{
    private struct CeCtx { public float* Logits, Losses; public int* Targets; public int M, V, Ignore; public float GradScale; public bool Grad; public float* Scratch; public long Stride; }

    /// <summary>
    /// losses(M) = logsumexp(row) - row[target] (0 for ignored rows); when computeGrad, logits become
    /// gradScale·(softmax(row) - onehot(target)) (zeros for ignored rows). Throws on a target outside [0, V) that
    /// is not the ignore index.
    /// </summary>
    public void CrossEntropy(Tensor logits, Tensor targets, Tensor losses, int m, int v, int ignoreIndex, float gradScale, bool computeGrad)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "CrossEntropy";
        Dims(op, (nameof(m), m), (nameof(v), v));
        var ctx = new CeCtx
        {
            Logits = F32(logits, (long)m * v, nameof(logits), op), Targets = I32(targets, m, nameof(targets), op),
            Losses = F32(losses, m, nameof(losses), op), M = m, V = v, Ignore = ignoreIndex, GradScale = gradScale, Grad = computeGrad,
        };
        for (int i = 0; i < m; i++)
        {
            int t = ctx.Targets[i];
            if (t != ignoreIndex && (uint)t >= (uint)v)
                throw new ArgumentException($"{op}: target {t} at row {i} is outside [0, {v}) and is not the ignore index {ignoreIndex}");
        }
        if (!computeGrad) { EnsureScratch(v); ctx.Scratch = ScratchBase; ctx.Stride = ScratchStride; }
        _pool.For(m, &CeRow, &ctx);
    }

    private static void CeRow(void* p, int i, int worker)
    {
        var c = (CeCtx*)p;
        int v = c->V, target = c->Targets[i];
        var row = new Span<float>(c->Logits + (long)i * v, v);
        if (target == c->Ignore)
        {
            c->Losses[i] = 0;
            if (c->Grad) row.Clear();
            return;
        }
        float max = TensorPrimitives.Max(row);
        float picked = row[target];
        // exp(row - max) in place when the gradient overwrites the logits anyway, else in the row buffer
        var e = c->Grad ? row : new Span<float>(c->Scratch + worker * c->Stride, v);
        TensorPrimitives.Subtract(row, max, e);
        TensorPrimitives.Exp(e, e);
        float sum = TensorPrimitives.Sum(e);
        c->Losses[i] = (float)(Math.Log(sum) + max - picked);
        if (c->Grad)
        {
            TensorPrimitives.Multiply(e, c->GradScale / sum, e);
            e[target] -= c->GradScale;
        }
    }
}
