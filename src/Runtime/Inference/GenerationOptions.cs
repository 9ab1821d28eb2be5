namespace FineTuneNative.Runtime.Inference;

/// <summary>How <see cref="Generator.Generate"/> picks and stops.</summary>
public sealed record GenerationOptions
{
    /// <summary>Most tokens to generate (the stop token is not counted).</summary>
    public int MaxNewTokens { get; init; } = 128;
    /// <summary>0 = greedy (argmax, lowest id on ties); otherwise logits are divided by it before the softmax.</summary>
    public float Temperature { get; init; }
    /// <summary>Keep only the K most likely tokens (0 = all).</summary>
    public int TopK { get; init; }
    /// <summary>Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches TopP (1 = all).</summary>
    public float TopP { get; init; } = 1f;
    /// <summary>Seed of the sampler's random stream; the same seed, prompt and options give the same tokens.</summary>
    public ulong Seed { get; init; }
    /// <summary>Extra tokens that end generation (not returned).</summary>
    public int[] StopTokenIds { get; init; } = Array.Empty<int>();
    /// <summary>When false (default) the model's end-of-sequence ids (config EosTokenIds) also stop generation.</summary>
    public bool IgnoreEos { get; init; }

    /// <summary>Throws on values that have no meaning.</summary>
    public void Validate()
    {
        if (MaxNewTokens < 0) throw new ArgumentOutOfRangeException(nameof(MaxNewTokens), $"MaxNewTokens must be >= 0 (got {MaxNewTokens})");
        if (!(Temperature >= 0) || float.IsInfinity(Temperature)) throw new ArgumentOutOfRangeException(nameof(Temperature), $"Temperature must be a finite number >= 0 (got {Temperature})");
        if (TopK < 0) throw new ArgumentOutOfRangeException(nameof(TopK), $"TopK must be >= 0 (got {TopK})");
        if (!(TopP > 0 && TopP <= 1)) throw new ArgumentOutOfRangeException(nameof(TopP), $"TopP must be in (0, 1] (got {TopP})");
    }
}
