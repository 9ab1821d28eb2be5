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

    /// <summary>A tensor of <paramref name="dtype"/> holding <paramref name="data"/> (rounded to it on upload).</summary>
    public static Tensor UpAs(IBackend b, DType dtype, double[] data, params int[] shape)
    {
        var t = b.Allocate(dtype, shape);
        b.Upload(t, GradCheck.ToFloat(data));
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

    /// <summary>Values rounded to f16.</summary>
    public static double[] RoundF16(double[] a) => Array.ConvertAll(a, x => (double)HalfBits.F16ToF32(HalfBits.F32ToF16((float)x)));

    /// <summary>
    /// The activations (x, or dy for the input gradient) as backend <paramref name="b"/> multiplies them with a weight of
    /// dtype <paramref name="w"/>: on tensor cores (<see cref="TestBackends.RoundsOperands(IBackend)"/>) rounded to the
    /// weight's 16-bit type, bf16 for NF4; unchanged elsewhere (f32 SIMT widens the weight exactly). A reference on these
    /// operands leaves only f32 accumulation error (a product of two bf16 or two f16 values is exact in f32).
    /// </summary>
    public static double[] MatMulInput(IBackend b, DType w, double[] x) => !TestBackends.RoundsOperands(b) ? x : w switch
    {
        DType.BF16 or DType.NF4 => RoundBf16(x),
        DType.F16 => RoundF16(x),
        _ => x,
    };

    /// <summary>
    /// x as a matmul forward (IBackend.MatMul / MatMulResidual) of <paramref name="m"/> rows multiplies it: a decode forward
    /// (m ≤ MatMulGemvKernels.MaxRows) runs the f32 GEMV on every ILGPU accelerator (x exact), more rows as <see cref="MatMulInput"/>.
    /// </summary>
    public static double[] MatMulForwardInput(IBackend b, DType w, double[] x, int m)
        => m <= FineTuneNative.Kernels.Gpu.MatMulGemvKernels.MaxRows ? x : MatMulInput(b, w, x);

    /// <summary>
    /// A dequantized NF4 weight as the tensor-core matmul multiplies it (rounded to bf16; unchanged elsewhere). The device
    /// dequantizes in f32, a few ulps from the double reference (and CUDA contracts the absmax's mul + add into one FFMA),
    /// so the test data must have no value that close to a bf16 rounding midpoint, where those ulps could pick the other
    /// bf16 neighbour: asserted here (<see cref="AssertNoBf16Tie"/>), so the f32 tolerance stays valid.
    /// </summary>
    public static double[] Nf4Operand(IBackend b, double[] w, string what)
    {
        if (!TestBackends.RoundsOperands(b)) return w;
        AssertNoBf16Tie(w, what);
        return RoundBf16(w);
    }

    /// <summary>
    /// Asserts no value is within 16 f32 ulps of a bf16 rounding midpoint (chance ~5e-4 a value): an f32 computation of
    /// it that far off rounds to the same bf16 as the exact value. Fails (change the seed) rather than allow a flip.
    /// </summary>
    public static void AssertNoBf16Tie(double[] a, string what)
    {
        for (int i = 0; i < a.Length; i++)
        {
            int low = BitConverter.SingleToInt32Bits((float)a[i]) & 0xFFFF;
            Assert.True(Math.Abs(low - 0x8000) > 16, $"{what}[{i}] = {a[i]:R} is within 16 f32 ulps of a bf16 rounding midpoint: pick other test data");
        }
    }

    public static double[] Minus(double[] a, double[] b)
    {
        var y = new double[a.Length];
        for (int i = 0; i < y.Length; i++) y[i] = a[i] - b[i];
        return y;
    }

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
