namespace FineTuneNative.Kernels.Reference;

/// <summary>The small whole-tensor ops: sum of squares (gradient norm), add, scale.</summary>
public static class ElementwiseReference
{
    public static double SumOfSquares(double[] t)
    {
        double s = 0;
        foreach (double x in t) s += x * x;
        return s;
    }

    public static double[] Add(double[] a, double[] b)
    {
        var y = new double[a.LongLength];
        for (long i = 0; i < y.LongLength; i++) y[i] = a[i] + b[i];
        return y;
    }

    public static double[] Scale(double[] a, double s)
    {
        var y = new double[a.LongLength];
        for (long i = 0; i < y.LongLength; i++) y[i] = a[i] * s;
        return y;
    }
}
