using FineTuneNative.Cli;

namespace FineTuneNative.Tests.Cli;

/// <summary>Runs <c>ftn</c> in-process (Program.Run) and captures what it prints.</summary>
internal static class CliHarness
{
    public sealed record Result(int ExitCode, string Stdout, string Stderr)
    {
        public string[] StderrLines => Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        public override string ToString() => $"exit {ExitCode}\n--- stdout\n{Stdout}\n--- stderr\n{Stderr}";
    }

    // Program.Run and the commands also write progress to Console.Error: serialize the tests that use the harness.
    private static readonly object Gate = new();

    public static Result Run(params string[] args)
    {
        lock (Gate)
        {
            var stdout = new StringWriter();
            var stderr = new StringWriter();
            var oldErr = Console.Error;
            Console.SetError(stderr);
            try
            {
                int rc = Program.Run(args, stdout, stderr);
                return new Result(rc, stdout.ToString(), stderr.ToString());
            }
            finally { Console.SetError(oldErr); }
        }
    }

    /// <summary>The repository root (the folder holding FineTuneNative.sln), found above the test binary.</summary>
    public static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "FineTuneNative.sln"))) return d.FullName;
        throw new InvalidOperationException($"no FineTuneNative.sln above {AppContext.BaseDirectory}");
    }

    public static string TempDir(string name)
    {
        string dir = Path.Combine(Path.GetTempPath(), $"ftn-test-{name}-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        return dir;
    }
}
