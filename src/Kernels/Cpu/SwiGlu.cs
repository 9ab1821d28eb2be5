using System.Numerics.Tensors;

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
        float* sig = stackalloc float[SwiBlock];
        for (long o = s; o < e; o += SwiBlock)
        {
            int n = (int)Math.Min(SwiBlock, e - o);
            var g = new ReadOnlySpan<float>(c->Gate + o, n);
            var h = new Span<float>(c->H + o, n);
            var sg = new Span<float>(sig, n);
            TensorPrimitives.Sigmoid(g, sg);
            TensorPrimitives.Multiply(g, sg, h);
            TensorPrimitives.Multiply(h, new ReadOnlySpan<float>(c->Up + o, n), h);
        }
    }

    private const int SwiBlock = 1024; // L1-sized sub-blocks for the multi-pass vector form

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
        float* buf = stackalloc float[2 * SwiBlock];
        for (long o = s; o < e; o += SwiBlock)
        {
            int n = (int)Math.Min(SwiBlock, e - o);
            var g = new ReadOnlySpan<float>(c->Gate + o, n);
            var u = new ReadOnlySpan<float>(c->Up + o, n);
            var dh = new ReadOnlySpan<float>(c->Dh + o, n);
            var sg = new Span<float>(buf, n);
            var t = new Span<float>(buf + SwiBlock, n);
            var dg = new Span<float>(c->DGate + o, n);
            var du = new Span<float>(c->DUp + o, n);
            TensorPrimitives.Sigmoid(g, sg);
            TensorPrimitives.Multiply(g, sg, t);             // silu(g)
            TensorPrimitives.Multiply(dh, t, du);            // dUp = dh·silu(g)
            TensorPrimitives.Subtract(g, t, t);              // g - silu(g) = g(1 - σ)
            TensorPrimitives.Add(t, 1f, t);                  // 1 + g(1 - σ)
            TensorPrimitives.Multiply(t, sg, t);             // σ(1 + g(1 - σ)) = silu'(g)
            TensorPrimitives.Multiply(t, u, t);
            TensorPrimitives.Multiply(t, dh, dg);            // dGate = dh·up·silu'(g)
        }
    }
}
