using System.Text.Json;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Runtime.IO;

public class ModelLoaderTests
{
    private static IBackend Backend => TestBackends.Get("cpu");

    private static LlamaConfig Tiny(bool bias = false, bool tied = false) => new()
    {
        HiddenSize = 16, IntermediateSize = 24, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 4,
        VocabSize = 40, MaxPositions = 64, RmsNormEps = 1e-5f, TieWordEmbeddings = tied, AttentionBias = bias,
        BosTokenId = 1, EosTokenIds = new[] { 2 },
    };

    /// <summary>What a value becomes once stored as <paramref name="d"/>.</summary>
    private static float Stored(DType d, float v) => d switch
    {
        DType.BF16 => HalfBits.Bf16ToF32(HalfBits.F32ToBf16(v)),
        DType.F16 => (float)(Half)v,
        _ => v,
    };

    private static bool IsLinear(string name) => name == "lm_head.weight" || name.EndsWith("_proj.weight", StringComparison.Ordinal);

    /// <summary>Random tensors for every schema entry (norm weights near 1), in checkpoint order.</summary>
    private static List<(string Name, DType DType, int[] Shape, float[] Data)> RandomTensors(LlamaConfig cfg, DType dtype, int seed)
    {
        var r = new Random(seed);
        var list = new List<(string, DType, int[], float[])>();
        foreach (var (name, shape) in LlamaWeights.Schema(cfg))
        {
            int n = shape.Aggregate(1, (a, b) => a * b);
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            var data = new float[n];
            for (int i = 0; i < n; i++) data[i] = norm ? 1f + (float)(r.NextDouble() * 0.2 - 0.1) : (float)(r.NextDouble() * 0.6 - 0.3);
            list.Add((name, dtype, shape, data));
        }
        return list;
    }

    private static void WriteHf(string dir, LlamaConfig cfg, List<(string Name, DType DType, int[] Shape, float[] Data)> tensors, int shards = 1)
    {
        File.WriteAllText(Path.Combine(dir, "config.json"), cfg.ToHfJson());
        if (shards == 1) { SafeTensors.Write(Path.Combine(dir, "model.safetensors"), tensors); return; }
        var map = new Dictionary<string, string>();
        int per = (tensors.Count + shards - 1) / shards;
        for (int s = 0; s < shards; s++)
        {
            string file = $"model-{s + 1:D5}-of-{shards:D5}.safetensors";
            var part = tensors.Skip(s * per).Take(per).ToList();
            SafeTensors.Write(Path.Combine(dir, file), part);
            foreach (var t in part) map[t.Name] = file;
        }
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"),
            JsonSerializer.Serialize(new { metadata = new { total_size = 0 }, weight_map = map }));
    }

    private static void AssertWeights(LlamaWeights w, List<(string Name, DType DType, int[] Shape, float[] Data)> tensors, DType linear)
    {
        var named = w.Named().ToDictionary(p => p.Name, p => p.Tensor);
        Assert.Equal(tensors.Count, named.Count);
        foreach (var (name, dtype, shape, data) in tensors)
        {
            var t = named[name];
            var expectedDType = IsLinear(name) ? linear : DType.F32;
            Assert.Equal(expectedDType, t.DType);
            Assert.Equal(shape, t.Shape);
            var expected = data.Select(v => Stored(expectedDType, Stored(dtype, v))).ToArray();
            Assert.Equal(expected, t.ToArray());
        }
    }

    [Theory]
    [InlineData(DType.F32, false, false, 1)]
    [InlineData(DType.BF16, true, false, 1)]
    [InlineData(DType.F16, false, true, 1)]
    [InlineData(DType.F32, true, true, 3)]
    [InlineData(DType.BF16, false, false, 2)]
    public void Hf_Directory_Loads_Every_Tensor(DType dtype, bool bias, bool tied, int shards)
    {
        using var dir = new TempDir();
        var cfg = Tiny(bias, tied);
        var tensors = RandomTensors(cfg, dtype, seed: 10 + shards);
        WriteHf(dir.Path, cfg, tensors, shards);

        using var m = ModelLoader.Load(dir.Path, Backend);
        Assert.Equal("hf", m.Format);
        Assert.Equal((cfg with { TorchDtype = "x" }).ToHfJson(), (m.Weights.Config with { TorchDtype = "x" }).ToHfJson());
        Assert.Equal(RopeLayout.RotateHalf, m.Weights.Config.RopeLayout);
        // bf16 files stay bf16; f32 and f16 files compute in f32.
        AssertWeights(m.Weights, tensors, dtype == DType.BF16 ? DType.BF16 : DType.F32);
        Assert.All(m.SourceDTypes.Values, v => Assert.Equal(SafeTensors.FromDType(dtype), v));
        Assert.Equal(tensors.Count, m.SourceDTypes.Count);
        Assert.Equal(tied, m.Weights.LmHead is null);
    }

    [Fact]
    public void Cpu_Weights_Are_Zero_Copy_And_Writes_Never_Reach_The_File()
    {
        using var dir = new TempDir();
        var cfg = Tiny();
        var tensors = RandomTensors(cfg, DType.F32, 4);
        WriteHf(dir.Path, cfg, tensors);
        string file = Path.Combine(dir.Path, "model.safetensors");
        byte[] before = File.ReadAllBytes(file);
        using (var m = ModelLoader.Load(dir.Path, Backend))
        {
            Assert.Equal(tensors.Count, m.ZeroCopyTensors);
            var wq = m.Weights.Layers[0].Wq;
            Backend.Fill(wq, 7f);   // a trained-in-place parameter: copy-on-write pages
            Assert.All(wq.ToArray(), v => Assert.Equal(7f, v));
            using var again = ModelLoader.Load(dir.Path, Backend);
            Assert.Equal(tensors.First(t => t.Name == "model.layers.0.self_attn.q_proj.weight").Data, again.Weights.Layers[0].Wq.ToArray());
        }
        Assert.Equal(before, File.ReadAllBytes(file));

        // bf16 file: linear weights (kept bf16) are views, the f32 norms and embedding are converted copies.
        var bf = RandomTensors(cfg, DType.BF16, 4);
        WriteHf(dir.Path, cfg, bf);
        using (var m = ModelLoader.Load(dir.Path, Backend))
            Assert.Equal(bf.Count(t => IsLinear(t.Name)), m.ZeroCopyTensors);
        // Converting to f32 on request copies everything.
        using (var m = ModelLoader.Load(dir.Path, Backend, DType.F32))
            Assert.Equal(0, m.ZeroCopyTensors);
    }

    [Fact]
    public void Linear_DType_Can_Be_Chosen()
    {
        using var dir = new TempDir();
        var cfg = Tiny();
        var tensors = RandomTensors(cfg, DType.F32, 3);
        WriteHf(dir.Path, cfg, tensors);
        using (var m = ModelLoader.Load(dir.Path, Backend, DType.BF16)) AssertWeights(m.Weights, tensors, DType.BF16);
        // Loading through config.json or the .safetensors file finds the same directory.
        using (var m = ModelLoader.Load(Path.Combine(dir.Path, "config.json"), Backend)) AssertWeights(m.Weights, tensors, DType.F32);
        using (var m = ModelLoader.Load(Path.Combine(dir.Path, "model.safetensors"), Backend)) AssertWeights(m.Weights, tensors, DType.F32);
        Assert.Throws<ArgumentException>(() => ModelLoader.Load(dir.Path, Backend, DType.F16));
    }

    [Fact]
    public void Checkpoint_Mismatches_Name_The_Tensor()
    {
        var cfg = Tiny();
        void Expect(Action<List<(string Name, DType DType, int[] Shape, float[] Data)>> edit, params string[] fragments)
        {
            using var dir = new TempDir();
            var tensors = RandomTensors(cfg, DType.F32, 5);
            edit(tensors);
            WriteHf(dir.Path, cfg, tensors);
            var e = Assert.Throws<InvalidDataException>(() => ModelLoader.Load(dir.Path, Backend).Dispose());
            Assert.Contains(dir.Path, e.Message);
            foreach (var f in fragments) Assert.Contains(f, e.Message);
        }
        Expect(t => t.RemoveAll(x => x.Name == "model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'");
        Expect(t =>
        {
            int i = t.FindIndex(x => x.Name == "model.layers.0.self_attn.k_proj.weight");
            t[i] = (t[i].Name, t[i].DType, new[] { 16, 8 }, t[i].Data);
        }, "'model.layers.0.self_attn.k_proj.weight'", "[16, 8]", "expected [8, 16]");
        Expect(t => t.Add(("model.layers.0.mlp.extra.weight", DType.F32, new[] { 2 }, new[] { 1f, 2f })), "unexpected tensor 'model.layers.0.mlp.extra.weight'");
        Expect(t => t.RemoveAll(x => x.Name == "lm_head.weight"), "missing tensor 'lm_head.weight'");
    }

    [Fact]
    public void Known_Harmless_Extras_Are_Ignored()
    {
        using var dir = new TempDir();
        var cfg = Tiny(tied: true);
        var tensors = RandomTensors(cfg, DType.F32, 6);
        var withExtras = tensors.ToList();
        withExtras.Add(("model.layers.0.self_attn.rotary_emb.inv_freq", DType.F32, new[] { 2 }, new[] { 1f, 0.01f }));
        withExtras.Add(("lm_head.weight", DType.F32, new[] { 40, 16 }, new float[640])); // a tied model's stored copy
        WriteHf(dir.Path, cfg, withExtras);
        using var m = ModelLoader.Load(dir.Path, Backend);
        AssertWeights(m.Weights, tensors, DType.F32);
        Assert.Null(m.Weights.LmHead);
    }

    [Fact]
    public void Bad_Paths_And_Configs_Give_Clear_Errors()
    {
        using var dir = new TempDir();
        var e1 = Assert.Throws<FileNotFoundException>(() => ModelLoader.Load(dir.Path, Backend));
        Assert.Contains("config.json", e1.Message);
        Assert.Throws<FileNotFoundException>(() => ModelLoader.Load(dir.File("nope.bin"), Backend));
        File.WriteAllText(dir.File("weights.txt"), "x");
        Assert.Throws<InvalidDataException>(() => ModelLoader.Load(dir.File("weights.txt"), Backend));

        // A llama2.c file whose size disagrees with its header.
        var header = new byte[28 + 40];
        int[] h = { 8, 16, 1, 2, 2, 10, 4 };
        Buffer.BlockCopy(h, 0, header, 0, 28);
        File.WriteAllBytes(dir.File("tiny.bin"), header);
        var e2 = Assert.Throws<InvalidDataException>(() => ModelLoader.Load(dir.File("tiny.bin"), Backend));
        Assert.Contains("tiny.bin", e2.Message);
        Assert.Contains("needs", e2.Message);

        h[3] = 3; // 3 heads do not divide dim 8
        Buffer.BlockCopy(h, 0, header, 0, 28);
        File.WriteAllBytes(dir.File("tiny.bin"), header);
        var e3 = Assert.Throws<InvalidDataException>(() => ModelLoader.Load(dir.File("tiny.bin"), Backend));
        Assert.Contains("n_kv_heads", e3.Message);
    }

    // ---------------------------------------------------------------------------------------- stories260K

    [SkippableFact]
    public void Stories260K_Loads_With_The_Files_Floats()
    {
        string path = SharedAssets.Require("stories260K/stories260K.bin");
        using var m = ModelLoader.Load(path, Backend);
        var c = m.Weights.Config;
        Assert.Equal("llama2c", m.Format);
        Assert.Equal((64, 172, 5, 8, 4, 8, 512, 512), (c.HiddenSize, c.IntermediateSize, c.NumLayers, c.NumHeads, c.NumKvHeads, c.HeadDim, c.VocabSize, c.MaxPositions));
        Assert.True(c.TieWordEmbeddings);
        Assert.Equal(RopeLayout.Interleaved, c.RopeLayout);
        Assert.Null(m.Weights.LmHead);

        // Offsets computed here from the README's layout, read with a plain BinaryReader.
        using var br = new BinaryReader(File.OpenRead(path));
        float[] At(long floatIndex, int n)
        {
            br.BaseStream.Position = 28 + 4 * floatIndex;
            return Enumerable.Range(0, n).Select(_ => br.ReadSingle()).ToArray();
        }
        long V = 512, C = 64, L = 5, F = 172, KV = 32;
        long emb = 0, rmsAtt = emb + V * C, wq = rmsAtt + L * C, wk = wq + L * C * C, wv = wk + L * KV * C, wo = wv + L * KV * C;
        long rmsFfn = wo + L * C * C, w1 = rmsFfn + L * C, w2 = w1 + L * F * C, w3 = w2 + L * C * F, rmsFinal = w3 + L * F * C;
        var w = m.Weights;
        Assert.Equal(At(emb, 512 * 64), w.Embedding.ToArray());
        Assert.Equal(At(rmsAtt + 2 * C, 64), w.Layers[2].AttnNorm.ToArray());
        Assert.Equal(At(wq + 4 * C * C, 64 * 64), w.Layers[4].Wq.ToArray());
        Assert.Equal(At(wk + 3 * KV * C, 32 * 64), w.Layers[3].Wk.ToArray());
        Assert.Equal(At(wv + 1 * KV * C, 32 * 64), w.Layers[1].Wv.ToArray());
        Assert.Equal(At(wo + 0, 64 * 64), w.Layers[0].Wo.ToArray());
        Assert.Equal(At(rmsFfn + 4 * C, 64), w.Layers[4].FfnNorm.ToArray());
        Assert.Equal(At(w1 + 2 * F * C, 172 * 64), w.Layers[2].Wgate.ToArray());
        Assert.Equal(At(w2 + 3 * C * F, 64 * 172), w.Layers[3].Wdown.ToArray());
        Assert.Equal(At(w3 + 1 * F * C, 172 * 64), w.Layers[1].Wup.ToArray());
        Assert.Equal(At(rmsFinal, 64), w.FinalNorm.ToArray());
        Assert.All(m.SourceDTypes.Values, v => Assert.Equal("F32", v));
        Assert.Equal(m.Weights.Named().Count(), m.ZeroCopyTensors);
    }

    [SkippableFact]
    public void Stories260K_Truncated_Is_Rejected()
    {
        string path = SharedAssets.Require("stories260K/stories260K.bin");
        using var dir = new TempDir();
        var bytes = File.ReadAllBytes(path);
        File.WriteAllBytes(dir.File("cut.bin"), bytes.AsSpan(0, bytes.Length - 4).ToArray());
        var e = Assert.Throws<InvalidDataException>(() => ModelLoader.Load(dir.File("cut.bin"), Backend));
        Assert.Contains("cut.bin", e.Message);
        Assert.Contains("1056540", e.Message);
    }

    [SkippableFact]
    public void Stories260K_Saved_As_Hf_Gives_The_Same_Logits()
    {
        string path = SharedAssets.Require("stories260K/stories260K.bin");
        using var dir = new TempDir();
        using var original = ModelLoader.Load(path, Backend);
        ModelSaver.SaveHf(original.Weights, dir.Path);

        using var st = SafeTensors.Open(dir.Path);
        Assert.True(st.Metadata.ContainsKey(ModelSaver.RopePermutationKey));
        Assert.Equal("pt", st.Metadata["format"]);
        st.Dispose();

        // tok512.model is the SentencePiece model tok512.bin was exported from: as an HF directory's tokenizer.model.
        File.Copy(SharedAssets.Require("stories260K/tok512.model"), Path.Combine(dir.Path, "tokenizer.model"));
        using var hf = ModelLoader.Load(dir.Path, Backend);
        Assert.Equal("hf", hf.Format);
        Assert.NotNull(hf.Tokenizer);
        Assert.NotNull(original.Tokenizer);
        Assert.Equal(original.Tokenizer!.Encode("Once upon a time, Lily saw a big dog.", addBos: true),
            hf.Tokenizer!.Encode("Once upon a time, Lily saw a big dog.", addBos: true));
        Assert.Equal(RopeLayout.RotateHalf, hf.Weights.Config.RopeLayout);
        // Everything but q/k is byte-identical; q/k rows moved, the values are the same multiset per head.
        var a = original.Weights.Named().ToDictionary(p => p.Name, p => p.Tensor);
        foreach (var (name, t) in hf.Weights.Named())
        {
            var o = a[name].ToArray();
            var h = t.ToArray();
            if (name.Contains("q_proj") || name.Contains("k_proj"))
            {
                Assert.NotEqual(o, h);
                Assert.Equal(o.OrderBy(x => x), h.OrderBy(x => x));
            }
            else Assert.Equal(o, h);
        }

        // Same model: the interleaved original and the rotate-half copy predict the same logits.
        var prompt = new[] { 1, 403, 407, 261, 378, 431, 20, 50, 300, 89, 4 };
        using var s1 = new InferenceSession(original.Weights, Backend, 32);
        using var s2 = new InferenceSession(hf.Weights, Backend, 32);
        var l1 = (float[])s1.Prefill(prompt).Clone();
        var l2 = s2.Prefill(prompt);
        NumericAssert.Close(l1, l2, 1e-4, 1e-4, "logits interleaved vs rotate-half export");
    }

    [SkippableFact]
    public void Tokenizer_Next_To_The_Model_Is_Loaded_And_Checked()
    {
        string spm = SharedAssets.Require("stories260K/tok512.model");
        using var dir = new TempDir();
        WriteHf(dir.Path, Tiny(), RandomTensors(Tiny(), DType.F32, 2));
        using (var m = ModelLoader.Load(dir.Path, Backend)) Assert.Null(m.Tokenizer);
        // A 512-token vocabulary cannot serve a 40-token model.
        File.Copy(spm, Path.Combine(dir.Path, "tokenizer.model"));
        var e = Assert.Throws<InvalidDataException>(() => ModelLoader.Load(dir.Path, Backend).Dispose());
        Assert.Contains("512", e.Message);
        Assert.Contains("tokenizer.model", e.Message);

        var big = Tiny() with { VocabSize = 512 };
        WriteHf(dir.Path, big, RandomTensors(big, DType.F32, 2));
        using (var m = ModelLoader.Load(dir.Path, Backend))
        {
            Assert.Equal(512, m.Tokenizer!.VocabSize);
            Assert.Equal(1, m.Tokenizer.BosId);
        }
        // An explicit tokenizer path wins.
        using (var m = ModelLoader.Load(dir.Path, Backend, tokenizerPath: SharedAssets.Require("stories260K/tok512.bin")))
            Assert.Contains("tok512.bin", m.Tokenizer!.Describe());
    }

    [Fact]
    public void SaveHf_Round_Trips_A_Tiny_Model_In_Any_DType()
    {
        using var src = new TempDir();
        var cfg = Tiny(bias: true);
        var tensors = RandomTensors(cfg, DType.F32, 8);
        WriteHf(src.Path, cfg, tensors);
        using var m = ModelLoader.Load(src.Path, Backend);
        foreach (var dtype in new[] { DType.F32, DType.BF16, DType.F16 })
        {
            using var dst = new TempDir();
            ModelSaver.SaveHf(m.Weights, dst.Path, dtype);
            Assert.Equal(new[] { "config.json", "model.safetensors" }, Directory.GetFiles(dst.Path).Select(Path.GetFileName).Order());
            using var back = ModelLoader.Load(dst.Path, Backend, DType.F32);
            var expected = tensors.Select(t => (t.Name, dtype, t.Shape, t.Data)).ToList();
            AssertWeights(back.Weights, expected, DType.F32);
            Assert.Equal((cfg with { TorchDtype = "x" }).ToHfJson(), (back.Weights.Config with { TorchDtype = "x" }).ToHfJson());
            Assert.Equal(SafeTensors.FromDType(dtype), back.SourceDTypes["model.layers.0.self_attn.q_proj.weight"]);
        }
    }

    [Fact]
    public void Interleaved_To_RotateHalf_Moves_Pairs()
    {
        // One head of size 4 with 1 column: rows (0,1) and (2,3) are the interleaved pairs.
        var perm = ModelSaver.InterleavedToRotateHalf(new[] { 0f, 1f, 2f, 3f }, 1, 4);
        Assert.Equal(new[] { 0f, 2f, 1f, 3f }, perm); // pair 0 -> rows (0, 2), pair 1 -> rows (1, 3)
        var two = Enumerable.Range(0, 16).Select(i => (float)i).ToArray(); // 2 heads × 4 rows × 2 columns
        Assert.Equal(two, ModelSaver.RotateHalfToInterleaved(ModelSaver.InterleavedToRotateHalf(two, 2, 4), 2, 4));
    }
}
