namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// DoRA's linear in plain double loops, PEFT's variant: y = m ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) / ‖W + s·B·A‖_row [+ bias]
/// with the norm per output row (over the input dimension), treated as a constant in the backward (PEFT detaches
/// it, DoRA paper §4.3). Without dropout this is exactly PEFT's result = base + (m/‖·‖ - 1)·base + m/‖·‖·s·lora.
/// </summary>
public static class DoraReference
{
    /// <summary>norm(N) = ‖W(j,:) + s·B(j,:)·A‖₂.</summary>
    public static double[] WeightNorm(double[] w, double[] a, double[] b, double scale, int n, int k, int r)
    {
        var norm = new double[n];
        for (int j = 0; j < n; j++)
        {
            double ss = 0;
            for (int c = 0; c < k; c++)
            {
                double v = w[(long)j * k + c];
                for (int q = 0; q < r; q++) v += scale * b[(long)j * r + q] * a[(long)q * k + c];
                ss += v * v;
            }
            norm[j] = Math.Sqrt(ss);
        }
        return norm;
    }

    /// <summary>y(M,N) with the given (constant) norm; also returns z = x·Wᵀ + s·x·Aᵀ·Bᵀ.</summary>
    public static (double[] Y, double[] Z) ForwardWithNorm(double[] x, double[] w, double[]? bias, double[] a, double[] b, double[] magnitude,
        double[] norm, double scale, int m, int n, int k, int r)
    {
        var (z, _, _) = LoraLinearReference.Forward(x, w, null, a, b, scale, 0f, 0, m, n, k, r);
        var y = new double[z.Length];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                y[(long)i * n + j] = z[(long)i * n + j] * magnitude[j] / norm[j] + (bias is null ? 0 : bias[j]);
        return (y, z);
    }

    /// <summary>The DoRA forward: y(M,N), z(M,N) and the norm(N) it used.</summary>
    public static (double[] Y, double[] Z, double[] Norm) Forward(double[] x, double[] w, double[]? bias, double[] a, double[] b, double[] magnitude,
        double scale, int m, int n, int k, int r)
    {
        var norm = WeightNorm(w, a, b, scale, n, k, r);
        var (y, z) = ForwardWithNorm(x, w, bias, a, b, magnitude, norm, scale, m, n, k, r);
        return (y, z, norm);
    }

    /// <summary>
    /// Gradients of Σ dy ⊙ y with the norm constant: dz = dy ⊙ m/norm; dMag(j) = Σ_i dy·z / norm(j);
    /// dx, dA, dB from the LoRA linear's backward of dz.
    /// </summary>
    public static (double[] DX, double[] DA, double[] DB, double[] DMag) Backward(double[] dy, double[] x, double[] w, double[] a, double[] b,
        double[] magnitude, double scale, int m, int n, int k, int r)
    {
        var (_, z, norm) = Forward(x, w, null, a, b, magnitude, scale, m, n, k, r);
        var dz = new double[dy.Length];
        var dMag = new double[n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                long o = (long)i * n + j;
                dMag[j] += dy[o] * z[o] / norm[j];
                dz[o] = dy[o] * magnitude[j] / norm[j];
            }
        var (dx, dA, dB, _, _) = LoraLinearReference.Backward(dz, x, w, a, b, scale, 0f, 0, m, n, k, r);
        return (dx, dA, dB, dMag);
    }

    /// <summary>
    /// PEFT's DoRA forward in training with LoRA dropout p (lora.Linear.forward, use_dora): the base layer on x, the
    /// DoRA correction on xd = drop(x) (mask of DropoutHash, kept elements scaled by 1/(1−p)):
    /// y = x·Wᵀ + bias + (m/norm − 1) ⊙ (xd·Wᵀ) + m/norm ⊙ s·(xd·Aᵀ)·Bᵀ, with the given (constant) norm.
    /// </summary>
    public static double[] ForwardDropout(double[] x, double[] w, double[]? bias, double[] a, double[] b, double[] magnitude,
        double[] norm, double scale, float p, ulong seed, int m, int n, int k, int r)
    {
        var xd = LoraLinearReference.Drop(x, m, k, p, seed);
        var (baseFull, _, _) = LoraLinearReference.Forward(x, w, bias, a, b, 0.0, 0f, 0, m, n, k, r);      // x·Wᵀ + bias
        var (baseDrop, _, _) = LoraLinearReference.Forward(xd, w, null, a, b, 0.0, 0f, 0, m, n, k, r);     // xd·Wᵀ
        var (zd, _, _) = LoraLinearReference.Forward(xd, w, null, a, b, scale, 0f, 0, m, n, k, r);         // xd·Wᵀ + s·lora(xd)
        var y = new double[(long)m * n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                long o = (long)i * n + j;
                double f = magnitude[j] / norm[j], lora = zd[o] - baseDrop[o];
                y[o] = baseFull[o] + (f - 1) * baseDrop[o] + f * lora;
            }
        return y;
    }
}
