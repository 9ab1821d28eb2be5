using System.Globalization;
using System.Reflection;
using System.Text;
using CommandLine;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;
using PeftTrainOptions = FineTuneNative.Peft.Training.TrainOptions;

namespace FineTuneNative.Cli;

// The options of the run itself (optimizer, schedule, evaluation, checkpoints, safety, memory, configuration file)
// and of full fine-tuning; the model/data/LoRA ones stay in TrainCommand.cs, the other methods' in TrainCommand.Methods.cs.
public sealed partial class TrainOptions
{
    [Option("config", MetaValue = "FILE",
        HelpText = "YAML file of options: each key is a flag name without the dashes (lr: 2e-4, batch-size: 8, data: [a.jsonl, b.jsonl], pack: true). Flags given on the command line win. The resolved configuration is saved as config.yaml with every checkpoint.")]
    public string? Config { get; set; }

    [Option("optimizer", MetaValue = "O", HelpText = "adamw (default) or sgd (momentum --momentum).")]
    public string? Optimizer { get; set; }

    [Option("momentum", MetaValue = "M", HelpText = "SGD momentum. Default 0.9.")]
    public double? Momentum { get; set; }

    [Option("lr-scheduler", MetaValue = "S", HelpText = "After warmup: cosine (default), linear (both decay to lr * --min-lr-ratio) or constant.")]
    public string? LrScheduler { get; set; }

    [Option("warmup-ratio", MetaValue = "R", HelpText = "Warmup as a share of the steps (used when --warmup is 0).")]
    public double? WarmupRatio { get; set; }

    [Option("save-every", MetaValue = "N", HelpText = "Write a resumable checkpoint (--out/checkpoint-N, atomic) every N steps. Default 0 (only the final output).")]
    public int? SaveEvery { get; set; }

    [Option("save-total-limit", MetaValue = "K", HelpText = "Keep only the newest K checkpoints. Default 0 (all).")]
    public int? SaveTotalLimit { get; set; }

    [Option("resume", MetaValue = "DIR|latest",
        HelpText = "Continue a run from a checkpoint directory, or 'latest' (the newest complete one under --out); same data and options give the same losses as an uninterrupted run.")]
    public string? Resume { get; set; }

    [Option("early-stopping-patience", MetaValue = "N", HelpText = "Stop when N evaluations in a row do not improve the eval loss (needs --eval-every). Default 0 (off).")]
    public int? EarlyStoppingPatience { get; set; }

    [Option("early-stopping-min-delta", MetaValue = "D", HelpText = "An improvement smaller than D does not count. Default 0.")]
    public double? EarlyStoppingMinDelta { get; set; }

    [Option("keep-best", Default = false, HelpText = "Save the weights of the best evaluation (--out/best) and end the run with them (needs --eval-every).")]
    public bool KeepBest { get; set; }

    [Option("max-skipped-steps", MetaValue = "N", HelpText = "Steps with a NaN/Inf loss or gradient are skipped; N in a row stop the run. Default 5.")]
    public int? MaxSkippedSteps { get; set; }

    [Option("activation-checkpointing", Default = false, HelpText = "Keep only each layer's input and recompute its activations in the backward (less memory, about one more forward per step).")]
    public bool ActivationCheckpointing { get; set; }

    [Option("max-memory", MetaValue = "SIZE",
        HelpText = "Refuse a run whose planned peak memory exceeds SIZE (e.g. 16G). Default: the memory available on the CPU; not checked on a GPU without it.")]
    public string? MaxMemory { get; set; }

    [Option("top-layers", MetaValue = "N", HelpText = "--method full: train only the top N transformer layers (the rest is frozen).")]
    public int? TopLayers { get; set; }

    [Option("trainable-layers", MetaValue = "LIST",
        HelpText = "--method full: train only these: layer indices (0,3) and/or name parts (lm_head, model.norm, embed_tokens, mlp, self_attn).")]
    public string? TrainableLayers { get; set; }
}

/// <summary>The run side of <c>ftn train</c>: YAML configuration, the resolved configuration, full fine-tuning, the memory check.</summary>
internal static class TrainRun
{
    /// <summary>The long names of every option of <c>ftn train</c> (the YAML keys), with their properties.</summary>
    public static IReadOnlyDictionary<string, PropertyInfo> OptionProperties { get; } = typeof(TrainOptions).GetProperties()
        .Select(p => (p, a: p.GetCustomAttribute<OptionAttribute>()))
        .Where(x => x.a is not null && !string.IsNullOrEmpty(x.a.LongName))
        .ToDictionary(x => x.a!.LongName, x => x.p, StringComparer.Ordinal);

    /// <summary>
    /// For <c>ftn train ... --config FILE</c>: the command line with the file's options added as flags (those given on the
    /// command line win). Keys are flag names; scalars become values, true/false switch a flag, sequences are joined
    /// with commas. An unknown key or a nested mapping is an error naming the file and line.
    /// </summary>
    public static string[] ExpandConfig(string[] args)
    {
        if (args.Length == 0 || args[0] != "train") return args;
        int at = Array.FindIndex(args, a => a == "--config" || a.StartsWith("--config=", StringComparison.Ordinal));
        if (at < 0) return args;
        string path = args[at].Contains('=') ? args[at][(args[at].IndexOf('=') + 1)..] : at + 1 < args.Length ? args[at + 1] : throw new UserError("--config needs a file");
        if (!File.Exists(path)) throw new UserError($"--config: {path}: file not found");
        var given = new HashSet<string>(args.Where(a => a.StartsWith("--", StringComparison.Ordinal)).Select(a => a[2..].Split('=')[0]), StringComparer.Ordinal);
        var extra = new List<string>();
        YamlStream yaml = new();
        try
        {
            using var reader = new StreamReader(path, Encoding.UTF8);
            yaml.Load(reader);
        }
        catch (YamlException e) { throw new UserError($"{path}:{e.Start.Line}: invalid YAML: {Program.OneLine(e.Message)}"); }
        if (yaml.Documents.Count == 0) return args;
        if (yaml.Documents[0].RootNode is not YamlMappingNode root)
            throw new UserError($"{path}:{yaml.Documents[0].RootNode.Start.Line}: expected a mapping of option names to values");
        foreach (var (k, v) in root.Children)
        {
            string key = ((k as YamlScalarNode)?.Value ?? "").Trim();
            string where = $"{path}:{k.Start.Line}";
            if (!OptionProperties.TryGetValue(key, out var prop))
            {
                var near = OptionProperties.Keys.OrderBy(n => Distance(n, key)).First();
                throw new UserError($"{where}: unknown option '{key}' (did you mean '{near}'? keys are the flag names of ftn train)");
            }
            if (key == "config") throw new UserError($"{where}: a configuration file cannot name another one");
            if (given.Contains(key)) continue;
            string value = v switch
            {
                YamlScalarNode s => s.Value ?? "",
                YamlSequenceNode seq => string.Join(",", seq.Children.Select(c => c is YamlScalarNode cs ? cs.Value ?? ""
                    : throw new UserError($"{path}:{c.Start.Line}: '{key}': a list holds plain values only"))),
                _ => throw new UserError($"{where}: '{key}': expected a value or a list, not a mapping"),
            };
            if (v is YamlScalarNode { Style: ScalarStyle.Plain } && value is "" or "~" or "null") continue; // YAML null: the default
            bool isFlag = prop.PropertyType == typeof(bool);
            if (isFlag)
            {
                if (value.Equals("true", StringComparison.OrdinalIgnoreCase)) extra.Add("--" + key);
                else if (!value.Equals("false", StringComparison.OrdinalIgnoreCase))
                    throw new UserError($"{where}: '{key}' is a switch: true or false (got '{value}')");
                continue;
            }
            extra.Add("--" + key);
            extra.Add(value);
        }
        return args.Concat(extra).ToArray();
    }

    private static int Distance(string a, string b)
    {
        var d = new int[a.Length + 1, b.Length + 1];
        for (int i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (int j = 0; j <= b.Length; j++) d[0, j] = j;
        for (int i = 1; i <= a.Length; i++)
            for (int j = 1; j <= b.Length; j++)
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
        return d[a.Length, b.Length];
    }

    /// <summary>
    /// The resolved configuration as YAML with the flag names as keys: every option's value after defaults (the trainer's
    /// and LoRA's resolved values for the options left unset), so that <c>--config config.yaml</c> repeats the run.
    /// Options with no value (unset paths) are listed as comments.
    /// </summary>
    public static string ResolvedYaml(TrainOptions o, PeftTrainOptions t, LoraConfig lora, string modelPath, string[] dataPaths, string method)
    {
        var resolved = new Dictionary<string, object?>(StringComparer.Ordinal)
        {
            ["model"] = modelPath, ["data"] = string.Join(",", dataPaths), ["method"] = method,
            ["lr"] = t.LearningRate, ["epochs"] = t.Epochs, ["max-steps"] = t.MaxSteps, ["batch-size"] = t.MicroBatch,
            ["grad-accum"] = t.GradAccum, ["max-len"] = t.MaxLength, ["warmup"] = t.WarmupSteps, ["warmup-ratio"] = t.WarmupRatio,
            ["min-lr-ratio"] = t.MinLrRatio, ["weight-decay"] = t.WeightDecay, ["clip"] = t.ClipNorm, ["seed"] = t.Seed,
            ["eval-fraction"] = t.EvalFraction, ["eval-every"] = t.EvalEvery, ["optimizer"] = t.Optimizer, ["momentum"] = t.Momentum,
            ["lr-scheduler"] = t.LrScheduler, ["save-every"] = t.SaveEvery, ["save-total-limit"] = t.SaveTotalLimit,
            ["early-stopping-patience"] = t.EarlyStoppingPatience, ["early-stopping-min-delta"] = t.EarlyStoppingMinDelta,
            ["max-skipped-steps"] = t.MaxSkippedSteps,
        };
        if (method == "lora")
        {
            resolved["rank"] = lora.Rank; resolved["alpha"] = lora.Alpha; resolved["dropout"] = lora.Dropout;
            resolved["targets"] = string.Join(",", lora.TargetModules);
        }
        var sb = new StringBuilder();
        sb.Append("# ftn train: the resolved configuration of this run (keys are the flag names; `ftn train --config FILE` repeats it)\n");
        foreach (var (name, prop) in OptionProperties.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            if (name is "config" or "resume") continue; // how this run was started, not what it is
            object? v = resolved.TryGetValue(name, out var r) ? r : prop.GetValue(o);
            if (v is null) { sb.Append("# ").Append(name).Append(": (not set)\n"); continue; }
            sb.Append(name).Append(": ").Append(YamlScalar(v)).Append('\n');
        }
        return sb.ToString();
    }

    private static string YamlScalar(object v) => v switch
    {
        bool b => b ? "true" : "false",
        double d => d.ToString("R", CultureInfo.InvariantCulture),
        float f => f.ToString("R", CultureInfo.InvariantCulture),
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        _ => Quote(v.ToString() ?? ""),
    };

    private static string Quote(string s) =>
        s.Length > 0 && s.All(c => char.IsLetterOrDigit(c) || c is '.' or '/' or '_' or '-' or ',' or '+') && !(s is "true" or "false" or "null" or "~")
            ? s : "\"" + s.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal) + "\"";

    /// <summary>The full fine-tuning selection of the options (null when neither --top-layers nor --trainable-layers).</summary>
    public static FullFineTuneConfig FullConfig(TrainOptions o) => new()
    {
        TopLayers = o.TopLayers ?? 0,
        Trainable = (o.TrainableLayers ?? "").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries),
    };

    /// <summary>The checkpoint directory --resume names: a directory, or "latest" under the output directory.</summary>
    public static string? ResumeDir(TrainOptions o, string outDir)
    {
        if (o.Resume is null) return null;
        if (o.Resume is "latest" or "auto")
            return Trainer.LatestCheckpoint(outDir) ?? throw new UserError($"--resume latest: no complete checkpoint under {outDir}");
        if (!File.Exists(Path.Combine(o.Resume, Trainer.StateFile)))
            throw new UserError($"--resume: {o.Resume} is not a training checkpoint (no {Trainer.StateFile})");
        return Path.GetFullPath(o.Resume);
    }

    /// <summary>Prints the memory plan and refuses a run that will not fit (a UserError saying what to change).</summary>
    public static void CheckMemory(MemoryPlan plan, TrainOptions o, Kernels.IBackend backend, TextWriter stdout)
    {
        stdout.WriteLine("memory   plan (expected peak):");
        foreach (var line in plan.Describe().Split('\n')) stdout.WriteLine("        " + line);
        long? limit;
        string source;
        if (o.MaxMemory is not null)
        {
            try { limit = MemoryPlan.ParseSize(o.MaxMemory); }
            catch (ArgumentException e) { throw new UserError("--max-memory: " + e.Message); }
            source = $"--max-memory {o.MaxMemory}";
        }
        else
        {
            limit = MemoryPlan.DetectAvailable(backend, plan.WeightBytes);
            source = "the available memory";
            if (limit is null) { stdout.WriteLine($"memory   free memory of {backend.Name} is not known here: pass --max-memory to check the plan"); return; }
        }
        if (plan.Refusal(limit.Value, source) is { } refusal) throw new UserError(refusal);
    }
}
