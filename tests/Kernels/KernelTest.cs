using FineTuneNative.Kernels;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Kernels;

/// <summary>Small helpers shared by the op tests: host data in, tensors out, and back.</summary>
internal static class KernelTest
{
    public static IBackend Backend(string name) => TestBackends.Get(name);

    public static Tensor Up(IBackend b, float[] data, params int[] shape)
    {
        var t = b.Allocate(DType.F32, shape);
        b.Upload(t, data);
        return t;
    }

    public static Tensor Up(IBackend b, double[] data, params int[] shape) => Up(b, GradCheck.ToFloat(data), shape);

    public static Tensor UpBf16(IBackend b, float[] data, params int[] shape)
    {
        var t = b.Allocate(DType.BF16, shape);
        b.Upload(t, data);
        return t;
    }

    public static Tensor UpInt(IBackend b, int[] data)
    {
        var t = b.Allocate(DType.I32, data.Length);
        b.Upload(t, data);
        return t;
    }

    /// <summary>Values in [-scale, scale], fixed seed, as doubles that are exactly representable in f32.</summary>
    public static double[] Rand(long n, int seed, double scale = 1.0) =>
        GradCheck.ToDouble(GradCheck.ToFloat(GradCheck.Random(checked((int)n), seed, scale)));

    /// <summary>Values rounded to bf16 (so a bf16 tensor and the double reference hold the same numbers).</summary>
    public static double[] RoundBf16(double[] a) => Array.ConvertAll(a, x => (double)HalfBits.Bf16ToF32(HalfBits.F32ToBf16((float)x)));

    public static double[] Down(Tensor t) => GradCheck.ToDouble(t.ToArray());

    public static double[] Plus(double[] a, double[] b)
    {
        var y = new double[a.Length];
        for (int i = 0; i < y.Length; i++) y[i] = a[i] + b[i];
        return y;
    }

    public static double Dot(double[] a, double[] b)
    {
        double s = 0;
        for (int i = 0; i < a.Length; i++) s += a[i] * b[i];
        return s;
    }

    public static void Close(double[] expected, Tensor actual, string what, (double Atol, double Rtol) tol) =>
        NumericAssert.Close(expected, actual.ToArray(), tol.Atol, tol.Rtol, what);

    public static void Close(double[] expected, Tensor actual, string what) => Close(expected, actual, what, Tolerance.F32);

    /// <summary>Reference backward against central differences of L(x) = Σ dOut ⊙ f(x).</summary>
    public static void GradMatches(Func<double[], double[]> forward, double[] x, double[] dOut, double[] analytic, string what)
    {
        var numeric = GradCheck.Numeric(p => Dot(dOut, forward(p)), (double[])x.Clone());
        var t = Tolerance.FiniteDifference;
        NumericAssert.Close(numeric, analytic, t.Atol, t.Rtol, what);
    }

    /// <summary>Asserts the op throws an ArgumentException whose message names the tensor.</summary>
    public static void ThrowsNaming(string tensorName, Action op)
    {
        var e = Assert.ThrowsAny<ArgumentException>(op);
        Assert.Contains(tensorName, e.Message);
    }
}
