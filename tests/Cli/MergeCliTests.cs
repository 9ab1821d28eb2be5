using FineTuneNative.Runtime.IO;

namespace FineTuneNative.Tests.Cli;

/// <summary>
/// <c>ftn merge</c> on the embedded model: after <c>ftn train --qlora</c> the adapter merges into the NF4-dequantized
/// base or into the base as loaded; the output is a Hugging Face directory that <c>ftn generate</c> runs, and the plain
/// merge generates exactly what <c>ftn generate --adapter</c> (merge in memory) generates.
/// </summary>
public class MergeCliTests
{
    [Fact]
    public void Merge_after_qlora_writes_a_model_directory_that_generates()
    {
        string dir = CliHarness.TempDir("merge-cli");
        try
        {
            string a = Path.Combine(dir, "qlora"), nf4 = Path.Combine(dir, "merged-nf4"), plain = Path.Combine(dir, "merged");
            var t = CliHarness.Run("train", "--qlora", "--max-steps", "3", "--exact-match", "0", "--batch-size", "4", "--out", a);
            Assert.True(t.ExitCode == 0, t.ToString());

            var m = CliHarness.Run("merge", "--adapter", a, "--base-quant", "nf4", "--out", nf4);
            Assert.True(m.ExitCode == 0, m.ToString());
            Assert.Contains("into the NF4-dequantized base", m.Stdout);
            Assert.Contains($"saved    {nf4}: model.safetensors (every weight f32), config.json, tokenizer.json", m.Stdout);
            using (var st = SafeTensors.Open(Path.Combine(nf4, "model.safetensors")))
            {
                Assert.Equal("nf4-dequantized", st.Metadata["ftn.merge_base"]);
                Assert.All(st.Tensors, i => Assert.Equal("F32", i.DTypeName));
            }
            var g = CliHarness.Run("generate", "--model", nf4, "--raw", "--prompt", "1 2 3", "--max-new-tokens", "8");
            Assert.True(g.ExitCode == 0, g.ToString());

            var p = CliHarness.Run("merge", "--adapter", a, "--out", plain);
            Assert.True(p.ExitCode == 0, p.ToString());
            Assert.Contains("into the base as loaded (f32)", p.Stdout);
            var fromMerged = CliHarness.Run("generate", "--model", plain, "--raw", "--prompt", "1 2 3", "--max-new-tokens", "8");
            var inMemory = CliHarness.Run("generate", "--adapter", a, "--raw", "--prompt", "1 2 3", "--max-new-tokens", "8");
            Assert.True(fromMerged.ExitCode == 0, fromMerged.ToString());
            Assert.Equal(inMemory.Stdout, fromMerged.Stdout);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Theory]
    [InlineData("--dtype", "q8_0")]
    [InlineData("--base-quant", "q3")]
    [InlineData("--adapter", "/nonexistent/adapter")]
    public void Bad_merge_options_are_one_line_errors(params string[] args)
    {
        string[] adapter = args.Contains("--adapter") ? [] : ["--adapter", Path.Combine(CliHarness.RepoRoot(), "models", "ftn-tiny")];
        var r = CliHarness.Run(["merge", "--out", Path.Combine(Path.GetTempPath(), "ftn-never-written"), .. adapter, .. args]);
        Assert.NotEqual(0, r.ExitCode);
        Assert.Single(r.StderrLines);
    }
}
