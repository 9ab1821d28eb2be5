using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Peft;

/// <summary>The run features of the trainer: accumulation, optimizers, decay masks, schedules, early stopping, keep-best, rotation, NaN skips.</summary>
[Collection("PeftModel")]
public class TrainerRunTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    /// <summary>Counting sequences: learnable, so losses fall.</summary>
    private static List<TokenizedSample> Counting(int count, int vocab = 40)
    {
        var all = new List<TokenizedSample>();
        for (int s = 0; s < count; s++)
        {
            int start = (s * 7) % vocab, len = 8 + s % 5;
            var ids = Enumerable.Range(0, len + 1).Select(i => (start + i) % vocab).ToArray();
            var targets = Enumerable.Range(0, len).Select(i => i >= 2 ? ids[i + 1] : TokenizedSample.IgnoreIndex).ToArray();
            all.Add(new TokenizedSample($"count:{s}", ids[..len], targets));
        }
        return all;
    }

    [Fact]
    public void Accumulation_equals_one_big_batch_step_by_step()
    {
        // 2 x 3 micro-batches against 6 x 1: same windows, same per-step loss, same parameters after 4 steps.
        var samples = TinyModel.Samples(24, 3, 11, seed: 31);
        using var w = TinyModel.Weights(Cpu);
        (IReadOnlyList<double> Losses, float[][] Params) Run(int micro, int accum)
        {
            using var model = new LlamaModel(w, Cpu);
            using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0 }, 3);
            using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = micro, GradAccum = accum, MaxSteps = 4, LearningRate = 1e-2, Seed = 4 });
            var r = trainer.Train(samples, Array.Empty<TokenizedSample>(), 0);
            return (r.StepLosses, adapter.Trainable.Select(t => t.Param.ToArray()).ToArray());
        }
        var big = Run(6, 1);
        var acc = Run(2, 3);
        NumericAssert.Close(big.Losses.ToArray(), acc.Losses.ToArray(), 1e-6, 1e-5, "step losses");
        for (int i = 0; i < big.Params.Length; i++) NumericAssert.Close(big.Params[i], acc.Params[i], 1e-6, 1e-4, $"param {i}");
    }

    [Theory]
    [InlineData("adamw")]
    [InlineData("sgd")]
    public void Weight_decay_skips_norms_and_biases(string optimizer)
    {
        // One full fine-tuning step with and without weight decay: 1-D tensors (norms, biases) come out identical,
        // every matrix differs by the decay.
        var cfg = TinyModel.Config() with { AttentionBias = true };
        var samples = TinyModel.Samples(4, 4, 10, seed: 8);
        Dictionary<string, float[]> Run(double wd)
        {
            using var w = TinyModel.Weights(Cpu, 5, cfg);
            using var model = new LlamaModel(w, Cpu);
            using var full = new FullFineTune(model);
            using var trainer = new Trainer(model, full, new TrainOptions { MicroBatch = 4, WeightDecay = wd, Optimizer = optimizer, ClipNorm = 0 });
            trainer.Step(Batching.Batches(samples, 4, 10, 0).ToList(), 0.05);
            return full.Trainable.ToDictionary(t => t.Name, t => t.Param.ToArray());
        }
        var plain = Run(0);
        var decayed = Run(0.5);
        Assert.Contains(plain.Keys, k => k.EndsWith(".bias", StringComparison.Ordinal));
        foreach (var (name, p) in plain)
        {
            bool oneD = name.EndsWith("norm.weight", StringComparison.Ordinal) || name.EndsWith(".bias", StringComparison.Ordinal);
            if (oneD) Assert.True(p.SequenceEqual(decayed[name]), $"{name} was decayed");
            else Assert.False(p.SequenceEqual(decayed[name]), $"{name} was not decayed");
        }
    }

    [Fact]
    public void Sgd_with_momentum_matches_the_host_formula()
    {
        var samples = TinyModel.Samples(6, 4, 10, seed: 12);
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 2, Dropout = 0 }, 3);
        // B != 0 so that A gets a gradient too.
        foreach (var m in adapter.Modules) Cpu.Fill(m.Slot.B, 0.05f);
        const double lr = 0.1, mu = 0.8;
        using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 3, Optimizer = "sgd", Momentum = mu, ClipNorm = 0 });
        var batches = Batching.Batches(samples, 3, 10, 0).ToList();
        var p0 = adapter.Trainable.Select(t => t.Param.ToArray()).ToArray();
        trainer.Step(batches.Take(1).ToList(), lr);
        var g1 = adapter.Trainable.Select(t => t.Grad.ToArray()).ToArray();
        var p1 = adapter.Trainable.Select(t => t.Param.ToArray()).ToArray();
        trainer.Step(batches.Skip(1).ToList(), lr);
        var g2 = adapter.Trainable.Select(t => t.Grad.ToArray()).ToArray();
        var p2 = adapter.Trainable.Select(t => t.Param.ToArray()).ToArray();
        for (int t = 0; t < p0.Length; t++)
        {
            var e1 = p0[t].Select((p, i) => p - lr * g1[t][i]).ToArray();                      // buf = g1
            var e2 = p1[t].Select((p, i) => p - lr * (mu * g1[t][i] + g2[t][i])).ToArray();    // buf = μ·g1 + g2
            NumericAssert.Close(e1, p1[t], 1e-7, 1e-5, $"step 1 tensor {t}");
            NumericAssert.Close(e2, p2[t], 1e-7, 1e-5, $"step 2 tensor {t}");
        }
    }

    [Fact]
    public void Linear_and_constant_schedules()
    {
        // total 6, warmup 2, peak 1, floor 0.2: linear decays over steps 3..6 as progress 0, 1/4, 2/4, 3/4.
        double[] linear = { 0.5, 1, 1, 0.8, 0.6, 0.4 };
        for (int s = 1; s <= 6; s++)
        {
            Assert.Equal(linear[s - 1], LrSchedule.At("linear", s, 6, 2, 1.0, 0.2), 12);
            Assert.Equal(s <= 2 ? s / 2.0 : 1.0, LrSchedule.At("constant", s, 6, 2, 1.0, 0.2), 12);
            Assert.Equal(LrSchedule.At(s, 6, 2, 1.0, 0.2), LrSchedule.At("cosine", s, 6, 2, 1.0, 0.2));
        }
        Assert.Throws<ArgumentException>(() => new TrainOptions { LrScheduler = "step" }.Validate());
    }

    [Fact]
    public void Early_stopping_with_patience_and_keep_best_restores_the_best()
    {
        var all = Counting(40);
        var (train, eval) = Batching.Split(all, 0.2, seed: 1);
        using var w = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();

        // No evaluation can beat the start by 1e9: patience 2 at eval every 3 steps stops at step 6, and keep-best
        // ends the run with the starting values (B = 0: the base model's loss exactly).
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0 }, 1))
        using (var trainer = new Trainer(model, adapter, new TrainOptions
               {
                   MicroBatch = 4, MaxSteps = 30, LearningRate = 2e-2, EvalEvery = 3, EarlyStoppingPatience = 2,
                   EarlyStoppingMinDelta = 1e9, KeepBest = true, Seed = 1,
               }))
        {
            var r = trainer.Train(train, eval, 0, Path.Combine(tmp.Path, "a"));
            Assert.True(r.EarlyStopped);
            Assert.Equal(6, r.Steps);
            Assert.Equal(30, r.PlannedSteps);
            Assert.Equal(0, r.BestStep);
            Assert.Equal(r.EvalLossBefore, r.EvalLossAfter);
            Assert.All(adapter.Modules, m => Assert.All(m.Slot.B.ToArray(), x => Assert.Equal(0f, x)));
            Assert.Equal(0, (int)JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Path, "a", "best", "best.json")))!["step"]!);
        }

        // An improving run: the best is the last evaluation, no early stop.
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0 }, 1))
        using (var trainer = new Trainer(model, adapter, new TrainOptions
               {
                   MicroBatch = 4, MaxSteps = 12, LearningRate = 2e-2, EvalEvery = 4, EarlyStoppingPatience = 2, KeepBest = true, Seed = 1,
               }))
        {
            var r = trainer.Train(train, eval, 0, Path.Combine(tmp.Path, "b"));
            Assert.False(r.EarlyStopped);
            Assert.Equal(12, r.Steps);
            Assert.Equal(new[] { 0, 4, 8, 12 }, r.Evals.Select(e => e.Step));
            Assert.Equal(12, r.BestStep);
            Assert.Equal(r.BestEvalLoss, r.EvalLossAfter);
            Assert.True(r.EvalLossAfter < r.EvalLossBefore);
        }
    }

    [Fact]
    public void Checkpoints_rotate_keep_the_newest_and_carry_the_config()
    {
        var samples = TinyModel.Samples(12, 4, 10, seed: 5);
        using var w = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3);
        using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 3, MaxSteps = 9, SaveEvery = 2, SaveTotalLimit = 2, Seed = 2 });
        trainer.ResolvedConfig = "lr: 0.0002\nmax-steps: 9\n";
        trainer.Train(samples, Array.Empty<TokenizedSample>(), 0, tmp.Path);
        Assert.Equal(new[] { 6, 8 }, Trainer.Checkpoints(tmp.Path).Select(c => c.Step));
        foreach (var (_, dir) in Trainer.Checkpoints(tmp.Path))
        {
            Assert.Equal(trainer.ResolvedConfig, File.ReadAllText(Path.Combine(dir, Trainer.ConfigFile)));
            Assert.True(File.Exists(Path.Combine(dir, Trainer.StateFile)) && File.Exists(Path.Combine(dir, LoraAdapter.WeightsFile)));
        }
        Assert.Equal(trainer.ResolvedConfig, File.ReadAllText(Path.Combine(tmp.Path, Trainer.ConfigFile)));
        Assert.Empty(Directory.GetDirectories(tmp.Path, ".*"));
        Assert.Equal(Path.Combine(tmp.Path, "checkpoint-8"), Trainer.LatestCheckpoint(tmp.Path));
    }

    /// <summary>LoRA whose penalty is NaN at chosen steps: the injected fault of the NaN tests.</summary>
    private sealed class NanAt(LoraAdapter inner, params int[] steps) : ITrainableMethod
    {
        private int _calls;
        public string Kind => inner.Kind;
        public IReadOnlyList<TrainableTensor> Trainable => inner.Trainable;
        public void ZeroGrad() => inner.ZeroGrad();
        public double AddPenalty() => steps.Contains(++_calls) ? double.NaN : 0;
        public void Save(string dir, string? baseModelNameOrPath = null) => inner.Save(dir, baseModelNameOrPath);
        public void LoadValues(string dir) => inner.LoadValues(dir);
        public bool IsAttached => inner.IsAttached;
        public void Attach() => inner.Attach();
        public void Detach() => inner.Detach();
        public JsonObject DescribeConfig() => inner.DescribeConfig();
        public void Dispose() { }
    }

    [Fact]
    public void A_nan_step_is_skipped_and_reported_and_repeated_nans_stop_with_the_checkpoint_intact()
    {
        var samples = TinyModel.Samples(12, 4, 10, seed: 5);
        using var w = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();

        using (var model = new LlamaModel(w, Cpu))
        using (var lora = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3))
        {
            var method = new NanAt(lora, 3);
            using var trainer = new Trainer(model, method, new TrainOptions { MicroBatch = 3, MaxSteps = 5, LearningRate = 1e-2, Seed = 2 });
            var progress = new List<TrainProgress>();
            trainer.Progress += p =>
            {
                progress.Add(p);
                if (p.Step == 2) before3 = lora.Trainable.Select(t => t.Param.ToArray()).ToArray();
                if (p.Step == 3) after3 = lora.Trainable.Select(t => t.Param.ToArray()).ToArray();
            };
            var r = trainer.Train(samples, Array.Empty<TokenizedSample>(), 0, Path.Combine(tmp.Path, "one"));
            Assert.Equal(5, r.Steps);
            Assert.Equal(1, r.SkippedSteps);
            Assert.True(double.IsNaN(r.StepLosses[2]) && r.StepLosses.Where((_, i) => i != 2).All(double.IsFinite));
            Assert.Equal(new[] { false, false, true, false, false }, progress.Select(p => p.Skipped));
            for (int i = 0; i < before3!.Length; i++) Assert.Equal(before3[i], after3![i]); // nothing updated at step 3
            var skipped = File.ReadLines(r.MetricsPath!).Select(l => JsonNode.Parse(l)!).Single(o => o["skipped"] is not null);
            Assert.Equal(3, (int)skipped["step"]!);
            Assert.Contains("NaN", (string)skipped["skip_reason"]!);
        }

        using (var model = new LlamaModel(w, Cpu))
        using (var lora = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3))
        {
            var method = new NanAt(lora, 5, 6, 7);
            using var trainer = new Trainer(model, method, new TrainOptions { MicroBatch = 3, MaxSteps = 10, SaveEvery = 2, MaxSkippedSteps = 3, Seed = 2 });
            string outDir = Path.Combine(tmp.Path, "two");
            var e = Assert.Throws<TrainingStoppedException>(() => trainer.Train(samples, Array.Empty<TokenizedSample>(), 0, outDir));
            Assert.Contains("step 7: 3 steps in a row", e.Message);
            Assert.Contains("checkpoint-6", e.Message);
            // The last checkpoint is complete and loads.
            using var model2 = new LlamaModel(w, Cpu);
            using var lora2 = LoraAdapter.Create(model2, new LoraConfig { Rank = 2, Dropout = 0 }, 3);
            using var t2 = new Trainer(model2, lora2, new TrainOptions { MicroBatch = 3, MaxSteps = 10, SaveEvery = 2, Seed = 2 });
            Assert.Equal(6, t2.LoadCheckpoint(Path.Combine(outDir, "checkpoint-6")).Step);
        }
    }

    private static float[][]? before3, after3;
}
