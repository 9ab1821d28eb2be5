namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// The nn.Linear products in plain double loops: the yardstick for every matmul kernel.
/// Shares no code with the kernels; inputs are host arrays, outputs are fresh double arrays.
/// </summary>
public static class MatMulReference
{
    /// <summary>y(M,N) = x(M,K) · w(N,K)ᵀ [+ bias(N)].</summary>
    public static double[] Forward(double[] x, double[] w, double[]? bias, int m, int n, int k)
    {
        Check(x, (long)m * k, nameof(x)); Check(w, (long)n * k, nameof(w));
        if (bias != null) Check(bias, n, nameof(bias));
        var y = new double[(long)m * n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = bias?[j] ?? 0.0;
                for (int p = 0; p < k; p++) s += x[(long)i * k + p] * w[(long)j * k + p];
                y[(long)i * n + j] = s;
            }
        return y;
    }

    /// <summary>dx(M,K) = dy(M,N) · w(N,K).</summary>
    public static double[] BackwardInput(double[] dy, double[] w, int m, int n, int k)
    {
        Check(dy, (long)m * n, nameof(dy)); Check(w, (long)n * k, nameof(w));
        var dx = new double[(long)m * k];
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
            {
                double s = 0;
                for (int j = 0; j < n; j++) s += dy[(long)i * n + j] * w[(long)j * k + p];
                dx[(long)i * k + p] = s;
            }
        return dx;
    }

    /// <summary>dw(N,K) = dy(M,N)ᵀ · x(M,K).</summary>
    public static double[] BackwardWeight(double[] dy, double[] x, int m, int n, int k)
    {
        Check(dy, (long)m * n, nameof(dy)); Check(x, (long)m * k, nameof(x));
        var dw = new double[(long)n * k];
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++)
            {
                double s = 0;
                for (int i = 0; i < m; i++) s += dy[(long)i * n + j] * x[(long)i * k + p];
                dw[(long)j * k + p] = s;
            }
        return dw;
    }

    /// <summary>dBias(N) = Σ_m dy(m, :).</summary>
    public static double[] BackwardBias(double[] dy, int m, int n)
    {
        Check(dy, (long)m * n, nameof(dy));
        var db = new double[n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) db[j] += dy[(long)i * n + j];
        return db;
    }

    internal static void Check(Array a, long needed, string name)
    {
        if (a.LongLength < needed) throw new ArgumentException($"{name}: {a.LongLength} elements, needs {needed}", name);
    }
}
