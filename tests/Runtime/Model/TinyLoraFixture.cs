using System.Text.Json;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Runtime.Model;

/// <summary>
/// One case of tests/Fixtures/tiny_lora_step.json (made by tests/reference/tiny_lora_step.py: an independent
/// float64 torch implementation with autograd). Weights are float32 values; results are float64.
/// </summary>
internal sealed class TinyLoraCase
{
    public required string Name { get; init; }
    public required LlamaConfig Config { get; init; }
    public required int Batch { get; init; }
    public required int SeqLen { get; init; }
    public required int[] Tokens { get; init; }
    public required int[] Targets { get; init; }
    public required string[] LoraModules { get; init; }
    public required int Rank { get; init; }
    public required float LoraScale { get; init; }
    public required float Dropout { get; init; }
    public required ulong DropoutSeed { get; init; }
    public required float LossScale { get; init; }
    public required double LossSum { get; init; }
    public required int Count { get; init; }
    public required double[] TokenLosses { get; init; }
    public required Dictionary<string, float[]> Weights { get; init; }
    public required Dictionary<string, float[]> LoraWeights { get; init; }
    public required Dictionary<string, double[]> LoraGrads { get; init; }
    public required Dictionary<string, double[]> BaseGrads { get; init; }

    public static string LoraName(int layer, string module, char ab) => $"{LlamaWeights.LinearPath(layer, module)}.lora_{ab}.weight";

    private static readonly Lazy<TinyLoraCase[]> All = new(Load);

    public static TinyLoraCase Get(string name) => All.Value.Single(c => c.Name == name);

    public static IEnumerable<string> Names => All.Value.Select(c => c.Name);

    public static string FixturePath()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string p = Path.Combine(dir.FullName, "tests", "Fixtures", "tiny_lora_step.json");
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException($"tests/Fixtures/tiny_lora_step.json not found above {AppContext.BaseDirectory}");
    }

    private static TinyLoraCase[] Load()
    {
        string path = FixturePath();
        using var doc = JsonDocument.Parse(File.ReadAllText(path));
        var cases = new List<TinyLoraCase>();
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            var cfg = c.GetProperty("config");
            int I(string k) => cfg.GetProperty(k).GetInt32();
            var config = new LlamaConfig
            {
                NumLayers = I("num_hidden_layers"),
                HiddenSize = I("hidden_size"),
                IntermediateSize = I("intermediate_size"),
                NumHeads = I("num_attention_heads"),
                NumKvHeads = I("num_key_value_heads"),
                HeadDim = I("head_dim"),
                VocabSize = I("vocab_size"),
                RmsNormEps = cfg.GetProperty("rms_norm_eps").GetSingle(),
                RopeTheta = cfg.GetProperty("rope_theta").GetSingle(),
                TieWordEmbeddings = cfg.GetProperty("tie_word_embeddings").GetBoolean(),
                AttentionBias = cfg.GetProperty("attention_bias").GetBoolean(),
                RopeLayout = cfg.GetProperty("rope_layout").GetString() switch
                {
                    "rotate_half" => RopeLayout.RotateHalf,
                    "interleaved" => RopeLayout.Interleaved,
                    var s => throw new InvalidDataException($"{path}: unknown rope_layout '{s}'"),
                },
            };
            var lora = c.GetProperty("lora");
            // weights are parsed as float32 directly from their shortest float32 repr (not via double)
            Dictionary<string, float[]> F32(string key) => c.GetProperty(key).EnumerateObject()
                .ToDictionary(p => p.Name, p => p.Value.GetProperty("data").EnumerateArray().Select(x => x.GetSingle()).ToArray());
            Dictionary<string, double[]> F64(string key) => c.GetProperty(key).EnumerateObject()
                .ToDictionary(p => p.Name, p => p.Value.GetProperty("data").EnumerateArray().Select(x => x.GetDouble()).ToArray());
            cases.Add(new TinyLoraCase
            {
                Name = c.GetProperty("name").GetString()!,
                Config = config,
                Batch = c.GetProperty("batch").GetInt32(),
                SeqLen = c.GetProperty("seq_len").GetInt32(),
                Tokens = c.GetProperty("tokens").EnumerateArray().Select(x => x.GetInt32()).ToArray(),
                Targets = c.GetProperty("targets").EnumerateArray().Select(x => x.GetInt32()).ToArray(),
                LoraModules = lora.GetProperty("modules").EnumerateArray().Select(x => x.GetString()!).ToArray(),
                Rank = lora.GetProperty("rank").GetInt32(),
                LoraScale = lora.GetProperty("scale").GetSingle(),
                Dropout = lora.GetProperty("dropout").GetSingle(),
                DropoutSeed = lora.GetProperty("dropout_seed").GetUInt64(),
                LossScale = c.GetProperty("loss_scale").GetSingle(),
                LossSum = c.GetProperty("loss_sum").GetDouble(),
                Count = c.GetProperty("count").GetInt32(),
                TokenLosses = c.GetProperty("token_losses").EnumerateArray().Select(x => x.GetDouble()).ToArray(),
                Weights = F32("weights"),
                LoraWeights = F32("lora_weights"),
                LoraGrads = F64("lora_grads"),
                BaseGrads = F64("base_grads"),
            });
        }
        return cases.ToArray();
    }

    /// <summary>
    /// The fixture's model on <paramref name="backend"/>: weights uploaded by their HF names, and a LoRA slot on
    /// every fixture module (A, B from the fixture; DA, DB zero).
    /// </summary>
    /// <remarks>
    /// <paramref name="linearDType"/> is the dtype of the linear weights (Upload converts); with
    /// <paramref name="roundLinearsToBf16"/> f32 linear weights get the bf16-rounded fixture values.
    /// </remarks>
    public LlamaModel Build(IBackend backend, out LlamaWeights weights, List<Tensor> owned,
        DType linearDType = DType.F32, bool roundLinearsToBf16 = false)
    {
        weights = LlamaWeights.Allocate(Config, backend, linearDType);
        var linears = LlamaWeights.Allocate(Config, backend, DType.BF16).Named()
            .Where(p => { bool bf = p.Tensor.DType == DType.BF16; p.Tensor.Dispose(); return bf; }).Select(p => p.Name).ToHashSet();
        foreach (var (name, t) in weights.Named())
        {
            if (!Weights.TryGetValue(name, out var data)) throw new InvalidDataException($"fixture {Name}: no weight {name}");
            Assert.Equal(t.Length, data.Length);
            if (roundLinearsToBf16 && linears.Contains(name))
                data = Array.ConvertAll(data, x => HalfBits.Bf16ToF32(HalfBits.F32ToBf16(x)));
            backend.Upload(t, data);
        }
        var model = new LlamaModel(weights, backend);
        for (int l = 0; l < Config.NumLayers; l++)
            foreach (var module in LoraModules)
            {
                var a = LoraWeights[LoraName(l, module, 'A')];
                var b = LoraWeights[LoraName(l, module, 'B')];
                int k = weights.Layers[l].Linear(module).Dim(1), n = weights.Layers[l].Linear(module).Dim(0);
                var ta = backend.Allocate(DType.F32, Rank, k);
                var tb = backend.Allocate(DType.F32, n, Rank);
                var da = backend.Allocate(DType.F32, Rank, k);
                var db = backend.Allocate(DType.F32, n, Rank);
                backend.Upload(ta, a);
                backend.Upload(tb, b);
                owned.AddRange(new[] { ta, tb, da, db });
                model.SetLora(l, module, new LoraSlot(ta, tb, da, db, LoraScale, Dropout));
            }
        return model;
    }
}

/// <summary>Backends the model tests run on: "plain" (PlainBackend, this folder) plus the shared test backends.</summary>
internal static class ModelBackends
{
    private static readonly Lazy<PlainBackend> Plain = new(() => new PlainBackend());

    public static IBackend Get(string name) => name == "plain" ? Plain.Value : TestBackends.Get(name);
}
