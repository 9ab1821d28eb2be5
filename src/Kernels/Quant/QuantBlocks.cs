using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Quant;

/// <summary>
/// The GGUF Q8_0 block: 32 elements in 34 bytes, an f16 scale d (little-endian) then 32 int8 q; x = q·d.
/// </summary>
/// <remarks>
/// Quantization follows ggml's reference row quantizer (quantize_row_q8_0_ref): d = max|x| / 127,
/// q = round-half-away(x · (1/d)) with the inverse taken from the unrounded f32 d, and d stored as f16 (round to
/// nearest even), so a weight quantized here has the bits llama.cpp's quantizer writes. Reference:
/// <see cref="Reference.QuantReference.Dequantize"/>.
/// </remarks>
public static class Q8_0
{
    public const int BlockElements = 32;
    public const int BlockBytes = 34;

    /// <summary>Quantizes <paramref name="src"/> (a multiple of 32 elements) into blocks.</summary>
    public static void Quantize(ReadOnlySpan<float> src, Span<byte> dst)
    {
        int nb = QuantBlocks.CheckSizes(src.Length, dst.Length, BlockBytes, "Q8_0");
        for (int b = 0; b < nb; b++)
        {
            var x = src.Slice(b * 32, 32);
            var blk = dst.Slice(b * BlockBytes, BlockBytes);
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(x[j]));
            float d = amax / 127f;
            float id = d != 0 ? 1f / d : 0f;
            QuantBlocks.WriteF16(blk, d);
            for (int j = 0; j < 32; j++) blk[2 + j] = (byte)(sbyte)MathF.Round(x[j] * id, MidpointRounding.AwayFromZero);
        }
    }

    /// <summary>x = q·d for every element of the blocks in <paramref name="src"/>.</summary>
    public static unsafe void Dequantize(ReadOnlySpan<byte> src, Span<float> dst)
    {
        QuantBlocks.CheckSizes(dst.Length, src.Length, BlockBytes, "Q8_0");
        fixed (byte* s = src) fixed (float* d = dst) Dequantize(s, d, dst.Length / 32);
    }

    /// <summary>Dequantizes <paramref name="blocks"/> blocks (vectorised).</summary>
    public static unsafe void Dequantize(byte* src, float* dst, long blocks)
    {
        for (long b = 0; b < blocks; b++, src += BlockBytes, dst += 32)
        {
            float d = QuantBlocks.F16ToF32(*(ushort*)src);
            if (Vector512.IsHardwareAccelerated)
            {
                var vd = Vector512.Create(d);
                (Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)src + 2))) * vd).Store(dst);
                (Vector512.ConvertToSingle(Avx512F.ConvertToVector512Int32(Vector128.Load((sbyte*)src + 18))) * vd).Store(dst + 16);
            }
            else
            {
                for (int j = 0; j < 32; j++) dst[j] = ((sbyte*)src)[2 + j] * d;
            }
        }
    }
}

/// <summary>
/// The GGUF Q4_0 block: 32 elements in 18 bytes, an f16 scale d then 16 bytes of nibbles; byte j holds element j in
/// its low nibble and element j+16 in its high nibble; x = (q - 8)·d.
/// </summary>
/// <remarks>
/// Quantization follows ggml's quantize_row_q4_0_ref: m = the element of largest magnitude (with its sign),
/// d = m / -8, q = min(15, trunc(x·(1/d) + 8.5)), d stored as f16. Reference: <see cref="Reference.QuantReference.Dequantize"/>.
/// </remarks>
public static class Q4_0
{
    public const int BlockElements = 32;
    public const int BlockBytes = 18;

    public static void Quantize(ReadOnlySpan<float> src, Span<byte> dst)
    {
        int nb = QuantBlocks.CheckSizes(src.Length, dst.Length, BlockBytes, "Q4_0");
        for (int b = 0; b < nb; b++)
        {
            var x = src.Slice(b * 32, 32);
            var blk = dst.Slice(b * BlockBytes, BlockBytes);
            float amax = 0, max = 0;
            for (int j = 0; j < 32; j++)
                if (amax < Math.Abs(x[j])) { amax = Math.Abs(x[j]); max = x[j]; }
            float d = max / -8f;
            float id = d != 0 ? 1f / d : 0f;
            QuantBlocks.WriteF16(blk, d);
            for (int j = 0; j < 16; j++)
            {
                int lo = Math.Min(15, (int)(sbyte)(x[j] * id + 8.5f));
                int hi = Math.Min(15, (int)(sbyte)(x[j + 16] * id + 8.5f));
                blk[2 + j] = (byte)(lo | (hi << 4));
            }
        }
    }

    public static unsafe void Dequantize(ReadOnlySpan<byte> src, Span<float> dst)
    {
        QuantBlocks.CheckSizes(dst.Length, src.Length, BlockBytes, "Q4_0");
        fixed (byte* s = src) fixed (float* d = dst) Dequantize(s, d, dst.Length / 32);
    }

    public static unsafe void Dequantize(byte* src, float* dst, long blocks)
    {
        for (long b = 0; b < blocks; b++, src += BlockBytes, dst += 32)
        {
            float d = QuantBlocks.F16ToF32(*(ushort*)src);
            if (Vector512.IsHardwareAccelerated)
            {
                var q = Avx512F.ConvertToVector512Int32(Vector128.Load(src + 2));   // 16 bytes -> 16 ints
                var vd = Vector512.Create(d);
                var eight = Vector512.Create(8);
                (Vector512.ConvertToSingle((q & Vector512.Create(15)) - eight) * vd).Store(dst);
                (Vector512.ConvertToSingle(Vector512.ShiftRightLogical(q, 4) - eight) * vd).Store(dst + 16);
            }
            else
            {
                for (int j = 0; j < 16; j++)
                {
                    dst[j] = ((src[2 + j] & 15) - 8) * d;
                    dst[j + 16] = ((src[2 + j] >> 4) - 8) * d;
                }
            }
        }
    }
}

/// <summary>Helpers shared by the block formats.</summary>
public static class QuantBlocks
{
    /// <summary>Quantizes f32 values into <paramref name="type"/> blocks (Q8_0 or Q4_0).</summary>
    public static void Quantize(DType type, ReadOnlySpan<float> src, Span<byte> dst)
    {
        if (type == DType.Q8_0) Q8_0.Quantize(src, dst);
        else if (type == DType.Q4_0) Q4_0.Quantize(src, dst);
        else throw new ArgumentException($"{type.Name()} is not a block-quantized type");
    }

    /// <summary>Every element of a quantized tensor (Q8_0, Q4_0 or NF4, any backend) as host f32: what its matmuls compute with.</summary>
    public static float[] ToFloats(Tensor t)
    {
        if (t.DType == DType.NF4) return Nf4.ToFloats(t);
        if (!t.DType.IsBlockQuantized()) throw new ArgumentException($"{t.Describe()} is not quantized");
        if (t.Offset % 32 != 0 || t.Length % 32 != 0) throw new ArgumentException($"{t.Describe()} is not whole {t.DType.Name()} blocks");
        var bytes = new byte[t.Bytes];
        t.Backend.DownloadRaw(t, bytes);
        var y = new float[t.Length];
        Dequantize(t.DType, bytes, y);
        return y;
    }

    public static void Dequantize(DType type, ReadOnlySpan<byte> src, Span<float> dst)
    {
        if (type == DType.Q8_0) Q8_0.Dequantize(src, dst);
        else if (type == DType.Q4_0) Q4_0.Dequantize(src, dst);
        else throw new ArgumentException($"{type.Name()} is not a block-quantized type");
    }

    public static unsafe void Dequantize(DType type, byte* src, float* dst, long blocks)
    {
        if (type == DType.Q8_0) Q8_0.Dequantize(src, dst, blocks);
        else if (type == DType.Q4_0) Q4_0.Dequantize(src, dst, blocks);
        else throw new ArgumentException($"{type.Name()} is not a block-quantized type");
    }

    internal static int CheckSizes(int elements, int bytes, int blockBytes, string name)
    {
        if (elements % 32 != 0) throw new ArgumentException($"{name}: {elements} elements is not a multiple of the block size 32");
        int nb = elements / 32;
        if (bytes != (long)nb * blockBytes) throw new ArgumentException($"{name}: {nb} blocks need {(long)nb * blockBytes} bytes, got {bytes}");
        return nb;
    }

    internal static void WriteF16(Span<byte> blk, float d)
    {
        ushort h = BitConverter.HalfToUInt16Bits((Half)d);
        blk[0] = (byte)h;
        blk[1] = (byte)(h >> 8);
    }

    /// <summary>
    /// f16 bits to f32 without branches: shifting the 15 exponent+mantissa bits up by 13 and multiplying by 2^112
    /// rebiases the exponent (15 -> 127) and renormalises subnormals exactly. Infinity/NaN are not scales and are
    /// rejected where a file is read.
    /// </summary>
    public static float F16ToF32(ushort h)
    {
        float f = BitConverter.UInt32BitsToSingle((uint)(h & 0x7FFF) << 13) * 5.192296858534828e33f; // 2^112
        return BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(f) | ((uint)(h & 0x8000) << 16));
    }
}
