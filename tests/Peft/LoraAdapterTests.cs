using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Peft;

[Collection("PeftModel")]
public class LoraAdapterTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    private static double EvalLoss(LlamaModel model, IReadOnlyList<TokenizedSample> samples)
    {
        double sum = 0; long n = 0;
        foreach (var b in Batching.Batches(samples, 4, 12, 0))
        {
            var (l, c) = model.Loss(b.Tokens, b.Targets, b.BatchSize, b.SeqLen);
            sum += l; n += c;
        }
        return sum / n;
    }

    /// <summary>Gives B random values (a fresh adapter has B = 0, which would make every check trivially pass).</summary>
    private static void RandomizeB(LoraAdapter adapter, ulong seed)
    {
        ulong state = seed;
        foreach (var m in adapter.Modules)
        {
            var b = new float[m.Slot.B.Length];
            for (int i = 0; i < b.Length; i++) b[i] = (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) - 0.5) * 0.2f;
            Cpu.Upload(m.Slot.B, b);
        }
    }

    [Fact]
    public void Create_uses_peft_init_and_leaves_the_model_unchanged()
    {
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        var data = TinyModel.Samples(6, 5, 12, seed: 3);
        double baseLoss = EvalLoss(model, data);

        var cfg = new LoraConfig { Rank = 4, Alpha = 8 };
        using var adapter = LoraAdapter.Create(model, cfg, seed: 11);

        var c = w.Config;
        Assert.Equal(2 * 7, adapter.Modules.Count);
        long expectedParams = c.NumLayers * 4L * (
            (c.HiddenSize + c.QDim) + 2 * (c.HiddenSize + c.KvDim) + (c.QDim + c.HiddenSize) +
            2 * (c.HiddenSize + c.IntermediateSize) + (c.IntermediateSize + c.HiddenSize));
        Assert.Equal(expectedParams, adapter.ParameterCount);
        foreach (var m in adapter.Modules)
        {
            Assert.Same(m.Slot, model.GetLora(m.Layer, m.Module));
            Assert.Equal(new[] { 4, m.In }, m.Slot.A.Shape);
            Assert.Equal(new[] { m.Out, 4 }, m.Slot.B.Shape);
            Assert.Equal(2f, m.Slot.Scale);
            Assert.All(m.Slot.B.ToArray(), x => Assert.Equal(0f, x));
            var a = m.Slot.A.ToArray();
            float bound = 1f / MathF.Sqrt(m.In); // kaiming_uniform(a=√5) on (R, in): gain √(1/3) · √(3/in)
            Assert.All(a, x => Assert.InRange(x, -bound, bound));
            Assert.True(a.Max() > 0.5f * bound && a.Min() < -0.5f * bound, $"{m.PeftPrefix}: A does not span its range");
        }
        // Different modules draw different values; the same seed draws the same values.
        Assert.NotEqual(adapter.Modules[0].Slot.A.ToArray().Take(4), adapter.Modules[7].Slot.A.ToArray().Take(4));
        using (var model2 = new LlamaModel(w, Cpu))
        using (var again = LoraAdapter.Create(model2, cfg, seed: 11))
            Assert.Equal(adapter.Modules[5].Slot.A.ToArray(), again.Modules[5].Slot.A.ToArray());

        NumericAssert.Close(new[] { baseLoss }, new[] { EvalLoss(model, data) }, 1e-6, 1e-6);
        adapter.Dispose();
        Assert.Null(model.GetLora(0, "q_proj"));
    }

    [Fact]
    public void Target_subset_and_rslora_scale()
    {
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, UseRsLora = true, TargetModules = new[] { "v_proj", "q_proj" } }, 1);
        Assert.Equal(new[] { "q_proj", "v_proj", "q_proj", "v_proj" }, adapter.Modules.Select(m => m.Module));
        Assert.Null(model.GetLora(1, "down_proj"));
        Assert.Equal(4f, model.GetLora(1, "v_proj")!.Scale); // 8 / √4
    }

    [Fact]
    public void Save_then_load_into_a_fresh_model_gives_the_same_loss_bit_for_bit()
    {
        using var tmp = new TempDir();
        using var w = TinyModel.Weights(Cpu);
        var data = TinyModel.Samples(6, 5, 12, seed: 3);
        double trained;
        var cfg = new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1f, TargetModules = new[] { "q_proj", "k_proj", "o_proj", "up_proj", "down_proj" } };
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, cfg, 5))
        {
            RandomizeB(adapter, 9);
            trained = EvalLoss(model, data);
            adapter.Save(tmp.Path, "tiny-random");
        }

        // The file has exactly PEFT's keys, shapes (A: (r, in), B: (out, r)) and dtype.
        using (var st = SafeTensors.Open(Path.Combine(tmp.Path, LoraAdapter.WeightsFile)))
        {
            var expected = new List<string>();
            for (int l = 0; l < 2; l++)
                foreach (var (mod, kind) in new[] { ("q_proj", "self_attn"), ("k_proj", "self_attn"), ("o_proj", "self_attn"), ("up_proj", "mlp"), ("down_proj", "mlp") })
                {
                    expected.Add($"base_model.model.model.layers.{l}.{kind}.{mod}.lora_A.weight");
                    expected.Add($"base_model.model.model.layers.{l}.{kind}.{mod}.lora_B.weight");
                }
            Assert.Equal(expected.OrderBy(x => x, StringComparer.Ordinal), st.Names.OrderBy(x => x, StringComparer.Ordinal));
            Assert.Equal(new[] { 4, 16 }, st.Info("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").Shape);
            Assert.Equal(new[] { 16, 4 }, st.Info("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight").Shape);
            Assert.Equal(new[] { 4, 24 }, st.Info("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").Shape);
            Assert.Equal(new[] { 24, 4 }, st.Info("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight").Shape);
            Assert.All(st.Tensors, t => Assert.Equal("F32", t.DTypeName));
            Assert.Equal("pt", st.Metadata["format"]);
        }

        using var model2 = new LlamaModel(w, Cpu);
        double untouched = EvalLoss(model2, data);
        using var loaded = LoraAdapter.Load(tmp.Path, model2);
        Assert.Equal(cfg.TargetModules, loaded.Config.TargetModules);
        Assert.Equal(0.1f, loaded.Config.Dropout);
        Assert.Equal(trained, EvalLoss(model2, data)); // bit for bit
        Assert.NotEqual(untouched, trained);
    }

    [Fact]
    public void Load_names_the_tensor_that_does_not_fit()
    {
        using var tmp = new TempDir();
        using var w = TinyModel.Weights(Cpu);
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, TargetModules = new[] { "q_proj", "down_proj" } }, 5))
            adapter.Save(tmp.Path);
        string cfgPath = Path.Combine(tmp.Path, LoraAdapter.ConfigFile);
        string stPath = Path.Combine(tmp.Path, LoraAdapter.WeightsFile);
        string goodCfg = File.ReadAllText(cfgPath);

        using var fresh = new LlamaModel(w, Cpu);
        // Rank in the config disagrees with the tensors.
        File.WriteAllText(cfgPath, goodCfg.Replace("\"r\": 4", "\"r\": 8"));
        var e = Assert.Throws<InvalidDataException>(() => LoraAdapter.Load(tmp.Path, fresh));
        Assert.Contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", e.Message);
        Assert.Contains("[4, 16]", e.Message);
        Assert.Null(fresh.GetLora(0, "q_proj"));

        // The config names a module the file does not hold.
        File.WriteAllText(cfgPath, goodCfg.Replace("\"down_proj\"", "\"down_proj\", \"v_proj\""));
        e = Assert.Throws<InvalidDataException>(() => LoraAdapter.Load(tmp.Path, fresh));
        Assert.Contains("missing tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight'", e.Message);

        // The file holds a tensor the config does not explain.
        File.WriteAllText(cfgPath, goodCfg.Replace("\"q_proj\",", ""));
        e = Assert.Throws<InvalidDataException>(() => LoraAdapter.Load(tmp.Path, fresh));
        Assert.Contains("unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'", e.Message);

        // A model of another shape.
        File.WriteAllText(cfgPath, goodCfg);
        using var other = TinyModel.Weights(Cpu, config: TinyModel.Config() with { IntermediateSize = 20 });
        using var otherModel = new LlamaModel(other, Cpu);
        e = Assert.Throws<InvalidDataException>(() => LoraAdapter.Load(tmp.Path, otherModel));
        Assert.Contains("mlp.down_proj.lora_A.weight", e.Message);

        // No weights file at all.
        File.Delete(stPath);
        var nf = Assert.Throws<FileNotFoundException>(() => LoraAdapter.Load(tmp.Path, fresh));
        Assert.Contains(LoraAdapter.WeightsFile, nf.Message);
    }

    [Fact]
    public void Merging_folds_s_B_A_into_the_base_weights()
    {
        using var tmp = new TempDir();
        using var w = TinyModel.Weights(Cpu);
        var data = TinyModel.Samples(6, 5, 12, seed: 3);
        double adapted;
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8 }, 5))
        {
            RandomizeB(adapter, 4);
            adapted = EvalLoss(model, data);
            adapter.Save(tmp.Path);

            using var merged = TinyModel.Weights(Cpu); // same seed: same base weights
            adapter.MergeInto(merged);
            // Hand check of one weight: W'[i,j] = W[i,j] + s Σ_r B[i,r] A[r,j].
            var m0 = adapter.Modules[3];
            var wBase = w.Layers[m0.Layer].Linear(m0.Module).ToArray();
            var wMerged = merged.Layers[m0.Layer].Linear(m0.Module).ToArray();
            var a = m0.Slot.A.ToArray();
            var b = m0.Slot.B.ToArray();
            int i = 5, j = 7;
            double expect = wBase[i * m0.In + j];
            for (int r = 0; r < 4; r++) expect += 2.0 * b[i * 4 + r] * a[r * m0.In + j];
            Assert.Equal(expect, wMerged[i * m0.In + j], 6);
            using var plain = new LlamaModel(merged, Cpu);
            NumericAssert.Close(new[] { adapted }, new[] { EvalLoss(plain, data) }, 1e-5, 1e-5);
        }
        // From the directory, without a training model.
        using var merged2 = TinyModel.Weights(Cpu);
        var cfg = LoraAdapter.MergeInto(tmp.Path, merged2);
        Assert.Equal(4, cfg.Rank);
        using var plain2 = new LlamaModel(merged2, Cpu);
        NumericAssert.Close(new[] { adapted }, new[] { EvalLoss(plain2, data) }, 1e-5, 1e-5);
    }
}
