using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels;

/// <summary>
/// 4-bit NormalFloat (Dettmers et al. 2023, QLoRA) in bitsandbytes' layout: the flattened tensor in blocks of
/// <see cref="BlockSize"/> = 64 elements, each element the index of the nearest of the 16 NF4 levels to
/// x / absmax(block); the per-block absmax itself double-quantised: offset = mean(absmax), then absmax - offset in
/// groups of <see cref="GroupSize"/> = 256 blocks, each value an 8-bit index into bitsandbytes' signed dynamic map
/// scaled by the group's f32 absmax. w = Levels[q] · (DynamicMap[c] · groupAbsmax + offset).
/// </summary>
/// <remarks>
/// One tensor's storage holds the per-tensor parts of bitsandbytes' QuantState (the names of its saved state):
/// <code>
/// [0, ceil(n/2))        weight             two codes per byte, element 2i in the high nibble (bitsandbytes order)
/// aligned to 4          absmax             nBlocks u8 codes into nested_quant_map
/// aligned to 4          nested_absmax      nGroups f32
///                       offset             1 f32 (mean of the block absmaxes)
/// </code>
/// The two constant tables, quant_map (<see cref="Levels"/>) and nested_quant_map (<see cref="DynamicMap"/>), are
/// the same for every tensor and live once per process (a GPU backend uploads them once). About 4.13 bits per
/// weight: 0.5 + 1/64 + 4/(64·256) bytes per element, plus at most 11 bytes per tensor.
/// </remarks>
public static class Nf4
{
    public const int BlockSize = 64;
    public const int GroupSize = 256;

    /// <summary>
    /// The 16 NF4 levels exactly as bitsandbytes lists them (quantiles of N(0, 1) normalised to [-1, 1], with an exact 0;
    /// QLoRA paper appendix E).
    /// </summary>
    public static readonly float[] Levels =
    {
        -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
        0.07958029955625534f, 0.16093020141124725f, 0.24611230731010437f, 0.33791524171829224f,
        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
    };

    /// <summary>
    /// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for exponent i = 0..6,
    /// 2^i midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), with both signs, plus 0 and 1, sorted (256 values).
    /// </summary>
    public static readonly float[] DynamicMap = CreateDynamicMap();

    private static float[] CreateDynamicMap()
    {
        var data = new List<float>(256);
        for (int i = 0; i < 7; i++)
        {
            int items = (1 << i) + 1;
            double scale = Math.Pow(10, i - 6);
            for (int j = 0; j + 1 < items; j++)
            {
                // torch.linspace(0.1, 1, items) in f32, then midpoints, then times 10^(i-6) (as bitsandbytes computes it)
                float b0 = (float)(0.1 + 0.9 * j / (items - 1)), b1 = (float)(0.1 + 0.9 * (j + 1) / (items - 1));
                float mean = (b0 + b1) / 2f;
                data.Add((float)(scale * mean));
                data.Add((float)(-scale * mean));
            }
        }
        data.Add(0f);
        data.Add(1f);
        data.Sort();
        return data.ToArray();
    }

    public static long Blocks(long n) => (n + BlockSize - 1) / BlockSize;
    public static long Groups(long n) => (Blocks(n) + GroupSize - 1) / GroupSize;

    private static long Align4(long x) => (x + 3) & ~3L;

    /// <summary>Byte offset of the absmax codes.</summary>
    public static long AbsmaxOffset(long n) => Align4((n + 1) / 2);
    /// <summary>Byte offset of the f32 group absmaxes (nested_absmax).</summary>
    public static long GroupAbsmaxOffset(long n) => Align4(AbsmaxOffset(n) + Blocks(n));
    /// <summary>Byte offset of the f32 offset (the mean of the block absmaxes), the last field.</summary>
    public static long OffsetOffset(long n) => GroupAbsmaxOffset(n) + 4 * Groups(n);
    public static long StorageBytes(long n) => OffsetOffset(n) + 4;

    /// <summary>Index of the NF4 level nearest to v (v in [-1, 1]); ties go up, as bitsandbytes' decision tree (v &gt; midpoint).</summary>
    public static int NearestLevel(float v)
    {
        if (float.IsNaN(v)) return 7; // an all-zero block: 0/0
        int lo = 0;
        for (int i = 1; i < 16; i++)
        {
            float mid = (Levels[i - 1] + Levels[i]) * 0.5f;
            if (v > mid) lo = i; else break;
        }
        return lo;
    }

    /// <summary>Index of the dynamic-map value nearest to v (ties to the lower index).</summary>
    public static int NearestDynamic(float v)
    {
        var map = DynamicMap;
        int lo = 0, hi = map.Length - 1;
        if (v <= map[lo]) return lo;
        if (v >= map[hi]) return hi;
        while (hi - lo > 1)
        {
            int mid = (lo + hi) >> 1;
            if (map[mid] <= v) lo = mid; else hi = mid;
        }
        return v - map[lo] <= map[hi] - v ? lo : hi;
    }

    /// <summary>Quantizes <paramref name="x"/> (the tensor flattened row-major) into a fresh NF4 storage image.</summary>
    public static byte[] Quantize(ReadOnlySpan<float> x)
    {
        long n = x.Length;
        var dst = new byte[StorageBytes(n)];
        long nBlocks = Blocks(n), nGroups = Groups(n);
        // 1. per-block absmax and the 4-bit codes
        var absmax = new float[nBlocks];
        for (long b = 0; b < nBlocks; b++)
        {
            int start = (int)(b * BlockSize), end = (int)Math.Min(n, start + BlockSize);
            float m = 0;
            for (int i = start; i < end; i++)
            {
                if (!float.IsFinite(x[i])) throw new ArgumentException($"NF4: element {i} is {x[i]}; only finite weights can be quantized");
                m = Math.Max(m, Math.Abs(x[i]));
            }
            absmax[b] = m;
            float inv = 1f / m; // bitsandbytes multiplies by the reciprocal
            for (int i = start; i < end; i++)
            {
                int q = NearestLevel(x[i] * inv);
                if ((i & 1) == 0) dst[i >> 1] = (byte)(q << 4);
                else dst[i >> 1] |= (byte)q;
            }
        }
        // 2. double quantisation of the absmaxes: offset = mean, then 8-bit dynamic codes per group of 256 blocks
        double sum = 0;
        foreach (float a in absmax) sum += a;
        float offset = nBlocks == 0 ? 0f : (float)(sum / nBlocks);
        long absOff = AbsmaxOffset(n), gOff = GroupAbsmaxOffset(n);
        for (long g = 0; g < nGroups; g++)
        {
            long start = g * GroupSize, end = Math.Min(nBlocks, start + GroupSize);
            float m = 0;
            for (long b = start; b < end; b++) m = Math.Max(m, Math.Abs(absmax[b] - offset));
            float inv = m > 0 ? 1f / m : 0f;
            for (long b = start; b < end; b++) dst[absOff + b] = (byte)NearestDynamic((absmax[b] - offset) * inv);
            BinaryPrimitives.WriteSingleLittleEndian(dst.AsSpan((int)(gOff + 4 * g)), m);
        }
        BinaryPrimitives.WriteSingleLittleEndian(dst.AsSpan((int)OffsetOffset(n)), offset);
        return dst;
    }

    /// <summary>The reconstructed absmax of block <paramref name="block"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static unsafe float BlockAbsmax(byte* storage, long n, long block)
    {
        byte code = storage[AbsmaxOffset(n) + block];
        float groupMax = *(float*)(storage + GroupAbsmaxOffset(n) + 4 * (block / GroupSize));
        float offset = *(float*)(storage + OffsetOffset(n));
        return DynamicMap[code] * groupMax + offset;
    }

    /// <summary>dst[0, count) = the dequantized elements [start, start + count) of an NF4 storage of n elements.</summary>
    public static unsafe void Dequantize(byte* storage, long n, long start, long count, float* dst)
    {
        if (start < 0 || count < 0 || start + count > n) throw new ArgumentOutOfRangeException(nameof(start), $"NF4: range [{start}, {start + count}) of {n} elements");
        fixed (float* levels = Levels)
            DequantizeCore(storage, n, start, count, dst, levels);
    }

    private static unsafe void DequantizeCore(byte* storage, long n, long start, long count, float* dst, float* levels)
    {
        long i = start, end = start + count;
        while (i < end)
        {
            long block = i / BlockSize;
            long blockEnd = Math.Min(end, (block + 1) * BlockSize);
            float absmax = BlockAbsmax(storage, n, block);
            // odd head element, then pairs from whole bytes, then an even tail element
            if ((i & 1) != 0 && i < blockEnd) { *dst++ = levels[storage[i >> 1] & 15] * absmax; i++; }
            if (Avx512F.IsSupported && i + 32 <= blockEnd)
            {
                var lut = Avx512F.LoadVector512(levels);
                var scale = Avx512F.BroadcastScalarToVector512(Sse.LoadScalarVector128(&absmax));
                var mask15 = Avx512F.BroadcastScalarToVector512(Sse2.ConvertScalarToVector128Int32(15));
                Vector512<int> ilo, ihi;
                fixed (int* ix = Interleave) { ilo = Avx512F.LoadVector512(ix); ihi = Avx512F.LoadVector512(ix + 16); }
                for (; i + 32 <= blockEnd; i += 32, dst += 32) Dequantize32(storage + (i >> 1), lut, scale, mask15, ilo, ihi, dst);
            }
            for (; i + 1 < blockEnd; i += 2)
            {
                byte v = storage[i >> 1];
                dst[0] = levels[v >> 4] * absmax;
                dst[1] = levels[v & 15] * absmax;
                dst += 2;
            }
            if (i < blockEnd) { *dst++ = levels[storage[i >> 1] >> 4] * absmax; i++; }
        }
    }

    // vpermt2ps indices interleaving the high-nibble levels (even elements, from a) with the low-nibble ones (odd, from b)
    private static readonly int[] Interleave =
    {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31,
    };

    /// <summary>32 elements from 16 code bytes: zero-extend the bytes, split the nibbles, look both up in the 16-level
    /// table with one permute each, interleave them back into element order, scale. Explicit AVX-512F intrinsics (the
    /// generic Vector512 operators fall back to software where the runtime prefers 256-bit vectors).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static unsafe void Dequantize32(byte* codes, Vector512<float> lut, Vector512<float> scale, Vector512<int> mask15,
        Vector512<int> ilo, Vector512<int> ihi, float* dst)
    {
        var bytes = Avx512F.ConvertToVector512Int32(Sse2.LoadVector128(codes));
        var hi = Avx512F.PermuteVar16x32(lut, Avx512F.ShiftRightLogical(bytes, 4));
        var lo = Avx512F.PermuteVar16x32(lut, Avx512F.And(bytes, mask15));
        Avx512F.Store(dst, Avx512F.Multiply(Avx512F.PermuteVar16x32x2(hi, ilo, lo), scale));
        Avx512F.Store(dst + 16, Avx512F.Multiply(Avx512F.PermuteVar16x32x2(hi, ihi, lo), scale));
    }

    /// <summary>Every element of an NF4 tensor (of any backend), dequantized to host floats.</summary>
    public static unsafe float[] ToFloats(Tensor t)
    {
        if (t.DType != DType.NF4) throw new ArgumentException($"Nf4.ToFloats: {t.Describe()} is not nf4");
        if (t.Backend is Cpu.CpuBackend cpu)
        {
            var y = new float[t.Length];
            fixed (float* d = y) Dequantize(cpu.Nf4Weight(t, t.Length, "t", "Nf4.ToFloats"), t.Length, 0, t.Length, d);
            return y;
        }
        var bytes = new byte[t.Bytes]; // a device tensor: its storage image, dequantized here
        t.Backend.DownloadRaw(t, bytes);
        return Dequantize(bytes, t.Length);
    }

    /// <summary>Host helper: every element of an NF4 storage image as f32.</summary>
    public static unsafe float[] Dequantize(byte[] storage, long n)
    {
        if (storage.LongLength != StorageBytes(n)) throw new ArgumentException($"NF4: {storage.Length} bytes for {n} elements (expected {StorageBytes(n)})");
        var y = new float[n];
        fixed (byte* s = storage)
        fixed (float* d = y)
            Dequantize(s, n, 0, n, d);
        return y;
    }
}
