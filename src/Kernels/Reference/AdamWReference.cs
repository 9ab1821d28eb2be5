namespace FineTuneNative.Kernels.Reference;

/// <summary>Decoupled AdamW (Loshchilov and Hutter) in double, updating the arrays in place.</summary>
public static class AdamWReference
{
    /// <summary>
    /// g = gradScale·grad; m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
    /// p -= lr·(m/(1-β1^step) / (sqrt(v/(1-β2^step)) + eps) + weightDecay·p).
    /// </summary>
    public static void Step(double[] param, double[] grad, double[] m, double[] v, double lr, double beta1, double beta2,
        double eps, double weightDecay, int step, double gradScale)
    {
        if (step < 1) throw new ArgumentException($"step {step} must be >= 1 (1-based)");
        double c1 = 1 - Math.Pow(beta1, step), c2 = 1 - Math.Pow(beta2, step);
        for (long i = 0; i < param.LongLength; i++)
        {
            double g = gradScale * grad[i];
            m[i] = beta1 * m[i] + (1 - beta1) * g;
            v[i] = beta2 * v[i] + (1 - beta2) * g * g;
            double mh = m[i] / c1, vh = v[i] / c2;
            param[i] -= lr * (mh / (Math.Sqrt(vh) + eps) + weightDecay * param[i]);
        }
    }
}
