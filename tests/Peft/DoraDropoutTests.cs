using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// DoRA with LoRA dropout, PEFT's form (base on x, the magnitude/direction path on drop(x)): one linear against the
/// double reference (forward) and against central finite differences of that reference with the norm held constant
/// (backward: dx, dA, dB, dm); then a whole model's gradients against finite differences of its training loss with the
/// same dropout masks.
/// </summary>
[Collection("PeftModel")]
public class DoraDropoutTests(ITestOutputHelper output)
{
    private static double[] Rand(Random rng, int n, double s) => Enumerable.Range(0, n).Select(_ => (rng.NextDouble() * 2 - 1) * s).ToArray();
    private static float[] F(double[] a) => a.Select(v => (float)v).ToArray();

    [Theory]
    [InlineData(5, 6, 7, 2, 0.3f, false)]
    [InlineData(4, 9, 5, 3, 0.5f, true)]
    public void Linear_forward_matches_pefts_form_and_backward_matches_finite_differences(int m, int n, int k, int r, float p, bool withBias)
    {
        var b = PeftBackend.Cpu;
        var rng = new Random(m * 100 + n);
        double[] x = Rand(rng, m * k, 1), w = Rand(rng, n * k, 0.5), a = Rand(rng, r * k, 0.5), bb = Rand(rng, n * r, 0.5), dy = Rand(rng, m * n, 1);
        double[]? bias = withBias ? Rand(rng, n, 0.3) : null;
        const double scale = 1.5;
        const ulong seed = 0x1234;
        var norm = DoraReference.WeightNorm(w, a, bb, scale, n, k, r);
        var mag = norm.Select(v => v * (1 + (rng.NextDouble() - 0.5) * 0.6)).ToArray();

        var owned = new List<Tensor>();
        Tensor T(double[] v, params int[] shape) { var t = b.Allocate(DType.F32, shape); owned.Add(t); b.Upload(t, F(v)); return t; }
        Tensor Z(params int[] shape) { var t = b.Allocate(DType.F32, shape); owned.Add(t); b.Fill(t, 0f); return t; }
        try
        {
            var slot = new LoraSlot
            {
                A = T(a, r, k), B = T(bb, n, r), DA = Z(r, k), DB = Z(n, r), Scale = (float)scale, Dropout = p,
                Magnitude = T(mag, n), DMagnitude = Z(n), WeightNorm = Z(n),
            };
            var xT = T(x, m, k); var wT = T(w, n, k); var yT = Z(m, n); var u = Z(m, r); var zT = Z(m, n);
            var xd = Z(m, k); var scratch = Z(m * Math.Max(n, k)); var g = Z(m, r); var dx = Z(m, k); var dyT = T(dy, m, n);
            var biasT = bias is null ? null : T(bias, n);
            var lp = new LoraParams(slot.A, slot.B, slot.Scale, p, seed);
            DoraLinear.Forward(b, yT, xT, wT, biasT, slot, lp, u, zT, xd, scratch, m, n, k);
            var yRef = DoraReference.ForwardDropout(x, w, bias, a, bb, mag, norm, scale, p, seed, m, n, k, r);
            NumericAssert.Close(yRef, yT.ToArray().Select(v => (double)v).ToArray(), 2e-5, 2e-4, "DoRA-dropout forward vs PEFT's form");
            // the no-dropout DoRA on the same input differs (the check sees the dropout)
            var (yNoDrop, _, _) = DoraReference.Forward(x, w, bias, a, bb, mag, scale, m, n, k, r);
            Assert.True(yRef.Zip(yNoDrop).Max(t => Math.Abs(t.First - t.Second)) > 1e-2);

            // parameter gradients accumulate: pre-fill
            b.Upload(slot.DA, Enumerable.Repeat(0.5f, r * k).ToArray());
            b.Upload(slot.DB, Enumerable.Repeat(0.5f, n * r).ToArray());
            b.Upload(slot.DMagnitude!, Enumerable.Repeat(0.5f, n).ToArray());
            b.Upload(dx, Enumerable.Repeat(7f, m * k).ToArray());   // overwritten (accumulate: false)
            DoraLinear.Backward(b, dx, dyT, xT, wT, slot, lp, u, zT, g, xd, scratch, m, n, k, accumulate: false);

            // central differences of L = Σ dy ⊙ y_ref in double, the norm constant (PEFT detaches it)
            double L(double[] xx, double[] aa, double[] bbb, double[] mm) =>
                DoraReference.ForwardDropout(xx, w, bias, aa, bbb, mm, norm, scale, p, seed, m, n, k, r).Zip(dy).Sum(t => t.First * t.Second);
            double[] Fd(double[] v, Func<double[], double> f)
            {
                const double h = 1e-5;
                var res = new double[v.Length];
                for (int i = 0; i < v.Length; i++)
                {
                    double s0 = v[i];
                    v[i] = s0 + h; double fp = f(v);
                    v[i] = s0 - h; double fm = f(v);
                    v[i] = s0;
                    res[i] = (fp - fm) / (2 * h);
                }
                return res;
            }
            var ndx = Fd(x, xx => L(xx, a, bb, mag));
            var nda = Fd(a, aa => L(x, aa, bb, mag));
            var ndb = Fd(bb, bv => L(x, a, bv, mag));
            var ndm = Fd(mag, mm => L(x, a, bb, mm));
            double[] D(Tensor t, float minus) => t.ToArray().Select(v => (double)v - minus).ToArray();
            NumericAssert.Close(ndx, D(dx, 0), 1e-4, 1e-3, "dx");
            NumericAssert.Close(nda, D(slot.DA, 0.5f), 1e-4, 1e-3, "dA");
            NumericAssert.Close(ndb, D(slot.DB, 0.5f), 1e-4, 1e-3, "dB");
            NumericAssert.Close(ndm, D(slot.DMagnitude!, 0.5f), 1e-4, 1e-3, "dMagnitude");
            Assert.Contains(ndx, v => Math.Abs(v) > 1e-2);
            output.WriteLine($"m={m} n={n} k={k} r={r} p={p}: forward and {ndx.Length + nda.Length + ndb.Length + ndm.Length} gradient entries match");
        }
        finally { owned.ForEach(t => t.Dispose()); }
    }

    /// <summary>
    /// A DoRA adapter with lora_dropout 0.25 on a whole model: A, B and the magnitude against central differences of the
    /// training loss (same dropout seed, so the same masks; the magnitude rescaled so m/norm stays fixed when A or B move,
    /// as the detached norm has it). Evaluation (no dropout) differs from training.
    /// </summary>
    [Fact]
    public void Model_gradients_with_dropout_match_finite_differences()
    {
        const float h = 1e-2f;
        var cpu = PeftBackend.Cpu;
        using var w = TinyModel.Weights(cpu, seed: 4);
        using var model = new LlamaModel(w, cpu);
        var cfg = new LoraConfig { Rank = 3, Alpha = 6, Dropout = 0.25f, UseDora = true, TargetModules = ["q_proj", "v_proj", "up_proj", "down_proj"] };
        using var adapter = LoraAdapter.Create(model, cfg, seed: 9);
        ulong state = 77;
        float U() => (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) - 0.5);
        foreach (var md in adapter.Modules)
        {
            cpu.Upload(md.Slot.B, Enumerable.Range(0, (int)md.Slot.B.Length).Select(_ => U() * 0.3f).ToArray());
            cpu.Upload(md.Slot.Magnitude!, md.Slot.Magnitude!.ToArray().Select(v => v * (1 + U() * 0.4f)).ToArray());
        }
        var batch = Batching.Pad(TinyModel.Samples(3, 6, 10, seed: 8).ToArray(), 3, 10, 0);
        float lossScale = 1f / batch.TargetCount;
        const ulong dropSeed = 5;
        adapter.ZeroGrad();
        double trainLoss = model.ForwardBackward(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen, lossScale, dropSeed).LossSum * lossScale;
        double evalLoss = model.Loss(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen).LossSum * lossScale;
        Assert.True(Math.Abs(trainLoss - evalLoss) > 1e-4, "dropout does not act in training");
        var grads = adapter.Modules.Select(md => (md, A: md.Slot.DA.ToArray(), B: md.Slot.DB.ToArray(), M: md.Slot.DMagnitude!.ToArray())).ToList();
        double LossAt() => model.ForwardBackward(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen, lossScale, dropSeed).LossSum * lossScale;
        Assert.Equal(trainLoss, LossAt());   // same seed, same masks

        var numeric = new List<double>();
        var analytic = new List<double>();
        using var normTmp = cpu.Allocate(DType.F32, 64);
        foreach (var (md, ga, gb, gm) in grads)
        {
            var s = md.Slot;
            var weight = w.Layers[md.Layer].Linear(md.Module);
            float[] Norm()
            {
                var t = normTmp.View(0, md.Out);
                cpu.DoraWeightNorm(t, weight, s.A, s.B, s.Scale, md.Out, md.In, s.Rank);
                return t.ToArray();
            }
            var norm0 = Norm();
            var mag0 = s.Magnitude!.ToArray();
            foreach (var (name, p, grad, step) in new[] { ("A", s.A, ga, 7), ("B", s.B, gb, 5), ("m", s.Magnitude!, gm, 3) })
            {
                for (int i = md.Layer % step; i < p.Length; i += step)
                {
                    var host = p.ToArray();
                    float save = host[i];
                    double Side(float v)
                    {
                        host[i] = v;
                        cpu.Upload(p, host);
                        if (name != "m")
                        {
                            var n1 = Norm();
                            cpu.Upload(s.Magnitude!, mag0.Select((x, j) => x * n1[j] / norm0[j]).ToArray());
                        }
                        return LossAt();
                    }
                    double fp = Side(save + h), fm = Side(save - h);
                    host[i] = save;
                    cpu.Upload(p, host);
                    if (name != "m") cpu.Upload(s.Magnitude!, mag0);
                    numeric.Add((fp - fm) / (2.0 * h));
                    analytic.Add(grad[i]);
                }
            }
        }
        double worst = numeric.Zip(analytic).Max(t => Math.Abs(t.First - t.Second));
        output.WriteLine($"{numeric.Count} finite-difference checks (DoRA, dropout 0.25); max abs err {worst:G3}");
        Assert.Contains(analytic, v => Math.Abs(v) > 1e-3);
        NumericAssert.Close(numeric.ToArray(), analytic.ToArray(), 4e-4, 2e-2, "DoRA with dropout, model finite differences");
    }
}
