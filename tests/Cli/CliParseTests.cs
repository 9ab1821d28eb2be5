using System.Reflection;
using CommandLine;
using FineTuneNative.Cli;

namespace FineTuneNative.Tests.Cli;

public class CliParseTests
{
    public static IEnumerable<object[]> VerbTypes() => Program.Verbs.Select(t => new object[] { t.Name });

    private static (string Verb, List<OptionAttribute> Options) Describe(string typeName)
    {
        var type = Program.Verbs.Single(t => t.Name == typeName);
        var verb = type.GetCustomAttribute<VerbAttribute>() ?? throw new InvalidOperationException($"{type} has no [Verb]");
        var options = type.GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .Select(p => p.GetCustomAttribute<OptionAttribute>()).OfType<OptionAttribute>().ToList();
        return (verb.Name, options);
    }

    [Theory]
    [MemberData(nameof(VerbTypes))]
    public void Help_ListsAndExplainsEveryOption(string typeName)
    {
        var (verb, options) = Describe(typeName);
        Assert.NotEmpty(options);
        var r = CliHarness.Run(verb, "--help");
        Assert.True(r.ExitCode == 0, r.ToString());
        foreach (var o in options)
        {
            Assert.False(string.IsNullOrWhiteSpace(o.HelpText), $"{verb} --{o.LongName} has no help text");
            Assert.Contains($"--{o.LongName}", r.Stdout);
            // The first words of the explanation are printed next to the option.
            string start = o.HelpText.Split(' ', 3) is { Length: >= 2 } w ? $"{w[0]} {w[1]}" : o.HelpText;
            Assert.Contains(start, r.Stdout);
        }
    }

    [Fact]
    public void TopLevelHelp_ListsEveryCommand()
    {
        var r = CliHarness.Run("--help");
        Assert.Equal(0, r.ExitCode);
        foreach (var t in Program.Verbs)
        {
            var verb = t.GetCustomAttribute<VerbAttribute>()!;
            Assert.Contains(verb.Name, r.Stdout);
            Assert.Contains(verb.HelpText.Split(' ')[0], r.Stdout);
        }
    }

    [Theory]
    [InlineData("generate --prompt hi --bogus", "unknown option '--bogus'")]
    [InlineData("generate --prompt hi --max-new-tokens abc", "bad value for --max-new-tokens: 'abc'")]
    [InlineData("pretrain", "missing required option --out")]
    [InlineData("frobnicate", "unknown command 'frobnicate'")]
    [InlineData("train --rank x", "bad value for --rank: 'x'")]
    public void BadCommandLine_IsOneLineAndExitCode2(string line, string expected)
    {
        var r = CliHarness.Run(line.Split(' '));
        Assert.True(r.ExitCode == 2, r.ToString());
        Assert.Single(r.StderrLines);
        Assert.Contains(expected, r.Stderr);
        Assert.DoesNotContain("   at ", r.Stderr);
        Assert.Equal("", r.Stdout);
    }

    [Theory]
    [InlineData("generate --model {missing} --prompt hi", "not found")]
    [InlineData("info --model {missing}", "not found")]
    [InlineData("generate --prompt hi --adapter {missing}", "not found")]
    [InlineData("train --model {missing} --data {missing}", "not found")]
    [InlineData("train --data {missing}", "not found")]
    [InlineData("synth --tasks nope", "unknown synthetic task 'nope'")]
    [InlineData("pretrain --out {missing} --corpus file.txt", "expected gen:TASKS")]
    [InlineData("generate --prompt hi --device tpu", "unknown device 'tpu'")]
    [InlineData("generate --prompt hi --compute f16", "--compute must be f32 or bf16 (got 'f16')")]
    public void UserError_IsOneLineNamingTheProblem(string line, string expected)
    {
        string missing = Path.Combine(Path.GetTempPath(), $"ftn-missing-{Guid.NewGuid():N}");
        var r = CliHarness.Run(line.Replace("{missing}", missing).Split(' '));
        Assert.True(r.ExitCode == 1, r.ToString());
        Assert.Single(r.StderrLines);
        Assert.StartsWith("ftn: error: ", r.StderrLines[0]);
        Assert.Contains(expected, r.Stderr);
        if (line.Contains("{missing}") && expected == "not found") Assert.Contains(missing, r.Stderr);
        Assert.DoesNotContain("   at ", r.Stderr);
    }

    [Fact]
    public void Synth_WritesTheSameFileForTheSameSeed_AndNothingOnError()
    {
        string dir = CliHarness.TempDir("synth");
        try
        {
            string a = Path.Combine(dir, "a.jsonl"), b = Path.Combine(dir, "b.jsonl"), c = Path.Combine(dir, "c.jsonl");
            Assert.Equal(0, CliHarness.Run("synth", "--tasks", "all", "--count", "50", "--seed", "3", "--out", a).ExitCode);
            Assert.Equal(0, CliHarness.Run("synth", "--tasks", "all", "--count", "50", "--seed", "3", "--out", b).ExitCode);
            Assert.Equal(0, CliHarness.Run("synth", "--tasks", "all", "--count", "50", "--seed", "4", "--out", c).ExitCode);
            Assert.Equal(File.ReadAllText(a), File.ReadAllText(b));
            Assert.NotEqual(File.ReadAllText(a), File.ReadAllText(c));
            Assert.Equal(50, File.ReadAllLines(a).Length);
            // No temporary file is left behind.
            Assert.Equal(3, Directory.GetFiles(dir).Length);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void SampleDataset_IsWhatSynthWrites()
    {
        // data/count-plus-one.jsonl is reproducible: data/README.md gives this command.
        string root = CliHarness.RepoRoot();
        var r = CliHarness.Run("synth", "--tasks", "count_plus_one", "--count", "500", "--seed", "7");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal(File.ReadAllText(Path.Combine(root, "data", "count-plus-one.jsonl")).ReplaceLineEndings("\n"), r.Stdout.ReplaceLineEndings("\n"));
    }
}
