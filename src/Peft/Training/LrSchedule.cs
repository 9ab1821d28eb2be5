namespace FineTuneNative.Peft.Training;

/// <summary>Linear warmup, then cosine or linear decay to a floor, or a constant rate.</summary>
public static class LrSchedule
{
    /// <summary>
    /// The learning rate of optimizer step <paramref name="step"/> (1-based, 1..<paramref name="totalSteps"/>):
    /// peak·step/warmup during the warmup steps; after it, with d = totalSteps − warmup and
    /// progress = (step − warmup − 1)/d ∈ [0, 1), min + (peak − min)·(1 + cos(π·progress))/2 where
    /// min = peak·<paramref name="minRatio"/>. So the first step after warmup uses the peak and no step uses
    /// a rate of exactly 0 (Hugging Face's cosine schedule is the same curve read one step earlier, which spends
    /// its first warmup step at 0).
    /// </summary>
    public static double At(int step, int totalSteps, int warmupSteps, double peak, double minRatio = 0) =>
        At("cosine", step, totalSteps, warmupSteps, peak, minRatio);

    /// <summary>
    /// The rate of step <paramref name="step"/> under schedule <paramref name="kind"/>: the same linear warmup, then
    /// "cosine" (above), "linear": min + (peak − min)·(1 − progress), or "constant": peak.
    /// </summary>
    public static double At(string kind, int step, int totalSteps, int warmupSteps, double peak, double minRatio = 0)
    {
        if (step < 1 || step > totalSteps) throw new ArgumentOutOfRangeException(nameof(step), $"step {step} outside 1..{totalSteps}");
        if (warmupSteps < 0 || warmupSteps > totalSteps) throw new ArgumentOutOfRangeException(nameof(warmupSteps), $"warmup {warmupSteps} outside 0..{totalSteps}");
        if (step <= warmupSteps) return peak * step / warmupSteps;
        int decay = totalSteps - warmupSteps;
        double progress = (double)(step - warmupSteps - 1) / decay;
        double min = peak * minRatio;
        return kind switch
        {
            "cosine" => min + (peak - min) * 0.5 * (1 + Math.Cos(Math.PI * progress)),
            "linear" => min + (peak - min) * (1 - progress),
            "constant" => peak,
            _ => throw new ArgumentException($"unknown lr schedule '{kind}' (expected cosine, linear or constant)"),
        };
    }
}
