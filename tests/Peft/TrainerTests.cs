using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Peft;

[Collection("PeftModel")]
public class TrainerTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    private static void SetB(LoraAdapter adapter, ulong seed)
    {
        ulong state = seed;
        foreach (var m in adapter.Modules)
        {
            var b = new float[m.Slot.B.Length];
            for (int i = 0; i < b.Length; i++) b[i] = (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) - 0.5) * 0.2f;
            Cpu.Upload(m.Slot.B, b);
        }
    }

    private static List<Batch> Window(IReadOnlyList<TokenizedSample> samples, int micro, int seqLen) =>
        Batching.Batches(samples, micro, seqLen, 0).ToList();

    [Fact]
    public void Accumulating_micro_batches_equals_one_big_batch()
    {
        // 7 samples of different lengths and target counts: the 1/N normalisation must use the whole window.
        var samples = TinyModel.Samples(7, 3, 11, seed: 21);
        using var w = TinyModel.Weights(Cpu);
        var cfg = new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0 };

        (double Loss, double Norm, float[][] Grads, float[][] Params) Run(int micro)
        {
            using var model = new LlamaModel(w, Cpu);
            using var adapter = LoraAdapter.Create(model, cfg, 3);
            SetB(adapter, 8); // with B = 0, A would get no gradient at all
            using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = micro, ClipNorm = 0 });
            var (loss, norm) = trainer.Step(Window(samples, micro, 11), 1e-3);
            var grads = adapter.Parameters().Select(p => p.Grad.ToArray()).ToArray();
            var prms = adapter.Parameters().Select(p => p.Param.ToArray()).ToArray();
            return (loss, norm, grads, prms);
        }

        var big = Run(7);
        foreach (int micro in new[] { 1, 2, 3 })
        {
            var acc = Run(micro);
            NumericAssert.Close(new[] { big.Loss, big.Norm }, new[] { acc.Loss, acc.Norm }, 1e-6, 1e-5, $"loss, norm micro={micro}");
            for (int i = 0; i < big.Grads.Length; i++)
            {
                NumericAssert.Close(big.Grads[i], acc.Grads[i], 1e-6, 1e-4, $"grad {i} micro={micro}");
                NumericAssert.Close(big.Params[i], acc.Params[i], 1e-6, 1e-4, $"param {i} micro={micro}");
            }
        }

        // The window loss is the mean over target tokens: check it against the model's own loss sums.
        using var m = new LlamaModel(w, Cpu);
        using var a = LoraAdapter.Create(m, cfg, 3);
        SetB(a, 8);
        double sum = 0; long n = 0;
        foreach (var b in Window(samples, 7, 11)) { var (l, c) = m.Loss(b.Tokens, b.Targets, b.BatchSize, b.SeqLen); sum += l; n += c; }
        Assert.Equal(samples.Sum(s => s.TargetCount), n);
        NumericAssert.Close(new[] { sum / n }, new[] { big.Loss }, 1e-6, 1e-5, "window loss");
    }

    [Fact]
    public void Clipping_scales_the_gradient_that_adamw_sees()
    {
        // With a large Adam eps the first update is lr·ĝ/(|ĝ| + eps), so it shows the gradient's scale:
        // ĝ = g·min(1, clip/‖g‖). The expected update is computed on the host from the downloaded gradients.
        var samples = TinyModel.Samples(4, 5, 9, seed: 2);
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 2, Dropout = 0 }, 3);
        SetB(adapter, 5);
        var before = adapter.Parameters().Select(p => p.Param.ToArray()).ToArray();
        const double lr = 0.01, eps = 1.0, clip = 0.05;
        using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 4, ClipNorm = clip, AdamEps = eps, WeightDecay = 0 });

        var (_, norm) = trainer.Step(Window(samples, 4, 9), lr);

        var grads = adapter.Parameters().Select(p => p.Grad.ToArray()).ToArray();
        double hostNorm = Math.Sqrt(grads.Sum(g => g.Sum(x => (double)x * x)));
        NumericAssert.Close(new[] { hostNorm }, new[] { norm }, 1e-9, 1e-6, "gradient norm");
        Assert.True(norm > clip * 2, $"the test needs a gradient norm above the clip ({norm})");
        double scale = clip / (norm + 1e-6);
        var after = adapter.Parameters().Select(p => p.Param.ToArray()).ToArray();
        for (int t = 0; t < grads.Length; t++)
        {
            var expected = new double[grads[t].Length];
            for (int i = 0; i < expected.Length; i++)
            {
                double g = scale * grads[t][i];
                expected[i] = before[t][i] - lr * g / (Math.Abs(g) + eps);
            }
            NumericAssert.Close(expected, after[t], 1e-7, 1e-5, $"tensor {t}");
        }
    }

    [Fact]
    public void Training_a_learnable_pattern_lowers_eval_loss_and_writes_metrics_and_adapter()
    {
        // Sequences that count upward modulo V: the next token is always current + 1, learnable by the adapters.
        const int V = 40;
        var all = new List<TokenizedSample>();
        for (int s = 0; s < 40; s++)
        {
            int start = (s * 7) % V, len = 8 + s % 5;
            var ids = Enumerable.Range(0, len + 1).Select(i => (start + i) % V).ToArray();
            var targets = Enumerable.Range(0, len).Select(i => i >= 2 ? ids[i + 1] : TokenizedSample.IgnoreIndex).ToArray();
            all.Add(new TokenizedSample($"count:{s}", ids[..len], targets));
        }
        var (train, eval) = Batching.Split(all, 0.2, seed: 1);
        using var tmp = new TempDir();
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 8, Alpha = 16, Dropout = 0.05f }, 1);
        var opts = new TrainOptions { MicroBatch = 4, GradAccum = 2, LearningRate = 2e-2, WarmupSteps = 3, MaxSteps = 30, EvalEvery = 10, Seed = 1 };
        using var trainer = new Trainer(model, adapter, opts);
        var progress = new List<TrainProgress>();
        var evals = new List<EvalProgress>();
        trainer.Progress += progress.Add;
        trainer.Evaluated += evals.Add;

        var r = trainer.Train(train, eval, padId: 0, outputDir: tmp.Path, baseModelName: "tiny");

        Assert.Equal(30, r.Steps);
        Assert.True(r.EvalLossAfter < r.EvalLossBefore - 1.0, $"eval loss {r.EvalLossBefore} -> {r.EvalLossAfter}");
        Assert.Equal(Math.Exp(r.EvalLossAfter), r.EvalPerplexityAfter, 9);
        Assert.Equal(Enumerable.Range(1, 30), progress.Select(p => p.Step));
        Assert.All(progress, p => Assert.True(p.TokensPerSecond > 0 && p.Eta >= TimeSpan.Zero && double.IsFinite(p.Loss)));
        Assert.Equal(0.0, progress[^1].Eta.TotalSeconds);
        Assert.Equal(opts.LearningRate / 3, progress[0].LearningRate, 12);
        Assert.Equal(new[] { 0, 10, 20, 30 }, evals.Select(e => e.Step));
        Assert.Equal(r.EvalLossBefore, evals[0].Loss);
        Assert.Equal(r.EvalLossAfter, evals[^1].Loss);

        var lines = File.ReadAllLines(r.MetricsPath!).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.Equal(34, lines.Count); // 30 steps + 4 evaluations
        Assert.Equal(30, lines.Count(l => l.ContainsKey("loss")));
        Assert.Equal(r.StepLosses[4], (double)lines.First(l => l.ContainsKey("loss") && (int)l["step"]! == 5)["loss"]!);
        var summary = JsonNode.Parse(File.ReadAllText(r.SummaryPath!))!.AsObject();
        Assert.Equal(r.EvalLossAfter, (double)summary["eval_loss_after"]!);
        Assert.Equal(30, (int)summary["steps"]!);
        Assert.True(File.Exists(Path.Combine(tmp.Path, LoraAdapter.WeightsFile)));
        Assert.Equal("tiny", (string)JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Path, LoraAdapter.ConfigFile)))!["base_model_name_or_path"]!);

        // The saved adapter reproduces the final eval loss exactly in a fresh model.
        using var fresh = new LlamaModel(w, Cpu);
        using var loaded = LoraAdapter.Load(tmp.Path, fresh);
        using var evaluator = new Trainer(fresh, loaded, opts);
        Assert.Equal(r.EvalLossAfter, evaluator.Evaluate(eval, evaluator.SeqLenFor(train, eval), 0).Loss);
    }

    [Fact]
    public void Same_seed_same_run()
    {
        var samples = TinyModel.Samples(12, 4, 10, seed: 5);
        using var w = TinyModel.Weights(Cpu);
        IReadOnlyList<double> Run(ulong seed)
        {
            using var model = new LlamaModel(w, Cpu);
            using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Dropout = 0.1f }, seed);
            using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 3, Epochs = 2, LearningRate = 1e-2, Seed = seed });
            return trainer.Train(samples, Array.Empty<TokenizedSample>(), 0).StepLosses;
        }
        var a = Run(4);
        Assert.Equal(8, a.Count); // 2 epochs of ceil(12/3)
        Assert.Equal(a, Run(4));
        Assert.NotEqual(a, Run(5));
    }

    [Fact]
    public void Save_reload_continue_gives_the_same_losses_bit_for_bit()
    {
        var samples = TinyModel.Samples(10, 4, 10, seed: 6);
        var eval = TinyModel.Samples(3, 4, 10, seed: 7);
        using var w = TinyModel.Weights(Cpu);
        var cfg = new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.1f };
        // 10 samples, 3 per micro-batch, 2 per step: 2 steps an epoch, the last window short; 3 epochs.
        var opts = new TrainOptions { MicroBatch = 3, GradAccum = 2, Epochs = 3, LearningRate = 1e-2, WarmupSteps = 2, SaveEvery = 3, Seed = 9 };
        using var tmp = new TempDir();

        TrainResult full;
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, cfg, 9))
        using (var trainer = new Trainer(model, adapter, opts))
            full = trainer.Train(samples, eval, 0, tmp.Path);
        Assert.Equal(6, full.Steps);
        string ckpt = Path.Combine(tmp.Path, "checkpoint-3");
        Assert.True(File.Exists(Path.Combine(ckpt, Trainer.StateFile)) && File.Exists(Path.Combine(ckpt, Trainer.OptimizerFile)));

        using var model2 = new LlamaModel(w, Cpu);
        using var adapter2 = LoraAdapter.Load(ckpt, model2);
        using var trainer2 = new Trainer(model2, adapter2, opts);
        var resumed = trainer2.Train(samples, eval, 0, Path.Combine(tmp.Path, "resumed"), resumeFrom: ckpt);

        Assert.Equal(full.StepLosses.Skip(3), resumed.StepLosses);
        Assert.Equal(full.EvalLossAfter, resumed.EvalLossAfter);

        // A checkpoint missing its optimizer state, or no checkpoint at all, is refused naming the file.
        using var model3 = new LlamaModel(w, Cpu);
        using var adapter3 = LoraAdapter.Load(ckpt, model3);
        using var trainer3 = new Trainer(model3, adapter3, opts);
        File.Delete(Path.Combine(ckpt, Trainer.OptimizerFile));
        var e1 = Assert.ThrowsAny<IOException>(() => trainer3.Train(samples, eval, 0, resumeFrom: ckpt));
        Assert.Contains(Trainer.OptimizerFile, e1.Message);
        var e = Assert.Throws<FileNotFoundException>(() => trainer3.LoadCheckpoint(Path.Combine(tmp.Path, "nope")));
        Assert.Contains("trainer_state.json", e.Message);
    }
}
