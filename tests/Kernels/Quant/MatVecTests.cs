using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using Xunit;

namespace FineTuneNative.Tests.Kernels.Quant;

public unsafe class MatVecTests
{
    private sealed class Act
    {
        public readonly short[] Q; public readonly float[] D, S;
        public Act(float[] x, int m, int k)
        {
            Q = new short[m * k]; D = new float[m * k / 32]; S = new float[m * k / 32];
            fixed (float* px = x) fixed (short* q = Q) fixed (float* d = D) fixed (float* s = S)
                MatVec.QuantizeActivations(px, m, k, q, d, s);
        }
    }

    [Fact]
    public void Activation_Quantization_Is_Round_Half_Even_Per_Block()
    {
        const int k = 64;
        var x = KernelTest.Rand(k, 5, 2.0).Select(v => (float)v).ToArray();
        x[3] = 0.5f * (x.Take(32).Max(Math.Abs) / 127f); // not exactly a tie after scaling, but close to one
        var a = new Act(x, 1, k);
        for (int b = 0; b < 2; b++)
        {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(x[b * 32 + j]));
            float id = 127f / amax;
            Assert.Equal(amax / 127f, a.D[b]);
            int sum = 0;
            for (int j = 0; j < 32; j++)
            {
                int q = (int)MathF.Round(x[b * 32 + j] * id, MidpointRounding.ToEven);
                Assert.Equal(q, a.Q[b * 32 + j]);
                sum += q;
            }
            Assert.Equal(a.D[b] * sum, a.S[b]);
        }
    }

    [Theory]
    [InlineData(DType.Q8_0, 37, 96)]
    [InlineData(DType.Q4_0, 37, 96)]
    [InlineData(DType.Q8_0, 8, 576)]
    [InlineData(DType.Q4_0, 8, 1536)]
    public void Quantized_Rows_Match_Reference_On_Dequantized_Weights(DType t, int n, int k)
    {
        var wf = KernelTest.Rand((long)n * k, 21, 0.5).Select(v => (float)v).ToArray();
        var x = KernelTest.Rand(k, 22, 1.5).Select(v => (float)v).ToArray();
        var wq = new byte[t.StorageBytes((long)n * k)];
        QuantBlocks.Quantize(t, wf, wq);
        var a = new Act(x, 1, k);
        var bias = KernelTest.Rand(n, 23).Select(v => (float)v).ToArray();
        var y = Enumerable.Repeat(7f, n).ToArray();   // pre-filled: rows 0..2 stay untouched, the rest are overwritten
        fixed (byte* pw = wq) fixed (short* q = a.Q) fixed (float* d = a.D) fixed (float* s = a.S) fixed (float* py = y) fixed (float* pb = bias)
        {
            if (t == DType.Q8_0) MatVec.RowsQ8_0(pw, k, 3, n, q, d, py, pb, accumulate: false);
            else MatVec.RowsQ4_0(pw, k, 3, n, q, d, s, py, pb, accumulate: false);
        }
        Assert.Equal(new[] { 7f, 7f, 7f }, y[..3]);

        // 1. The integer path itself: the same numbers as the double reference of llama.cpp's scheme, up to f32
        //    rounding of the per-block scale products and the K/32-term accumulation (a few ulps of Σ|w·x|).
        var integer = QuantReference.MatVecQ8Activations(t, wq, x, n, k);
        var wd = QuantReference.Dequantize(t, wq, (long)n * k);
        for (int r = 3; r < n; r++)
        {
            double mag = 0;
            for (int j = 0; j < k; j++) mag += Math.Abs(wd[(long)r * k + j] * x[j]);
            Assert.True(Math.Abs(integer[r] + bias[r] - y[r]) <= 1e-6 + 1e-6 * mag,
                $"{t} row {r}: kernel {y[r]} vs integer reference {integer[r] + bias[r]} (Σ|w·x| = {mag})");
        }

        // 2. Against the exact product on the dequantized weights: the gap is the activation rounding,
        //    at most Σ_j |w_j|·d_x(block)/2 per row.
        var exact = QuantReference.MatVec(t, wq, x.Select(v => (double)v).ToArray(), n, k);
        for (int r = 3; r < n; r++)
        {
            double bound = 1e-5;
            for (int j = 0; j < k; j++) bound += Math.Abs(wd[(long)r * k + j]) * a.D[j / 32] / 2;
            double err = Math.Abs(exact[r] + bias[r] - y[r]);
            Assert.True(err <= bound, $"{t} row {r}: |{y[r]} - {exact[r] + bias[r]}| = {err} > {bound}");
        }
    }

    [Fact]
    public void Accumulate_Adds_To_Existing_Rows()
    {
        const int n = 6, k = 64;
        var wf = KernelTest.Rand(n * k, 31).Select(v => (float)v).ToArray();
        var x = KernelTest.Rand(k, 32).Select(v => (float)v).ToArray();
        var wq = new byte[DType.Q8_0.StorageBytes(n * k)];
        Q8_0.Quantize(wf, wq);
        var a = new Act(x, 1, k);
        var y1 = new float[n];
        var y2 = Enumerable.Range(0, n).Select(i => (float)i).ToArray();
        fixed (byte* pw = wq) fixed (short* q = a.Q) fixed (float* d = a.D) fixed (float* p1 = y1) fixed (float* p2 = y2)
        {
            MatVec.RowsQ8_0(pw, k, 0, n, q, d, p1, null, false);
            MatVec.RowsQ8_0(pw, k, 0, n, q, d, p2, null, true);
        }
        for (int i = 0; i < n; i++) Assert.Equal(y1[i] + i, y2[i], 5);
    }

    [Theory]
    [InlineData(DType.F32, 13, 45)]
    [InlineData(DType.F32, 8, 288)]
    [InlineData(DType.BF16, 13, 45)]
    [InlineData(DType.BF16, 9, 576)]
    [InlineData(DType.F16, 13, 45)]
    [InlineData(DType.F16, 7, 576)]
    public void Float_Rows_Match_MatMul_Reference(DType t, int n, int k)
    {
        var w = KernelTest.Rand((long)n * k, 41);
        if (t == DType.BF16) w = KernelTest.RoundBf16(w);
        if (t == DType.F16) w = w.Select(v => QuantReference.F16(HalfBits.F32ToF16((float)v))).ToArray();   // exactly representable
        var x = KernelTest.Rand(k, 42);
        var bias = KernelTest.Rand(n, 43);
        var expected = MatMulReference.Forward(x, w, bias, 1, n, k);
        var y = new float[n];
        var xf = GradCheck.ToFloat(x);
        var bf = GradCheck.ToFloat(bias);
        fixed (float* px = xf) fixed (float* py = y) fixed (float* pb = bf)
        {
            if (t == DType.F32)
            {
                var wf = GradCheck.ToFloat(w);
                fixed (float* pw = wf) MatVec.RowsF32(pw, k, 0, n, px, py, pb, false);
            }
            else if (t == DType.F16)
            {
                var wh = w.Select(v => HalfBits.F32ToF16((float)v)).ToArray();
                fixed (ushort* pw = wh) MatVec.RowsF16(pw, k, 0, n, px, py, pb, false);
            }
            else
            {
                var wb = w.Select(v => HalfBits.F32ToBf16((float)v)).ToArray();
                fixed (ushort* pw = wb) MatVec.RowsBf16(pw, k, 0, n, px, py, pb, false);
            }
        }
        var (atol, rtol) = Tolerance.F32;
        NumericAssert.Close(expected, y, atol, rtol, $"{t} rows");
    }
}
