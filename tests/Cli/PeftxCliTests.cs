using System.Text.Json;

namespace FineTuneNative.Tests.Cli;

/// <summary><c>ftn train --method prompt|prefix|bottleneck</c> and <c>ftn generate --adapter</c> on the embedded model.</summary>
public class PeftxCliTests
{
    /// <summary>
    /// Each method trains through the CLI, saves its adapter directory, and generate --adapter (which reads the files
    /// back and applies them in the session) reproduces the greedy 'after' generation train recorded in memory.
    /// </summary>
    [Theory]
    [InlineData("prompt", "--num-virtual-tokens", "6")]
    [InlineData("prefix", "--num-virtual-tokens", "5")]
    [InlineData("bottleneck", "--bottleneck-size", "4")]
    public void Train_ThenGenerateWithTheAdapter_Agree(string method, string sizeFlag, string size)
    {
        string dir = CliHarness.TempDir("peftx-" + method);
        try
        {
            string outDir = Path.Combine(dir, "adapter");
            var t = CliHarness.Run("train", "--method", method, sizeFlag, size, "--max-steps", "3", "--exact-match", "3", "--max-new-tokens", "12",
                "--batch-size", "4", "--lr", "1e-2", "--out", outDir, "--log-every", "1");
            Assert.True(t.ExitCode == 0, t.ToString());
            Assert.Contains("trainable parameters", t.Stdout);
            Assert.Contains("step     3/3", t.Stdout);
            foreach (var f in new[] { "adapter_config.json", "adapter_model.safetensors", "eval_generations.jsonl" })
                Assert.True(File.Exists(Path.Combine(outDir, f)), $"{f} missing in {outDir}\n{t}");
            string type = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json"))).RootElement.GetProperty("peft_type").GetString()!;
            Assert.Equal(method switch { "prompt" => "PROMPT_TUNING", "prefix" => "PREFIX_TUNING", _ => "BOTTLENECK" }, type);

            using var doc = JsonDocument.Parse(File.ReadLines(Path.Combine(outDir, "eval_generations.jsonl")).First());
            string prompt = doc.RootElement.GetProperty("prompt").GetString()!;
            string after = doc.RootElement.GetProperty("after").GetString()!;
            var g = CliHarness.Run("generate", "--adapter", outDir, "--raw", "--prompt", prompt, "--max-new-tokens", "12");
            Assert.True(g.ExitCode == 0, g.ToString());
            Assert.Equal(after, g.Stdout.Trim());

            // staged training: --adapter continues the saved adapter (its eval loss before = the saved one's after)
            string stage2 = Path.Combine(dir, "stage2");
            var t2 = CliHarness.Run("train", "--method", method, "--adapter", outDir, "--max-steps", "1", "--exact-match", "0",
                "--batch-size", "4", "--lr", "1e-2", "--out", stage2);
            Assert.True(t2.ExitCode == 0, t2.ToString());
            Assert.Contains("stage    continuing", t2.Stdout);
            double after1 = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "train_results.json"))).RootElement.GetProperty("eval_loss_after").GetDouble();
            double before2 = JsonDocument.Parse(File.ReadAllText(Path.Combine(stage2, "train_results.json"))).RootElement.GetProperty("eval_loss_before").GetDouble();
            Assert.Equal(after1, before2, 6);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("--method", "soft")]
    [InlineData("--method", "prefix", "--rank", "4")]
    [InlineData("--method", "lora", "--num-virtual-tokens", "4")]
    [InlineData("--method", "prompt", "--pack")]
    [InlineData("--method", "bottleneck", "--bottleneck-sites", "middle")]
    [InlineData("--method", "prefix", "--use-dora")]
    [InlineData("--method", "prompt", "--ewc-lambda", "1")]
    public void BadMethodOptions_AreOneLineErrors(params string[] args)
    {
        var r = CliHarness.Run(["train", "--max-steps", "1", "--exact-match", "0", .. args]);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Single(r.StderrLines);
    }
}
