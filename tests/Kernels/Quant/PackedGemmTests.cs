using System.Runtime.Intrinsics;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Kernels.Reference;
using Xunit;

namespace FineTuneNative.Tests.Kernels.Quant;

/// <summary>
/// The packed small-M GEMM (prefill) and the packed decode rows against double references on the same weights: for
/// Q8_0/Q4_0 the reference is llama.cpp's scheme in double (8-bit activations per block, then the dequantized
/// product), so the kernel may differ only by f32 rounding of the scale products and the accumulation; for F32/F16
/// the plain double product.
/// </summary>
public unsafe class PackedGemmTests
{
    private static CpuBackend Cpu(int threads) => (CpuBackend)Backends.Create($"cpu:{threads}");

    /// <summary>W (n, k) as row-major bytes of <paramref name="t"/>, and its exact values in double.</summary>
    private static (byte[] Bytes, double[] Values) Weights(DType t, int n, int k, int seed)
    {
        var wf = KernelTest.Rand((long)n * k, seed, 0.5).Select(v => (float)v).ToArray();
        switch (t)
        {
            case DType.F32:
                return (wf.SelectMany(BitConverter.GetBytes).ToArray(), wf.Select(v => (double)v).ToArray());
            case DType.F16:
                var h = wf.Select(HalfBits.F32ToF16).ToArray();
                return (h.SelectMany(BitConverter.GetBytes).ToArray(), h.Select(v => QuantReference.F16(v)).ToArray());
            default:
                var q = new byte[t.StorageBytes((long)n * k)];
                QuantBlocks.Quantize(t, wf, q);
                return (q, QuantReference.Dequantize(t, q, (long)n * k));
        }
    }

    /// <summary>Row i of x as the kernels see it: quantized per 32-block (llama.cpp's q8) for the block types, exact otherwise.</summary>
    private static double[] Seen(DType t, float[] x, int m, int k)
    {
        if (!t.IsBlockQuantized()) return x.Select(v => (double)v).ToArray();
        var r = new double[(long)m * k];
        for (int b = 0; b < m * k / 32; b++)
        {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(x[b * 32 + j]));
            float id = amax > 0 ? 127f / amax : 0f;
            double d = amax / 127f;
            for (int j = 0; j < 32; j++) r[b * 32 + j] = Math.Round((double)(x[b * 32 + j] * id), MidpointRounding.ToEven) * d;
        }
        return r;
    }

    [Theory]
    [InlineData(DType.Q4_0, 1, 16, 32, 1)]
    [InlineData(DType.Q4_0, 13, 37, 96, 2)]
    [InlineData(DType.Q4_0, 29, 50, 576, 2)]
    [InlineData(DType.Q8_0, 1, 16, 32, 1)]
    [InlineData(DType.Q8_0, 13, 37, 96, 2)]
    [InlineData(DType.Q8_0, 29, 50, 576, 2)]
    [InlineData(DType.F32, 1, 16, 5, 1)]
    [InlineData(DType.F32, 13, 37, 45, 2)]
    [InlineData(DType.F32, 29, 50, 288, 2)]
    [InlineData(DType.F16, 13, 37, 45, 2)]
    [InlineData(DType.F16, 9, 33, 288, 2)]
    public void Packed_Gemm_Matches_Double_Reference(DType t, int m, int n, int k, int threads)
    {
        using var be = Cpu(threads);
        var (bytes, wd) = Weights(t, n, k, 11 + m);
        var x = KernelTest.Rand((long)m * k, 12 + m, 1.5).Select(v => (float)v).ToArray();
        var bias = KernelTest.Rand(n, 13).Select(v => (float)v).ToArray();
        var xs = Seen(t, x, m, k);
        foreach (bool accumulate in new[] { false, true })
        {
            // y has 3 spare columns per row (ldy = n + 3) that must stay untouched
            int ldy = n + 3;
            var y = Enumerable.Range(0, m * ldy).Select(i => 0.25f * (i % 7)).ToArray();
            var y0 = (float[])y.Clone();
            fixed (byte* pw = bytes) fixed (float* px = x) fixed (float* py = y) fixed (float* pb = bias)
            {
                using var pm = new PackedMatrix(t, pw, n, k, "w");
                using var ws = new PackedGemm.Workspace(m, k, threads);
                if (t.IsBlockQuantized()) PackedGemm.QuantizeInput(ws, px, k, m, k);
                PackedGemm.Run(be, pm, ws, m, px, k, py, ldy, accumulate ? null : pb, accumulate);
            }
            for (int i = 0; i < m; i++)
            {
                for (int c = n; c < ldy; c++) Assert.Equal(y0[i * ldy + c], y[i * ldy + c]);
                for (int c = 0; c < n; c++)
                {
                    double e = 0, mag = 0;
                    for (int j = 0; j < k; j++) { e += wd[(long)c * k + j] * xs[(long)i * k + j]; mag += Math.Abs(wd[(long)c * k + j] * xs[(long)i * k + j]); }
                    e += accumulate ? y0[i * ldy + c] : bias[c];
                    double a = y[i * ldy + c];
                    Assert.True(Math.Abs(a - e) <= 1e-6 + 1e-5 * mag,
                        $"{t} m={m} n={n} k={k} acc={accumulate}: y[{i},{c}] = {a}, reference {e} (Σ|w·x| = {mag})");
                }
            }
        }
    }

    [Theory]
    [InlineData(DType.Q4_0, 37, 96, 3, 35)]
    [InlineData(DType.Q4_0, 64, 1536, 16, 48)]
    [InlineData(DType.Q8_0, 37, 96, 3, 35)]
    [InlineData(DType.Q8_0, 64, 576, 0, 64)]
    public void Packed_Decode_Rows_Match_Double_Reference(DType t, int n, int k, int r0, int r1)
    {
        var (bytes, wd) = Weights(t, n, k, 21);
        var x = KernelTest.Rand(k, 22, 1.5).Select(v => (float)v).ToArray();
        var bias = KernelTest.Rand(n, 23).Select(v => (float)v).ToArray();
        var xs = Seen(t, x, 1, k);
        var y = Enumerable.Repeat(7f, n).ToArray();
        fixed (byte* pw = bytes) fixed (float* px = x) fixed (float* py = y) fixed (float* pb = bias)
        {
            using var pm = new PackedMatrix(t, pw, n, k, "w");
            using var ws = new PackedGemm.Workspace(1, k, 1);
            PackedGemm.QuantizeInput(ws, px, k, 1, k);
            if (t == DType.Q4_0) PackedGemm.RowsQ4_0(pm.Data, k, r0, r1, ws.Q8, ws.D, ws.S8, py, pb, accumulate: false);
            else PackedGemm.RowsQ8_0(pm.Data, k, r0, r1, ws.Q16, ws.D, py, pb, accumulate: false);
        }
        for (int r = 0; r < n; r++)
        {
            if (r < r0 || r >= r1) { Assert.Equal(7f, y[r]); continue; }
            double e = bias[r], mag = 0;
            for (int j = 0; j < k; j++) { e += wd[(long)r * k + j] * xs[j]; mag += Math.Abs(wd[(long)r * k + j] * xs[j]); }
            Assert.True(Math.Abs(y[r] - e) <= 1e-6 + 1e-5 * mag, $"{t} row {r}: {y[r]} vs {e}");
        }
    }

    [Fact]
    public void F16_Widening_Is_Exact_For_Every_Finite_Half()
    {
        var h = new ushort[65536];
        for (int i = 0; i < h.Length; i++) h[i] = (ushort)i;
        var f = new float[16];
        fixed (ushort* ph = h) fixed (float* pf = f)
            for (int i = 0; i < h.Length; i += 16)
            {
                PackedGemm.F16x16(ph + i).Store(pf);
                for (int l = 0; l < 16; l++)
                {
                    ushort bits = (ushort)(i + l);
                    if (((bits >> 10) & 31) == 31) continue;   // inf/NaN are not weights
                    Assert.Equal(BitConverter.SingleToInt32Bits((float)BitConverter.UInt16BitsToHalf(bits)), BitConverter.SingleToInt32Bits(f[l]));
                }
            }
    }

    [Fact]
    public void Activation_Quantization_Gives_Int8_Int16_Scales_And_Offset_Sums()
    {
        const int m = 3, k = 64;
        var x = KernelTest.Rand(m * k, 5, 2.0).Select(v => (float)v).ToArray();
        for (int j = 32; j < 64; j++) x[j] = 0;   // an all-zero block: d = 0, q = 0
        var q8 = new sbyte[m * k]; var q16 = new short[m * k]; var d = new float[m * k / 32]; var s8 = new int[m * k / 32];
        fixed (float* px = x) fixed (sbyte* a = q8) fixed (short* b = q16) fixed (float* pd = d) fixed (int* ps = s8)
            PackedGemm.QuantizeActivations(px, k, m, k, a, b, pd, ps);
        for (int blk = 0; blk < m * k / 32; blk++)
        {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(x[blk * 32 + j]));
            float id = amax > 0 ? 127f / amax : 0f;
            Assert.Equal(amax / 127f, d[blk]);
            int sum = 0;
            for (int j = 0; j < 32; j++)
            {
                int q = (int)MathF.Round(x[blk * 32 + j] * id, MidpointRounding.ToEven);
                Assert.Equal(q, q8[blk * 32 + j]);
                Assert.Equal(q, q16[blk * 32 + j]);
                sum += q;
            }
            Assert.Equal(8 * sum, s8[blk]);
        }
    }

    private static void Pack(DType t, byte[] bytes, int n, int k)
    {
        fixed (byte* p = bytes) using (new PackedMatrix(t, p, n, k, "w")) { }
    }

    [Fact]
    public void Packing_Rejects_Partial_Blocks()
    {
        var e = Assert.Throws<ArgumentException>(() => Pack(DType.Q8_0, new byte[64], 1, 48));
        Assert.Contains("K = 48", e.Message);
    }
}
