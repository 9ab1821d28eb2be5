namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// The LoRA linear y = x·Wᵀ [+ bias] + s·(drop(x)·Aᵀ)·Bᵀ in plain double loops.
/// drop(x)(m,k) = x(m,k)/(1-p) when DropoutHash.Keep(seed, m·K + k, p), else 0 (identity when p == 0).
/// </summary>
public static class LoraLinearReference
{
    /// <summary>The dropout multiplier of element (m, k): 0 or 1/(1-p).</summary>
    public static double DropFactor(ulong seed, long index, float p) =>
        p <= 0 ? 1.0 : DropoutHash.Keep(seed, index, p) ? 1.0 / (1.0 - p) : 0.0;

    /// <summary>drop(x) for x(M,K).</summary>
    public static double[] Drop(double[] x, int m, int k, float p, ulong seed)
    {
        var d = new double[(long)m * k];
        for (long i = 0; i < (long)m * k; i++) d[i] = x[i] * DropFactor(seed, i, p);
        return d;
    }

    /// <summary>Returns y(M,N), u(M,R) = drop(x)·Aᵀ and xDrop(M,K) = drop(x).</summary>
    /// <param name="x">(M, K)</param><param name="w">(N, K)</param><param name="bias">(N) or null</param>
    /// <param name="a">(R, K)</param><param name="b">(N, R)</param>
    public static (double[] Y, double[] U, double[] XDrop) Forward(double[] x, double[] w, double[]? bias, double[] a, double[] b,
        double scale, float dropout, ulong seed, int m, int n, int k, int r)
    {
        var xd = Drop(x, m, k, dropout, seed);
        var y = MatMulReference.Forward(x, w, bias, m, n, k);
        var u = MatMulReference.Forward(xd, a, null, m, r, k);
        var lo = MatMulReference.Forward(u, b, null, m, n, r);
        for (long i = 0; i < y.LongLength; i++) y[i] += scale * lo[i];
        return (y, u, xd);
    }

    /// <summary>
    /// Gradients of Σ dy ⊙ y: dx(M,K), dA(R,K), dB(N,R), dW(N,K), dBias(N) (all fresh, not accumulated).
    /// </summary>
    public static (double[] DX, double[] DA, double[] DB, double[] DW, double[] DBias) Backward(double[] dy, double[] x, double[] w,
        double[] a, double[] b, double scale, float dropout, ulong seed, int m, int n, int k, int r)
    {
        var xd = Drop(x, m, k, dropout, seed);
        var u = MatMulReference.Forward(xd, a, null, m, r, k);
        var g = MatMulReference.BackwardInput(dy, b, m, n, r);        // (M, R) = dy·B
        var dB = MatMulReference.BackwardWeight(dy, u, m, n, r);      // (N, R)
        var dA = MatMulReference.BackwardWeight(g, xd, m, r, k);      // (R, K)
        for (long i = 0; i < dB.LongLength; i++) dB[i] *= scale;
        for (long i = 0; i < dA.LongLength; i++) dA[i] *= scale;
        var dx = MatMulReference.BackwardInput(dy, w, m, n, k);
        var gA = MatMulReference.BackwardInput(g, a, m, r, k);        // (M, K)
        for (long i = 0; i < dx.LongLength; i++) dx[i] += scale * gA[i] * DropFactor(seed, i, dropout);
        var dW = MatMulReference.BackwardWeight(dy, x, m, n, k);
        var dBias = MatMulReference.BackwardBias(dy, m, n);
        return (dx, dA, dB, dW, dBias);
    }
}
