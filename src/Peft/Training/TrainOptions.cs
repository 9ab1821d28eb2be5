namespace FineTuneNative.Peft.Training;

/// <summary>Everything that shapes a training run (the LoRA shape is <see cref="Lora.LoraConfig"/>).</summary>
public sealed class TrainOptions
{
    /// <summary>Passes over the training split (used when <see cref="MaxSteps"/> is 0).</summary>
    public int Epochs { get; init; } = 1;
    /// <summary>Optimizer steps to take; 0 = as many as <see cref="Epochs"/> give. Wraps into new epochs when larger.</summary>
    public int MaxSteps { get; init; }
    /// <summary>Sequences per forward/backward (B).</summary>
    public int MicroBatch { get; init; } = 4;
    /// <summary>Micro-batches per optimizer step.</summary>
    public int GradAccum { get; init; } = 1;
    public double LearningRate { get; init; } = 2e-4;
    /// <summary>Linear warmup steps; when 0, <see cref="WarmupRatio"/> of the steps (rounded) is used.</summary>
    public int WarmupSteps { get; init; }
    public double WarmupRatio { get; init; }
    /// <summary>The cosine decay ends at LearningRate·MinLrRatio.</summary>
    public double MinLrRatio { get; init; }
    public double WeightDecay { get; init; }
    /// <summary>Clip the global gradient norm to this (0 = no clipping).</summary>
    public double ClipNorm { get; init; } = 1.0;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double AdamEps { get; init; } = 1e-8;
    /// <summary>Longest sequence T in tokens (samples are truncated to it).</summary>
    public int MaxLength { get; init; } = 512;
    public ulong Seed { get; init; } = 42;
    /// <summary>Share of the samples held out for evaluation.</summary>
    public double EvalFraction { get; init; } = 0.1;
    /// <summary>Evaluate every N steps (0 = only before and after training).</summary>
    public int EvalEvery { get; init; }
    /// <summary>Cap on the held-out samples actually evaluated (0 = all).</summary>
    public int MaxEvalSamples { get; init; }
    public bool TrainOnPrompt { get; init; }
    /// <summary>Write a resumable checkpoint to OutputDir/checkpoint-{step} every N steps (0 = only the final adapter).</summary>
    public int SaveEvery { get; init; }
    /// <summary>Keep at most this many checkpoint-{step} directories, deleting the oldest (0 = keep all).</summary>
    public int SaveTotalLimit { get; init; }
    /// <summary>Learning-rate schedule after warmup: "cosine" (to LearningRate·MinLrRatio), "linear" (to the same floor) or "constant".</summary>
    public string LrScheduler { get; init; } = "cosine";
    /// <summary>"adamw" (decoupled weight decay, f32 m and v) or "sgd" (heavy-ball momentum <see cref="Momentum"/>, decoupled weight decay).</summary>
    public string Optimizer { get; init; } = "adamw";
    /// <summary>SGD momentum (0 = plain SGD).</summary>
    public double Momentum { get; init; } = 0.9;
    /// <summary>Stop when the eval loss has not improved by more than <see cref="EarlyStoppingMinDelta"/> for this many evaluations (0 = never).</summary>
    public int EarlyStoppingPatience { get; init; }
    public double EarlyStoppingMinDelta { get; init; }
    /// <summary>Save the method at its best evaluation to OutputDir/best and end the run with those values (the final eval and save are of the best).</summary>
    public bool KeepBest { get; init; }
    /// <summary>A step whose loss or gradient is NaN/Inf is skipped; this many skipped in a row stop the run (the last checkpoint stays intact).</summary>
    public int MaxSkippedSteps { get; init; } = 5;
    /// <summary>Recompute each layer's forward in the backward instead of keeping every layer's activations (<see cref="Runtime.Model.LlamaModel.ActivationCheckpointing"/>).</summary>
    public bool ActivationCheckpointing { get; init; }
    /// <summary>Backend name for <see cref="Kernels.Backends.Create"/> ("cpu", "cpu:N", "cuda", ...), used by <see cref="FineTuneJob"/>.</summary>
    public string Device { get; init; } = "cpu";

    public void Validate()
    {
        void Req(bool ok, string msg) { if (!ok) throw new ArgumentException(msg); }
        Req(Epochs >= 1 || MaxSteps >= 1, $"epochs must be >= 1 (got {Epochs}) unless max steps is set");
        Req(MaxSteps >= 0, $"max steps must be >= 0 (got {MaxSteps})");
        Req(MicroBatch >= 1, $"micro-batch must be >= 1 (got {MicroBatch})");
        Req(GradAccum >= 1, $"gradient accumulation must be >= 1 (got {GradAccum})");
        Req(LearningRate > 0 && double.IsFinite(LearningRate), $"learning rate must be > 0 (got {LearningRate})");
        Req(WarmupSteps >= 0, $"warmup steps must be >= 0 (got {WarmupSteps})");
        Req(WarmupRatio >= 0 && WarmupRatio < 1, $"warmup ratio must be in [0, 1) (got {WarmupRatio})");
        Req(MinLrRatio >= 0 && MinLrRatio <= 1, $"min lr ratio must be in [0, 1] (got {MinLrRatio})");
        Req(WeightDecay >= 0, $"weight decay must be >= 0 (got {WeightDecay})");
        Req(ClipNorm >= 0, $"clip norm must be >= 0 (got {ClipNorm})");
        Req(Beta1 >= 0 && Beta1 < 1 && Beta2 >= 0 && Beta2 < 1, $"Adam betas must be in [0, 1) (got {Beta1}, {Beta2})");
        Req(AdamEps > 0, $"Adam eps must be > 0 (got {AdamEps})");
        Req(MaxLength >= 2, $"max length must be >= 2 (got {MaxLength})");
        Req(EvalFraction >= 0 && EvalFraction < 1, $"eval fraction must be in [0, 1) (got {EvalFraction})");
        Req(EvalEvery >= 0, $"eval every must be >= 0 (got {EvalEvery})");
        Req(SaveEvery >= 0, $"save every must be >= 0 (got {SaveEvery})");
        Req(MaxEvalSamples >= 0, $"max eval samples must be >= 0 (got {MaxEvalSamples})");
        Req(SaveTotalLimit >= 0, $"save total limit must be >= 0 (got {SaveTotalLimit})");
        Req(LrScheduler is "cosine" or "linear" or "constant", $"lr scheduler must be cosine, linear or constant (got '{LrScheduler}')");
        Req(Optimizer is "adamw" or "sgd", $"optimizer must be adamw or sgd (got '{Optimizer}')");
        Req(Momentum >= 0 && Momentum < 1, $"momentum must be in [0, 1) (got {Momentum})");
        Req(EarlyStoppingPatience >= 0, $"early stopping patience must be >= 0 (got {EarlyStoppingPatience})");
        Req(EarlyStoppingMinDelta >= 0, $"early stopping min delta must be >= 0 (got {EarlyStoppingMinDelta})");
        Req(EarlyStoppingPatience == 0 || EvalEvery > 0, "early stopping needs eval every N steps (> 0)");
        Req(!KeepBest || EvalEvery > 0, "keep best needs eval every N steps (> 0)");
        Req(MaxSkippedSteps >= 1, $"max skipped steps must be >= 1 (got {MaxSkippedSteps})");
    }
}
