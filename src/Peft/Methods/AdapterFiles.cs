using System.Text.Json;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>
/// What the adapter directories of the prompt-learning and bottleneck methods share: reading adapter_config.json,
/// opening the weights with clear errors, writing both atomically, and applying a saved adapter of any of these kinds
/// to an <see cref="InferenceSession"/> (prompt/prefix/bottleneck cannot be merged into the weights, unlike LoRA).
/// </summary>
public static class AdapterFiles
{
    public const string ConfigFile = LoraAdapter.ConfigFile;
    public const string WeightsFile = LoraAdapter.WeightsFile;

    /// <summary>The "peft_type" of an adapter directory's adapter_config.json ("LORA", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK").</summary>
    public static string PeftType(string dir) => Str(ReadConfig(dir), "peft_type", Path.Combine(dir, ConfigFile));

    /// <summary>True for the adapter kinds a generation session applies (prompt, prefix, bottleneck) rather than merges into the weights.</summary>
    public static bool IsSessionAdapter(string dir) =>
        File.Exists(Path.Combine(dir, ConfigFile)) && PeftType(dir) is PromptTuning.PeftTypeName or PrefixTuning.PeftTypeName or BottleneckAdapters.PeftTypeName;

    /// <summary>Positions a prompt/prefix adapter occupies in front of the sequence (num_virtual_tokens; 0 for other kinds).</summary>
    public static int VirtualTokens(string dir)
    {
        var o = ReadConfig(dir);
        string type = Str(o, "peft_type", Path.Combine(dir, ConfigFile));
        return type is PromptTuning.PeftTypeName or PrefixTuning.PeftTypeName ? Int(o, "num_virtual_tokens", Path.Combine(dir, ConfigFile)) : 0;
    }

    internal static JsonObject ReadConfig(string dir)
    {
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"adapter directory '{dir}' not found");
        string path = Path.Combine(dir, ConfigFile);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: not found (not an adapter directory?)", path);
        try
        {
            return JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new InvalidDataException($"{path}: not a JSON object");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path}: invalid JSON ({e.Message})");
        }
    }

    internal static string Str(JsonObject o, string key, string file) =>
        o[key] is JsonValue v && v.TryGetValue(out string? s) && s is not null ? s : throw new InvalidDataException($"{file}: \"{key}\" must be a string");

    internal static string? OptStr(JsonObject o, string key) => o[key] is JsonValue v && v.TryGetValue(out string? s) ? s : null;

    internal static int Int(JsonObject o, string key, string file)
    {
        if (o[key] is JsonValue v && v.TryGetValue(out int i)) return i;
        if (o[key] is JsonValue d && d.TryGetValue(out double x) && x == Math.Floor(x) && x is >= int.MinValue and <= int.MaxValue) return (int)x;
        throw new InvalidDataException($"{file}: \"{key}\" must be an integer");
    }

    internal static bool Bool(JsonObject o, string key, bool fallback) => o[key] is JsonValue v && v.TryGetValue(out bool b) ? b : fallback;

    /// <summary>Checks an integer field of the config against the value the model implies.</summary>
    internal static void Expect(JsonObject o, string key, int expected, string file, string why)
    {
        if (o[key] is null) return;
        int got = Int(o, key, file);
        if (got != expected) throw new InvalidDataException($"{file}: \"{key}\" = {got}, but {why} is {expected} (adapter made for another model?)");
    }

    internal static SafeTensors OpenWeights(string dir)
    {
        string path = Path.Combine(dir, WeightsFile);
        if (!File.Exists(path))
            throw new FileNotFoundException(File.Exists(Path.Combine(dir, "adapter_model.bin"))
                ? $"{path}: not found; only adapter_model.bin (PyTorch pickle) is present, which is not supported"
                : $"{path}: not found", path);
        return SafeTensors.Open(path);
    }

    /// <summary>Reads one tensor as f32, checking its name, shape and dtype, and that nothing else is in the file.</summary>
    internal static float[] ReadOnly(SafeTensors st, string dir, string name, int[] shape, IReadOnlyCollection<string>? others = null)
    {
        string file = Path.Combine(dir, WeightsFile);
        foreach (var n in st.Names)
            if (n != name && (others is null || !others.Contains(n)))
                throw new InvalidDataException($"{file}: unexpected tensor '{n}' (expected '{name}'{(others is null ? "" : " and the listed adapter tensors")})");
        return Read(st, file, name, shape);
    }

    internal static float[] Read(SafeTensors st, string file, string name, int[] shape)
    {
        if (!st.Contains(name)) throw new InvalidDataException($"{file}: missing tensor '{name}' (expected shape [{string.Join(", ", shape)}])");
        var info = st.Info(name);
        if (!info.Shape.SequenceEqual(shape))
            throw new InvalidDataException($"{file}: tensor '{name}' has shape {info.ShapeText}, expected [{string.Join(", ", shape)}] (adapter_config.json or the base model do not match)");
        if (info.DTypeName is not ("F32" or "F16" or "BF16"))
            throw new InvalidDataException($"{file}: tensor '{name}' has dtype {info.DTypeName}; expected F32, F16 or BF16");
        return st.ReadF32(name);
    }

    /// <summary>Writes the weights (f32, metadata {"format": "pt"} as PEFT does) then the config, each atomically.</summary>
    internal static void Write(string dir, IEnumerable<(string Name, int[] Shape, float[] Data)> tensors, JsonObject config)
    {
        Directory.CreateDirectory(dir);
        SafeTensors.Write(Path.Combine(dir, WeightsFile), tensors.Select(t => (t.Name, DType.F32, t.Shape, t.Data)),
            new Dictionary<string, string> { ["format"] = "pt" });
        LoraAdapter.WriteAtomic(Path.Combine(dir, ConfigFile), config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>
    /// Applies a saved prompt-tuning, prefix-tuning or bottleneck adapter to <paramref name="session"/> (its tensors are
    /// uploaded to the session's backend and returned: the caller disposes them after the session). LoRA directories
    /// are not handled here (merge them into the weights with <see cref="LoraAdapter.MergeInto(string, LlamaWeights)"/>).
    /// </summary>
    /// <returns>A one-line description and the uploaded tensors.</returns>
    public static (string Description, List<Tensor> Owned) ApplyForInference(string dir, InferenceSession session)
    {
        var c = session.Config;
        var b = session.Backend;
        var owned = new List<Tensor>();
        try
        {
            switch (PeftType(dir))
            {
                case PromptTuning.PeftTypeName:
                {
                    var (cfg, values) = PromptTuning.ReadFiles(dir, c);
                    var e = b.Allocate(DType.F32, cfg.NumVirtualTokens, c.HiddenSize);
                    owned.Add(e);
                    b.Upload(e, values);
                    session.SetPrompt(e);
                    return ($"prompt tuning, {cfg.NumVirtualTokens} virtual tokens", owned);
                }
                case PrefixTuning.PeftTypeName:
                {
                    var (p, values) = PrefixTuning.ReadFiles(dir, c);
                    var v = b.Allocate(DType.F32, c.NumLayers, 2, p, c.KvDim);
                    owned.Add(v);
                    b.Upload(v, values);
                    session.SetPrefix(new PrefixSlot(v, v, c.NumLayers)); // inference reads no gradient
                    return ($"prefix tuning, {p} virtual tokens", owned);
                }
                case BottleneckAdapters.PeftTypeName:
                {
                    var (cfg, tensors) = BottleneckAdapters.ReadFiles(dir, c);
                    foreach (var (layer, site, down, downBias, up, upBias) in tensors)
                    {
                        Tensor Up(float[] data, params int[] shape)
                        {
                            var t = b.Allocate(DType.F32, shape);
                            owned.Add(t);
                            b.Upload(t, data);
                            return t;
                        }
                        var d = Up(down, cfg.Size, c.HiddenSize);
                        var db = Up(downBias, cfg.Size);
                        var u = Up(up, c.HiddenSize, cfg.Size);
                        var ub = Up(upBias, c.HiddenSize);
                        session.SetBottleneck(layer, site, new BottleneckSlot { Down = d, DownBias = db, Up = u, UpBias = ub, DDown = d, DDownBias = db, DUp = u, DUpBias = ub });
                    }
                    return ($"bottleneck adapters, size {cfg.Size} on {cfg.SitesText}", owned);
                }
                case var other:
                    throw new InvalidDataException($"{Path.Combine(dir, ConfigFile)}: peft_type \"{other}\" is not a prompt, prefix or bottleneck adapter");
            }
        }
        catch
        {
            owned.ForEach(t => t.Dispose());
            throw;
        }
    }
}
