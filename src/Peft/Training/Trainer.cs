using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Training;

/// <summary>Reported after every optimizer step (<paramref name="Skipped"/>: the loss or a gradient was NaN/Inf, nothing was updated).</summary>
public sealed record TrainProgress(int Step, int TotalSteps, int Epoch, double Loss, double LearningRate, double GradNorm,
    long Tokens, double TokensPerSecond, TimeSpan Elapsed, TimeSpan Eta, bool Skipped = false);

/// <summary>Where a run stands: optimizer steps taken, the epoch and the next sample of its shuffled order.</summary>
public sealed record TrainerPosition(int Step, int Epoch, int Cursor, int TotalSteps, int TrainSamples);

/// <summary>Reported after every evaluation on the held-out split (Step 0 = before training).</summary>
public sealed record EvalProgress(int Step, double Loss, double Perplexity, int Samples, int Targets);

/// <summary>Mean loss per target token over a sample set, and its perplexity exp(loss).</summary>
public sealed record EvalResult(double Loss, double Perplexity, int Samples, int Targets);

/// <summary>A training run stopped before its end: too many NaN/Inf steps in a row. The message says what to change.</summary>
public sealed class TrainingStoppedException(string message) : Exception(message);

/// <summary>What a training run achieved and where its files are.</summary>
public sealed class TrainResult
{
    public double EvalLossBefore { get; init; } = double.NaN;
    public double EvalPerplexityBefore { get; init; } = double.NaN;
    public double EvalLossAfter { get; init; } = double.NaN;
    public double EvalPerplexityAfter { get; init; } = double.NaN;
    /// <summary>The last step taken (less than the planned steps when early stopping ended the run).</summary>
    public int Steps { get; init; }
    public int PlannedSteps { get; init; }
    public bool EarlyStopped { get; init; }
    /// <summary>The step of the best evaluation (0 = before training) and its loss; NaN without evaluations during training.</summary>
    public int BestStep { get; init; } = -1;
    public double BestEvalLoss { get; init; } = double.NaN;
    /// <summary>Steps skipped because their loss or gradient was not finite.</summary>
    public int SkippedSteps { get; init; }
    public double FinalTrainLoss { get; init; } = double.NaN;
    public long TrainTokens { get; init; }
    public double TokensPerSecond { get; init; }
    public TimeSpan Elapsed { get; init; }
    public int TrainSamples { get; init; }
    public int EvalSamples { get; init; }
    /// <summary>Training loss of every step of this call, in order (NaN where a step was skipped).</summary>
    public IReadOnlyList<double> StepLosses { get; init; } = Array.Empty<double>();
    /// <summary>Every evaluation of this call (step, loss).</summary>
    public IReadOnlyList<EvalProgress> Evals { get; init; } = Array.Empty<EvalProgress>();
    public string? MetricsPath { get; init; }
    public string? SummaryPath { get; init; }
    public string? AdapterDir { get; init; }
    public string? TensorBoardDir { get; init; }
    public string? PlotPath { get; init; }
}

/// <summary>
/// Fine-tuning loop over any <see cref="ITrainableMethod"/> (LoRA, full fine-tuning, ...): AdamW or SGD on the
/// method's trainable tensors, warmup then cosine/linear/constant learning rate, gradient accumulation, global-norm
/// clipping, held-out evaluation with early stopping and keep-best, NaN/Inf steps skipped, atomic rotating
/// checkpoints that resume bit for bit, metrics as JSONL and TensorBoard events, and a loss-curve PNG.
/// </summary>
/// <remarks>
/// Accumulation: an optimizer step covers GradAccum micro-batches; the loss of every micro-batch is scaled by
/// 1/N where N is the number of target tokens in the whole window, so the gradient is that of the mean token
/// loss over the window, exactly as if it were one batch. Clipping: the global norm ‖g‖ of all trainable
/// gradients is measured in one reduction (IBackend.GradNormClip) and min(1, clip/‖g‖) is read by the fused AdamW
/// (IBackend.AdamWMultiTensor, one launch over all tensors on GPU backends) as its gradScale on the device, so
/// gradients are never rewritten and the host synchronizes once per step. Weight decay applies only to tensors the method flags (not norms or biases).
/// Every batch has the same (B, T) shape (T = the longest sample, at most MaxLength; short rows and missing rows
/// are padding with target -100), so the model's workspaces and the optimizer state are allocated once.
/// A step whose loss or gradient norm is not finite updates nothing (AdamW's bias-correction count does not
/// advance either); MaxSkippedSteps of them in a row stop the run with <see cref="TrainingStoppedException"/>.
/// </remarks>
public sealed class Trainer : IDisposable
{
    public const string StateFile = "trainer_state.json";
    public const string OptimizerFile = "optimizer.safetensors";
    public const string ConfigFile = "config.yaml";
    public const string MetricsFile = "metrics.jsonl";
    public const string SummaryFile = "train_results.json";
    public const string PlotFile = "loss.png";
    public const string TensorBoardDirName = "tensorboard";
    public const string BestDirName = "best";
    public const string CheckpointPrefix = "checkpoint-";

    private readonly LlamaModel _model;
    private readonly ITrainableMethod _method;
    private readonly TrainOptions _opt;
    private readonly IBackend _backend;
    private readonly List<(string Name, Tensor Param, Tensor Grad, Tensor M, Tensor? V, bool Decay, Tensor? Rounded)> _state = new();
    private readonly Tensor? _scratch; // SGD: lr·update before it is added to the parameter
    private StepReadback? _readback;   // [‖g‖, clipping scale, per-token losses]: the step's one download
    private int[] _pendingRows = Array.Empty<int>(); // per-token losses of each micro-batch of the step in flight
    private (long Targets, double Penalty)? _pending;
    private Tensor[] _grads = Array.Empty<Tensor>();
    private AdamWTensor[] _adam = Array.Empty<AdamWTensor>();
    private int _step;
    private RunState _run = new();

    /// <summary>Counters that a checkpoint carries besides the position, so a resumed run decides exactly as the original.</summary>
    private sealed class RunState
    {
        public int Updates;            // optimizer updates taken (AdamW's t): steps minus skipped steps
        public int SkippedInARow;
        public int SkippedTotal;
        public double BestLoss = double.PositiveInfinity;
        public int BestStep = -1;
        public int BadEvals;           // evaluations since the best without improvement
    }

    /// <summary>A trainer of <paramref name="method"/>'s tensors, which must be attached to <paramref name="model"/>.</summary>
    public Trainer(LlamaModel model, ITrainableMethod method, TrainOptions options)
    {
        options.Validate();
        _model = model;
        _method = method;
        _opt = options;
        _backend = model.Backend;
        if (options.ActivationCheckpointing) model.ActivationCheckpointing = true;
        if (!method.IsAttached) throw new InvalidOperationException($"the {method.Kind} method is detached from the model; attach it before training");
        var names = new HashSet<string>(StringComparer.Ordinal);
        bool adam = options.Optimizer == "adamw";
        long largest = 0;
        try
        {
            // The optimizer state as one range before any of it is allocated (a no-op where the memory plan's reservation
            // already has room): on a GPU it then lies in one pool chunk, not a chunk per large tensor, and the fused AdamW
            // stays one launch.
            long perValue = adam ? 8 : 4, tensorsOfState = adam ? 2 : 1;
            long stateBytes = method.Trainable.Sum(t => perValue * t.Param.Length + tensorsOfState * LlamaWeights.TensorSlackBytes);
            if (!adam && method.Trainable.Count > 0) stateBytes += 4 * method.Trainable.Max(t => t.Param.Length) + LlamaWeights.TensorSlackBytes; // scratch
            _backend.Reserve(stateBytes);
            foreach (var t in method.Trainable)
            {
                if (!names.Add(t.Name)) throw new InvalidOperationException($"{method.Kind}: two trainable tensors are named '{t.Name}'");
                if (t.Param.DType != DType.F32 || t.Grad.DType != DType.F32 || t.Param.Length != t.Grad.Length)
                    throw new InvalidOperationException($"{method.Kind}: trainable '{t.Name}' must be an f32 parameter with an f32 gradient of its size " +
                        $"(param {t.Param.Describe()}, grad {t.Grad.Describe()})");
                var m = _backend.Allocate(DType.F32, t.Param.Shape);
                m.Name = t.Name + (adam ? ".adam_m" : ".sgd_momentum");
                _backend.Fill(m, 0);
                Tensor? v = null;
                if (adam)
                {
                    v = _backend.Allocate(DType.F32, t.Param.Shape);
                    v.Name = t.Name + ".adam_v";
                    _backend.Fill(v, 0);
                }
                _state.Add((t.Name, t.Param, t.Grad, m, v, t.WeightDecay, t.Rounded));
                largest = Math.Max(largest, t.Param.Length);
            }
            if (_state.Count == 0) throw new InvalidOperationException($"the {method.Kind} method has no trainable tensor");
            if (!adam) { _scratch = _backend.Allocate(DType.F32, checked((int)largest)); _scratch.Name = "sgd_scratch"; }
            _readback = new StepReadback(_backend);
            // The same lists every step: GPU backends build their device tables for them once.
            _grads = _state.Select(s => s.Grad).ToArray();
            if (adam) _adam = _state.Select(s => new AdamWTensor(s.Param, s.Grad, s.M, s.V!, s.Decay, s.Rounded)).ToArray();
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    public event Action<TrainProgress>? Progress;
    public event Action<EvalProgress>? Evaluated;

    /// <summary>What this trainer trains.</summary>
    public ITrainableMethod Method => _method;

    /// <summary>Optimizer steps taken so far (skipped steps included).</summary>
    public int StepCount => _step;

    /// <summary>True when the last <see cref="Step"/> found a non-finite loss or gradient and updated nothing.</summary>
    public bool LastStepSkipped { get; private set; }

    /// <summary>The fully resolved run configuration (YAML), written as config.yaml into every checkpoint and the output.</summary>
    public string? ResolvedConfig { get; set; }

    /// <summary>Bytes of optimizer state (AdamW m and v, or SGD momentum and its scratch).</summary>
    public long OptimizerStateBytes => _state.Sum(s => 4L * (s.M.Length + (s.V?.Length ?? 0))) + 4L * (_scratch?.Length ?? 0);

    /// <summary>The batch length T for a set of samples: the longest one, capped by MaxLength.</summary>
    public int SeqLenFor(params IEnumerable<TokenizedSample>[] sets)
    {
        int t = 1;
        foreach (var set in sets) foreach (var s in set) t = Math.Max(t, s.Length);
        return Math.Min(t, _opt.MaxLength);
    }

    /// <summary>Mean loss per target token of the model (with its adapters) on <paramref name="samples"/>, no dropout.</summary>
    /// <remarks>The per-token losses of up to <see cref="EvalBatchesPerRead"/> batches stay on the device and are read back
    /// together (one wait for the device instead of one per batch); each batch is summed in double in token order, then
    /// the batches, as when each was read back alone.</remarks>
    public EvalResult Evaluate(IReadOnlyList<TokenizedSample> samples, int seqLen, int padId)
    {
        double sum = 0;
        long count = 0;
        var queued = new List<int>(); // rows of each batch whose losses wait in _evalLosses
        long used = 0;
        void Read()
        {
            if (queued.Count == 0) return;
            var host = _evalHost.AsSpan(0, (int)used);
            _backend.Download(_evalLosses!.View(0, (int)used), host);
            sum = StepReadback.AddPerBatch(sum, host, CollectionsMarshal.AsSpan(queued));
            queued.Clear();
            used = 0;
        }
        foreach (var b in Batching.Batches(samples, _opt.MicroBatch, seqLen, padId))
        {
            int rows = _model.LossRows(b.BatchSize, b.SeqLen);
            if (queued.Count == EvalBatchesPerRead || (_evalLosses is not null && used + rows > _evalLosses.Length)) Read();
            if (_evalLosses is null || _evalLosses.Length < rows)
            {
                _evalLosses?.Dispose();
                _evalLosses = _backend.Allocate(DType.F32, checked(rows * EvalBatchesPerRead));
                _evalLosses.Name = "eval_losses";
                _evalHost = new float[_evalLosses.Length];
            }
            count += _model.LossInto(b.Tokens, b.Targets, b.BatchSize, b.SeqLen, b.Positions, _evalLosses.View(used, rows));
            queued.Add(rows);
            used += rows;
        }
        Read();
        if (count == 0) return new EvalResult(double.NaN, double.NaN, samples.Count, 0);
        double loss = sum / count;
        return new EvalResult(loss, Math.Exp(loss), samples.Count, (int)count);
    }

    /// <summary>Evaluation batches whose losses are read back together.</summary>
    public const int EvalBatchesPerRead = 32;
    private Tensor? _evalLosses;
    private float[] _evalHost = Array.Empty<float>();

    /// <summary>
    /// One optimizer step over the micro-batches of <paramref name="window"/> at learning rate
    /// <paramref name="lr"/>. Returns the mean target-token loss of the window (plus the method's penalty) and the
    /// gradient norm before clipping. When either is not finite nothing is updated and <see cref="LastStepSkipped"/> is set.
    /// </summary>
    public (double Loss, double GradNorm) Step(IReadOnlyList<Batch> window, double lr)
    {
        BeginStep(window, lr);
        return EndStep();
    }

    /// <summary>
    /// Enqueues a step (<see cref="Step"/>): every micro-batch's forward and backward, the gradient norm and the update,
    /// without waiting for the device (GPU backends run it while the host goes on, e.g. to build the next window); the
    /// per-token losses stay on the device. <see cref="EndStep"/> reads the losses and the norm back, once.
    /// </summary>
    private void BeginStep(IReadOnlyList<Batch> window, double lr)
    {
        if (_pending is not null) throw new InvalidOperationException("a step is in flight: EndStep first");
        long n = window.Sum(b => (long)b.TargetCount);
        if (n == 0) throw new InvalidOperationException("a training step has no target tokens");
        if (_pendingRows.Length != window.Count) _pendingRows = new int[window.Count];
        for (int i = 0; i < window.Count; i++) _pendingRows[i] = _model.LossRows(window[i].BatchSize, window[i].SeqLen);
        var lossViews = _readback!.Layout(_pendingRows);
        _step++;
        _method.ZeroGrad();
        float lossScale = (float)(1.0 / n);
        for (int i = 0; i < window.Count; i++)
        {
            var b = window[i];
            ulong dropoutSeed = _opt.Seed * 0x9E3779B97F4A7C15UL + (ulong)_step * 0x100000001B3UL + (ulong)i;
            _model.ForwardBackwardInto(b.Tokens, b.Targets, b.BatchSize, b.SeqLen, lossScale, dropoutSeed, b.Positions, lossViews[i], b.RowLengths);
        }
        double penalty = _method.AddPenalty();
        // One reduction over all gradients; the clipping scale stays on the device, where AdamW reads it (a non-finite
        // norm makes it NaN and AdamW then writes nothing).
        _backend.GradNormClip(_grads, _readback.Clip, (float)_opt.ClipNorm);
        _readback.FlagNonFiniteLoss();
        if (_opt.Optimizer == "adamw" && double.IsFinite(penalty))
            _backend.AdamWMultiTensor(_adam, new AdamWHyper((float)lr, (float)_opt.Beta1, (float)_opt.Beta2, (float)_opt.AdamEps,
                (float)_opt.WeightDecay, _run.Updates + 1), _readback.Clip);
        _pending = (n, penalty);
        _pendingLr = lr;
    }

    private double _pendingLr;

    /// <summary>Waits for the step <see cref="BeginStep"/> enqueued (one download: norm, scale and every per-token loss) and finishes it.</summary>
    private (double Loss, double GradNorm) EndStep()
    {
        var (n, penalty) = _pending ?? throw new InvalidOperationException("no step in flight");
        _pending = null;
        double lr = _pendingLr;
        var (lossSum, norm, gradScale) = _readback!.Read();
        double loss = lossSum / n + penalty;
        bool adam = _opt.Optimizer == "adamw";
        LastStepSkipped = !double.IsFinite(loss) || !float.IsFinite(gradScale);
        if (LastStepSkipped) return (loss, norm);
        _run.Updates++;
        if (!adam)
        {
            // Heavy-ball SGD (PyTorch's, dampening 0): buf = μ·buf + ĝ (buf = ĝ on the first update); p = p·(1 − lr·wd) − lr·buf.
            float mu = (float)_opt.Momentum;
            foreach (var s in _state)
            {
                if (gradScale != 1f) _backend.Scale(s.Grad, gradScale);
                Tensor update = s.Grad;
                if (mu > 0)
                {
                    _backend.Scale(s.M, _run.Updates == 1 ? 0f : mu);
                    _backend.Add(s.M, s.M, s.Grad);
                    update = s.M;
                }
                if (s.Decay && _opt.WeightDecay > 0) _backend.Scale(s.Param, (float)(1 - lr * _opt.WeightDecay));
                var tmp = _scratch!.View(0, s.Param.Shape);
                _backend.Copy(tmp, update);
                _backend.Scale(tmp, (float)-lr);
                _backend.Add(s.Param, s.Param, tmp);
                if (s.Rounded is not null) _backend.Copy(s.Rounded, s.Param);
            }
        }
        _method.AfterStep();
        return (loss, norm);
    }

    /// <summary>
    /// The next GradAccum micro-batches of the shuffled order from (epoch, cursor), advancing them; a window never spans
    /// two epochs (the last one of an epoch may be short), and a new epoch draws a new order.
    /// </summary>
    private List<Batch> NextWindow(IReadOnlyList<TokenizedSample> train, int seqLen, int padId, ref int epoch, ref int cursor, ref int[] order)
    {
        var window = new List<Batch>(_opt.GradAccum);
        for (int a = 0; a < _opt.GradAccum; a++)
        {
            if (cursor >= train.Count)
            {
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
        return window;
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
    /// after. When <paramref name="outputDir"/> is given, writes there: metrics.jsonl (one JSON object per step and per
    /// evaluation), TensorBoard event files (tensorboard/), train_results.json, loss.png, config.yaml
    /// (<see cref="ResolvedConfig"/>) and the method's own files (<see cref="ITrainableMethod.Save"/>) at the end.
    /// </summary>
    /// <remarks>
    /// With SaveEvery &gt; 0 a checkpoint (<see cref="SaveCheckpoint"/>) is written to outputDir/checkpoint-{step}
    /// every SaveEvery steps, atomically (a temporary directory renamed into place), keeping the newest
    /// SaveTotalLimit. <paramref name="resumeFrom"/> continues from such a checkpoint (its values are loaded into the
    /// method by <see cref="LoadCheckpoint"/>): with the same data and options the remaining steps reproduce the
    /// uninterrupted run bit for bit (same batches, dropout masks, learning rates, optimizer state, early-stopping
    /// counters). metrics.jsonl keeps the lines up to the checkpoint's step and is appended to.
    /// </remarks>
    public TrainResult Train(IReadOnlyList<TokenizedSample> train, IReadOnlyList<TokenizedSample> eval, int padId,
        string? outputDir = null, string? baseModelName = null, CancellationToken cancel = default, string? resumeFrom = null)
    {
        if (train.Count == 0) throw new ArgumentException("the training split is empty");
        if (_opt.KeepBest && outputDir is null) throw new ArgumentException("keep best needs an output directory (the best values are saved there)");
        if (_opt.MaxEvalSamples > 0 && eval.Count > _opt.MaxEvalSamples) eval = eval.Take(_opt.MaxEvalSamples).ToList();
        int seqLen = SeqLenFor(train, eval);
        int total = TotalSteps(_opt, train.Count);
        int warmup = WarmupFor(_opt, total);

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

        StreamWriter? metrics = null;
        TensorBoardWriter? tb = null;
        string? metricsPath = null;
        if (outputDir is not null)
        {
            Directory.CreateDirectory(outputDir);
            metricsPath = Path.Combine(outputDir, MetricsFile);
            if (resumeFrom is not null) TruncateMetrics(metricsPath, first - 1);
            else if (File.Exists(metricsPath)) File.Delete(metricsPath);
            metrics = new StreamWriter(metricsPath, append: true) { AutoFlush = true };
            // as metrics.jsonl: a resumed run keeps the events up to its checkpoint (no step shown twice), a fresh run none
            tb = TensorBoardWriter.Open(Path.Combine(outputDir, TensorBoardDirName), resumeFrom is null ? -1 : first - 1);
        }
        try
        {
            void Log(JsonObject o) => metrics?.WriteLine(o.ToJsonString());
            var evals = new List<EvalProgress>();

            // record = false: the resume point's evaluation, reported but not logged (the uninterrupted run has no such line)
            EvalResult? RunEval(int step, bool record = true)
            {
                if (eval.Count == 0) return null;
                var r = Evaluate(eval, seqLen, padId);
                var e = new EvalProgress(step, r.Loss, r.Perplexity, r.Samples, r.Targets);
                Evaluated?.Invoke(e);
                if (!record) return r;
                evals.Add(e);
                Log(new JsonObject { ["step"] = step, ["eval_loss"] = Num(r.Loss), ["eval_ppl"] = Num(r.Perplexity), ["eval_targets"] = r.Targets });
                tb?.Scalars(step, ("eval/loss", r.Loss), ("eval/perplexity", r.Perplexity));
                return r;
            }

            // Early stopping and keep-best; returns true when patience ran out.
            bool ConsiderBest(EvalResult? r, int step)
            {
                if (r is null || !double.IsFinite(r.Loss)) return false;
                if (r.Loss < _run.BestLoss - _opt.EarlyStoppingMinDelta)
                {
                    _run.BestLoss = r.Loss;
                    _run.BestStep = step;
                    _run.BadEvals = 0;
                    if (_opt.KeepBest) WriteDirectoryAtomic(Path.Combine(outputDir!, BestDirName), d =>
                    {
                        _method.Save(d, baseModelName);
                        WriteConfig(d);
                        WriteJsonAtomic(Path.Combine(d, "best.json"), new JsonObject { ["step"] = step, ["eval_loss"] = r.Loss, ["eval_ppl"] = r.Perplexity });
                    });
                    return false;
                }
                _run.BadEvals++;
                return _opt.EarlyStoppingPatience > 0 && _run.BadEvals >= _opt.EarlyStoppingPatience;
            }

            var before = RunEval(first - 1, record: resumeFrom is null);
            if (resumeFrom is null) ConsiderBest(before, 0);
            var losses = new List<double>();
            var clock = Stopwatch.StartNew();
            long tokens = 0;
            int lastStep = first - 1;
            bool earlyStopped = false;
            EvalResult? lastEval = null;
            int[] order = Batching.Permutation(train.Count, EpochSeed(epoch));
            // The window of a step is built while the device runs the step before (between enqueueing it and reading its
            // loss back): (epoch, cursor, order) is where the window being trained ends, (nEpoch, nCursor, nOrder) where
            // the one built ahead ends.
            var (nEpoch, nCursor, nOrder) = (epoch, cursor, order);
            var window = first <= total ? NextWindow(train, seqLen, padId, ref nEpoch, ref nCursor, ref nOrder) : new List<Batch>();
            for (int step = first; step <= total; step++)
            {
                cancel.ThrowIfCancellationRequested();
                (epoch, cursor, order) = (nEpoch, nCursor, nOrder);
                double lr = LrSchedule.At(_opt.LrScheduler, step, total, warmup, _opt.LearningRate, _opt.MinLrRatio);
                BeginStep(window, lr);
                var next = step < total ? NextWindow(train, seqLen, padId, ref nEpoch, ref nCursor, ref nOrder) : window;
                var (loss, norm) = EndStep();
                bool skipped = LastStepSkipped;
                losses.Add(skipped ? double.NaN : loss);
                lastStep = step;
                tokens += window.Sum(b => (long)b.TokenCount);
                double secs = clock.Elapsed.TotalSeconds;
                double tps = secs > 0 ? tokens / secs : 0;
                var eta = TimeSpan.FromSeconds(secs / (step - first + 1) * (total - step));
                Progress?.Invoke(new TrainProgress(step, total, epoch, loss, lr, norm, tokens, tps, clock.Elapsed, eta, skipped));
                var line = new JsonObject
                {
                    ["step"] = step, ["epoch"] = epoch, ["loss"] = Num(loss), ["lr"] = lr, ["grad_norm"] = Num(norm),
                    ["tokens"] = tokens, ["tokens_per_s"] = Math.Round(tps, 1), ["elapsed_s"] = Math.Round(secs, 3),
                };
                if (skipped)
                {
                    line["skipped"] = true;
                    line["skip_reason"] = !double.IsFinite(loss) ? $"loss is {loss}" : $"gradient norm is {norm}";
                    _run.SkippedInARow++;
                    _run.SkippedTotal++;
                }
                else
                {
                    _run.SkippedInARow = 0;
                    tb?.Scalars(step, ("train/loss", loss), ("train/learning_rate", lr), ("train/grad_norm", norm), ("train/tokens_per_s", tps));
                }
                Log(line);
                if (_run.SkippedInARow >= _opt.MaxSkippedSteps)
                {
                    string last = outputDir is null ? "" : LatestCheckpoint(outputDir) is { } c
                        ? $"; the last good checkpoint is {c} (resume from it with a lower learning rate or a tighter clip)"
                        : "; no checkpoint was written (set save every N steps)";
                    throw new TrainingStoppedException($"step {step}: {_run.SkippedInARow} steps in a row had a NaN/Inf loss or gradient " +
                        $"(last: {line["skip_reason"]}); stopping. Lower the learning rate (now {_opt.LearningRate:0.###e0}) or the clip norm, " +
                        $"or check the data{last}");
                }
                if (_opt.EvalEvery > 0 && step % _opt.EvalEvery == 0)
                {
                    lastEval = RunEval(step);
                    earlyStopped = ConsiderBest(lastEval, step) && step != total;
                }
                else lastEval = null;
                if (outputDir is not null && _opt.SaveEvery > 0 && step % _opt.SaveEvery == 0 && step != total && !earlyStopped)
                    SaveCheckpoint(Path.Combine(outputDir, $"{CheckpointPrefix}{step}"), new TrainerPosition(step, epoch, cursor, total, train.Count), baseModelName);
                if (earlyStopped) break;
                window = next;
            }
            clock.Stop();
            var after = lastEval ?? RunEval(lastStep);
            if (lastEval is null) ConsiderBest(after, lastStep);
            if (_opt.KeepBest && _run.BestStep >= 0 && _run.BestStep != lastStep)
            {
                // End with the best values: the final files and eval are those of the best evaluation.
                _method.LoadValues(Path.Combine(outputDir!, BestDirName));
                after = RunEval(lastStep);
            }

            double secsTotal = clock.Elapsed.TotalSeconds;
            string? plotPath = null;
            if (outputDir is not null)
            {
                plotPath = Path.Combine(outputDir, PlotFile);
                var (allLosses, allEvals) = ReadCurves(metricsPath!);
                LossPlot.Write(plotPath, allLosses, allEvals, $"{_method.Kind} training");
            }
            var result = new TrainResult
            {
                EvalLossBefore = before?.Loss ?? double.NaN,
                EvalPerplexityBefore = before?.Perplexity ?? double.NaN,
                EvalLossAfter = after?.Loss ?? double.NaN,
                EvalPerplexityAfter = after?.Perplexity ?? double.NaN,
                Steps = lastStep,
                PlannedSteps = total,
                EarlyStopped = earlyStopped,
                BestStep = _run.BestStep,
                BestEvalLoss = double.IsFinite(_run.BestLoss) ? _run.BestLoss : double.NaN,
                SkippedSteps = _run.SkippedTotal,
                FinalTrainLoss = losses.Count > 0 ? losses[^1] : double.NaN,
                TrainTokens = tokens,
                TokensPerSecond = secsTotal > 0 ? tokens / secsTotal : 0,
                Elapsed = clock.Elapsed,
                TrainSamples = train.Count,
                EvalSamples = eval.Count,
                StepLosses = losses,
                Evals = evals,
                MetricsPath = metricsPath,
                AdapterDir = outputDir,
                SummaryPath = outputDir is null ? null : Path.Combine(outputDir, SummaryFile),
                TensorBoardDir = tb?.Directory,
                PlotPath = plotPath,
            };
            if (outputDir is not null)
            {
                _method.Save(outputDir, baseModelName);
                WriteConfig(outputDir);
                var summary = new JsonObject
                {
                    ["eval_loss_before"] = Num(result.EvalLossBefore),
                    ["eval_ppl_before"] = Num(result.EvalPerplexityBefore),
                    ["eval_loss_after"] = Num(result.EvalLossAfter),
                    ["eval_ppl_after"] = Num(result.EvalPerplexityAfter),
                    ["steps"] = lastStep,
                    ["planned_steps"] = total,
                    ["early_stopped"] = earlyStopped,
                    ["best_step"] = _run.BestStep,
                    ["best_eval_loss"] = Num(result.BestEvalLoss),
                    ["skipped_steps"] = _run.SkippedTotal,
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
                    ["method"] = _method.Kind,
                    [_method.Kind] = _method.DescribeConfig(),
                    ["options"] = JsonSerializer.SerializeToNode(_opt),
                };
                WriteJsonAtomic(result.SummaryPath!, summary);
            }
            return result;
        }
        finally
        {
            metrics?.Dispose();
            tb?.Dispose();
        }
    }

    // ------------------------------------------------------------------------------------------ checkpoints

    /// <summary>
    /// Writes a resumable checkpoint into <paramref name="dir"/>: the method's files (<see cref="ITrainableMethod.Save"/>,
    /// usable on their own), optimizer.safetensors (AdamW m and v, "{name}.adam_m" / ".adam_v", or SGD's
    /// "{name}.sgd_momentum"), trainer_state.json (the step, the data position, the run shape, the update, skip and
    /// early-stopping counters) and config.yaml (<see cref="ResolvedConfig"/>). The directory is assembled under a
    /// temporary name and renamed into place, so a checkpoint-N directory is always complete; then the oldest
    /// checkpoints beyond SaveTotalLimit are deleted.
    /// </summary>
    public void SaveCheckpoint(string dir, TrainerPosition position, string? baseModelName = null)
    {
        if (position.Step != _step) throw new ArgumentException($"position step {position.Step} differs from the trainer's {_step}");
        WriteDirectoryAtomic(dir, tmp =>
        {
            _method.Save(tmp, baseModelName);
            var tensors = new List<(string, DType, int[], float[])>();
            foreach (var s in _state)
            {
                tensors.Add((s.M.Name!, DType.F32, (int[])s.M.Shape.Clone(), s.M.ToArray()));
                if (s.V is not null) tensors.Add((s.V.Name!, DType.F32, (int[])s.V.Shape.Clone(), s.V.ToArray()));
            }
            Runtime.IO.SafeTensors.Write(Path.Combine(tmp, OptimizerFile), tensors, new Dictionary<string, string> { ["format"] = "ftn-" + _opt.Optimizer });
            var json = new JsonObject
            {
                ["step"] = position.Step, ["epoch"] = position.Epoch, ["cursor"] = position.Cursor,
                ["total_steps"] = position.TotalSteps, ["train_samples"] = position.TrainSamples, ["seed"] = _opt.Seed,
                ["optimizer"] = _opt.Optimizer, ["method"] = _method.Kind,
                ["updates"] = _run.Updates, ["skipped_in_a_row"] = _run.SkippedInARow, ["skipped_total"] = _run.SkippedTotal,
                ["best_eval_loss"] = Num(_run.BestLoss), ["best_step"] = _run.BestStep, ["bad_evals"] = _run.BadEvals,
            };
            WriteJsonAtomic(Path.Combine(tmp, StateFile), json);
            WriteConfig(tmp);
        });
        if (_opt.SaveTotalLimit > 0)
        {
            string parent = Path.GetDirectoryName(Path.GetFullPath(dir))!;
            foreach (var (_, old) in Checkpoints(parent).SkipLast(_opt.SaveTotalLimit)) Directory.Delete(old, recursive: true);
        }
    }

    /// <summary>Restores the parameter values (<see cref="ITrainableMethod.LoadValues"/>), the optimizer state and the step of a checkpoint.</summary>
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
        string optimizer = root["optimizer"]?.GetValue<string>() ?? "adamw";
        if (optimizer != _opt.Optimizer) throw new InvalidDataException($"{statePath}: the checkpoint was trained with {optimizer}, these options say {_opt.Optimizer}");
        string kind = root["method"]?.GetValue<string>() ?? "lora";
        if (kind != _method.Kind) throw new InvalidDataException($"{statePath}: the checkpoint trained a {kind} method, this run a {_method.Kind} one");
        string optPath = Path.Combine(dir, OptimizerFile);
        using (var st = Runtime.IO.SafeTensors.Open(optPath))
        {
            int expected = 0;
            foreach (var s in _state)
            {
                foreach (var t in new[] { s.M, s.V })
                {
                    if (t is null) continue;
                    expected++;
                    string name = t.Name!;
                    if (!st.Contains(name)) throw new InvalidDataException($"{optPath}: missing tensor '{name}' (method and checkpoint differ)");
                    var info = st.Info(name);
                    if (!info.Shape.SequenceEqual(t.Shape))
                        throw new InvalidDataException($"{optPath}: tensor '{name}' has shape {info.ShapeText}, expected [{string.Join(", ", t.Shape)}]");
                    _backend.Upload(t, st.ReadF32(name));
                }
            }
            if (st.Names.Count != expected)
                throw new InvalidDataException($"{optPath}: holds {st.Names.Count} tensors, the method needs {expected}");
        }
        _method.LoadValues(dir);
        _step = pos.Step;
        _run = new RunState
        {
            Updates = root["updates"]?.GetValue<int>() ?? pos.Step,
            SkippedInARow = root["skipped_in_a_row"]?.GetValue<int>() ?? 0,
            SkippedTotal = root["skipped_total"]?.GetValue<int>() ?? 0,
            BestLoss = root["best_eval_loss"]?.GetValue<double>() ?? double.PositiveInfinity,
            BestStep = root["best_step"]?.GetValue<int>() ?? -1,
            BadEvals = root["bad_evals"]?.GetValue<int>() ?? 0,
        };
        return pos;
    }

    /// <summary>The checkpoint-{step} directories under <paramref name="outputDir"/>, oldest first.</summary>
    public static IReadOnlyList<(int Step, string Path)> Checkpoints(string outputDir)
    {
        if (!Directory.Exists(outputDir)) return Array.Empty<(int, string)>();
        var list = new List<(int, string)>();
        foreach (var d in Directory.GetDirectories(outputDir, CheckpointPrefix + "*"))
            if (int.TryParse(Path.GetFileName(d).AsSpan(CheckpointPrefix.Length), NumberStyles.None, CultureInfo.InvariantCulture, out int s))
                list.Add((s, d));
        list.Sort((a, b) => a.Item1.CompareTo(b.Item1));
        return list;
    }

    /// <summary>The newest complete checkpoint under <paramref name="outputDir"/>, or null.</summary>
    public static string? LatestCheckpoint(string outputDir) =>
        Checkpoints(outputDir).Where(c => File.Exists(Path.Combine(c.Path, StateFile))).Select(c => c.Path).LastOrDefault();

    // ------------------------------------------------------------------------------------------ files

    private void WriteConfig(string dir)
    {
        if (ResolvedConfig is not null) LoraAdapter.WriteAtomic(Path.Combine(dir, ConfigFile), ResolvedConfig);
    }

    private static void WriteJsonAtomic(string path, JsonObject o) =>
        LoraAdapter.WriteAtomic(path, o.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));

    /// <summary>
    /// Builds <paramref name="dir"/> under a temporary sibling name and renames it into place (replacing an existing
    /// one), so a reader never sees a half-written directory: a crash leaves either the old or the new one, plus at
    /// most a hidden ".*.tmp-*" directory that the next call removes.
    /// </summary>
    public static void WriteDirectoryAtomic(string dir, Action<string> write)
    {
        dir = Path.GetFullPath(dir.TrimEnd('/', '\\'));
        string parent = Path.GetDirectoryName(dir)!;
        string name = Path.GetFileName(dir);
        Directory.CreateDirectory(parent);
        foreach (var stale in Directory.GetDirectories(parent, $".{name}.tmp-*").Concat(Directory.GetDirectories(parent, $".{name}.old-*")))
            Directory.Delete(stale, recursive: true);
        string tmp = Path.Combine(parent, $".{name}.tmp-{Environment.ProcessId}");
        string old = Path.Combine(parent, $".{name}.old-{Environment.ProcessId}");
        Directory.CreateDirectory(tmp);
        try
        {
            write(tmp);
            if (Directory.Exists(dir)) Directory.Move(dir, old);
            Directory.Move(tmp, dir);
            if (Directory.Exists(old)) Directory.Delete(old, recursive: true);
        }
        catch
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, recursive: true);
            if (!Directory.Exists(dir) && Directory.Exists(old)) Directory.Move(old, dir);
            throw;
        }
    }

    /// <summary>Keeps the metrics lines of steps up to <paramref name="step"/> (a resumed run rewrites what came after).</summary>
    private static void TruncateMetrics(string path, int step)
    {
        if (!File.Exists(path)) return;
        var keep = new List<string>();
        foreach (var line in File.ReadLines(path))
        {
            if (line.Length == 0) continue;
            JsonNode? o;
            try { o = JsonNode.Parse(line); }
            catch (JsonException) { break; } // a line cut by the kill: everything after it is gone anyway
            if (o?["step"]?.GetValue<int>() is int s && s <= step) keep.Add(line);
        }
        LoraAdapter.WriteAtomic(path, string.Concat(keep.Select(l => l + "\n")));
    }

    /// <summary>The (step, loss) and (step, eval loss) series of a metrics.jsonl (the whole run, resumed parts included).</summary>
    public static (List<(int Step, double Loss)> Train, List<(int Step, double Loss)> Eval) ReadCurves(string metricsPath)
    {
        var train = new List<(int, double)>();
        var ev = new List<(int, double)>();
        foreach (var line in File.ReadLines(metricsPath))
        {
            if (line.Length == 0) continue;
            var o = JsonNode.Parse(line)!.AsObject();
            int step = o["step"]!.GetValue<int>();
            if (o.ContainsKey("eval_loss")) { if (o["eval_loss"] is { } e) ev.Add((step, e.GetValue<double>())); }
            else if (o["loss"] is { } l && o["skipped"] is null) train.Add((step, l.GetValue<double>()));
        }
        return (train, ev);
    }

    private ulong EpochSeed(int epoch) => _opt.Seed ^ (0xD1B54A32D192ED03UL * (ulong)(epoch + 1));

    /// <summary>JSON has no NaN/Infinity: those become null.</summary>
    private static JsonNode? Num(double v) => double.IsFinite(v) ? JsonValue.Create(v) : null;

    public void Dispose()
    {
        foreach (var s in _state) { s.M.Dispose(); s.V?.Dispose(); }
        _state.Clear();
        _scratch?.Dispose();
        _readback?.Dispose();
        _evalLosses?.Dispose();
    }
}
