using FineTuneNative.Cli;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Cli;

public class PretrainerTests
{
    /// <summary>One id per character (byte value + 2); BOS = 0, EOS = 1. Enough to check packing by hand.</summary>
    private sealed class CharTokenizer : ITextTokenizer
    {
        public int VocabSize => 258;
        public int? BosId => 0;
        public int? EosId => 1;
        public IReadOnlyList<int> EosIds => new[] { 1 };
        public int[] Encode(string text, bool addBos = false) =>
            (addBos ? new[] { 0 } : Array.Empty<int>()).Concat(text.Select(c => (int)(byte)c + 2)).ToArray();
        public string Decode(ReadOnlySpan<int> ids) => Decode(ids, false);
        public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens)
        {
            var sb = new System.Text.StringBuilder();
            foreach (int id in ids) sb.Append(id switch { 0 => skipSpecialTokens ? "" : "<s>", 1 => skipSpecialTokens ? "" : "</s>", _ => ((char)(id - 2)).ToString() });
            return sb.ToString();
        }
        public string Describe() => "char tokenizer (test)";
        public int? TokenToId(string token) => token switch { "<s>" => 0, "</s>" => 1, _ => token.Length == 1 ? token[0] + 2 : null };
        public string? IdToToken(int id) => id switch { 0 => "<s>", 1 => "</s>", _ => ((char)(id - 2)).ToString() };
        public bool IsSpecial(int id) => id < 2;
    }

    [Fact]
    public void Packer_PacksWholeExamples_WithTargetsOnTheResponseOnly()
    {
        var tok = new CharTokenizer();
        const int T = 200, B = 3;
        var packer = new ExamplePacker(tok, T, B);
        var examples = SyntheticTasks.Stream(3, SyntheticTasks.PretrainTasks, 0, 1000).ToList();
        using var source = examples.GetEnumerator();
        var batch = packer.Next(source);
        Assert.Equal(B * T, batch.Tokens.Length);
        Assert.Equal(B * T, batch.Targets.Length);

        // Walk the rows and re-derive every example independently of the packer.
        int next = 0;
        for (int row = 0; row < B; row++)
        {
            int pos = 0;
            while (pos < T && batch.Tokens[row * T + pos] == 0)
            {
                var e = examples[next++];
                string prompt = PromptTemplate.AlpacaPrompt(e.Instruction, e.Input);
                var ids = new[] { 0 }.Concat(prompt.Select(c => (int)(byte)c + 2)).Concat(e.Output.Select(c => (int)(byte)c + 2)).Append(1).ToArray();
                int n = ids.Length - 1; // inputs: all but the final EOS
                for (int j = 0; j < n; j++)
                {
                    Assert.Equal(ids[j], batch.Tokens[row * T + pos + j]);
                    // Position j predicts ids[j+1] only inside the response (the output and its EOS).
                    int expected = j + 1 >= 1 + prompt.Length ? ids[j + 1] : -100;
                    Assert.Equal(expected, batch.Targets[row * T + pos + j]);
                }
                pos += n;
            }
            Assert.True(pos > T / 2, $"row {row} holds only {pos} tokens");
            for (int j = pos; j < T; j++) Assert.Equal(-100, batch.Targets[row * T + j]);
        }
        Assert.True(next >= 3);
        // The next batch continues with the next example (nothing is skipped).
        var second = packer.Next(source);
        string firstPrompt = PromptTemplate.AlpacaPrompt(examples[next].Instruction, examples[next].Input);
        Assert.Equal(0, second.Tokens[0]);
        Assert.Equal(firstPrompt[0] + 2, second.Tokens[1]);
    }

    [Fact]
    public void LearningRate_WarmsUpLinearly_ThenDecaysByCosineToTheFloor()
    {
        using var backend = Backends.Create("cpu:1");
        var cfg = new LlamaConfig { HiddenSize = 8, IntermediateSize = 16, NumLayers = 1, NumHeads = 2, NumKvHeads = 1, HeadDim = 4, VocabSize = 11 };
        using var w = LlamaWeights.Allocate(cfg, backend);
        using var model = new LlamaModel(w, backend);
        using var p = new Pretrainer(model, backend, new PretrainSettings { Steps = 110, WarmupSteps = 10, LearningRate = 1e-2f, MinLrRatio = 0.1f, BatchSize = 1, SeqLen = 4 });
        Assert.Equal(1e-3f, p.LearningRateAt(1), 6);
        Assert.Equal(1e-2f, p.LearningRateAt(10), 6);
        Assert.Equal(1e-3f + 0.5f * 9e-3f, p.LearningRateAt(60), 6); // half-way through the decay
        Assert.Equal(1e-3f, p.LearningRateAt(110), 6);
    }

    [Fact]
    public void Pretrainer_LowersTheLossOfALearnableMapping_AndIsDeterministic()
    {
        double[] Run()
        {
            using var backend = Backends.Create("cpu:1");
            var cfg = new LlamaConfig { HiddenSize = 16, IntermediateSize = 32, NumLayers = 2, NumHeads = 2, NumKvHeads = 1, HeadDim = 8, VocabSize = 13, MaxPositions = 16 };
            using var w = LlamaWeights.Allocate(cfg, backend);
            Pretrainer.InitializeWeights(w, backend, seed: 5);
            using var model = new LlamaModel(w, backend);
            using var p = new Pretrainer(model, backend, new PretrainSettings { Steps = 60, WarmupSteps = 5, LearningRate = 1e-2f, BatchSize = 2, SeqLen = 8, EvalEvery = 0 });
            // Next token = (3·token + 1) mod 13, every position trained but the first of each row.
            var tokens = new int[16];
            var targets = new int[16];
            for (int i = 0; i < 16; i++) { tokens[i] = (i * 5) % 13; targets[i] = i % 8 == 0 ? -100 : (3 * tokens[i] + 1) % 13; }
            var batch = new PretrainBatch(tokens, targets);
            var r = p.Run(_ => batch, new[] { batch });
            return new[] { r.FirstLoss, r.FinalLoss, r.EvalLossBefore!.Value, r.EvalLossAfter!.Value };
        }
        var a = Run();
        Assert.InRange(a[0], Math.Log(13) - 0.3, Math.Log(13) + 0.3); // small init: about uniform
        Assert.True(a[3] < 0.5 * a[2], $"eval loss {a[2]} -> {a[3]}");
        Assert.Equal(a, Run());
    }

    [Fact]
    public void InitializeWeights_NormsAreOne_MatricesHaveTheRequestedSpread()
    {
        using var backend = Backends.Create("cpu:1");
        var cfg = new LlamaConfig { HiddenSize = 64, IntermediateSize = 128, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 16, VocabSize = 300 };
        using var w = LlamaWeights.Allocate(cfg, backend);
        Pretrainer.InitializeWeights(w, backend, seed: 1, std: 0.02f);
        Assert.All(w.FinalNorm.ToArray(), v => Assert.Equal(1f, v));
        var emb = w.Embedding.ToArray();
        double sd = Math.Sqrt(emb.Select(v => (double)v * v).Average());
        Assert.InRange(sd, 0.019, 0.021);
        var down = w.Layers[1].Wdown.ToArray();
        double sdDown = Math.Sqrt(down.Select(v => (double)v * v).Average());
        Assert.InRange(sdDown, 0.02 / Math.Sqrt(4) * 0.95, 0.02 / Math.Sqrt(4) * 1.05); // std / sqrt(2L)
        Assert.NotEqual(w.Layers[0].Wq.ToArray(), w.Layers[1].Wq.ToArray());
    }

    private static readonly LlamaConfig FusedCfg = new() { HiddenSize = 16, IntermediateSize = 32, NumLayers = 2, NumHeads = 2, NumKvHeads = 1, HeadDim = 8, VocabSize = 13, MaxPositions = 16 };

    // A clip below every step's gradient norm (clipping exercised) and weight decay large enough to show on the norms.
    private static PretrainSettings FusedSettings(int steps) =>
        new() { Steps = steps, WarmupSteps = 2, LearningRate = 2e-2f, BatchSize = 2, SeqLen = 8, EvalEvery = 0, Clip = 0.05f, WeightDecay = 0.5f, Seed = 3 };

    private static PretrainBatch FusedBatch(int step)
    {
        var tokens = new int[16];
        var targets = new int[16];
        for (int i = 0; i < 16; i++) { tokens[i] = (i * 5 + step) % 13; targets[i] = i % 8 == 0 ? -100 : (3 * tokens[i] + 1) % 13; }
        return new PretrainBatch(tokens, targets);
    }

    private sealed record FusedRun(double[] Losses, double[] Norms, float[][] Params);

    private static FusedRun RunPretrainer(IBackend backend, int steps, Action<int>? afterStep = null)
    {
        using var w = LlamaWeights.Allocate(FusedCfg, backend);
        Pretrainer.InitializeWeights(w, backend, seed: 5);
        using var model = new LlamaModel(w, backend);
        using var p = new Pretrainer(model, backend, FusedSettings(steps));
        var losses = new double[steps];
        var norms = new double[steps];
        for (int s = 0; s < steps; s++)
        {
            (losses[s], norms[s]) = p.Step(FusedBatch(s));
            afterStep?.Invoke(s);
        }
        return new FusedRun(losses, norms, w.Named().Select(x => x.Tensor.ToArray()).ToArray());
    }

    /// <summary>
    /// The Pretrainer's step as it was before the fused optimizer (written out here with the backend's per-tensor ops):
    /// Σ SumOfSquares for the norm, gradScale = clip/‖g‖ when above the clip, one AdamW per parameter with weight decay on
    /// matrices only, gradients zeroed.
    /// </summary>
    private static FusedRun RunPerTensorReference(IBackend backend, int steps)
    {
        var s = FusedSettings(steps);
        using var w = LlamaWeights.Allocate(FusedCfg, backend);
        Pretrainer.InitializeWeights(w, backend, seed: 5);
        using var model = new LlamaModel(w, backend);
        using var schedule = new Pretrainer(model, backend, s); // sets TrainBase; used for LearningRateAt only, never stepped
        var ps = model.BaseParameters().Select(x => (x.Param, x.Grad, M: backend.Allocate(DType.F32, x.Param.Shape), V: backend.Allocate(DType.F32, x.Param.Shape), Decay: x.Param.Rank >= 2)).ToList();
        foreach (var x in ps) backend.Fill(x.Grad, 0);
        var losses = new double[steps];
        var norms = new double[steps];
        for (int step = 0; step < steps; step++)
        {
            var batch = FusedBatch(step);
            int count = batch.Targets.Count(t => t != -100);
            var (lossSum, _) = model.ForwardBackward(batch.Tokens, batch.Targets, s.BatchSize, s.SeqLen, 1f / count, s.Seed * 0x9E3779B97F4A7C15UL + (ulong)step);
            double sq = 0;
            foreach (var x in ps) sq += backend.SumOfSquares(x.Grad);
            double norm = Math.Sqrt(sq);
            float gradScale = s.Clip > 0 && norm > s.Clip ? (float)(s.Clip / norm) : 1f;
            float lr = schedule.LearningRateAt(step + 1);
            foreach (var x in ps)
            {
                backend.AdamW(x.Param, x.Grad, x.M, x.V, lr, s.Beta1, s.Beta2, s.Eps, x.Decay ? s.WeightDecay : 0f, step + 1, gradScale);
                backend.Fill(x.Grad, 0);
            }
            losses[step] = lossSum / count;
            norms[step] = norm;
        }
        var result = new FusedRun(losses, norms, w.Named().Select(x => x.Tensor.ToArray()).ToArray());
        foreach (var x in ps) { x.M.Dispose(); x.V.Dispose(); }
        return result;
    }

    [Fact]
    public void Pretrainer_FusedOptimizerStep_EqualsThePerTensorUpdate_OnCpu()
    {
        var backend = TestBackends.Get("cpu");
        var fused = RunPretrainer(backend, 6);
        var reference = RunPerTensorReference(backend, 6);
        Assert.True(reference.Norms.All(n => n > 0.05), $"the test needs norms above the clip: {string.Join(", ", reference.Norms)}");
        // The fused clip scale is clip/(‖g‖ + 1e-6) in double rounded once, the old one clip/‖g‖: a relative difference
        // below 1e-6 of the scale, far inside f32 tolerance after 6 steps.
        NumericAssert.Close(reference.Losses, GradCheck.ToFloat(fused.Losses), 1e-6, 1e-5, "losses");
        NumericAssert.Close(reference.Norms, GradCheck.ToFloat(fused.Norms), 1e-6, 1e-5, "gradient norms");
        for (int i = 0; i < reference.Params.Length; i++)
            NumericAssert.Close(GradCheck.ToDouble(reference.Params[i]), fused.Params[i], 1e-6, 1e-5, $"parameter {i}");
    }

    [Fact]
    public void Pretrainer_OnIlgpuSim_MatchesCpu_OneLaunchEach_NoDeviceAllocationAfterTheFirstStep()
    {
        FusedRun cpu;
        using (var c = Backends.Create("cpu:1")) cpu = RunPretrainer(c, 3);
        using var sim = (IlgpuBackend)Backends.Create("ilgpu-sim:4");
        long afterFirst = 0;
        var run = RunPretrainer(sim, 3, s =>
        {
            if (s == 0) afterFirst = sim.DeviceAllocations; // the first step allocates the workspace and the device tables
            else Assert.Equal(afterFirst, sim.DeviceAllocations);
            Assert.Equal((1, 1), sim.LastMultiTensorLaunches);
        });
        NumericAssert.Close(cpu.Losses, GradCheck.ToFloat(run.Losses), 1e-5, 1e-4, "losses");
        NumericAssert.Close(cpu.Norms, GradCheck.ToFloat(run.Norms), 1e-5, 1e-4, "gradient norms");
        // Adam's normalized update turns f32 summation-order differences of near-zero gradients into up to ~lr·1e-3.
        for (int i = 0; i < cpu.Params.Length; i++)
            NumericAssert.Close(GradCheck.ToDouble(cpu.Params[i]), run.Params[i], 1e-4, 1e-4, $"parameter {i}");
    }
    /// <summary>
    /// A NaN planted in one gradient before step 2 (the backward accumulates onto it, so ‖g‖ is NaN): that step is skipped with
    /// every parameter bit for bit as before it, the gradients are zeroed, and the steps after it train normally. On ILGPU
    /// every step, the skipped one included, waits for the device once.
    /// </summary>
    [Theory]
    [InlineData("cpu:1")]
    [InlineData("ilgpu-sim:4")]
    public void Pretrainer_PlantedNonFiniteStep_IsSkipped_ParametersUntouched_RunContinues_OneWaitPerStep(string name)
    {
        using var backend = Backends.Create(name);
        var gpu = backend as IlgpuBackend;
        using var w = LlamaWeights.Allocate(FusedCfg, backend);
        Pretrainer.InitializeWeights(w, backend, seed: 5);
        using var model = new LlamaModel(w, backend);
        using var p = new Pretrainer(model, backend, FusedSettings(3));
        var grad = model.BaseParameters().First(x => x.Name.EndsWith("q_proj.weight", StringComparison.Ordinal)).Grad;
        float[][] Snapshot() => w.Named().Select(x => x.Tensor.ToArray()).ToArray();
        var before = Snapshot();
        var skipped = new bool[3];
        var results = new (double Loss, double Norm)[3];
        for (int s = 0; s < 3; s++)
        {
            if (s == 1)
            {
                var nan = new float[grad.Length];
                nan[3] = float.NaN;
                backend.Upload(grad, nan);
            }
            long syncs = gpu?.BlockingSyncs ?? 0;
            results[s] = p.Step(FusedBatch(s));
            if (gpu is not null) Assert.Equal(syncs + 1, gpu.BlockingSyncs);
            skipped[s] = p.LastStepSkipped;
            var after = Snapshot();
            for (int i = 0; i < after.Length; i++)
            {
                if (s == 1) Assert.Equal(before[i], after[i]);                    // skipped: nothing written
                else Assert.False(before[i].AsSpan().SequenceEqual(after[i]), $"step {s + 1}: parameter {i} was not updated");
            }
            before = after;
        }
        Assert.Equal(new[] { false, true, false }, skipped);
        Assert.True(double.IsNaN(results[1].Norm), $"the planted step's norm is {results[1].Norm}");
        Assert.True(double.IsFinite(results[0].Loss) && double.IsFinite(results[2].Loss) && double.IsFinite(results[2].Norm));
        Assert.All(grad.ToArray(), v => Assert.Equal(0f, v));                 // zeroed after the last step
        Assert.Equal(3, p.StepsDone);
    }

    /// <summary>Run reports a skipped step (progress flag, result count) and goes on; MaxSkippedSteps in a row stop it.</summary>
    [Fact]
    public void PretrainerRun_ReportsSkippedSteps_AndStopsAfterMaxSkippedInARow()
    {
        using var backend = Backends.Create("cpu:1");
        using var w = LlamaWeights.Allocate(FusedCfg, backend);
        Pretrainer.InitializeWeights(w, backend, seed: 5);
        using var model = new LlamaModel(w, backend) { TrainBase = true };
        var grad = model.BaseParameters().First().Grad;
        var nan = new float[grad.Length];
        nan[0] = float.PositiveInfinity;
        using (var p = new Pretrainer(model, backend, FusedSettings(4)))
        {
            var progress = new List<PretrainProgress>();
            var r = p.Run(i => { if (i == 2) backend.Upload(grad, nan); return FusedBatch(i); }, Array.Empty<PretrainBatch>(), progress.Add);
            Assert.Equal(new[] { false, false, true, false }, progress.Select(x => x.Skipped));
            Assert.Equal(1, r.SkippedSteps);
            Assert.Equal(4, r.Steps);
            Assert.True(double.IsFinite(r.FirstLoss) && double.IsFinite(r.FinalLoss));
            Assert.Equal(progress[3].Loss, r.FinalLoss);
        }
        using (var p = new Pretrainer(model, backend, FusedSettings(6) with { MaxSkippedSteps = 2 }))
        {
            var e = Assert.Throws<TrainingStoppedException>(() => p.Run(i => { if (i >= 1) backend.Upload(grad, nan); return FusedBatch(i); }, Array.Empty<PretrainBatch>()));
            Assert.Contains("step 3: 2 steps in a row", e.Message);
        }
    }
}
