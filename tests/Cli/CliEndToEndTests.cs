using System.Text.Json;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Tests.Cli;

/// <summary>The commands on the embedded model (models/ftn-tiny), which ships in the repository.</summary>
public class CliEndToEndTests
{
    private static string ModelDir => Path.Combine(CliHarness.RepoRoot(), "models", "ftn-tiny");

    [Fact]
    public void EmbeddedModel_IsSmallAndComplete()
    {
        foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md" })
            Assert.True(File.Exists(Path.Combine(ModelDir, f)), $"models/ftn-tiny/{f} is missing");
        long bytes = Directory.GetFiles(ModelDir).Sum(f => new FileInfo(f).Length);
        Assert.True(bytes < 20L << 20, $"models/ftn-tiny is {bytes} bytes (limit 20 MiB)");
        // The README carries the command that reproduced the weights.
        Assert.Contains("ftn pretrain --corpus gen:", File.ReadAllText(Path.Combine(ModelDir, "README.md")));
    }

    [Fact]
    public void Info_DescribesTheEmbeddedModel()
    {
        var r = CliHarness.Run("info");
        Assert.True(r.ExitCode == 0, r.ToString());
        var cfg = LlamaConfig.FromHfJson(Path.Combine(ModelDir, "config.json"));
        long expected = LlamaWeights.Schema(cfg).Sum(p => p.Shape.Aggregate(1L, (a, d) => a * d));
        Assert.Contains("LlamaForCausalLM", r.Stdout);
        Assert.Contains($"L={cfg.NumLayers} C={cfg.HiddenSize} F={cfg.IntermediateSize} NH={cfg.NumHeads} NKV={cfg.NumKvHeads}", r.Stdout);
        Assert.Contains($"({expected:N0})", r.Stdout);
        Assert.Contains("Hugging Face directory, safetensors", r.Stdout);
        Assert.Contains("stored F32", r.Stdout, StringComparison.OrdinalIgnoreCase);
        Assert.Contains("model.safetensors", r.Stdout);
        Assert.DoesNotContain("tokenizer    none", r.Stdout);
    }

    [Fact]
    public void Train_ThenGenerateWithTheAdapter_Agree()
    {
        string dir = CliHarness.TempDir("train");
        try
        {
            string outDir = Path.Combine(dir, "adapter");
            var t = CliHarness.Run("train", "--max-steps", "3", "--exact-match", "3", "--max-new-tokens", "12", "--batch-size", "4",
                "--out", outDir, "--log-every", "1");
            Assert.True(t.ExitCode == 0, t.ToString());
            foreach (var s in new[] { "step     1/3", "step     3/3", "eval loss", "perplexity", "exact match", "tok/s", "ETA" })
                Assert.Contains(s, t.Stdout);
            foreach (var f in new[] { "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "train_results.json", "eval_generations.jsonl" })
                Assert.True(File.Exists(Path.Combine(outDir, f)), $"{f} missing in {outDir}\n{t}");
            Assert.DoesNotContain(Directory.GetDirectories(dir), d => Path.GetFileName(d).StartsWith('.'));

            // generate --adapter merges the saved adapter: its greedy output for a held-out prompt must be the
            // 'after' generation train recorded with the in-memory adapter.
            string first = File.ReadLines(Path.Combine(outDir, "eval_generations.jsonl")).First();
            using var doc = JsonDocument.Parse(first);
            string prompt = doc.RootElement.GetProperty("prompt").GetString()!;
            string after = doc.RootElement.GetProperty("after").GetString()!;
            var g = CliHarness.Run("generate", "--adapter", outDir, "--raw", "--prompt", prompt, "--max-new-tokens", "12");
            Assert.True(g.ExitCode == 0, g.ToString());
            Assert.Equal(after, g.Stdout.Trim());
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Generate_OnTheEmbeddedModel_AnswersAPretrainingTask()
    {
        // "How many words are there?" is one of the pretraining tasks (count: 20/20 held-out exact match in
        // models/ftn-tiny/README.md); the model must answer it, for inputs it has not seen verbatim.
        foreach (var (input, answer) in new[] { ("cat dog sun", "3"), ("red blue green pink gray black", "6") })
        {
            var g = CliHarness.Run("generate", "--prompt", "How many words are there?", "--input", input, "--max-new-tokens", "8");
            Assert.True(g.ExitCode == 0, g.ToString());
            Assert.Equal(answer, g.Stdout.Trim());
        }
    }
}
