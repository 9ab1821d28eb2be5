using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// The issue's "done means": LoRA fine-tuning the real stories260K (llama2.c) on a real instruction dataset
/// lowers held-out loss, and the saved PEFT adapter reloads to the same eval loss.
/// </summary>
[Collection("PeftModel")]
public class EndToEndFineTuneTests(ITestOutputHelper output)
{
    [SkippableFact]
    public void Stories260K_lora_on_alpaca_lowers_held_out_loss_and_the_adapter_reloads()
    {
        string model = PeftAssets.Require("stories260K", "stories260K.bin");
        string tokenizer = PeftAssets.Require("stories260K", "tok512.bin");
        string dataset = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        using var tmp = new TempDir();
        var options = new TrainOptions
        {
            MaxLength = 96, MicroBatch = 8, GradAccum = 1, MaxSteps = 60, LearningRate = 3e-3, WarmupSteps = 5,
            EvalFraction = 0.1, Seed = 7, Device = "cpu",
        };
        var lora = new LoraConfig { Rank = 8, Alpha = 16, Dropout = 0.05f };
        var job = new FineTuneJob
        {
            ModelPath = model, TokenizerPath = tokenizer, DatasetPaths = new[] { dataset }, OutputDir = tmp.Path,
            Options = options, Lora = lora, MaxRecords = 400,
            Log = output.WriteLine,
            OnProgress = p => { if (p.Step % 10 == 0) output.WriteLine($"step {p.Step}/{p.TotalSteps} loss {p.Loss:F4} lr {p.LearningRate:E2} {p.TokensPerSecond:F0} tok/s eta {p.Eta.TotalSeconds:F1}s"); },
            OnEval = e => output.WriteLine($"eval @ {e.Step}: loss {e.Loss:F4} ppl {e.Perplexity:F2} ({e.Samples} samples, {e.Targets} targets)"),
        };

        var r = job.Run();

        output.WriteLine($"eval loss {r.EvalLossBefore:F4} -> {r.EvalLossAfter:F4} (ppl {r.EvalPerplexityBefore:F2} -> {r.EvalPerplexityAfter:F2}) in {r.Elapsed.TotalSeconds:F1}s");
        Assert.True(r.EvalSamples >= 20, $"only {r.EvalSamples} eval samples");
        Assert.True(r.EvalLossAfter < r.EvalLossBefore - 0.1, $"held-out loss did not drop: {r.EvalLossBefore} -> {r.EvalLossAfter}");

        // Records whose prompt alone exceeds MaxLength were dropped and listed with file:line (record N).
        var issues = File.ReadAllLines(Path.Combine(tmp.Path, "data_issues.txt"));
        Assert.NotEmpty(issues);
        // (and exact duplicates, dropped by the cleaning step, are listed with the record they repeat)
        Assert.All(issues, l => Assert.Matches(@"alpaca_en_demo\.json:\d+ \(record \d+\): (every target is masked|duplicate of .*alpaca_en_demo\.json:\d+ \(record \d+\))", l));
        Assert.Contains(issues, l => l.Contains("every target is masked", StringComparison.Ordinal));
        Assert.True(File.Exists(Path.Combine(tmp.Path, "metrics.jsonl")) && File.Exists(Path.Combine(tmp.Path, "train_results.json")));

        // Reload: a fresh model from the checkpoint, the adapter from disk, the same held-out split.
        using var backend = Backends.Create("cpu");
        using var loaded = ModelLoader.Load(model, backend);
        var tok = TokenizerLoader.Load(tokenizer);
        var data = FineTuneJob.Prepare(new[] { dataset }, tok, options, 400);
        using var llama = new LlamaModel(loaded.Weights, backend);
        using var adapter = LoraAdapter.Load(tmp.Path, llama);
        Assert.Equal(lora.TargetModules, adapter.Config.TargetModules);
        using var trainer = new Trainer(llama, adapter, options);
        var again = trainer.Evaluate(data.Eval, trainer.SeqLenFor(data.Train, data.Eval), data.PadId);
        output.WriteLine($"reloaded adapter eval loss {again.Loss:F6} (after training {r.EvalLossAfter:F6})");
        Assert.Equal(r.EvalLossAfter, again.Loss);
    }
}
