namespace FineTuneNative.Kernels;

/// <summary>Element types a <see cref="Tensor"/> can hold.</summary>
public enum DType
{
    F32,
    BF16,
    F16,
    I32,
    /// <summary>GGUF Q8_0: blocks of 32 elements, 34 bytes each (f16 scale d, 32 int8 q); x = q·d.</summary>
    Q8_0,
    /// <summary>GGUF Q4_0: blocks of 32 elements, 18 bytes each (f16 scale d, 16 bytes of nibbles); x = (q-8)·d.</summary>
    Q4_0,
    /// <summary>
    /// 4-bit NormalFloat (QLoRA), bitsandbytes layout: blocks of 64 elements with double-quantised absmax. A block
    /// format: one tensor's storage holds codes and statistics together (see <see cref="Nf4"/>); no views.
    /// </summary>
    NF4,
}

public static class DTypeExtensions
{
    public static int SizeOf(this DType d) => d switch
    {
        DType.F32 => 4,
        DType.I32 => 4,
        DType.BF16 => 2,
        DType.F16 => 2,
        _ => throw new ArgumentOutOfRangeException(nameof(d), d, "block-quantized types have no per-element size; use StorageBytes"),
    };

    /// <summary>True for the GGUF block-quantized types (Q8_0, Q4_0).</summary>
    public static bool IsBlockQuantized(this DType d) => d is DType.Q8_0 or DType.Q4_0;

    /// <summary>Elements per block: 32 for Q8_0/Q4_0, 1 otherwise.</summary>
    public static int BlockElements(this DType d) => d.IsBlockQuantized() ? 32 : 1;

    /// <summary>Bytes of one block (one element for plain types).</summary>
    public static int BlockBytes(this DType d) => d switch
    {
        DType.Q8_0 => 34,
        DType.Q4_0 => 18,
        _ => d.SizeOf(),
    };

    /// <summary>Bytes that <paramref name="elements"/> elements occupy (a multiple of the block size for quantized types).</summary>
    public static long StorageBytes(this DType d, long elements)
    {
        if (d == DType.NF4) return Nf4.StorageBytes(elements);
        int be = d.BlockElements();
        if (elements % be != 0)
            throw new ArgumentException($"{d.Name()} stores whole blocks of {be} elements; {elements} is not a multiple");
        return elements / be * d.BlockBytes();
    }

    /// <summary>
    /// True for NF4, whose storage holds the whole tensor's codes and statistics in one layout (see <see cref="Nf4"/>):
    /// no slices or views, no per-element offset.
    /// </summary>
    public static bool IsWholeTensorFormat(this DType d) => d == DType.NF4;

    /// <summary>Every quantized dtype (GGUF blocks and NF4).</summary>
    public static bool IsQuantized(this DType d) => d.IsBlockQuantized() || d.IsWholeTensorFormat();

    public static string Name(this DType d) => d switch
    {
        DType.F32 => "f32",
        DType.BF16 => "bf16",
        DType.F16 => "f16",
        DType.I32 => "i32",
        DType.Q8_0 => "q8_0",
        DType.Q4_0 => "q4_0",
        DType.NF4 => "nf4",
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
