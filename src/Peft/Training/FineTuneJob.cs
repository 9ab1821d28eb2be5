using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Peft.Training;

/// <summary>The prepared data of a run: the two splits, the problems found, and how to pad.</summary>
public sealed class PreparedData
{
    public required List<TokenizedSample> Train { get; init; }
    public required List<TokenizedSample> Eval { get; init; }
    /// <summary>Malformed records and dropped samples, each with file:line.</summary>
    public required List<DatasetIssue> Issues { get; init; }
    public required int PadId { get; init; }
    public int RecordsRead { get; init; }
    /// <summary>What the data pipeline did (mixture, cleaning, lengths, truncation, EOS check, packing).</summary>
    public List<string> Report { get; init; } = new();
    /// <summary>The chat template the samples were rendered with (null = the built-in format); generation uses it too.</summary>
    public ChatTemplate? Template { get; init; }
}

/// <summary>
/// A whole LoRA fine-tune from paths: create the backend, load model and tokenizer, read and split the data,
/// attach fresh adapters, train, save the adapter and the metrics into the output directory. What `ftn train`
/// runs.
/// </summary>
public sealed class FineTuneJob
{
    /// <summary>A Hugging Face model directory or a llama2.c checkpoint (see ModelLoader).</summary>
    public required string ModelPath { get; init; }
    /// <summary>Tokenizer file or directory when the model does not carry one (a llama2.c checkpoint).</summary>
    public string? TokenizerPath { get; init; }
    /// <summary>One or more JSON / JSONL dataset files.</summary>
    public required IReadOnlyList<string> DatasetPaths { get; init; }
    public required string OutputDir { get; init; }
    public LoraConfig Lora { get; init; } = new();
    public TrainOptions Options { get; init; } = new();
    /// <summary>Use at most this many records (after reading, before the split; 0 = all).</summary>
    public int MaxRecords { get; init; }
    /// <summary>Chat template, cleaning, mixture weights, test split, augmentation, packing, NEFTune.</summary>
    public DataOptions Data { get; init; } = new();

    /// <summary>QLoRA: "nf4" stores the frozen base's linear projections in NF4 (null/"none": as loaded).</summary>
    public string? BaseQuant { get; init; }
    /// <summary>Staged training: continue this saved PEFT adapter (its own config) instead of creating a fresh one.</summary>
    public string? ContinueAdapter { get; init; }
    /// <summary>EWC strength λ (0 = off); needs <see cref="EwcDataPaths"/> or an ewc_state.safetensors in <see cref="ContinueAdapter"/>.</summary>
    public double EwcLambda { get; init; }
    /// <summary>The previous stage's datasets, on which the EWC Fisher is estimated (with the continued adapter).</summary>
    public IReadOnlyList<string>? EwcDataPaths { get; init; }
    /// <summary>Previous-stage samples used for the Fisher estimate (0 = all). Default 64.</summary>
    public int EwcSamples { get; init; } = 64;
    /// <summary>Set by <see cref="Run"/> with QLoRA: the base's memory before and after quantization.</summary>
    public Methods.QuantizedBase? Quantization { get; private set; }

    public Action<string>? Log { get; init; }
    /// <summary>Skipped records reported through <see cref="Log"/> (all of them go to OutputDir/data_issues.txt).</summary>
    public int MaxIssuesLogged { get; init; } = 10;
    public Action<TrainProgress>? OnProgress { get; init; }
    public Action<EvalProgress>? OnEval { get; init; }

    /// <summary>Reads, cleans, splits and encodes datasets (see <see cref="DataPipeline"/>). Never throws for malformed
    /// records (they become issues).</summary>
    public static PreparedData Prepare(IReadOnlyList<string> paths, ITextTokenizer tokenizer, TrainOptions o, int maxRecords = 0,
        DataOptions? data = null, string? modelPath = null)
    {
        var d = DataPipeline.Prepare(paths, tokenizer, data ?? new DataOptions(), o.MaxLength, o.TrainOnPrompt, o.EvalFraction, o.Seed, maxRecords, modelPath);
        return new PreparedData { Train = d.Train, Eval = d.Eval, Issues = d.Issues, PadId = d.PadId, RecordsRead = d.RecordsRead, Report = d.Report, Template = d.Template };
    }

    /// <summary>Full fine-tuning (every parameter, or a layer selection) instead of LoRA; the output is a Hugging Face model directory.</summary>
    public FullFineTuneConfig? Full { get; init; }

    public TrainResult Run(CancellationToken cancel = default)
    {
        Options.Validate();
        Lora.Validate();
        using var backend = Backends.Create(Options.Device);
        using var loaded = ModelLoader.Load(ModelPath, backend);
        // A Hugging Face directory carries its tokenizer; a llama2.c checkpoint needs one named.
        var tokenizer = TokenizerLoader.Load(TokenizerPath ?? (Directory.Exists(ModelPath) ? ModelPath
            : throw new ArgumentException($"{ModelPath}: a single-file checkpoint carries no tokenizer; pass a tokenizer path")));
        if (tokenizer.VocabSize > loaded.Weights.Config.VocabSize)
            throw new ArgumentException($"tokenizer vocabulary ({tokenizer.VocabSize}) is larger than the model's ({loaded.Weights.Config.VocabSize})");
        Log?.Invoke($"model: {loaded.Path} ({loaded.Format}, {loaded.Weights.ParameterCount:N0} parameters); tokenizer: {tokenizer.Describe()}");

        var data = Prepare(DatasetPaths, tokenizer, Options, MaxRecords, Data, ModelPath);
        foreach (var line in data.Report) Log?.Invoke(line);
        if (data.Issues.Count > 0)
        {
            Directory.CreateDirectory(OutputDir);
            string issuesPath = Path.Combine(OutputDir, "data_issues.txt");
            LoraAdapter.WriteAtomic(issuesPath, string.Concat(data.Issues.Select(i => i + "\n")));
            foreach (var issue in data.Issues.Take(MaxIssuesLogged)) Log?.Invoke($"skipped {issue}");
            if (data.Issues.Count > MaxIssuesLogged) Log?.Invoke($"... and {data.Issues.Count - MaxIssuesLogged} more; every skipped record is listed in {issuesPath}");
        }
        Log?.Invoke($"data: {data.RecordsRead} records, {data.Train.Count} train / {data.Eval.Count} eval samples, {data.Issues.Count} skipped");
        if (data.Train.Count == 0) throw new InvalidDataException("no usable training samples (see the skipped records above)");

        if (Full is not null)
        {
            // Full fine-tuning trains a writable copy of the weights (loaded ones may be views of a mapped file).
            using var writable = FullFineTune.CloneWritable(loaded.Weights, backend);
            using var fullModel = new LlamaModel(writable, backend) { NeftuneAlpha = Data.NeftuneAlpha };
            using var full = new FullFineTune(fullModel, Full) { CopyFilesFrom = Directory.Exists(ModelPath) ? ModelPath : null };
            Log?.Invoke($"full fine-tuning: {full.ParameterCount:N0} trainable parameters, {full.FrozenCount:N0} frozen");
            using var fullTrainer = new Trainer(fullModel, full, Options);
            if (OnProgress is not null) fullTrainer.Progress += OnProgress;
            if (OnEval is not null) fullTrainer.Evaluated += OnEval;
            return fullTrainer.Train(data.Train, data.Eval, data.PadId, OutputDir, ModelPath, cancel);
        }

        var baseWeights = loaded.Weights;
        if (Methods.QLora.ParseBaseQuant(BaseQuant) is not null)
        {
            var q = Methods.QLora.QuantizeBase(loaded.Weights);
            baseWeights = q.Weights;
            Quantization = q;
            Log?.Invoke(q.Describe());
        }
        using var model = new LlamaModel(baseWeights, backend) { NeftuneAlpha = Data.NeftuneAlpha };
        using var adapter = ContinueAdapter is null ? LoraAdapter.Create(model, Lora, Options.Seed) : LoraAdapter.Load(ContinueAdapter, model);
        var ac = adapter.Config;
        Log?.Invoke($"{(ContinueAdapter is null ? "" : $"continuing {ContinueAdapter}: ")}{(ac.UseDora ? "DoRA" : "LoRA")} r={ac.Rank} alpha={ac.Alpha}" +
            $"{(ac.UseRsLora ? " (rsLoRA)" : "")} on {string.Join(",", ac.TargetModules)}: {adapter.ParameterCount:N0} trainable parameters");
        ITrainableMethod method = adapter;
        if (EwcLambda > 0)
        {
            Methods.EwcState state;
            if (EwcDataPaths is { Count: > 0 })
            {
                var prev = Prepare(EwcDataPaths, tokenizer, Options, MaxRecords, Data, ModelPath);
                var all = prev.Train.Concat(prev.Eval).ToList();
                state = Methods.EwcState.Estimate(model, adapter, all, Options.MaxLength, prev.PadId, EwcSamples, Options.Seed);
            }
            else if (ContinueAdapter is not null) state = Methods.EwcState.Load(ContinueAdapter, adapter);
            else throw new ArgumentException("EWC needs the previous stage's data (--ewc-data) or an adapter with ewc_state.safetensors (--adapter)");
            method = new Methods.EwcMethod(adapter, state, EwcLambda);
            Log?.Invoke($"EWC: lambda {EwcLambda}, Fisher from {state.Samples} samples of {state.Stages} earlier stage(s)");
        }
        using var trainer = new Trainer(model, method, Options);
        if (OnProgress is not null) trainer.Progress += OnProgress;
        if (OnEval is not null) trainer.Evaluated += OnEval;
        var result = trainer.Train(data.Train, data.Eval, data.PadId, OutputDir, ModelPath, cancel);
        if (method is Methods.EwcMethod ewc)
        {
            // the next stage continues this adapter with --ewc and needs every earlier stage's Fisher
            var next = ewc.SaveForNextStage(OutputDir, model, data.Train, Options.MaxLength, data.PadId, EwcSamples, Options.Seed);
            Log?.Invoke($"EWC: {Methods.EwcState.FileName} saved for the next stage ({next.Stages} stages, {next.Samples} samples)");
        }
        return result;
    }
}
