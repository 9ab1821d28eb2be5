namespace FineTuneNative.Kernels;

/// <summary>Element types a <see cref="Tensor"/> can hold.</summary>
public enum DType
{
    F32,
    BF16,
    F16,
    I32,
}

public static class DTypeExtensions
{
    public static int SizeOf(this DType d) => d switch
    {
        DType.F32 => 4,
        DType.I32 => 4,
        DType.BF16 => 2,
        DType.F16 => 2,
        _ => throw new ArgumentOutOfRangeException(nameof(d)),
    };

    public static string Name(this DType d) => d switch
    {
        DType.F32 => "f32",
        DType.BF16 => "bf16",
        DType.F16 => "f16",
        DType.I32 => "i32",
        _ => d.ToString(),
    };
}

/// <summary>bf16 / f16 conversions shared by every backend (round to nearest even).</summary>
public static class HalfBits
{
    public static float Bf16ToF32(ushort b) => BitConverter.Int32BitsToSingle(b << 16);

    public static ushort F32ToBf16(float f)
    {
        int bits = BitConverter.SingleToInt32Bits(f);
        if ((bits & 0x7F800000) == 0x7F800000 && (bits & 0x007FFFFF) != 0)
            return (ushort)((bits >> 16) | 0x40); // quiet NaN
        int rounding = 0x7FFF + ((bits >> 16) & 1);
        return (ushort)((bits + rounding) >> 16);
    }

    public static float F16ToF32(ushort h) => (float)BitConverter.UInt16BitsToHalf(h);

    public static ushort F32ToF16(float f) => BitConverter.HalfToUInt16Bits((Half)f);
}
