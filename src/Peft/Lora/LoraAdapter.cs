using System.Text;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Lora;

/// <summary>One adapted projection: layer, PEFT module name and the slot attached to the model.</summary>
public sealed record LoraModule(int Layer, string Module, int Out, int In, LoraSlot Slot)
{
    /// <summary>PEFT's key prefix, e.g. "base_model.model.model.layers.3.self_attn.q_proj".</summary>
    public string PeftPrefix => LoraAdapter.PeftPrefix(Layer, Module);
}

/// <summary>
/// LoRA adapters on the linear projections of a <see cref="LlamaModel"/>, in PEFT's layout and file format.
/// </summary>
/// <remarks>
/// Initialisation follows PEFT's default (init_lora_weights = true): A (R, in) ~ kaiming_uniform(a = √5), which
/// for a (R, in) matrix is U(-1/√in, 1/√in); B (out, R) = 0, so a fresh adapter leaves the model unchanged.
/// Files: adapter_config.json (PEFT fields) and adapter_model.safetensors with keys
/// "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight" (R, in) and ".lora_B.weight" (out, R),
/// f32, metadata {"format": "pt"} as PEFT writes it.
/// As an <see cref="ITrainableMethod"/>: every A and B is trainable with weight decay; Save/LoadValues use the PEFT
/// files; Detach/Attach remove and restore the slots on the model.
/// </remarks>
public sealed class LoraAdapter : ITrainableMethod
{
    public const string ConfigFile = "adapter_config.json";
    public const string WeightsFile = "adapter_model.safetensors";

    private readonly LlamaModel _model;
    private readonly List<LoraModule> _modules;
    private readonly TrainableTensor[] _trainable;
    private bool _disposed;

    private LoraAdapter(LlamaModel model, LoraConfig config, List<LoraModule> modules)
    {
        _model = model;
        Config = config;
        _modules = modules;
        // The DoRA magnitude is a per-row scale like a norm weight: no weight decay toward 0 (1-D, as for norms).
        _trainable = Parameters().Select(p => new TrainableTensor(p.Name, p.Param, p.Grad, WeightDecay: !p.Name.EndsWith(MagnitudeKey, StringComparison.Ordinal))).ToArray();
        IsAttached = true;
    }

    public string Kind => "lora";
    public IReadOnlyList<TrainableTensor> Trainable => _trainable;
    public bool IsAttached { get; private set; }

    public LoraConfig Config { get; }
    public IReadOnlyList<LoraModule> Modules => _modules;

    /// <summary>Number of trainable parameters (Σ R·(in + out), plus out per linear with DoRA).</summary>
    public long ParameterCount => _modules.Sum(m => (long)m.Slot.A.Length + m.Slot.B.Length + (m.Slot.Magnitude?.Length ?? 0));

    public static string PeftPrefix(int layer, string module) => $"base_model.model.{LlamaWeights.LinearPath(layer, module)}";

    /// <summary>Every trainable tensor with its PEFT key and gradient: A then B, layer by layer, modules in model order.</summary>
    public IEnumerable<(string Name, Tensor Param, Tensor Grad)> Parameters()
    {
        foreach (var m in _modules)
        {
            yield return ($"{m.PeftPrefix}.lora_A.weight", m.Slot.A, m.Slot.DA);
            yield return ($"{m.PeftPrefix}.lora_B.weight", m.Slot.B, m.Slot.DB);
            if (m.Slot.IsDora) yield return ($"{m.PeftPrefix}.{MagnitudeKey}", m.Slot.Magnitude!, m.Slot.DMagnitude!);
        }
    }

    /// <summary>PEFT's state-dict suffix of a DoRA magnitude (PEFT drops the ".weight" of its DoraLinearLayer when saving).</summary>
    public const string MagnitudeKey = "lora_magnitude_vector";

    /// <summary>Sets every adapter gradient to zero.</summary>
    public void ZeroGrad()
    {
        foreach (var m in _modules)
        {
            m.Slot.DA.Backend.Fill(m.Slot.DA, 0f);
            m.Slot.DB.Backend.Fill(m.Slot.DB, 0f);
            if (m.Slot.DMagnitude is not null) m.Slot.DMagnitude.Backend.Fill(m.Slot.DMagnitude, 0f);
        }
    }

    /// <summary>Creates fresh adapters (PEFT init, reproducible from <paramref name="seed"/>) and attaches them to the model.</summary>
    public static LoraAdapter Create(LlamaModel model, LoraConfig config, ulong seed)
    {
        config.Validate();
        return Build(model, config, (layer, module, n, k) =>
        {
            int r = config.Rank;
            var a = new float[r * k];
            // Each (layer, module) draws from its own stream so that the target set does not shift the others.
            ulong state = seed ^ (0xA24BAED4963EE407UL * (ulong)(layer * 16 + Array.IndexOf(LlamaWeights.LinearModules, module) + 1));
            float bound = 1f / MathF.Sqrt(k);
            for (int i = 0; i < a.Length; i++)
            {
                double u = (Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)); // [0, 1)
                a[i] = (float)((2 * u - 1) * bound);
            }
            return (a, new float[n * r], null);
        });
    }

    /// <summary>
    /// Creates the slots from <paramref name="init"/> (A, B and, for DoRA, the magnitude; a null magnitude is
    /// initialised as PEFT does, to ‖W + s·B·A‖ per row, i.e. ‖W‖ for a fresh adapter) and attaches them.
    /// </summary>
    private static LoraAdapter Build(LlamaModel model, LoraConfig config, Func<int, string, int, int, (float[] A, float[] B, float[]? Magnitude)> init)
    {
        var w = model.Weights;
        var backend = model.Backend;
        var modules = new List<LoraModule>();
        int r = config.Rank;
        try
        {
            for (int layer = 0; layer < w.Layers.Length; layer++)
            {
                foreach (var module in LlamaWeights.LinearModules)
                {
                    if (Array.IndexOf(config.TargetModules, module) < 0) continue;
                    if (model.GetLora(layer, module) is not null)
                        throw new InvalidOperationException($"layer {layer} {module} already has a LoRA adapter; dispose it first");
                    var weight = w.Layers[layer].Linear(module);
                    int n = weight.Dim(0), k = weight.Dim(1);
                    var (aData, bData, magData) = init(layer, module, n, k);
                    string p = PeftPrefix(layer, module);
                    bool dora = config.UseDora;
                    var slot = new LoraSlot
                    {
                        Magnitude = dora ? Named(backend.Allocate(DType.F32, n), $"{p}.{MagnitudeKey}") : null,
                        DMagnitude = dora ? Named(backend.Allocate(DType.F32, n), $"{p}.{MagnitudeKey}.grad") : null,
                        WeightNorm = dora ? Named(backend.Allocate(DType.F32, n), $"{p}.dora_weight_norm") : null,
                        A = Named(backend.Allocate(DType.F32, r, k), $"{p}.lora_A.weight"),
                        B = Named(backend.Allocate(DType.F32, n, r), $"{p}.lora_B.weight"),
                        DA = Named(backend.Allocate(DType.F32, r, k), $"{p}.lora_A.grad"),
                        DB = Named(backend.Allocate(DType.F32, n, r), $"{p}.lora_B.grad"),
                        Scale = config.Scale,
                        Dropout = config.Dropout,
                    };
                    backend.Upload(slot.A, aData);
                    backend.Upload(slot.B, bData);
                    modules.Add(new LoraModule(layer, module, n, k, slot));
                    if (dora)
                    {
                        if (magData is not null) backend.Upload(slot.Magnitude!, magData);
                        else
                        {
                            backend.DoraWeightNorm(slot.WeightNorm!, weight, slot.A, slot.B, config.Scale, n, k, r);
                            backend.Copy(slot.Magnitude!, slot.WeightNorm!);
                        }
                    }
                }
            }
            foreach (var m in modules) model.SetLora(m.Layer, m.Module, m.Slot);
        }
        catch
        {
            foreach (var m in modules) { model.SetLora(m.Layer, m.Module, null); DisposeSlot(m.Slot); }
            throw;
        }
        return new LoraAdapter(model, config, modules);
    }

    private static Tensor Named(Tensor t, string name) { t.Name = name; return t; }

    /// <summary>Re-attaches every slot to the model (after <see cref="Detach"/>).</summary>
    public void Attach()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (IsAttached) return;
        foreach (var m in _modules)
            if (_model.GetLora(m.Layer, m.Module) is not null)
                throw new InvalidOperationException($"layer {m.Layer} {m.Module} already has another LoRA adapter attached; detach it first");
        foreach (var m in _modules) _model.SetLora(m.Layer, m.Module, m.Slot);
        IsAttached = true;
    }

    /// <summary>Removes every slot from the model, keeping the tensors: the model computes the base alone.</summary>
    public void Detach()
    {
        if (!IsAttached) return;
        foreach (var m in _modules)
            if (ReferenceEquals(_model.GetLora(m.Layer, m.Module), m.Slot)) _model.SetLora(m.Layer, m.Module, null);
        IsAttached = false;
    }

    public JsonObject DescribeConfig() => new()
    {
        ["method"] = Kind,
        ["r"] = Config.Rank, ["lora_alpha"] = Config.Alpha, ["lora_dropout"] = Config.Dropout,
        ["target_modules"] = new JsonArray(Config.TargetModules.Select(m => (JsonNode)m).ToArray()),
        ["use_rslora"] = Config.UseRsLora,
        ["use_dora"] = Config.UseDora,
    };

    // ------------------------------------------------------------------------------------------ save / load

    /// <summary>
    /// Writes adapter_config.json and adapter_model.safetensors into <paramref name="dir"/> (created if needed).
    /// Each file is written under a temporary name and renamed into place, weights first.
    /// </summary>
    public void Save(string dir, string? baseModelNameOrPath = null)
    {
        Directory.CreateDirectory(dir);
        var tensors = new List<(string, DType, int[], float[])>();
        foreach (var (name, param, _) in Parameters())
            tensors.Add((name, DType.F32, (int[])param.Shape.Clone(), param.ToArray()));
        SafeTensors.Write(Path.Combine(dir, WeightsFile), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        WriteAtomic(Path.Combine(dir, ConfigFile), Config.ToPeftJson(baseModelNameOrPath));
    }

    /// <summary>Writes text to a temporary file beside <paramref name="path"/> and renames it into place.</summary>
    public static void WriteAtomic(string path, string text)
    {
        string full = Path.GetFullPath(path);
        Directory.CreateDirectory(Path.GetDirectoryName(full)!);
        string tmp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            File.WriteAllText(tmp, text, new UTF8Encoding(false));
            File.Move(tmp, full, overwrite: true);
        }
        finally
        {
            if (File.Exists(tmp)) File.Delete(tmp);
        }
    }

    /// <summary>
    /// Reads a PEFT adapter directory and attaches it to <paramref name="model"/>. Every tensor must be present
    /// with PEFT's name and the shape the model implies; an unexpected tensor is an error (it would otherwise be
    /// silently ignored). F32, F16 and BF16 files are accepted.
    /// </summary>
    public static LoraAdapter Load(string dir, LlamaModel model)
    {
        var (config, weights) = ReadChecked(dir, model.Weights.Config);
        using (weights)
        {
            return Build(model, config, (layer, module, n, k) =>
            {
                string p = PeftPrefix(layer, module);
                return (weights.ReadF32($"{p}.lora_A.weight"), weights.ReadF32($"{p}.lora_B.weight"),
                    config.UseDora ? weights.ReadF32($"{p}.{MagnitudeKey}") : null);
            });
        }
    }

    /// <summary>
    /// Reads the A and B values of the PEFT adapter in <paramref name="dir"/> into this adapter (same rank and target
    /// modules, else an error naming the file).
    /// </summary>
    public void LoadValues(string dir)
    {
        var (config, st) = ReadChecked(dir, _model.Weights.Config);
        using (st)
        {
            if (config.Rank != Config.Rank || config.UseDora != Config.UseDora || !config.TargetModules.OrderBy(x => x, StringComparer.Ordinal).SequenceEqual(Config.TargetModules.OrderBy(x => x, StringComparer.Ordinal)))
                throw new InvalidDataException($"{Path.Combine(dir, ConfigFile)}: r = {config.Rank} on {string.Join(",", config.TargetModules)} (use_dora {config.UseDora}); " +
                    $"this adapter has r = {Config.Rank} on {string.Join(",", Config.TargetModules)} (use_dora {Config.UseDora})");
            foreach (var (name, param, _) in Parameters()) param.Backend.Upload(param, st.ReadF32(name));
        }
    }

    /// <summary>Opens an adapter directory and checks its tensors against the model shape.</summary>
    private static (LoraConfig Config, SafeTensors Weights) ReadChecked(string dir, LlamaConfig model)
    {
        string cfgPath = Path.Combine(dir, ConfigFile);
        string wPath = Path.Combine(dir, WeightsFile);
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"adapter directory '{dir}' not found");
        if (!File.Exists(cfgPath)) throw new FileNotFoundException($"{cfgPath}: not found (not a PEFT adapter directory?)", cfgPath);
        if (!File.Exists(wPath))
            throw new FileNotFoundException(File.Exists(Path.Combine(dir, "adapter_model.bin"))
                ? $"{wPath}: not found; only adapter_model.bin (PyTorch pickle) is present, which is not supported"
                : $"{wPath}: not found", wPath);
        var config = LoraConfig.FromPeftJson(cfgPath);
        var st = SafeTensors.Open(wPath);
        try
        {
            var expected = new HashSet<string>(StringComparer.Ordinal);
            int r = config.Rank;
            for (int layer = 0; layer < model.NumLayers; layer++)
            {
                foreach (var module in config.TargetModules)
                {
                    var (n, k) = LinearShape(model, module);
                    string p = PeftPrefix(layer, module);
                    Check(st, wPath, $"{p}.lora_A.weight", new[] { r, k });
                    Check(st, wPath, $"{p}.lora_B.weight", new[] { n, r });
                    expected.Add($"{p}.lora_A.weight");
                    expected.Add($"{p}.lora_B.weight");
                    if (config.UseDora)
                    {
                        Check(st, wPath, $"{p}.{MagnitudeKey}", new[] { n });
                        expected.Add($"{p}.{MagnitudeKey}");
                    }
                }
            }
            foreach (var name in st.Names)
                if (!expected.Contains(name))
                    throw new InvalidDataException($"{wPath}: unexpected tensor '{name}' (the config targets {string.Join(", ", config.TargetModules)} " +
                        $"with r = {r} on {model.NumLayers} layers; expected names like '{PeftPrefix(0, config.TargetModules[0])}.lora_A.weight')");
            return (config, st);
        }
        catch
        {
            st.Dispose();
            throw;
        }
    }

    private static void Check(SafeTensors st, string file, string name, int[] shape)
    {
        if (!st.Contains(name)) throw new InvalidDataException($"{file}: missing tensor '{name}' (expected shape [{string.Join(", ", shape)}])");
        var info = st.Info(name);
        if (!info.Shape.SequenceEqual(shape))
            throw new InvalidDataException($"{file}: tensor '{name}' has shape {info.ShapeText}, expected [{string.Join(", ", shape)}] " +
                "(rank or model dimensions do not match adapter_config.json / the base model)");
        if (info.DTypeName is not ("F32" or "F16" or "BF16"))
            throw new InvalidDataException($"{file}: tensor '{name}' has dtype {info.DTypeName}; expected F32, F16 or BF16");
    }

    /// <summary>(out, in) of a projection.</summary>
    public static (int Out, int In) LinearShape(LlamaConfig c, string module) => module switch
    {
        "q_proj" => (c.QDim, c.HiddenSize),
        "k_proj" or "v_proj" => (c.KvDim, c.HiddenSize),
        "o_proj" => (c.HiddenSize, c.QDim),
        "gate_proj" or "up_proj" => (c.IntermediateSize, c.HiddenSize),
        "down_proj" => (c.HiddenSize, c.IntermediateSize),
        _ => throw new ArgumentException($"unknown linear module '{module}'"),
    };

    // ------------------------------------------------------------------------------------------ merge

    /// <summary>
    /// Folds this adapter into <paramref name="weights"/>: W += s·B·A for every adapted projection (accumulated in
    /// double, rounded once to W's dtype). Merge into weights that no LoRA-carrying model also applies, or the
    /// update counts twice.
    /// </summary>
    public void MergeInto(LlamaWeights weights)
    {
        foreach (var m in _modules)
            MergeOne(weights.Layers[m.Layer].Linear(m.Module), m.Slot.A.ToArray(), m.Slot.B.ToArray(), m.Slot.Magnitude?.ToArray(), m.Out, m.In, Config.Rank, Config.Scale,
                $"layer {m.Layer} {m.Module}");
    }

    /// <summary>Reads a PEFT adapter directory and folds it into <paramref name="weights"/> (for inference without a training model).</summary>
    public static LoraConfig MergeInto(string dir, LlamaWeights weights)
    {
        var (config, st) = ReadChecked(dir, weights.Config);
        using (st)
        {
            for (int layer = 0; layer < weights.Layers.Length; layer++)
                foreach (var module in config.TargetModules)
                {
                    var (n, k) = LinearShape(weights.Config, module);
                    string p = PeftPrefix(layer, module);
                    MergeOne(weights.Layers[layer].Linear(module), st.ReadF32($"{p}.lora_A.weight"), st.ReadF32($"{p}.lora_B.weight"),
                        config.UseDora ? st.ReadF32($"{p}.{MagnitudeKey}") : null, n, k, config.Rank, config.Scale, p);
                }
        }
        return config;
    }

    /// <summary>W += s·B·A; with a DoRA magnitude m, W = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row (PEFT's merge).</summary>
    private static void MergeOne(Tensor w, float[] a, float[] b, float[]? magnitude, int n, int k, int r, float scale, string what)
    {
        if (w.Length != (long)n * k) throw new InvalidOperationException($"{what}: weight {w.Describe()} is not ({n}, {k})");
        if (w.DType.IsQuantized()) throw new InvalidOperationException($"{what}: cannot merge into a {w.DType.Name()} weight; load the base unquantized to merge");
        var data = w.ToArray();
        var row = new double[k];
        for (int i = 0; i < n; i++)
        {
            Array.Clear(row);
            for (int j = 0; j < r; j++)
            {
                double bij = b[i * r + j];
                if (bij == 0) continue;
                int off = j * k;
                for (int c = 0; c < k; c++) row[c] += bij * a[off + c];
            }
            int o = i * k;
            if (magnitude is null)
            {
                for (int c = 0; c < k; c++) data[o + c] = (float)(data[o + c] + scale * row[c]);
                continue;
            }
            double ss = 0;
            for (int c = 0; c < k; c++) { row[c] = data[o + c] + scale * row[c]; ss += row[c] * row[c]; }
            double f = magnitude[i] / Math.Sqrt(ss);
            for (int c = 0; c < k; c++) data[o + c] = (float)(row[c] * f);
        }
        w.Backend.Upload(w, data);
    }

    // ------------------------------------------------------------------------------------------ lifetime

    /// <summary>Detaches the adapters from the model and frees their tensors.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var m in _modules)
        {
            if (ReferenceEquals(_model.GetLora(m.Layer, m.Module), m.Slot)) _model.SetLora(m.Layer, m.Module, null);
            DisposeSlot(m.Slot);
        }
    }

    private static void DisposeSlot(LoraSlot s)
    {
        s.A.Dispose();
        s.B.Dispose();
        s.DA.Dispose();
        s.DB.Dispose();
        s.Magnitude?.Dispose();
        s.DMagnitude?.Dispose();
        s.WeightNorm?.Dispose();
    }
}
