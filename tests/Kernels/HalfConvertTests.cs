using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Tests.Kernels;

/// <summary>The vectorised f32 → bf16 rounding gives the bits of the scalar <see cref="HalfBits.F32ToBf16"/> everywhere.</summary>
public class HalfConvertTests
{
    [Fact]
    public unsafe void F32ToBf16_EqualsTheScalarRounding_BitForBit()
    {
        // the edges of round-to-nearest-even and of the encoding, then random bit patterns (every class of float)
        uint[] special =
        {
            0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000, 0x00017FFF, 0x3F808000, 0x3F818000,
            0x3F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF,
            0x7FBFFFFF, 0xFF800001, 0x3F7FFFFF, 0x477FE000,
        };
        var rng = new Random(5);
        foreach (int n in new[] { 0, 1, 31, 32, 33, 64, 1000 })
        {
            var bits = new uint[n];
            for (int i = 0; i < n; i++) bits[i] = i < special.Length ? special[i] : (uint)rng.NextInt64(0, 1L << 32);
            var f = Array.ConvertAll(bits, BitConverter.UInt32BitsToSingle);
            var got = new ushort[n];
            fixed (float* s = f) fixed (ushort* d = got) HalfConvert.F32ToBf16(s, d, n);
            for (int i = 0; i < n; i++)
                Assert.True(HalfBits.F32ToBf16(f[i]) == got[i], $"n={n} [{i}] 0x{bits[i]:X8}: scalar 0x{HalfBits.F32ToBf16(f[i]):X4}, vector 0x{got[i]:X4}");
        }
    }
}
