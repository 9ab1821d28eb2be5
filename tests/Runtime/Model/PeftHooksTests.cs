using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Runtime.Model;

/// <summary>
/// The model's prompt-tuning, prefix-tuning and bottleneck-adapter hooks: gradients against central finite
/// differences through the whole model, the forward semantics against independent constructions (a virtual token
/// equal to a real token's embedding; a prefix equal to the KV cache of real tokens), and backends against each other.
/// </summary>
public class PeftHooksTests(ITestOutputHelper output)
{
    private readonly ITestOutputHelper _out = output;

    public enum Method { Prompt, Prefix, Bottleneck }

    private static LlamaConfig Config(bool tied) => new()
    {
        HiddenSize = 16, IntermediateSize = 24, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 4,
        VocabSize = 19, TieWordEmbeddings = tied, AttentionBias = !tied, MaxPositions = 64,
        RopeLayout = tied ? RopeLayout.Interleaved : RopeLayout.RotateHalf,
    };

    private static LlamaWeights RandomWeights(LlamaConfig cfg, IBackend b, int seed)
    {
        var w = LlamaWeights.Allocate(cfg, b);
        var rng = new Random(seed);
        foreach (var (name, t) in w.Named())
        {
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            double scale = name.Contains("embed") ? 1.0 : 1.5 / Math.Sqrt(t.Dim(-1));
            b.Upload(t, Enumerable.Range(0, (int)t.Length).Select(_ => norm ? (float)(1 + 0.2 * (rng.NextDouble() - 0.5)) : (float)((rng.NextDouble() * 2 - 1) * scale)).ToArray());
        }
        return w;
    }

    private static Tensor Rand(IBackend b, List<Tensor> owned, Random rng, double scale, params int[] shape)
    {
        var t = b.Allocate(DType.F32, shape);
        owned.Add(t);
        b.Upload(t, Enumerable.Range(0, (int)t.Length).Select(_ => (float)((rng.NextDouble() * 2 - 1) * scale)).ToArray());
        return t;
    }

    private static Tensor Zeros(IBackend b, List<Tensor> owned, params int[] shape)
    {
        var t = b.Allocate(DType.F32, shape);
        owned.Add(t);
        return t;
    }

    /// <summary>Attaches one method with random (non-identity) values; returns its (name, param, grad) list.</summary>
    private static List<(string Name, Tensor Param, Tensor Grad)> Attach(Method method, LlamaModel model, IBackend b, List<Tensor> owned, int seed)
    {
        var c = model.Config;
        var rng = new Random(seed);
        var ps = new List<(string, Tensor, Tensor)>();
        switch (method)
        {
            case Method.Prompt:
            {
                var e = Rand(b, owned, rng, 1.0, 3, c.HiddenSize);
                var g = Zeros(b, owned, 3, c.HiddenSize);
                model.Prompt = new PromptSlot(e, g);
                ps.Add(("prompt", e, g));
                break;
            }
            case Method.Prefix:
            {
                var v = Rand(b, owned, rng, 1.0, c.NumLayers, 2, 3, c.KvDim);
                var g = Zeros(b, owned, c.NumLayers, 2, 3, c.KvDim);
                model.Prefix = new PrefixSlot(v, g, c.NumLayers);
                ps.Add(("prefix", v, g));
                break;
            }
            case Method.Bottleneck:
                for (int l = 0; l < c.NumLayers; l++)
                    foreach (var site in new[] { BottleneckSite.Attention, BottleneckSite.Mlp })
                    {
                        int n = 5, C = c.HiddenSize;
                        var s = new BottleneckSlot
                        {
                            Down = Rand(b, owned, rng, 0.5, n, C), DownBias = Rand(b, owned, rng, 0.5, n),
                            Up = Rand(b, owned, rng, 0.5, C, n), UpBias = Rand(b, owned, rng, 0.5, C),
                            DDown = Zeros(b, owned, n, C), DDownBias = Zeros(b, owned, n), DUp = Zeros(b, owned, C, n), DUpBias = Zeros(b, owned, C),
                        };
                        model.SetBottleneck(l, site, s);
                        string p = $"{l}.{site}";
                        ps.Add(($"{p}.down", s.Down, s.DDown)); ps.Add(($"{p}.down_bias", s.DownBias, s.DDownBias));
                        ps.Add(($"{p}.up", s.Up, s.DUp)); ps.Add(($"{p}.up_bias", s.UpBias, s.DUpBias));
                    }
                break;
        }
        return ps;
    }

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

    /// <summary>
    /// Every parameter of each method against central finite differences of the loss through the whole model
    /// (h = 1e-2 on f32 weights, as the LoRA check; tolerance atol 4e-4 + rtol 2e-2), tied/interleaved and
    /// untied/bias/rotate-half models, B = 2.
    /// </summary>
    [Theory]
    [InlineData("plain", Method.Prompt, true)]
    [InlineData("plain", Method.Prefix, false)]
    [InlineData("plain", Method.Bottleneck, true)]
    [InlineData("cpu", Method.Prompt, false)]
    [InlineData("cpu", Method.Prefix, true)]
    [InlineData("cpu", Method.Bottleneck, false)]
    public void Gradients_MatchFiniteDifferences(string backendName, Method method, bool tied)
    {
        const float h = 1e-2f;
        const int B = 2, T = 5;
        var b = ModelBackends.Get(backendName);
        var cfg = Config(tied);
        var owned = new List<Tensor>();
        using var w = RandomWeights(cfg, b, 3);
        using var model = new LlamaModel(w, b);
        try
        {
            var ps = Attach(method, model, b, owned, 5);
            var (tok, tgt) = Data(B, T, cfg.VocabSize, 7);
            int count = tgt.Count(x => x != LlamaModel.IgnoreIndex);
            float scale = 1f / count;
            // pre-filled gradients prove the backward accumulates (+=)
            foreach (var (_, _, g) in ps) b.Upload(g, Enumerable.Repeat(0.25f, (int)g.Length).ToArray());
            model.ForwardBackward(tok, tgt, B, T, scale, 1);
            var checks = new List<(string What, Tensor Param, int Index, double Analytic)>();
            var rng = new Random(9);
            foreach (var (name, p, g) in ps)
            {
                var ga = g.ToArray();
                int n = Math.Min(ga.Length, method == Method.Bottleneck ? 4 : 24);
                for (int j = 0; j < n; j++)
                {
                    int i = ga.Length <= n ? j : rng.Next(ga.Length);
                    checks.Add(($"{name}[{i}]", p, i, ga[i] - 0.25));
                }
            }
            double LossAt() => model.Loss(tok, tgt, B, T).LossSum * scale;
            var numeric = new double[checks.Count];
            var analytic = new double[checks.Count];
            for (int k = 0; k < checks.Count; k++)
            {
                var (_, p, i, a) = checks[k];
                var host = p.ToArray();
                float save = host[i];
                host[i] = save + h; b.Upload(p, host); double fp = LossAt();
                host[i] = save - h; b.Upload(p, host); double fm = LossAt();
                host[i] = save; b.Upload(p, host);
                numeric[k] = (fp - fm) / (2.0 * h);
                analytic[k] = a;
            }
            double worst = 0, largest = 0;
            for (int k = 0; k < numeric.Length; k++) { worst = Math.Max(worst, Math.Abs(numeric[k] - analytic[k])); largest = Math.Max(largest, Math.Abs(analytic[k])); }
            _out.WriteLine($"{method} on {backendName}: {checks.Count} checks, max |grad| {largest:G3}, max abs err {worst:G3}");
            Assert.True(largest > 1e-3, $"{method}: gradients are all ~0 ({largest:G3}); the check would prove nothing");
            NumericAssert.Close(numeric, analytic, 4e-4, 2e-2, $"{method} finite differences ({checks.Count} entries: {string.Join(", ", checks.Take(3).Select(x => x.What))}...)");
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>A bottleneck adapter whose up projection and bias are 0 is the identity: same loss as the bare model.</summary>
    [Fact]
    public void Bottleneck_WithZeroUp_IsTheIdentity()
    {
        var b = ModelBackends.Get("cpu");
        var cfg = Config(false);
        var owned = new List<Tensor>();
        using var w = RandomWeights(cfg, b, 3);
        using var model = new LlamaModel(w, b);
        try
        {
            var (tok, tgt) = Data(2, 6, cfg.VocabSize, 1);
            double bare = model.Loss(tok, tgt, 2, 6).LossSum;
            var ps = Attach(Method.Bottleneck, model, b, owned, 2);
            double random = model.Loss(tok, tgt, 2, 6).LossSum;
            foreach (var (name, p, _) in ps) if (name.Contains(".up")) b.Fill(p, 0);
            double zeroUp = model.Loss(tok, tgt, 2, 6).LossSum;
            Assert.Equal(bare, zeroUp, 5);
            Assert.True(Math.Abs(random - bare) > 1e-3, "random adapters should change the loss");
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>
    /// A virtual token equal to the embedding of a real token x0 is exactly a sequence that starts with x0:
    /// prompt-tuned loss on (B, T) tokens = the bare model's loss on x0 + tokens (virtual rows at positions 0..P-1).
    /// </summary>
    [Fact]
    public void Prompt_EqualToRealTokenEmbeddings_MatchesTheLongerSequence()
    {
        var b = ModelBackends.Get("cpu");
        var cfg = Config(true);
        var owned = new List<Tensor>();
        using var w = RandomWeights(cfg, b, 4);
        using var model = new LlamaModel(w, b);
        try
        {
            int[] virt = { 3, 11 };
            const int B = 2, T = 5, P = 2;
            var (tok, tgt) = Data(B, T, cfg.VocabSize, 2);
            var longTok = new int[B * (P + T)];
            var longTgt = new int[B * (P + T)];
            for (int r = 0; r < B; r++)
            {
                for (int i = 0; i < P; i++) { longTok[r * (P + T) + i] = virt[i]; longTgt[r * (P + T) + i] = LlamaModel.IgnoreIndex; }
                for (int i = 0; i < T; i++) { longTok[r * (P + T) + P + i] = tok[r * T + i]; longTgt[r * (P + T) + P + i] = tgt[r * T + i]; }
            }
            var (expected, n1) = model.Loss(longTok, longTgt, B, P + T);
            var table = w.Embedding.ToArray();
            var e = b.Allocate(DType.F32, P, cfg.HiddenSize); owned.Add(e);
            b.Upload(e, virt.SelectMany(t => table.Skip(t * cfg.HiddenSize).Take(cfg.HiddenSize)).ToArray());
            model.Prompt = new PromptSlot(e, Zeros(b, owned, P, cfg.HiddenSize));
            var (actual, n2) = model.Loss(tok, tgt, B, T);
            Assert.Equal(n1, n2);
            Assert.Equal(expected, actual, 4);
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>
    /// Transformers' semantics of a prefix (PEFT passes it as past_key_values): it is a KV cache. Prefix = the
    /// KV-cache rows an InferenceSession holds after prefilling P real tokens (keys rotated at 0..P-1, as a cache
    /// holds them) ⇒ the prefix-tuned loss of the next T tokens equals the bare model's loss on all P + T tokens
    /// (minus the first P rows' losses). Proves the real tokens sit at positions P..P+T-1 and the prefix keys get
    /// no further rotation.
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Prefix_EqualToTheKvCacheOfRealTokens_MatchesTheLongerSequence(bool tied)
    {
        var b = ModelBackends.Get("cpu");
        var cfg = Config(tied);
        var owned = new List<Tensor>();
        using var w = RandomWeights(cfg, b, 6);
        using var model = new LlamaModel(w, b);
        try
        {
            int[] pre = { 5, 1, 17 };
            const int T = 6, P = 3;
            var (tok, tgt) = Data(1, T, cfg.VocabSize, 8);
            var longTok = pre.Concat(tok).ToArray();
            var longTgt = Enumerable.Repeat(LlamaModel.IgnoreIndex, P).Concat(tgt).ToArray();
            var (expected, _) = model.Loss(longTok, longTgt, 1, P + T);

            var values = b.Allocate(DType.F32, cfg.NumLayers, 2, P, cfg.KvDim); owned.Add(values);
            using (var session = new InferenceSession(w, b, 16))
            {
                session.Prefill(pre);
                var host = new float[values.Length];
                for (int l = 0; l < cfg.NumLayers; l++)
                    for (int kind = 0; kind < 2; kind++)
                        session.CacheRows(l, kind, P).CopyTo(host.AsSpan((l * 2 + kind) * P * cfg.KvDim, P * cfg.KvDim));
                b.Upload(values, host);
            }
            model.Prefix = new PrefixSlot(values, Zeros(b, owned, cfg.NumLayers, 2, P, cfg.KvDim), cfg.NumLayers);
            var (actual, _) = model.Loss(tok, tgt, 1, T);
            Assert.Equal(expected, actual, 4);
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>One training step of each method on the ILGPU simulator (warp 4) equals the plain backend: loss and every gradient.</summary>
    [Theory]
    [InlineData(Method.Prompt)]
    [InlineData(Method.Prefix)]
    [InlineData(Method.Bottleneck)]
    public void SimulatorStep_MatchesPlain(Method method)
    {
        const int B = 2, T = 4;
        var cfg = Config(false);
        var results = new List<(double Loss, List<float[]> Grads)>();
        foreach (var name in new[] { "plain", "ilgpu-sim:4" })
        {
            var b = ModelBackends.Get(name);
            var owned = new List<Tensor>();
            using var w = RandomWeights(cfg, b, 3);
            using var model = new LlamaModel(w, b);
            try
            {
                var ps = Attach(method, model, b, owned, 5);
                var (tok, tgt) = Data(B, T, cfg.VocabSize, 7);
                var (loss, _) = model.ForwardBackward(tok, tgt, B, T, 0.1f, 1);
                results.Add((loss, ps.Select(p => p.Grad.ToArray()).ToList()));
            }
            finally { owned.ForEach(t => t.Dispose()); }
        }
        Assert.Equal(results[0].Loss, results[1].Loss, 3);
        for (int i = 0; i < results[0].Grads.Count; i++)
            NumericAssert.Close(GradCheck.ToDouble(results[0].Grads[i]), results[1].Grads[i], 1e-5, 1e-3, $"{method} gradient {i}");
    }

    /// <summary>
    /// bf16 attention (LlamaModel.AttentionDType) with each method: the prefix's K/V rows are stored in bf16 with the
    /// sequence's own. The simulator (SIMT kernels widening bf16) matches the CPU backend (f32 summation order; 1e-4
    /// relative on the loss, 1e-4 + 1e-2 on the gradients, room for a rare bf16 rounding flip of one q/k/v element
    /// between backends); the CPU step is close to f32 attention (bf16 tolerance); the workspace is what the plan says.
    /// </summary>
    [Theory]
    [InlineData(Method.Prompt)]
    [InlineData(Method.Prefix)]
    [InlineData(Method.Bottleneck)]
    public void Bf16Attention_SimulatorMatchesCpu_AndIsCloseToF32(Method method)
    {
        const int B = 2, T = 4;
        var cfg = Config(false);
        var results = new List<(double Loss, List<float[]> Grads)>();
        foreach (var (name, attention) in new[] { ("cpu", DType.BF16), ("ilgpu-sim:4", DType.BF16), ("cpu", DType.F32) })
        {
            var b = ModelBackends.Get(name);
            var owned = new List<Tensor>();
            using var w = RandomWeights(cfg, b, 3);
            using var model = new LlamaModel(w, b) { AttentionDType = attention };
            try
            {
                var ps = Attach(method, model, b, owned, 5);
                var (tok, tgt) = Data(B, T, cfg.VocabSize, 7);
                var (loss, _) = model.ForwardBackward(tok, tgt, B, T, 0.1f, 1);
                results.Add((loss, ps.Select(p => p.Grad.ToArray()).ToList()));
                Assert.Equal(model.WorkspaceBytes, FineTuneNative.Peft.Training.MemoryPlan.Activations(model, B, T, shared: false));
            }
            finally { owned.ForEach(t => t.Dispose()); }
        }
        Assert.Equal(results[0].Loss, results[1].Loss, 1e-4 * Math.Abs(results[0].Loss));
        Assert.Equal(results[2].Loss, results[0].Loss, Tolerance.BF16.Rtol * Math.Abs(results[2].Loss));
        for (int i = 0; i < results[0].Grads.Count; i++)
        {
            NumericAssert.Close(GradCheck.ToDouble(results[0].Grads[i]), results[1].Grads[i], 1e-4, 1e-2, $"{method} gradient {i}: cpu vs simulator");
            double max = results[2].Grads[i].Max(x => Math.Abs((double)x));
            NumericAssert.Close(GradCheck.ToDouble(results[2].Grads[i]), results[0].Grads[i], 3e-2 * max, 3e-2, $"{method} gradient {i}: f32 vs bf16 attention");
        }
    }

    /// <summary>With activation checkpointing (layers recomputed in the backward) each method's loss and gradients are bit-identical.</summary>
    [Theory]
    [InlineData(Method.Prompt)]
    [InlineData(Method.Prefix)]
    [InlineData(Method.Bottleneck)]
    public void ActivationCheckpointing_GivesTheSameStep(Method method)
    {
        const int B = 2, T = 6;
        var b = ModelBackends.Get("cpu");
        var cfg = Config(false);
        var results = new List<(double Loss, List<float[]> Grads)>();
        foreach (bool ckpt in new[] { false, true })
        {
            var owned = new List<Tensor>();
            using var w = RandomWeights(cfg, b, 3);
            using var model = new LlamaModel(w, b) { ActivationCheckpointing = ckpt };
            try
            {
                var ps = Attach(method, model, b, owned, 5);
                var (tok, tgt) = Data(B, T, cfg.VocabSize, 7);
                var (loss, _) = model.ForwardBackward(tok, tgt, B, T, 0.1f, 1);
                results.Add((loss, ps.Select(p => p.Grad.ToArray()).ToList()));
            }
            finally { owned.ForEach(t => t.Dispose()); }
        }
        Assert.Equal(results[0].Loss, results[1].Loss);
        for (int i = 0; i < results[0].Grads.Count; i++) Assert.Equal(results[0].Grads[i], results[1].Grads[i]);
    }
}
