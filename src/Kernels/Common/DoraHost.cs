namespace FineTuneNative.Kernels;

/// <summary>
/// Host fallbacks of the DoRA ops of <see cref="IBackend"/> (download, f32 loops with double sums, upload), used by
/// backends that do not override them (test backends, decorators). Not a fast path.
/// </summary>
internal static class DoraHost
{
    public static void WeightNorm(IBackend be, Tensor norm, Tensor w, Tensor a, Tensor b, float scale, int n, int k, int r)
    {
        if (w.DType.IsQuantized()) throw new NotSupportedException($"DoraWeightNorm: backend {be.Name} has no {w.DType.Name()} path");
        float[] wh = w.ToArray(), ah = a.ToArray(), bh = b.ToArray();
        var nh = new float[n];
        for (int j = 0; j < n; j++)
        {
            double ss = 0;
            for (int c = 0; c < k; c++)
            {
                double v = wh[(long)j * k + c];
                for (int q = 0; q < r; q++) v += (double)scale * bh[(long)j * r + q] * ah[(long)q * k + c];
                ss += v * v;
            }
            nh[j] = (float)Math.Sqrt(ss);
        }
        be.Upload(norm, nh);
    }

    public static void Scale(IBackend be, Tensor y, Tensor z, Tensor magnitude, Tensor norm, Tensor? bias, int m, int n)
    {
        float[] zh = z.ToArray(), mh = magnitude.ToArray(), nh = norm.ToArray();
        float[]? bh = bias?.ToArray();
        var yh = new float[(long)m * n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                yh[(long)i * n + j] = zh[(long)i * n + j] * mh[j] / nh[j] + (bh is null ? 0f : bh[j]);
        be.Upload(y, yh);
    }

    public static void ScaleBackward(IBackend be, Tensor dz, Tensor dMagnitude, Tensor dy, Tensor z, Tensor magnitude, Tensor norm, int m, int n)
    {
        float[] dyh = dy.ToArray(), zh = z.ToArray(), mh = magnitude.ToArray(), nh = norm.ToArray(), dmh = dMagnitude.ToArray();
        var dzh = new float[(long)m * n];
        for (int j = 0; j < n; j++)
        {
            double s = 0;
            for (int i = 0; i < m; i++) s += (double)dyh[(long)i * n + j] * zh[(long)i * n + j];
            dmh[j] += (float)(s / nh[j]);
            for (int i = 0; i < m; i++) dzh[(long)i * n + j] = dyh[(long)i * n + j] * mh[j] / nh[j];
        }
        be.Upload(dMagnitude, dmh);
        be.Upload(dz, dzh);
    }

    public static void DropoutBackward(IBackend be, Tensor dInput, Tensor dOut, float p, ulong seed, long count)
    {
        DropoutCheck(dInput, dOut, p, count, "DropoutBackward");
        float[] dh = dInput.ToArray(), sh = dOut.ToArray();
        float keepScale = 1f / (1f - p);
        for (int i = 0; i < count; i++)
            if (DropoutHash.Keep(seed, i, p)) dh[i] += sh[i] * keepScale;
        be.Upload(dInput, dh);
    }

    /// <summary>The argument checks every backend's DropoutBackward makes.</summary>
    public static void DropoutCheck(Tensor dInput, Tensor dOut, float p, long count, string op)
    {
        if (!(p >= 0f && p < 1f)) throw new ArgumentOutOfRangeException(nameof(p), $"{op}: the drop probability must be in [0, 1), got {p}");
        if (dInput.Length != count || dOut.Length != count)
            throw new ArgumentException($"{op}: dInput ({dInput.Describe()}) and dOut ({dOut.Describe()}) must have count = {count} elements");
        if (dInput.DType != DType.F32 || dOut.DType != DType.F32) throw new ArgumentException($"{op}: dInput ({dInput.Describe()}) and dOut ({dOut.Describe()}) must be f32");
    }
}
