using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Training;

/// <summary>Which base parameters a full fine-tune trains (the rest stay frozen).</summary>
public sealed class FullFineTuneConfig
{
    /// <summary>Train only the top N transformer layers (0 = every layer and every other parameter).</summary>
    public int TopLayers { get; init; }

    /// <summary>
    /// Train only these, in addition to <see cref="TopLayers"/>: a layer index ("3"), or a substring of parameter
    /// names ("lm_head", "model.norm", "embed_tokens", "self_attn", "layers.5.mlp"). Empty with TopLayers = 0: everything.
    /// </summary>
    public IReadOnlyList<string> Trainable { get; init; } = Array.Empty<string>();

    public bool TrainsEverything => TopLayers == 0 && Trainable.Count == 0;

    /// <summary>True when parameter <paramref name="name"/> of a model with <paramref name="numLayers"/> layers is trained.</summary>
    public bool Selects(string name, int numLayers)
    {
        if (TrainsEverything) return true;
        int layer = LayerOf(name);
        if (TopLayers > 0 && layer >= numLayers - TopLayers) return true;
        foreach (var t in Trainable)
        {
            if (int.TryParse(t, out int i)) { if (layer == i) return true; }
            else if (name.Contains(t, StringComparison.Ordinal)) return true;
        }
        return false;
    }

    /// <summary>The layer index in "model.layers.{i}." or -1.</summary>
    public static int LayerOf(string name)
    {
        var m = Regex.Match(name, @"^model\.layers\.(\d+)\.");
        return m.Success ? int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) : -1;
    }

    public void Validate(int numLayers)
    {
        if (TopLayers < 0 || TopLayers > numLayers) throw new ArgumentException($"top layers must be in [0, {numLayers}] (got {TopLayers})");
        foreach (var t in Trainable)
        {
            if (string.IsNullOrWhiteSpace(t)) throw new ArgumentException("an empty trainable-layer name");
            if (int.TryParse(t, out int i) && (i < 0 || i >= numLayers))
                throw new ArgumentException($"trainable layer {i} is outside [0, {numLayers})");
        }
    }
}

/// <summary>
/// Full fine-tuning (<see cref="ITrainableMethod"/> "full"): every base parameter of the model, or the selection of a
/// <see cref="FullFineTuneConfig"/> (layer freezing), trained with f32 master weights.
/// </summary>
/// <remarks>
/// The model's <see cref="LlamaModel.TrainBase"/> gradients (f32) are the gradients. An f32 parameter is its own
/// master; a bf16 parameter gets an f32 master copy that the optimizer updates and rounds
/// into the bf16 weight the model reads (<see cref="TrainableTensor.Rounded"/>; fused AdamW writes both in one pass) (so small updates accumulate in the master instead of being rounded
/// away). Weight decay applies to matrices (embeddings, projections, head), not to 1-D tensors (norms, biases).
/// Save writes a Hugging Face model directory (config.json + model.safetensors in the weights' own dtypes); with
/// bf16 masters it also writes <see cref="MasterFile"/> (f32 masters) so that a checkpoint resumes bit for bit.
/// The weights must be writable (not a memory-mapped file's views): see <see cref="CloneWritable"/>.
/// Frozen parameters get no gradient: their gradient tensors are handed to
/// <see cref="LlamaModel.SetFrozenBaseGradients"/>, so the backward skips their weight-gradient products (they are
/// still zeroed every step and never updated).
/// </remarks>
public sealed class FullFineTune : ITrainableMethod
{
    public const string MasterFile = "ftn_master_weights.safetensors";

    private readonly LlamaModel _model;
    private readonly List<TrainableTensor> _trainable = new();
    private readonly List<(Tensor Weight, Tensor Master)> _masters = new();
    private readonly List<Tensor> _allGrads = new();
    private bool _disposed;

    public FullFineTune(LlamaModel model, FullFineTuneConfig? config = null)
    {
        _model = model;
        Config = config ?? new FullFineTuneConfig();
        Config.Validate(model.Config.NumLayers);
        // The gradients (f32, every base parameter) and the f32 masters of bf16 weights as one range, before either is
        // allocated: on a GPU they then share one pool chunk instead of a chunk each for a big model's tensors, so the
        // gradient norm and the fused AdamW stay one launch (a launch covers at most 8 chunks).
        if (!model.TrainBase)
        {
            long masters = model.Weights.Named().Where(x => x.Tensor.DType == DType.BF16 && Config.Selects(x.Name, model.Config.NumLayers))
                .Sum(x => 4 * x.Tensor.Length + LlamaWeights.TensorSlackBytes);
            model.Backend.Reserve(LlamaWeights.AllocationBytes(model.Config, DType.F32) + masters);
        }
        model.TrainBase = true;
        foreach (var (name, p, g) in model.BaseParameters())
        {
            _allGrads.Add(g);
            if (!Config.Selects(name, model.Config.NumLayers)) continue;
            Tensor param = p;
            Tensor? rounded = null;
            if (p.DType != DType.F32)
            {
                if (p.DType != DType.BF16) throw new InvalidOperationException($"{name}: full fine-tuning trains f32 or bf16 weights, not {p.DType.Name()}");
                param = model.Backend.Allocate(DType.F32, p.Shape);
                param.Name = name + ".master";
                model.Backend.Copy(param, p);
                _masters.Add((p, param));
                rounded = p;
            }
            _trainable.Add(new TrainableTensor(name, param, g, WeightDecay: p.Rank >= 2, Rounded: rounded));
        }
        if (_trainable.Count == 0)
            throw new ArgumentException($"no parameter matches the trainable selection (top {Config.TopLayers} layers; {string.Join(",", Config.Trainable)})");
        var trained = new HashSet<Tensor>(_trainable.Select(t => t.Grad), ReferenceEqualityComparer.Instance);
        model.SetFrozenBaseGradients(_allGrads.Where(g => !trained.Contains(g)));
        IsAttached = true;
    }

    public FullFineTuneConfig Config { get; }

    /// <summary>
    /// A Hugging Face model directory whose tokenizer and generation files (tokenizer.json, tokenizer.model,
    /// tokenizer_config.json, special_tokens_map.json, generation_config.json) <see cref="Save"/> copies, so that the
    /// output is a complete model directory. Null: weights and config only.
    /// </summary>
    public string? CopyFilesFrom { get; init; }

    /// <summary>The files <see cref="CopyFilesFrom"/> contributes.</summary>
    public static readonly string[] CompanionFiles =
        { "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json" };
    public string Kind => "full";
    public IReadOnlyList<TrainableTensor> Trainable => _trainable;
    public long ParameterCount => _trainable.Sum(t => t.Param.Length);
    /// <summary>Parameters that stay frozen.</summary>
    public long FrozenCount => _model.Weights.ParameterCount - ParameterCount;
    /// <summary>Bytes of f32 master copies (bf16 weights only).</summary>
    public long MasterBytes => _masters.Sum(m => m.Master.Length * 4L);
    public bool IsAttached { get; private set; }

    public void ZeroGrad()
    {
        foreach (var g in _allGrads) _model.Backend.Fill(g, 0);
    }

    /// <summary>Nothing: the trainer rounds every master into its bf16 weight (<see cref="TrainableTensor.Rounded"/>).</summary>
    public void AfterStep() { }

    /// <summary>Full fine-tuning changes the base weights themselves: it cannot be detached.</summary>
    public void Attach() { }

    public void Detach() => throw new NotSupportedException("full fine-tuning updates the base weights in place; it cannot be detached");

    public JsonObject DescribeConfig() => new()
    {
        ["method"] = Kind,
        ["top_layers"] = Config.TopLayers,
        ["trainable"] = new JsonArray(Config.Trainable.Select(t => (JsonNode)t).ToArray()),
        ["trainable_parameters"] = ParameterCount,
        ["frozen_parameters"] = FrozenCount,
        ["master_weights"] = _masters.Count > 0 ? "f32 masters over bf16 weights" : "f32 weights",
    };

    /// <summary>Writes the whole model as a Hugging Face directory (and the f32 masters of bf16 weights).</summary>
    public void Save(string dir, string? baseModelNameOrPath = null)
    {
        var meta = new Dictionary<string, string> { ["ftn.method"] = "full" };
        if (baseModelNameOrPath is not null) meta["ftn.base_model"] = baseModelNameOrPath;
        ModelSaver.SaveHf(_model.Weights, dir, metadata: meta);
        string masters = Path.Combine(dir, MasterFile);
        if (_masters.Count > 0)
        {
            var names = _trainable.ToDictionary(t => t.Param, t => t.Name);
            SafeTensors.Write(masters, _masters.Select(m => (names[m.Master], DType.F32, (int[])m.Master.Shape.Clone(), m.Master.ToArray())),
                new Dictionary<string, string> { ["format"] = "ftn-master-weights" });
        }
        else if (File.Exists(masters)) File.Delete(masters);
        if (CopyFilesFrom is not null && Directory.Exists(CopyFilesFrom))
            foreach (var f in CompanionFiles)
            {
                string src = Path.Combine(CopyFilesFrom, f), dst = Path.Combine(dir, f);
                if (!File.Exists(src) || Path.GetFullPath(src) == Path.GetFullPath(dst)) continue;
                string tmp = dst + $".{Environment.ProcessId}.tmp";
                File.Copy(src, tmp, overwrite: true);
                File.Move(tmp, dst, overwrite: true);
            }
    }

    /// <summary>
    /// Reads model.safetensors of a directory written by <see cref="Save"/> into the trainable parameters (and the
    /// masters from <see cref="MasterFile"/> when present), undoing the rotate-half permutation of q/k rows when the
    /// model is in the interleaved RoPE layout.
    /// </summary>
    public void LoadValues(string dir)
    {
        string file = Path.Combine(dir, "model.safetensors");
        if (!File.Exists(file)) throw new FileNotFoundException($"{file}: not found (not a full fine-tune checkpoint?)", file);
        var cfg = _model.Config;
        bool permuted = cfg.RopeLayout == RopeLayout.Interleaved;
        string masterPath = Path.Combine(dir, MasterFile);
        using var st = SafeTensors.Open(file);
        using var ms = File.Exists(masterPath) ? SafeTensors.Open(masterPath) : null;
        var weightOf = _masters.ToDictionary(m => m.Master, m => m.Weight);
        foreach (var t in _trainable)
        {
            if (!st.Contains(t.Name)) throw new InvalidDataException($"{file}: missing tensor '{t.Name}'");
            var info = st.Info(t.Name);
            if (info.ElementCount != t.Param.Length)
                throw new InvalidDataException($"{file}: tensor '{t.Name}' has shape {info.ShapeText}, expected [{string.Join(", ", t.Param.Shape)}]");
            float[] data;
            if (ms is not null && weightOf.ContainsKey(t.Param) && ms.Contains(t.Name)) data = ms.ReadF32(t.Name);
            else
            {
                data = st.ReadF32(t.Name);
                if (permuted && (t.Name.Contains(".q_proj.", StringComparison.Ordinal) || t.Name.Contains(".k_proj.", StringComparison.Ordinal)))
                    data = ModelSaver.RotateHalfToInterleaved(data, t.Name.Contains(".q_proj.", StringComparison.Ordinal) ? cfg.NumHeads : cfg.NumKvHeads, cfg.HeadDim);
            }
            // (master files hold the model's own layout: they are copies of the parameters, never permuted)
            _model.Backend.Upload(t.Param, data);
            if (weightOf.TryGetValue(t.Param, out var w)) _model.Backend.Copy(w, t.Param);
        }
    }

    /// <summary>
    /// A writable copy of <paramref name="w"/> on <paramref name="backend"/>, linear weights in <paramref name="linearDType"/>
    /// (default: the source's), everything else f32: loaded weights may be read-only views of a mapped file.
    /// The copy is reserved as one range first (IBackend.Reserve), so that on a GPU the weights the optimizer writes lie
    /// in one pool chunk and the fused AdamW stays one launch however large they are.
    /// </summary>
    public static LlamaWeights CloneWritable(LlamaWeights w, IBackend backend, DType? linearDType = null)
    {
        var dtype = linearDType ?? w.Layers[0].Wq.DType;
        if (!dtype.IsQuantized()) backend.Reserve(LlamaWeights.AllocationBytes(w.Config, dtype));
        var copy = LlamaWeights.Allocate(w.Config, backend, dtype);
        var src = w.Named().ToList();
        var dst = copy.Named().ToList();
        for (int i = 0; i < src.Count; i++)
        {
            if (src[i].Name != dst[i].Name) throw new InvalidOperationException($"weight order differs: {src[i].Name} vs {dst[i].Name}");
            backend.Copy(dst[i].Tensor, src[i].Tensor);
        }
        return copy;
    }

    /// <summary>Frees the masters and the model's base gradients (TrainBase = false). The trained weights stay in the model.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var (_, m) in _masters) m.Dispose();
        _masters.Clear();
        _model.TrainBase = false;
    }
}
