using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// The LoRA linear y = x·Wᵀ [+ bias] + s·(drop(x)·Aᵀ)·Bᵀ and its backward, as a sequence of tiled matmuls
/// (<see cref="MatMulKernels"/>) plus one dropout kernel. The dropout mask comes from
/// <see cref="DropoutHash"/> on the flat index m·K + k, so it is bit-identical to the CPU's and the backward
/// regenerates it inside the matmul epilogue instead of storing it.
/// </summary>
/// <remarks>
/// Forward saves u(M,R) = drop(x)·Aᵀ and, when p &gt; 0, xDrop(M,K) = drop(x) (needed for dA; regenerating it
/// would cost another pass over x). Matches LoraLinearReference.
/// </remarks>
internal sealed class LoraLinearKernels
{
    private readonly IlgpuBackend _b;
    private readonly MatMulKernels _mm;
    private readonly ColumnSumKernels _columnSum;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, DropoutArgs> _dropout;

    public LoraLinearKernels(IlgpuBackend b)
    {
        _b = b;
        _mm = b.Kernels(x => new MatMulKernels(x));
        _columnSum = b.Kernels(x => new ColumnSumKernels(x));
        _dropout = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, DropoutArgs>(DropoutKernel);
    }

    public struct DropoutArgs
    {
        public ulong Seed;
        public float P, Scale;
    }

    /// <summary>xDrop[i] = keep(seed, i) ? x[i]/(1-p) : 0.</summary>
    [GpuKernel(false)]
    public static void DropoutKernel(Index1D i, ArrayView<float> xDrop, ArrayView<float> x, DropoutArgs a)
        => xDrop[i] = DropoutHash.Keep(a.Seed, i, a.P) ? x[i] * a.Scale : 0f;

    private void Check(string op, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r)
    {
        IlgpuBackend.Positive(op, ("m", m), ("n", n), ("k", k), ("r", r));
        IlgpuBackend.Need(lora.A, (long)r * k, "lora.A", op); // (R, K)
        IlgpuBackend.Need(lora.B, (long)n * r, "lora.B", op); // (N, R)
        IlgpuBackend.Need(u, (long)m * r, "u", op);           // (M, R)
        if (!(lora.Dropout >= 0f && lora.Dropout < 1f))
            throw new ArgumentOutOfRangeException(nameof(lora), $"{op}: LoRA dropout {lora.Dropout} must be in [0, 1)");
        if (lora.Dropout > 0f)
        {
            if (xDrop is null) throw new ArgumentNullException(nameof(xDrop), $"{op}: xDrop (M, K) is required when LoRA dropout > 0");
            IlgpuBackend.Need(xDrop, (long)m * k, "xDrop", op);
        }
    }

    /// <summary>
    /// y = x·Wᵀ [+ bias] + s·u·Bᵀ, or with <paramref name="residual"/> (M, N), not overlapping y, y = residual + ... with
    /// the add in a matmul epilogue (tensor cores: the one launch; SIMT: the base matmul's; NF4: a second pass).
    /// </summary>
    public void Forward(Tensor y, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r, Tensor? residual = null)
    {
        string op = residual is null ? "LoraLinearForward" : "LoraLinearForwardResidual";
        Check(op, lora, u, xDrop, m, n, k, r);
        IlgpuBackend.Need(y, (long)m * n, "y", op);
        IlgpuBackend.Need(x, (long)m * k, "x", op);
        IlgpuBackend.Need(w, (long)n * k, "w", op);
        if (bias is not null) IlgpuBackend.Need(bias, n, "bias", op);
        if (residual is not null) IlgpuBackend.Need(residual, (long)m * n, "residual", op); // (M, N)
        var rv = residual is null ? default : _b.F32(residual, "residual");

        var xv = _b.F32(x, "x");
        var xin = xv;
        if (lora.Dropout > 0f)
        {
            xin = _b.F32(xDrop!, "xDrop");
            int count = IlgpuBackend.CheckedCount((long)m * k, op);
            if (count > 0) _dropout(count, xin, xv, new DropoutArgs { Seed = lora.Seed, P = lora.Dropout, Scale = 1f / (1f - lora.Dropout) });
        }
        var uv = _b.F32(u, "u");
        _mm.Launch(xin, _b.Floats(lora.A, "lora.A"), uv, MatMulKernels.None, MatMulKernels.Nt(m, r, k, 1f, false));
        var p = MatMulKernels.Nt(m, n, k, 1f, false);
        p.HasBias = bias is null ? 0 : 1;
        var yv = _b.F32(y, "y");
        var tc = _mm.TensorCoreFor(w.DType);
        if (tc is not null)
        {
            // y = [residual +] x·Wᵀ + bias + s·u·Bᵀ in one tensor-core launch: the rank-r term as r more reduction steps
            // of the mma over [s·u | B] (rounded to bf16/f16, as autocast rounds PEFT's lora_B input and weight), the
            // residual in the epilogue, instead of passes reading and writing y again.
            bool f16 = w.DType == DType.F16;
            var t = MatMulTensorCoreKernels.WithLoraInMma(MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(p), x, w, f16), u, lora.B, r, lora.Scale, f16);
            tc.Launch(w.DType == DType.F16, _b.Floats(x, "x"), _b.Weight(w, "w"), yv, bias is null ? MatMulKernels.None : _b.Floats(bias, "bias"),
                uv, _b.Floats(lora.B, "lora.B"), t, rv);
            return;
        }
        if (w.DType == DType.NF4) _b.Kernels(b => new Nf4Kernels(b)).Forward(w, xv, yv, bias, m, n, k, 1f, false, op);
        else _mm.Launch(xv, _b.Weight(w, "w"), yv, bias is null ? MatMulKernels.None : _b.Floats(bias, "bias"), p, rv);
        _mm.Launch(uv, _b.Floats(lora.B, "lora.B"), yv, MatMulKernels.None, MatMulKernels.Nt(m, n, r, lora.Scale, true));
        if (residual is not null && w.DType == DType.NF4) _b.Add(y, y, residual);
    }

    public void Backward(Tensor dx, Tensor dy, Tensor x, Tensor w, LoraParams lora, Tensor u, Tensor? xDrop, Tensor g,
        Tensor dA, Tensor dB, Tensor? dW, Tensor? dBias, int m, int n, int k, int r, bool accumulate)
    {
        const string op = "LoraLinearBackward";
        Check(op, lora, u, xDrop, m, n, k, r);
        IlgpuBackend.Need(dx, (long)m * k, "dx", op); // (M, K)
        IlgpuBackend.Need(dy, (long)m * n, "dy", op); // (M, N)
        IlgpuBackend.Need(x, (long)m * k, "x", op);   // (M, K)
        IlgpuBackend.Need(w, (long)n * k, "w", op);   // (N, K)
        IlgpuBackend.Need(g, (long)m * r, "g", op);   // (M, R)
        IlgpuBackend.Need(dA, (long)r * k, "dA", op); // (R, K)
        IlgpuBackend.Need(dB, (long)n * r, "dB", op); // (N, R)
        if (dW is not null) IlgpuBackend.Need(dW, (long)n * k, "dW", op);
        if (dBias is not null) IlgpuBackend.Need(dBias, n, "dBias", op);

        var dyv = _b.F32(dy, "dy");
        var gv = _b.F32(g, "g");
        var xv = _b.F32(x, "x");
        var xin = lora.Dropout > 0f ? _b.F32(xDrop!, "xDrop") : xv;
        var a = _b.Floats(lora.A, "lora.A");
        float s = lora.Scale;

        // g(M,R) = dy·B
        _mm.Launch(dyv, _b.Floats(lora.B, "lora.B"), gv, MatMulKernels.None, MatMulKernels.Nn(m, r, n, 1f, false));
        // dB(N,R) += s·dyᵀ·u
        _mm.Launch(dyv, new DeviceFloats(_b.F32(u, "u"), ArrayView<ushort>.Empty, DeviceFloats.KindF32), _b.F32(dB, "dB"), MatMulKernels.None, MatMulKernels.Tn(n, r, m, s, true));
        // dA(R,K) += s·gᵀ·drop(x)
        _mm.Launch(gv, new DeviceFloats(xin, ArrayView<ushort>.Empty, DeviceFloats.KindF32), _b.F32(dA, "dA"), MatMulKernels.None, MatMulKernels.Tn(r, k, m, s, true));
        // dx(M,K) (+)= dy·W, then += s·mask⊙(g·A)/(1-p)
        var dxv = _b.F32(dx, "dx");
        var tc = _mm.TensorCoreFor(w.DType);
        if (tc is not null)
        {
            // dx (+)= dy·W + s·mask⊙(g·A)/(1-p) in one tensor-core launch (A(r, j) = a[r·K + j] in the epilogue).
            var t = MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(MatMulKernels.Nn(m, k, n, 1f, accumulate)), dy, w, w.DType == DType.F16);
            t.LoraRank = r;
            t.Slj = 1;
            t.Slq = k;
            t.LoraScale = s;
            if (lora.Dropout > 0f)
            {
                t.Dropout = 1;
                t.DropP = lora.Dropout;
                t.DropScale = 1f / (1f - lora.Dropout);
                t.Seed = lora.Seed;
            }
            tc.Launch(w.DType == DType.F16, _b.Floats(dy, "dy"), _b.Weight(w, "w"), dxv, MatMulKernels.None, gv, a, t);
        }
        else
        {
            if (w.DType == DType.NF4) _b.Kernels(b => new Nf4Kernels(b)).BackwardInput(w, dyv, dxv, m, n, k, accumulate, op);
            else _mm.Launch(dyv, _b.Weight(w, "w"), dxv, MatMulKernels.None, MatMulKernels.Nn(m, k, n, 1f, accumulate));
            var p = MatMulKernels.Nn(m, k, r, s, true);
            if (lora.Dropout > 0f)
            {
                p.Dropout = 1;
                p.DropP = lora.Dropout;
                p.DropScale = 1f / (1f - lora.Dropout);
                p.Seed = lora.Seed;
            }
            _mm.Launch(gv, a, dxv, MatMulKernels.None, p);
        }
        // base parameters, only when trained
        if (dW is not null)
            _mm.Launch(dyv, new DeviceFloats(xv, ArrayView<ushort>.Empty, DeviceFloats.KindF32), _b.F32(dW, "dW"), MatMulKernels.None, MatMulKernels.Tn(n, k, m, 1f, true));
        if (dBias is not null) _columnSum.Accumulate(dBias, dy, m, n, op);
    }
}
