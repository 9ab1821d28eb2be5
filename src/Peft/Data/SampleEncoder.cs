using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Peft.Data;

/// <summary>
/// One training sequence: <see cref="Tokens"/> (T) are the model inputs and <see cref="Targets"/> (T) the
/// next-token ids they are trained to predict, <see cref="IgnoreIndex"/> where no loss is taken.
/// </summary>
public sealed record TokenizedSample(string Location, int[] Tokens, int[] Targets)
{
    public const int IgnoreIndex = -100;
    /// <summary>Per-token positions of a packed sample (restarting at 0 for each packed sample, see <see cref="Packing"/>); null = 0..Length-1.</summary>
    public int[]? Positions { get; init; }
    public int Length => Tokens.Length;
    public int TargetCount => Targets.Count(t => t != IgnoreIndex);
}

public sealed class EncodeOptions
{
    /// <summary>Longest input sequence T; longer samples are cut at the end.</summary>
    public int MaxLength { get; init; } = 512;
    /// <summary>Also train on the prompt tokens (default: loss on response tokens and their EOS only).</summary>
    public bool TrainOnPrompt { get; init; }
}

/// <summary>
/// Renders records with <see cref="PromptTemplate"/> and tokenizes them: BOS, each segment encoded on its own
/// (so the prompt/response boundary is exact), EOS after every response. With the full id sequence s (n ids),
/// Tokens = s[0..n-1) and Targets[i] = s[i+1] when s[i+1] is response text (or any text with TrainOnPrompt),
/// else -100. The sequence is truncated to MaxLength + 1 ids first, so Tokens has at most MaxLength entries.
/// </summary>
public sealed class SampleEncoder
{
    private readonly ITextTokenizer _tok;
    private readonly EncodeOptions _opt;

    public SampleEncoder(ITextTokenizer tokenizer, EncodeOptions options)
    {
        if (options.MaxLength < 1) throw new ArgumentException($"max length must be >= 1 (got {options.MaxLength})");
        _tok = tokenizer;
        _opt = options;
    }

    /// <summary>The id closing a response: EosId, else the first of EosIds, else none.</summary>
    public int? Eos => _tok.EosId ?? (_tok.EosIds.Count > 0 ? _tok.EosIds[0] : null);

    /// <summary>The id used to pad batches (its targets are always -100, so any valid id works).</summary>
    public int PadId => Eos ?? 0;

    /// <summary>Full id sequence and its per-id "trained" flags (before the shift and truncation).</summary>
    public (List<int> Ids, List<bool> Trained) EncodeSegments(IReadOnlyList<PromptSegment> segments)
    {
        var ids = new List<int>();
        var trained = new List<bool>();
        if (_tok.BosId is int bos) { ids.Add(bos); trained.Add(false); }
        foreach (var s in segments)
        {
            if (s.Text.Length > 0)
                foreach (int id in _tok.Encode(s.Text)) { ids.Add(id); trained.Add(s.Trained || _opt.TrainOnPrompt); }
            if (s.EosAfter && Eos is int eos) { ids.Add(eos); trained.Add(true); }
        }
        return (ids, trained);
    }

    /// <summary>Encodes one record; null (with <paramref name="issue"/> set) when no target survives.</summary>
    public TokenizedSample? Encode(DatasetRecord record, out DatasetIssue? issue)
    {
        issue = null;
        var (ids, trained) = EncodeSegments(PromptTemplate.Render(record));
        int n = Math.Min(ids.Count, _opt.MaxLength + 1);
        if (n < 2)
        {
            issue = new DatasetIssue(record.Location, "the sample encodes to fewer than 2 tokens; dropped");
            return null;
        }
        var tokens = new int[n - 1];
        var targets = new int[n - 1];
        int count = 0;
        for (int i = 0; i < n - 1; i++)
        {
            tokens[i] = ids[i];
            targets[i] = trained[i + 1] ? ids[i + 1] : TokenizedSample.IgnoreIndex;
            if (trained[i + 1]) count++;
        }
        if (count == 0)
        {
            int firstTrained = trained.IndexOf(true);
            issue = new DatasetIssue(record.Location, firstTrained > 0
                ? $"every target is masked after truncation to {_opt.MaxLength} tokens (the response starts at token {firstTrained}); dropped"
                : "every target is masked (nothing to train on); dropped");
            return null;
        }
        return new TokenizedSample(record.Location, tokens, targets);
    }

    /// <summary>Encodes every record, collecting the dropped ones as issues.</summary>
    public List<TokenizedSample> EncodeAll(IEnumerable<DatasetRecord> records, List<DatasetIssue> issues)
    {
        var list = new List<TokenizedSample>();
        foreach (var r in records)
        {
            var s = Encode(r, out var issue);
            if (s is not null) list.Add(s);
            else if (issue is not null) issues.Add(issue);
        }
        return list;
    }

    /// <summary>Prompt ids for generation with the alpaca template (BOS + prompt up to "### Response:\n").</summary>
    public int[] EncodeAlpacaPrompt(string instruction, string input = "", string system = "") =>
        EncodeSegments(new[] { new PromptSegment(PromptTemplate.AlpacaPrompt(instruction, input, system), false) }).Ids.ToArray();

    /// <summary>Prompt ids for generation with the chat template (ends with the assistant header).</summary>
    public int[] EncodeChatPrompt(IReadOnlyList<ChatMessage> messages) =>
        EncodeSegments(PromptTemplate.RenderChatPrompt(messages)).Ids.ToArray();
}
