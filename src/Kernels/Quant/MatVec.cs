using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Quant;

/// <summary>
/// Row ranges of y = W·x for decode (one activation row, M = 1): W rows of f32, bf16, Q8_0 or Q4_0 against an f32
/// x, or, for the block types, against x quantized to 8 bits per 32-block (<see cref="QuantizeActivations"/>) as
/// llama.cpp does, with integer dot products: int8 weights are sign-extended to int16 and multiplied pairwise with
/// the int16 activations into int32 (AVX-512BW vpmaddwd; .NET 10 exposes no AVX512-VNNI), then each block's 16
/// int32 lanes are scaled by d_w·d_x in f32.
/// </summary>
/// <remarks>
/// Callers split the N rows between threads; each call writes only y[r0..r1). Four rows run together so the
/// activation block is loaded once per four weight blocks and four independent FMA chains hide the latency.
/// Reference: <see cref="Reference.QuantReference.MatVecQ8Activations"/> (integer path) and
/// <see cref="Reference.QuantReference.MatVec"/> (exact product on the dequantized weights).
/// </remarks>
public static unsafe class MatVec
{
    /// <summary>
    /// x(M, K) to 8-bit blocks: for each 32-block, d = max|x|/127, q = round-half-even(x·127/max|x|) kept as int16
    /// in q(M, K), d in d(M, K/32) and d·Σq in s(M, K/32) (the Q4_0 kernel needs Σq for its -8 offset).
    /// </summary>
    public static void QuantizeActivations(float* x, int m, int k, short* q, float* d, float* s)
    {
        if (k % 32 != 0) throw new ArgumentException($"QuantizeActivations: K = {k} is not a multiple of 32");
        int nb = k / 32;
        for (long b = 0; b < (long)m * nb; b++)
        {
            float* xb = x + b * 32;
            short* qb = q + b * 32;
            if (Vector512.IsHardwareAccelerated)
            {
                var x0 = Vector512.Load(xb);
                var x1 = Vector512.Load(xb + 16);
                float amax = Vector512.Max(Vector512.Abs(x0), Vector512.Abs(x1)).MaxAcross();
                float id = amax > 0 ? 127f / amax : 0f;
                var vid = Vector512.Create(id);
                var q0 = Avx512F.ConvertToVector512Int32(x0 * vid);   // round to nearest even (MXCSR default)
                var q1 = Avx512F.ConvertToVector512Int32(x1 * vid);
                Avx512F.ConvertToVector256Int16(q0).Store(qb);
                Avx512F.ConvertToVector256Int16(q1).Store(qb + 16);
                float dd = amax / 127f;
                d[b] = dd;
                s[b] = dd * Vector512.Sum(q0 + q1);
            }
            else
            {
                float amax = 0;
                for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(xb[j]));
                float id = amax > 0 ? 127f / amax : 0f;
                int sum = 0;
                for (int j = 0; j < 32; j++)
                {
                    int v = (int)MathF.Round(xb[j] * id, MidpointRounding.ToEven);
                    qb[j] = (short)v;
                    sum += v;
                }
                float dd = amax / 127f;
                d[b] = dd;
                s[b] = dd * sum;
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float MaxAcross(this Vector512<float> v)
    {
        var m = Vector256.Max(v.GetLower(), v.GetUpper());
        var m2 = Vector128.Max(m.GetLower(), m.GetUpper());
        m2 = Vector128.Max(m2, Vector128.Shuffle(m2, Vector128.Create(2, 3, 0, 1)));
        m2 = Vector128.Max(m2, Vector128.Shuffle(m2, Vector128.Create(1, 0, 3, 2)));
        return m2.ToScalar();
    }

    /// <summary>
    /// Requests <paramref name="lines"/> cache lines from p on (no fault past the end of the weights). Measured at the
    /// SmolLM2-135M shape, 2 threads: without it the row tiles ran at ~12 GB/s (Q8_0 decode 81 tokens/s), with it
    /// ~30 GB/s (214 tokens/s): this VM's hardware prefetcher does not keep the matvec's streams ahead.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Prefetch(byte* p, int lines)
    {
        if (!Sse.IsSupported) return;
        for (int i = 0; i < lines; i++) Sse.Prefetch0(p + 64 * i);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float F16(byte* p) => QuantBlocks.F16ToF32(*(ushort*)p);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Store(float* y, int r, float v, float* bias, bool accumulate)
    {
        if (bias != null) v += bias[r];
        y[r] = accumulate ? y[r] + v : v;
    }

    // ------------------------------------------------------------------------------------------- Q8_0

    /// <summary>y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1); W (N, K) Q8_0 blocks, x quantized (K).</summary>
    public static void RowsQ8_0(byte* w, int k, int r0, int r1, short* xq, float* xd, float* y, float* bias, bool accumulate)
    {
        int nb = k / 32;
        long rowBytes = (long)nb * Q8_0.BlockBytes;
        int r = r0;
        if (Vector512.IsHardwareAccelerated)
        {
            for (; r + 4 <= r1; r += 4)
            {
                byte* w0 = w + r * rowBytes, w1 = w0 + rowBytes, w2 = w1 + rowBytes, w3 = w2 + rowBytes;
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
                // Software prefetch (see Prefetch): the 4 rows of a tile are contiguous, so while walking this tile
                // request the next one, 4·34 bytes of it per block step.
                byte* next = w0 + 4 * rowBytes;
                for (int b = 0; b < nb; b++, w0 += 34, w1 += 34, w2 += 34, w3 += 34, next += 136)
                {
                    Prefetch(next, 3);
                    var va = Vector512.Load(xq + b * 32);
                    float d = xd[b];
                    a0 = BlockQ8(w0, va, d, a0);
                    a1 = BlockQ8(w1, va, d, a1);
                    a2 = BlockQ8(w2, va, d, a2);
                    a3 = BlockQ8(w3, va, d, a3);
                }
                Store(y, r, Vector512.Sum(a0), bias, accumulate);
                Store(y, r + 1, Vector512.Sum(a1), bias, accumulate);
                Store(y, r + 2, Vector512.Sum(a2), bias, accumulate);
                Store(y, r + 3, Vector512.Sum(a3), bias, accumulate);
            }
            for (; r < r1; r++)
            {
                byte* w0 = w + r * rowBytes;
                Vector512<float> a0 = default;
                for (int b = 0; b < nb; b++, w0 += 34) a0 = BlockQ8(w0, Vector512.Load(xq + b * 32), xd[b], a0);
                Store(y, r, Vector512.Sum(a0), bias, accumulate);
            }
            return;
        }
        for (; r < r1; r++)
        {
            byte* w0 = w + r * rowBytes;
            float acc = 0;
            for (int b = 0; b < nb; b++, w0 += 34)
            {
                int s = 0;
                for (int j = 0; j < 32; j++) s += ((sbyte*)w0)[2 + j] * xq[b * 32 + j];
                acc += s * (F16(w0) * xd[b]);
            }
            Store(y, r, acc, bias, accumulate);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> BlockQ8(byte* blk, Vector512<short> va, float xd, Vector512<float> acc)
    {
        var wq = Avx512BW.ConvertToVector512Int16(Vector256.Load((sbyte*)blk + 2));
        var dot = Avx512BW.MultiplyAddAdjacent(wq, va);
        return Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(dot), Vector512.Create(F16(blk) * xd), acc);
    }

    // ------------------------------------------------------------------------------------------- Q4_0

    /// <summary>
    /// y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1); W (N, K) Q4_0 blocks. The nibbles q (0..15) are used as they
    /// are and the -8 offset is folded in once per block through xs = d_x·Σq_x: Σ(q-8)·q_x = Σq·q_x - 8·Σq_x.
    /// </summary>
    public static void RowsQ4_0(byte* w, int k, int r0, int r1, short* xq, float* xd, float* xs, float* y, float* bias, bool accumulate)
    {
        int nb = k / 32;
        long rowBytes = (long)nb * Q4_0.BlockBytes;
        int r = r0;
        if (Vector512.IsHardwareAccelerated)
        {
            for (; r + 4 <= r1; r += 4)
            {
                byte* w0 = w + r * rowBytes, w1 = w0 + rowBytes, w2 = w1 + rowBytes, w3 = w2 + rowBytes;
                Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
                float c0 = 0, c1 = 0, c2 = 0, c3 = 0;
                byte* next = w0 + 4 * rowBytes;      // prefetch the next tile, 4·18 bytes of it per block step
                for (int b = 0; b < nb; b++, w0 += 18, w1 += 18, w2 += 18, w3 += 18, next += 72)
                {
                    Prefetch(next, 2);
                    var va = Vector512.Load(xq + b * 32);
                    float d = xd[b], s = xs[b];
                    a0 = BlockQ4(w0, va, d, s, a0, ref c0);
                    a1 = BlockQ4(w1, va, d, s, a1, ref c1);
                    a2 = BlockQ4(w2, va, d, s, a2, ref c2);
                    a3 = BlockQ4(w3, va, d, s, a3, ref c3);
                }
                Store(y, r, Vector512.Sum(a0) - 8 * c0, bias, accumulate);
                Store(y, r + 1, Vector512.Sum(a1) - 8 * c1, bias, accumulate);
                Store(y, r + 2, Vector512.Sum(a2) - 8 * c2, bias, accumulate);
                Store(y, r + 3, Vector512.Sum(a3) - 8 * c3, bias, accumulate);
            }
            for (; r < r1; r++)
            {
                byte* w0 = w + r * rowBytes;
                Vector512<float> a0 = default;
                float c0 = 0;
                for (int b = 0; b < nb; b++, w0 += 18) a0 = BlockQ4(w0, Vector512.Load(xq + b * 32), xd[b], xs[b], a0, ref c0);
                Store(y, r, Vector512.Sum(a0) - 8 * c0, bias, accumulate);
            }
            return;
        }
        for (; r < r1; r++)
        {
            byte* w0 = w + r * rowBytes;
            float acc = 0;
            for (int b = 0; b < nb; b++, w0 += 18)
            {
                int s = 0;
                for (int j = 0; j < 16; j++)
                    s += ((w0[2 + j] & 15) - 8) * xq[b * 32 + j] + ((w0[2 + j] >> 4) - 8) * xq[b * 32 + 16 + j];
                acc += s * (F16(w0) * xd[b]);
            }
            Store(y, r, acc, bias, accumulate);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> BlockQ4(byte* blk, Vector512<short> va, float xd, float xs, Vector512<float> acc, ref float corr)
    {
        var q = Vector128.Load(blk + 2);
        var mask = Vector128.Create((byte)15);
        var nib = Vector256.Create(q & mask, Vector128.ShiftRightLogical(q.AsUInt16(), 4).AsByte() & mask);
        var wq = Avx512BW.ConvertToVector512Int16(nib).AsInt16();
        var dot = Avx512BW.MultiplyAddAdjacent(wq, va);
        float dw = F16(blk);
        corr += dw * xs;
        return Avx512F.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(dot), Vector512.Create(dw * xd), acc);
    }

    // ------------------------------------------------------------------------------------------- f32 / bf16

    /// <summary>y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1); W (N, K) f32.</summary>
    public static void RowsF32(float* w, int k, int r0, int r1, float* x, float* y, float* bias, bool accumulate)
    {
        int r = r0;
        int kv = Vector512.IsHardwareAccelerated ? k & ~15 : 0;
        for (; r + 4 <= r1; r += 4)
        {
            float* w0 = w + (long)r * k, w1 = w0 + k, w2 = w1 + k, w3 = w2 + k;
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            Vector512<float> b0 = default, b1 = default, b2 = default, b3 = default;   // 8 FMA chains hide the 4-cycle latency
            int j = 0;
            for (; j + 32 <= kv; j += 32)
            {
                var vx = Vector512.Load(x + j);
                var vy = Vector512.Load(x + j + 16);
                a0 = Vector512.FusedMultiplyAdd(Vector512.Load(w0 + j), vx, a0);
                a1 = Vector512.FusedMultiplyAdd(Vector512.Load(w1 + j), vx, a1);
                a2 = Vector512.FusedMultiplyAdd(Vector512.Load(w2 + j), vx, a2);
                a3 = Vector512.FusedMultiplyAdd(Vector512.Load(w3 + j), vx, a3);
                b0 = Vector512.FusedMultiplyAdd(Vector512.Load(w0 + j + 16), vy, b0);
                b1 = Vector512.FusedMultiplyAdd(Vector512.Load(w1 + j + 16), vy, b1);
                b2 = Vector512.FusedMultiplyAdd(Vector512.Load(w2 + j + 16), vy, b2);
                b3 = Vector512.FusedMultiplyAdd(Vector512.Load(w3 + j + 16), vy, b3);
            }
            for (; j < kv; j += 16)
            {
                var vx = Vector512.Load(x + j);
                a0 = Vector512.FusedMultiplyAdd(Vector512.Load(w0 + j), vx, a0);
                a1 = Vector512.FusedMultiplyAdd(Vector512.Load(w1 + j), vx, a1);
                a2 = Vector512.FusedMultiplyAdd(Vector512.Load(w2 + j), vx, a2);
                a3 = Vector512.FusedMultiplyAdd(Vector512.Load(w3 + j), vx, a3);
            }
            float s0 = Vector512.Sum(a0 + b0), s1 = Vector512.Sum(a1 + b1), s2 = Vector512.Sum(a2 + b2), s3 = Vector512.Sum(a3 + b3);
            for (; j < k; j++) { s0 += w0[j] * x[j]; s1 += w1[j] * x[j]; s2 += w2[j] * x[j]; s3 += w3[j] * x[j]; }
            Store(y, r, s0, bias, accumulate);
            Store(y, r + 1, s1, bias, accumulate);
            Store(y, r + 2, s2, bias, accumulate);
            Store(y, r + 3, s3, bias, accumulate);
        }
        for (; r < r1; r++)
        {
            float* w0 = w + (long)r * k;
            Vector512<float> a0 = default;
            int j = 0;
            for (; j < kv; j += 16) a0 = Vector512.FusedMultiplyAdd(Vector512.Load(w0 + j), Vector512.Load(x + j), a0);
            float s0 = kv > 0 ? Vector512.Sum(a0) : 0;
            for (; j < k; j++) s0 += w0[j] * x[j];
            Store(y, r, s0, bias, accumulate);
        }
    }

    /// <summary>How 16-bit weights widen to f32: one value, and 16 at once (AVX-512).</summary>
    private interface IWiden
    {
        static abstract float One(ushort h);
        static abstract Vector512<float> Sixteen(ushort* p);
    }

    private struct Bf16Widen : IWiden
    {
        public static float One(ushort h) => HalfBits.Bf16ToF32(h);
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Sixteen(ushort* p) =>
            Vector512.ShiftLeft(Avx512F.ConvertToVector512UInt32(Vector256.Load(p)), 16).AsSingle();
    }

    private struct F16Widen : IWiden
    {
        public static float One(ushort h) => QuantBlocks.F16ToF32(h);
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector512<float> Sixteen(ushort* p) => PackedGemm.F16x16(p);
    }

    /// <summary>y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1); W (N, K) bf16 widened to f32 on the fly.</summary>
    public static void RowsBf16(ushort* w, int k, int r0, int r1, float* x, float* y, float* bias, bool accumulate) =>
        RowsHalf<Bf16Widen>(w, k, r0, r1, x, y, bias, accumulate);

    /// <summary>y[r] (+)= W[r]·x (+ bias[r]) for r in [r0, r1); W (N, K) f16 widened to f32 on the fly (decode reads half
    /// the bytes of f32).</summary>
    /// <remarks>
    /// Where <see cref="Cpu.MatVecF16Asm"/> runs (x64 Linux, AVX-512F) the 16-column steps are its machine code: VCVTPH2PS
    /// folded into the load, four rows per call, the next tile prefetched; the lane sums, the K % 16 tail and the store
    /// stay here. Elsewhere the widening is integer shifts and one multiply (<see cref="PackedGemm.F16x16"/>). Both
    /// accumulate in the same order (one FMA chain per row, then <c>Vector512.Sum</c>, then the tail), so finite weights
    /// give the same bits on both paths; only ±inf/NaN weights differ (the managed widening is exact for finite values only).
    /// </remarks>
    public static void RowsF16(ushort* w, int k, int r0, int r1, float* x, float* y, float* bias, bool accumulate)
    {
        if (k >= 16 && Cpu.MatVecF16Asm.IsAvailable) RowsF16Asm(w, k, r0, r1, x, y, bias, accumulate);
        else RowsHalf<F16Widen>(w, k, r0, r1, x, y, bias, accumulate);
    }

    private static void RowsF16Asm(ushort* w, int k, int r0, int r1, float* x, float* y, float* bias, bool accumulate)
    {
        var rows4 = Cpu.MatVecF16Asm.Rows4;
        var rows1 = Cpu.MatVecF16Asm.Rows1;
        float* acc = stackalloc float[64];
        int kv = k & ~15;
        long n16 = kv / 16, stride = 2L * k;
        int r = r0;
        for (; r + 4 <= r1; r += 4)
        {
            ushort* w0 = w + (long)r * k, w1 = w0 + k, w2 = w1 + k, w3 = w2 + k;
            rows4(w0, x, acc, n16, stride, (byte*)(w0 + 4L * k));   // prefetches the next tile of 4 rows
            float s0 = Vector512.Sum(Vector512.Load(acc)), s1 = Vector512.Sum(Vector512.Load(acc + 16));
            float s2 = Vector512.Sum(Vector512.Load(acc + 32)), s3 = Vector512.Sum(Vector512.Load(acc + 48));
            for (int j = kv; j < k; j++)
            {
                float xj = x[j];
                s0 += HalfBits.F16ToF32(w0[j]) * xj; s1 += HalfBits.F16ToF32(w1[j]) * xj;
                s2 += HalfBits.F16ToF32(w2[j]) * xj; s3 += HalfBits.F16ToF32(w3[j]) * xj;
            }
            Store(y, r, s0, bias, accumulate);
            Store(y, r + 1, s1, bias, accumulate);
            Store(y, r + 2, s2, bias, accumulate);
            Store(y, r + 3, s3, bias, accumulate);
        }
        for (; r < r1; r++)
        {
            ushort* w0 = w + (long)r * k;
            rows1(w0, x, acc, n16);
            float s0 = Vector512.Sum(Vector512.Load(acc));
            for (int j = kv; j < k; j++) s0 += HalfBits.F16ToF32(w0[j]) * x[j];
            Store(y, r, s0, bias, accumulate);
        }
    }

    /// <summary>
    /// The 16-bit matvec, four rows at a time, the next tile prefetched (SmolLM2-135M, 1 thread, CPU time: the f16 product
    /// alone 31-35 → 12-20 ms per token, bench quick-f16gemv m0/m1; bf16 decode end to end 26.8-27.5 → 19.3-19.9 ms per
    /// token, peers generate smollm2-135M bf16 1 ftn-only); <typeparamref name="TW"/> is a struct so the JIT specialises it.
    /// </summary>
    private static void RowsHalf<TW>(ushort* w, int k, int r0, int r1, float* x, float* y, float* bias, bool accumulate) where TW : struct, IWiden
    {
        int r = r0;
        int kv = Avx512F.IsSupported ? k & ~15 : 0;
        for (; r + 4 <= r1; r += 4)
        {
            ushort* w0 = w + (long)r * k, w1 = w0 + k, w2 = w1 + k, w3 = w2 + k;
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            byte* next = (byte*)(w0 + 4L * k);   // the next tile of 4 rows: 4·32 bytes of it per step (see Prefetch)
            int j = 0;
            for (; j < kv; j += 16, next += 128)
            {
                Prefetch(next, 2);
                var vx = Vector512.Load(x + j);
                a0 = Vector512.FusedMultiplyAdd(TW.Sixteen(w0 + j), vx, a0);
                a1 = Vector512.FusedMultiplyAdd(TW.Sixteen(w1 + j), vx, a1);
                a2 = Vector512.FusedMultiplyAdd(TW.Sixteen(w2 + j), vx, a2);
                a3 = Vector512.FusedMultiplyAdd(TW.Sixteen(w3 + j), vx, a3);
            }
            float s0 = Vector512.Sum(a0), s1 = Vector512.Sum(a1), s2 = Vector512.Sum(a2), s3 = Vector512.Sum(a3);
            for (; j < k; j++)
            {
                s0 += TW.One(w0[j]) * x[j]; s1 += TW.One(w1[j]) * x[j];
                s2 += TW.One(w2[j]) * x[j]; s3 += TW.One(w3[j]) * x[j];
            }
            Store(y, r, s0, bias, accumulate);
            Store(y, r + 1, s1, bias, accumulate);
            Store(y, r + 2, s2, bias, accumulate);
            Store(y, r + 3, s3, bias, accumulate);
        }
        for (; r < r1; r++)
        {
            ushort* w0 = w + (long)r * k;
            Vector512<float> a0 = default;
            int j = 0;
            for (; j < kv; j += 16) a0 = Vector512.FusedMultiplyAdd(TW.Sixteen(w0 + j), Vector512.Load(x + j), a0);
            float s0 = kv > 0 ? Vector512.Sum(a0) : 0;
            for (; j < k; j++) s0 += TW.One(w0[j]) * x[j];
            Store(y, r, s0, bias, accumulate);
        }
    }
}
