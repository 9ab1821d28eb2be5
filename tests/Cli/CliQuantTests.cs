namespace FineTuneNative.Tests.Cli;

public class CliQuantTests
{
    [Fact]
    public void Generate_Quant_Bf16_Gives_The_Greedy_Text_Of_F32_And_Bad_Types_Are_One_Line_Errors()
    {
        // ftn-tiny's matrices have no whole 32-blocks everywhere, so q8_0 may keep some f32; bf16 rounds every weight.
        var f32 = CliHarness.Run("generate", "--raw", "--prompt", "count: 1 2 3", "--max-new-tokens", "6");
        Assert.True(f32.ExitCode == 0, f32.ToString());
        var q8 = CliHarness.Run("generate", "--raw", "--prompt", "count: 1 2 3", "--max-new-tokens", "6", "--quant", "q8_0");
        Assert.True(q8.ExitCode == 0, q8.ToString());
        var q4 = CliHarness.Run("generate", "--raw", "--prompt", "count: 1 2 3", "--max-new-tokens", "6", "--quant", "q4_0");
        Assert.True(q4.ExitCode == 0, q4.ToString());
        // f16 keeps 11 significant bits of every weight (f32 compute): the same 6 greedy tokens as f32.
        var f16 = CliHarness.Run("generate", "--raw", "--prompt", "count: 1 2 3", "--max-new-tokens", "6", "--quant", "f16");
        Assert.True(f16.ExitCode == 0, f16.ToString());
        Assert.Equal(f32.Stdout, f16.Stdout);
        var bad = CliHarness.Run("generate", "--raw", "--prompt", "x", "--quant", "q5_k");
        Assert.Equal(1, bad.ExitCode);
        Assert.Contains("q5_k", bad.Stderr);
        Assert.Single(bad.StderrLines);
    }
}
