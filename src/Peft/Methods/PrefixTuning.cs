using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>How the prefix keys/values start.</summary>
public enum PrefixTuningInit
{
    /// <summary>PEFT's default (PrefixEncoder without projection is a torch.nn.Embedding): every value ~ N(0, 1).</summary>
    Random,
    /// <summary>The KV cache of P token ids drawn uniformly from the vocabulary (Li &amp; Liang 2021 initialise from real words' activations).</summary>
    SampleVocab,
    /// <summary>The KV cache of the tokens of a text, repeated or cut to P.</summary>
    Text,
}

/// <summary>Prefix tuning settings (PEFT's PrefixTuningConfig, causal LM).</summary>
/// <param name="ProjectionHiddenSize">0: the prefix itself is trained (prefix_projection = false). &gt; 0: PEFT's
/// prefix_projection = true with encoder_hidden_size = this: an MLP over P embeddings produces the prefix
/// (<see cref="PrefixProjection"/>); it starts from PEFT's random init, so <paramref name="Init"/> must be Random.</param>
public sealed record PrefixTuningConfig(int NumVirtualTokens, PrefixTuningInit Init = PrefixTuningInit.SampleVocab, string? InitText = null, int ProjectionHiddenSize = 0)
{
    public bool Projection => ProjectionHiddenSize > 0;

    public void Validate()
    {
        if (NumVirtualTokens <= 0) throw new ArgumentException($"prefix tuning: num_virtual_tokens must be > 0 (got {NumVirtualTokens})");
        if (Init == PrefixTuningInit.Text && string.IsNullOrEmpty(InitText)) throw new ArgumentException("prefix tuning: TEXT init needs a non-empty init text");
        if (ProjectionHiddenSize < 0) throw new ArgumentException($"prefix tuning: the projection's hidden size must be > 0 (got {ProjectionHiddenSize})");
        if (Projection && Init != PrefixTuningInit.Random)
            throw new ArgumentException($"prefix tuning: with prefix projection the MLP starts from PEFT's random init; {Init} init applies to the prefix itself (no projection)");
    }
}

/// <summary>
/// Prefix tuning (Li &amp; Liang 2021; PEFT's PREFIX_TUNING, optionally through its MLP reparametrisation): in every layer P learned
/// key and value rows per kv head that every query attends to. Attached through <see cref="LlamaModel.Prefix"/>
/// (see <see cref="PrefixSlot"/>: the real tokens sit at positions P..P+T-1 and the prefix keys are not rotated,
/// as when transformers' Llama gets PEFT's past_key_values).
/// </summary>
/// <remarks>
/// PEFT format (peft's PrefixEncoder / get_prompt / _prepare_prompt_learning_config): adapter_model.safetensors holds
/// "prompt_embeddings" of shape (num_virtual_tokens, num_layers·2·token_dim), f32; PEFT views it as
/// (P, L·2, num_attention_heads, token_dim / num_attention_heads), permutes to (L·2, B, heads, P, head_dim) and
/// splits into (key, value) per layer, so column ((l·2 + kind)·NKV + h)·HS + d of row p is layer l's key (kind 0) or
/// value (kind 1) of head h, channel d, virtual token p. For grouped-query models PEFT (since #1901) sets
/// num_attention_heads = num_key_value_heads and token_dim = NKV·HS, which is what this writes and requires.
/// adapter_config.json: peft_type "PREFIX_TUNING", task_type "CAUSAL_LM", num_virtual_tokens, token_dim (NKV·HS),
/// num_attention_heads (NKV), num_layers, num_transformer_submodules 1, encoder_hidden_size (= token_dim),
/// prefix_projection false, inference_mode, base_model_name_or_path, revision, auto_mapping.
/// With prefix_projection = true (<see cref="PrefixProjection"/>) PEFT trains an MLP and saves only its output in
/// "prompt_embeddings" (get_prompt_embedding_to_save), with prefix_projection true and encoder_hidden_size = the MLP width;
/// PEFT loads that for inference as a plain prefix, and so does <see cref="Load"/> when the MLP weights are absent.
/// The MLP weights themselves, which PEFT does not write, go to <see cref="EncoderFile"/> (PEFT's PrefixEncoder names)
/// so that checkpoints resume and a saved adapter continues training with its MLP.
/// </remarks>
public sealed class PrefixTuning : ITrainableMethod
{
    public const string PeftTypeName = "PREFIX_TUNING";
    public const string TensorName = "prompt_embeddings";
    /// <summary>The prefix MLP's weights (prefix projection only; not part of PEFT's files, which hold only its output).</summary>
    public const string EncoderFile = "prefix_encoder.safetensors";

    private readonly LlamaModel _model;
    private readonly PrefixSlot _slot;
    private readonly PrefixProjection? _projection;
    private readonly TrainableTensor[] _trainable;
    private bool _disposed;

    private PrefixTuning(LlamaModel model, PrefixTuningConfig config, PrefixSlot slot, PrefixProjection? projection)
    {
        _model = model;
        Config = config;
        _slot = slot;
        _projection = projection;
        _trainable = projection is null ? [new TrainableTensor(TensorName, slot.Values, slot.Grad, WeightDecay: true)] : projection.Trainable;
        model.Prefix = slot;
        IsAttached = true;
        if (projection is not null) UploadPrefix(projection.Forward());
    }

    public PrefixTuningConfig Config { get; }
    public PrefixSlot Slot => _slot;
    public string Kind => "prefix";
    public IReadOnlyList<TrainableTensor> Trainable => _trainable;
    public bool IsAttached { get; private set; }

    /// <summary>
    /// A new prefix attached to <paramref name="model"/>. SampleVocab/Text run the chosen P tokens through the frozen
    /// model and take its KV cache (keys as rotated at positions 0..P-1: exactly the past_key_values a real prompt would
    /// leave); Random draws N(0, 1) like PEFT. <paramref name="initTokenIds"/> are the init text's ids for Text.
    /// </summary>
    public static PrefixTuning Create(LlamaModel model, PrefixTuningConfig config, ulong seed, IReadOnlyList<int>? initTokenIds = null)
    {
        config.Validate();
        var c = model.Config;
        int p = config.NumVirtualTokens, kvd = c.KvDim, L = c.NumLayers;
        if (config.Projection) return Build(model, config, null, proj => proj.InitRandom(seed));
        var values = new float[L * 2 * p * kvd];
        ulong state = seed ^ 0x2545F4914F6CDD1DUL;
        double Uniform() => (Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53));
        if (config.Init == PrefixTuningInit.Random)
        {
            for (int i = 0; i < values.Length; i += 2)
            {
                double u1 = Math.Max(Uniform(), 1e-300), u2 = Uniform(), r = Math.Sqrt(-2 * Math.Log(u1));
                values[i] = (float)(r * Math.Cos(2 * Math.PI * u2));
                if (i + 1 < values.Length) values[i + 1] = (float)(r * Math.Sin(2 * Math.PI * u2));
            }
        }
        else
        {
            int[] ids;
            if (config.Init == PrefixTuningInit.Text)
            {
                if (initTokenIds is null || initTokenIds.Count == 0) throw new ArgumentException("prefix tuning: TEXT init needs the init text's token ids (it encoded to nothing)");
                ids = Enumerable.Range(0, p).Select(i => initTokenIds[i % initTokenIds.Count]).ToArray();
            }
            else ids = Enumerable.Range(0, p).Select(_ => (int)(Uniform() * c.VocabSize)).ToArray();
            if (p > c.MaxPositions) throw new ArgumentException($"prefix tuning: {p} virtual tokens exceed the model's {c.MaxPositions} positions");
            using var session = new InferenceSession(model.Weights, model.Backend, p);
            session.Prefill(ids);
            for (int l = 0; l < L; l++)
                for (int kind = 0; kind < 2; kind++)
                    session.CacheRows(l, kind, p).CopyTo(values.AsSpan((l * 2 + kind) * p * kvd, p * kvd));
        }
        return Build(model, config, values);
    }

    /// <summary>Allocates the prefix (and the projection when configured) and attaches it: the prefix from
    /// <paramref name="values"/> (our layout), or the projection's parameters set by <paramref name="initProjection"/>.</summary>
    private static PrefixTuning Build(LlamaModel model, PrefixTuningConfig config, float[]? values, Action<PrefixProjection>? initProjection = null)
    {
        if (model.Prefix is not null) throw new InvalidOperationException("the model already has a prefix attached; dispose it first");
        var c = model.Config;
        var b = model.Backend;
        int p = config.NumVirtualTokens;
        var v = b.Allocate(DType.F32, c.NumLayers, 2, p, c.KvDim);
        var g = b.Allocate(DType.F32, c.NumLayers, 2, p, c.KvDim);
        v.Name = TensorName;
        g.Name = TensorName + ".grad";
        PrefixProjection? proj = null;
        try
        {
            if (values is not null) b.Upload(v, values);
            b.Fill(g, 0f);
            if (config.Projection)
            {
                proj = new PrefixProjection(b, p, c.KvDim, config.ProjectionHiddenSize, c.NumLayers * 2 * c.KvDim);
                (initProjection ?? throw new ArgumentException("prefix projection: no initial MLP weights"))(proj);
            }
            return new PrefixTuning(model, config, new PrefixSlot(v, g, c.NumLayers), proj);
        }
        catch
        {
            v.Dispose();
            g.Dispose();
            proj?.Dispose();
            throw;
        }
    }

    /// <summary>The projection's output (PEFT layout) as the prefix the model reads.</summary>
    private void UploadPrefix(float[] peftLayout)
    {
        var c = _model.Config;
        _slot.Values.Backend.Upload(_slot.Values, FromPeftLayout(peftLayout, c.NumLayers, Config.NumVirtualTokens, c.KvDim));
    }

    /// <summary>Our (L, 2, P, KVD) layout → PEFT's (P, L·2·KVD).</summary>
    public static float[] ToPeftLayout(float[] ours, int layers, int p, int kvd)
    {
        var peft = new float[ours.Length];
        for (int lk = 0; lk < layers * 2; lk++)
            for (int t = 0; t < p; t++)
                Array.Copy(ours, ((long)lk * p + t) * kvd, peft, ((long)t * layers * 2 + lk) * kvd, kvd);
        return peft;
    }

    /// <summary>PEFT's (P, L·2·KVD) → our (L, 2, P, KVD) layout.</summary>
    public static float[] FromPeftLayout(float[] peft, int layers, int p, int kvd)
    {
        var ours = new float[peft.Length];
        for (int lk = 0; lk < layers * 2; lk++)
            for (int t = 0; t < p; t++)
                Array.Copy(peft, ((long)t * layers * 2 + lk) * kvd, ours, ((long)lk * p + t) * kvd, kvd);
        return ours;
    }

    /// <summary>
    /// Reads a PEFT prefix-tuning directory and attaches it to <paramref name="model"/>: with its MLP
    /// (<see cref="EncoderFile"/>, written by <see cref="Save"/> of a prefix-projection run) the MLP is what trains;
    /// without it the saved prefix is (PEFT's own prefix_projection adapters hold only the MLP's output).
    /// </summary>
    public static PrefixTuning Load(string dir, LlamaModel model)
    {
        var (p, values) = ReadFiles(dir, model.Config);
        var o = AdapterFiles.ReadConfig(dir);
        if (AdapterFiles.Bool(o, "prefix_projection", false) && File.Exists(Path.Combine(dir, EncoderFile)))
        {
            int h = AdapterFiles.Int(o, "encoder_hidden_size", Path.Combine(dir, AdapterFiles.ConfigFile));
            return Build(model, new PrefixTuningConfig(p, PrefixTuningInit.Random, null, h), null, proj => ReadEncoder(dir, proj));
        }
        return Build(model, new PrefixTuningConfig(p, PrefixTuningInit.Random), values);
    }

    private static void ReadEncoder(string dir, PrefixProjection proj)
    {
        string file = Path.Combine(dir, EncoderFile);
        using var st = Runtime.IO.SafeTensors.Open(file);
        var names = new[] { PrefixProjection.EmbeddingName, PrefixProjection.W1Name, PrefixProjection.B1Name, PrefixProjection.W2Name, PrefixProjection.B2Name };
        foreach (var n in st.Names)
            if (!names.Contains(n)) throw new InvalidDataException($"{file}: unexpected tensor '{n}' (expected {string.Join(", ", names)})");
        foreach (var t in proj.Trainable) proj.Set(t.Name, AdapterFiles.Read(st, file, t.Name, t.Param.Shape.ToArray()));
    }

    /// <summary>P and the values in our (L, 2, P, NKV·HS) layout of a PEFT prefix-tuning directory, checked against the model.</summary>
    public static (int P, float[] Values) ReadFiles(string dir, LlamaConfig model)
    {
        var o = AdapterFiles.ReadConfig(dir);
        string file = Path.Combine(dir, AdapterFiles.ConfigFile);
        string type = AdapterFiles.Str(o, "peft_type", file);
        if (type != PeftTypeName) throw new InvalidDataException($"{file}: peft_type is \"{type}\", expected \"{PeftTypeName}\"");
        if (AdapterFiles.OptStr(o, "task_type") is { } task && task != "CAUSAL_LM") throw new InvalidDataException($"{file}: task_type \"{task}\" is not CAUSAL_LM");
        int p = AdapterFiles.Int(o, "num_virtual_tokens", file);
        if (p <= 0) throw new InvalidDataException($"{file}: num_virtual_tokens must be > 0 (got {p})");
        AdapterFiles.Expect(o, "num_layers", model.NumLayers, file, "the model's number of layers");
        AdapterFiles.Expect(o, "token_dim", model.KvDim, file, "the model's key/value width NKV·HS (PEFT >= 0.12 uses it for grouped-query models)");
        AdapterFiles.Expect(o, "num_attention_heads", model.NumKvHeads, file, "the model's number of key/value heads");
        AdapterFiles.Expect(o, "num_transformer_submodules", 1, file, "a decoder-only model's number of submodules");
        using var st = AdapterFiles.OpenWeights(dir);
        var peft = AdapterFiles.ReadOnly(st, dir, TensorName, [p, model.NumLayers * 2 * model.KvDim]);
        return (p, FromPeftLayout(peft, model.NumLayers, p, model.KvDim));
    }

    public void Save(string dir, string? baseModelNameOrPath = null)
    {
        var c = _model.Config;
        int p = Config.NumVirtualTokens;
        if (_projection is not null)
        {
            Directory.CreateDirectory(dir);
            Runtime.IO.SafeTensors.Write(Path.Combine(dir, EncoderFile),
                _projection.Trainable.Select(t => (t.Name, DType.F32, t.Param.Shape.ToArray(), t.Param.ToArray())),
                new Dictionary<string, string> { ["format"] = "pt" });
        }
        var cfg = new JsonObject
        {
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = baseModelNameOrPath,
            ["encoder_hidden_size"] = _projection?.H ?? c.KvDim,
            ["inference_mode"] = true,
            ["num_attention_heads"] = c.NumKvHeads,
            ["num_layers"] = c.NumLayers,
            ["num_transformer_submodules"] = 1,
            ["num_virtual_tokens"] = p,
            ["peft_type"] = PeftTypeName,
            ["prefix_projection"] = _projection is not null,
            ["revision"] = null,
            ["task_type"] = "CAUSAL_LM",
            ["token_dim"] = c.KvDim,
        };
        var peft = ToPeftLayout(_slot.Values.ToArray(), c.NumLayers, p, c.KvDim);
        AdapterFiles.Write(dir, [(TensorName, [p, c.NumLayers * 2 * c.KvDim], peft)], cfg);
    }

    public void LoadValues(string dir)
    {
        var (p, values) = ReadFiles(dir, _model.Config);
        if (p != Config.NumVirtualTokens)
            throw new InvalidDataException($"{Path.Combine(dir, AdapterFiles.ConfigFile)}: {p} virtual tokens; this prefix has {Config.NumVirtualTokens}");
        if (_projection is null)
        {
            _slot.Values.Backend.Upload(_slot.Values, values);
            return;
        }
        if (!File.Exists(Path.Combine(dir, EncoderFile)))
            throw new InvalidDataException($"{Path.Combine(dir, EncoderFile)}: not found; this prefix is trained through its projection MLP, whose weights that file holds");
        ReadEncoder(dir, _projection);
        UploadPrefix(_projection.Forward());
    }

    public void ZeroGrad()
    {
        _slot.Grad.Backend.Fill(_slot.Grad, 0f);
        _projection?.ZeroGrad();
    }

    /// <summary>With a projection: the prefix gradient the model's backward accumulated over the window goes through the MLP
    /// into its parameters' gradients (+=). No penalty (0).</summary>
    public double AddPenalty()
    {
        if (_projection is null) return 0;
        var c = _model.Config;
        _projection.Backward(ToPeftLayout(_slot.Grad.ToArray(), c.NumLayers, Config.NumVirtualTokens, c.KvDim));
        return 0;
    }

    /// <summary>With a projection: the updated MLP's output becomes the prefix.</summary>
    public void AfterStep()
    {
        if (_projection is not null) UploadPrefix(_projection.Forward());
    }

    public void Attach()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (IsAttached) return;
        if (_model.Prefix is not null) throw new InvalidOperationException("the model already has another prefix attached; detach it first");
        _model.Prefix = _slot;
        IsAttached = true;
    }

    public void Detach()
    {
        if (!IsAttached) return;
        if (ReferenceEquals(_model.Prefix, _slot)) _model.Prefix = null;
        IsAttached = false;
    }

    public JsonObject DescribeConfig() => new()
    {
        ["method"] = Kind,
        ["num_virtual_tokens"] = Config.NumVirtualTokens,
        ["init"] = Config.Init.ToString(),
        ["init_text"] = Config.InitText,
        ["prefix_projection"] = Config.Projection,
        ["encoder_hidden_size"] = Config.Projection ? Config.ProjectionHiddenSize : null,
    };

    public void Dispose()
    {
        if (_disposed) return;
        Detach();
        _disposed = true;
        _slot.Values.Dispose();
        _slot.Grad.Dispose();
        _projection?.Dispose();
    }
}
