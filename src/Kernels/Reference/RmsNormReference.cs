namespace FineTuneNative.Kernels.Reference;

/// <summary>RMSNorm y = x / sqrt(mean(x²) + eps) ⊙ w in double.</summary>
public static class RmsNormReference
{
    /// <summary>y(M,C) and rstd(M).</summary>
    public static (double[] Y, double[] Rstd) Forward(double[] x, double[] w, int m, int c, double eps)
    {
        var y = new double[(long)m * c];
        var rstd = new double[m];
        for (int i = 0; i < m; i++)
        {
            double ss = 0;
            for (int j = 0; j < c; j++) { double v = x[(long)i * c + j]; ss += v * v; }
            double rs = 1.0 / Math.Sqrt(ss / c + eps);
            rstd[i] = rs;
            for (int j = 0; j < c; j++) y[(long)i * c + j] = x[(long)i * c + j] * rs * w[j];
        }
        return (y, rstd);
    }

    /// <summary>Gradients of Σ dy ⊙ y: dx(M,C) and dw(C) (fresh).</summary>
    public static (double[] DX, double[] DW) Backward(double[] dy, double[] x, double[] w, int m, int c, double eps)
    {
        var dx = new double[(long)m * c];
        var dw = new double[c];
        for (int i = 0; i < m; i++)
        {
            long o = (long)i * c;
            double ss = 0;
            for (int j = 0; j < c; j++) ss += x[o + j] * x[o + j];
            double rs = 1.0 / Math.Sqrt(ss / c + eps);
            // y_j = x_j·rs·w_j, ∂rs/∂x_j = -rs³·x_j/C
            double dot = 0;
            for (int j = 0; j < c; j++) dot += dy[o + j] * w[j] * x[o + j];
            for (int j = 0; j < c; j++)
            {
                dx[o + j] = dy[o + j] * w[j] * rs - rs * rs * rs * x[o + j] * dot / c;
                dw[j] += dy[o + j] * x[o + j] * rs;
            }
        }
        return (dx, dw);
    }
}
