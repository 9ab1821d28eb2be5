namespace FineTuneNative.Peft.Data;

/// <summary>
/// A padded micro-batch: Tokens and Targets are (B, T) row-major. Rows shorter than T, and whole rows past
/// the last sample, hold the pad id with target -100, so they add nothing to the loss or the gradients.
/// </summary>
/// <remarks>RowLengths (B) counts each row's real (unpadded) tokens (NEFTune scales its noise by it).
/// Positions (B, T) is set when a row holds packed samples: each sample's positions restart at 0, and the
/// model keeps attention inside each (see LlamaModel.ForwardBackward); the padding after them is a segment of its own.</remarks>
public sealed record Batch(int[] Tokens, int[] Targets, int BatchSize, int SeqLen, int Samples, int TargetCount, int TokenCount, int[]? Positions = null,
    int[]? RowLengths = null);

/// <summary>Deterministic shuffles, the train/eval split and padding into fixed-shape batches.</summary>
public static class Batching
{
    /// <summary>Splits <paramref name="items"/> into train and eval with a seeded shuffle. The eval count is
    /// round(n·fraction), at least 1 when fraction &gt; 0 and n ≥ 2, and leaves at least one training item.
    /// Both lists keep the order of the shuffle.</summary>
    public static (List<T> Train, List<T> Eval) Split<T>(IReadOnlyList<T> items, double evalFraction, ulong seed)
    {
        if (evalFraction < 0 || evalFraction >= 1) throw new ArgumentOutOfRangeException(nameof(evalFraction), $"eval fraction must be in [0, 1) (got {evalFraction})");
        var order = Permutation(items.Count, seed);
        int nEval = (int)Math.Round(items.Count * evalFraction, MidpointRounding.AwayFromZero);
        if (evalFraction > 0 && items.Count >= 2) nEval = Math.Clamp(nEval, 1, items.Count - 1);
        var eval = order.Take(nEval).Select(i => items[i]).ToList();
        var train = order.Skip(nEval).Select(i => items[i]).ToList();
        return (train, eval);
    }

    /// <summary>A permutation of 0..n-1 (Fisher–Yates driven by splitmix64; identical on every platform).</summary>
    public static int[] Permutation(int n, ulong seed)
    {
        var p = new int[n];
        for (int i = 0; i < n; i++) p[i] = i;
        ulong state = seed;
        for (int i = n - 1; i > 0; i--)
        {
            int j = (int)(SplitMix64(ref state) % (ulong)(i + 1));
            (p[i], p[j]) = (p[j], p[i]);
        }
        return p;
    }

    public static ulong SplitMix64(ref ulong state)
    {
        ulong z = state += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>Pads <paramref name="samples"/> (at most <paramref name="batchSize"/>) into a (B, T) batch.</summary>
    public static Batch Pad(IReadOnlyList<TokenizedSample> samples, int batchSize, int seqLen, int padId)
    {
        if (samples.Count > batchSize) throw new ArgumentException($"{samples.Count} samples do not fit a batch of {batchSize}");
        var tokens = new int[batchSize * seqLen];
        var targets = new int[batchSize * seqLen];
        Array.Fill(tokens, padId);
        Array.Fill(targets, TokenizedSample.IgnoreIndex);
        int tcount = 0, ntok = 0;
        bool packed = samples.Any(s => s.Positions is not null);
        int[]? positions = packed ? new int[batchSize * seqLen] : null;
        var rowLengths = new int[batchSize];
        for (int b = 0; b < batchSize; b++)
        {
            int len = 0;
            if (b < samples.Count)
            {
                var s = samples[b];
                if (s.Length > seqLen) throw new ArgumentException($"{s.Location}: sample of {s.Length} tokens exceeds the batch length {seqLen}");
                s.Tokens.CopyTo(tokens, b * seqLen);
                s.Targets.CopyTo(targets, b * seqLen);
                tcount += s.TargetCount;
                ntok += s.Length;
                len = s.Length;
                rowLengths[b] = len;
                if (positions is not null)
                {
                    if (s.Positions is { } p) p.CopyTo(positions, b * seqLen);
                    else for (int t = 0; t < len; t++) positions[b * seqLen + t] = t;
                }
            }
            if (positions is not null) for (int t = len; t < seqLen; t++) positions[b * seqLen + t] = t - len;
        }
        return new Batch(tokens, targets, batchSize, seqLen, samples.Count, tcount, ntok, positions, rowLengths);
    }

    /// <summary>Consecutive batches over <paramref name="samples"/> in the given order; the last one padded with empty rows.</summary>
    public static IEnumerable<Batch> Batches(IReadOnlyList<TokenizedSample> samples, int batchSize, int seqLen, int padId, int[]? order = null)
    {
        for (int start = 0; start < samples.Count; start += batchSize)
        {
            int n = Math.Min(batchSize, samples.Count - start);
            var chunk = new TokenizedSample[n];
            for (int i = 0; i < n; i++) chunk[i] = samples[order is null ? start + i : order[start + i]];
            yield return Pad(chunk, batchSize, seqLen, padId);
        }
    }
}
