using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// DoRA's ops around the LoRA linear: the per-row weight norm ‖W + s·B·A‖, the column scale
/// y = z ⊙ m / norm [+ bias], and its backward with the norm held constant. Simple one-thread-per-output
/// kernels. Matches DoraReference.
/// </summary>
internal sealed class DoraKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, NormArgs> _norm;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, DeviceFloats, ScaleArgs> _scale;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ScaleArgs> _magGrad;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, DropArgs> _dropBackward;

    public DoraKernels(IlgpuBackend b)
    {
        _b = b;
        var acc = b.Accelerator;
        _norm = acc.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, NormArgs>(NormKernel);
        _scale = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, DeviceFloats, ScaleArgs>(ScaleKernel);
        _magGrad = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ScaleArgs>(MagnitudeGradKernel);
        _dropBackward = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, DropArgs>(DropoutBackwardKernel);
    }

    public struct DropArgs
    {
        public ulong Seed;
        public float P, KeepScale;
        /// <summary>Always 0 (a contraction barrier, see DropoutBackwardKernel).</summary>
        public uint Zero;
    }

    public struct NormArgs
    {
        public int K, R, Row0;
        public float Scale;
    }

    public struct ScaleArgs
    {
        public int M, N, HasBias;
    }

    /// <summary>norm[Row0 + j] = ‖w(j,:) + s·B(Row0 + j,:)·A‖ (w holds the rows from Row0 on).</summary>
    [GpuKernel(false)]
    public static void NormKernel(Index1D j, DeviceFloats w, ArrayView<float> a, ArrayView<float> bm, ArrayView<float> norm, NormArgs p)
    {
        int jj = j;
        long row = p.Row0 + jj;
        float ss = 0;
        for (int c = 0; c < p.K; c++)
        {
            float v = w.Load((long)jj * p.K + c);
            for (int q = 0; q < p.R; q++) v += p.Scale * bm[row * p.R + q] * a[(long)q * p.K + c];
            ss += v * v;
        }
        norm[row] = MathF.Sqrt(ss);
    }

    /// <summary>y[i] = z[i]·mag[j]/norm[j] [+ bias[j]], j = i mod N.</summary>
    [GpuKernel(false)]
    public static void ScaleKernel(Index1D i, ArrayView<float> y, ArrayView<float> z, ArrayView<float> mag, ArrayView<float> norm, DeviceFloats bias, ScaleArgs p)
    {
        int idx = i;
        int j = idx % p.N;
        float v = z[idx] * mag[j] / norm[j];
        if (p.HasBias != 0) v += bias.Load(j);
        y[idx] = v;
    }

    /// <summary>dMag[j] += Σ_i dy(i,j)·z(i,j) / norm[j].</summary>
    [GpuKernel(false)]
    public static void MagnitudeGradKernel(Index1D jIndex, ArrayView<float> dy, ArrayView<float> z, ArrayView<float> norm, ArrayView<float> dMag, ScaleArgs p)
    {
        float s = 0;
        int j = jIndex;
        for (int i = 0; i < p.M; i++) s += dy[(long)i * p.N + j] * z[(long)i * p.N + j];
        dMag[j] += s / norm[j];
    }

    /// <summary>dInput[i] += dOut[i]·KeepScale where DropoutHash.Keep(Seed, i, P) (the LoRA forward's mask, regenerated).</summary>
    [GpuKernel(false)]
    public static void DropoutBackwardKernel(Index1D i, ArrayView<float> dInput, ArrayView<float> dOut, DropArgs a)
    {
        if (!DropoutHash.Keep(a.Seed, i, a.P)) return;
        // d + s·c with the product and the sum each rounded to f32, as the CPU computes it. ILGPU emits plain mul.f32 and
        // add.f32, which ptxas may contract into one FFMA (one rounding: other bits). The product goes through its bits
        // xor a launch argument that is always 0, which ptxas cannot see through, so it stays a separate FMUL (one LOP
        // per element; inline mul.rn/add.rn did the same but ILGPU wraps asm operands in local memory: 7 LDL/STL).
        float t = Interop.IntAsFloat(Interop.FloatAsInt(dOut[i] * a.KeepScale) ^ a.Zero);
        dInput[i] = dInput[i] + t;
    }

    public void DropoutBackward(Tensor dInput, Tensor dOut, float dropout, ulong seed, long count)
    {
        const string op = "DropoutBackward";
        DoraHost.DropoutCheck(dInput, dOut, dropout, count, op);
        int n = IlgpuBackend.CheckedCount(count, op);
        if (n == 0) return;
        _dropBackward(n, _b.F32(dInput, "dInput"), _b.F32(dOut, "dOut"), new DropArgs { Seed = seed, P = dropout, KeepScale = 1f / (1f - dropout) });
    }

    public void WeightNorm(Tensor norm, Tensor w, Tensor a, Tensor b, float scale, int n, int k, int r)
    {
        const string op = "DoraWeightNorm";
        IlgpuBackend.Positive(op, ("n", n), ("k", k), ("r", r));
        IlgpuBackend.Need(norm, n, "norm", op);
        IlgpuBackend.Need(w, (long)n * k, "w", op);
        IlgpuBackend.Need(a, (long)r * k, "a", op);
        IlgpuBackend.Need(b, (long)n * r, "b", op);
        if (n == 0) return;
        var av = _b.F32(a, "a");
        var bv = _b.F32(b, "b");
        var nv = _b.F32(norm, "norm");
        if (w.DType != DType.NF4)
        {
            _norm(n, _b.Weight(w, "w"), av, bv, nv, new NormArgs { K = k, R = r, Row0 = 0, Scale = scale });
            return;
        }
        var nf4 = _b.Kernels(x => new Nf4Kernels(x));
        int rows = Nf4Kernels.RowsPerPanel(n, k);
        for (int j0 = 0; j0 < n; j0 += rows)
        {
            int nb = Math.Min(rows, n - j0);
            var panel = nf4.Rows(w, n, k, j0, nb);
            _norm(nb, new DeviceFloats(panel, ArrayView<ushort>.Empty, DeviceFloats.KindF32), av, bv, nv, new NormArgs { K = k, R = r, Row0 = j0, Scale = scale });
        }
    }

    public void Scale(Tensor y, Tensor z, Tensor magnitude, Tensor norm, Tensor? bias, int m, int n)
    {
        const string op = "DoraScale";
        IlgpuBackend.Positive(op, ("m", m), ("n", n));
        IlgpuBackend.Need(y, (long)m * n, "y", op);
        IlgpuBackend.Need(z, (long)m * n, "z", op);
        IlgpuBackend.Need(magnitude, n, "magnitude", op);
        IlgpuBackend.Need(norm, n, "norm", op);
        if (bias is not null) IlgpuBackend.Need(bias, n, "bias", op);
        int count = IlgpuBackend.CheckedCount((long)m * n, op);
        if (count == 0) return;
        _scale(count, _b.F32(y, "y"), _b.F32(z, "z"), _b.F32(magnitude, "magnitude"), _b.F32(norm, "norm"),
            bias is null ? MatMulKernels.None : _b.Floats(bias, "bias"), new ScaleArgs { M = m, N = n, HasBias = bias is null ? 0 : 1 });
    }

    public void ScaleBackward(Tensor dz, Tensor dMagnitude, Tensor dy, Tensor z, Tensor magnitude, Tensor norm, int m, int n)
    {
        const string op = "DoraScaleBackward";
        IlgpuBackend.Positive(op, ("m", m), ("n", n));
        IlgpuBackend.Need(dz, (long)m * n, "dz", op);
        IlgpuBackend.Need(dy, (long)m * n, "dy", op);
        IlgpuBackend.Need(z, (long)m * n, "z", op);
        IlgpuBackend.Need(magnitude, n, "magnitude", op);
        IlgpuBackend.Need(norm, n, "norm", op);
        IlgpuBackend.Need(dMagnitude, n, "dMagnitude", op);
        int count = IlgpuBackend.CheckedCount((long)m * n, op);
        if (n == 0) return;
        var args = new ScaleArgs { M = m, N = n, HasBias = 0 };
        var dyv = _b.F32(dy, "dy");
        _magGrad(n, dyv, _b.F32(z, "z"), _b.F32(norm, "norm"), _b.F32(dMagnitude, "dMagnitude"), args); // before dz may overwrite z
        if (count > 0) _scale(count, _b.F32(dz, "dz"), dyv, _b.F32(magnitude, "magnitude"), _b.F32(norm, "norm"), MatMulKernels.None, args);
    }
}
