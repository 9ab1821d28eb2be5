using ILGPU;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// A float tensor as a kernel sees it: f32 elements, or 16-bit bf16/f16 elements converted on every load and
/// store. Exactly one of the views is used, chosen by <see cref="Kind"/>; the branch is uniform over a launch.
/// </summary>
public readonly struct DeviceFloats
{
    public const int KindF32 = 0, KindBF16 = 1, KindF16 = 2;

    /// <summary>
    /// GGUF Q8_0 / Q4_0 blocks in <see cref="U16"/> (the raw bytes viewed as 16-bit words): only the tensor-core
    /// matmul reads these kinds (<see cref="QuantLoad"/>); <see cref="Load"/> and <see cref="Store"/> do not.
    /// </summary>
    public const int KindQ8_0 = 3, KindQ4_0 = 4;

    /// <summary>
    /// NF4 (bitsandbytes layout, see <see cref="Nf4"/>): <see cref="U16"/> views the tensor's bytes (codes, then
    /// the absmax codes), <see cref="F32"/> a table of the 16 levels, the 256-entry dynamic map, then the tensor's
    /// group absmaxes and offset. Read only by the tensor-core matmul (<see cref="QuantLoad"/>).
    /// </summary>
    public const int KindNF4 = 5, Nf4TableFloats = 16 + 256;

    public readonly ArrayView<float> F32;
    public readonly ArrayView<ushort> U16;
    public readonly int Kind;

    public DeviceFloats(ArrayView<float> f32, ArrayView<ushort> u16, int kind)
    {
        F32 = f32;
        U16 = u16;
        Kind = kind;
    }

    public float Load(long i)
    {
        if (Kind == KindF32) return F32[i];
        if (Kind == KindBF16) return HalfMath.Bf16ToF32(U16[i]);
        return HalfMath.F16ToF32(U16[i]);
    }

    /// <summary>
    /// Element i of a Q8_0 (q·d) or Q4_0 ((q - 8)·d) tensor, d the block's f16 scale (exact in f32), or of an NF4
    /// tensor of <paramref name="count"/> elements (level[q] · (map[c] · groupAbsmax + offset), as Nf4Reference).
    /// </summary>
    public float QuantLoad(long i, long count)
    {
        if (Kind == KindNF4)
        {
            int v = Byte(i >> 1);
            int q = (i & 1) == 0 ? v >> 4 : v & 15;
            long nf4Block = i / Nf4.BlockSize;
            int code = Byte(Nf4.AbsmaxOffset(count) + nf4Block);
            float absmax = F32[16 + code] * F32[Nf4TableFloats + nf4Block / Nf4.GroupSize] + F32[Nf4TableFloats + Nf4.Groups(count)];
            return F32[q] * absmax;
        }
        long block = i >> 5;
        int within = (int)(i & 31);
        if (Kind == KindQ8_0)
        {
            long w = block * 17; // 34 bytes = 17 words: scale in word 0, q[j] in byte 2 + j
            float d = HalfMath.F16ToF32(U16[w]);
            int q = (sbyte)Byte(w * 2 + 2 + within);
            return q * d;
        }
        else
        {
            long w = block * 9; // 18 bytes = 9 words: scale, then q[j] | q[j + 16] << 4 in byte 2 + j
            float d = HalfMath.F16ToF32(U16[w]);
            int b = Byte(w * 2 + 2 + (within & 15));
            int q = within < 16 ? b & 15 : b >> 4;
            return (q - 8) * d;
        }
    }

    private int Byte(long offset) => (U16[offset >> 1] >> (int)((offset & 1) * 8)) & 0xFF;

    public void Store(long i, float v)
    {
        if (Kind == KindF32) F32[i] = v;
        else if (Kind == KindBF16) U16[i] = HalfMath.F32ToBf16(v);
        else U16[i] = HalfMath.F32ToF16(v);
    }
}

/// <summary>Kernel-safe bf16 / f16 conversions, round to nearest even (bit-identical to <see cref="HalfBits"/>).</summary>
public static class HalfMath
{
    public static float Bf16ToF32(ushort b) => Interop.IntAsFloat((uint)b << 16);

    public static ushort F32ToBf16(float f)
    {
        uint bits = Interop.FloatAsInt(f);
        if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0)
            return (ushort)((bits >> 16) | 0x40u);
        uint rounding = 0x7FFFu + ((bits >> 16) & 1u);
        return (ushort)((bits + rounding) >> 16);
    }

    public static float F16ToF32(ushort h)
    {
        uint sign = ((uint)h & 0x8000u) << 16;
        uint exp = ((uint)h >> 10) & 0x1Fu;
        uint mant = (uint)h & 0x3FFu;
        if (exp == 0)
        {
            float v = mant * (1f / 16777216f); // subnormal: mant · 2^-24, exact in f32
            return sign != 0 ? -v : v;
        }
        if (exp == 31) return Interop.IntAsFloat(sign | 0x7F800000u | (mant << 13));
        return Interop.IntAsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
    }

    public static ushort F32ToF16(float f)
    {
        uint bits = Interop.FloatAsInt(f);
        uint sign = (bits >> 16) & 0x8000u;
        uint abs = bits & 0x7FFFFFFFu;
        if (abs >= 0x7F800000u) return (ushort)(sign | (abs > 0x7F800000u ? 0x7E00u : 0x7C00u));
        if (abs >= 0x477FF000u) return (ushort)(sign | 0x7C00u); // >= 65520 rounds to infinity
        if (abs < 0x38800000u)
        {
            // half subnormal: round(|f| · 2^24) to nearest even
            uint e = abs >> 23;
            if (e < 102) return (ushort)sign;
            uint m = (abs & 0x7FFFFFu) | 0x800000u;
            int shift = (int)(126 - e);
            uint r = m >> shift;
            uint rem = m & ((1u << shift) - 1u);
            uint half = 1u << (shift - 1);
            if (rem > half || (rem == half && (r & 1u) != 0)) r++;
            return (ushort)(sign | r);
        }
        uint h = ((abs >> 23) - 112u) << 10 | ((abs & 0x7FFFFFu) >> 13);
        uint rest = abs & 0x1FFFu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) != 0)) h++;
        return (ushort)(sign | h);
    }
}
