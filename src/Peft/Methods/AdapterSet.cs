using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>
/// Several LoRA adapters loaded on one base model: one per task, switched without reloading the base
/// (<see cref="Activate"/>), or stacked (<see cref="ActivateStack"/>): the sum of their updates Σ_i s_i·B_i·A_i.
/// </summary>
/// <remarks>
/// A stack is applied as one LoRA slot per linear of rank Σ r_i: A = [A_1; A_2; ...] (rows concatenated) and
/// B = [s_1·B_1, s_2·B_2, ...] (columns concatenated, each scaled by its adapter's s) with scale 1, so
/// B·A = Σ s_i·B_i·A_i exactly and no base weight is modified (it works over an NF4 base too). A linear that only
/// some adapters target gets zero rows/columns for the others. DoRA adapters are not additive (each renormalises
/// the whole weight) and cannot be stacked.
/// </remarks>
public sealed class AdapterSet : IDisposable
{
    private readonly LlamaModel _model;
    private readonly Dictionary<string, LoraAdapter> _adapters = new(StringComparer.Ordinal);
    private readonly List<string> _order = new();
    private readonly List<(int Layer, string Module, LoraSlot Slot)> _stack = new();

    public AdapterSet(LlamaModel model) => _model = model;

    public IReadOnlyList<string> Names => _order;
    /// <summary>The active adapters: none (the base alone), one, or a stack.</summary>
    public IReadOnlyList<string> Active { get; private set; } = Array.Empty<string>();

    public LoraAdapter this[string name] => _adapters.TryGetValue(name, out var a) ? a
        : throw new KeyNotFoundException($"no adapter named '{name}' (loaded: {string.Join(", ", _order)})");

    /// <summary>Loads the PEFT adapter in <paramref name="dir"/> under <paramref name="name"/>, detached (the active set is unchanged).</summary>
    public LoraAdapter Load(string name, string dir)
    {
        if (_adapters.ContainsKey(name)) throw new ArgumentException($"an adapter named '{name}' is already loaded");
        var active = Active;
        Deactivate();
        var a = LoraAdapter.Load(dir, _model);
        a.Detach();
        _adapters[name] = a;
        _order.Add(name);
        Apply(active);
        return a;
    }

    /// <summary>Makes <paramref name="name"/> the only active adapter (null: the base alone).</summary>
    public void Activate(string? name) => Apply(name is null ? Array.Empty<string>() : new[] { name });

    /// <summary>Applies the sum of the updates of <paramref name="names"/> (one name: that adapter itself).</summary>
    public void ActivateStack(params string[] names) => Apply(names);

    private void Apply(IReadOnlyList<string> names)
    {
        foreach (var n in names) _ = this[n];
        Deactivate();
        if (names.Count == 1) this[names[0]].Attach();
        else if (names.Count > 1) BuildStack(names);
        Active = names.ToArray();
    }

    private void Deactivate()
    {
        foreach (var a in _adapters.Values) a.Detach();
        foreach (var (layer, module, slot) in _stack)
        {
            if (ReferenceEquals(_model.GetLora(layer, module), slot)) _model.SetLora(layer, module, null);
            slot.A.Dispose(); slot.B.Dispose(); slot.DA.Dispose(); slot.DB.Dispose();
        }
        _stack.Clear();
        Active = Array.Empty<string>();
    }

    private void BuildStack(IReadOnlyList<string> names)
    {
        var adapters = names.Select(n => this[n]).ToArray();
        foreach (var (a, n) in adapters.Zip(names))
            if (a.Config.UseDora) throw new InvalidOperationException($"adapter '{n}' is DoRA: DoRA updates renormalise the weight and do not add up; stack plain LoRA adapters");
        var b = _model.Backend;
        var w = _model.Weights;
        for (int layer = 0; layer < w.Layers.Length; layer++)
            foreach (var module in LlamaWeights.LinearModules)
            {
                var parts = adapters.Select(a => a.Modules.FirstOrDefault(m => m.Layer == layer && m.Module == module)).ToArray();
                if (parts.All(p => p is null)) continue;
                var lin = w.Layers[layer].Linear(module);
                int n = lin.Dim(0), k = lin.Dim(1);
                int r = adapters.Sum(a => a.Config.Rank);
                var aData = new float[(long)r * k];
                var bData = new float[(long)n * r];
                int r0 = 0;
                for (int i = 0; i < adapters.Length; i++)
                {
                    int ri = adapters[i].Config.Rank;
                    if (parts[i] is { } p)
                    {
                        p.Slot.A.ToArray().CopyTo(aData, (long)r0 * k);
                        var bi = p.Slot.B.ToArray();
                        float s = adapters[i].Config.Scale;
                        for (int j = 0; j < n; j++)
                            for (int q = 0; q < ri; q++) bData[(long)j * r + r0 + q] = s * bi[(long)j * ri + q];
                    }
                    r0 += ri;
                }
                var slot = new LoraSlot(b.Allocate(DType.F32, r, k), b.Allocate(DType.F32, n, r), b.Allocate(DType.F32, r, k), b.Allocate(DType.F32, n, r), 1f, 0f);
                b.Upload(slot.A, aData);
                b.Upload(slot.B, bData);
                _model.SetLora(layer, module, slot);
                _stack.Add((layer, module, slot));
            }
    }

    /// <summary>
    /// Folds the sum of the updates of the PEFT adapters in <paramref name="dirs"/> into <paramref name="weights"/>
    /// (inference: `ftn generate --adapter A --adapter B`). One DoRA adapter alone is merged as DoRA; DoRA in a stack is refused.
    /// </summary>
    public static void StackInto(LlamaWeights weights, IReadOnlyList<string> dirs)
    {
        if (dirs.Count > 1)
            foreach (var d in dirs)
                if (LoraConfig.FromPeftJson(Path.Combine(d, LoraAdapter.ConfigFile)).UseDora)
                    throw new InvalidOperationException($"{d}: a DoRA adapter cannot be stacked with others (DoRA updates renormalise the weight and do not add up)");
        foreach (var d in dirs) LoraAdapter.MergeInto(d, weights);
    }

    public void Dispose()
    {
        Deactivate();
        foreach (var a in _adapters.Values) a.Dispose();
        _adapters.Clear();
        _order.Clear();
    }
}
