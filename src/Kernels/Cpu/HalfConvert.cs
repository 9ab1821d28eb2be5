using System.Runtime.Intrinsics;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>Vectorised bf16/f16 ⇄ f32 conversions (round to nearest even, same bits as <see cref="HalfBits"/>).</summary>
internal static unsafe class HalfConvert
{
    public static void Bf16ToF32(ReadOnlySpan<ushort> src, Span<float> dst)
    {
        fixed (ushort* s = src) fixed (float* d = dst) Bf16ToF32(s, d, src.Length);
    }

    /// <summary>bf16 is the top half of an f32: widen and shift.</summary>
    public static void Bf16ToF32(ushort* s, float* d, long n)
    {
        long i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            for (; i + 16 <= n; i += 16)
            {
                var (lo, hi) = Vector256.Widen(Vector256.Load(s + i));
                // widen gives 8+8 uint32; 16 ushorts fit one Vector256
                Vector512.ShiftLeft(Vector512.Create(lo, hi), 16).AsSingle().Store(d + i);
            }
        }
        else if (Vector256.IsHardwareAccelerated)
        {
            for (; i + 8 <= n; i += 8)
            {
                var (lo, hi) = Vector128.Widen(Vector128.Load(s + i));
                Vector256.ShiftLeft(Vector256.Create(lo, hi), 16).AsSingle().Store(d + i);
            }
        }
        for (; i < n; i++) d[i] = BitConverter.Int32BitsToSingle(s[i] << 16);
    }

    public static void F32ToBf16(ReadOnlySpan<float> src, Span<ushort> dst)
    {
        for (int i = 0; i < src.Length; i++) dst[i] = HalfBits.F32ToBf16(src[i]);
    }

    /// <summary>
    /// Round to nearest even, 32 values per step: (bits + 0x7FFF + bit 16) &gt;&gt; 16, NaNs quieted as
    /// (bits &gt;&gt; 16) | 0x40; the same bits as <see cref="HalfBits.F32ToBf16"/> (the tail uses it).
    /// </summary>
    public static void F32ToBf16(float* s, ushort* d, long n)
    {
        long i = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            var bias = Vector512.Create(0x7FFFu);
            var absMask = Vector512.Create(0x7FFFFFFFu);
            var inf = Vector512.Create(0x7F800000u);
            var quiet = Vector512.Create(0x40u);
            for (; i + 32 <= n; i += 32)
            {
                var lo = Round(Vector512.Load((uint*)(s + i)), bias, absMask, inf, quiet);
                var hi = Round(Vector512.Load((uint*)(s + i + 16)), bias, absMask, inf, quiet);
                Vector512.Narrow(lo, hi).Store(d + i); // the values fit 16 bits: truncation keeps them
            }
        }
        for (; i < n; i++) d[i] = HalfBits.F32ToBf16(s[i]);
    }

    private static Vector512<uint> Round(Vector512<uint> bits, Vector512<uint> bias, Vector512<uint> absMask, Vector512<uint> inf, Vector512<uint> quiet)
    {
        var rounded = (bits + bias + ((bits >> 16) & Vector512<uint>.One)) >> 16;
        var nan = Vector512.GreaterThan(bits & absMask, inf); // exponent all ones, mantissa not zero
        return Vector512.ConditionalSelect(nan, (bits >> 16) | quiet, rounded);
    }

    public static void F16ToF32(ReadOnlySpan<ushort> src, Span<float> dst)
    {
        if (dst.Length < src.Length) throw new ArgumentException($"F16ToF32: destination holds {dst.Length} values, source {src.Length}", nameof(dst));
        fixed (ushort* s = src) fixed (float* d = dst) F16ToF32(s, d, src.Length);
    }

    /// <summary>Exact for every half (VCVTPH2PS through <see cref="MatVecF16Asm.Widen"/> where it runs, else one value at a time).</summary>
    public static void F16ToF32(ushort* s, float* d, long n)
    {
        long i = 0;
        if (n >= 16 && MatVecF16Asm.IsAvailable)
        {
            MatVecF16Asm.Widen(s, d, n / 16);
            i = n & ~15L;
        }
        for (; i < n; i++) d[i] = HalfBits.F16ToF32(s[i]);
    }

    public static void F32ToF16(ReadOnlySpan<float> src, Span<ushort> dst)
    {
        for (int i = 0; i < src.Length; i++) dst[i] = HalfBits.F32ToF16(src[i]);
    }

    public static void F32ToF16(float* s, ushort* d, long n)
    {
        for (long i = 0; i < n; i++) d[i] = HalfBits.F32ToF16(s[i]);
    }
}
