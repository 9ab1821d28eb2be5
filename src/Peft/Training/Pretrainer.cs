using System.Diagnostics;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Training;

/// <summary>Settings of a from-scratch, full-parameter training run (<see cref="Pretrainer"/>).</summary>
public sealed record PretrainSettings
{
    public int Steps { get; init; } = 1000;
    /// <summary>B: rows per step.</summary>
    public int BatchSize { get; init; } = 16;
    /// <summary>T: tokens per row.</summary>
    public int SeqLen { get; init; } = 128;
    /// <summary>Peak learning rate (reached after the warmup).</summary>
    public float LearningRate { get; init; } = 3e-3f;
    /// <summary>The cosine decay ends at LearningRate · MinLrRatio.</summary>
    public float MinLrRatio { get; init; } = 0.1f;
    public int WarmupSteps { get; init; } = 50;
    /// <summary>Decoupled weight decay, applied to matrices (embeddings and linears) only, not to norm weights.</summary>
    public float WeightDecay { get; init; } = 0.1f;
    public float Beta1 { get; init; } = 0.9f;
    public float Beta2 { get; init; } = 0.95f;
    public float Eps { get; init; } = 1e-8f;
    /// <summary>Global gradient-norm clip (0 = off).</summary>
    public float Clip { get; init; } = 1f;
    public ulong Seed { get; init; }
    /// <summary>Evaluate the held-out batches every this many steps (0 = only at the end).</summary>
    public int EvalEvery { get; init; } = 100;
    /// <summary>A step whose loss or gradient is NaN/Inf is skipped (nothing updated); this many skipped in a row stop the run (as the Trainer).</summary>
    public int MaxSkippedSteps { get; init; } = 5;

    public void Validate()
    {
        void Req(bool ok, string msg) { if (!ok) throw new ArgumentException(msg); }
        Req(Steps > 0, $"steps must be > 0 (got {Steps})");
        Req(BatchSize > 0, $"batch size must be > 0 (got {BatchSize})");
        Req(SeqLen > 1, $"sequence length must be > 1 (got {SeqLen})");
        Req(LearningRate > 0 && float.IsFinite(LearningRate), $"learning rate must be > 0 (got {LearningRate})");
        Req(MinLrRatio >= 0 && MinLrRatio <= 1, $"min lr ratio must be in [0, 1] (got {MinLrRatio})");
        Req(WarmupSteps >= 0, $"warmup must be >= 0 (got {WarmupSteps})");
        Req(WeightDecay >= 0, $"weight decay must be >= 0 (got {WeightDecay})");
        Req(Clip >= 0, $"clip must be >= 0 (got {Clip})");
        Req(MaxSkippedSteps >= 1, $"max skipped steps must be >= 1 (got {MaxSkippedSteps})");
    }
}

/// <summary>One step's input: token ids and next-token targets (-100 = no loss), each (B·T) row-major.</summary>
public sealed record PretrainBatch(int[] Tokens, int[] Targets);

/// <summary>Reported after every optimizer step (<paramref name="Skipped"/>: the loss or the gradient norm was NaN/Inf, nothing was updated).</summary>
public sealed record PretrainProgress(int Step, int TotalSteps, double Loss, float LearningRate, double GradNorm,
    double TokensPerSecond, TimeSpan Elapsed, TimeSpan Eta, double? EvalLoss, bool Skipped = false);

/// <summary>FirstLoss and FinalLoss are those of the first and last steps that were not skipped (NaN when every step was).</summary>
public sealed record PretrainResult(int Steps, double FirstLoss, double FinalLoss, double? EvalLossBefore, double? EvalLossAfter,
    long TrainedTokens, TimeSpan Elapsed, int SkippedSteps = 0);

/// <summary>
/// Full-parameter training of a <see cref="LlamaModel"/> from scratch (<see cref="LlamaModel.TrainBase"/> = true):
/// AdamW on every base parameter, linear warmup then cosine decay, global gradient-norm clipping.
/// Used to produce the embedded model (models/ftn-tiny); LoRA fine-tuning is <c>Trainer</c>'s job.
/// </summary>
/// <remarks>
/// Each step is one forward/backward over a (B, T) batch whose loss is the mean over its non-ignored targets
/// (lossScale = 1/count), then the optimizer step the Trainer takes: the global gradient norm in one reduction
/// (IBackend.GradNormClip, which leaves min(1, clip/‖g‖) on the device) and one fused AdamW over every parameter
/// (IBackend.AdamWMultiTensor: one launch on GPU backends, weight decay on matrices only, nothing written when the norm
/// is not finite), then the gradients are zeroed. Optimizer moments (m, v) are f32, allocated once, like every other buffer.
/// As in the Trainer, the per-token losses stay on the device (LlamaModel.ForwardBackwardInto) next to the norm and the
/// clipping scale (<see cref="StepReadback"/>), so a step waits for the device once; a non-finite loss or gradient norm
/// turns the scale into NaN on the device, AdamW then writes nothing, and the step is skipped (<see cref="LastStepSkipped"/>,
/// reported in <see cref="PretrainProgress.Skipped"/>) instead of stopping the run; MaxSkippedSteps in a row stop it
/// with <see cref="TrainingStoppedException"/>.
/// </remarks>
public sealed class Pretrainer : IDisposable
{
    public const int IgnoreIndex = -100;

    private readonly LlamaModel _model;
    private readonly IBackend _backend;
    private readonly PretrainSettings _s;
    private readonly List<(string Name, Tensor Param, Tensor Grad, Tensor M, Tensor V, bool Decay)> _params = new();
    private readonly StepReadback _readback;       // [‖g‖, clipping scale, per-token losses]: the step's one download
    private readonly int[] _lossRows = new int[1];
    private readonly Tensor[] _grads;              // the same lists every step: GPU backends build their device tables once
    private readonly AdamWTensor[] _adam;
    private int _step;
    private int _updates;                          // AdamW's t: steps taken minus steps skipped

    public Pretrainer(LlamaModel model, IBackend backend, PretrainSettings settings)
    {
        settings.Validate();
        _model = model;
        _backend = backend;
        _s = settings;
        // Gradients and moments as one range before they are allocated: one pool chunk on a GPU (one fused launch).
        if (!_model.TrainBase)
            backend.Reserve(LlamaWeights.AllocationBytes(model.Config, DType.F32) + model.Weights.Named().Sum(x => 8 * x.Tensor.Length + 2 * LlamaWeights.TensorSlackBytes));
        _model.TrainBase = true;
        foreach (var (name, p, g) in _model.BaseParameters())
        {
            if (p.DType != DType.F32)
                throw new InvalidOperationException($"full training needs f32 parameters; {p.Describe()} is {p.DType.Name()}");
            var m = backend.Allocate(DType.F32, p.Shape);
            var v = backend.Allocate(DType.F32, p.Shape);
            backend.Fill(g, 0);
            _params.Add((name, p, g, m, v, p.Rank >= 2));
        }
        if (_params.Count == 0) throw new InvalidOperationException("the model exposes no base parameters");
        _readback = new StepReadback(backend);
        _lossRows[0] = model.LossRows(settings.BatchSize, settings.SeqLen);
        _grads = _params.Select(p => p.Grad).ToArray();
        _adam = _params.Select(p => new AdamWTensor(p.Param, p.Grad, p.M, p.V, p.Decay)).ToArray();
    }

    /// <summary>Steps taken so far, skipped steps included.</summary>
    public int StepsDone => _step;
    /// <summary>The last step's loss or gradient norm was not finite: no parameter was updated.</summary>
    public bool LastStepSkipped { get; private set; }
    public long ParameterCount => _params.Sum(p => p.Param.Length);

    /// <summary>
    /// Fills freshly allocated weights for training from scratch: linear and embedding weights ~ N(0, std²),
    /// the output projections of each residual branch (o_proj, down_proj) ~ N(0, (std/√(2L))²) so the residual
    /// stream's variance does not grow with depth (GPT-2's scheme), RMSNorm weights = 1, biases = 0.
    /// Deterministic in <paramref name="seed"/>.
    /// </summary>
    public static void InitializeWeights(LlamaWeights w, IBackend backend, ulong seed, float std = 0.02f)
    {
        float residualStd = std / MathF.Sqrt(2f * w.Config.NumLayers);
        int index = 0;
        foreach (var (name, t) in w.Named())
        {
            var data = new float[t.Length];
            if (name.EndsWith("norm.weight", StringComparison.Ordinal)) // input_layernorm, post_attention_layernorm, model.norm
                Array.Fill(data, 1f);
            else if (name.EndsWith(".bias", StringComparison.Ordinal))
            { /* zeros */ }
            else
            {
                float sd = name.EndsWith("o_proj.weight", StringComparison.Ordinal) || name.EndsWith("down_proj.weight", StringComparison.Ordinal) ? residualStd : std;
                var rng = new NormalRng(seed, (ulong)index);
                for (int i = 0; i < data.Length; i++) data[i] = sd * rng.Next();
            }
            backend.Upload(t, data);
            index++;
        }
    }

    /// <summary>Learning rate of 1-based step <paramref name="step"/>: linear warmup, then cosine decay to LearningRate·MinLrRatio.</summary>
    public float LearningRateAt(int step)
    {
        float peak = _s.LearningRate, min = peak * _s.MinLrRatio;
        if (_s.WarmupSteps > 0 && step <= _s.WarmupSteps) return peak * step / _s.WarmupSteps;
        int decaySteps = Math.Max(1, _s.Steps - _s.WarmupSteps);
        double progress = Math.Clamp((double)(step - _s.WarmupSteps) / decaySteps, 0, 1);
        return (float)(min + 0.5 * (peak - min) * (1 + Math.Cos(Math.PI * progress)));
    }

    /// <summary>
    /// One optimizer step on one batch. Returns (mean loss, gradient norm before clipping); when either is not finite no
    /// parameter is updated and <see cref="LastStepSkipped"/> is set (the gradients are zeroed either way).
    /// </summary>
    public (double Loss, double GradNorm) Step(PretrainBatch batch)
    {
        int count = CountTargets(batch);
        if (count == 0) throw new ArgumentException("a training batch has no target to learn (every target is -100)");
        var losses = _readback.Layout(_lossRows)[0];
        int n = _model.ForwardBackwardInto(batch.Tokens, batch.Targets, _s.BatchSize, _s.SeqLen, 1f / count, DropoutSeed(), default, losses);
        if (n != count) throw new InvalidOperationException($"the model counted {n} targets, the batch has {count}");
        int step = ++_step;
        // One reduction over every gradient; the clipping scale stays on the device, where AdamW reads it, and turns NaN when
        // the norm or a loss is not finite, so AdamW writes nothing. Then the step's one wait: norm, scale and losses together.
        _backend.GradNormClip(_grads, _readback.Clip, _s.Clip);
        _readback.FlagNonFiniteLoss();
        _backend.AdamWMultiTensor(_adam, new AdamWHyper(LearningRateAt(step), _s.Beta1, _s.Beta2, _s.Eps, _s.WeightDecay, _updates + 1), _readback.Clip);
        foreach (var p in _params) _backend.Fill(p.Grad, 0);
        var (lossSum, norm, scale) = _readback.Read();
        double loss = lossSum / count;
        LastStepSkipped = !double.IsFinite(loss) || !float.IsFinite(scale);
        if (!LastStepSkipped) _updates++;
        return (loss, norm);
    }

    /// <summary>Mean loss per target token over <paramref name="batches"/> (no gradient, no dropout).</summary>
    public double Evaluate(IReadOnlyList<PretrainBatch> batches)
    {
        double sum = 0;
        long count = 0;
        foreach (var b in batches)
        {
            var (s, n) = _model.Loss(b.Tokens, b.Targets, _s.BatchSize, _s.SeqLen);
            sum += s;
            count += n;
        }
        return count == 0 ? double.NaN : sum / count;
    }

    /// <summary>
    /// Runs <see cref="PretrainSettings.Steps"/> steps; batch i (0-based) comes from <paramref name="batchAt"/>.
    /// Evaluates <paramref name="eval"/> before, every EvalEvery steps and at the end.
    /// </summary>
    public PretrainResult Run(Func<int, PretrainBatch> batchAt, IReadOnlyList<PretrainBatch> eval, Action<PretrainProgress>? onProgress = null)
    {
        var sw = Stopwatch.StartNew();
        double? evalBefore = eval.Count > 0 ? Evaluate(eval) : null;
        double first = double.NaN, last = double.NaN;
        int skipped = 0, skippedInARow = 0;
        long tokens = 0;
        var timed = Stopwatch.StartNew();
        long timedTokens = 0;
        for (int i = 0; i < _s.Steps; i++)
        {
            var batch = batchAt(i);
            var (loss, norm) = Step(batch);
            tokens += batch.Tokens.Length;
            timedTokens += batch.Tokens.Length;
            bool skip = LastStepSkipped;
            if (skip) { skipped++; skippedInARow++; }
            else
            {
                skippedInARow = 0;
                if (double.IsNaN(first)) first = loss;
                last = loss;
            }
            double? evalLoss = null;
            if (eval.Count > 0 && (_s.EvalEvery > 0 && _step % _s.EvalEvery == 0 || _step == _s.Steps))
            {
                timed.Stop();
                evalLoss = Evaluate(eval);
                timed.Start();
            }
            double tps = timedTokens / Math.Max(1e-9, timed.Elapsed.TotalSeconds);
            var eta = TimeSpan.FromSeconds((_s.Steps - _step) * (double)batch.Tokens.Length / Math.Max(1e-9, tps));
            onProgress?.Invoke(new PretrainProgress(_step, _s.Steps, loss, LearningRateAt(_step), norm, tps, sw.Elapsed, eta, evalLoss, skip));
            if (skippedInARow >= _s.MaxSkippedSteps)
                throw new TrainingStoppedException($"step {_step}: {skippedInARow} steps in a row had a NaN/Inf loss or gradient " +
                    $"(last: loss {loss}, gradient norm {norm}); stopping. Lower the learning rate (now {_s.LearningRate:0.###e0}) or the clip");
        }
        double? evalAfter = eval.Count > 0 ? Evaluate(eval) : null;
        return new PretrainResult(_step, first, last, evalBefore, evalAfter, tokens, sw.Elapsed, skipped);
    }

    private ulong DropoutSeed() => _s.Seed * 0x9E3779B97F4A7C15UL + (ulong)_step;

    private static int CountTargets(PretrainBatch b)
    {
        int c = 0;
        foreach (int t in b.Targets) if (t != IgnoreIndex) c++;
        return c;
    }

    public void Dispose()
    {
        foreach (var p in _params) { p.M.Dispose(); p.V.Dispose(); }
        _params.Clear();
        _readback.Dispose();
    }

    /// <summary>Standard normal numbers (Box-Muller over SplitMix64): deterministic in (seed, stream).</summary>
    private struct NormalRng
    {
        private ulong _s;
        private float? _spare;

        public NormalRng(ulong seed, ulong stream)
        {
            _s = seed * 0xD1342543DE82EF95UL + stream * 0x9E3779B97F4A7C15UL + 1;
            _spare = null;
        }

        private ulong NextU64()
        {
            ulong z = _s += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }

        public float Next()
        {
            if (_spare is float s) { _spare = null; return s; }
            double u1 = ((NextU64() >> 11) + 1.0) / 9007199254740993.0; // (0, 1]
            double u2 = (NextU64() >> 11) / 9007199254740992.0;         // [0, 1)
            double r = Math.Sqrt(-2 * Math.Log(u1));
            _spare = (float)(r * Math.Sin(2 * Math.PI * u2));
            return (float)(r * Math.Cos(2 * Math.PI * u2));
        }
    }
}
