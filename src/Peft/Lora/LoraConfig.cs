using System.Text.Json;
using System.Text.Json.Nodes;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Lora;

/// <summary>
/// LoRA hyper-parameters, with PEFT's meaning: every target linear y = x·Wᵀ gains s·dropout(x)·Aᵀ·Bᵀ where
/// A is (R, in), B is (out, R) and s = alpha / R (alpha / sqrt(R) with rsLoRA).
/// </summary>
public sealed class LoraConfig
{
    public int Rank { get; init; } = 8;
    public float Alpha { get; init; } = 16;
    public float Dropout { get; init; } = 0.05f;
    /// <summary>PEFT module names; default all seven projections of a Llama layer.</summary>
    public string[] TargetModules { get; init; } = (string[])LlamaWeights.LinearModules.Clone();
    /// <summary>Rank-stabilised scaling alpha / sqrt(R) (Kalajdzievski 2023) instead of alpha / R.</summary>
    public bool UseRsLora { get; init; }

    /// <summary>
    /// DoRA (Liu et al. 2024, PEFT use_dora): each adapted linear also learns a per-output-row magnitude m and becomes
    /// y = m ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) / ‖W + s·B·A‖_row (see DoraLinear; with lora_dropout, PEFT's form on the dropped input).
    /// </summary>
    public bool UseDora { get; init; }

    /// <summary>The multiplier s of the low-rank path.</summary>
    public float Scale => UseRsLora ? Alpha / MathF.Sqrt(Rank) : Alpha / Rank;

    /// <summary>Throws with the offending value when the configuration cannot be applied.</summary>
    public void Validate(string source = "LoRA config")
    {
        if (Rank < 1) throw new ArgumentException($"{source}: rank r must be >= 1 (got {Rank})");
        if (!(Alpha > 0) || float.IsInfinity(Alpha)) throw new ArgumentException($"{source}: lora_alpha must be > 0 (got {Alpha})");
        if (!(Dropout >= 0 && Dropout < 1)) throw new ArgumentException($"{source}: lora_dropout must be in [0, 1) (got {Dropout})");
        if (TargetModules.Length == 0) throw new ArgumentException($"{source}: target_modules is empty");
        foreach (var m in TargetModules)
            if (Array.IndexOf(LlamaWeights.LinearModules, m) < 0)
                throw new ArgumentException($"{source}: unknown target module '{m}' (expected any of {string.Join(", ", LlamaWeights.LinearModules)})");
        if (TargetModules.Distinct().Count() != TargetModules.Length)
            throw new ArgumentException($"{source}: target_modules lists a module twice ({string.Join(", ", TargetModules)})");
    }

    /// <summary>
    /// PEFT's adapter_config.json for this adapter (the fields PEFT 0.1x writes for a LoRA on a causal LM; the
    /// optional ones we do not use carry PEFT's defaults so <c>PeftModel.from_pretrained</c> reads it as is).
    /// </summary>
    public string ToPeftJson(string? baseModelNameOrPath)
    {
        var o = new JsonObject
        {
            ["alpha_pattern"] = new JsonObject(),
            ["auto_mapping"] = null,
            ["base_model_name_or_path"] = baseModelNameOrPath,
            ["bias"] = "none",
            ["eva_config"] = null,
            ["exclude_modules"] = null,
            ["fan_in_fan_out"] = false,
            ["inference_mode"] = true,
            ["init_lora_weights"] = true,
            ["layer_replication"] = null,
            ["layers_pattern"] = null,
            ["layers_to_transform"] = null,
            ["loftq_config"] = new JsonObject(),
            ["lora_alpha"] = Alpha == MathF.Round(Alpha) ? (JsonNode)(int)Alpha : (JsonNode)Alpha,
            ["lora_bias"] = false,
            ["lora_dropout"] = (double)(decimal)Dropout,
            ["megatron_config"] = null,
            ["megatron_core"] = "megatron.core",
            ["modules_to_save"] = null,
            ["peft_type"] = "LORA",
            ["r"] = Rank,
            ["rank_pattern"] = new JsonObject(),
            ["revision"] = null,
            ["target_modules"] = new JsonArray(TargetModules.Select(m => (JsonNode)m).ToArray()),
            ["task_type"] = "CAUSAL_LM",
            ["use_dora"] = UseDora,
            ["use_rslora"] = UseRsLora,
        };
        return o.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }

    /// <summary>
    /// Reads a PEFT adapter_config.json. Refuses, naming the field, what this runtime cannot apply: another
    /// peft_type, per-module rank/alpha patterns, trained biases, fan_in_fan_out, layers_to_transform.
    /// target_modules may be a list or a single string (PEFT's regex form is not supported).
    /// </summary>
    public static LoraConfig FromPeftJson(string path)
    {
        JsonNode root;
        try { root = JsonNode.Parse(File.ReadAllText(path)) ?? throw new InvalidDataException($"{path}: empty JSON"); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: invalid JSON at line {(e.LineNumber ?? 0) + 1}: {e.Message}"); }
        if (root is not JsonObject obj) throw new InvalidDataException($"{path}: expected a JSON object");

        T Get<T>(string key, T dflt)
        {
            var n = obj[key];
            if (n is null) return dflt;
            try { return n.GetValue<T>(); }
            catch (Exception e) when (e is InvalidOperationException or FormatException)
            { throw new InvalidDataException($"{path}: \"{key}\" has the wrong type ({n.ToJsonString()}; expected {typeof(T).Name})"); }
        }
        void Refuse(bool bad, string what) { if (bad) throw new InvalidDataException($"{path}: {what} is not supported"); }

        string peftType = Get("peft_type", "");
        if (peftType != "LORA") throw new InvalidDataException($"{path}: peft_type is \"{peftType}\"; only \"LORA\" adapters are supported");
        if (obj["r"] is null) throw new InvalidDataException($"{path}: missing \"r\"");
        Refuse(Get("fan_in_fan_out", false), "fan_in_fan_out = true");
        Refuse(Get("bias", "none") != "none", $"bias = \"{Get("bias", "none")}\"");
        Refuse(Get("lora_bias", false), "lora_bias = true");
        Refuse(obj["rank_pattern"] is JsonObject rp && rp.Count > 0, "a non-empty rank_pattern");
        Refuse(obj["alpha_pattern"] is JsonObject ap && ap.Count > 0, "a non-empty alpha_pattern");
        Refuse(obj["layers_to_transform"] is not null, "layers_to_transform");

        string[] targets = obj["target_modules"] switch
        {
            JsonArray arr => arr.Select(x => x?.GetValue<string>() ?? throw new InvalidDataException($"{path}: null in target_modules")).ToArray(),
            JsonValue v when v.TryGetValue(out string? s) && s is not null => s == "all-linear"
                ? (string[])LlamaWeights.LinearModules.Clone()
                : Array.IndexOf(LlamaWeights.LinearModules, s) >= 0 ? new[] { s }
                : throw new InvalidDataException($"{path}: target_modules \"{s}\" is a pattern; list the module names instead"),
            null => throw new InvalidDataException($"{path}: missing \"target_modules\""),
            var other => throw new InvalidDataException($"{path}: target_modules must be a list of names (got {other.ToJsonString()})"),
        };
        var cfg = new LoraConfig
        {
            Rank = Get("r", 0),
            Alpha = (float)Get("lora_alpha", 8.0),
            Dropout = (float)Get("lora_dropout", 0.0),
            TargetModules = targets,
            UseRsLora = Get("use_rslora", false),
            UseDora = Get("use_dora", false),
        };
        cfg.Validate(path);
        return cfg;
    }
}
