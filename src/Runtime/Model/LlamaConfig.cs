using System.Text.Json;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// The Llama-family architecture as described by a Hugging Face config.json (LlamaForCausalLM, Qwen2ForCausalLM,
/// MistralForCausalLM...) or a llama2.c checkpoint header.
/// Dimension names: C hidden, F ffn, L layers, NH heads, NKV kv heads, HS head size, V vocab.
/// </summary>
public sealed record LlamaConfig
{
    public string ModelType { get; init; } = "llama";
    public string Architecture { get; init; } = "LlamaForCausalLM";
    public int HiddenSize { get; init; }          // C
    public int IntermediateSize { get; init; }    // F
    public int NumLayers { get; init; }           // L
    public int NumHeads { get; init; }            // NH
    public int NumKvHeads { get; init; }          // NKV
    public int HeadDim { get; init; }             // HS
    public int VocabSize { get; init; }           // V
    public int MaxPositions { get; init; } = 2048;
    public float RmsNormEps { get; init; } = 1e-5f;
    public float RopeTheta { get; init; } = 10000f;
    public bool TieWordEmbeddings { get; init; }
    /// <summary>q/k/v projections carry biases (Qwen2).</summary>
    public bool AttentionBias { get; init; }
    /// <summary>HF checkpoints use rotate-half; llama2.c checkpoints interleaved pairs.</summary>
    public RopeLayout RopeLayout { get; init; } = RopeLayout.RotateHalf;
    public int? BosTokenId { get; init; }
    public int[] EosTokenIds { get; init; } = Array.Empty<int>();
    /// <summary>torch_dtype of the checkpoint ("float32", "bfloat16", "float16").</summary>
    public string TorchDtype { get; init; } = "float32";

    public int QDim => NumHeads * HeadDim;
    public int KvDim => NumKvHeads * HeadDim;

    /// <summary>Throws with the file name and the offending field when the numbers do not describe a valid model.</summary>
    public void Validate(string source)
    {
        void Req(bool ok, string msg) { if (!ok) throw new InvalidDataException($"{source}: {msg}"); }
        Req(HiddenSize > 0, "hidden_size must be > 0");
        Req(IntermediateSize > 0, "intermediate_size must be > 0");
        Req(NumLayers > 0, "num_hidden_layers must be > 0");
        Req(NumHeads > 0, "num_attention_heads must be > 0");
        Req(NumKvHeads > 0 && NumHeads % NumKvHeads == 0, $"num_key_value_heads ({NumKvHeads}) must divide num_attention_heads ({NumHeads})");
        Req(HeadDim > 0 && HeadDim % 2 == 0, $"head_dim ({HeadDim}) must be even and > 0");
        Req(VocabSize > 0, "vocab_size must be > 0");
        Req(RmsNormEps > 0, "rms_norm_eps must be > 0");
        Req(RopeTheta > 0, "rope_theta must be > 0");
    }

    /// <summary>Reads a Hugging Face config.json.</summary>
    public static LlamaConfig FromHfJson(string path)
    {
        JsonNode root;
        try { root = JsonNode.Parse(File.ReadAllText(path)) ?? throw new InvalidDataException($"{path}: empty JSON"); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: invalid JSON at line {e.LineNumber + 1}: {e.Message}"); }
        int Int(string key, int? dflt = null)
        {
            var n = root[key];
            if (n is null) return dflt ?? throw new InvalidDataException($"{path}: missing \"{key}\"");
            return n.GetValue<int>();
        }
        float Float(string key, float dflt) => root[key] is { } n ? (float)n.GetValue<double>() : dflt;
        string modelType = root["model_type"]?.GetValue<string>() ?? "llama";
        string arch = root["architectures"] is JsonArray a && a.Count > 0 ? a[0]!.GetValue<string>() : "LlamaForCausalLM";
        int hidden = Int("hidden_size");
        int heads = Int("num_attention_heads");
        var eos = root["eos_token_id"] switch
        {
            null => Array.Empty<int>(),
            JsonArray arr => arr.Select(x => x!.GetValue<int>()).ToArray(),
            JsonNode n => new[] { n.GetValue<int>() },
        };
        var cfg = new LlamaConfig
        {
            ModelType = modelType,
            Architecture = arch,
            HiddenSize = hidden,
            IntermediateSize = Int("intermediate_size"),
            NumLayers = Int("num_hidden_layers"),
            NumHeads = heads,
            NumKvHeads = Int("num_key_value_heads", heads),
            HeadDim = root["head_dim"] is { } hd ? hd.GetValue<int>() : hidden / heads,
            VocabSize = Int("vocab_size"),
            MaxPositions = Int("max_position_embeddings", 2048),
            RmsNormEps = Float("rms_norm_eps", 1e-6f),
            RopeTheta = Float("rope_theta", 10000f),
            TieWordEmbeddings = root["tie_word_embeddings"]?.GetValue<bool>() ?? false,
            AttentionBias = root["attention_bias"]?.GetValue<bool>() ?? modelType == "qwen2",
            BosTokenId = root["bos_token_id"]?.GetValue<int>(),
            EosTokenIds = eos,
            TorchDtype = root["torch_dtype"]?.GetValue<string>() ?? "float32",
        };
        cfg.Validate(path);
        return cfg;
    }

    /// <summary>A Hugging Face config.json for this architecture (rotate-half layout is implied by HF).</summary>
    public string ToHfJson()
    {
        var o = new JsonObject
        {
            ["architectures"] = new JsonArray(Architecture),
            ["model_type"] = ModelType,
            ["hidden_size"] = HiddenSize,
            ["intermediate_size"] = IntermediateSize,
            ["num_hidden_layers"] = NumLayers,
            ["num_attention_heads"] = NumHeads,
            ["num_key_value_heads"] = NumKvHeads,
            ["head_dim"] = HeadDim,
            ["vocab_size"] = VocabSize,
            ["max_position_embeddings"] = MaxPositions,
            ["rms_norm_eps"] = RmsNormEps,
            ["rope_theta"] = RopeTheta,
            ["tie_word_embeddings"] = TieWordEmbeddings,
            ["attention_bias"] = AttentionBias,
            ["hidden_act"] = "silu",
            ["torch_dtype"] = TorchDtype,
        };
        if (BosTokenId is int bos) o["bos_token_id"] = bos;
        if (EosTokenIds.Length == 1) o["eos_token_id"] = EosTokenIds[0];
        else if (EosTokenIds.Length > 1) o["eos_token_id"] = new JsonArray(EosTokenIds.Select(x => (JsonNode)x).ToArray());
        return o.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }
}
