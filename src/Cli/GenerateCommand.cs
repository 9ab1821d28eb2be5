using System.Diagnostics;
using CommandLine;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Cli;

[Verb("generate", HelpText = "Generate text from a model, optionally with a LoRA adapter (PEFT directory) merged in.")]
public sealed class GenerateOptions : DeviceOptions
{
    [Option("model", MetaValue = "PATH",
        HelpText = "Hugging Face model directory or llama2.c .bin checkpoint. Default: the embedded models/ftn-tiny.")]
    public string? Model { get; set; }

    [Option("tokenizer", MetaValue = "PATH", HelpText = "Tokenizer file or directory (default: the one next to the model).")]
    public string? Tokenizer { get; set; }

    [Option("adapter", MetaValue = "DIR", Separator = ',',
        HelpText = "Adapter directory (adapter_config.json + adapter_model.safetensors): PEFT LoRA/DoRA (merged before generating), PEFT prompt or prefix tuning, or ftn bottleneck adapters (applied while generating). Repeat it (or give DIR,DIR) to stack LoRA adapters: their updates add up.")]
    public IEnumerable<string> Adapters { get; set; } = Array.Empty<string>();

    [Option("prompt", Required = true, MetaValue = "TEXT",
        HelpText = "The instruction. It is wrapped in the alpaca template used for training (\"### Instruction:\\n...\\n\\n### Response:\\n\") unless --raw is given.")]
    public string Prompt { get; set; } = "";

    [Option("input", Default = "", MetaValue = "TEXT", HelpText = "The alpaca input field (the \"### Input:\" block), e.g. the words a task works on.")]
    public string Input { get; set; } = "";

    [Option("raw", Default = false, HelpText = "Continue the prompt text as is (BOS + prompt), without the instruction template.")]
    public bool Raw { get; set; }

    [Option("max-new-tokens", Default = 128, MetaValue = "N", HelpText = "Most tokens to generate (generation also stops at EOS).")]
    public int MaxNewTokens { get; set; } = 128;

    [Option("temperature", Default = 0f, MetaValue = "T", HelpText = "Sampling temperature; 0 = greedy (argmax).")]
    public float Temperature { get; set; }

    [Option("top-k", Default = 0, MetaValue = "K", HelpText = "Sample only among the K most likely tokens (0 = no limit).")]
    public int TopK { get; set; }

    [Option("top-p", Default = 1f, MetaValue = "P", HelpText = "Nucleus sampling: the smallest set of tokens whose probability reaches P (1 = no limit).")]
    public float TopP { get; set; } = 1f;

    [Option("seed", Default = 0UL, MetaValue = "S", HelpText = "Sampling seed (same seed, same text).")]
    public ulong Seed { get; set; }

    [Option("chat-template", Default = "auto", MetaValue = "T",
        HelpText = "Prompt format, as in ftn train: auto (the model's chat_template, else the alpaca format), none, a built-in name, a .jinja file or a tokenizer_config.json.")]
    public string ChatTemplate { get; set; } = "auto";

    [Option("system", Default = "", MetaValue = "TEXT", HelpText = "A system message (chat templates) or system text (alpaca format).")]
    public string System { get; set; } = "";

    [Option("quant", Default = "f32", MetaValue = "TYPE",
        HelpText = "Weight precision for generation on the cpu device: f32, bf16, f16 (IEEE half storage, f32 compute), q8_0 or q4_0 (GGUF block layouts, quantized in memory after adapters are merged).")]
    public string Quant { get; set; } = "f32";

    [Option("kv-cache", Default = "auto", MetaValue = "TYPE",
        HelpText = "KV cache storage: auto (the default: bf16 on a cuda device, f32 on the cpu), f32 or bf16. bf16 halves the cache (half the bytes each decoded token reads) and rounds k, v and q as ftn train --attention-dtype bf16; with a cuda device on sm_80+ the prompt runs through the tensor-core flash attention. The cpu device's fused decoder reads an f32 cache only, so bf16 there turns it off.")]
    public string KvCache { get; set; } = "auto";
}

/// <summary><c>ftn generate</c>: streams a completion to standard output; statistics go to standard error.</summary>
public static partial class GenerateCommand
{
    /// <summary>--kv-cache: f32, bf16, or auto (null) = bf16 on a CUDA device, f32 elsewhere.</summary>
    /// <remarks>On CUDA the bf16 cache pays twice: the prefill reaches the tensor-core flash attention (sm_80+) and the
    /// decode kernel reads half the cache bytes per token. The CPU's fused decoder reads an f32 cache only (a bf16 cache
    /// turns it off and widens on the fly), and the simulator is a test device: both keep f32.</remarks>
    internal static FineTuneNative.Kernels.DType ParseKvCache(string? name, string device) => name?.Trim().ToLowerInvariant() switch
    {
        null or "" or "auto" => IsCudaDevice(device) ? FineTuneNative.Kernels.DType.BF16 : FineTuneNative.Kernels.DType.F32,
        "f32" or "float32" => FineTuneNative.Kernels.DType.F32,
        "bf16" or "bfloat16" => FineTuneNative.Kernels.DType.BF16,
        _ => throw new UserError($"--kv-cache: '{name}' is not a KV cache type; expected auto, f32 or bf16"),
    };

    /// <summary>True for the --device names Backends.Create maps to ILGPU's CUDA accelerator (cuda, cuda:N, gpu, gpu:N).</summary>
    internal static bool IsCudaDevice(string device) =>
        device.Trim().Split(':')[0].ToLowerInvariant() is "cuda" or "gpu";

    public static int Run(GenerateOptions o, TextWriter stdout)
    {
        if (o.MaxNewTokens <= 0) throw new UserError($"--max-new-tokens must be > 0 (got {o.MaxNewTokens})");
        var kvCache = ParseKvCache(o.KvCache, o.Device); // refused before anything loads
        if (o.Temperature < 0 || !float.IsFinite(o.Temperature)) throw new UserError($"--temperature must be >= 0 (got {o.Temperature})");
        if (o.TopK < 0) throw new UserError($"--top-k must be >= 0 (got {o.TopK})");
        if (!(o.TopP > 0 && o.TopP <= 1)) throw new UserError($"--top-p must be in (0, 1] (got {o.TopP})");
        if (o.Raw && o.Input.Length > 0) throw new UserError("--input belongs to the instruction template; it cannot be used with --raw");
        var adapters = o.Adapters.Select(a => CliCommon.RequireDirectory(a, "adapter")).ToArray();
        string? adapter = adapters.Length == 1 ? adapters[0] : null;                         // a session adapter needs its one directory
        string? adapterLabel = adapters.Length == 0 ? null : string.Join(" + ", adapters);
        string path = ModelSource.Resolve(o.Model);

        using var backend = CliCommon.CreateBackend(o);
        using var loaded = ModelSource.Load(path, backend);
        var tok = ModelSource.LoadTokenizer(path, o.Tokenizer);
        // prompt/prefix/bottleneck adapters are applied by the session; LoRA is merged into a copy of the weights
        bool sessionAdapter = adapter is not null && Wrap(adapter, () => AdapterFiles.IsSessionAdapter(adapter));
        foreach (var a in adapters.Length > 1 ? adapters : Array.Empty<string>())
            if (Wrap(a, () => AdapterFiles.IsSessionAdapter(a)))
                throw new UserError($"adapter '{a}': only LoRA adapters can be stacked (prompt/prefix/bottleneck adapters are applied one at a time)");
        int adapterPositions = sessionAdapter ? Wrap(adapter!, () => AdapterFiles.VirtualTokens(adapter!)) : 0;
        using var merged = adapters.Length == 0 || sessionAdapter ? null : ModelSource.CloneWritable(loaded.Weights, backend);
        if (merged is not null)
        {
            try { FineTuneNative.Peft.Methods.AdapterSet.StackInto(merged, adapters); }
            catch (Exception e) when (e is FileNotFoundException or InvalidDataException or ArgumentException or InvalidOperationException)
            {
                throw new UserError($"adapter '{adapterLabel}': {Program.OneLine(e.Message)}");
            }
        }
        var weights = merged ?? loaded.Weights;
        FineTuneNative.Kernels.DType quant;
        try { quant = WeightQuantizer.Parse(o.Quant); }
        catch (ArgumentException e) { throw new UserError(Program.OneLine(e.Message)); }
        if ((FineTuneNative.Kernels.DTypeExtensions.IsBlockQuantized(quant) || quant == FineTuneNative.Kernels.DType.F16) && backend.Name != "cpu") throw new UserError($"--quant {o.Quant} runs on the cpu device only (got '{backend.Name}')");
        using var quantized = quant == FineTuneNative.Kernels.DType.F32 ? null : WeightQuantizer.Quantize(weights, quant);
        weights = quantized ?? weights;

        // the prompt is built exactly as training built it: the same chat template (or the same alpaca format)
        ChatTemplate? template;
        try { template = o.Raw ? null : ChatTemplate.Resolve(o.ChatTemplate, path, tok); }
        catch (Exception e) when (e is ArgumentException or InvalidDataException or TemplateException) { throw new UserError(Program.OneLine(e.Message)); }
        var record = DatasetRecord.Alpaca(o.Prompt, o.Input, "", o.System);
        int[] prompt;
        if (o.Raw) prompt = tok.Encode(o.Prompt, addBos: tok.BosId is not null);
        else if (template is not null)
        {
            var messages = record.AsMessages().Where(m => m.Role != "assistant").ToList();
            try { prompt = new SampleEncoder(tok, new EncodeOptions { Template = template }).EncodePrompt(messages); }
            catch (TemplateException e) { throw new UserError(Program.OneLine(e.Message)); }
        }
        else prompt = ExactMatch.PromptIds(tok, record);
        int maxLen = Math.Min(weights.Config.MaxPositions, adapterPositions + prompt.Length + o.MaxNewTokens);
        if (adapterPositions + prompt.Length >= weights.Config.MaxPositions)
            throw new UserError($"the prompt has {prompt.Length} tokens{(adapterPositions > 0 ? $" after the adapter's {adapterPositions} virtual tokens" : "")}; the model holds at most {weights.Config.MaxPositions} positions");
        using var session = new InferenceSession(weights, backend, maxLen, kvCacheDType: kvCache);
        var adapterTensors = sessionAdapter ? Wrap(adapter!, () => AdapterFiles.ApplyForInference(adapter!, session).Owned) : null;
        using var releaseAdapter = new DisposeAll(adapterTensors);
        var options = new GenerationOptions
        {
            MaxNewTokens = Math.Min(o.MaxNewTokens, maxLen - adapterPositions - prompt.Length),
            Temperature = o.Temperature,
            TopK = o.TopK,
            TopP = o.TopP,
            Seed = o.Seed,
            StopTokenIds = tok.EosIds.ToArray(),
        };
        var sw = Stopwatch.StartNew();
        var decoder = new StreamingDecoder(tok);
        var generated = Generator.Generate(session, prompt, options, id => { stdout.Write(decoder.Push(id)); stdout.Flush(); });
        stdout.WriteLine(decoder.Flush());
        double secs = sw.Elapsed.TotalSeconds;
        Console.Error.WriteLine($"ftn generate: {prompt.Length} prompt tokens, {generated.Length} new tokens in {CliCommon.F(secs, "0.00")} s " +
                                $"({CliCommon.F(generated.Length / Math.Max(1e-9, secs), "0.0")} tok/s){(adapterLabel is null ? "" : $", adapter {adapterLabel}")}");
        return 0;
    }
}
