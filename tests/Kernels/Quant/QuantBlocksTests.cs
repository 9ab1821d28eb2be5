using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using Xunit;

namespace FineTuneNative.Tests.Kernels.Quant;

public class QuantBlocksTests
{
    private static float[] Ramp() => Enumerable.Range(0, 32).Select(j => (float)(j - 16)).ToArray(); // -16..15

    [Fact]
    public void Q8_0_Hand_Computed_Block()
    {
        var blk = new byte[34];
        Q8_0.Quantize(Ramp(), blk);
        // d = 16/127 = 0.1259842...; as f16: 2^-3·(1 + 8/1024) = 0.1259765625 -> bits 0x3008 (little-endian 08 30).
        Assert.Equal(new byte[] { 0x08, 0x30 }, blk[..2]);
        // q = round(x·127/16): -16 -> -127, 0 -> 0, 1 -> 7.94 -> 8, 2 -> 15.9 -> 16, 15 -> 119.06 -> 119.
        Assert.Equal(-127, (sbyte)blk[2 + 0]);
        Assert.Equal(0, (sbyte)blk[2 + 16]);
        Assert.Equal(8, (sbyte)blk[2 + 17]);
        Assert.Equal(16, (sbyte)blk[2 + 18]);
        Assert.Equal(119, (sbyte)blk[2 + 31]);
        var x = QuantReference.Dequantize(DType.Q8_0, blk, 32);
        Assert.Equal(-127 * 0.1259765625, x[0]);
        Assert.Equal(119 * 0.1259765625, x[31]);
    }

    [Fact]
    public void Q4_0_Hand_Computed_Block()
    {
        var blk = new byte[18];
        Q4_0.Quantize(Ramp(), blk);
        // The largest magnitude is x[0] = -16, so d = -16 / -8 = 2 (f16 0x4000) and q = min(15, trunc(x/2 + 8.5)).
        Assert.Equal(new byte[] { 0x00, 0x40 }, blk[..2]);
        // byte 0: element 0 (q = 0) low, element 16 (x = 0, q = 8) high.
        Assert.Equal(0x80, blk[2]);
        // byte 1: element 1 (x = -15: trunc(1.0) = 1) low, element 17 (x = 1: trunc(9.0) = 9) high.
        Assert.Equal(0x91, blk[3]);
        // byte 15: element 15 (x = -1: trunc(8.0) = 8), element 31 (x = 15: 16 clamps to 15).
        Assert.Equal(0xF8, blk[17]);
        var x = QuantReference.Dequantize(DType.Q4_0, blk, 32);
        Assert.Equal(-16.0, x[0]);
        Assert.Equal(0.0, x[16]);
        Assert.Equal(14.0, x[31]);   // the clamp: 15 is not representable, 14 is the nearest level
        Assert.Equal(-14.0, x[1]);   // -15/2 + 8.5 = 1 exactly -> (1 - 8)·2
    }

    [Fact]
    public void Zero_Block_Has_Zero_Scale_And_Values()
    {
        var z = new float[32];
        foreach (var t in new[] { DType.Q8_0, DType.Q4_0 })
        {
            var blk = new byte[t.BlockBytes()];
            QuantBlocks.Quantize(t, z, blk);
            Assert.All(QuantReference.Dequantize(t, blk, 32), v => Assert.Equal(0.0, v));
        }
    }

    [Theory]
    [InlineData(DType.Q8_0)]
    [InlineData(DType.Q4_0)]
    public void RoundTrip_Error_Within_Half_A_Step_And_Kernel_Dequant_Matches_Reference(DType t)
    {
        const int n = 32 * 50;
        var x = KernelTest.Rand(n, 11, 3.0).Select(v => (float)v).ToArray();
        x[40] = 0; x[100] = 1e-6f; // a tiny and a zero value inside blocks
        var blk = new byte[t.StorageBytes(n)];
        QuantBlocks.Quantize(t, x, blk);
        var reference = QuantReference.Dequantize(t, blk, n);
        var kernel = new float[n];
        QuantBlocks.Dequantize(t, blk, kernel);
        for (int i = 0; i < n; i++) Assert.Equal(reference[i], (double)kernel[i]); // q·d is exact in f32
        for (int b = 0; b < n / 32; b++)
        {
            double amax = 0;
            for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(x[b * 32 + j]));
            // step d = amax/127 (Q8_0) or amax/8 (Q4_0); rounding gives at most d/2, the clamp of +amax to level 7
            // in Q4_0 at most d; the f16 scale adds up to |q|·d·2^-11.
            double d = t == DType.Q8_0 ? amax / 127 : amax / 8;
            double bound = (t == DType.Q8_0 ? d / 2 : d) + 128 * d * Math.Pow(2, -11) + 1e-12;
            for (int j = 0; j < 32; j++)
            {
                double err = Math.Abs(reference[b * 32 + j] - x[b * 32 + j]);
                Assert.True(err <= bound, $"{t} block {b} elem {j}: |{reference[b * 32 + j]} - {x[b * 32 + j]}| = {err} > {bound}");
            }
        }
    }

    [Fact]
    public void F16_Scale_Conversion_Matches_Ieee_For_Every_Finite_Value()
    {
        for (int h = 0; h < 65536; h++)
        {
            if (((h >> 10) & 31) == 31) continue; // inf/nan are never scales
            Assert.Equal(QuantReference.F16((ushort)h), (double)QuantBlocks.F16ToF32((ushort)h));
        }
    }

    [Fact]
    public void Sizes_Are_Checked()
    {
        Assert.Throws<ArgumentException>(() => Q8_0.Quantize(new float[31], new byte[34]));
        Assert.Throws<ArgumentException>(() => Q4_0.Quantize(new float[32], new byte[34]));
        Assert.Equal(34 * 3, DType.Q8_0.StorageBytes(96));
        Assert.Throws<ArgumentException>(() => DType.Q4_0.StorageBytes(33));
    }
}
