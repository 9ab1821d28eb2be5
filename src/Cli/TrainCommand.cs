using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using CommandLine;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;
using PeftTrainOptions = FineTuneNative.Peft.Training.TrainOptions;

namespace FineTuneNative.Cli;

[Verb("train", HelpText = "LoRA fine-tune a model on a JSON/JSONL dataset and save a PEFT adapter. With no --model: the embedded models/ftn-tiny on data/count-plus-one.jsonl.")]
public sealed partial class TrainOptions : DataCliOptions
{
    [Option("model", MetaValue = "PATH",
        HelpText = "Hugging Face model directory (config.json + safetensors) or llama2.c .bin checkpoint. Default: the embedded models/ftn-tiny, with the demo settings listed as 'demo'.")]
    public string? Model { get; set; }

    [Option("tokenizer", MetaValue = "PATH", HelpText = "Tokenizer file or directory (default: the one next to the model).")]
    public string? Tokenizer { get; set; }

    [Option("data", MetaValue = "FILE[,FILE]",
        HelpText = "Dataset: JSON or JSONL, alpaca {instruction,input,output} or chat {messages:[{role,content}]}. Malformed records are reported with file:line and skipped. Default (no --model): data/count-plus-one.jsonl.")]
    public string? Data { get; set; }

    [Option("out", MetaValue = "DIR",
        HelpText = "Output directory: adapter_config.json, adapter_model.safetensors (PEFT), metrics.jsonl, train_results.json, eval_generations.jsonl. Written to a temporary directory and renamed. Default: runs/ftn-train.")]
    public string Out { get; set; } = "runs/ftn-train";

    [Option("targets", MetaValue = "LIST",
        HelpText = "LoRA target modules, comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (short names q,k,v,o,gate,up,down work), or 'all' / 'all-linear'. Default: all.")]
    public string Targets { get; set; } = "all";

    [Option("rank", MetaValue = "R", HelpText = "LoRA rank r. Default 8.")]
    public int? Rank { get; set; }

    [Option("alpha", MetaValue = "A", HelpText = "LoRA alpha; the update is scaled by alpha/r. Default 16.")]
    public float? Alpha { get; set; }

    [Option("dropout", MetaValue = "P", HelpText = "Dropout on the LoRA input. Default 0.05.")]
    public float? Dropout { get; set; }

    [Option("rslora", Default = false, HelpText = "Scale by alpha/sqrt(r) (rank-stabilized LoRA) instead of alpha/r.")]
    public bool RsLora { get; set; }

    [Option("use-rslora", Default = false, HelpText = "Same as --rslora (PEFT's name, use_rslora).")]
    public bool UseRsLora { get; set; }

    [Option("use-dora", Default = false, HelpText = "DoRA (PEFT use_dora): also learn a per-row magnitude; W' = m * (W + s*B*A) / ||W + s*B*A||. LoRA dropout defaults to 0 with DoRA; --dropout P uses PEFT's DoRA dropout (the magnitude/direction path on the dropped input, the base on the full input).")]
    public bool UseDora { get; set; }

    [Option("qlora", Default = false, HelpText = "QLoRA: store the frozen base's linear weights in NF4 (same as --base-quant nf4).")]
    public bool QLora { get; set; }

    [Option("base-quant", MetaValue = "TYPE", HelpText = "Frozen base linear weights: nf4 (bitsandbytes layout, dequantized inside the matmul) or none. Default none.")]
    public string? BaseQuant { get; set; }

    [Option("base-dtype", MetaValue = "TYPE", HelpText = "Storage of the model's linear weights once loaded: f32 or bf16 (with --device cuda on sm_80+ bf16 weights run on tensor cores; halves their memory). Default: as in the file (bf16 files stay bf16, others f32).")]
    public string? BaseDType { get; set; }

    [Option("attention-dtype", MetaValue = "TYPE", HelpText = "Storage of q, k, v for attention: f32 or bf16 (PyTorch autocast's bf16 SDPA: rounded q, k, v, f32 softmax and accumulation; with --device cuda on sm_80+ the tensor-core flash attention). Default: bf16 when the linear weights are bf16 (--base-dtype bf16, or a bf16 file), else f32.")]
    public string? AttentionDType { get; set; }

    [Option("adapter", MetaValue = "DIR", HelpText = "Continue training this saved PEFT adapter (its own r, alpha, targets) on the new data: staged training.")]
    public string? Adapter { get; set; }

    [Option("ewc-lambda", MetaValue = "L", HelpText = "EWC strength: penalty L/2 * sum F*(theta - theta*)^2 keeping --adapter close to its values where the previous data's Fisher F is large. Default 0 (off).")]
    public double? EwcLambda { get; set; }

    [Option("ewc-data", MetaValue = "FILE[,FILE]", HelpText = "The previous stage's dataset(s), on which the EWC Fisher is estimated (needed with --ewc-lambda unless --adapter holds ewc_state.safetensors).")]
    public string? EwcData { get; set; }

    [Option("ewc-samples", MetaValue = "N", HelpText = "Previous-stage samples used for the Fisher estimate (0 = all). Default 64.")]
    public int EwcSamples { get; set; } = 64;

    [Option("lr", MetaValue = "LR", HelpText = "Peak learning rate (AdamW; linear warmup then cosine decay). Default 2e-4; demo 2e-3.")]
    public double? LearningRate { get; set; }

    [Option("epochs", MetaValue = "N", HelpText = "Passes over the training split (ignored when --max-steps is set). Default 1; demo 3.")]
    public int? Epochs { get; set; }

    [Option("max-steps", MetaValue = "N", HelpText = "Optimizer steps to take (overrides --epochs; wraps into new epochs).")]
    public int? MaxSteps { get; set; }

    [Option("batch-size", MetaValue = "B", HelpText = "Sequences per micro-batch. Default 4; demo 8.")]
    public int? BatchSize { get; set; }

    [Option("grad-accum", MetaValue = "N", HelpText = "Micro-batches accumulated per optimizer step. Default 1.")]
    public int? GradAccum { get; set; }

    [Option("max-len", MetaValue = "T", HelpText = "Longest sequence in tokens; longer samples are cut at the end. Default 512; demo 96.")]
    public int? MaxLen { get; set; }

    [Option("warmup", MetaValue = "N", HelpText = "Linear warmup steps. Default 0; demo 10.")]
    public int? Warmup { get; set; }

    [Option("min-lr-ratio", MetaValue = "R", HelpText = "The cosine decay ends at lr * R. Default 0.")]
    public double? MinLrRatio { get; set; }

    [Option("weight-decay", MetaValue = "WD", HelpText = "AdamW decoupled weight decay on the adapter. Default 0.")]
    public double? WeightDecay { get; set; }

    [Option("clip", MetaValue = "X", HelpText = "Clip the global gradient norm to X (0 = off). Default 1.")]
    public double? Clip { get; set; }

    [Option("seed", MetaValue = "S", HelpText = "Seed of the split, the shuffles, the LoRA init and dropout. Default 42.")]
    public ulong? Seed { get; set; }

    [Option("eval-fraction", MetaValue = "F", HelpText = "Share of the dataset held out for evaluation (loss, perplexity, exact match). Default 0.1.")]
    public double? EvalFraction { get; set; }

    [Option("eval-every", MetaValue = "N", HelpText = "Also evaluate the held-out loss every N steps (0 = before and after only). Default 0.")]
    public int? EvalEvery { get; set; }

    [Option("exact-match", MetaValue = "N",
        HelpText = "Held-out alpaca examples to generate greedily before and after training for the exact-match metric (0 = skip). Default 50.")]
    public int ExactMatchSamples { get; set; } = 50;

    [Option("max-new-tokens", MetaValue = "N", HelpText = "Generation length for the exact-match metric and the sample generation. Default 48.")]
    public int MaxNewTokens { get; set; } = 48;

    [Option("train-on-prompt", Default = false, HelpText = "Also take the loss on prompt tokens (default: response tokens and their EOS only).")]
    public bool TrainOnPrompt { get; set; }

    [Option("log-every", MetaValue = "N", HelpText = "Print a progress line every N steps (default: about 20 lines per run).")]
    public int? LogEvery { get; set; }
}

/// <summary>
/// <c>ftn train</c>: LoRA fine-tuning with Peft's <see cref="Trainer"/>, plus the task metric: greedy exact match on
/// held-out alpaca examples before and after, and one generation shown side by side.
/// </summary>
public static class TrainCommand
{
    /// <summary>Settings of the embedded demo (no --model): sized so the run takes a few minutes on 2 CPU cores.</summary>
    internal static readonly PeftTrainOptions Demo = new()
    {
        LearningRate = 2e-3, Epochs = 3, MicroBatch = 8, GradAccum = 1, MaxLength = 96, WarmupSteps = 10,
    };

    public static int Run(TrainOptions o, TextWriter stdout)
    {
        bool demo = o.Model is null;
        string[] dataPaths = ResolveData(o, demo);
        string modelPath = ModelSource.Resolve(o.Model);
        string methodName = PeftxMethods.MethodName(o); // validates --method and its options before any work
        if (methodName != "full" && (o.TopLayers is not null || o.TrainableLayers is not null))
            throw new UserError("--top-layers/--trainable-layers belong to --method full");
        var lora = BuildLora(o);
        var opts = BuildOptions(o, demo ? Demo : new PeftTrainOptions());
        try { opts.Validate(); lora.Validate(); }
        catch (ArgumentException e) { throw new UserError(e.Message); }
        if (o.ExactMatchSamples < 0) throw new UserError($"--exact-match must be >= 0 (got {o.ExactMatchSamples})");
        if (o.MaxNewTokens <= 0) throw new UserError($"--max-new-tokens must be > 0 (got {o.MaxNewTokens})");

        var wall = Stopwatch.StartNew();
        using var backend = CliCommon.CreateBackend(o);
        var linearDType = ParseBaseDType(o.BaseDType);
        var attentionDType = ParseAttentionDType(o.AttentionDType);
        if (linearDType is not null && (o.QLora || o.BaseQuant is { } q0 && !q0.Equals("none", StringComparison.OrdinalIgnoreCase)))
            throw new UserError("--base-dtype and --qlora/--base-quant both choose how the base's linear weights are stored: give one");
        using var loaded = ModelSource.Load(modelPath, backend, linearDType);
        var tok = ModelSource.LoadTokenizer(modelPath, o.Tokenizer);
        var cfg = loaded.Weights.Config;
        var attnDType = attentionDType ?? (loaded.Weights.Layers[0].Wq.DType == DType.BF16 ? DType.BF16 : DType.F32);
        if (tok.VocabSize > cfg.VocabSize)
            throw new UserError($"the tokenizer has {tok.VocabSize} tokens, more than the model's vocabulary ({cfg.VocabSize})");
        stdout.WriteLine($"model    {loaded.Path}{(demo ? " (embedded)" : "")}: {cfg.Architecture} L={cfg.NumLayers} C={cfg.HiddenSize} V={cfg.VocabSize}, " +
                         $"{CliCommon.Count(loaded.Weights.ParameterCount)} parameters, linear weights {loaded.Weights.Layers[0].Wq.DType.Name()}, attention {attnDType.Name()}; device {backend.Name}");

        // Data: read, encode, split (Peft), and the held-out records for exact match.
        var dataOptions = o.BuildDataOptions();
        PreparedData data;
        try { data = FineTuneJob.Prepare(dataPaths, tok, opts, 0, dataOptions, modelPath); }
        catch (Exception e) when (e is InvalidDataException or ArgumentException or TemplateException or FileNotFoundException) { throw new UserError(Program.OneLine(e.Message)); }
        foreach (var line in data.Report) stdout.WriteLine($"data     {line}");
        foreach (var issue in data.Issues.Take(5)) stdout.WriteLine($"skipped  {issue}");
        if (data.Issues.Count > 5) stdout.WriteLine($"skipped  ... and {data.Issues.Count - 5} more");
        if (data.Train.Count == 0) throw new UserError($"no usable training sample in {string.Join(", ", dataPaths)} ({data.Issues.Count} records skipped)");
        stdout.WriteLine($"data     {string.Join(", ", dataPaths.Select(Path.GetFileName))}: {data.RecordsRead} records, {data.Train.Count} train / {data.Eval.Count} held out" +
                         (data.Issues.Count > 0 ? $", {data.Issues.Count} skipped" : ""));
        var emRecords = HeldOutAlpaca(dataPaths, data.Eval, o.ExactMatchSamples);

        // Before: exact match and one generation with the base model.
        ExactMatchResult? emBefore = null;
        if (emRecords.Count > 0)
        {
            using var session = new InferenceSession(loaded.Weights, backend, SessionLength(cfg, tok, emRecords, o.MaxNewTokens, data.Template));
            emBefore = ExactMatch.Evaluate(session, tok, emRecords, o.MaxNewTokens, data.Template);
            stdout.WriteLine($"before   exact match {emBefore.Correct}/{emBefore.Count} ({Pct(emBefore.Rate)}) on held-out prompts (greedy)");
        }

        // QLoRA: the frozen base's projections in NF4 from here on (the exact match above ran on the loaded base).
        var baseWeights = loaded.Weights;
        bool nf4 = (o.QLora ? "nf4" : o.BaseQuant) is string bq && ParseBaseQuant(bq);
        if (nf4 && methodName == "full") throw new UserError("--method full trains the base weights: it cannot use an NF4 base (--qlora/--base-quant)");
        if (nf4)
        {
            var q = FineTuneNative.Peft.Methods.QLora.QuantizeBase(loaded.Weights);
            baseWeights = q.Weights;
            stdout.WriteLine($"qlora    {q.Describe()}");
        }
        // Full fine-tuning writes the weights: train a writable copy (loaded weights may be views of a mapped file).
        using var trainWeights = methodName == "full" ? FullFineTune.CloneWritable(loaded.Weights, backend) : null;
        using var model = new LlamaModel(trainWeights ?? baseWeights, backend) { NeftuneAlpha = dataOptions.NeftuneAlpha };
        model.AttentionDType = attnDType;
        using var method = PeftxMethods.Create(o, model, tok, opts.Seed, stdout) ?? CreateMethod(o, model, lora, opts, stdout, tok, dataOptions, modelPath);
        model.ActivationCheckpointing = opts.ActivationCheckpointing;
        int seqLen = Math.Min(opts.MaxLength, Math.Max(1, data.Train.Concat(data.Eval).Max(s => s.Length)));
        var plan = MemoryPlan.Estimate(model, method, opts, seqLen);
        TrainRun.CheckMemory(plan, o, backend, stdout);
        backend.Reserve(plan.StepReserveBytes); // GPU: one pool chunk for the optimizer state and the workspace, no allocation in a step
        using var trainer = new Trainer(model, method, opts)
        {
            ResolvedConfig = TrainRun.ResolvedYaml(o, opts, lora, modelPath, dataPaths, methodName),
        };
        int total = Trainer.TotalSteps(opts, data.Train.Count);
        int logEvery = o.LogEvery is int le && le > 0 ? le : Math.Max(1, total / 20);
        stdout.WriteLine($"train    {total} steps x {opts.MicroBatch * opts.GradAccum} sequences (batch {opts.MicroBatch} x accum {opts.GradAccum}), lr {opts.LearningRate:0.###e0}, max len {opts.MaxLength}");
        trainer.Evaluated += e => stdout.WriteLine(
            $"eval     step {e.Step,5}  loss {CliCommon.F(e.Loss)}  ppl {CliCommon.F(e.Perplexity, "0.000")}  ({e.Samples} samples, {e.Targets} target tokens)");
        // Live display on a terminal (one line rewritten every step); a log line every logEvery steps otherwise.
        bool live = ReferenceEquals(stdout, Console.Out) && !Console.IsOutputRedirected;
        trainer.Progress += p =>
        {
            string line = string.Create(CultureInfo.InvariantCulture,
                $"step {p.Step,5}/{p.TotalSteps}  epoch {p.Epoch + 1}  loss {p.Loss:0.0000}  lr {p.LearningRate:0.000e0}  |g| {p.GradNorm:0.000}  " +
                $"{p.TokensPerSecond,6:0} tok/s  elapsed {CliCommon.Duration(p.Elapsed)}  ETA {CliCommon.Duration(p.Eta)}");
            if (p.Skipped) line += "  SKIPPED (NaN/Inf: nothing updated)";
            bool logged = p.Step % logEvery == 0 || p.Step == p.TotalSteps || p.Step == 1 || p.Skipped;
            if (live) { stdout.Write("\r" + line.PadRight(Console.WindowWidth > 0 ? Math.Min(Console.WindowWidth - 1, 160) : 0)); if (logged) stdout.WriteLine(); }
            else if (logged) stdout.WriteLine(line);
        };

        TrainResult? result = null;
        ExactMatchResult? emAfter = null;
        string outDir = Path.GetFullPath(o.Out);
        string? resumeFrom = TrainRun.ResumeDir(o, outDir);
        // With checkpoints (or a resume) the run writes into --out itself, each file and checkpoint atomically, so a
        // killed run leaves its checkpoints; otherwise the whole directory is built aside and renamed into place.
        bool inPlace = opts.SaveEvery > 0 || resumeFrom is not null;
        if (inPlace && resumeFrom is null && Trainer.Checkpoints(outDir).Count > 0)
            throw new UserError($"{outDir} holds checkpoints of an earlier run: continue it with --resume latest, or choose another --out");
        void Write(Action<string> write)
        {
            if (inPlace) { Directory.CreateDirectory(outDir); write(outDir); }
            else CliCommon.WriteDirectoryAtomic(outDir, write);
        }
        long waitsBefore = (backend as FineTuneNative.Kernels.Gpu.IlgpuBackend)?.BlockingSyncs ?? 0;
        Write(tmp =>
        {
            try { result = trainer.Train(data.Train, data.Eval, data.PadId, tmp, modelPath, resumeFrom: resumeFrom); }
            catch (TrainingStoppedException e) { if (live) stdout.WriteLine(); throw new UserError(e.Message); }
            catch (InvalidDataException e) when (resumeFrom is not null) { throw new UserError($"--resume: {Program.OneLine(e.Message)}"); }
            if (method is FineTuneNative.Peft.Methods.EwcMethod ewc) // for a next stage continuing this adapter with --ewc-lambda
            {
                var next = ewc.SaveForNextStage(tmp, model, data.Train, opts.MaxLength, data.PadId, o.EwcSamples, opts.Seed);
                stdout.WriteLine($"ewc      {FineTuneNative.Peft.Methods.EwcState.FileName}: Fisher of {next.Stages} stages ({next.Samples} samples) for the next stage");
            }
            // After: the adapter merged into a writable copy of the base weights.
            if (emRecords.Count > 0)
            {
                using var merged = nf4 ? FineTuneNative.Peft.Methods.QLora.DequantizedCopy(baseWeights) : ModelSource.CloneWritable(trainWeights ?? loaded.Weights, backend);
                if (method is LoraAdapter adapter) adapter.MergeInto(merged);
                else if (method is FineTuneNative.Peft.Methods.EwcMethod { Inner: LoraAdapter inner }) inner.MergeInto(merged);
                using var session = new InferenceSession(merged, backend, SessionLength(cfg, tok, emRecords, o.MaxNewTokens, data.Template) + PeftxMethods.ExtraPositions(method));
                PeftxMethods.Apply(method, session); // prompt/prefix/bottleneck cannot be merged: the session applies them
                emAfter = ExactMatch.Evaluate(session, tok, emRecords, o.MaxNewTokens, data.Template);
                WriteGenerations(Path.Combine(tmp, "eval_generations.jsonl"), emBefore!, emAfter);
            }
        });
        var r = result!;

        stdout.WriteLine();
        stdout.WriteLine($"held-out results ({r.EvalSamples} samples{(emRecords.Count > 0 ? $"; exact match on {emRecords.Count}" : "")})   before -> after");
        stdout.WriteLine($"  eval loss     {CliCommon.F(r.EvalLossBefore),10} -> {CliCommon.F(r.EvalLossAfter)}");
        stdout.WriteLine($"  perplexity    {CliCommon.F(r.EvalPerplexityBefore, "0.000"),10} -> {CliCommon.F(r.EvalPerplexityAfter, "0.000")}");
        if (emBefore is not null && emAfter is not null)
        {
            stdout.WriteLine($"  exact match   {$"{Pct(emBefore.Rate)} ({emBefore.Correct}/{emBefore.Count})",10} -> {Pct(emAfter.Rate)} ({emAfter.Correct}/{emAfter.Count})");
            // One generation: the first held-out example the adapter changed, else the first one.
            int i = Enumerable.Range(0, emAfter.Samples.Count).FirstOrDefault(k => emAfter.Samples[k].Correct && !emBefore.Samples[k].Correct);
            var before = emBefore.Samples[i];
            var after = emAfter.Samples[i];
            stdout.WriteLine();
            stdout.WriteLine($"example  instruction: {Program.OneLine(emRecords[i].Instruction)}");
            if (emRecords[i].Input.Length > 0) stdout.WriteLine($"         input:       {Program.OneLine(emRecords[i].Input)}");
            stdout.WriteLine($"         expected:    {Program.OneLine(after.Expected)}");
            stdout.WriteLine($"         before:      {Program.OneLine(before.Generated)}");
            stdout.WriteLine($"         after:       {Program.OneLine(after.Generated)}");
        }
        stdout.WriteLine();
        SummaryTable(r, outDir, stdout);
        stdout.WriteLine();
        stdout.WriteLine($"trained {r.Steps} steps, {CliCommon.Count(r.TrainTokens)} tokens, {r.TokensPerSecond:0} tok/s in {CliCommon.Duration(r.Elapsed)}; total {CliCommon.Duration(wall.Elapsed)}");
        if (backend is FineTuneNative.Kernels.Gpu.IlgpuBackend gpu) // bench/gpu.sh compares this across its overlap A/B
            stdout.WriteLine($"device   the host waited for the device {gpu.BlockingSyncs - waitsBefore} times in training (evaluations and saves included)");
        if (methodName == "full") stdout.WriteLine($"model    {outDir}  (Hugging Face safetensors; try: ftn generate --model {o.Out} --prompt \"...\")");
        else stdout.WriteLine($"adapter  {outDir}  (try: ftn generate{(demo ? "" : $" --model {modelPath}")} --adapter {o.Out} --prompt \"...\"{(emRecords.Count > 0 && emRecords[0].Input.Length > 0 ? " --input \"...\"" : "")})");
        return 0;
    }

    /// <summary>
    /// Creates and attaches the trainable method the options ask for, and prints one line about it. New methods add a
    /// case here (and their options to <see cref="TrainOptions"/>).
    /// </summary>
    internal static ITrainableMethod CreateMethod(TrainOptions o, LlamaModel model, LoraConfig lora, PeftTrainOptions opts, TextWriter stdout,
        ITextTokenizer? tok = null, DataOptions? dataOptions = null, string? modelPath = null)
    {
        if (PeftxMethods.MethodName(o) == "full")
        {
            FullFineTune full;
            try { full = new FullFineTune(model, TrainRun.FullConfig(o)) { CopyFilesFrom = ModelSource.Resolve(o.Model) is var mp && Directory.Exists(mp) ? mp : null }; }
            catch (ArgumentException e) { throw new UserError("--method full: " + e.Message); }
            stdout.WriteLine($"full     {CliCommon.Count(full.ParameterCount)} trainable parameters, {CliCommon.Count(full.FrozenCount)} frozen" +
                             (full.MasterBytes > 0 ? $"; f32 master weights over bf16 ({MemoryPlan.FormatBytes(full.MasterBytes)})" : "") +
                             (full.Config.TrainsEverything ? "" : $" (top {full.Config.TopLayers} layers; {string.Join(",", full.Config.Trainable)})"));
            return full;
        }
        LoraAdapter adapter;
        if (o.Adapter is not null)
        {
            string dir = CliCommon.RequireDirectory(o.Adapter, "adapter");
            try { adapter = LoraAdapter.Load(dir, model); }
            catch (Exception e) when (e is FileNotFoundException or InvalidDataException or ArgumentException)
            { throw new UserError($"--adapter '{dir}': {Program.OneLine(e.Message)}"); }
            lora = adapter.Config;
            stdout.WriteLine($"stage    continuing {dir}");
        }
        else adapter = LoraAdapter.Create(model, lora, opts.Seed);
        stdout.WriteLine($"{(lora.UseDora ? "dora " : "lora ")}    r={lora.Rank} alpha={CliCommon.F(lora.Alpha, "0.###")}{(lora.UseRsLora ? " (rsLoRA)" : "")} dropout={CliCommon.F(lora.Dropout, "0.###")} on {string.Join(",", lora.TargetModules)}: " +
                         $"{CliCommon.Count(adapter.ParameterCount)} trainable parameters");
        double lambda = o.EwcLambda ?? 0;
        if (lambda < 0 || !double.IsFinite(lambda)) { adapter.Dispose(); throw new UserError($"--ewc-lambda must be >= 0 (got {lambda})"); }
        if (lambda == 0)
        {
            if (o.EwcData is not null) { adapter.Dispose(); throw new UserError("--ewc-data needs --ewc-lambda > 0"); }
            return adapter;
        }
        try
        {
            FineTuneNative.Peft.Methods.EwcState state;
            if (o.EwcData is not null)
            {
                if (tok is null) throw new UserError("--ewc-data: no tokenizer");
                var paths = o.EwcData.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).Select(p => CliCommon.RequireFile(p, "EWC dataset")).ToArray();
                var prev = FineTuneJob.Prepare(paths, tok, opts, 0, dataOptions, modelPath);
                state = FineTuneNative.Peft.Methods.EwcState.Estimate(model, adapter, prev.Train.Concat(prev.Eval).ToList(), opts.MaxLength, prev.PadId, o.EwcSamples, opts.Seed);
            }
            else if (o.Adapter is not null) state = FineTuneNative.Peft.Methods.EwcState.Load(o.Adapter, adapter);
            else throw new UserError("--ewc-lambda needs the previous stage's data (--ewc-data) or an --adapter holding ewc_state.safetensors");
            stdout.WriteLine($"ewc      lambda {lambda}, Fisher from {state.Samples} samples of {state.Stages} earlier stage(s)");
            return new FineTuneNative.Peft.Methods.EwcMethod(adapter, state, lambda);
        }
        catch (Exception e) when (e is FileNotFoundException or InvalidDataException or ArgumentException)
        {
            adapter.Dispose();
            throw new UserError($"EWC: {Program.OneLine(e.Message)}");
        }
        catch { adapter.Dispose(); throw; }
    }

    /// <summary>--attention-dtype: null (follow the linear weights), f32 or bf16.</summary>
    internal static DType? ParseAttentionDType(string? name) => name?.Trim().ToLowerInvariant() switch
    {
        null => null,
        "f32" or "float32" or "fp32" => DType.F32,
        "bf16" or "bfloat16" => DType.BF16,
        _ => throw new UserError($"--attention-dtype: '{name}' is not an attention dtype; expected f32 or bf16"),
    };

    /// <summary>--base-dtype: null (as stored in the file), f32 or bf16.</summary>
    internal static DType? ParseBaseDType(string? name) => name?.Trim().ToLowerInvariant() switch
    {
        null => null,
        "f32" or "float32" or "fp32" => DType.F32,
        "bf16" or "bfloat16" => DType.BF16,
        _ => throw new UserError($"--base-dtype: '{name}' is not a weight storage type; expected f32 or bf16"),
    };

    private static bool ParseBaseQuant(string name)
    {
        try { return FineTuneNative.Peft.Methods.QLora.ParseBaseQuant(name) is not null; }
        catch (ArgumentException e) { throw new UserError($"--base-quant: {e.Message}"); }
    }

    /// <summary>
    /// The end-of-run table: every evaluation, the best, skipped steps, early stopping, and the files written (named in
    /// <paramref name="outDir"/>, where they are once the run's temporary directory has been renamed into place).
    /// </summary>
    private static void SummaryTable(TrainResult r, string outDir, TextWriter stdout)
    {
        stdout.WriteLine("summary");
        if (r.Evals.Count > 0)
        {
            stdout.WriteLine("  step    eval loss   perplexity");
            foreach (var e in r.Evals)
                stdout.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {e.Step,5}  {e.Loss,10:0.0000}  {e.Perplexity,11:0.000}{(e.Step == r.BestStep ? "  <- best" : "")}"));
        }
        var losses = r.StepLosses.Where(double.IsFinite).ToList();
        if (losses.Count > 0)
            stdout.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  train loss  first {losses[0]:0.0000}  last {losses[^1]:0.0000}  min {losses.Min():0.0000}"));
        stdout.WriteLine($"  steps       {r.Steps}/{r.PlannedSteps}{(r.EarlyStopped ? " (early stopped: no eval improvement for the patience)" : "")}" +
                         (r.SkippedSteps > 0 ? $"; {r.SkippedSteps} skipped (NaN/Inf)" : ""));
        if (r.MetricsPath is not null)
        {
            stdout.WriteLine($"  files       {Path.GetFileName(r.MetricsPath)}, {Trainer.SummaryFile}, {Trainer.ConfigFile}, {Path.GetFileName(r.PlotPath)}, " +
                             $"{Trainer.TensorBoardDirName}/ (tensorboard --logdir {Path.Combine(outDir, Trainer.TensorBoardDirName)})");
        }
    }

    private static string Pct(double rate) => double.IsNaN(rate) ? "n/a" : (100 * rate).ToString("0.0", CultureInfo.InvariantCulture) + "%";

    private static string[] ResolveData(TrainOptions o, bool demo)
    {
        if (o.Data is null)
        {
            if (!demo) throw new UserError("--data is required with --model (a JSON or JSONL dataset)");
            return new[] { CliCommon.RequireFile(EmbeddedDefault.DataPath, "sample dataset") };
        }
        return o.Data.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(p => CliCommon.RequireFile(p, "dataset")).ToArray();
    }

    internal static string[] ParseTargets(string spec)
    {
        if (spec.Trim() is "all" or "all-linear") return (string[])LlamaWeights.LinearModules.Clone();
        var result = new List<string>();
        foreach (var raw in spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            string m = raw switch
            {
                "q" or "k" or "v" or "o" => raw + "_proj",
                "gate" or "up" or "down" => raw + "_proj",
                _ => raw,
            };
            if (!LlamaWeights.LinearModules.Contains(m))
                throw new UserError($"--targets: unknown module '{raw}' (expected {string.Join(", ", LlamaWeights.LinearModules)} or all)");
            if (!result.Contains(m)) result.Add(m);
        }
        if (result.Count == 0) throw new UserError("--targets: no module given");
        return result.ToArray();
    }

    internal static LoraConfig BuildLora(TrainOptions o)
    {
        var d = new LoraConfig();
        return new LoraConfig
        {
            Rank = o.Rank ?? d.Rank,
            Alpha = o.Alpha ?? d.Alpha,
            Dropout = o.Dropout ?? (o.UseDora ? 0f : d.Dropout),
            TargetModules = ParseTargets(o.Targets),
            UseRsLora = o.RsLora || o.UseRsLora,
            UseDora = o.UseDora,
        };
    }

    /// <summary>Peft's TrainOptions: each option given on the command line, else the base profile's value.</summary>
    internal static PeftTrainOptions BuildOptions(TrainOptions o, PeftTrainOptions b) => new()
    {
        Epochs = o.Epochs ?? b.Epochs,
        MaxSteps = o.MaxSteps ?? b.MaxSteps,
        MicroBatch = o.BatchSize ?? b.MicroBatch,
        GradAccum = o.GradAccum ?? b.GradAccum,
        LearningRate = o.LearningRate ?? b.LearningRate,
        WarmupSteps = o.Warmup ?? b.WarmupSteps,
        WarmupRatio = o.WarmupRatio ?? b.WarmupRatio,
        MinLrRatio = o.MinLrRatio ?? b.MinLrRatio,
        WeightDecay = o.WeightDecay ?? b.WeightDecay,
        ClipNorm = o.Clip ?? b.ClipNorm,
        Beta1 = b.Beta1,
        Beta2 = b.Beta2,
        AdamEps = b.AdamEps,
        MaxLength = o.MaxLen ?? b.MaxLength,
        Seed = o.Seed ?? b.Seed,
        EvalFraction = o.EvalFraction ?? b.EvalFraction,
        EvalEvery = o.EvalEvery ?? b.EvalEvery,
        MaxEvalSamples = b.MaxEvalSamples,
        TrainOnPrompt = o.TrainOnPrompt,
        Device = o.Device,
        Optimizer = (o.Optimizer ?? b.Optimizer).Trim().ToLowerInvariant(),
        Momentum = o.Momentum ?? b.Momentum,
        LrScheduler = (o.LrScheduler ?? b.LrScheduler).Trim().ToLowerInvariant(),
        SaveEvery = o.SaveEvery ?? b.SaveEvery,
        SaveTotalLimit = o.SaveTotalLimit ?? b.SaveTotalLimit,
        EarlyStoppingPatience = o.EarlyStoppingPatience ?? b.EarlyStoppingPatience,
        EarlyStoppingMinDelta = o.EarlyStoppingMinDelta ?? b.EarlyStoppingMinDelta,
        KeepBest = o.KeepBest,
        MaxSkippedSteps = o.MaxSkippedSteps ?? b.MaxSkippedSteps,
        ActivationCheckpointing = o.ActivationCheckpointing,
    };

    /// <summary>The held-out records (alpaca only) behind the first <paramref name="max"/> eval samples, matched by file:line.</summary>
    private static List<DatasetRecord> HeldOutAlpaca(string[] paths, IReadOnlyList<TokenizedSample> eval, int max)
    {
        if (max == 0 || eval.Count == 0) return new List<DatasetRecord>();
        var byLocation = new Dictionary<string, DatasetRecord>(StringComparer.Ordinal);
        foreach (var p in paths)
            foreach (var rec in DatasetReader.Read(p).Records)
                byLocation.TryAdd(rec.Location, rec);
        return eval.Select(s => byLocation.GetValueOrDefault(s.Location)).OfType<DatasetRecord>()
            .Where(rec => rec.Format == RecordFormat.Alpaca).Take(max).ToList();
    }

    private static int SessionLength(LlamaConfig c, ITextTokenizer tok, List<DatasetRecord> records, int maxNew, ChatTemplate? template)
    {
        int longest = records.Max(r => ExactMatch.PromptIds(tok, r, template).Length);
        return Math.Min(c.MaxPositions, longest + maxNew);
    }

    private static void WriteGenerations(string path, ExactMatchResult before, ExactMatchResult after)
    {
        using var w = new StreamWriter(path, false, new System.Text.UTF8Encoding(false)) { NewLine = "\n" };
        for (int i = 0; i < after.Samples.Count; i++)
        {
            var o = new JsonObject
            {
                ["prompt"] = after.Samples[i].Prompt,
                ["expected"] = after.Samples[i].Expected,
                ["before"] = before.Samples[i].Generated,
                ["after"] = after.Samples[i].Generated,
                ["correct_before"] = before.Samples[i].Correct,
                ["correct_after"] = after.Samples[i].Correct,
            };
            w.WriteLine(o.ToJsonString(new JsonSerializerOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }));
        }
    }
}
