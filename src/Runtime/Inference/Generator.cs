namespace FineTuneNative.Runtime.Inference;

/// <summary>Autoregressive generation on an <see cref="InferenceSession"/>.</summary>
public static class Generator
{
    /// <summary>
    /// Prefills <paramref name="prompt"/> (appended at the session's current position) and generates until a
    /// stop token (options.StopTokenIds, and the model's EOS ids unless IgnoreEos; not returned),
    /// MaxNewTokens, or a full sequence (the tokens in the session plus the new ones never exceed its
    /// maxSeqLen). <paramref name="onToken"/> sees each new token as it is made.
    /// </summary>
    public static int[] Generate(InferenceSession s, int[] prompt, GenerationOptions o, Action<int>? onToken = null)
    {
        ArgumentNullException.ThrowIfNull(s);
        ArgumentNullException.ThrowIfNull(prompt);
        ArgumentNullException.ThrowIfNull(o);
        var sampler = new Sampler(s.VocabSize, o);
        var stops = new HashSet<int>(o.StopTokenIds ?? Array.Empty<int>());
        if (!o.IgnoreEos) foreach (int e in s.Config.EosTokenIds) stops.Add(e);
        var output = new List<int>(Math.Min(o.MaxNewTokens, s.MaxSeqLen));
        if (o.MaxNewTokens == 0) return Array.Empty<int>();
        float[] logits = s.Prefill(prompt);
        // Position counts the tokens already in the cache; a sampled token takes position Position.
        while (s.Position < s.MaxSeqLen)
        {
            int next = sampler.Sample(logits);
            if (stops.Contains(next)) break;
            output.Add(next);
            onToken?.Invoke(next);
            if (output.Count >= o.MaxNewTokens || s.Position + 1 >= s.MaxSeqLen) break;
            logits = s.Decode(next);
        }
        return output.ToArray();
    }
}
