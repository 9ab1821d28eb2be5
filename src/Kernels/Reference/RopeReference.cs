namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// Rotary position embedding in double: pair i of a head (i &lt; HS/2) is rotated by pos·θ^(-2i/HS).
/// RotateHalf pairs channels (i, i + HS/2); Interleaved pairs (2i, 2i + 1).
/// </summary>
public static class RopeReference
{
    /// <summary>Returns the rotated copy of x(M, NH, HS) for positions(M); inverse rotates by the negative angle.</summary>
    public static double[] Apply(double[] x, int[] positions, int m, int nHeads, int headSize, double theta, RopeLayout layout, bool inverse)
    {
        if (headSize % 2 != 0) throw new ArgumentException($"head size {headSize} must be even");
        var y = (double[])x.Clone();
        int half = headSize / 2;
        for (int t = 0; t < m; t++)
            for (int h = 0; h < nHeads; h++)
            {
                long o = ((long)t * nHeads + h) * headSize;
                for (int i = 0; i < half; i++)
                {
                    double angle = positions[t] * Math.Pow(theta, -2.0 * i / headSize);
                    if (inverse) angle = -angle;
                    double c = Math.Cos(angle), s = Math.Sin(angle);
                    long i0 = layout == RopeLayout.RotateHalf ? o + i : o + 2 * i;
                    long i1 = layout == RopeLayout.RotateHalf ? o + i + half : o + 2 * i + 1;
                    double a = x[i0], b = x[i1];
                    y[i0] = a * c - b * s;
                    y[i1] = a * s + b * c;
                }
            }
        return y;
    }
}
