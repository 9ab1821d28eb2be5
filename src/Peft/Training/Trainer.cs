using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Training;

/// <summary>Reported after every optimizer step.</summary>
public sealed record TrainProgress(int Step, int TotalSteps, int Epoch, double Loss, double LearningRate, double GradNorm,
    long Tokens, double TokensPerSecond, TimeSpan Elapsed, TimeSpan Eta);

/// <summary>Where a run stands: optimizer steps taken, the epoch and the next sample of its shuffled order.</summary>
public sealed record TrainerPosition(int Step, int Epoch, int Cursor, int TotalSteps, int TrainSamples);

/// <summary>Reported after every evaluation on the held-out split (Step 0 = before training).</summary>
public sealed record EvalProgress(int Step, double Loss, double Perplexity, int Samples, int Targets);

/// <summary>Mean loss per target token over a sample set, and its perplexity exp(loss).</summary>
public sealed record EvalResult(double Loss, double Perplexity, int Samples, int Targets);

/// <summary>What a training run achieved and where its files are.</summary>
public sealed class TrainResult
{
    public double EvalLossBefore { get; init; } = double.NaN;
    public double EvalPerplexityBefore { get; init; } = double.NaN;
    public double EvalLossAfter { get; init; } = double.NaN;
    public double EvalPerplexityAfter { get; init; } = double.NaN;
    public int Steps { get; init; }
    public double FinalTrainLoss { get; init; } = double.NaN;
    public long TrainTokens { get; init; }
    public double TokensPerSecond { get; init; }
    public TimeSpan Elapsed { get; init; }
    public int TrainSamples { get; init; }
    public int EvalSamples { get; init; }
    /// <summary>Training loss of every step, in order.</summary>
    public IReadOnlyList<double> StepLosses { get; init; } = Array.Empty<double>();
    public string? MetricsPath { get; init; }
    public string? SummaryPath { get; init; }
    public string? AdapterDir { get; init; }
}

/// <summary>
/// Fine-tuning loop over any <see cref="ITrainableMethod"/> (LoRA, full fine-tuning, ...): AdamW on the method's
/// trainable tensors, linear warmup then cosine decay, gradient accumulation, global-norm clipping, held-out
/// evaluation before, during and after training.
/// </summary>
/// <remarks>
/// Accumulation: an optimizer step covers GradAccum micro-batches; the loss of every micro-batch is scaled by
/// 1/N where N is the number of target tokens in the whole window, so the gradient is that of the mean token
/// loss over the window, exactly as if it were one batch. Clipping: the global norm ‖g‖ of all adapter
/// gradients is measured (IBackend.SumOfSquares) and min(1, clip/‖g‖) is passed to AdamW as its gradScale, so
/// gradients are never rewritten. Every batch has the same (B, T) shape (T = the longest sample, at most
/// MaxLength; short rows and missing rows are padding with target -100), so the model's workspaces and the
/// optimizer state are allocated once.
/// </remarks>
public sealed class Trainer : IDisposable
{
    private readonly LlamaModel _model;
    private readonly ITrainableMethod _method;
    private readonly TrainOptions _opt;
    private readonly IBackend _backend;
    private readonly List<(string Name, Tensor Param, Tensor Grad, Tensor M, Tensor V, bool Decay)> _state = new();
    private int _step;

    /// <summary>A trainer of <paramref name="method"/>'s tensors, which must be attached to <paramref name="model"/>.</summary>
    public Trainer(LlamaModel model, ITrainableMethod method, TrainOptions options)
    {
        options.Validate();
        _model = model;
        _method = method;
        _opt = options;
        _backend = model.Backend;
        if (!method.IsAttached) throw new InvalidOperationException($"the {method.Kind} method is detached from the model; attach it before training");
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var t in method.Trainable)
        {
            if (!names.Add(t.Name)) throw new InvalidOperationException($"{method.Kind}: two trainable tensors are named '{t.Name}'");
            if (t.Param.DType != DType.F32 || t.Grad.DType != DType.F32 || t.Param.Length != t.Grad.Length)
                throw new InvalidOperationException($"{method.Kind}: trainable '{t.Name}' must be an f32 parameter with an f32 gradient of its size " +
                    $"(param {t.Param.Describe()}, grad {t.Grad.Describe()})");
            var m = _backend.Allocate(DType.F32, t.Param.Shape);
            var v = _backend.Allocate(DType.F32, t.Param.Shape);
            m.Name = t.Name + ".adam_m";
            v.Name = t.Name + ".adam_v";
            _backend.Fill(m, 0);
            _backend.Fill(v, 0);
            _state.Add((t.Name, t.Param, t.Grad, m, v, t.WeightDecay));
        }
        if (_state.Count == 0) throw new InvalidOperationException($"the {method.Kind} method has no trainable tensor");
    }

    /// <summary>What this trainer trains.</summary>
    public ITrainableMethod Method => _method;

    public event Action<TrainProgress>? Progress;
    public event Action<EvalProgress>? Evaluated;

    /// <summary>Optimizer steps taken so far.</summary>
    public int StepCount => _step;

    /// <summary>The batch length T for a set of samples: the longest one, capped by MaxLength.</summary>
    public int SeqLenFor(params IEnumerable<TokenizedSample>[] sets)
    {
        int t = 1;
        foreach (var set in sets) foreach (var s in set) t = Math.Max(t, s.Length);
        return Math.Min(t, _opt.MaxLength);
    }

    /// <summary>Mean loss per target token of the model (with its adapters) on <paramref name="samples"/>, no dropout.</summary>
    public EvalResult Evaluate(IReadOnlyList<TokenizedSample> samples, int seqLen, int padId)
    {
        double sum = 0;
        long count = 0;
        foreach (var b in Batching.Batches(samples, _opt.MicroBatch, seqLen, padId))
        {
            var (ls, c) = _model.Loss(b.Tokens, b.Targets, b.BatchSize, b.SeqLen, b.Positions);
            sum += ls;
            count += c;
        }
        if (count == 0) return new EvalResult(double.NaN, double.NaN, samples.Count, 0);
        double loss = sum / count;
        return new EvalResult(loss, Math.Exp(loss), samples.Count, (int)count);
    }

    /// <summary>
    /// One optimizer step over the micro-batches of <paramref name="window"/> at learning rate
    /// <paramref name="lr"/>. Returns the mean target-token loss of the window and the gradient norm before clipping.
    /// </summary>
    public (double Loss, double GradNorm) Step(IReadOnlyList<Batch> window, double lr)
    {
        long n = window.Sum(b => (long)b.TargetCount);
        if (n == 0) throw new InvalidOperationException("a training step has no target tokens");
        _step++;
        _method.ZeroGrad();
        float lossScale = (float)(1.0 / n);
        double lossSum = 0;
        for (int i = 0; i < window.Count; i++)
        {
            var b = window[i];
            ulong dropoutSeed = _opt.Seed * 0x9E3779B97F4A7C15UL + (ulong)_step * 0x100000001B3UL + (ulong)i;
            var (ls, _) = _model.ForwardBackward(b.Tokens, b.Targets, b.BatchSize, b.SeqLen, lossScale, dropoutSeed, b.Positions);
            lossSum += ls;
        }
        double loss = lossSum / n + _method.AddPenalty();
        if (!double.IsFinite(loss)) throw new InvalidOperationException($"step {_step}: the training loss is {loss}; stopping (lower the learning rate?)");
        double sq = 0;
        foreach (var s in _state) sq += _backend.SumOfSquares(s.Grad);
        double norm = Math.Sqrt(sq);
        if (!double.IsFinite(norm)) throw new InvalidOperationException($"step {_step}: the gradient norm is {norm}; stopping");
        float gradScale = _opt.ClipNorm > 0 && norm > _opt.ClipNorm ? (float)(_opt.ClipNorm / (norm + 1e-6)) : 1f;
        foreach (var s in _state)
            _backend.AdamW(s.Param, s.Grad, s.M, s.V, (float)lr, (float)_opt.Beta1, (float)_opt.Beta2, (float)_opt.AdamEps,
                s.Decay ? (float)_opt.WeightDecay : 0f, _step, gradScale);
        _method.AfterStep();
        return (loss, norm);
    }

    /// <summary>Optimizer steps for <paramref name="trainSamples"/> samples under these options.</summary>
    public static int TotalSteps(TrainOptions o, int trainSamples)
    {
        int perStep = o.MicroBatch * o.GradAccum;
        int perEpoch = Math.Max(1, (trainSamples + perStep - 1) / perStep);
        return o.MaxSteps > 0 ? o.MaxSteps : perEpoch * o.Epochs;
    }

    public static int WarmupFor(TrainOptions o, int totalSteps) =>
        Math.Min(totalSteps, o.WarmupSteps > 0 ? o.WarmupSteps : (int)Math.Round(o.WarmupRatio * totalSteps));

    /// <summary>
    /// Trains on <paramref name="train"/>, evaluating on <paramref name="eval"/> before, every EvalEvery steps and
    /// after. When <paramref name="outputDir"/> is given, writes metrics.jsonl (one JSON object per step and per
    /// evaluation) and train_results.json there, and saves the adapter there (PEFT format) at the end.
    /// </summary>
    /// <remarks>
    /// With SaveEvery &gt; 0 a checkpoint (<see cref="SaveCheckpoint"/>) is written to outputDir/checkpoint-{step}
    /// every SaveEvery steps. <paramref name="resumeFrom"/> continues from such a checkpoint: load its adapter
    /// into the model first (<see cref="LoraAdapter.Load"/>, or let LoadCheckpoint restore the values into the method),
    /// pass the same data and options, and the remaining
    /// steps reproduce the uninterrupted run bit for bit (same batches, dropout masks, learning rates and Adam
    /// state). metrics.jsonl is then appended to.
    /// </remarks>
    public TrainResult Train(IReadOnlyList<TokenizedSample> train, IReadOnlyList<TokenizedSample> eval, int padId,
        string? outputDir = null, string? baseModelName = null, CancellationToken cancel = default, string? resumeFrom = null)
    {
        if (train.Count == 0) throw new ArgumentException("the training split is empty");
        if (_opt.MaxEvalSamples > 0 && eval.Count > _opt.MaxEvalSamples) eval = eval.Take(_opt.MaxEvalSamples).ToList();
        int seqLen = SeqLenFor(train, eval);
        int total = TotalSteps(_opt, train.Count);
        int warmup = WarmupFor(_opt, total);

        StreamWriter? metrics = null;
        string? metricsPath = null;
        if (outputDir is not null)
        {
            Directory.CreateDirectory(outputDir);
            metricsPath = Path.Combine(outputDir, "metrics.jsonl");
            metrics = new StreamWriter(metricsPath, append: resumeFrom is not null) { AutoFlush = true };
        }
        try
        {
            void Log(JsonObject o) => metrics?.WriteLine(o.ToJsonString());

            EvalResult? RunEval(int step)
            {
                if (eval.Count == 0) return null;
                var r = Evaluate(eval, seqLen, padId);
                Evaluated?.Invoke(new EvalProgress(step, r.Loss, r.Perplexity, r.Samples, r.Targets));
                Log(new JsonObject { ["step"] = step, ["eval_loss"] = Num(r.Loss), ["eval_ppl"] = Num(r.Perplexity), ["eval_targets"] = r.Targets });
                return r;
            }

            int epoch = 0, cursor = 0, first = 1;
            if (resumeFrom is not null)
            {
                var pos = LoadCheckpoint(resumeFrom);
                if (pos.TotalSteps != total || pos.TrainSamples != train.Count)
                    throw new InvalidDataException($"{resumeFrom}: the checkpoint is of a run with {pos.TotalSteps} steps over {pos.TrainSamples} samples; " +
                        $"these options and data give {total} steps over {train.Count} samples");
                (epoch, cursor, first) = (pos.Epoch, pos.Cursor, pos.Step + 1);
            }
            else if (_step != 0) throw new InvalidOperationException($"this trainer already took {_step} steps; use a new one (or resumeFrom)");
            var before = RunEval(first - 1);
            var losses = new List<double>();
            var clock = Stopwatch.StartNew();
            long tokens = 0;
            int[] order = Batching.Permutation(train.Count, EpochSeed(epoch));
            for (int step = first; step <= total; step++)
            {
                cancel.ThrowIfCancellationRequested();
                var window = new List<Batch>(_opt.GradAccum);
                for (int a = 0; a < _opt.GradAccum; a++)
                {
                    if (cursor >= train.Count)
                    {
                        // A window never spans two epochs: the last one of an epoch may be short.
                        if (window.Count > 0) break;
                        epoch++;
                        order = Batching.Permutation(train.Count, EpochSeed(epoch));
                        cursor = 0;
                    }
                    int n = Math.Min(_opt.MicroBatch, train.Count - cursor);
                    var chunk = new TokenizedSample[n];
                    for (int i = 0; i < n; i++) chunk[i] = train[order[cursor + i]];
                    cursor += n;
                    window.Add(Batching.Pad(chunk, _opt.MicroBatch, seqLen, padId));
                }
                double lr = LrSchedule.At(step, total, warmup, _opt.LearningRate, _opt.MinLrRatio);
                var (loss, norm) = Step(window, lr);
                losses.Add(loss);
                tokens += window.Sum(b => (long)b.TokenCount);
                double secs = clock.Elapsed.TotalSeconds;
                double tps = secs > 0 ? tokens / secs : 0;
                var eta = TimeSpan.FromSeconds(secs / (step - first + 1) * (total - step));
                Progress?.Invoke(new TrainProgress(step, total, epoch, loss, lr, norm, tokens, tps, clock.Elapsed, eta));
                Log(new JsonObject
                {
                    ["step"] = step, ["epoch"] = epoch, ["loss"] = Num(loss), ["lr"] = lr, ["grad_norm"] = Num(norm),
                    ["tokens"] = tokens, ["tokens_per_s"] = Math.Round(tps, 1), ["elapsed_s"] = Math.Round(secs, 3),
                });
                if (_opt.EvalEvery > 0 && step % _opt.EvalEvery == 0 && step != total)
                {
                    RunEval(step);
                }
                if (outputDir is not null && _opt.SaveEvery > 0 && step % _opt.SaveEvery == 0 && step != total)
                    SaveCheckpoint(Path.Combine(outputDir, $"checkpoint-{step}"), new TrainerPosition(step, epoch, cursor, total, train.Count), baseModelName);
            }
            clock.Stop();
            var after = RunEval(total);

            string? summaryPath = null;
            double secsTotal = clock.Elapsed.TotalSeconds;
            var result = new TrainResult
            {
                EvalLossBefore = before?.Loss ?? double.NaN,
                EvalPerplexityBefore = before?.Perplexity ?? double.NaN,
                EvalLossAfter = after?.Loss ?? double.NaN,
                EvalPerplexityAfter = after?.Perplexity ?? double.NaN,
                Steps = total,
                FinalTrainLoss = losses.Count > 0 ? losses[^1] : double.NaN,
                TrainTokens = tokens,
                TokensPerSecond = secsTotal > 0 ? tokens / secsTotal : 0,
                Elapsed = clock.Elapsed,
                TrainSamples = train.Count,
                EvalSamples = eval.Count,
                StepLosses = losses,
                MetricsPath = metricsPath,
                AdapterDir = outputDir,
                SummaryPath = outputDir is null ? null : Path.Combine(outputDir, "train_results.json"),
            };
            if (outputDir is not null)
            {
                _method.Save(outputDir, baseModelName);
                summaryPath = result.SummaryPath!;
                var summary = new JsonObject
                {
                    ["eval_loss_before"] = Num(result.EvalLossBefore),
                    ["eval_ppl_before"] = Num(result.EvalPerplexityBefore),
                    ["eval_loss_after"] = Num(result.EvalLossAfter),
                    ["eval_ppl_after"] = Num(result.EvalPerplexityAfter),
                    ["steps"] = total,
                    ["epochs_started"] = epoch + 1,
                    ["final_train_loss"] = Num(result.FinalTrainLoss),
                    ["train_samples"] = train.Count,
                    ["eval_samples"] = eval.Count,
                    ["seq_len"] = seqLen,
                    ["train_tokens"] = tokens,
                    ["tokens_per_s"] = Math.Round(result.TokensPerSecond, 1),
                    ["elapsed_s"] = Math.Round(secsTotal, 3),
                    ["trainable_parameters"] = _method.ParameterCount,
                    ["device"] = _backend.Name,
                    [_method.Kind] = _method.DescribeConfig(),
                    ["options"] = JsonSerializer.SerializeToNode(_opt),
                };
                LoraAdapter.WriteAtomic(summaryPath, summary.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            }
            return result;
        }
        finally
        {
            metrics?.Dispose();
        }
    }

    // ------------------------------------------------------------------------------------------ checkpoints

    public const string StateFile = "trainer_state.json";
    public const string OptimizerFile = "optimizer.safetensors";

    /// <summary>
    /// Writes a resumable checkpoint into <paramref name="dir"/>: the adapter (PEFT format, usable on its own),
    /// optimizer.safetensors (Adam m and v of every adapter tensor, "{PEFT name}.adam_m" / ".adam_v") and
    /// trainer_state.json (the step, the data position and the run shape). Each file is written atomically.
    /// </summary>
    public void SaveCheckpoint(string dir, TrainerPosition position, string? baseModelName = null)
    {
        if (position.Step != _step) throw new ArgumentException($"position step {position.Step} differs from the trainer's {_step}");
        _method.Save(dir, baseModelName);
        var tensors = new List<(string, DType, int[], float[])>();
        foreach (var s in _state)
        {
            tensors.Add(($"{s.Name}.adam_m", DType.F32, (int[])s.M.Shape.Clone(), s.M.ToArray()));
            tensors.Add(($"{s.Name}.adam_v", DType.F32, (int[])s.V.Shape.Clone(), s.V.ToArray()));
        }
        Runtime.IO.SafeTensors.Write(Path.Combine(dir, OptimizerFile), tensors, new Dictionary<string, string> { ["format"] = "ftn-adamw" });
        var json = new JsonObject
        {
            ["step"] = position.Step, ["epoch"] = position.Epoch, ["cursor"] = position.Cursor,
            ["total_steps"] = position.TotalSteps, ["train_samples"] = position.TrainSamples, ["seed"] = _opt.Seed,
        };
        LoraAdapter.WriteAtomic(Path.Combine(dir, StateFile), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>Restores the parameter values (<see cref="ITrainableMethod.LoadValues"/>), the Adam state and the step of a checkpoint.</summary>
    public TrainerPosition LoadCheckpoint(string dir)
    {
        string statePath = Path.Combine(dir, StateFile);
        if (!File.Exists(statePath)) throw new FileNotFoundException($"{statePath}: not found (not a training checkpoint?)", statePath);
        JsonNode root;
        try { root = JsonNode.Parse(File.ReadAllText(statePath)) ?? throw new InvalidDataException($"{statePath}: empty"); }
        catch (JsonException e) { throw new InvalidDataException($"{statePath}: invalid JSON: {e.Message}"); }
        int Int(string key) => root[key]?.GetValue<int>() ?? throw new InvalidDataException($"{statePath}: missing \"{key}\"");
        var pos = new TrainerPosition(Int("step"), Int("epoch"), Int("cursor"), Int("total_steps"), Int("train_samples"));
        ulong seed = root["seed"]?.GetValue<ulong>() ?? throw new InvalidDataException($"{statePath}: missing \"seed\"");
        if (seed != _opt.Seed) throw new InvalidDataException($"{statePath}: the checkpoint was trained with seed {seed}, these options say {_opt.Seed}");
        string optPath = Path.Combine(dir, OptimizerFile);
        using var st = Runtime.IO.SafeTensors.Open(optPath);
        foreach (var s in _state)
        {
            foreach (var (suffix, t) in new[] { ("adam_m", s.M), ("adam_v", s.V) })
            {
                string name = $"{s.Name}.{suffix}";
                if (!st.Contains(name)) throw new InvalidDataException($"{optPath}: missing tensor '{name}' (adapter and checkpoint differ)");
                var info = st.Info(name);
                if (!info.Shape.SequenceEqual(t.Shape))
                    throw new InvalidDataException($"{optPath}: tensor '{name}' has shape {info.ShapeText}, expected [{string.Join(", ", t.Shape)}]");
                _backend.Upload(t, st.ReadF32(name));
            }
        }
        if (st.Names.Count != 2 * _state.Count)
            throw new InvalidDataException($"{optPath}: holds {st.Names.Count} tensors, the adapter needs {2 * _state.Count}");
        _method.LoadValues(dir);
        _step = pos.Step;
        return pos;
    }

    private ulong EpochSeed(int epoch) => _opt.Seed ^ (0xD1B54A32D192ED03UL * (ulong)(epoch + 1));

    /// <summary>JSON has no NaN/Infinity: those become null.</summary>
    private static JsonNode? Num(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;

    public void Dispose()
    {
        foreach (var s in _state) { s.M.Dispose(); s.V.Dispose(); }
        _state.Clear();
    }
}
