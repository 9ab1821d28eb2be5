using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>How the virtual tokens start (PEFT's PromptTuningInit).</summary>
public enum PromptTuningInit
{
    /// <summary>PEFT "RANDOM": torch.nn.Embedding's default, every value ~ N(0, 1).</summary>
    Random,
    /// <summary>PEFT "TEXT": the embeddings of the tokens of a text, repeated or cut to P.</summary>
    Text,
    /// <summary>PEFT "SAMPLE_VOCAB": the embeddings of P token ids drawn uniformly from the vocabulary.</summary>
    SampleVocab,
}

/// <summary>Prompt tuning settings (PEFT's PromptTuningConfig, causal LM).</summary>
/// <param name="NumVirtualTokens">P, the number of learned virtual tokens.</param>
/// <param name="Init">How they start.</param>
/// <param name="InitText">The text of <see cref="PromptTuningInit.Text"/> (recorded in adapter_config.json).</param>
/// <param name="TokenizerNameOrPath">Recorded in adapter_config.json as PEFT does for TEXT init.</param>
public sealed record PromptTuningConfig(int NumVirtualTokens, PromptTuningInit Init = PromptTuningInit.SampleVocab,
    string? InitText = null, string? TokenizerNameOrPath = null)
{
    public void Validate()
    {
        if (NumVirtualTokens <= 0) throw new ArgumentException($"prompt tuning: num_virtual_tokens must be > 0 (got {NumVirtualTokens})");
        if (Init == PromptTuningInit.Text && string.IsNullOrEmpty(InitText))
            throw new ArgumentException("prompt tuning: TEXT init needs a non-empty init text");
    }

    public static string InitName(PromptTuningInit i) => i switch
    {
        PromptTuningInit.Random => "RANDOM",
        PromptTuningInit.Text => "TEXT",
        _ => "SAMPLE_VOCAB",
    };

    public static PromptTuningInit ParseInit(string s, string file) => s switch
    {
        "RANDOM" => PromptTuningInit.Random,
        "TEXT" => PromptTuningInit.Text,
        "SAMPLE_VOCAB" => PromptTuningInit.SampleVocab,
        _ => throw new InvalidDataException($"{file}: prompt_tuning_init \"{s}\" is not RANDOM, TEXT or SAMPLE_VOCAB"),
    };
}

/// <summary>
/// Prompt tuning (Lester et al. 2021; PEFT's PROMPT_TUNING): P learned embeddings put in front of every sequence's
/// input embeddings; the model is frozen. Attached through <see cref="LlamaModel.Prompt"/>.
/// </summary>
/// <remarks>
/// PEFT format (checked against peft's get_peft_model_state_dict / PromptEmbedding): adapter_model.safetensors holds
/// one tensor "prompt_embeddings" of shape (num_virtual_tokens, token_dim = hidden size), f32; adapter_config.json
/// has peft_type "PROMPT_TUNING", task_type "CAUSAL_LM", num_virtual_tokens, token_dim, num_transformer_submodules 1,
/// num_attention_heads, num_layers, prompt_tuning_init ("RANDOM" | "TEXT" | "SAMPLE_VOCAB"), prompt_tuning_init_text,
/// tokenizer_name_or_path, tokenizer_kwargs, inference_mode, base_model_name_or_path, revision, auto_mapping.
/// At inference PEFT concatenates the embeddings before inputs_embeds (positions 0..P-1) and masks their labels with
/// -100, which is what the model hook does.
/// </remarks>
public sealed class PromptTuning : ITrainableMethod
{
    public const string PeftTypeName = "PROMPT_TUNING";
    public const string TensorName = "prompt_embeddings";

    private readonly LlamaModel _model;
    private readonly PromptSlot _slot;
    private readonly TrainableTensor[] _trainable;
    private bool _disposed;

    private PromptTuning(LlamaModel model, PromptTuningConfig config, PromptSlot slot)
    {
        _model = model;
        Config = config;
        _slot = slot;
        _trainable = [new TrainableTensor(TensorName, slot.Embeddings, slot.Grad, WeightDecay: true)];
        model.Prompt = slot;
        IsAttached = true;
    }

    public PromptTuningConfig Config { get; }
    public PromptSlot Slot => _slot;
    public string Kind => "prompt";
    public IReadOnlyList<TrainableTensor> Trainable => _trainable;
    public bool IsAttached { get; private set; }

    /// <summary>
    /// New virtual tokens attached to <paramref name="model"/>. TEXT init takes the token ids of the init text
    /// (<paramref name="initTokenIds"/>, tokenized by the caller): like PEFT, repeated to P when shorter and cut when
    /// longer. SAMPLE_VOCAB and RANDOM draw from <paramref name="seed"/>.
    /// </summary>
    public static PromptTuning Create(LlamaModel model, PromptTuningConfig config, ulong seed, IReadOnlyList<int>? initTokenIds = null)
    {
        config.Validate();
        var c = model.Config;
        int p = config.NumVirtualTokens, C = c.HiddenSize;
        var values = new float[p * C];
        ulong state = seed ^ 0x5851F42D4C957F2DUL;
        double Uniform() => (Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53));
        switch (config.Init)
        {
            case PromptTuningInit.Random:
                for (int i = 0; i < values.Length; i += 2)
                {
                    // Box-Muller: two N(0, 1) values per pair of uniforms
                    double u1 = Math.Max(Uniform(), 1e-300), u2 = Uniform(), r = Math.Sqrt(-2 * Math.Log(u1));
                    values[i] = (float)(r * Math.Cos(2 * Math.PI * u2));
                    if (i + 1 < values.Length) values[i + 1] = (float)(r * Math.Sin(2 * Math.PI * u2));
                }
                break;
            case PromptTuningInit.Text:
            case PromptTuningInit.SampleVocab:
            {
                int[] ids;
                if (config.Init == PromptTuningInit.Text)
                {
                    if (initTokenIds is null || initTokenIds.Count == 0) throw new ArgumentException("prompt tuning: TEXT init needs the init text's token ids (it encoded to nothing)");
                    ids = Enumerable.Range(0, p).Select(i => initTokenIds[i % initTokenIds.Count]).ToArray();
                }
                else ids = Enumerable.Range(0, p).Select(_ => (int)(Uniform() * c.VocabSize)).ToArray();
                var table = model.Weights.Embedding.ToArray();
                for (int i = 0; i < p; i++)
                {
                    if ((uint)ids[i] >= (uint)c.VocabSize) throw new ArgumentException($"prompt tuning: init token {ids[i]} is outside the vocabulary [0, {c.VocabSize})");
                    Array.Copy(table, (long)ids[i] * C, values, (long)i * C, C);
                }
                break;
            }
        }
        return Build(model, config, values);
    }

    private static PromptTuning Build(LlamaModel model, PromptTuningConfig config, float[] values)
    {
        if (model.Prompt is not null) throw new InvalidOperationException("the model already has prompt-tuning virtual tokens attached; dispose them first");
        var b = model.Backend;
        int p = config.NumVirtualTokens, C = model.Config.HiddenSize;
        var e = b.Allocate(DType.F32, p, C);
        var g = b.Allocate(DType.F32, p, C);
        e.Name = TensorName;
        g.Name = TensorName + ".grad";
        try
        {
            b.Upload(e, values);
            return new PromptTuning(model, config, new PromptSlot(e, g));
        }
        catch
        {
            e.Dispose();
            g.Dispose();
            throw;
        }
    }

    /// <summary>Reads a PEFT prompt-tuning directory and attaches it to <paramref name="model"/>.</summary>
    public static PromptTuning Load(string dir, LlamaModel model)
    {
        var (config, values) = ReadFiles(dir, model.Config);
        return Build(model, config, values);
    }

    /// <summary>The config and the (P, C) embeddings of a PEFT prompt-tuning directory, checked against the model.</summary>
    public static (PromptTuningConfig Config, float[] Values) ReadFiles(string dir, LlamaConfig model)
    {
        var o = AdapterFiles.ReadConfig(dir);
        string file = Path.Combine(dir, AdapterFiles.ConfigFile);
        string type = AdapterFiles.Str(o, "peft_type", file);
        if (type != PeftTypeName) throw new InvalidDataException($"{file}: peft_type is \"{type}\", expected \"{PeftTypeName}\"");
        if (AdapterFiles.OptStr(o, "task_type") is { } task && task != "CAUSAL_LM") throw new InvalidDataException($"{file}: task_type \"{task}\" is not CAUSAL_LM");
        int p = AdapterFiles.Int(o, "num_virtual_tokens", file);
        AdapterFiles.Expect(o, "token_dim", model.HiddenSize, file, "the model's hidden size");
        AdapterFiles.Expect(o, "num_transformer_submodules", 1, file, "a decoder-only model's number of submodules");
        var init = o["prompt_tuning_init"] is null ? PromptTuningInit.Random : PromptTuningConfig.ParseInit(AdapterFiles.Str(o, "prompt_tuning_init", file), file);
        var config = new PromptTuningConfig(p, init, AdapterFiles.OptStr(o, "prompt_tuning_init_text"), AdapterFiles.OptStr(o, "tokenizer_name_or_path"));
        if (p <= 0) throw new InvalidDataException($"{file}: num_virtual_tokens must be > 0 (got {p})");
        using var st = AdapterFiles.OpenWeights(dir);
        return (config, AdapterFiles.ReadOnly(st, dir, TensorName, [p, model.HiddenSize]));
    }

    public void Save(string dir, string? baseModelNameOrPath = null)
    {
        var c = _model.Config;
        var cfg = new JsonObject
        {
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = baseModelNameOrPath,
            ["inference_mode"] = true,
            ["num_attention_heads"] = c.NumHeads,
            ["num_layers"] = c.NumLayers,
            ["num_transformer_submodules"] = 1,
            ["num_virtual_tokens"] = Config.NumVirtualTokens,
            ["peft_type"] = PeftTypeName,
            ["prompt_tuning_init"] = PromptTuningConfig.InitName(Config.Init),
            ["prompt_tuning_init_text"] = Config.Init == PromptTuningInit.Text ? Config.InitText : null,
            ["revision"] = null,
            ["task_type"] = "CAUSAL_LM",
            ["token_dim"] = c.HiddenSize,
            ["tokenizer_kwargs"] = null,
            ["tokenizer_name_or_path"] = Config.Init == PromptTuningInit.Text ? (Config.TokenizerNameOrPath ?? baseModelNameOrPath) : null,
        };
        AdapterFiles.Write(dir, [(TensorName, (int[])_slot.Embeddings.Shape.Clone(), _slot.Embeddings.ToArray())], cfg);
    }

    public void LoadValues(string dir)
    {
        var (config, values) = ReadFiles(dir, _model.Config);
        if (config.NumVirtualTokens != Config.NumVirtualTokens)
            throw new InvalidDataException($"{Path.Combine(dir, AdapterFiles.ConfigFile)}: {config.NumVirtualTokens} virtual tokens; this adapter has {Config.NumVirtualTokens}");
        _slot.Embeddings.Backend.Upload(_slot.Embeddings, values);
    }

    public void ZeroGrad() => _slot.Grad.Backend.Fill(_slot.Grad, 0f);

    public void Attach()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (IsAttached) return;
        if (_model.Prompt is not null) throw new InvalidOperationException("the model already has other prompt-tuning virtual tokens attached; detach them first");
        _model.Prompt = _slot;
        IsAttached = true;
    }

    public void Detach()
    {
        if (!IsAttached) return;
        if (ReferenceEquals(_model.Prompt, _slot)) _model.Prompt = null;
        IsAttached = false;
    }

    public JsonObject DescribeConfig() => new()
    {
        ["method"] = Kind,
        ["num_virtual_tokens"] = Config.NumVirtualTokens,
        ["prompt_tuning_init"] = PromptTuningConfig.InitName(Config.Init),
        ["prompt_tuning_init_text"] = Config.InitText,
    };

    public void Dispose()
    {
        if (_disposed) return;
        Detach();
        _disposed = true;
        _slot.Embeddings.Dispose();
        _slot.Grad.Dispose();
    }
}
