using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// DoRA adapters on a whole model: the gradients of A, B and the magnitude against finite differences of the
/// model loss (the norm held constant, as PEFT's backward has it), PEFT's file format, save/reload and merge.
/// </summary>
[Collection("PeftModel")]
public class DoraAdapterTests(ITestOutputHelper output)
{
    private static IBackend Cpu => PeftBackend.Cpu;

    private static void Randomize(LoraAdapter adapter, ulong seed)
    {
        ulong state = seed;
        float U() => (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) - 0.5);
        foreach (var m in adapter.Modules)
        {
            var b = new float[m.Slot.B.Length];
            for (int i = 0; i < b.Length; i++) b[i] = U() * 0.3f;
            Cpu.Upload(m.Slot.B, b);
            var mag = m.Slot.Magnitude!.ToArray();
            for (int i = 0; i < mag.Length; i++) mag[i] *= 1 + U() * 0.4f;
            Cpu.Upload(m.Slot.Magnitude, mag);
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

    [Fact]
    public void A_fresh_dora_adapter_leaves_the_model_unchanged_and_its_magnitude_is_the_row_norm()
    {
        using var w = TinyModel.Weights(Cpu);
        using var model = new LlamaModel(w, Cpu);
        var data = TinyModel.Samples(6, 5, 12, seed: 3);
        double baseLoss = EvalLoss(model, data);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0, UseDora = true }, seed: 5);
        Assert.Equal(baseLoss, EvalLoss(model, data), 5);
        var m0 = adapter.Modules[0];
        var wq = w.Layers[0].Wq.ToArray();
        var mag = m0.Slot.Magnitude!.ToArray();
        for (int j = 0; j < m0.Out; j++)
        {
            double ss = 0;
            for (int c = 0; c < m0.In; c++) ss += (double)wq[j * m0.In + c] * wq[j * m0.In + c];
            Assert.Equal(Math.Sqrt(ss), mag[j], 5);
        }
        long plain = 0;
        foreach (var m in adapter.Modules) plain += 4L * (m.In + m.Out);
        Assert.Equal(plain + adapter.Modules.Sum(m => (long)m.Out), adapter.ParameterCount);
    }

    /// <summary>
    /// Finite differences of the model loss in f32 (h = 1e-2; tolerance as LlamaModelTests' FD check). The analytic
    /// gradient treats ‖W + s·B·A‖ as a constant; the numeric side holds it constant too by rescaling the magnitude
    /// with each perturbation (m' = m·‖W + s·B'·A'‖ / ‖W + s·B·A‖ keeps m'/‖·‖' = m/‖·‖).
    /// </summary>
    [Fact]
    public void Model_gradients_of_A_B_and_the_magnitude_match_finite_differences()
    {
        const float h = 1e-2f;
        using var w = TinyModel.Weights(Cpu, seed: 4);
        using var model = new LlamaModel(w, Cpu);
        var cfg = new LoraConfig { Rank = 3, Alpha = 6, Dropout = 0, UseDora = true, TargetModules = new[] { "q_proj", "v_proj", "o_proj", "up_proj", "down_proj" } };
        using var adapter = LoraAdapter.Create(model, cfg, seed: 9);
        Randomize(adapter, 77);
        var batch = Batching.Pad(TinyModel.Samples(3, 6, 10, seed: 8).ToArray(), 3, 10, 0);
        float lossScale = 1f / batch.TargetCount;
        adapter.ZeroGrad();
        model.ForwardBackward(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen, lossScale, 0);
        double LossAt() => model.Loss(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen).LossSum * lossScale;

        var numeric = new List<double>();
        var analytic = new List<double>();
        var names = new List<string>();
        using var normTmp = Cpu.Allocate(DType.F32, 64);
        foreach (var m in adapter.Modules)
        {
            var s = m.Slot;
            var weight = w.Layers[m.Layer].Linear(m.Module);
            float[] Norm()
            {
                var t = normTmp.View(0, m.Out);
                Cpu.DoraWeightNorm(t, weight, s.A, s.B, s.Scale, m.Out, m.In, s.Rank);
                return t.ToArray();
            }
            var norm0 = Norm();
            var mag0 = s.Magnitude!.ToArray();
            foreach (var (name, p, g, step) in new[] { ("A", s.A, s.DA, 5), ("B", s.B, s.DB, 4), ("m", s.Magnitude!, s.DMagnitude!, 3) })
            {
                var grad = g.ToArray();
                for (int i = m.Layer % step; i < p.Length; i += step)
                {
                    var host = p.ToArray();
                    float save = host[i];
                    double Side(float v)
                    {
                        host[i] = v;
                        Cpu.Upload(p, host);
                        if (name != "m")
                        {
                            var n1 = Norm();
                            var mag = new float[mag0.Length];
                            for (int j = 0; j < mag.Length; j++) mag[j] = mag0[j] * n1[j] / norm0[j];
                            Cpu.Upload(s.Magnitude!, mag);
                        }
                        return LossAt();
                    }
                    double fp = Side(save + h), fm = Side(save - h);
                    host[i] = save;
                    Cpu.Upload(p, host);
                    if (name != "m") Cpu.Upload(s.Magnitude!, mag0);
                    numeric.Add((fp - fm) / (2.0 * h));
                    analytic.Add(grad[i]);
                    names.Add($"{m.Layer}.{m.Module}.{name}[{i}]");
                }
            }
        }
        double worst = 0;
        for (int c = 0; c < numeric.Count; c++) worst = Math.Max(worst, Math.Abs(numeric[c] - analytic[c]));
        output.WriteLine($"{numeric.Count} finite-difference checks over A, B and the magnitude; max abs err {worst:G3}");
        Assert.Contains(analytic, a => Math.Abs(a) > 1e-3); // the check is not vacuous
        NumericAssert.Close(numeric.ToArray(), analytic.ToArray(), 4e-4, 2e-2, $"DoRA finite differences ({names[0]}, ...)");
    }

    [Fact]
    public void Saves_in_peft_format_reloads_to_the_same_loss_and_merges()
    {
        using var w = TinyModel.Weights(Cpu, seed: 6);
        var data = TinyModel.Samples(8, 5, 12, seed: 21);
        using var tmp = new TempDir();
        double loss;
        using (var model = new LlamaModel(w, Cpu))
        {
            using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Alpha = 4, Dropout = 0, UseDora = true }, seed: 1);
            Randomize(adapter, 5);
            loss = EvalLoss(model, data);
            adapter.Save(tmp.Path, "tiny");
        }
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Path, LoraAdapter.ConfigFile)))!;
        Assert.True(cfg["use_dora"]!.GetValue<bool>());
        Assert.Equal(0.0, cfg["lora_dropout"]!.GetValue<double>());
        using (var st = SafeTensors.Open(Path.Combine(tmp.Path, LoraAdapter.WeightsFile)))
        {
            string key = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector";
            Assert.True(st.Contains(key), $"missing {key}");
            Assert.Equal(new[] { w.Config.HiddenSize }, st.Info(key).Shape);
            Assert.Equal(2 * 7 * 3, st.Names.Count);
        }
        using (var model = new LlamaModel(w, Cpu))
        using (var again = LoraAdapter.Load(tmp.Path, model))
        {
            Assert.True(again.Config.UseDora);
            Assert.Equal(loss, EvalLoss(model, data));
        }
        // merged: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row gives the same model without an adapter
        LoraAdapter.MergeInto(tmp.Path, w);
        using (var merged = new LlamaModel(w, Cpu))
            Assert.Equal(loss, EvalLoss(merged, data), 4);
    }
}
