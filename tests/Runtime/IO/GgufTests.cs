using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using FineTuneNative.Tests.Peft;

namespace FineTuneNative.Tests.Runtime.IO;

public class GgufTests
{
    private static IBackend Backend => TestBackends.Get("cpu");

    [SkippableFact]
    public void Reader_Reads_A_Real_LlamaCpp_File()
    {
        // Facts from ../shared/assets/gguf-tiny-random-llama2/README.txt (checked there independently).
        var g = GgufReader.Open(SharedAssets.Require("gguf-tiny-random-llama2/llama-2-tiny-random.gguf"));
        Assert.Equal(3u, g.Version);
        Assert.Equal(18, g.Metadata.Count);
        Assert.Equal(12, g.Tensors.Count);
        Assert.Equal(724_416, g.DataStart);
        Assert.Equal("llama", g.Metadata["general.architecture"]);
        Assert.Equal(8u, g.Metadata["llama.embedding_length"]);
        Assert.Equal(32000, ((object[])g.Metadata["tokenizer.ggml.tokens"]).Length);
        var emb = g.Tensors[0];
        Assert.Equal("token_embd.weight", emb.Name);
        Assert.Equal(new long[] { 8, 32000 }, emb.Ne);
        Assert.Equal(GgmlType.F16, emb.Type);
        var last = g.Tensors[^1];
        Assert.Equal(new FileInfo(g.Path).Length, last.Offset + last.Bytes);
    }

    private static LlamaConfig Config(RopeLayout rope) => new()
    {
        HiddenSize = 64, IntermediateSize = 96, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 16,
        VocabSize = 300, MaxPositions = 64, TieWordEmbeddings = false, RopeLayout = rope,
    };

    [Theory]
    [InlineData(DType.Q8_0, RopeLayout.RotateHalf)]
    [InlineData(DType.Q4_0, RopeLayout.Interleaved)]
    [InlineData(DType.F32, RopeLayout.RotateHalf)]
    [InlineData(DType.F16, RopeLayout.RotateHalf)]
    public void Writer_Round_Trips_Metadata_Tensors_And_Block_Bytes(DType type, RopeLayout rope)
    {
        var c = Config(rope);
        using var w = TinyModel.Weights(Backend, 4, c);
        using var dir = new TempDir();
        string path = dir.File("m.gguf");
        GgufWriter.WriteLlama(w, type, path);
        Assert.False(File.Exists(path + ".tmp"));
        var g = GgufReader.Open(path);
        Assert.Equal("llama", g.Metadata["general.architecture"]);
        Assert.Equal(4u, g.Metadata["llama.attention.head_count"]);
        Assert.Equal(2u, g.Metadata["llama.attention.head_count_kv"]);
        Assert.Equal(300, ((object[])g.Metadata["tokenizer.ggml.tokens"]).Length);
        Assert.Equal(2 + 2 * 9 + 1, g.Tensors.Count);
        Assert.All(g.Tensors, t => Assert.Equal(0, (t.Offset - g.DataStart) % 32));
        var byName = g.Tensors.ToDictionary(t => t.Name);
        var expectType = type switch { DType.Q8_0 => GgmlType.Q8_0, DType.Q4_0 => GgmlType.Q4_0, DType.F16 => GgmlType.F16, _ => GgmlType.F32 };

        // A block-quantized matrix: exactly the bytes of our quantizer, rows = ne[1], columns = ne[0].
        var down = byName["blk.1.ffn_down.weight"];
        Assert.Equal(new long[] { 96, 64 }, down.Ne);
        Assert.Equal(expectType, down.Type);
        var host = w.Layers[1].Wdown.ToArray();
        byte[] expected;
        if (type == DType.F32) { expected = new byte[host.Length * 4]; Buffer.BlockCopy(host, 0, expected, 0, expected.Length); }
        else if (type == DType.F16) expected = host.SelectMany(v => BitConverter.GetBytes(HalfBits.F32ToF16(v))).ToArray();
        else { expected = new byte[type.StorageBytes(host.Length)]; QuantBlocks.Quantize(type, host, expected); }
        Assert.Equal(expected, g.ReadTensor(down));

        // q rows: llama.cpp rotates interleaved pairs, so "rotate half" weights are permuted per head.
        var q = byName["blk.0.attn_q.weight"];
        var wq = w.Layers[0].Wq.ToArray();
        var qf = new float[wq.Length];
        QuantOrCopy(g.ReadTensor(q), q.Type, qf);
        int hs = 16, cols = 64;
        for (int h = 0; h < 4; h++)
            for (int i = 0; i < hs; i++)
            {
                int src = rope == RopeLayout.RotateHalf ? (i % 2 == 0 ? i / 2 : hs / 2 + i / 2) : i;
                var want = new float[cols];
                Array.Copy(wq, (h * hs + src) * cols, want, 0, cols);
                if (type == DType.F16) want = want.Select(v => HalfBits.F16ToF32(HalfBits.F32ToF16(v))).ToArray();
                else if (type != DType.F32) { var blk = new byte[type.StorageBytes(cols)]; QuantBlocks.Quantize(type, want, blk); QuantBlocks.Dequantize(type, blk, want); }
                Assert.Equal(want, qf.AsSpan((h * hs + i) * cols, cols).ToArray());
            }
        var norm = byName["blk.0.attn_norm.weight"];
        Assert.Equal(GgmlType.F32, norm.Type);
        Assert.Equal(new long[] { 64 }, norm.Ne);
    }

    private static void QuantOrCopy(byte[] data, GgmlType t, float[] dst)
    {
        if (t == GgmlType.F32) Buffer.BlockCopy(data, 0, dst, 0, data.Length);
        else if (t == GgmlType.F16) for (int i = 0; i < dst.Length; i++) dst[i] = HalfBits.F16ToF32(BitConverter.ToUInt16(data, 2 * i));
        else QuantBlocks.Dequantize(t == GgmlType.Q8_0 ? DType.Q8_0 : DType.Q4_0, data, dst);
    }

    [Fact]
    public void Reader_Rejects_A_Non_Gguf_File()
    {
        using var dir = new TempDir();
        string p = dir.File("x.gguf");
        File.WriteAllBytes(p, new byte[64]);
        var e = Assert.Throws<InvalidDataException>(() => GgufReader.Open(p));
        Assert.Contains("x.gguf", e.Message);
    }
}
