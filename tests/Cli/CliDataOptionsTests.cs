using Xunit;

namespace FineTuneNative.Tests.Cli;

/// <summary>The data options of ftn train and the shared prompt format of ftn generate, on the embedded model.</summary>
public class CliDataOptionsTests
{
    [Fact]
    public void Train_WithPackingNeftuneCleaningAndATestSplit_ReportsTheData()
    {
        string dir = CliHarness.TempDir("data");
        try
        {
            string outDir = Path.Combine(dir, "adapter");
            var t = CliHarness.Run("train", "--max-steps", "2", "--exact-match", "0", "--batch-size", "2", "--out", outDir,
                "--pack", "--neftune-alpha", "5", "--normalize-whitespace", "--test-fraction", "0.1", "--augment-ratio", "0.1",
                "--noise-words", "cat,dog");
            Assert.True(t.ExitCode == 0, t.ToString());
            foreach (var s in new[] { "data     read ", "prompt format: built-in", "data     train: ", "data     test: ", "truncated to 96 tokens: 0",
                                      "EOS (", "packed ", "augmentation: 0 synonym substitutions", "step     2/2" })
                Assert.Contains(s, t.Stdout);
            Assert.True(File.Exists(Path.Combine(outDir, "adapter_model.safetensors")), t.ToString());
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Train_WithATemplateWhoseEndOfTurnIsNotTheEos_IsRefusedBeforeTraining()
    {
        // chatml closes turns with "<|im_end|>", plain text to ftn-tiny's tokenizer: the model would never learn to stop
        var t = CliHarness.Run("train", "--max-steps", "1", "--exact-match", "0", "--chat-template", "chatml", "--out", Path.Combine(Path.GetTempPath(), "ftn-never"));
        Assert.Equal(1, t.ExitCode);
        Assert.Contains("never learn to stop", t.Stderr);
        Assert.Single(t.StderrLines, l => l.StartsWith("ftn: error:", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData("--dataset-weights", "x", "--dataset-weights must be comma-separated numbers")]
    [InlineData("--dataset-weights", "1,2", "2 dataset weights for 1 datasets")]
    [InlineData("--augment-ratio", "2", "augmentation ratio must be in [0, 1]")]
    [InlineData("--chat-template", "nosuch", "not a built-in")]
    public void Train_BadDataOptions_OneLineErrors(string flag, string value, string message)
    {
        var t = CliHarness.Run("train", "--max-steps", "1", "--exact-match", "0", flag, value, "--out", Path.Combine(Path.GetTempPath(), "ftn-never"));
        Assert.Equal(1, t.ExitCode);
        Assert.Contains(message, t.Stderr);
    }

    [Fact]
    public void Generate_WithAChatTemplate_PromptsInThatFormat()
    {
        // ftn-tiny was not trained on chatml, so only the prompt matters: it must be the template's rendering
        var g = CliHarness.Run("generate", "--chat-template", "chatml", "--prompt", "Sort the words alphabetically.", "--input", "dog cat",
            "--max-new-tokens", "4");
        Assert.True(g.ExitCode == 0, g.ToString());
        var plain = CliHarness.Run("generate", "--prompt", "Sort the words alphabetically.", "--input", "dog cat", "--max-new-tokens", "4");
        Assert.True(plain.ExitCode == 0, plain.ToString());
        // "<|im_start|>user\nSort ...\ndog cat<|im_end|>\n<|im_start|>assistant\n" is longer than the alpaca prompt
        int Tokens(string stderr) => int.Parse(stderr.Split("ftn generate: ")[1].Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        Assert.True(Tokens(g.Stderr) > Tokens(plain.Stderr), $"{g.Stderr} vs {plain.Stderr}");
    }
}
