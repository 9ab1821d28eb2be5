using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using FineTuneNative.Tests.Runtime.Model;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Prefix tuning through PEFT's MLP reparametrisation (prefix_projection = true): the MLP's output against a double
/// reference, every MLP parameter's gradient against finite differences of the loss through the whole model, and
/// PEFT's file layout (only the MLP's output in prompt_embeddings) with the MLP kept beside it for further training.
/// </summary>
[Collection("PeftModel")]
public class PrefixProjectionTests(ITestOutputHelper output)
{
    private const int P = 3, H = 5;

    private static (int[] Tokens, int[] Targets) Data(int batch, int t, int vocab, int seed)
    {
        var rng = new Random(seed);
        var tok = new int[batch * t];
        var tgt = new int[batch * t];
        for (int i = 0; i < tok.Length; i++)
        {
            tok[i] = rng.Next(vocab);
            tgt[i] = i % 4 == 1 ? LlamaModel.IgnoreIndex : rng.Next(vocab);
        }
        return (tok, tgt);
    }

    /// <summary>out = W2·tanh(W1·E + b1) + b2 in double, PEFT layout (P, L·2·D).</summary>
    private static double[] ReferenceOutput(PrefixTuning m)
    {
        double[] Get(string n) => m.Trainable.First(t => t.Name == n).Param.ToArray().Select(x => (double)x).ToArray();
        var e = Get("embedding.weight");
        var w1 = Get("transform.0.weight");
        var b1 = Get("transform.0.bias");
        var w2 = Get("transform.2.weight");
        var b2 = Get("transform.2.bias");
        int d = e.Length / P, o = b2.Length;
        var outp = new double[P * o];
        for (int p = 0; p < P; p++)
        {
            var h = new double[H];
            for (int j = 0; j < H; j++)
            {
                double z = b1[j];
                for (int k = 0; k < d; k++) z += w1[j * d + k] * e[p * d + k];
                h[j] = Math.Tanh(z);
            }
            for (int i = 0; i < o; i++)
            {
                double y = b2[i];
                for (int j = 0; j < H; j++) y += w2[i * H + j] * h[j];
                outp[p * o + i] = y;
            }
        }
        return outp;
    }

    /// <summary>
    /// Every parameter of the MLP (E, W1, b1, W2, b2) against central finite differences of the loss through the whole
    /// model (plain double-accumulating backend, h = 1e-2, atol 4e-4 + rtol 2e-2 as the other PEFT methods), with
    /// pre-filled gradients proving the MLP backward accumulates (+=). The prefix the model reads is the MLP's output.
    /// </summary>
    [Theory]
    [InlineData("plain")]
    [InlineData("cpu")]
    public void Gradients_MatchFiniteDifferences(string backendName)
    {
        const float h = 1e-2f;
        const int B = 2, T = 5;
        var b = ModelBackends.Get(backendName);
        using var w = TinyModel.Weights(b, 5);
        using var model = new LlamaModel(w, b);
        using var m = PrefixTuning.Create(model, new PrefixTuningConfig(P, PrefixTuningInit.Random, null, H), 11);
        Assert.Equal(["embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"], m.Trainable.Select(t => t.Name));
        var c = model.Config;
        var reference = ReferenceOutput(m);
        var prefix = PrefixTuning.ToPeftLayout(m.Slot.Values.ToArray(), c.NumLayers, P, c.KvDim);
        NumericAssert.Close(reference, prefix.Select(x => (double)x).ToArray(), 1e-5, 1e-5, "the prefix is the MLP's output");

        var (tok, tgt) = Data(B, T, c.VocabSize, 7);
        float scale = 1f / tgt.Count(x => x != LlamaModel.IgnoreIndex);
        m.ZeroGrad();
        foreach (var t in m.Trainable) b.Upload(t.Grad, Enumerable.Repeat(0.25f, (int)t.Grad.Length).ToArray());
        model.ForwardBackward(tok, tgt, B, T, scale, 1);
        Assert.Equal(0, m.AddPenalty());   // the MLP backward, as the trainer calls it after the window's micro-batches
        var checks = new List<(string What, TrainableTensor T, int Index, double Analytic)>();
        var rng = new Random(3);
        foreach (var t in m.Trainable)
        {
            var ga = t.Grad.ToArray();
            int n = Math.Min(ga.Length, 12);
            for (int j = 0; j < n; j++)
            {
                int i = ga.Length <= n ? j : rng.Next(ga.Length);
                checks.Add(($"{t.Name}[{i}]", t, i, ga[i] - 0.25));
            }
        }
        double LossAt()
        {
            m.AfterStep();   // the new parameters' output becomes the prefix, as after an optimizer update
            return model.Loss(tok, tgt, B, T).LossSum * scale;
        }
        var numeric = new double[checks.Count];
        var analytic = new double[checks.Count];
        for (int k = 0; k < checks.Count; k++)
        {
            var (_, t, i, a) = checks[k];
            var host = t.Param.ToArray();
            float save = host[i];
            host[i] = save + h; b.Upload(t.Param, host); double fp = LossAt();
            host[i] = save - h; b.Upload(t.Param, host); double fm = LossAt();
            host[i] = save; b.Upload(t.Param, host);
            numeric[k] = (fp - fm) / (2.0 * h);
            analytic[k] = a;
        }
        double worst = 0, largest = 0;
        for (int k = 0; k < numeric.Length; k++) { worst = Math.Max(worst, Math.Abs(numeric[k] - analytic[k])); largest = Math.Max(largest, Math.Abs(analytic[k])); }
        output.WriteLine($"prefix projection on {backendName}: {checks.Count} checks, max |grad| {largest:G3}, max abs err {worst:G3}");
        Assert.True(largest > 1e-3, $"gradients are all ~0 ({largest:G3}); the check would prove nothing");
        foreach (var t in m.Trainable)
            Assert.True(checks.Where(x => x.T == t).Any(x => Math.Abs(x.Analytic) > 1e-6), $"{t.Name}: no nonzero gradient checked");
        NumericAssert.Close(numeric, analytic, 4e-4, 2e-2, $"prefix projection finite differences ({checks.Count} entries)");
    }

    /// <summary>
    /// PEFT's files: adapter_model.safetensors holds only prompt_embeddings = the MLP's output (P, L·2·D), the config
    /// says prefix_projection true and encoder_hidden_size H; the MLP is in prefix_encoder.safetensors. Loading gives
    /// the MLP back (5 trainable tensors, same loss); without the MLP file it loads as PEFT does for inference: the
    /// saved output as a plain prefix, same loss.
    /// </summary>
    [Fact]
    public void Saves_Pefts_Layout_And_Reloads_With_Or_Without_The_Mlp()
    {
        var b = PeftBackend.Cpu;
        using var w = TinyModel.Weights(b, 5);
        using var tmp = new TempDir();
        var (tok, tgt) = Data(2, 6, TinyModel.Config().VocabSize, 2);
        double before;
        double[] reference;
        using (var model = new LlamaModel(w, b))
        using (var m = PrefixTuning.Create(model, new PrefixTuningConfig(P, PrefixTuningInit.Random, null, H), 4))
        {
            before = model.Loss(tok, tgt, 2, 6).LossSum;
            reference = ReferenceOutput(m);
            m.Save(tmp.Path, "tiny");
        }
        var cfg = (JsonObject)JsonNode.Parse(File.ReadAllText(Path.Combine(tmp.Path, "adapter_config.json")))!;
        Assert.True(cfg["prefix_projection"]!.GetValue<bool>());
        Assert.Equal(H, cfg["encoder_hidden_size"]!.GetValue<int>());
        Assert.Equal("PREFIX_TUNING", cfg["peft_type"]!.GetValue<string>());
        var c = TinyModel.Config();
        using (var st = SafeTensors.Open(Path.Combine(tmp.Path, "adapter_model.safetensors")))
        {
            Assert.Equal(["prompt_embeddings"], st.Names);
            Assert.Equal([P, c.NumLayers * 2 * c.KvDim], st.Info("prompt_embeddings").Shape);
            NumericAssert.Close(reference, st.ReadF32("prompt_embeddings").Select(x => (double)x).ToArray(), 1e-5, 1e-5, "saved prompt_embeddings = the MLP's output");
        }
        using (var st = SafeTensors.Open(Path.Combine(tmp.Path, PrefixTuning.EncoderFile)))
            Assert.Equal(new[] { "embedding.weight", "transform.0.bias", "transform.0.weight", "transform.2.bias", "transform.2.weight" }, st.Names.Order());

        using (var model = new LlamaModel(w, b))
        using (var m = PrefixTuning.Load(tmp.Path, model))
        {
            Assert.True(m.Config.Projection);
            Assert.Equal(5, m.Trainable.Count);
            Assert.Equal(before, model.Loss(tok, tgt, 2, 6).LossSum);
        }
        File.Delete(Path.Combine(tmp.Path, PrefixTuning.EncoderFile));
        using (var model = new LlamaModel(w, b))
        using (var m = PrefixTuning.Load(tmp.Path, model))
        {
            Assert.False(m.Config.Projection);
            Assert.Equal(["prompt_embeddings"], m.Trainable.Select(t => t.Name));
            Assert.Equal(before, model.Loss(tok, tgt, 2, 6).LossSum);
            // a projection run cannot resume from a directory without its MLP
        }
        using (var model = new LlamaModel(w, b))
        using (var m = PrefixTuning.Create(model, new PrefixTuningConfig(P, PrefixTuningInit.Random, null, H), 4))
        {
            var e = Assert.Throws<InvalidDataException>(() => m.LoadValues(tmp.Path));
            Assert.Contains(PrefixTuning.EncoderFile, e.Message);
        }
        Assert.Throws<ArgumentException>(() => new PrefixTuningConfig(P, PrefixTuningInit.SampleVocab, null, H).Validate());
    }
}
