namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// GGUF Q8_0 / Q4_0 read in plain double loops straight from the block bytes (the layout spelled out again here, no
/// code shared with Kernels/Quant), and the matrix-vector products on the dequantized weights.
/// </summary>
public static class QuantReference
{
    /// <summary>f16 bits to double, by the IEEE 754 binary16 definition.</summary>
    public static double F16(ushort h)
    {
        int sign = (h >> 15) & 1, exp = (h >> 10) & 31, man = h & 1023;
        if (exp == 31) return man == 0 ? (sign == 1 ? double.NegativeInfinity : double.PositiveInfinity) : double.NaN;
        double v = exp == 0 ? man * Math.Pow(2, -24) : (1 + man / 1024.0) * Math.Pow(2, exp - 15);
        return sign == 1 ? -v : v;
    }

    /// <summary>The elements of <paramref name="count"/> values stored as Q8_0 or Q4_0 blocks.</summary>
    public static double[] Dequantize(DType type, ReadOnlySpan<byte> blocks, long count)
    {
        if (count % 32 != 0) throw new ArgumentException($"{count} elements is not a whole number of 32-element blocks");
        int blockBytes = type switch { DType.Q8_0 => 34, DType.Q4_0 => 18, _ => throw new ArgumentException($"{type} is not block-quantized") };
        if (blocks.Length != count / 32 * blockBytes) throw new ArgumentException($"{count} elements of {type} need {count / 32 * blockBytes} bytes, got {blocks.Length}");
        var x = new double[count];
        for (long b = 0; b < count / 32; b++)
        {
            var blk = blocks.Slice((int)(b * blockBytes), blockBytes);
            double d = F16((ushort)(blk[0] | (blk[1] << 8)));
            for (int j = 0; j < 32; j++)
            {
                int q = type == DType.Q8_0
                    ? (sbyte)blk[2 + j]
                    : (j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4) - 8;
                x[b * 32 + j] = q * d;
            }
        }
        return x;
    }

    /// <summary>y(N) = W(N,K)·x(K) in double with W given as blocks of <paramref name="type"/>.</summary>
    public static double[] MatVec(DType type, ReadOnlySpan<byte> w, double[] x, int n, int k)
    {
        var wd = Dequantize(type, w, (long)n * k);
        var y = new double[n];
        for (int r = 0; r < n; r++)
        {
            double s = 0;
            for (int j = 0; j < k; j++) s += wd[(long)r * k + j] * x[j];
            y[r] = s;
        }
        return y;
    }

    /// <summary>
    /// llama.cpp's way of computing the same product, in double: x quantized to Q8 per 32-block with
    /// d = max|x|/127 and q = round-half-even(x·127/max|x|), then y = Σ_blocks d_w·d_x·Σ q_w·q_x.
    /// The gap between this and <see cref="MatVec"/> is the activation quantization error.
    /// </summary>
    public static double[] MatVecQ8Activations(DType type, ReadOnlySpan<byte> w, float[] x, int n, int k)
    {
        var wd = Dequantize(type, w, (long)n * k);
        var xq = new double[k];
        for (int b = 0; b < k / 32; b++)
        {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = Math.Max(amax, Math.Abs(x[b * 32 + j]));
            float id = amax > 0 ? 127f / amax : 0f;
            double d = amax / 127f;
            for (int j = 0; j < 32; j++) xq[b * 32 + j] = Math.Round((double)(x[b * 32 + j] * id), MidpointRounding.ToEven) * d;
        }
        var y = new double[n];
        for (int r = 0; r < n; r++)
        {
            double s = 0;
            for (int j = 0; j < k; j++) s += wd[(long)r * k + j] * xq[j];
            y[r] = s;
        }
        return y;
    }
}
