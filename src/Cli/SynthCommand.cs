using CommandLine;
using FineTuneNative.Peft.Data;

namespace FineTuneNative.Cli;

[Verb("synth", HelpText = "Write synthetic instruction tasks (the embedded model's pretraining tasks, or held-out ones) as alpaca JSONL.")]
public sealed class SynthOptions
{
    [Option("tasks", Default = "heldout", MetaValue = "LIST",
        HelpText = "Comma-separated task names, or 'pretrain', 'heldout', 'all'. Pretraining tasks: copy, reverse, sort, upper, first, last, count, drop_first, add, sort_digits, max_digit. Held out (never in pretraining): count_plus_one, repeat_twice, swap_ends.")]
    public string Tasks { get; set; } = "heldout";

    [Option("count", Default = 1000, MetaValue = "N", HelpText = "Number of examples to write.")]
    public int Count { get; set; } = 1000;

    [Option("start", Default = 0L, MetaValue = "I", HelpText = "Index of the first example in the (seed, tasks) stream.")]
    public long Start { get; set; }

    [Option("seed", Default = 1UL, MetaValue = "S", HelpText = "Seed of the stream; example i depends only on (seed, i, tasks).")]
    public ulong Seed { get; set; } = 1;

    [Option("out", Default = "-", MetaValue = "FILE", HelpText = "Output JSONL file ('-' = standard output). Written to a temporary name and renamed.")]
    public string Out { get; set; } = "-";
}

/// <summary><c>ftn synth</c>: writes examples of <see cref="SyntheticTasks"/> as alpaca JSONL (how data/count-plus-one.jsonl is made).</summary>
public static class SynthCommand
{
    public static int Run(SynthOptions o, TextWriter stdout)
    {
        if (o.Count < 0) throw new UserError($"--count must be >= 0 (got {o.Count})");
        if (o.Start < 0) throw new UserError($"--start must be >= 0 (got {o.Start})");
        string[] tasks;
        try { tasks = SyntheticTasks.ParseTasks(o.Tasks); }
        catch (ArgumentException e) { throw new UserError($"--tasks: {e.Message}"); }
        var examples = SyntheticTasks.Stream(o.Seed, tasks, o.Start, o.Count);
        if (o.Out == "-")
        {
            foreach (var e in examples) stdout.WriteLine(SyntheticTasks.ToJsonLine(e));
            return 0;
        }
        CliCommon.WriteFileAtomic(o.Out, w => { foreach (var e in examples) w.WriteLine(SyntheticTasks.ToJsonLine(e)); });
        Console.Error.WriteLine($"ftn synth: wrote {o.Count} examples of {string.Join(", ", tasks)} to {o.Out}");
        return 0;
    }
}
