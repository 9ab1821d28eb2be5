using System.Text;
using FineTuneNative.Kernels;
using Xunit.Sdk;

namespace FineTuneNative.Tests.Numerics;

/// <summary>Per-dtype tolerances, in one place. Loosening one needs a comment saying why.</summary>
public static class Tolerance
{
    /// <summary>f32 kernels against a double reference over sums of up to a few thousand terms.</summary>
    public static (double Atol, double Rtol) F32 => (1e-5, 1e-4);
    /// <summary>bf16 weights: 8 mantissa bits, relative rounding 2^-8 per element.</summary>
    public static (double Atol, double Rtol) BF16 => (1e-2, 1e-2);
    /// <summary>Central finite differences in double with h = 1e-5 (truncation ~h², cancellation ~1e-11/h).</summary>
    public static (double Atol, double Rtol) FiniteDifference => (1e-6, 1e-5);

    public static (double Atol, double Rtol) For(DType d) => d == DType.BF16 || d == DType.F16 ? BF16 : F32;
}

public static class NumericAssert
{
    /// <summary>Passes where |e - a| &lt;= atol + rtol·|e| everywhere; reports the worst and the first mismatches.</summary>
    public static void Close(ReadOnlySpan<double> expected, ReadOnlySpan<float> actual, double atol, double rtol, string what = "")
    {
        var a = new double[actual.Length];
        for (int i = 0; i < a.Length; i++) a[i] = actual[i];
        Close(expected, a, atol, rtol, what);
    }

    public static void Close(ReadOnlySpan<float> expected, ReadOnlySpan<float> actual, double atol, double rtol, string what = "")
    {
        var e = new double[expected.Length];
        for (int i = 0; i < e.Length; i++) e[i] = expected[i];
        Close(e, actual, atol, rtol, what);
    }

    public static void Close(ReadOnlySpan<double> expected, ReadOnlySpan<double> actual, double atol, double rtol, string what = "")
    {
        if (expected.Length != actual.Length)
            throw new XunitException($"{what}: length {actual.Length}, expected {expected.Length}");
        double maxAbs = 0, maxRel = 0;
        int worst = -1, bad = 0;
        var first = new StringBuilder();
        for (int i = 0; i < expected.Length; i++)
        {
            double e = expected[i], x = actual[i];
            double err = Math.Abs(e - x);
            bool nan = double.IsNaN(x) != double.IsNaN(e) || double.IsInfinity(x) != double.IsInfinity(e);
            if (double.IsNaN(err) && !nan) err = 0; // both NaN
            double rel = err / Math.Max(Math.Abs(e), 1e-30);
            if (err > maxAbs || nan) { maxAbs = nan ? double.PositiveInfinity : err; worst = i; }
            if (rel > maxRel && !double.IsNaN(rel)) maxRel = rel;
            if (nan || err > atol + rtol * Math.Abs(e))
            {
                if (bad < 8) first.Append($"\n  [{i}] expected {e:G9} actual {x:G9} (abs {err:G3})");
                bad++;
            }
        }
        if (bad > 0)
            throw new XunitException(
                $"{what}: {bad} of {expected.Length} elements outside atol={atol:G3} rtol={rtol:G3}; max abs err {maxAbs:G4} at [{worst}], max rel err {maxRel:G4}; first mismatches:{first}");
    }
}

/// <summary>Central finite differences in double.</summary>
public static class GradCheck
{
    /// <summary>∂f/∂x_i ≈ (f(x + h e_i) - f(x - h e_i)) / 2h for every i (x is restored).</summary>
    public static double[] Numeric(Func<double[], double> f, double[] x, double h = 1e-5)
    {
        var g = new double[x.Length];
        for (int i = 0; i < x.Length; i++)
        {
            double save = x[i];
            x[i] = save + h; double fp = f(x);
            x[i] = save - h; double fm = f(x);
            x[i] = save;
            g[i] = (fp - fm) / (2 * h);
        }
        return g;
    }

    /// <summary>A fixed-seed array of values in [-scale, scale].</summary>
    public static double[] Random(int n, int seed, double scale = 1.0)
    {
        var rng = new Random(seed);
        var a = new double[n];
        for (int i = 0; i < n; i++) a[i] = (rng.NextDouble() * 2 - 1) * scale;
        return a;
    }

    public static float[] ToFloat(double[] a) => Array.ConvertAll(a, x => (float)x);
    public static double[] ToDouble(float[] a) => Array.ConvertAll(a, x => (double)x);
}
