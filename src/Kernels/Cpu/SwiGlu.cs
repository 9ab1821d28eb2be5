namespace FineTuneNative.Kernels.Cpu;

// SwiGLU h = silu(gate) ⊙ up; reference: SwiGluReference.
public sealed unsafe partial class CpuBackend
{
    private struct SwiCtx { public float* H, Gate, Up, DGate, DUp, Dh; public long N; }

    /// <summary>h = silu(gate) ⊙ up, silu(g) = g/(1 + e^-g). Saves nothing: the backward reads gate and up.</summary>
    public void SwiGluForward(Tensor h, Tensor gate, Tensor up, long count)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "SwiGluForward";
        Dims(op, (nameof(count), count));
        var ctx = new SwiCtx { H = F32(h, count, nameof(h), op), Gate = F32(gate, count, nameof(gate), op), Up = F32(up, count, nameof(up), op), N = count };
        _pool.For(Chunks(count), &SwiForwardBody, &ctx);
    }

    private static void SwiForwardBody(void* p, int chunk, int worker)
    {
        var c = (SwiCtx*)p;
        long s = (long)chunk * ElementChunk, e = Math.Min(c->N, s + ElementChunk);
        for (long i = s; i < e; i++)
        {
            float g = c->Gate[i];
            c->H[i] = g / (1f + MathF.Exp(-g)) * c->Up[i];
        }
    }

    /// <summary>dGate = dh ⊙ up ⊙ σ(g)(1 + g(1 - σ(g))); dUp = dh ⊙ silu(g). Both overwritten.</summary>
    public void SwiGluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long count)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "SwiGluBackward";
        Dims(op, (nameof(count), count));
        var ctx = new SwiCtx
        {
            DGate = F32(dGate, count, nameof(dGate), op), DUp = F32(dUp, count, nameof(dUp), op), Dh = F32(dh, count, nameof(dh), op),
            Gate = F32(gate, count, nameof(gate), op), Up = F32(up, count, nameof(up), op), N = count,
        };
        _pool.For(Chunks(count), &SwiBackwardBody, &ctx);
    }

    private static void SwiBackwardBody(void* p, int chunk, int worker)
    {
        var c = (SwiCtx*)p;
        long s = (long)chunk * ElementChunk, e = Math.Min(c->N, s + ElementChunk);
        for (long i = s; i < e; i++)
        {
            float g = c->Gate[i], u = c->Up[i], d = c->Dh[i];
            float sig = 1f / (1f + MathF.Exp(-g));
            c->DGate[i] = d * u * sig * (1f + g * (1f - sig));
            c->DUp[i] = d * g * sig;
        }
    }
}
