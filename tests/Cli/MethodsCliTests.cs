using System.Text.Json;
using FineTuneNative.Runtime.IO;

namespace FineTuneNative.Tests.Cli;

/// <summary>
/// <c>ftn train --use-dora --qlora</c>, staged training with <c>--adapter --ewc-lambda --ewc-data</c>, and
/// <c>ftn generate --adapter A --adapter B</c> on the embedded model; bad combinations are one-line errors.
/// </summary>
public class MethodsCliTests
{
    private static readonly string Data = Path.Combine(CliHarness.RepoRoot(), "data", "count-plus-one.jsonl");

    private static string[] Train(string outDir, params string[] extra) =>
        ["train", "--max-steps", "3", "--exact-match", "2", "--max-new-tokens", "8", "--batch-size", "4", "--out", outDir, "--log-every", "1", .. extra];

    [Fact]
    public void Dora_over_an_nf4_base_then_staged_with_ewc_then_stacked_generation()
    {
        string dir = CliHarness.TempDir("methods-cli");
        try
        {
            string dora = Path.Combine(dir, "dora"), a = Path.Combine(dir, "a"), b = Path.Combine(dir, "b");
            var t = CliHarness.Run(Train(dora, "--use-dora", "--qlora", "--use-rslora"));
            Assert.True(t.ExitCode == 0, t.ToString());
            Assert.Contains("qlora    NF4 base", t.Stdout);
            Assert.Contains("dora ", t.Stdout);
            using (var cfg = JsonDocument.Parse(File.ReadAllText(Path.Combine(dora, "adapter_config.json"))))
            {
                Assert.True(cfg.RootElement.GetProperty("use_dora").GetBoolean());
                Assert.True(cfg.RootElement.GetProperty("use_rslora").GetBoolean());
                Assert.Equal(0.0, cfg.RootElement.GetProperty("lora_dropout").GetDouble());
            }
            using (var st = SafeTensors.Open(Path.Combine(dora, "adapter_model.safetensors")))
                Assert.Contains(st.Names, n => n.EndsWith(".mlp.down_proj.lora_magnitude_vector", StringComparison.Ordinal));

            var s1 = CliHarness.Run(Train(a, "--targets", "q,v"));
            Assert.True(s1.ExitCode == 0, s1.ToString());
            var s2 = CliHarness.Run(Train(b, "--adapter", a, "--ewc-lambda", "100", "--ewc-data", Data, "--ewc-samples", "8"));
            Assert.True(s2.ExitCode == 0, s2.ToString());
            Assert.Contains($"stage    continuing {a}", s2.Stdout);
            Assert.Contains("ewc      lambda 100, Fisher from 8 samples of 1 earlier stage(s)", s2.Stdout);
            Assert.Contains("ewc      ewc_state.safetensors: Fisher of 2 stages (16 samples) for the next stage", s2.Stdout);
            Assert.False(File.Exists(Path.Combine(a, "ewc_state.safetensors")), "a stage without EWC writes no EWC state");
            // a third stage needs only the second stage's directory
            string c = Path.Combine(dir, "c");
            var s3 = CliHarness.Run(Train(c, "--adapter", b, "--ewc-lambda", "100", "--ewc-samples", "8"));
            Assert.True(s3.ExitCode == 0, s3.ToString());
            Assert.Contains("ewc      lambda 100, Fisher from 16 samples of 2 earlier stage(s)", s3.Stdout);
            Assert.Contains("Fisher of 3 stages (24 samples)", s3.Stdout);

            var one = CliHarness.Run("generate", "--adapter", a, "--adapter", b, "--raw", "--prompt", "1 2 3", "--max-new-tokens", "8");
            var two = CliHarness.Run("generate", "--adapter", $"{a},{b}", "--raw", "--prompt", "1 2 3", "--max-new-tokens", "8");
            Assert.True(one.ExitCode == 0, one.ToString());
            Assert.Equal(one.Stdout, two.Stdout);
            Assert.Contains($"adapter {a} + {b}", one.Stderr);
            var dd = CliHarness.Run("generate", "--adapter", a, "--adapter", dora, "--raw", "--prompt", "1 2 3", "--max-new-tokens", "8");
            Assert.NotEqual(0, dd.ExitCode);
            Assert.Single(dd.StderrLines);
            Assert.Contains("DoRA", dd.Stderr);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("--base-quant", "q3")]
    [InlineData("--ewc-lambda", "5")]
    [InlineData("--ewc-lambda", "-1", "--ewc-data", "x.json")]
    [InlineData("--adapter", "/nonexistent/adapter")]
    public void Bad_method_options_are_one_line_errors(params string[] args)
    {
        var r = CliHarness.Run(["train", "--max-steps", "1", "--exact-match", "0", "--out", Path.Combine(Path.GetTempPath(), "ftn-never-written"), .. args]);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Single(r.StderrLines);
    }
}
