using FineTuneNative.Kernels;
using Xunit.Abstractions;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Runtime.Model;

/// <summary>
/// The training forward/backward of <see cref="LlamaModel"/> on tiny configurations (C=16, NH=4, NKV=2, HS=4,
/// F=24, L=2, V=37, B=2, T=5), against (1) tests/Fixtures/tiny_lora_step.json, an independent float64 torch
/// implementation with autograd (tests/reference/tiny_lora_step.py), and (2) central finite differences of the
/// model's own loss. Fixture cases: "untied_bias_rotatehalf" (untied head, q/k/v biases, HF rotate-half RoPE,
/// LoRA r=2 on all seven linears, no dropout) and "tied_interleaved_dropout" (tied embeddings, no biases,
/// interleaved RoPE with theta 500, LoRA r=3 on q, v, o, up, down with dropout 0.25).
/// Backends: "plain" (the naive PlainBackend in this folder, isolating model bugs from kernel bugs), "cpu" and
/// the ILGPU simulator ("ilgpu-sim:32").
/// </summary>
public class LlamaModelTests
{
    private readonly ITestOutputHelper _out;

    public LlamaModelTests(ITestOutputHelper output) => _out = output;

    /// <summary>NumericAssert.Close, logging the worst absolute and relative error (visible with a detailed logger).</summary>
    /// <summary>Gradient comparison: atol = GradAtolOfMax·max|expected|, rtol = GradRtol.</summary>
    private void CloseGrad(ReadOnlySpan<double> expected, ReadOnlySpan<float> actual, string what)
    {
        double maxE = 0;
        foreach (double e in expected) maxE = Math.Max(maxE, Math.Abs(e));
        Close(expected, actual, GradAtolOfMax * maxE, GradRtol, what);
    }

    private void Close(ReadOnlySpan<double> expected, ReadOnlySpan<float> actual, double atol, double rtol, string what)
    {
        double maxAbs = 0, maxE = 0;
        for (int i = 0; i < expected.Length && i < actual.Length; i++)
        {
            maxAbs = Math.Max(maxAbs, Math.Abs(expected[i] - actual[i]));
            maxE = Math.Max(maxE, Math.Abs(expected[i]));
        }
        _out.WriteLine($"{what}: max abs err {maxAbs:G3}, max |expected| {maxE:G3}, ratio {maxAbs / Math.Max(maxE, 1e-30):G3}");
        NumericAssert.Close(expected, actual, atol, rtol, what);
    }

    private void Close(double expected, double actual, double atol, double rtol, string what)
    {
        _out.WriteLine($"{what}: expected {expected:G10} actual {actual:G10} (rel err {Math.Abs(expected - actual) / Math.Abs(expected):G3})");
        NumericAssert.Close(new[] { expected }, new[] { actual }, atol, rtol, what);
    }

    public static readonly string[] BackendNames = { "plain", "cpu", "ilgpu-sim:32" };

    public static IEnumerable<object[]> BackendsAndCases() =>
        from b in BackendNames from c in TinyLoraCase.Names select new object[] { b, c };

    public static IEnumerable<object[]> AllBackends() => BackendNames.Select(b => new object[] { b });

    // The ILGPU simulator needs ~8-16 s for one step of this tiny model (measured 20:35 after its 64-thread row
    // groups landed; ~60 s before), so the tests with hundreds of steps (finite differences) and the per-token
    // loop of the eval-loss test (10 passes) run on "plain" and "cpu" only.

    /// <summary>
    /// f32 model against a float64 reference on the same f32 weights. Gradients (of the mean loss) are compared
    /// per tensor with atol = GradAtolOfMax·max|expected| and rtol = GradRtol: single-precision rounding errors
    /// scale with the tensor's largest entries, not with each element. Measured worst error over all tensors, as a
    /// fraction of the tensor's max |gradient| (gradients up to 1.3 in the dropout case): plain 1.2e-6, cpu 3.6e-6,
    /// ilgpu-sim:32 3.4e-6; loss sum relative error: plain 8e-9, cpu 3e-8, ilgpu-sim:32 1e-7. 2e-5 leaves ~5x margin
    /// and still fails on any wiring error (those are of the size of the gradient itself).
    /// </summary>
    private const double GradAtolOfMax = 2e-5, GradRtol = 1e-4, LossRtol = 1e-5;

    [Theory]
    [MemberData(nameof(BackendsAndCases))]
    public void LoraStep_MatchesTorchFixture(string backendName, string caseName)
    {
        var fx = TinyLoraCase.Get(caseName);
        var b = ModelBackends.Get(backendName);
        var owned = new List<Tensor>();
        using var model = fx.Build(b, out var weights, owned);
        using var _ = weights;
        try
        {
            model.LogitsChunkRows = 3; // 10 rows -> chunks 3, 3, 3, 1: the ragged last chunk is exercised
            var (loss, count) = model.ForwardBackward(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen, fx.LossScale, fx.DropoutSeed);
            Assert.Equal(fx.Count, count);
            Close(fx.LossSum, loss, 0, LossRtol, $"{caseName} loss sum");
            AssertLoraGrads(fx, model, caseName);
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    [Theory]
    [MemberData(nameof(BackendsAndCases))]
    public void FullStep_TrainBase_MatchesTorchFixture(string backendName, string caseName)
    {
        var fx = TinyLoraCase.Get(caseName);
        var b = ModelBackends.Get(backendName);
        var owned = new List<Tensor>();
        using var model = fx.Build(b, out var weights, owned);
        using var _ = weights;
        try
        {
            model.TrainBase = true;
            model.LogitsChunkRows = 4;
            var (loss, count) = model.ForwardBackward(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen, fx.LossScale, fx.DropoutSeed);
            Assert.Equal(fx.Count, count);
            Close(fx.LossSum, loss, 0, LossRtol, $"{caseName} loss sum");
            AssertLoraGrads(fx, model, caseName);
            int seen = 0;
            foreach (var (name, _, grad) in model.BaseParameters())
            {
                Assert.True(fx.BaseGrads.TryGetValue(name, out var expected), $"fixture has no gradient for {name}");
                CloseGrad(expected, grad.ToArray(), $"{caseName} d {name}");
                seen++;
            }
            Assert.Equal(fx.BaseGrads.Count, seen);
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    private void AssertLoraGrads(TinyLoraCase fx, LlamaModel model, string caseName)
    {
        int slots = 0;
        for (int l = 0; l < fx.Config.NumLayers; l++)
            foreach (var module in fx.LoraModules)
            {
                var s = model.GetLora(l, module)!;
                CloseGrad(fx.LoraGrads[TinyLoraCase.LoraName(l, module, 'A')], s.DA.ToArray(), $"{caseName} dA layer {l} {module}");
                CloseGrad(fx.LoraGrads[TinyLoraCase.LoraName(l, module, 'B')], s.DB.ToArray(), $"{caseName} dB layer {l} {module}");
                slots++;
            }
        Assert.Equal(fx.LoraGrads.Count, 2 * slots);
    }

    /// <summary>
    /// Eval loss: the sum and count equal the fixture; keeping one target at a time (all others -100) gives that
    /// token's loss alone, so every ignored row contributes exactly nothing; all ignored gives (0, 0).
    /// </summary>
    [Theory]
    [MemberData(nameof(AllBackends))]
    public void Loss_PerTokenSumAndIgnoreIndex_MatchFixture(string backendName)
    {
        var fx = TinyLoraCase.Get("untied_bias_rotatehalf"); // no dropout: eval loss == training loss
        var b = ModelBackends.Get(backendName);
        var owned = new List<Tensor>();
        using var model = fx.Build(b, out var weights, owned);
        using var _ = weights;
        try
        {
            var (loss, count) = model.Loss(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen);
            Assert.Equal(fx.Count, count);
            Close(fx.LossSum, loss, 0, LossRtol, "eval loss sum");

            var one = new int[fx.Targets.Length];
            var perToken = new double[one.Length];
            // per token: 10 eval passes, too slow on the simulator (see above); all-ignored runs everywhere
            for (int i = 0; i < one.Length && !TestBackends.IsSimulator(backendName); i++)
            {
                Array.Fill(one, LlamaModel.IgnoreIndex);
                one[i] = fx.Targets[i];
                var (li, ci) = model.Loss(fx.Tokens, one, fx.Batch, fx.SeqLen);
                Assert.Equal(fx.Targets[i] == LlamaModel.IgnoreIndex ? 0 : 1, ci);
                perToken[i] = li;
            }
            if (!TestBackends.IsSimulator(backendName))
                NumericAssert.Close(fx.TokenLosses, perToken, 1e-5, 1e-5, "per-token losses");

            Array.Fill(one, LlamaModel.IgnoreIndex);
            Assert.Equal((0.0, 0), model.Loss(fx.Tokens, one, fx.Batch, fx.SeqLen));
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>
    /// The accumulation contract: two micro-batches (one sequence each) with lossScale 1/N accumulate the same
    /// LoRA and base gradients as one batch of both with the same lossScale; losses and counts add up.
    /// </summary>
    [Theory]
    [MemberData(nameof(AllBackends))]
    public void GradientAccumulation_TwoMicroBatchesEqualOneBatch(string backendName)
    {
        var fx = TinyLoraCase.Get("untied_bias_rotatehalf"); // no dropout: masks would depend on the row layout
        var b = ModelBackends.Get(backendName);
        var owned = new List<Tensor>();
        using var whole = fx.Build(b, out var w1, owned);
        using var split = fx.Build(b, out var w2, owned);
        using var d1 = w1;
        using var d2 = w2;
        try
        {
            whole.TrainBase = split.TrainBase = true;
            var (lw, cw) = whole.ForwardBackward(fx.Tokens, fx.Targets, 2, fx.SeqLen, fx.LossScale, 7);
            int t = fx.SeqLen;
            var (l0, c0) = split.ForwardBackward(fx.Tokens.AsSpan(0, t), fx.Targets.AsSpan(0, t), 1, t, fx.LossScale, 7);
            var (l1, c1) = split.ForwardBackward(fx.Tokens.AsSpan(t, t), fx.Targets.AsSpan(t, t), 1, t, fx.LossScale, 7);
            Assert.Equal(cw, c0 + c1);
            NumericAssert.Close(new[] { lw }, new[] { l0 + l1 }, 1e-5, 1e-6, "loss sum");
            foreach (var ((ln, s1), (_, s2)) in whole.LoraSlots().Select(x => (x.Module + x.Layer, x.Slot)).Zip(split.LoraSlots().Select(x => (x.Module, x.Slot))))
            {
                NumericAssert.Close(s1.DA.ToArray(), s2.DA.ToArray(), 1e-7, 1e-5, $"dA {ln}");
                NumericAssert.Close(s1.DB.ToArray(), s2.DB.ToArray(), 1e-7, 1e-5, $"dB {ln}");
            }
            foreach (var ((name, _, g1), (_, _, g2)) in whole.BaseParameters().Zip(split.BaseParameters()))
                NumericAssert.Close(g1.ToArray(), g2.ToArray(), 1e-7, 1e-5, $"d {name}");
            // and the split model's gradients really are sums: they are not all zero, and ZeroGrad clears them
            Assert.Contains(split.LoraSlots().First().Slot.DA.ToArray(), x => x != 0);
            split.ZeroGrad();
            Assert.All(split.LoraSlots(), s => Assert.All(s.Slot.DB.ToArray(), x => Assert.Equal(0f, x)));
            Assert.All(split.BaseParameters(), p => Assert.Equal(0.0, b.SumOfSquares(p.Grad)));
        }
        finally { owned.ForEach(x => x.Dispose()); }
    }

    /// <summary>
    /// Gradients against central finite differences of the model's own f32 loss (the mean over counted tokens,
    /// with the same dropout seed): every 3rd LoRA A/B element of every slot, and 3 elements of every base tensor
    /// (TrainBase). The loss is f32 (rounding ~1e-6 over the whole forward), so h = 1e-2: rounding contributes
    /// ~1e-6/h = 1e-4 and truncation h^2 f'''/6. Measured on "plain": max abs error 1.2e-4 (untied case, gradients
    /// up to ~0.1) and 3.7e-3 (dropout case, gradients up to 1.3, where the third derivative is larger);
    /// tolerance atol 4e-4 + rtol 2e-2. Wiring errors give errors of the gradient's own size (checked by mutation:
    /// a forward rotation in RoPE's backward fails 210 of 395 checks). Not run on the ILGPU simulator (hundreds of
    /// forward passes).
    /// </summary>
    [Theory]
    [InlineData("plain", "untied_bias_rotatehalf")]
    [InlineData("plain", "tied_interleaved_dropout")]
    [InlineData("cpu", "untied_bias_rotatehalf")]
    [InlineData("cpu", "tied_interleaved_dropout")]
    public void Gradients_MatchFiniteDifferences(string backendName, string caseName)
    {
        const float h = 1e-2f;
        var fx = TinyLoraCase.Get(caseName);
        var b = ModelBackends.Get(backendName);
        var owned = new List<Tensor>();
        using var model = fx.Build(b, out var weights, owned);
        using var _ = weights;
        try
        {
            model.TrainBase = true;
            model.ForwardBackward(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen, fx.LossScale, fx.DropoutSeed);
            var checks = new List<(string What, Tensor Param, int Index, float Analytic)>();
            foreach (var (layer, module, s) in model.LoraSlots())
            {
                float[] da = s.DA.ToArray(), db = s.DB.ToArray();
                for (int i = 0; i < da.Length; i += 3) checks.Add(($"A {layer}.{module}[{i}]", s.A, i, da[i]));
                for (int i = 1; i < db.Length; i += 3) checks.Add(($"B {layer}.{module}[{i}]", s.B, i, db[i]));
            }
            var rng = new Random(17);
            foreach (var (name, param, grad) in model.BaseParameters())
            {
                var g = grad.ToArray();
                for (int j = 0; j < 3; j++)
                {
                    // the embedding: only rows of tokens that occur have a gradient; sample those
                    int i = name == "model.embed_tokens.weight"
                        ? fx.Tokens[rng.Next(fx.Tokens.Length)] * fx.Config.HiddenSize + rng.Next(fx.Config.HiddenSize)
                        : rng.Next(g.Length);
                    checks.Add(($"{name}[{i}]", param, i, g[i]));
                }
            }

            double LossAt() => model.ForwardBackward(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen, 0f, fx.DropoutSeed).LossSum * fx.LossScale;
            var numeric = new double[checks.Count];
            var analytic = new double[checks.Count];
            for (int c = 0; c < checks.Count; c++)
            {
                var (_, p, i, a) = checks[c];
                var host = p.ToArray();
                float save = host[i];
                host[i] = save + h; b.Upload(p, host); double fp = LossAt();
                host[i] = save - h; b.Upload(p, host); double fm = LossAt();
                host[i] = save; b.Upload(p, host);
                numeric[c] = (fp - fm) / (2.0 * h);
                analytic[c] = a;
            }
            double worst = 0;
            for (int c = 0; c < numeric.Length; c++) worst = Math.Max(worst, Math.Abs(numeric[c] - analytic[c]));
            _out.WriteLine($"{caseName}: {checks.Count} finite-difference checks, max abs err {worst:G3}");
            NumericAssert.Close(numeric, analytic, 4e-4, 2e-2,
                $"{caseName} finite differences ({checks.Count} parameters: {string.Join(", ", checks.Take(3).Select(x => x.What))}...)");
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>
    /// bf16 linear weights (converted to f32 inside the kernels) give the same step as an f32 model holding the
    /// same bf16-rounded values: loss, LoRA and base gradients agree to f32 rounding (both sides compute the same
    /// f32 math; only the weight load differs). Case with dropout, tied head, TrainBase.
    /// </summary>
    [Theory]
    [InlineData("plain")]
    [InlineData("cpu")]
    public void Bf16LinearWeights_MatchF32ModelOnRoundedWeights(string backendName)
    {
        var fx = TinyLoraCase.Get("tied_interleaved_dropout");
        var b = ModelBackends.Get(backendName);
        var owned = new List<Tensor>();
        using var bf = fx.Build(b, out var w1, owned, DType.BF16);
        using var f32 = fx.Build(b, out var w2, owned, DType.F32, roundLinearsToBf16: true);
        using var d1 = w1;
        using var d2 = w2;
        try
        {
            Assert.Equal(DType.BF16, w1.Layers[0].Wq.DType);
            bf.TrainBase = f32.TrainBase = true;
            var (l1, _) = bf.ForwardBackward(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen, fx.LossScale, fx.DropoutSeed);
            var (l2, _) = f32.ForwardBackward(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen, fx.LossScale, fx.DropoutSeed);
            Close(l2, l1, 0, 1e-6, "bf16 vs rounded f32 loss");
            // the rounding is real: the bf16 model's loss differs from the f32 fixture's
            Assert.True(Math.Abs(l1 - fx.LossSum) > 1e-4, $"bf16 loss {l1} equals the f32 loss {fx.LossSum}: were the weights really bf16?");
            foreach (var ((_, _, s1), (_, _, s2)) in bf.LoraSlots().Zip(f32.LoraSlots()))
            {
                Close(GradCheck.ToDouble(s2.DA.ToArray()), s1.DA.ToArray(), 1e-6, 1e-4, "dA");
                Close(GradCheck.ToDouble(s2.DB.ToArray()), s1.DB.ToArray(), 1e-6, 1e-4, "dB");
            }
            foreach (var ((name, _, g1), (_, _, g2)) in bf.BaseParameters().Zip(f32.BaseParameters()))
                Close(GradCheck.ToDouble(g2.ToArray()), g1.ToArray(), 1e-6, 1e-4, $"d {name}");
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>Bad input names what is wrong.</summary>
    [Fact]
    public void BadInput_IsRejectedWithAClearMessage()
    {
        var fx = TinyLoraCase.Get("untied_bias_rotatehalf");
        var b = ModelBackends.Get("plain");
        var owned = new List<Tensor>();
        using var model = fx.Build(b, out var weights, owned);
        using var _ = weights;
        var bad = (int[])fx.Targets.Clone();
        bad[3] = fx.Config.VocabSize;
        var e = Assert.Throws<ArgumentException>(() => model.Loss(fx.Tokens, bad, fx.Batch, fx.SeqLen));
        Assert.Contains("targets[3]", e.Message);
        e = Assert.Throws<ArgumentException>(() => model.Loss(fx.Tokens, fx.Targets, fx.Batch, fx.SeqLen + 1));
        Assert.Contains("batch·seqLen", e.Message);
        var wrongA = b.Allocate(DType.F32, 2, 5);
        owned.Add(wrongA);
        var slot = model.GetLora(0, "q_proj")!;
        e = Assert.Throws<ArgumentException>(() => model.SetLora(0, "q_proj", new LoraSlot(wrongA, slot.B, wrongA, slot.DB, 1, 0)));
        Assert.Contains("model.layers.0.self_attn.q_proj", e.Message);
        Assert.Throws<ArgumentException>(() => model.SetLora(0, "qkv", null));
        Assert.Throws<InvalidOperationException>(() => model.BaseParameters().ToList());
        owned.ForEach(t => t.Dispose());
    }
}
