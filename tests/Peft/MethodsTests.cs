using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// QLoRA's quantized base, EWC's penalty and several adapters per base, on the tiny random model (fast, exact
/// checks). The real-dataset runs are in <see cref="MethodsEndToEndTests"/>.
/// </summary>
[Collection("PeftModel")]
public class MethodsTests(ITestOutputHelper output)
{
    private static IBackend Cpu => PeftBackend.Cpu;

    private static void RandomizeB(LoraAdapter adapter, ulong seed, float scale = 0.2f)
    {
        ulong state = seed;
        foreach (var m in adapter.Modules)
        {
            var b = new float[m.Slot.B.Length];
            for (int i = 0; i < b.Length; i++) b[i] = (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) - 0.5) * scale;
            Cpu.Upload(m.Slot.B, b);
        }
    }

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

    // ------------------------------------------------------------------------------------------ QLoRA

    [Fact]
    public void QuantizeBase_stores_the_projections_in_nf4_and_the_model_computes_on_the_dequantized_weights()
    {
        using var w = TinyModel.Weights(Cpu, seed: 12);
        var data = TinyModel.Samples(6, 5, 12, seed: 4);
        // the reference: the same model with each projection replaced by its NF4 round trip in f32
        using var wr = TinyModel.Weights(Cpu, seed: 12);
        foreach (var layer in wr.Layers)
            foreach (var module in LlamaWeights.LinearModules)
            {
                var t = layer.Linear(module);
                Cpu.Upload(t, Nf4.Dequantize(Nf4.Quantize(t.ToArray()), t.Length));
            }
        var q = QLora.QuantizeBase(w);
        output.WriteLine(q.Describe());
        Assert.All(q.Weights.Layers.SelectMany(l => LlamaWeights.LinearModules.Select(l.Linear)), t => Assert.Equal(DType.NF4, t.DType));
        Assert.Equal(DType.F32, q.Weights.Embedding.DType);
        Assert.Same(w.Embedding, q.Weights.Embedding);
        // codes, absmax codes, group absmaxes and the offset: at 16x16 a projection takes 140 bytes instead of 1 KiB
        Assert.Equal(q.Weights.Layers.Sum(l => LlamaWeights.LinearModules.Sum(m => Nf4.StorageBytes(l.Linear(m).Length))), q.LinearBytesAfter);
        Assert.Equal(140, Nf4.StorageBytes(256));
        Assert.True(q.LinearBytesBefore > 7 * q.LinearBytesAfter, q.Describe());
        Assert.Equal(q.LinearBytesBefore - q.LinearBytesAfter, q.TotalBytesBefore - q.TotalBytesAfter);

        using var model = new LlamaModel(q.Weights, Cpu);
        using var reference = new LlamaModel(wr, Cpu);
        using var a1 = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0 }, seed: 3);
        using var a2 = LoraAdapter.Create(reference, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0 }, seed: 3);
        RandomizeB(a1, 9); RandomizeB(a2, 9);
        Assert.Equal(EvalLoss(reference, data), EvalLoss(model, data), 4);

        var batch = Batching.Pad(data.Take(3).ToArray(), 3, 12, 0);
        a1.ZeroGrad(); a2.ZeroGrad();
        model.ForwardBackward(batch.Tokens, batch.Targets, 3, 12, 1f / batch.TargetCount, 0);
        reference.ForwardBackward(batch.Tokens, batch.Targets, 3, 12, 1f / batch.TargetCount, 0);
        foreach (var (t1, t2) in a1.Trainable.Zip(a2.Trainable))
            NumericAssert.Close(t2.Grad.ToArray(), t1.Grad.ToArray(), 1e-6, 1e-3, t1.Name);
        Assert.Throws<InvalidOperationException>(() => model.TrainBase = true);
    }

    /// <summary>
    /// An NF4 base saves as a Hugging Face model with its projections dequantized (bit for bit the values the NF4 matmul
    /// computes with), and a QLoRA adapter merged into the dequantized base (what <c>ftn merge --base-quant nf4</c>
    /// writes) reloads to the loss the adapter has over the NF4 base.
    /// </summary>
    [Fact]
    public void Nf4_base_saves_dequantized_and_a_merged_qlora_adapter_reloads_to_its_loss()
    {
        using var w = TinyModel.Weights(Cpu, seed: 14);
        var data = TinyModel.Samples(6, 5, 12, seed: 5);
        var q = QLora.QuantizeBase(w);
        using var tmp = new TempDir();
        string baseDir = Path.Combine(tmp.Path, "base"), mergedDir = Path.Combine(tmp.Path, "merged");
        ModelSaver.SaveHf(q.Weights, baseDir);
        using (var st = SafeTensors.Open(Path.Combine(baseDir, "model.safetensors")))
        {
            Assert.StartsWith("14 nf4 tensors written as f32", st.Metadata[ModelSaver.DequantizedKey]);
            var nf4 = q.Weights.Named().Where(p => p.Tensor.DType == DType.NF4).ToList();
            Assert.Equal(14, nf4.Count);
            foreach (var (name, t) in nf4)
            {
                Assert.Equal("F32", st.Info(name).DTypeName);
                Assert.Equal(Nf4.ToFloats(t), st.ReadF32(name));
            }
        }
        using var model = new LlamaModel(q.Weights, Cpu);
        double baseLoss = EvalLoss(model, data);
        using (var saved = ModelLoader.Load(baseDir, Cpu))
        using (var reloaded = new LlamaModel(saved.Weights, Cpu))
            Assert.Equal(baseLoss, EvalLoss(reloaded, data), 5);

        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0 }, seed: 3);
        RandomizeB(adapter, 11);
        double adapted = EvalLoss(model, data);
        Assert.True(Math.Abs(adapted - baseLoss) > 1e-3, $"the adapter should change the loss: {baseLoss} -> {adapted}");
        Assert.Throws<InvalidOperationException>(() => adapter.MergeInto(q.Weights)); // not into the NF4 codes themselves
        using (var merged = QLora.DequantizedCopy(q.Weights))
        {
            adapter.MergeInto(merged);
            ModelSaver.SaveHf(merged, mergedDir, DType.F32);
        }
        using var loaded = ModelLoader.Load(mergedDir, Cpu);
        using var mergedModel = new LlamaModel(loaded.Weights, Cpu);
        double mergedLoss = EvalLoss(mergedModel, data);
        output.WriteLine($"NF4 base {baseLoss:F6}; with the adapter {adapted:F6}; merged, saved, reloaded {mergedLoss:F6}");
        Assert.Equal(adapted, mergedLoss, 5);
    }

    /// <summary>LoRA over an NF4 base: gradients of A and B against finite differences of the model loss (f32, h = 1e-2).</summary>
    [Fact]
    public void QLora_gradients_match_finite_differences()
    {
        const float h = 1e-2f;
        using var src = TinyModel.Weights(Cpu, seed: 2);
        var q = QLora.QuantizeBase(src);
        using var model = new LlamaModel(q.Weights, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0, TargetModules = new[] { "k_proj", "o_proj", "gate_proj", "down_proj" } }, seed: 1);
        RandomizeB(adapter, 4, 0.5f);
        var batch = Batching.Pad(TinyModel.Samples(3, 6, 10, seed: 8).ToArray(), 3, 10, 0);
        float scale = 1f / batch.TargetCount;
        adapter.ZeroGrad();
        model.ForwardBackward(batch.Tokens, batch.Targets, 3, 10, scale, 0);
        var numeric = new List<double>(); var analytic = new List<double>();
        foreach (var t in adapter.Trainable)
        {
            var g = t.Grad.ToArray();
            for (int i = 0; i < t.Param.Length; i += 4)
            {
                var host = t.Param.ToArray();
                float save = host[i];
                host[i] = save + h; Cpu.Upload(t.Param, host); double fp = model.Loss(batch.Tokens, batch.Targets, 3, 10).LossSum * scale;
                host[i] = save - h; Cpu.Upload(t.Param, host); double fm = model.Loss(batch.Tokens, batch.Targets, 3, 10).LossSum * scale;
                host[i] = save; Cpu.Upload(t.Param, host);
                numeric.Add((fp - fm) / (2.0 * h));
                analytic.Add(g[i]);
            }
        }
        output.WriteLine($"{numeric.Count} finite-difference checks");
        Assert.Contains(analytic, a => Math.Abs(a) > 1e-3);
        NumericAssert.Close(numeric.ToArray(), analytic.ToArray(), 4e-4, 2e-2, "QLoRA finite differences");
    }

    // ------------------------------------------------------------------------------------------ EWC

    [Fact]
    public void Ewc_penalty_gradient_matches_finite_differences()
    {
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0, TargetModules = new[] { "q_proj", "down_proj" } }, seed: 5);
        RandomizeB(adapter, 6);
        var rng = new Random(3);
        var state = new EwcState
        {
            Fisher = adapter.Trainable.ToDictionary(t => t.Name, t => Enumerable.Range(0, (int)t.Param.Length).Select(_ => (float)rng.NextDouble()).ToArray()),
            Anchor = adapter.Trainable.ToDictionary(t => t.Name, t => t.Param.ToArray().Select(v => v + (float)(rng.NextDouble() - 0.5) * 0.1f).ToArray()),
            Samples = 1,
        };
        var ewc = new EwcMethod(adapter, state, lambda: 3.5);
        // prefill the gradients: AddPenalty must add (+=) its gradient
        var pre = adapter.Trainable.Select(t => { var g = GradCheck.ToFloat(GradCheck.Random((int)t.Grad.Length, 9)); Cpu.Upload(t.Grad, g); return g; }).ToArray();
        double value = ewc.AddPenalty();
        Assert.Equal(ewc.Penalty(), value, 9);
        Assert.True(value > 0);
        for (int ti = 0; ti < adapter.Trainable.Count; ti++)
        {
            var t = adapter.Trainable[ti];
            var theta = GradCheck.ToDouble(t.Param.ToArray());
            var numeric = GradCheck.Numeric(p =>
            {
                double s = 0;
                for (int j = 0; j < p.Length; j++) { double d = p[j] - state.Anchor[t.Name][j]; s += state.Fisher[t.Name][j] * d * d; }
                return 0.5 * 3.5 * s;
            }, theta);
            var added = t.Grad.ToArray().Select((g, j) => (double)g - pre[ti][j]).ToArray();
            NumericAssert.Close(numeric, added, 1e-5, 1e-4, $"EWC gradient of {t.Name}");
        }
    }

    [Fact]
    public void Ewc_fisher_is_the_mean_squared_per_sample_gradient()
    {
        using var w = TinyModel.Weights(Cpu, seed: 3);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0, TargetModules = new[] { "v_proj" } }, seed: 5);
        RandomizeB(adapter, 2);
        var data = TinyModel.Samples(3, 5, 9, seed: 7);
        var state = EwcState.Estimate(model, adapter, data, 16, 0);
        Assert.Equal(3, state.Samples);
        foreach (var t in adapter.Trainable) Assert.All(t.Grad.ToArray(), g => Assert.Equal(0f, g)); // left zeroed
        var expected = adapter.Trainable.ToDictionary(t => t.Name, t => new double[t.Param.Length]);
        foreach (var s in data)
        {
            var b = Batching.Pad(new[] { s }, 1, s.Length, 0);
            adapter.ZeroGrad();
            model.ForwardBackward(b.Tokens, b.Targets, 1, b.SeqLen, 1f / b.TargetCount, 0);
            foreach (var t in adapter.Trainable)
            {
                var g = t.Grad.ToArray();
                for (int j = 0; j < g.Length; j++) expected[t.Name][j] += (double)g[j] * g[j] / 3;
            }
        }
        foreach (var t in adapter.Trainable)
        {
            NumericAssert.Close(expected[t.Name], state.Fisher[t.Name], 1e-12, 1e-5, "Fisher " + t.Name);
            Assert.Equal(t.Param.ToArray(), state.Anchor[t.Name]);
        }
        using var tmp = new TempDir();
        state.Save(tmp.Path);
        var back = EwcState.Load(tmp.Path, adapter);
        foreach (var t in adapter.Trainable) Assert.Equal(state.Fisher[t.Name], back.Fisher[t.Name]);
    }

    [Fact]
    public void Ewc_state_for_the_next_stage_sums_the_stage_fishers_around_the_final_values()
    {
        using var w = TinyModel.Weights(Cpu, seed: 4);
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0, TargetModules = new[] { "q_proj", "up_proj" } }, seed: 5);
        RandomizeB(adapter, 2);
        var stage1 = TinyModel.Samples(3, 5, 9, seed: 7);
        var stage2 = TinyModel.Samples(4, 4, 10, seed: 8);
        var earlier = EwcState.Estimate(model, adapter, stage1, 16, 0);
        var ewc = new EwcMethod(adapter, earlier, lambda: 10);
        RandomizeB(adapter, 3); // "stage 2 trained": the values moved away from the stage-1 anchor
        var final = adapter.Trainable.ToDictionary(t => t.Name, t => t.Param.ToArray());
        var own = EwcState.Estimate(model, adapter, stage2, 16, 0); // this stage's Fisher, computed apart
        using var tmp = new TempDir();
        var next = ewc.SaveForNextStage(tmp.Path, model, stage2, 16, 0);
        foreach (var t in adapter.Trainable) Assert.All(t.Grad.ToArray(), g => Assert.Equal(0f, g)); // left zeroed
        var back = EwcState.Load(tmp.Path, adapter);
        Assert.Equal((3 + 4, 2), (back.Samples, back.Stages));
        Assert.Equal((next.Samples, next.Stages), (back.Samples, back.Stages));
        foreach (var t in adapter.Trainable)
        {
            var sum = earlier.Fisher[t.Name].Zip(own.Fisher[t.Name], (a, b) => (double)a + b).ToArray();
            Assert.Contains(own.Fisher[t.Name], f => f > 0);
            NumericAssert.Close(sum, back.Fisher[t.Name], 0, 1e-6, "summed Fisher " + t.Name);
            Assert.Equal(final[t.Name], back.Anchor[t.Name]); // anchored at the end of stage 2, not stage 1
        }
        Assert.Contains(adapter.Trainable, t => !earlier.Anchor[t.Name].AsSpan().SequenceEqual(back.Anchor[t.Name])); // B moved
        // a third stage loads it as its penalty: zero at the stage-2 values, positive away from them
        var third = new EwcMethod(adapter, back, lambda: 10); // not disposed: it would dispose the adapter
        Assert.Equal(0.0, third.Penalty());
        RandomizeB(adapter, 4);
        Assert.True(third.Penalty() > 0);
        // an earlier state that does not cover the same tensors is refused
        var partial = new EwcState { Fisher = new() { [adapter.Trainable[0].Name] = earlier.Fisher[adapter.Trainable[0].Name] }, Anchor = earlier.Anchor };
        Assert.Throws<ArgumentException>(() => partial.Then(own));
    }

    // ------------------------------------------------------------------------------------------ several adapters

    [Fact]
    public void Adapters_switch_and_stack_as_the_sum_of_their_updates()
    {
        using var w = TinyModel.Weights(Cpu, seed: 8);
        var data = TinyModel.Samples(8, 5, 12, seed: 30);
        using var tmp = new TempDir();
        string dirA = Path.Combine(tmp.Path, "a"), dirB = Path.Combine(tmp.Path, "b"), dirD = Path.Combine(tmp.Path, "d");
        double baseLoss, lossA, lossB;
        using (var model = new LlamaModel(w, Cpu))
        {
            baseLoss = EvalLoss(model, data);
            using (var a = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, TargetModules = new[] { "q_proj", "up_proj" } }, seed: 1))
            { RandomizeB(a, 11); lossA = EvalLoss(model, data); a.Save(dirA); }
            using (var b = LoraAdapter.Create(model, new LoraConfig { Rank = 3, Alpha = 3, UseRsLora = true, TargetModules = new[] { "q_proj", "down_proj" } }, seed: 2))
            { RandomizeB(b, 12); lossB = EvalLoss(model, data); b.Save(dirB); }
            using (var d = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0, UseDora = true }, seed: 3)) d.Save(dirD);
        }
        double stacked;
        using (var model = new LlamaModel(w, Cpu))
        using (var set = new AdapterSet(model))
        {
            set.Load("a", dirA);
            set.Load("b", dirB);
            set.Load("d", dirD);
            Assert.Equal(baseLoss, EvalLoss(model, data)); // loading activates nothing
            set.Activate("a"); Assert.Equal(lossA, EvalLoss(model, data));
            set.Activate("b"); Assert.Equal(lossB, EvalLoss(model, data));
            set.Activate(null); Assert.Equal(baseLoss, EvalLoss(model, data));
            set.ActivateStack("a", "b");
            Assert.Equal(new[] { "a", "b" }, set.Active);
            stacked = EvalLoss(model, data);
            Assert.NotEqual(lossA, stacked, 6);
            Assert.NotEqual(lossB, stacked, 6);
            Assert.Throws<InvalidOperationException>(() => set.ActivateStack("a", "d"));
            set.Activate("a"); Assert.Equal(lossA, EvalLoss(model, data));
        }
        // the stack equals both adapters merged into the weights (W + s_a·B_a·A_a + s_b·B_b·A_b)
        AdapterSet.StackInto(w, new[] { dirA, dirB });
        using (var merged = new LlamaModel(w, Cpu))
            Assert.Equal(stacked, EvalLoss(merged, data), 4);
        Assert.Throws<InvalidOperationException>(() => AdapterSet.StackInto(w, new[] { dirA, dirD }));
    }
}
