using System.Numerics.Tensors;

namespace FineTuneNative.Kernels.Cpu;

// Fill, Copy, Add, Scale and SumOfSquares: flat loops split into fixed chunks (the chunking does not depend on the
// thread count, so SumOfSquares gives the same bits on any number of threads).
public sealed unsafe partial class CpuBackend
{
    private const int ElementChunk = 1 << 15;

    private struct EwCtx
    {
        public byte* Dst, A, B;
        public long N;
        public float S;
        public DType DstType, SrcType;
        public double* Partial;
    }

    private static int Chunks(long n) => (int)((n + ElementChunk - 1) / ElementChunk);

    public void Fill(Tensor t, float value)
    {
        using var opScope = _opLock.EnterScope();
        byte* p = Ptr(t, nameof(t));
        var ctx = new EwCtx { Dst = p, N = t.Length, S = value, DstType = t.DType };
        _pool.For(Chunks(t.Length), &FillBody, &ctx);
    }

    private static void FillBody(void* c, int chunk, int worker)
    {
        var x = (EwCtx*)c;
        long s = (long)chunk * ElementChunk, n = Math.Min(ElementChunk, x->N - s);
        switch (x->DstType)
        {
            case DType.F32: new Span<float>((float*)x->Dst + s, (int)n).Fill(x->S); break;
            case DType.BF16: new Span<ushort>((ushort*)x->Dst + s, (int)n).Fill(HalfBits.F32ToBf16(x->S)); break;
            case DType.F16: new Span<ushort>((ushort*)x->Dst + s, (int)n).Fill(HalfBits.F32ToF16(x->S)); break;
            case DType.I32: new Span<int>((int*)x->Dst + s, (int)n).Fill((int)x->S); break;
        }
    }

    public void Copy(Tensor dst, Tensor src)
    {
        using var opScope = _opLock.EnterScope();
        byte* d = Ptr(dst, nameof(dst)), s = Ptr(src, nameof(src));
        if (dst.Length != src.Length) throw new ArgumentException($"Copy: dst {dst.Describe()} and src {src.Describe()} differ in length");
        if ((dst.DType == DType.I32) != (src.DType == DType.I32))
            throw new ArgumentException($"Copy: cannot convert between {src.Describe()} and {dst.Describe()}");
        var ctx = new EwCtx { Dst = d, A = s, N = dst.Length, DstType = dst.DType, SrcType = src.DType };
        _pool.For(Chunks(dst.Length), &CopyBody, &ctx);
    }

    private static void CopyBody(void* c, int chunk, int worker)
    {
        var x = (EwCtx*)c;
        long s = (long)chunk * ElementChunk, n = Math.Min(ElementChunk, x->N - s);
        if (x->DstType == x->SrcType)
        {
            int size = x->DstType.SizeOf();
            Buffer.MemoryCopy(x->A + s * size, x->Dst + s * size, n * size, n * size);
            return;
        }
        float* tmp = stackalloc float[1024];
        for (long o = 0; o < n; o += 1024)
        {
            long m = Math.Min(1024, n - o);
            float* f = x->SrcType == DType.F32 ? (float*)x->A + s + o : tmp;
            if (x->SrcType == DType.BF16) HalfConvert.Bf16ToF32((ushort*)x->A + s + o, tmp, m);
            else if (x->SrcType == DType.F16) HalfConvert.F16ToF32((ushort*)x->A + s + o, tmp, m);
            if (x->DstType == DType.F32) Buffer.MemoryCopy(f, (float*)x->Dst + s + o, m * 4, m * 4);
            else if (x->DstType == DType.BF16) HalfConvert.F32ToBf16(f, (ushort*)x->Dst + s + o, m);
            else HalfConvert.F32ToF16(f, (ushort*)x->Dst + s + o, m);
        }
    }

    public void Add(Tensor dst, Tensor a, Tensor b)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "Add";
        long n = dst.Length;
        var ctx = new EwCtx { Dst = (byte*)F32(dst, n, nameof(dst), op), A = (byte*)F32(a, n, nameof(a), op), B = (byte*)F32(b, n, nameof(b), op), N = n };
        if (a.Length != n || b.Length != n) throw new ArgumentException($"Add: lengths differ: dst {dst.Describe()}, a {a.Describe()}, b {b.Describe()}");
        _pool.For(Chunks(n), &AddBody, &ctx);
    }

    private static void AddBody(void* c, int chunk, int worker)
    {
        var x = (EwCtx*)c;
        long s = (long)chunk * ElementChunk;
        int n = (int)Math.Min(ElementChunk, x->N - s);
        TensorPrimitives.Add(new ReadOnlySpan<float>((float*)x->A + s, n), new ReadOnlySpan<float>((float*)x->B + s, n), new Span<float>((float*)x->Dst + s, n));
    }

    public void Scale(Tensor t, float s)
    {
        using var opScope = _opLock.EnterScope();
        var ctx = new EwCtx { Dst = (byte*)F32(t, t.Length, nameof(t), "Scale"), N = t.Length, S = s };
        _pool.For(Chunks(t.Length), &ScaleBody, &ctx);
    }

    private static void ScaleBody(void* c, int chunk, int worker)
    {
        var x = (EwCtx*)c;
        long s = (long)chunk * ElementChunk;
        int n = (int)Math.Min(ElementChunk, x->N - s);
        var span = new Span<float>((float*)x->Dst + s, n);
        TensorPrimitives.Multiply(span, x->S, span);
    }

    public double SumOfSquares(Tensor t)
    {
        using var opScope = _opLock.EnterScope();
        return SumOfSquaresCore(t);
    }

    /// <summary>
    /// clip[0] = ‖g‖ over all grads (Σ in double, tensor by tensor in list order); clip[1] = the clipping scale (NaN when
    /// the norm is not finite), computed in double exactly as the ILGPU finish kernel does.
    /// </summary>
    public void GradNormClip(IReadOnlyList<Tensor> grads, Tensor clip, float maxNorm)
    {
        using var opScope = _opLock.EnterScope();
        float* c = F32(clip, 2, nameof(clip), "GradNormClip");
        double sq = 0;
        for (int i = 0; i < grads.Count; i++)
        {
            if (grads[i].DType != DType.F32) throw new ArgumentException($"GradNormClip: grads[{i}] {grads[i].Describe()} must be f32");
            sq += SumOfSquaresCore(grads[i]);
        }
        double norm = Math.Sqrt(sq);
        c[0] = (float)norm;
        c[1] = (float)MultiTensorHost.ClipScale(norm, maxNorm);
    }

    private double SumOfSquaresCore(Tensor t)
    {
        byte* p = Ptr(t, nameof(t));
        if (t.DType != DType.F32 && t.DType != DType.BF16) throw new ArgumentException($"SumOfSquares: {t.Describe()} must be f32 or bf16");
        int chunks = Chunks(t.Length);
        double* partial = stackalloc double[Math.Min(chunks, 4096)];
        double total = 0;
        // at most 4096 chunks per pass keeps the partials on the stack
        for (int c0 = 0; c0 < chunks; c0 += 4096)
        {
            int cn = Math.Min(4096, chunks - c0);
            long start = (long)c0 * ElementChunk;
            var ctx = new EwCtx { A = p + start * t.DType.SizeOf(), N = t.Length - start, SrcType = t.DType, Partial = partial };
            _pool.For(cn, &SumSquaresBody, &ctx);
            for (int i = 0; i < cn; i++) total += partial[i];
        }
        return total;
    }

    private static void SumSquaresBody(void* c, int chunk, int worker)
    {
        var x = (EwCtx*)c;
        long s = (long)chunk * ElementChunk;
        int n = (int)Math.Min(ElementChunk, x->N - s);
        double acc = 0;
        float* tmp = stackalloc float[1024];
        for (int o = 0; o < n; o += 1024)
        {
            int m = Math.Min(1024, n - o);
            float* f;
            if (x->SrcType == DType.F32) f = (float*)x->A + s + o;
            else { HalfConvert.Bf16ToF32((ushort*)x->A + s + o, tmp, m); f = tmp; }
            // f32 sums of 1024 squares (relative error ~1e-6), added in double
            acc += TensorPrimitives.SumOfSquares(new ReadOnlySpan<float>(f, m));
        }
        x->Partial[chunk] = acc;
    }
}
