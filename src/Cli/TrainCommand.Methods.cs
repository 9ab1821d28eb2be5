using CommandLine;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Cli;

// The options of `ftn train --method prompt|prefix|bottleneck` (LoRA's stay in TrainCommand.cs).
public sealed partial class TrainOptions
{
    [Option("method", MetaValue = "M",
        HelpText = "What to train: lora (default), prompt (PEFT prompt tuning), prefix (PEFT prefix tuning), bottleneck (bottleneck adapters after attention and MLP) or full (every parameter).")]
    public string? Method { get; set; }

    [Option("num-virtual-tokens", MetaValue = "P", HelpText = "prompt/prefix: number of learned virtual tokens. Default 16.")]
    public int? NumVirtualTokens { get; set; }

    [Option("prompt-init", MetaValue = "I",
        HelpText = "prompt/prefix: how the virtual tokens start: vocab (embeddings / KV cache of random vocabulary tokens), text (of --prompt-init-text), random (PEFT's N(0,1)). Default vocab, or text when --prompt-init-text is given.")]
    public string? PromptInit { get; set; }

    [Option("prompt-init-text", MetaValue = "TEXT", HelpText = "prompt/prefix: the text whose tokens initialise the virtual tokens (repeated or cut to P).")]
    public string? PromptInitText { get; set; }

    [Option("prefix-projection", Default = false,
        HelpText = "prefix: train the prefix through PEFT's MLP reparametrisation (prefix_projection = true: embedding -> Linear -> tanh -> Linear); random init. The saved adapter holds the MLP's output, as PEFT's does, plus the MLP in prefix_encoder.safetensors.")]
    public bool PrefixProjection { get; set; }

    [Option("prefix-hidden-size", MetaValue = "H", HelpText = "prefix: width of the projection MLP (PEFT's encoder_hidden_size). Default NKV*HS (PEFT's default, token_dim).")]
    public int? PrefixHiddenSize { get; set; }

    [Option("bottleneck-size", MetaValue = "N", HelpText = "bottleneck: width of each adapter. Default hidden size / 16, at least 1.")]
    public int? BottleneckSize { get; set; }

    [Option("bottleneck-sites", MetaValue = "S", HelpText = "bottleneck: where the adapters sit: both (after attention and MLP, Houlsby), mlp (Pfeiffer) or attention. Default both.")]
    public string? BottleneckSites { get; set; }
}

/// <summary>Creates the prompt/prefix/bottleneck methods of <c>ftn train</c> and applies trained ones to a generation session.</summary>
internal static class PeftxMethods
{
    /// <summary>The method name of the options: "lora", "prompt", "prefix" or "bottleneck".</summary>
    public static string MethodName(TrainOptions o)
    {
        string m = (o.Method ?? "lora").Trim().ToLowerInvariant();
        if (m is not ("lora" or "prompt" or "prefix" or "bottleneck" or "full"))
            throw new UserError($"--method: unknown method '{o.Method}' (expected lora, prompt, prefix, bottleneck or full)");
        if (m != "lora" && (o.Rank is not null || o.Alpha is not null || o.Dropout is not null || o.RsLora || o.UseRsLora || o.UseDora))
            throw new UserError($"--rank/--alpha/--dropout/--rslora/--use-rslora/--use-dora are LoRA options; --method {m} does not use them");
        if (m is "prompt" or "prefix" or "bottleneck" && (o.EwcLambda is not null || o.EwcData is not null))
            throw new UserError($"--ewc-lambda/--ewc-data apply to LoRA stages; --method {m} does not support them");
        if (m is not ("prompt" or "prefix") && (o.NumVirtualTokens is not null || o.PromptInit is not null || o.PromptInitText is not null))
            throw new UserError("--num-virtual-tokens/--prompt-init/--prompt-init-text belong to --method prompt or prefix");
        if (m != "prefix" && (o.PrefixProjection || o.PrefixHiddenSize is not null))
            throw new UserError("--prefix-projection/--prefix-hidden-size belong to --method prefix");
        if (o.PrefixHiddenSize is not null && !o.PrefixProjection)
            throw new UserError("--prefix-hidden-size is the width of the projection MLP: it needs --prefix-projection");
        if (o.PrefixProjection && o.PromptInit is not null && o.PromptInit.Trim().ToLowerInvariant() != "random" || o.PrefixProjection && o.PromptInitText is not null)
            throw new UserError("--prefix-projection starts the MLP from PEFT's random init; --prompt-init vocab/text apply to the prefix itself (without --prefix-projection)");
        if (m != "bottleneck" && (o.BottleneckSize is not null || o.BottleneckSites is not null))
            throw new UserError("--bottleneck-size/--bottleneck-sites belong to --method bottleneck");
        if (m is "prompt" or "prefix" && o.Pack)
            throw new UserError($"--pack cannot be used with --method {m}: the virtual tokens belong to one sample per row");
        return m;
    }

    /// <summary>Creates and attaches a prompt, prefix or bottleneck method (null for LoRA) and prints one line about it.</summary>
    public static ITrainableMethod? Create(TrainOptions o, LlamaModel model, ITextTokenizer tok, ulong seed, TextWriter stdout)
    {
        string m = MethodName(o);
        if (m is "lora" or "full") return null; // LoRA and full fine-tuning: TrainCommand.CreateMethod
        var c = model.Config;
        try
        {
            if (o.Adapter is not null) return Continue(m, CliCommon.RequireDirectory(o.Adapter, "adapter"), model, stdout);
            switch (m)
            {
                case "prompt":
                case "prefix":
                {
                    int p = o.NumVirtualTokens ?? 16;
                    string init = (o.PromptInit ?? (o.PrefixProjection ? "random" : o.PromptInitText is null ? "vocab" : "text")).Trim().ToLowerInvariant();
                    if (init is not ("vocab" or "text" or "random")) throw new UserError($"--prompt-init: '{o.PromptInit}' is not vocab, text or random");
                    if (init == "text" && string.IsNullOrEmpty(o.PromptInitText)) throw new UserError("--prompt-init text needs --prompt-init-text");
                    // PEFT tokenizes the init text as tokenizer(text)["input_ids"]: with the BOS a Llama tokenizer adds by default
                    int[]? ids = init == "text" ? tok.Encode(o.PromptInitText!, addBos: tok.BosId is not null) : null;
                    if (ids is { Length: 0 }) throw new UserError("--prompt-init-text encodes to no tokens");
                    ITrainableMethod method;
                    if (m == "prompt")
                    {
                        var pi = init switch { "text" => PromptTuningInit.Text, "random" => PromptTuningInit.Random, _ => PromptTuningInit.SampleVocab };
                        method = PromptTuning.Create(model, new PromptTuningConfig(p, pi, o.PromptInitText), seed, ids);
                    }
                    else
                    {
                        var pi = init switch { "text" => PrefixTuningInit.Text, "random" => PrefixTuningInit.Random, _ => PrefixTuningInit.SampleVocab };
                        int hidden = o.PrefixProjection ? o.PrefixHiddenSize ?? c.KvDim : 0;
                        if (o.PrefixProjection && hidden <= 0) throw new UserError($"--prefix-hidden-size must be > 0 (got {hidden})");
                        method = PrefixTuning.Create(model, new PrefixTuningConfig(p, pi, o.PromptInitText, hidden), seed, ids);
                    }
                    stdout.WriteLine($"{m,-8} {p} virtual tokens, init {init}: {CliCommon.Count(method.ParameterCount)} trainable parameters" +
                                     (m == "prefix" ? $" (L={c.NumLayers} x 2 x {c.KvDim} per token" +
                                                      (o.PrefixProjection ? $", through a {c.KvDim} -> {o.PrefixHiddenSize ?? c.KvDim} -> tanh -> {c.NumLayers * 2 * c.KvDim} MLP)" : ")") : ""));
                    return method;
                }
                default:
                {
                    int size = o.BottleneckSize ?? Math.Max(1, c.HiddenSize / 16);
                    string sites = (o.BottleneckSites ?? "both").Trim().ToLowerInvariant();
                    if (sites is not ("both" or "mlp" or "attention")) throw new UserError($"--bottleneck-sites: '{o.BottleneckSites}' is not both, mlp or attention");
                    var cfg = new BottleneckConfig(size, Attention: sites != "mlp", Mlp: sites != "attention");
                    ITrainableMethod method = BottleneckAdapters.Create(model, cfg, seed);
                    stdout.WriteLine($"adapter  bottleneck {size} (swish) on {cfg.SitesText} of {c.NumLayers} layers: {CliCommon.Count(method.ParameterCount)} trainable parameters");
                    return method;
                }
            }
        }
        catch (ArgumentException e)
        {
            throw new UserError(e.Message);
        }
    }

    /// <summary>Staged training: the saved prompt/prefix/bottleneck adapter in <paramref name="dir"/> continues training.</summary>
    private static ITrainableMethod Continue(string m, string dir, LlamaModel model, TextWriter stdout)
    {
        string want = m switch { "prompt" => PromptTuning.PeftTypeName, "prefix" => PrefixTuning.PeftTypeName, _ => BottleneckAdapters.PeftTypeName };
        try
        {
            string type = AdapterFiles.PeftType(dir);
            if (type != want) throw new UserError($"--adapter '{dir}': its peft_type is {type}, not {want} (--method {m})");
            ITrainableMethod method = m switch
            {
                "prompt" => PromptTuning.Load(dir, model),
                "prefix" => PrefixTuning.Load(dir, model),
                _ => BottleneckAdapters.Load(dir, model),
            };
            stdout.WriteLine($"stage    continuing {dir} ({m}): {CliCommon.Count(method.ParameterCount)} trainable parameters");
            return method;
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException or InvalidDataException)
        {
            throw new UserError($"--adapter '{dir}': {Program.OneLine(e.Message)}");
        }
    }

    /// <summary>Positions a method adds in front of a generation (its virtual tokens).</summary>
    public static int ExtraPositions(ITrainableMethod method) => method switch
    {
        PromptTuning p => p.Config.NumVirtualTokens,
        PrefixTuning p => p.Config.NumVirtualTokens,
        _ => 0,
    };

    /// <summary>Applies a trained prompt/prefix/bottleneck method to a generation session (no-op for others).</summary>
    public static void Apply(ITrainableMethod method, InferenceSession session)
    {
        switch (method)
        {
            case PromptTuning p: session.SetPrompt(p.Slot.Embeddings); break;
            case PrefixTuning p: session.SetPrefix(p.Slot); break;
            case BottleneckAdapters a:
                foreach (var (layer, site, slot) in a.Slots) session.SetBottleneck(layer, site, slot);
                break;
        }
    }
}
