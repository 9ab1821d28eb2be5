using System.Text.Json;
using CommandLine;
using CommandLine.Text;

namespace FineTuneNative.Cli;

/// <summary>
/// The <c>ftn</c> entry point: parses the verb and its options with CommandLineParser and runs one command.
/// Exit codes: 0 success, 1 error (one line on stderr, "ftn: error: ..."), 2 bad command line.
/// </summary>
public static class Program
{
    /// <summary>Every verb, in the order help lists them.</summary>
    internal static readonly Type[] Verbs =
    {
        typeof(TrainOptions), typeof(GenerateOptions), typeof(MergeOptions), typeof(InfoOptions), typeof(PretrainOptions), typeof(SynthOptions),
    };

    public static int Main(string[] args) => Run(args, Console.Out, Console.Error);

    /// <summary>Runs one command line with the given output streams (used by tests).</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        try { args = TrainRun.ExpandConfig(args); } // ftn train --config FILE: the file's keys become flags
        catch (Exception e) when (IsUserError(e)) { stderr.WriteLine($"ftn: error: {OneLine(e.Message)}"); return 2; }
        using var parser = new Parser(s =>
        {
            s.HelpWriter = null;          // errors are reported as one line, help is printed by us
            s.CaseSensitive = true;
            s.CaseInsensitiveEnumValues = true;
            s.AutoHelp = true;
            s.AutoVersion = true;
            s.IgnoreUnknownArguments = false;
            s.AllowMultiInstance = true;  // ftn generate --adapter A --adapter B (stacked adapters)
        });
        ParserResult<object> result = parser.ParseArguments(args, Verbs);
        if (result is NotParsed<object> notParsed)
            return ReportParseErrors(notParsed, args, stdout, stderr);

        var options = ((Parsed<object>)result).Value;
        try
        {
            return options switch
            {
                TrainOptions o => TrainCommand.Run(o, stdout),
                GenerateOptions o => GenerateCommand.Run(o, stdout),
                MergeOptions o => MergeCommand.Run(o, stdout),
                InfoOptions o => InfoCommand.Run(o, stdout),
                PretrainOptions o => PretrainCommand.Run(o, stdout),
                SynthOptions o => SynthCommand.Run(o, stdout),
                _ => throw new UserError($"unhandled command {options.GetType().Name}"),
            };
        }
        catch (Exception e) when (IsUserError(e))
        {
            stderr.WriteLine($"ftn: error: {OneLine(e.Message)}");
            return 1;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // A bug rather than bad input: still one line by default; the trace on request.
            stderr.WriteLine($"ftn: internal error: {e.GetType().Name}: {OneLine(e.Message)}");
            if (Environment.GetEnvironmentVariable("FTN_DEBUG") is { Length: > 0 }) stderr.WriteLine(e);
            else stderr.WriteLine("ftn: set FTN_DEBUG=1 for the stack trace");
            return 1;
        }
    }

    /// <summary>Exceptions that describe bad input (a path, a file's content, an option value), not a bug.</summary>
    internal static bool IsUserError(Exception e) => e is UserError or IOException or InvalidDataException
        or ArgumentException or FormatException or JsonException or UnauthorizedAccessException or NotSupportedException;

    internal static string OneLine(string s) => s.ReplaceLineEndings(" ").Trim();

    private static int ReportParseErrors(NotParsed<object> result, string[] args, TextWriter stdout, TextWriter stderr)
    {
        var errors = result.Errors.ToList();
        if (errors.Any(e => e is HelpRequestedError or HelpVerbRequestedError or NoVerbSelectedError))
        {
            stdout.WriteLine(BuildHelp(result));
            return errors.Any(e => e is NoVerbSelectedError) && args.Length == 0 ? 2 : 0;
        }
        if (errors.Any(e => e is VersionRequestedError))
        {
            stdout.WriteLine($"ftn {typeof(Program).Assembly.GetName().Version}");
            return 0;
        }
        var verb = result.TypeInfo.Current.GetCustomAttributes(typeof(VerbAttribute), false).OfType<VerbAttribute>().FirstOrDefault();
        string who = verb is null ? "ftn" : $"ftn {verb.Name}";
        string hint = verb is null ? "ftn --help" : $"ftn {verb.Name} --help";
        var sb = SentenceBuilder.Create();
        var first = errors.First();
        string message = first switch
        {
            BadVerbSelectedError b => $"unknown command '{b.Token}' (expected train, generate, info, pretrain or synth)",
            UnknownOptionError u => $"unknown option '{(u.Token.Length == 1 ? "-" : "--")}{u.Token}'",
            MissingRequiredOptionError m => $"missing required option --{m.NameInfo.LongName}",
            MissingValueOptionError m => $"option --{m.NameInfo.LongName} needs a value",
            BadFormatConversionError b => $"bad value for --{b.NameInfo.LongName}: {BadValue(args, b.NameInfo.LongName)}",
            RepeatedOptionError r => $"option --{r.NameInfo.LongName} given more than once",
            _ => OneLine(sb.FormatError(first)),
        };
        stderr.WriteLine($"{who}: {message} (see '{hint}')");
        return 2;
    }

    private static string BadValue(string[] args, string longName)
    {
        for (int i = 0; i < args.Length; i++)
        {
            if (args[i] == "--" + longName && i + 1 < args.Length) return $"'{args[i + 1]}'";
            if (args[i].StartsWith("--" + longName + "=", StringComparison.Ordinal)) return $"'{args[i][(longName.Length + 3)..]}'";
        }
        return "not a valid value";
    }

    internal static string BuildHelp(ParserResult<object> result)
    {
        var help = HelpText.AutoBuild(result, h =>
        {
            h.Heading = "ftn - fine-tune and run Llama-family models in .NET (no Python)";
            h.Copyright = "";
            h.AdditionalNewLineAfterOption = false;
            h.AddDashesToOption = true;
            h.MaximumDisplayWidth = 110;
            h.AddEnumValuesToHelpText = true;
            if (result.TypeInfo.Current == typeof(NullInstance))
            {
                h.AddPostOptionsLine("Run 'ftn COMMAND --help' for the options of one command.");
                h.AddPostOptionsLine("'ftn train' with no --model fine-tunes the embedded model models/ftn-tiny on data/count-plus-one.jsonl.");
            }
            return h;
        }, e => e, verbsIndex: true);
        return help.ToString();
    }
}

/// <summary>An error in what the user asked for (a path, an option value, a file's content): one line, exit 1.</summary>
public sealed class UserError : Exception
{
    public UserError(string message) : base(message) { }
}
