using System.Runtime.InteropServices;

namespace FineTuneNative.Kernels.Quant;

/// <summary>
/// A weight matrix W (N, K) repacked once for inference into panels of 16 output rows whose elements are
/// interleaved so that one 512-bit lane (32 bits) belongs to one output row: a vector instruction then computes 16
/// outputs at once and the activations are broadcast (llama.cpp's repacked "x8"/"x16" CPU layouts follow the same
/// idea). Used by <see cref="PackedGemm"/> for prefill (M tokens) and for the decode matvec of the block types.
/// </summary>
/// <remarks>
/// Panel p holds rows 16p..16p+15 (rows past N are zero, with zero scales); panels are <see cref="PanelBytes"/>
/// apart, 64-byte aligned. Within a panel, per type (c = row within the panel, 0..15):
/// <list type="bullet">
/// <item>Q4_0, per 32-block b (320 bytes): 16 f32 scales d[c], then 4 vectors of 64 bytes; byte 4c+j of vector s
/// (s = 0..3, j = 0..3) is byte 4s+j of the row's GGUF nibble array, i.e. element 4s+j in its low nibble and
/// element 16+4s+j in its high nibble. So (v &amp; 15) holds elements 4s..4s+3 of all 16 rows, (v &gt;&gt; 4) &amp; 15
/// elements 16+4s..16+4s+3.</item>
/// <item>Q8_0, per 32-block b (576 bytes): 16 f32 scales, then 16 vectors of 32 int8; byte 2c+j of vector t is element
/// 2t+j of row c. Sign-extended to int16 it is the vpmaddwd operand for element pair (2t, 2t+1) of 16 rows.</item>
/// <item>F32 (64·K bytes) and F16 (32·K bytes): element k of row c at index 16k+c.</item>
/// </list>
/// Scales are kept in f32 (4 bytes per block instead of 2): the kernels multiply 16 of them by the activation scale
/// in one instruction instead of converting f16 per block. Reference: the same products on
/// <see cref="Reference.QuantReference.Dequantize"/>'s weights (tests/Kernels/Quant/PackedGemmTests.cs).
/// </remarks>
public sealed unsafe class PackedMatrix : IDisposable
{
    public const int Lanes = 16;

    private byte* _data;

    public DType Type { get; }
    public int N { get; }
    public int K { get; }
    public int Panels { get; }
    public long PanelBytes { get; }
    public string Name { get; }

    /// <summary>Bytes of one panel of <paramref name="type"/> with depth <paramref name="k"/>.</summary>
    public static long PanelBytesOf(DType type, int k) => type switch
    {
        DType.Q4_0 => k / 32 * 320L,
        DType.Q8_0 => k / 32 * 576L,
        DType.F32 => 64L * k,
        DType.F16 => 32L * k,
        _ => throw new ArgumentException($"no packed layout for {type.Name()}"),
    };

    /// <summary>True where <paramref name="type"/> has a packed layout (with K a whole number of blocks for Q8_0/Q4_0).</summary>
    public static bool Supports(DType type, int k) =>
        type is DType.F32 or DType.F16 || (type is DType.Q8_0 or DType.Q4_0 && k % 32 == 0);

    /// <summary>Packs W (N, K) stored row-major as <paramref name="type"/> at <paramref name="src"/>.</summary>
    public PackedMatrix(DType type, void* src, int n, int k, string name = "weight")
    {
        if (!Supports(type, k)) throw new ArgumentException($"{name}: cannot pack {type.Name()} with K = {k}");
        if (n <= 0 || k <= 0) throw new ArgumentException($"{name}: empty matrix ({n}, {k})");
        Type = type; N = n; K = k; Name = name;
        Panels = (n + Lanes - 1) / Lanes;
        PanelBytes = PanelBytesOf(type, k);
        nuint bytes = (nuint)(Panels * PanelBytes);
        _data = (byte*)NativeMemory.AlignedAlloc(bytes, 64);
        NativeMemory.Clear(_data, bytes);
        nint s = (nint)src;
        Parallel.For(0, Panels, p => PackPanel(p, (byte*)s));
    }

    /// <summary>The first byte of panel <paramref name="p"/>.</summary>
    public byte* Panel(int p) => _data + p * PanelBytes;

    public byte* Data => _data;

    private void PackPanel(int p, byte* src)
    {
        byte* dst = Panel(p);
        int nb = K / 32;
        for (int c = 0; c < Lanes; c++)
        {
            int r = p * Lanes + c;
            if (r >= N) break;
            switch (Type)
            {
                case DType.Q4_0:
                    for (int b = 0; b < nb; b++)
                    {
                        byte* blk = src + ((long)r * nb + b) * Q4_0.BlockBytes;
                        byte* o = dst + b * 320L;
                        ((float*)o)[c] = QuantBlocks.F16ToF32(*(ushort*)blk);
                        for (int s = 0; s < 4; s++)
                            for (int j = 0; j < 4; j++) o[64 + 64 * s + 4 * c + j] = blk[2 + 4 * s + j];
                    }
                    break;
                case DType.Q8_0:
                    for (int b = 0; b < nb; b++)
                    {
                        byte* blk = src + ((long)r * nb + b) * Q8_0.BlockBytes;
                        byte* o = dst + b * 576L;
                        ((float*)o)[c] = QuantBlocks.F16ToF32(*(ushort*)blk);
                        for (int t = 0; t < 16; t++)
                        {
                            o[64 + 32 * t + 2 * c] = blk[2 + 2 * t];
                            o[64 + 32 * t + 2 * c + 1] = blk[3 + 2 * t];
                        }
                    }
                    break;
                case DType.F32:
                    for (int j = 0; j < K; j++) ((float*)dst)[16L * j + c] = ((float*)src)[(long)r * K + j];
                    break;
                default:
                    for (int j = 0; j < K; j++) ((ushort*)dst)[16L * j + c] = ((ushort*)src)[(long)r * K + j];
                    break;
            }
        }
    }

    public void Dispose()
    {
        if (_data != null) NativeMemory.AlignedFree(_data);
        _data = null;
    }
}
