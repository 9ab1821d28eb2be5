using System.Runtime.CompilerServices;
using System.Numerics.Tensors;
using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

// DoRA's three ops around the LoRA linear (the weight norm, the column scale and its backward); reference: DoraReference.
public sealed unsafe partial class CpuBackend
{
    /// <summary>norm(N) = ‖W(j,:) + s·B(j,:)·A‖₂ per output row (W f32, bf16 or nf4), threads over rows.</summary>
    public void DoraWeightNorm(Tensor norm, Tensor w, Tensor a, Tensor b, float scale, int n, int k, int r)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "DoraWeightNorm";
        Dims(op, (nameof(n), n), (nameof(k), k), (nameof(r), r));
        var ctx = new NormCtx
        {
            Norm = F32(norm, n, nameof(norm), op),
            A = F32(a, (long)r * k, nameof(a), op),
            B = F32(b, (long)n * r, nameof(b), op),
            Scale = scale, N = n, K = k, R = r,
        };
        if (w.DType == DType.NF4) { ctx.W = Nf4Weight(w, (long)n * k, nameof(w), op); ctx.Kind = 2; }
        else { ctx.W = Weight(w, (long)n * k, nameof(w), op, out bool bf16); ctx.Kind = bf16 ? 1 : 0; }
        EnsureScratch(k);
        ctx.Scratch = ScratchBase; ctx.Stride = ScratchStride;
        _pool.For(n, &NormRowBody, &ctx);
    }

    private struct NormCtx
    {
        public float* Norm, A, B; public void* W; public int Kind; public float Scale; public int N, K, R;
        public float* Scratch; public long Stride;
    }

    private static void NormRowBody(void* p, int j, int worker)
    {
        var c = (NormCtx*)p;
        int k = c->K;
        float* row = c->Scratch + worker * c->Stride;
        long off = (long)j * k;
        if (c->Kind == 0) Buffer.MemoryCopy((float*)c->W + off, row, 4L * k, 4L * k);
        else if (c->Kind == 1) HalfConvert.Bf16ToF32((ushort*)c->W + off, row, k);
        else Nf4.Dequantize((byte*)c->W, (long)c->N * k, off, k, row);
        var rs = new Span<float>(row, k);
        for (int q = 0; q < c->R; q++)
            TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(c->A + (long)q * k, k), c->Scale * c->B[(long)j * c->R + q], rs, rs);
        c->Norm[j] = TensorPrimitives.Norm<float>(rs);
    }

    /// <summary>y(M,N) = z ⊙ (magnitude / norm) [+ bias] per column; y may alias z.</summary>
    public void DoraScale(Tensor y, Tensor z, Tensor magnitude, Tensor norm, Tensor? bias, int m, int n)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "DoraScale";
        Dims(op, (nameof(m), m), (nameof(n), n));
        var ctx = new ScaleCtx
        {
            Y = F32(y, (long)m * n, nameof(y), op), Z = F32(z, (long)m * n, nameof(z), op),
            Mag = F32(magnitude, n, nameof(magnitude), op), Norm = F32(norm, n, nameof(norm), op),
            Bias = bias != null ? F32(bias, n, nameof(bias), op) : null, N = n,
        };
        _pool.For(m, &ScaleRowBody, &ctx);
    }

    private struct ScaleCtx { public float* Y, Z, Mag, Norm, Bias, DMag, DY; public int M, N; }

    private static void ScaleRowBody(void* p, int i, int worker)
    {
        var c = (ScaleCtx*)p;
        int n = c->N;
        var y = new Span<float>(c->Y + (long)i * n, n);
        TensorPrimitives.Multiply(new ReadOnlySpan<float>(c->Z + (long)i * n, n), new ReadOnlySpan<float>(c->Mag, n), y);
        TensorPrimitives.Divide(y, new ReadOnlySpan<float>(c->Norm, n), y);
        if (c->Bias != null) TensorPrimitives.Add(y, new ReadOnlySpan<float>(c->Bias, n), y);
    }

    /// <summary>
    /// Backward of <see cref="DoraScale"/> with the norm held constant: dMagnitude(N) += Σ_m dy ⊙ z / norm (accumulated);
    /// dz(M,N) = dy ⊙ magnitude / norm (overwritten; dz may alias z or dy).
    /// </summary>
    public void DoraScaleBackward(Tensor dz, Tensor dMagnitude, Tensor dy, Tensor z, Tensor magnitude, Tensor norm, int m, int n)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "DoraScaleBackward";
        Dims(op, (nameof(m), m), (nameof(n), n));
        var ctx = new ScaleCtx
        {
            Y = F32(dz, (long)m * n, nameof(dz), op), Z = F32(z, (long)m * n, nameof(z), op), DY = F32(dy, (long)m * n, nameof(dy), op),
            Mag = F32(magnitude, n, nameof(magnitude), op), Norm = F32(norm, n, nameof(norm), op),
            DMag = F32(dMagnitude, n, nameof(dMagnitude), op), M = m, N = n,
        };
        _pool.For((n + ColBlock - 1) / ColBlock, &MagGradBody, &ctx); // reads z before dz overwrites it
        ctx.Z = ctx.DY;
        _pool.For(m, &ScaleRowBody, &ctx);
    }

    private static void MagGradBody(void* p, int block, int worker)
    {
        var c = (ScaleCtx*)p;
        int j0 = block * ColBlock, nj = Math.Min(ColBlock, c->N - j0);
        float* acc = stackalloc float[ColBlock];
        var a = new Span<float>(acc, nj);
        a.Clear();
        for (int i = 0; i < c->M; i++)
        {
            long o = (long)i * c->N + j0;
            TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(c->DY + o, nj), new ReadOnlySpan<float>(c->Z + o, nj), a, a);
        }
        for (int j = 0; j < nj; j++) c->DMag[j0 + j] += acc[j] / c->Norm[j0 + j];
    }

    /// <summary>
    /// dInput(count) += dOut ⊙ mask / (1 − p): the LoRA-input dropout backward with the mask regenerated from DropoutHash
    /// (element i kept iff Keep(seed, i, p)). Sixteen hashes at a time in Vector512&lt;ulong&gt; (the splitmix64 finaliser),
    /// kept iff the hash's top 24 bits ≥ ⌈p·2²⁴⌉ (the same test as Uniform ≥ p, exactly); fixed chunks over the pool.
    /// </summary>
    public void DropoutBackward(Tensor dInput, Tensor dOut, float dropout, ulong seed, long count)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "DropoutBackward";
        DoraHost.DropoutCheck(dInput, dOut, dropout, count, op);
        var ctx = new DropBackCtx
        {
            Dst = F32(dInput, count, nameof(dInput), op), Src = F32(dOut, count, nameof(dOut), op), N = count, Seed = seed, P = dropout,
            KeepScale = 1f / (1f - dropout), Threshold = (ulong)Math.Ceiling(dropout * 16777216.0),
        };
        _pool.For(Chunks(count), &DropBackBody, &ctx);
    }

    private struct DropBackCtx { public float* Dst, Src; public long N; public ulong Seed, Threshold; public float P, KeepScale; }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)] // Vector512 code: never run at tier 0 (about 20x slower)
    private static void DropBackBody(void* p, int chunk, int worker)
    {
        var c = (DropBackCtx*)p;
        long s = (long)chunk * ElementChunk, e = Math.Min(s + ElementChunk, c->N);
        const ulong Phi = 0x9E3779B97F4A7C15UL, Phi8 = unchecked(8 * Phi);
        var lanes = Vector512.Create(0UL, 1, 2, 3, 4, 5, 6, 7) * Phi;
        var threshold = Vector512.Create(c->Threshold);
        var scale = Vector512.Create(c->KeepScale);
        long i = s;
        for (; i + 16 <= e; i += 16)
        {
            var z0 = Vector512.Create(c->Seed + Phi * (ulong)(i + 1)) + lanes;   // index i .. i+7 (the hash counts i + 1)
            var z1 = z0 + Vector512.Create(Phi8);                                  // i+8 .. i+15
            var keep = Vector512.Narrow(Vector512.GreaterThanOrEqual(Vector512.ShiftRightLogical(Mix(z0), 40), threshold),
                                        Vector512.GreaterThanOrEqual(Vector512.ShiftRightLogical(Mix(z1), 40), threshold)).AsSingle();
            var d = Vector512.Load(c->Dst + i);
            Vector512.ConditionalSelect(keep, d + Vector512.Load(c->Src + i) * scale, d).Store(c->Dst + i);
        }
        for (; i < e; i++)
            if (DropoutHash.Keep(c->Seed, i, c->P)) c->Dst[i] += c->Src[i] * c->KeepScale;
    }

    /// <summary>The splitmix64 finaliser of DropoutHash.Hash, eight lanes at once.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<ulong> Mix(Vector512<ulong> z)
    {
        z = (z ^ Vector512.ShiftRightLogical(z, 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ Vector512.ShiftRightLogical(z, 27)) * 0x94D049BB133111EBUL;
        return z ^ Vector512.ShiftRightLogical(z, 31);
    }
}
