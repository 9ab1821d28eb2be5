using System.Globalization;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>Bottleneck adapter settings.</summary>
/// <param name="Size">Bn, the bottleneck width (AdapterHub: hidden size / reduction_factor).</param>
/// <param name="Attention">An adapter on every attention output (AdapterHub's mh_adapter).</param>
/// <param name="Mlp">An adapter on every MLP output (AdapterHub's output_adapter).</param>
/// <param name="Name">The adapter's name inside the tensor keys.</param>
public sealed record BottleneckConfig(int Size, bool Attention = true, bool Mlp = true, string Name = "adapter")
{
    public void Validate()
    {
        if (Size <= 0) throw new ArgumentException($"bottleneck adapters: size must be > 0 (got {Size})");
        if (!Attention && !Mlp) throw new ArgumentException("bottleneck adapters: place them after attention, after the MLP, or both");
        if (string.IsNullOrWhiteSpace(Name) || Name.Contains('.')) throw new ArgumentException($"bottleneck adapters: name '{Name}' must be non-empty without dots");
    }

    public IEnumerable<BottleneckSite> Sites()
    {
        if (Attention) yield return BottleneckSite.Attention;
        if (Mlp) yield return BottleneckSite.Mlp;
    }

    public string SitesText => string.Join(" + ", Sites().Select(s => s == BottleneckSite.Attention ? "attention" : "mlp"));
}

/// <summary>
/// Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020 with only the MLP site): per layer and site
/// y ← y + Up·silu(Down·y + b_down) + b_up on the sublayer output before the residual add, Up and b_up initialised to 0
/// so the model starts unchanged; the base model is frozen. Attached through <see cref="LlamaModel.SetBottleneck"/>.
/// </summary>
/// <remarks>
/// There is no PEFT format for bottleneck adapters (PEFT has none of this type). The files follow the same directory
/// shape as PEFT's so tools that list adapters find them: adapter_config.json with "peft_type": "BOTTLENECK" (our own
/// marker) and AdapterHub-like settings (bottleneck_size, reduction_factor, non_linearity "swish", mh_adapter,
/// output_adapter), and adapter_model.safetensors (f32) with AdapterHub-style names for Llama:
/// "model.layers.{i}.attention_adapters.adapters.{name}.adapter_down.0.weight" (Bn, C), ".adapter_down.0.bias" (Bn),
/// ".adapter_up.weight" (C, Bn), ".adapter_up.bias" (C), and the same under "output_adapters" for the MLP site.
/// AdapterHub's own bottleneck variants (layer norms inside the adapter, residual before the norm, scaling) are not
/// reproduced, so these files are not meant to be loaded by the adapters library.
/// Init: Down ~ U(-1/√C, 1/√C) (torch.nn.Linear's default bound), b_down = 0, Up = 0, b_up = 0.
/// </remarks>
public sealed class BottleneckAdapters : ITrainableMethod
{
    public const string PeftTypeName = "BOTTLENECK";

    private readonly LlamaModel _model;
    private readonly List<(int Layer, BottleneckSite Site, BottleneckSlot Slot)> _slots;
    private readonly TrainableTensor[] _trainable;
    private bool _disposed;

    private BottleneckAdapters(LlamaModel model, BottleneckConfig config, List<(int, BottleneckSite, BottleneckSlot)> slots)
    {
        _model = model;
        Config = config;
        _slots = slots;
        _trainable = Parameters().Select(p => new TrainableTensor(p.Name, p.Param, p.Grad, WeightDecay: p.Param.Rank == 2)).ToArray();
        foreach (var (l, s, slot) in _slots) model.SetBottleneck(l, s, slot);
        IsAttached = true;
    }

    public BottleneckConfig Config { get; }
    /// <summary>Every adapter with its place, layer by layer, attention before MLP.</summary>
    public IReadOnlyList<(int Layer, BottleneckSite Site, BottleneckSlot Slot)> Slots => _slots;
    public string Kind => "bottleneck";
    public IReadOnlyList<TrainableTensor> Trainable => _trainable;
    public bool IsAttached { get; private set; }

    /// <summary>The key prefix of one adapter, e.g. "model.layers.3.output_adapters.adapters.adapter".</summary>
    public static string KeyPrefix(int layer, BottleneckSite site, string name) =>
        $"model.layers.{layer}.{(site == BottleneckSite.Attention ? "attention_adapters" : "output_adapters")}.adapters.{name}";

    /// <summary>Every tensor with its file key and gradient, layer by layer, attention before MLP.</summary>
    public IEnumerable<(string Name, Tensor Param, Tensor Grad)> Parameters()
    {
        foreach (var (l, s, slot) in _slots)
        {
            string p = KeyPrefix(l, s, Config.Name);
            yield return ($"{p}.adapter_down.0.weight", slot.Down, slot.DDown);
            yield return ($"{p}.adapter_down.0.bias", slot.DownBias, slot.DDownBias);
            yield return ($"{p}.adapter_up.weight", slot.Up, slot.DUp);
            yield return ($"{p}.adapter_up.bias", slot.UpBias, slot.DUpBias);
        }
    }

    /// <summary>New identity-initialised adapters on every layer's chosen sites, attached to <paramref name="model"/>.</summary>
    public static BottleneckAdapters Create(LlamaModel model, BottleneckConfig config, ulong seed)
    {
        config.Validate();
        int C = model.Config.HiddenSize, n = config.Size;
        float bound = 1f / MathF.Sqrt(C);
        return Build(model, config, (layer, site) =>
        {
            // each (layer, site) draws from its own stream so the chosen sites do not shift each other
            ulong state = seed ^ (0x9FB21C651E98DF25UL * (ulong)(layer * 2 + (int)site + 1));
            var down = new float[n * C];
            for (int i = 0; i < down.Length; i++)
                down[i] = (float)((2 * ((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53))) - 1) * bound);
            return (down, new float[n], new float[C * n], new float[C]);
        });
    }

    private static BottleneckAdapters Build(LlamaModel model, BottleneckConfig config, Func<int, BottleneckSite, (float[] Down, float[] DownBias, float[] Up, float[] UpBias)> init)
    {
        var b = model.Backend;
        int C = model.Config.HiddenSize, n = config.Size;
        var slots = new List<(int, BottleneckSite, BottleneckSlot)>();
        try
        {
            for (int l = 0; l < model.Config.NumLayers; l++)
                foreach (var site in config.Sites())
                {
                    if (model.GetBottleneck(l, site) is not null)
                        throw new InvalidOperationException($"layer {l} {site} already has a bottleneck adapter; dispose it first");
                    var (down, downBias, up, upBias) = init(l, site);
                    string p = KeyPrefix(l, site, config.Name);
                    Tensor New(string name, float[]? data, params int[] shape)
                    {
                        var t = b.Allocate(DType.F32, shape);
                        t.Name = name;
                        if (data is not null) b.Upload(t, data);
                        return t;
                    }
                    slots.Add((l, site, new BottleneckSlot
                    {
                        Down = New($"{p}.adapter_down.0.weight", down, n, C), DownBias = New($"{p}.adapter_down.0.bias", downBias, n),
                        Up = New($"{p}.adapter_up.weight", up, C, n), UpBias = New($"{p}.adapter_up.bias", upBias, C),
                        DDown = New($"{p}.adapter_down.0.weight.grad", null, n, C), DDownBias = New($"{p}.adapter_down.0.bias.grad", null, n),
                        DUp = New($"{p}.adapter_up.weight.grad", null, C, n), DUpBias = New($"{p}.adapter_up.bias.grad", null, C),
                    }));
                }
            return new BottleneckAdapters(model, config, slots);
        }
        catch
        {
            foreach (var (l, s, slot) in slots)
            {
                if (ReferenceEquals(model.GetBottleneck(l, s), slot)) model.SetBottleneck(l, s, null);
                foreach (var (p, g) in slot.Pairs()) { p.Dispose(); g.Dispose(); }
            }
            throw;
        }
    }

    /// <summary>Reads a bottleneck adapter directory (this format) and attaches it to <paramref name="model"/>.</summary>
    public static BottleneckAdapters Load(string dir, LlamaModel model)
    {
        var (config, tensors) = ReadFiles(dir, model.Config);
        var byKey = tensors.ToDictionary(t => (t.Layer, t.Site));
        return Build(model, config, (l, s) => { var t = byKey[(l, s)]; return (t.Down, t.DownBias, t.Up, t.UpBias); });
    }

    /// <summary>The config and every adapter's values of a bottleneck adapter directory, checked against the model.</summary>
    public static (BottleneckConfig Config, List<(int Layer, BottleneckSite Site, float[] Down, float[] DownBias, float[] Up, float[] UpBias)> Tensors)
        ReadFiles(string dir, LlamaConfig model)
    {
        var o = AdapterFiles.ReadConfig(dir);
        string file = Path.Combine(dir, AdapterFiles.ConfigFile);
        string type = AdapterFiles.Str(o, "peft_type", file);
        if (type != PeftTypeName) throw new InvalidDataException($"{file}: peft_type is \"{type}\", expected \"{PeftTypeName}\"");
        if (AdapterFiles.OptStr(o, "non_linearity") is { } nl && nl != "swish")
            throw new InvalidDataException($"{file}: non_linearity \"{nl}\" is not supported (only \"swish\")");
        AdapterFiles.Expect(o, "num_layers", model.NumLayers, file, "the model's number of layers");
        AdapterFiles.Expect(o, "hidden_size", model.HiddenSize, file, "the model's hidden size");
        var config = new BottleneckConfig(AdapterFiles.Int(o, "bottleneck_size", file), AdapterFiles.Bool(o, "mh_adapter", true),
            AdapterFiles.Bool(o, "output_adapter", true), AdapterFiles.OptStr(o, "adapter_name") ?? "adapter");
        try { config.Validate(); }
        catch (ArgumentException e) { throw new InvalidDataException($"{file}: {e.Message}"); }
        using var st = AdapterFiles.OpenWeights(dir);
        string wfile = Path.Combine(dir, AdapterFiles.WeightsFile);
        int C = model.HiddenSize, n = config.Size;
        var expected = new HashSet<string>(StringComparer.Ordinal);
        var result = new List<(int, BottleneckSite, float[], float[], float[], float[])>();
        for (int l = 0; l < model.NumLayers; l++)
            foreach (var site in config.Sites())
            {
                string p = KeyPrefix(l, site, config.Name);
                string[] names = [$"{p}.adapter_down.0.weight", $"{p}.adapter_down.0.bias", $"{p}.adapter_up.weight", $"{p}.adapter_up.bias"];
                expected.UnionWith(names);
                result.Add((l, site, AdapterFiles.Read(st, wfile, names[0], [n, C]), AdapterFiles.Read(st, wfile, names[1], [n]),
                    AdapterFiles.Read(st, wfile, names[2], [C, n]), AdapterFiles.Read(st, wfile, names[3], [C])));
            }
        foreach (var name in st.Names)
            if (!expected.Contains(name))
                throw new InvalidDataException($"{wfile}: unexpected tensor '{name}' (expected names like '{KeyPrefix(0, config.Sites().First(), config.Name)}.adapter_up.weight')");
        return (config, result);
    }

    public void Save(string dir, string? baseModelNameOrPath = null)
    {
        var c = _model.Config;
        var cfg = new JsonObject
        {
            ["adapter_name"] = Config.Name,
            ["base_model_name_or_path"] = baseModelNameOrPath,
            ["bottleneck_size"] = Config.Size,
            ["format_note"] = "ftn bottleneck adapters: PEFT has no such type; tensor names follow AdapterHub (adapters library) for Llama",
            ["hidden_size"] = c.HiddenSize,
            ["init_weights"] = "up_zero",
            ["mh_adapter"] = Config.Attention,
            ["non_linearity"] = "swish",
            ["num_layers"] = c.NumLayers,
            ["output_adapter"] = Config.Mlp,
            ["peft_type"] = PeftTypeName,
            ["reduction_factor"] = double.Parse(((double)c.HiddenSize / Config.Size).ToString("0.####", CultureInfo.InvariantCulture), CultureInfo.InvariantCulture),
            ["residual_before_ln"] = false,
            ["task_type"] = "CAUSAL_LM",
        };
        AdapterFiles.Write(dir, Parameters().Select(p => (p.Name, (int[])p.Param.Shape.Clone(), p.Param.ToArray())).ToList(), cfg);
    }

    public void LoadValues(string dir)
    {
        var (config, tensors) = ReadFiles(dir, _model.Config);
        if (config != Config)
            throw new InvalidDataException($"{Path.Combine(dir, AdapterFiles.ConfigFile)}: adapters {config} differ from this instance's {Config}");
        var byKey = tensors.ToDictionary(t => (t.Layer, t.Site));
        foreach (var (l, s, slot) in _slots)
        {
            var t = byKey[(l, s)];
            var b = slot.Down.Backend;
            b.Upload(slot.Down, t.Down); b.Upload(slot.DownBias, t.DownBias); b.Upload(slot.Up, t.Up); b.Upload(slot.UpBias, t.UpBias);
        }
    }

    public void ZeroGrad()
    {
        foreach (var (_, _, slot) in _slots)
            foreach (var (_, g) in slot.Pairs()) g.Backend.Fill(g, 0f);
    }

    public void Attach()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (IsAttached) return;
        foreach (var (l, s, _) in _slots)
            if (_model.GetBottleneck(l, s) is not null) throw new InvalidOperationException($"layer {l} {s} already has another bottleneck adapter attached; detach it first");
        foreach (var (l, s, slot) in _slots) _model.SetBottleneck(l, s, slot);
        IsAttached = true;
    }

    public void Detach()
    {
        if (!IsAttached) return;
        foreach (var (l, s, slot) in _slots)
            if (ReferenceEquals(_model.GetBottleneck(l, s), slot)) _model.SetBottleneck(l, s, null);
        IsAttached = false;
    }

    public JsonObject DescribeConfig() => new()
    {
        ["method"] = Kind,
        ["bottleneck_size"] = Config.Size,
        ["mh_adapter"] = Config.Attention,
        ["output_adapter"] = Config.Mlp,
        ["non_linearity"] = "swish",
    };

    public void Dispose()
    {
        if (_disposed) return;
        Detach();
        _disposed = true;
        foreach (var (_, _, slot) in _slots)
            foreach (var (p, g) in slot.Pairs()) { p.Dispose(); g.Dispose(); }
    }
}
