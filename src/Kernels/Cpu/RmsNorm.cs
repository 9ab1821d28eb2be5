using System.Numerics.Tensors;

namespace FineTuneNative.Kernels.Cpu;

// RMSNorm forward and backward; reference: RmsNormReference.
public sealed unsafe partial class CpuBackend
{
    private struct RmsCtx { public float* Y, Rstd, X, W, Dy, Dx, Dw; public int M, C; public float Eps; public bool Acc; }

    /// <summary>y(M,C) = x / sqrt(mean(x²) + eps) ⊙ w(C). Saves rstd(M) (one float per row, cheaper than recomputing the row sums).</summary>
    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int m, int c, float eps)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "RmsNormForward";
        Dims(op, (nameof(m), m), (nameof(c), c));
        var ctx = new RmsCtx
        {
            Y = F32(y, (long)m * c, nameof(y), op), Rstd = F32(rstd, m, nameof(rstd), op),
            X = F32(x, (long)m * c, nameof(x), op), W = F32(w, c, nameof(w), op), M = m, C = c, Eps = eps,
        };
        _pool.For(m, &RmsForwardRow, &ctx);
    }

    private static void RmsForwardRow(void* p, int i, int worker)
    {
        var r = (RmsCtx*)p;
        int c = r->C;
        var x = new ReadOnlySpan<float>(r->X + (long)i * c, c);
        var y = new Span<float>(r->Y + (long)i * c, c);
        float rs = 1f / MathF.Sqrt(TensorPrimitives.SumOfSquares(x) / c + r->Eps);
        r->Rstd[i] = rs;
        TensorPrimitives.Multiply(x, rs, y);
        TensorPrimitives.Multiply(y, new ReadOnlySpan<float>(r->W, c), y);
    }

    /// <summary>
    /// dx(M,C) = rstd·(w⊙dy) - rstd³/C · x · Σ(dy⊙w⊙x), overwritten unless <paramref name="accumulate"/>;
    /// dw(C) += Σ_m dy ⊙ x·rstd (parameter gradient, accumulated).
    /// </summary>
    public void RmsNormBackward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor rstd, int m, int c, bool accumulate)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "RmsNormBackward";
        Dims(op, (nameof(m), m), (nameof(c), c));
        var ctx = new RmsCtx
        {
            Dx = F32(dx, (long)m * c, nameof(dx), op), Dw = F32(dw, c, nameof(dw), op), Dy = F32(dy, (long)m * c, nameof(dy), op),
            X = F32(x, (long)m * c, nameof(x), op), W = F32(w, c, nameof(w), op), Rstd = F32(rstd, m, nameof(rstd), op),
            M = m, C = c, Acc = accumulate,
        };
        EnsureScratch(c);
        _pool.For(m, &RmsBackwardRow, &ctx);
        // dw: threads over column blocks so no two threads write the same element
        _pool.For((c + ColBlock - 1) / ColBlock, &RmsBackwardDw, &ctx);
    }

    private static void RmsBackwardRow(void* p, int i, int worker)
    {
        var r = (RmsCtx*)p;
        int c = r->C;
        long o = (long)i * c;
        float* x = r->X + o, dy = r->Dy + o, dx = r->Dx + o, w = r->W;
        float rs = r->Rstd[i];
        double dot = 0;
        for (int j = 0; j < c; j++) dot += dy[j] * w[j] * x[j];
        float k1 = (float)(rs * rs * rs * dot / c);
        for (int j = 0; j < c; j++)
        {
            float v = rs * w[j] * dy[j] - k1 * x[j];
            dx[j] = r->Acc ? dx[j] + v : v;
        }
    }

    private static void RmsBackwardDw(void* p, int block, int worker)
    {
        var r = (RmsCtx*)p;
        int j0 = block * ColBlock, nj = Math.Min(ColBlock, r->C - j0);
        float* acc = stackalloc float[ColBlock];
        for (int j = 0; j < nj; j++) acc[j] = 0;
        for (int i = 0; i < r->M; i++)
        {
            long o = (long)i * r->C + j0;
            float rs = r->Rstd[i];
            for (int j = 0; j < nj; j++) acc[j] += r->Dy[o + j] * r->X[o + j] * rs;
        }
        for (int j = 0; j < nj; j++) r->Dw[j0 + j] += acc[j];
    }
}
