namespace FineTuneNative.Kernels.Cpu;

// The nn.Linear products, all through the packed GEMM (Gemm.cs); reference: MatMulReference.
public sealed unsafe partial class CpuBackend
{
    /// <summary>y(M,N) (+)= x(M,K) · w(N,K)ᵀ [+ bias(N)]; w f32, bf16 or nf4 (Nf4MatMul.cs). Matches MatMulReference.Forward.</summary>
    public void MatMul(Tensor y, Tensor x, Tensor w, Tensor? bias, int m, int n, int k, bool accumulate)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "MatMul";
        Dims(op, (nameof(m), m), (nameof(n), n), (nameof(k), k));
        float* py = F32(y, (long)m * n, nameof(y), op);
        float* px = F32(x, (long)m * k, nameof(x), op);
        float* pb = bias != null ? F32(bias, n, nameof(bias), op) : null;
        if (w.DType == DType.NF4) { Nf4Forward(w, op, m, n, k, px, py, 1f, accumulate, pb); return; }
        void* pw = Weight(w, (long)n * k, nameof(w), op, out bool bf16);
        Gemm.Run(this, m, n, k, px, k, false, pw, bf16, k, true, py, n, 1f, accumulate, pb);
    }

    /// <summary>dx(M,K) (+)= dy(M,N) · w(N,K). Matches MatMulReference.BackwardInput.</summary>
    /// <remarks>Overwrites dx unless <paramref name="accumulate"/> (activation gradient).</remarks>
    public void MatMulBackwardInput(Tensor dx, Tensor dy, Tensor w, int m, int n, int k, bool accumulate)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "MatMulBackwardInput";
        Dims(op, (nameof(m), m), (nameof(n), n), (nameof(k), k));
        float* pdx = F32(dx, (long)m * k, nameof(dx), op);
        float* pdy = F32(dy, (long)m * n, nameof(dy), op);
        if (w.DType == DType.NF4) { Nf4BackwardInput(w, op, m, n, k, pdy, pdx, accumulate); return; }
        void* pw = Weight(w, (long)n * k, nameof(w), op, out bool bf16);
        Gemm.Run(this, m, k, n, pdy, n, false, pw, bf16, k, false, pdx, k, 1f, accumulate, null);
    }

    /// <summary>dw(N,K) += dy(M,N)ᵀ · x(M,K); dBias(N) += Σ_m dy(m,:). Matches MatMulReference.BackwardWeight/BackwardBias.</summary>
    /// <remarks>Accumulates (+=) into dw and dBias: parameter gradients add up over micro-batches.</remarks>
    public void MatMulBackwardWeight(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "MatMulBackwardWeight";
        Dims(op, (nameof(m), m), (nameof(n), n), (nameof(k), k));
        float* pdw = F32(dw, (long)n * k, nameof(dw), op);
        float* pdy = F32(dy, (long)m * n, nameof(dy), op);
        float* px = F32(x, (long)m * k, nameof(x), op);
        float* pdb = dBias != null ? F32(dBias, n, nameof(dBias), op) : null;
        WeightGrad(pdw, pdb, pdy, px, m, n, k, 1f);
    }

    /// <summary>dw(N,K) += alpha·dy(M,N)ᵀ·x(M,K); dBias(N) += alpha·Σ_m dy (when not null).</summary>
    internal void WeightGrad(float* dw, float* dBias, float* dy, float* x, int m, int n, int k, float alpha)
    {
        if (!Gemm.TryWeightGradFewRows(this, dw, dy, x, m, n, k, alpha))
            Gemm.Run(this, n, k, m, dy, n, true, x, false, k, false, dw, k, alpha, true, null);
        if (dBias != null) ColumnSum(dBias, dy, m, n, alpha);
    }

    private struct ColSumCtx { public float* Dst, Src; public int M, N; public float Alpha; }
    private const int ColBlock = 256;

    /// <summary>dst(N) += alpha·Σ_m src(m, :), threads over column blocks (no write conflicts).</summary>
    internal void ColumnSum(float* dst, float* src, int m, int n, float alpha)
    {
        var ctx = new ColSumCtx { Dst = dst, Src = src, M = m, N = n, Alpha = alpha };
        _pool.For((n + ColBlock - 1) / ColBlock, &ColumnSumBody, &ctx);
    }

    private static void ColumnSumBody(void* p, int block, int worker)
    {
        var x = (ColSumCtx*)p;
        int j0 = block * ColBlock, nj = Math.Min(ColBlock, x->N - j0);
        float* acc = stackalloc float[ColBlock];
        new Span<float>(acc, nj).Clear();
        for (int i = 0; i < x->M; i++)
        {
            var row = new ReadOnlySpan<float>(x->Src + (long)i * x->N + j0, nj);
            var a = new Span<float>(acc, nj);
            System.Numerics.Tensors.TensorPrimitives.Add(a, row, a);
        }
        for (int j = 0; j < nj; j++) x->Dst[j0 + j] += x->Alpha * acc[j];
    }
}

// The packed-panel buffers of the GEMM, shared by the pool's threads (ops run one at a time per backend).
public sealed unsafe partial class CpuBackend
{
    private float* _gemmA, _gemmB, _gemmU;
    private long _gemmACap, _gemmBCap, _gemmUCap;

    private int* _gemmFlags;
    private int _gemmFlagsCap;

    /// <summary>The per-panel pack states of one GEMM region (Gemm.Claim); grows once, then reused.</summary>
    internal int* GemmFlags(int count)
    {
        if (count > _gemmFlagsCap)
        {
            if (_gemmFlags != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmFlags);
            _gemmFlags = null;
            _gemmFlags = (int*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)(count * 4 + 64), 64);
            _gemmFlagsCap = count;
        }
        return _gemmFlags;
    }

    /// <summary>The packed rank update of a fused product (Gemm.RankUpdate); grows once, then reused.</summary>
    internal float* GemmUpdateBuffer(long floats)
    {
        if (floats > _gemmUCap)
        {
            if (_gemmU != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmU);
            _gemmU = null;
            _gemmU = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)(floats * 4 + 256), 64);
            _gemmUCap = floats;
        }
        return _gemmU;
    }

    /// <summary>Packed A (aFloats) and packed B (bFloats) buffers; grow once, then reused by every GEMM.</summary>
    internal void GemmBuffers(long aFloats, long bFloats, out float* a, out float* b)
    {
        if (aFloats > _gemmACap)
        {
            if (_gemmA != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmA);
            _gemmA = null;
            _gemmA = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)(aFloats * 4 + 256), 64);
            _gemmACap = aFloats;
        }
        if (bFloats > _gemmBCap)
        {
            if (_gemmB != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmB);
            _gemmB = null;
            _gemmB = (float*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)(bFloats * 4 + 256), 64);
            _gemmBCap = bFloats;
        }
        a = _gemmA;
        b = _gemmB;
    }

    private void FreeGemmBuffers()
    {
        if (_gemmA != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmA);
        if (_gemmB != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmB);
        if (_gemmU != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmU);
        if (_gemmFlags != null) System.Runtime.InteropServices.NativeMemory.AlignedFree(_gemmFlags);
        _gemmFlags = null;
        _gemmFlagsCap = 0;
        _gemmA = _gemmB = _gemmU = null;
        _gemmACap = _gemmBCap = _gemmUCap = 0;
    }
}
