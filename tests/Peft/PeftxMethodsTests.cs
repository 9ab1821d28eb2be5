using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Prompt tuning, prefix tuning and bottleneck adapters as trainable methods: PEFT's file layouts, save/load round
/// trips, generation applying exactly what training computed, and real training runs that lower held-out loss.
/// </summary>
[Collection("PeftModel")]
public class PeftxMethodsTests(ITestOutputHelper output)
{
    private static IBackend Cpu => PeftBackend.Cpu;

    private static ITrainableMethod Create(string method, LlamaModel model, ulong seed) => method switch
    {
        "prompt" => PromptTuning.Create(model, new PromptTuningConfig(5, PromptTuningInit.SampleVocab), seed),
        "prefix" => PrefixTuning.Create(model, new PrefixTuningConfig(4, PrefixTuningInit.SampleVocab), seed),
        "prefix-projection" => PrefixTuning.Create(model, new PrefixTuningConfig(4, PrefixTuningInit.Random, null, 6), seed),
        _ => BottleneckAdapters.Create(model, new BottleneckConfig(6), seed),
    };

    private static ITrainableMethod Load(string method, string dir, LlamaModel model) => method switch
    {
        "prompt" => PromptTuning.Load(dir, model),
        "prefix" or "prefix-projection" => PrefixTuning.Load(dir, model),
        _ => BottleneckAdapters.Load(dir, model),
    };

    /// <summary>Random values in every trainable tensor (a fresh bottleneck adapter is the identity; this one is not).</summary>
    private static void Scramble(ITrainableMethod m, int seed, double scale = 0.3)
    {
        var rng = new Random(seed);
        foreach (var t in m.Trainable)
            Cpu.Upload(t.Param, Enumerable.Range(0, (int)t.Param.Length).Select(_ => (float)((rng.NextDouble() * 2 - 1) * scale)).ToArray());
    }

    private static (int[] Tok, int[] Tgt) Sequence(int t, int vocab, int seed)
    {
        var rng = new Random(seed);
        var tok = Enumerable.Range(0, t).Select(_ => rng.Next(vocab)).ToArray();
        return (tok, tok.Skip(1).Append(rng.Next(vocab)).ToArray());
    }

    /// <summary>
    /// PEFT's prefix layout, by its definition: prompt_embeddings (P, L·2·NKV·HS) viewed as (P, L·2, NKV, HS) and
    /// permuted to (L·2, P, NKV, HS); entry (layer l, kind k, token p, head h, channel d) sits at column
    /// ((l·2 + k)·NKV + h)·HS + d of row p. Checked element by element on distinct values, both directions.
    /// </summary>
    [Fact]
    public void PrefixLayout_MatchesPeftsViewAndPermute()
    {
        const int L = 3, P = 2, NKV = 2, HS = 3, KVD = NKV * HS;
        var ours = Enumerable.Range(0, L * 2 * P * KVD).Select(i => (float)i).ToArray();
        var peft = PrefixTuning.ToPeftLayout(ours, L, P, KVD);
        for (int l = 0; l < L; l++)
            for (int k = 0; k < 2; k++)
                for (int p = 0; p < P; p++)
                    for (int h = 0; h < NKV; h++)
                        for (int d = 0; d < HS; d++)
                            Assert.Equal(ours[((l * 2 + k) * P + p) * KVD + h * HS + d], peft[p * (L * 2 * KVD) + ((l * 2 + k) * NKV + h) * HS + d]);
        Assert.Equal(ours, PrefixTuning.FromPeftLayout(peft, L, P, KVD));
    }

    /// <summary>
    /// Save writes PEFT's files (tensor names, shapes, config fields) and Load/LoadValues restore exactly the same
    /// values, so the reloaded method gives the same loss bit for bit; a mismatched config is refused with the file named.
    /// </summary>
    [Theory]
    [InlineData("prompt")]
    [InlineData("prefix")]
    [InlineData("bottleneck")]
    public void SaveLoad_RoundTripsToTheSameLoss(string method)
    {
        using var w = TinyModel.Weights(Cpu);
        var c = w.Config;
        using var tmp = new TempDir();
        var (tok, tgt) = Sequence(9, c.VocabSize, 4);
        double saved;
        using (var model = new LlamaModel(w, Cpu))
        using (var m = Create(method, model, 3))
        {
            Scramble(m, 5);
            saved = model.Loss(tok, tgt, 1, 9).LossSum;
            m.Save(tmp.Path, "some/base");
        }
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Path, "adapter_config.json")))!.AsObject();
        using (var st = SafeTensors.Open(Path.Combine(tmp.Path, "adapter_model.safetensors")))
        {
            switch (method)
            {
                case "prompt":
                    Assert.Equal("PROMPT_TUNING", (string?)cfg["peft_type"]);
                    Assert.Equal(c.HiddenSize, (int)cfg["token_dim"]!);
                    Assert.Equal(5, (int)cfg["num_virtual_tokens"]!);
                    Assert.Equal("SAMPLE_VOCAB", (string?)cfg["prompt_tuning_init"]);
                    Assert.Equal(new[] { "prompt_embeddings" }, st.Names);
                    Assert.Equal(new[] { 5, c.HiddenSize }, st.Info("prompt_embeddings").Shape);
                    break;
                case "prefix":
                    Assert.Equal("PREFIX_TUNING", (string?)cfg["peft_type"]);
                    Assert.Equal(c.KvDim, (int)cfg["token_dim"]!);
                    Assert.Equal(c.NumKvHeads, (int)cfg["num_attention_heads"]!);
                    Assert.Equal(c.NumLayers, (int)cfg["num_layers"]!);
                    Assert.False((bool)cfg["prefix_projection"]!);
                    Assert.Equal(new[] { "prompt_embeddings" }, st.Names);
                    Assert.Equal(new[] { 4, c.NumLayers * 2 * c.KvDim }, st.Info("prompt_embeddings").Shape);
                    break;
                default:
                    Assert.Equal("BOTTLENECK", (string?)cfg["peft_type"]);
                    Assert.Equal(6, (int)cfg["bottleneck_size"]!);
                    Assert.Equal(c.NumLayers * 2 * 4, st.Names.Count);
                    Assert.Equal(new[] { 6, c.HiddenSize }, st.Info("model.layers.0.attention_adapters.adapters.adapter.adapter_down.0.weight").Shape);
                    Assert.Equal(new[] { c.HiddenSize, 6 }, st.Info($"model.layers.{c.NumLayers - 1}.output_adapters.adapters.adapter.adapter_up.weight").Shape);
                    break;
            }
            Assert.Equal("CAUSAL_LM", (string?)cfg["task_type"]);
            Assert.Equal("some/base", (string?)cfg["base_model_name_or_path"]);
        }
        using (var model = new LlamaModel(w, Cpu))
        using (var m = Load(method, tmp.Path, model))
            Assert.Equal(saved, model.Loss(tok, tgt, 1, 9).LossSum);
        using (var model = new LlamaModel(w, Cpu))
        using (var m = Create(method, model, 99))
        {
            Assert.NotEqual(saved, model.Loss(tok, tgt, 1, 9).LossSum);
            m.LoadValues(tmp.Path);
            Assert.Equal(saved, model.Loss(tok, tgt, 1, 9).LossSum);
            // detached, the base model alone
            using var bare = new LlamaModel(w, Cpu);
            m.Detach();
            Assert.Equal(bare.Loss(tok, tgt, 1, 9).LossSum, model.Loss(tok, tgt, 1, 9).LossSum);
            m.Attach();
            Assert.Equal(saved, model.Loss(tok, tgt, 1, 9).LossSum);
        }
        // a config that does not fit the model is refused, naming the file
        cfg[method == "bottleneck" ? "hidden_size" : method == "prefix" ? "token_dim" : "token_dim"] = 7;
        File.WriteAllText(Path.Combine(tmp.Path, "adapter_config.json"), cfg.ToJsonString());
        using (var model = new LlamaModel(w, Cpu))
        {
            var e = Assert.Throws<InvalidDataException>(() => Load(method, tmp.Path, model).Dispose());
            Assert.Contains("adapter_config.json", e.Message);
        }
    }

    /// <summary>
    /// Generation applies exactly what training computed: the per-token losses from an InferenceSession with the
    /// adapter (SetPrompt / SetPrefix / SetBottleneck, teacher-forced one token at a time after a prefill) sum to the
    /// training model's loss; Reset keeps the adapter's positions.
    /// </summary>
    [Theory]
    [InlineData("prompt")]
    [InlineData("prefix")]
    [InlineData("bottleneck")]
    public void InferenceSession_WithTheAdapter_MatchesTheTrainingLoss(string method)
    {
        using var w = TinyModel.Weights(Cpu);
        var c = w.Config;
        var (tok, tgt) = Sequence(8, c.VocabSize, 6);
        using var model = new LlamaModel(w, Cpu);
        using var m = Create(method, model, 3);
        Scramble(m, 8);
        double expected = model.Loss(tok, tgt, 1, tok.Length).LossSum;
        using var dir = new TempDir();
        m.Save(dir.Path);
        using var session = new InferenceSession(w, Cpu, 32);
        var (_, owned) = AdapterFiles.ApplyForInference(dir.Path, session);
        try
        {
            for (int pass = 0; pass < 2; pass++) // the second pass after Reset: the adapter's rows must survive it
            {
                session.Reset();
                double sum = 0;
                var logits = session.Prefill(tok.AsSpan(0, 3)).ToArray();
                for (int i = 2; i < tok.Length; i++)
                {
                    if (i > 2) logits = session.Decode(tok[i]).ToArray();
                    double max = logits.Max(), z = logits.Sum(x => Math.Exp(x - max));
                    sum += max + Math.Log(z) - logits[tgt[i]];
                }
                // positions 0 and 1: losses from a separate prefill of one and two tokens
                for (int n = 1; n <= 2; n++)
                {
                    session.Reset();
                    var l = session.Prefill(tok.AsSpan(0, n));
                    double max = l.Max(), z = l.Sum(x => Math.Exp(x - max));
                    sum += max + Math.Log(z) - l[tgt[n - 1]];
                }
                NumericAssert.Close(new[] { expected }, new[] { sum }, 1e-4, 1e-5, $"{method} pass {pass}: session losses vs model loss");
            }
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>
    /// The "done means" for each method: the real stories260K (llama2.c, GQA 8 heads / 4 kv heads) trained on
    /// LLaMA-Factory's alpaca_en_demo (400 records, 10% held out) lowers held-out loss, and the saved adapter reloads
    /// into a fresh model to exactly the same eval loss.
    /// </summary>
    [SkippableTheory]
    [InlineData("prompt", 3e-2)]
    [InlineData("prefix", 1e-2)]
    [InlineData("prefix-projection", 1e-2)]
    [InlineData("bottleneck", 1e-2)]
    public void Stories260K_OnAlpaca_LowersHeldOutLoss_AndReloads(string method, double lr)
    {
        string modelPath = PeftAssets.Require("stories260K", "stories260K.bin");
        string tokPath = PeftAssets.Require("stories260K", "tok512.bin");
        string dataset = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        var options = new TrainOptions
        {
            MaxLength = 96, MicroBatch = 8, GradAccum = 1, MaxSteps = 40, LearningRate = lr, WarmupSteps = 3,
            EvalFraction = 0.1, Seed = 7, Device = "cpu",
        };
        using var backend = Backends.Create("cpu");
        using var loaded = ModelLoader.Load(modelPath, backend);
        var tok = TokenizerLoader.Load(tokPath);
        var data = FineTuneJob.Prepare(new[] { dataset }, tok, options, 400);
        using var tmp = new TempDir();
        TrainResult r;
        using (var model = new LlamaModel(loaded.Weights, backend))
        {
            using var m = method switch
            {
                "prompt" => (ITrainableMethod)PromptTuning.Create(model, new PromptTuningConfig(16, PromptTuningInit.SampleVocab), 7),
                "prefix" => PrefixTuning.Create(model, new PrefixTuningConfig(16, PrefixTuningInit.SampleVocab), 7),
                "prefix-projection" => PrefixTuning.Create(model, new PrefixTuningConfig(16, PrefixTuningInit.Random, null, 64), 7),
                _ => BottleneckAdapters.Create(model, new BottleneckConfig(16), 7),
            };
            using var trainer = new Trainer(model, m, options);
            r = trainer.Train(data.Train, data.Eval, data.PadId, tmp.Path, modelPath);
        }
        output.WriteLine($"{method}: {r.Steps} steps, eval loss {r.EvalLossBefore:F4} -> {r.EvalLossAfter:F4} ({r.EvalSamples} held-out samples) in {r.Elapsed.TotalSeconds:F1}s");
        Assert.True(r.EvalSamples >= 20, $"only {r.EvalSamples} eval samples");
        Assert.True(r.EvalLossAfter < r.EvalLossBefore - 0.05, $"{method}: held-out loss did not drop: {r.EvalLossBefore} -> {r.EvalLossAfter}");

        using var fresh = new LlamaModel(loaded.Weights, backend);
        using var reloaded = Load(method, tmp.Path, fresh);
        using var t2 = new Trainer(fresh, reloaded, options);
        var again = t2.Evaluate(data.Eval, t2.SeqLenFor(data.Train, data.Eval), data.PadId);
        output.WriteLine($"{method}: reloaded eval loss {again.Loss:F6}");
        Assert.Equal(r.EvalLossAfter, again.Loss);
    }

    /// <summary>
    /// Checkpoints of each method resume bit for bit: 6 steps straight equal 3 steps, then a fresh model and method
    /// loaded from checkpoint-3 resuming for the last 3 (same step losses, same final eval loss).
    /// </summary>
    [Theory]
    [InlineData("prompt")]
    [InlineData("prefix")]
    [InlineData("prefix-projection")]
    [InlineData("bottleneck")]
    public void Checkpoint_Resumes_BitForBit(string method)
    {
        var samples = TinyModel.Samples(10, 4, 10, seed: 6);
        var eval = TinyModel.Samples(3, 4, 10, seed: 7);
        using var w = TinyModel.Weights(Cpu);
        var opts = new TrainOptions { MicroBatch = 3, GradAccum = 2, Epochs = 3, LearningRate = 1e-2, WarmupSteps = 2, SaveEvery = 3, Seed = 9 };
        using var tmp = new TempDir();
        TrainResult full;
        using (var model = new LlamaModel(w, Cpu))
        using (var m = Create(method, model, 9))
        using (var trainer = new Trainer(model, m, opts))
            full = trainer.Train(samples, eval, 0, tmp.Path);
        Assert.Equal(6, full.Steps);
        Assert.True(full.StepLosses.Distinct().Count() > 1);
        string ckpt = Path.Combine(tmp.Path, "checkpoint-3");
        using var model2 = new LlamaModel(w, Cpu);
        using var m2 = Load(method, ckpt, model2);
        using var trainer2 = new Trainer(model2, m2, opts);
        var resumed = trainer2.Train(samples, eval, 0, Path.Combine(tmp.Path, "resumed"), resumeFrom: ckpt);
        Assert.Equal(full.StepLosses.Skip(3), resumed.StepLosses);
        Assert.Equal(full.EvalLossAfter, resumed.EvalLossAfter);
    }

    /// <summary>The memory plan counts what a step of each method really allocates (prompt's extra rows, prefix and bottleneck buffers).</summary>
    [Theory]
    [InlineData("prompt")]
    [InlineData("prefix")]
    [InlineData("bottleneck")]
    public void MemoryPlan_MatchesTheWorkspace(string method)
    {
        var samples = TinyModel.Samples(6, 4, 12, seed: 40);
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var m = Create(method, model, 2);
        var opts = new TrainOptions { MicroBatch = 3, MaxSteps = 1, LearningRate = 1e-2, Seed = 3 };
        using var trainer = new Trainer(model, m, opts);
        trainer.Train(samples, Array.Empty<TokenizedSample>(), 0);
        var plan = MemoryPlan.Estimate(model, m, opts, trainer.SeqLenFor(samples));
        Assert.Equal(model.WorkspaceBytes, plan.ActivationBytes);
    }
}
