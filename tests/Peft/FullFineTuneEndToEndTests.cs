using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Full fine-tuning and layer freezing of the real stories260K (llama2.c) on a real instruction dataset lower the
/// held-out loss; the saved Hugging Face model reloads to the same eval loss.
/// </summary>
[Collection("PeftModel")]
public class FullFineTuneEndToEndTests(ITestOutputHelper output)
{
    [SkippableTheory]
    [InlineData(0)] // every parameter
    [InlineData(2)] // layer freezing: the top 2 of 5 layers
    public void Stories260K_full_fine_tuning_on_alpaca_lowers_held_out_loss_and_the_model_reloads(int topLayers)
    {
        string model = PeftAssets.Require("stories260K", "stories260K.bin");
        string tokenizer = PeftAssets.Require("stories260K", "tok512.bin");
        string dataset = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        using var tmp = new TempDir();
        var options = new TrainOptions
        {
            MaxLength = 96, MicroBatch = 8, MaxSteps = 40, LearningRate = 2e-3, WarmupSteps = 4, EvalFraction = 0.1, Seed = 7,
            WeightDecay = 0.01, EvalEvery = 20,
        };
        var job = new FineTuneJob
        {
            ModelPath = model, TokenizerPath = tokenizer, DatasetPaths = new[] { dataset }, OutputDir = tmp.Path, Options = options,
            MaxRecords = 300, Full = new FullFineTuneConfig { TopLayers = topLayers }, Log = output.WriteLine,
            OnEval = e => output.WriteLine($"eval @ {e.Step}: loss {e.Loss:F4} ppl {e.Perplexity:F2}"),
        };
        var r = job.Run();
        output.WriteLine($"top layers {topLayers}: eval loss {r.EvalLossBefore:F4} -> {r.EvalLossAfter:F4} in {r.Elapsed.TotalSeconds:F1}s");
        Assert.True(r.EvalLossAfter < r.EvalLossBefore - 0.1, $"held-out loss did not drop: {r.EvalLossBefore} -> {r.EvalLossAfter}");

        // The output is an HF model directory (q/k rows permuted to rotate-half); it evaluates to the same loss.
        using var backend = Backends.Create("cpu");
        using var loaded = ModelLoader.Load(tmp.Path, backend);
        Assert.Equal(RopeLayout.RotateHalf, loaded.Weights.Config.RopeLayout);
        var data = FineTuneJob.Prepare(new[] { dataset }, TokenizerLoader.Load(tokenizer), options, 300);
        using var llama = new LlamaModel(loaded.Weights, backend);
        using var lora = LoraAdapter.Create(llama, new LoraConfig { Rank = 1, Dropout = 0 }, 1); // B = 0: the loaded model alone
        using var trainer = new Trainer(llama, lora, options);
        var again = trainer.Evaluate(data.Eval, trainer.SeqLenFor(data.Train, data.Eval), data.PadId);
        output.WriteLine($"reloaded eval loss {again.Loss:F6} (after training {r.EvalLossAfter:F6})");
        Assert.Equal(r.EvalLossAfter, again.Loss, 5);

        // Layer freezing: the frozen layers are bit-identical to the base.
        if (topLayers > 0)
        {
            using var baseModel = ModelLoader.Load(model, backend);
            int L = baseModel.Weights.Config.NumLayers;
            for (int l = 0; l < L; l++)
            {
                bool same = baseModel.Weights.Layers[l].Wv.ToArray().SequenceEqual(loaded.Weights.Layers[l].Wv.ToArray());
                Assert.True(same == l < L - topLayers, $"layer {l} v_proj changed={!same}");
            }
        }
    }
}
