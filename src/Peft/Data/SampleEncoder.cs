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
    /// <summary>The model's chat template; null = the built-in <see cref="PromptTemplate"/> formats.</summary>
    public ChatTemplate? Template { get; init; }
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
            if (s.EosAfter && Eos is int eos) { ids.Add(eos); trained.Add(s.Trained || _opt.TrainOnPrompt); }
        }
        return (ids, trained);
    }

    /// <summary>Samples longer than MaxLength + 1 ids cut so far (text records split into windows do not count).</summary>
    public int Truncated { get; private set; }

    /// <summary>
    /// Ids and trained flags of templated text: the whole text is tokenized at once (as the model will see it at
    /// inference, specials included, no BOS added: the template writes it), and each segment boundary is placed
    /// where the tokens of the text up to it stop matching the whole text's tokens.
    /// </summary>
    public (List<int> Ids, List<bool> Trained) EncodeTemplated(IReadOnlyList<PromptSegment> segments)
    {
        string full = string.Concat(segments.Select(x => x.Text));
        var ids = _tok.Encode(full);
        var trained = new List<bool>(ids.Length);
        int chars = 0, start = 0;
        for (int k = 0; k < segments.Count; k++)
        {
            chars += segments[k].Text.Length;
            int end = ids.Length;
            if (k < segments.Count - 1)
            {
                var prefix = _tok.Encode(full[..chars]);
                end = 0;
                while (end < prefix.Length && end < ids.Length && prefix[end] == ids[end]) end++;
                end = Math.Max(end, start);
            }
            for (int i = start; i < end; i++) trained.Add(segments[k].Trained || _opt.TrainOnPrompt);
            start = end;
        }
        return (ids.ToList(), trained);
    }

    /// <summary>Ids and trained flags of a record: its chat template (chat and alpaca records) or the built-in format.</summary>
    public (List<int> Ids, List<bool> Trained) EncodeRecord(DatasetRecord record)
    {
        if (record.Format == RecordFormat.Text)
        {
            var ids = new List<int>();
            if (_tok.BosId is int bos) ids.Add(bos);
            ids.AddRange(_tok.Encode(record.Text));
            if (Eos is int eos) ids.Add(eos);
            return (ids, Enumerable.Repeat(true, ids.Count).ToList());
        }
        if (_opt.Template is { } t) return EncodeTemplated(t.RenderTraining(record.AsMessages()));
        return EncodeSegments(PromptTemplate.Render(record));
    }

    /// <summary>Prompt ids for generation: the record's conversation (its assistant turn left out when it is the
    /// last and empty) with the chat template's generation prompt, or the built-in format's prompt.</summary>
    public int[] EncodePrompt(IReadOnlyList<ChatMessage> messages)
    {
        if (_opt.Template is { } t) return _tok.Encode(t.Render(messages, addGenerationPrompt: true));
        return EncodeChatPrompt(messages);
    }

    /// <summary>Encodes one record; null (with <paramref name="issue"/> set) when no target survives.</summary>
    public TokenizedSample? Encode(DatasetRecord record, out DatasetIssue? issue)
    {
        issue = null;
        List<int> ids;
        List<bool> trained;
        try { (ids, trained) = EncodeRecord(record); }
        catch (TemplateException e)
        {
            issue = new DatasetIssue(record.Location, $"chat template: {e.Message}; dropped");
            return null;
        }
        if (ids.Count > _opt.MaxLength + 1) Truncated++;
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

    /// <summary>
    /// A raw-text record cut into windows of MaxLength + 1 ids overlapping by one (every id is a target exactly
    /// once), rather than truncated: continued pretraining keeps the whole text.
    /// </summary>
    public List<TokenizedSample> EncodeTextWindows(DatasetRecord record)
    {
        var (ids, _) = EncodeRecord(record);
        var list = new List<TokenizedSample>();
        int w = _opt.MaxLength;
        for (int s = 0, part = 0; s + 1 < ids.Count; s += w, part++)
        {
            int n = Math.Min(w, ids.Count - 1 - s);
            var tokens = ids.GetRange(s, n).ToArray();
            var targets = ids.GetRange(s + 1, n).ToArray();
            list.Add(new TokenizedSample(part == 0 ? record.Location : $"{record.Location} (part {part})", tokens, targets));
        }
        return list;
    }

    /// <summary>Encodes every record, collecting the dropped ones as issues. Raw-text records become windows.</summary>
    public List<TokenizedSample> EncodeAll(IEnumerable<DatasetRecord> records, List<DatasetIssue> issues)
    {
        var list = new List<TokenizedSample>();
        foreach (var r in records)
        {
            if (r.Format == RecordFormat.Text)
            {
                var parts = EncodeTextWindows(r);
                if (parts.Count == 0) issues.Add(new DatasetIssue(r.Location, "the text encodes to fewer than 2 tokens; dropped"));
                list.AddRange(parts);
                continue;
            }
            var s = Encode(r, out var issue);
            if (s is not null) list.Add(s);
            else if (issue is not null) issues.Add(issue);
        }
        return list;
    }

    /// <summary>
    /// Pre-flight check that the model will learn to stop: some sample must have an end-of-sequence id the model
    /// emits (<see cref="ITextTokenizer.EosIds"/>, from tokenizer_config and generation_config) among its targets.
    /// Throws <see cref="InvalidDataException"/> when none does (e.g. a chat template whose end-of-turn token is
    /// not an EOS of the model). Returns a one-line summary otherwise.
    /// </summary>
    public static string CheckEosInTargets(IReadOnlyList<TokenizedSample> samples, ITextTokenizer tokenizer)
    {
        var eos = new HashSet<int>(tokenizer.EosIds);
        if (tokenizer.EosId is int e) eos.Add(e);
        if (eos.Count == 0) throw new InvalidDataException("the tokenizer has no end-of-sequence token: generation would never stop");
        int with = samples.Count(s => s.Targets.Any(eos.Contains));
        string names = string.Join(", ", eos.Select(i => $"{i} '{tokenizer.IdToToken(i)}'"));
        if (samples.Count > 0 && with == 0)
            throw new InvalidDataException($"no training sample has an end-of-sequence token ({names}) among its targets: the model would never learn to stop. " +
                "Check that the chat template ends assistant turns with the model's EOS (or its generation_config eos_token_id), and that --max-length does not cut it off");
        return $"EOS ({names}) is a target in {with} of {samples.Count} samples";
    }

    /// <summary>Prompt ids for generation with the alpaca template (BOS + prompt up to "### Response:\n").</summary>
    public int[] EncodeAlpacaPrompt(string instruction, string input = "", string system = "") =>
        EncodeSegments(new[] { new PromptSegment(PromptTemplate.AlpacaPrompt(instruction, input, system), false) }).Ids.ToArray();

    /// <summary>Prompt ids for generation with the chat template (ends with the assistant header).</summary>
    public int[] EncodeChatPrompt(IReadOnlyList<ChatMessage> messages) =>
        EncodeSegments(PromptTemplate.RenderChatPrompt(messages)).Ids.ToArray();
}
