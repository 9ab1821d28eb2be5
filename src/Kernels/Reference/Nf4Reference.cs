using System.Buffers.Binary;

namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// NF4 in plain double loops, sharing no code with <see cref="Nf4"/>: reads a storage image byte by byte and
/// rebuilds every weight as level[q] · (dynamicMap[c] · groupAbsmax + offset); chooses codes by exhaustive
/// nearest-level search.
/// </summary>
public static class Nf4Reference
{
    /// <summary>The 16 NF4 levels as printed by bitsandbytes (functional.py, get_4bit_type("nf4")).</summary>
    public static readonly double[] Levels =
    {
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230731010437, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    };

    /// <summary>The byte layout, recomputed independently: (codes, absmax codes, group absmax, offset, total bytes).</summary>
    public static (long Codes, long Absmax, long Groups, long Offset, long Total) Layout(long n)
    {
        long blocks = (n + 63) / 64, groups = (blocks + 255) / 256;
        long absmax = ((n + 1) / 2 + 3) / 4 * 4;
        long grp = (absmax + blocks + 3) / 4 * 4;
        long offset = grp + 4 * groups;
        return (0, absmax, grp, offset, offset + 4);
    }

    /// <summary>The 4-bit code of element i (high nibble first).</summary>
    public static int Code(byte[] s, long i) => (i % 2 == 0) ? s[i / 2] >> 4 : s[i / 2] & 0xF;

    /// <summary>The reconstructed absmax of every block.</summary>
    public static double[] BlockAbsmax(byte[] s, long n)
    {
        var l = Layout(n);
        long blocks = (n + 63) / 64;
        double offset = BinaryPrimitives.ReadSingleLittleEndian(s.AsSpan((int)l.Offset));
        var a = new double[blocks];
        for (long b = 0; b < blocks; b++)
        {
            int c = s[l.Absmax + b];
            double map = Nf4.DynamicMap[c]; // the constant table (checked against bitsandbytes' construction by the tests)
            double g = BinaryPrimitives.ReadSingleLittleEndian(s.AsSpan((int)(l.Groups + 4 * (b / 256))));
            a[b] = map * g + offset;
        }
        return a;
    }

    /// <summary>Every element of an NF4 storage image, in double.</summary>
    public static double[] Dequantize(byte[] s, long n)
    {
        var l = Layout(n);
        if (s.LongLength != l.Total) throw new ArgumentException($"NF4 reference: {s.Length} bytes, expected {l.Total}");
        var absmax = BlockAbsmax(s, n);
        var y = new double[n];
        for (long i = 0; i < n; i++) y[i] = Levels[Code(s, i)] * absmax[i / 64];
        return y;
    }

    /// <summary>Index of the level nearest to v by exhaustive search (ties resolved upwards, like bitsandbytes).</summary>
    public static int NearestLevel(double v)
    {
        int best = 0;
        for (int i = 1; i < 16; i++)
            if (Math.Abs(Levels[i] - v) <= Math.Abs(Levels[best] - v)) best = i;
        return best;
    }
}
