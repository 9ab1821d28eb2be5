using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// DoRA, QLoRA and staged training with EWC on the real stories260K (llama2.c) and LLaMA-Factory's demo datasets:
/// each lowers held-out loss, saves a PEFT adapter that reloads to the same eval loss; QLoRA is compared with the
/// same run on the unquantized base; EWC keeps the first stage's held-out loss lower than a second stage without it.
/// </summary>
[Collection("PeftModel")]
public class MethodsEndToEndTests(ITestOutputHelper output)
{
    private static TrainOptions Options(int steps) => new()
    {
        MaxLength = 96, MicroBatch = 8, GradAccum = 1, MaxSteps = steps, LearningRate = 3e-3, WarmupSteps = 5,
        EvalFraction = 0.1, Seed = 7, Device = "cpu",
    };

    private FineTuneJob Job(string dataset, string outDir, TrainOptions options, LoraConfig lora, string? baseQuant = null,
        string? continueAdapter = null, double ewcLambda = 0, string? ewcData = null, int maxRecords = 400) => new()
    {
        ModelPath = PeftAssets.Require("stories260K", "stories260K.bin"),
        TokenizerPath = PeftAssets.Require("stories260K", "tok512.bin"),
        DatasetPaths = new[] { dataset }, OutputDir = outDir, Options = options, Lora = lora, MaxRecords = maxRecords,
        BaseQuant = baseQuant, ContinueAdapter = continueAdapter, EwcLambda = ewcLambda, EwcDataPaths = ewcData is null ? null : new[] { ewcData },
        Log = output.WriteLine,
        OnEval = e => output.WriteLine($"eval @ {e.Step}: loss {e.Loss:F4} ({e.Samples} samples)"),
    };

    /// <summary>Eval loss of the adapter in <paramref name="adapterDir"/> on <paramref name="dataset"/>'s held-out split.</summary>
    private static double Reload(string adapterDir, string dataset, TrainOptions options, bool nf4, int maxRecords = 400)
    {
        using var backend = Backends.Create("cpu");
        using var loaded = ModelLoader.Load(PeftAssets.Require("stories260K", "stories260K.bin"), backend);
        var tok = TokenizerLoader.Load(PeftAssets.Require("stories260K", "tok512.bin"));
        var data = FineTuneJob.Prepare(new[] { dataset }, tok, options, maxRecords);
        var weights = nf4 ? QLora.QuantizeBase(loaded.Weights).Weights : loaded.Weights;
        using var llama = new LlamaModel(weights, backend);
        using var adapter = LoraAdapter.Load(adapterDir, llama);
        using var trainer = new Trainer(llama, adapter, options);
        return trainer.Evaluate(data.Eval, trainer.SeqLenFor(data.Train, data.Eval), data.PadId).Loss;
    }

    [SkippableTheory]
    [InlineData(0f)]
    [InlineData(0.1f)]   // PEFT's DoRA dropout: the magnitude/direction path on the dropped input
    public void Dora_on_alpaca_lowers_held_out_loss_and_reloads(float dropout)
    {
        string dataset = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        using var tmp = new TempDir();
        var options = Options(40);
        var r = Job(dataset, tmp.Path, options, new LoraConfig { Rank = 8, Alpha = 16, Dropout = dropout, UseDora = true }).Run();
        output.WriteLine($"DoRA (dropout {dropout}) eval loss {r.EvalLossBefore:F4} -> {r.EvalLossAfter:F4} in {r.Elapsed.TotalSeconds:F1}s");
        Assert.True(r.EvalLossAfter < r.EvalLossBefore - 0.1, $"held-out loss did not drop: {r.EvalLossBefore} -> {r.EvalLossAfter}");
        Assert.Equal(r.EvalLossAfter, Reload(tmp.Path, dataset, options, nf4: false));
    }

    [SkippableFact]
    public void QLora_on_alpaca_lowers_held_out_loss_close_to_the_unquantized_run_and_reloads()
    {
        string dataset = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        using var tmp = new TempDir();
        var options = Options(40);
        var lora = new LoraConfig { Rank = 8, Alpha = 16, Dropout = 0.05f };
        string qDir = Path.Combine(tmp.Path, "qlora"), fDir = Path.Combine(tmp.Path, "f32");
        var qJob = Job(dataset, qDir, options, lora, baseQuant: "nf4");
        var q = qJob.Run();
        var f = Job(dataset, fDir, options, lora).Run();
        var mem = qJob.Quantization!;
        output.WriteLine(mem.Describe());
        output.WriteLine($"QLoRA (nf4 base) eval loss {q.EvalLossBefore:F4} -> {q.EvalLossAfter:F4} in {q.Elapsed.TotalSeconds:F1}s; " +
                         $"LoRA (f32 base) {f.EvalLossBefore:F4} -> {f.EvalLossAfter:F4} in {f.Elapsed.TotalSeconds:F1}s");
        Assert.True(mem.LinearBytesBefore >= 6 * mem.LinearBytesAfter, "NF4 projections should be ~7x smaller than f32");
        Assert.True(q.EvalLossAfter < q.EvalLossBefore - 0.1, $"QLoRA held-out loss did not drop: {q.EvalLossBefore} -> {q.EvalLossAfter}");
        // quantization costs some loss before training; after training the gap stays small
        Assert.True(Math.Abs(q.EvalLossAfter - f.EvalLossAfter) < 0.25, $"QLoRA {q.EvalLossAfter} vs f32 base {f.EvalLossAfter}");
        Assert.Equal(q.EvalLossAfter, Reload(qDir, dataset, options, nf4: true));
    }

    /// <summary>
    /// Stage 1 on alpaca, stage 2 (continuing the stage-1 adapter) on identity.json, once without and once with EWC
    /// (Fisher on the stage-1 data). The stage-1 held-out loss after stage 2 is lower with EWC. The EWC stage 2 saves
    /// the Fisher of both stages with its adapter; stage 3 (c4 text) continues it with --ewc-lambda and no data of the
    /// earlier stages, and forgets less of stage 2 than the same stage 3 without EWC.
    /// </summary>
    [SkippableFact]
    public void Staged_training_with_ewc_forgets_less_of_the_earlier_stages()
    {
        string alpaca = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        string identity = PeftAssets.Require("datasets", "llama-factory", "identity.json");
        using var tmp = new TempDir();
        var lora = new LoraConfig { Rank = 8, Alpha = 16, Dropout = 0 };
        string s1 = Path.Combine(tmp.Path, "stage1"), plain = Path.Combine(tmp.Path, "stage2"), ewc = Path.Combine(tmp.Path, "stage2-ewc");
        var r1 = Job(alpaca, s1, Options(40), lora).Run();
        Assert.True(r1.EvalLossAfter < r1.EvalLossBefore - 0.1);
        var stage2 = Options(40);
        var r2 = Job(identity, plain, stage2, lora, continueAdapter: s1).Run();
        var r3 = Job(identity, ewc, stage2, lora, continueAdapter: s1, ewcLambda: 2000, ewcData: alpaca).Run();
        double a1 = Reload(s1, alpaca, Options(40), false), a2 = Reload(plain, alpaca, Options(40), false), a3 = Reload(ewc, alpaca, Options(40), false);
        output.WriteLine($"stage-1 held-out loss: after stage 1 {a1:F4}; after stage 2 without EWC {a2:F4}, with EWC {a3:F4}");
        output.WriteLine($"stage-2 held-out loss: without EWC {r2.EvalLossBefore:F4} -> {r2.EvalLossAfter:F4}, with EWC {r3.EvalLossBefore:F4} -> {r3.EvalLossAfter:F4}");
        Assert.Equal(r1.EvalLossAfter, a1);
        Assert.True(r2.EvalLossAfter < r2.EvalLossBefore, "stage 2 must learn its own data");
        Assert.True(r3.EvalLossAfter < r3.EvalLossBefore, "stage 2 with EWC must still learn its own data");
        Assert.True(a2 > a1, "without EWC stage 2 should forget some of stage 1");
        Assert.True(a3 < a2, $"EWC should keep the stage-1 loss lower: {a3} vs {a2}");

        // stage 3 from the EWC stage 2's output alone: its ewc_state holds both stages' Fisher
        Assert.False(File.Exists(Path.Combine(plain, EwcState.FileName)), "a stage without EWC writes no EWC state");
        using (var st = SafeTensors.Open(Path.Combine(ewc, EwcState.FileName)))
            Assert.Equal("2", st.Metadata["stages"]);
        string c4 = PeftAssets.Require("datasets", "llama-factory", "c4_demo.jsonl");
        string s3 = Path.Combine(tmp.Path, "stage3"), s3ewc = Path.Combine(tmp.Path, "stage3-ewc");
        var r4 = Job(c4, s3, Options(40), lora, continueAdapter: ewc).Run();
        var r5 = Job(c4, s3ewc, Options(40), lora, continueAdapter: ewc, ewcLambda: 2000).Run();
        using (var st = SafeTensors.Open(Path.Combine(s3ewc, EwcState.FileName)))
            Assert.Equal("3", st.Metadata["stages"]);
        double i2 = Reload(ewc, identity, Options(40), false), i3 = Reload(s3, identity, Options(40), false), i3e = Reload(s3ewc, identity, Options(40), false);
        double b3 = Reload(s3, alpaca, Options(40), false), b3e = Reload(s3ewc, alpaca, Options(40), false);
        output.WriteLine($"stage-2 held-out loss: after stage 2 {i2:F4}; after stage 3 without EWC {i3:F4}, with EWC {i3e:F4}");
        output.WriteLine($"stage-1 held-out loss after stage 3: without EWC {b3:F4}, with EWC {b3e:F4}");
        output.WriteLine($"stage-3 held-out loss: without EWC {r4.EvalLossBefore:F4} -> {r4.EvalLossAfter:F4}, with EWC {r5.EvalLossBefore:F4} -> {r5.EvalLossAfter:F4}");
        Assert.True(r5.EvalLossAfter < r5.EvalLossBefore, "stage 3 with EWC must still learn its own data");
        Assert.True(i3 > i2, "without EWC stage 3 should forget some of stage 2");
        Assert.True(i3e < i3, $"the saved EWC state should keep the stage-2 loss lower: {i3e} vs {i3}");
    }
}
