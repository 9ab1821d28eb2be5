using System.Text;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// What every format shares: BOS/EOS bookkeeping, splitting literal special tokens out of the text before the
/// model sees it, and decoding ids through their raw bytes (so byte-fallback pieces and byte-level symbols
/// that split a UTF-8 character still decode to the right text).
/// </summary>
public abstract class TextTokenizerBase : ITextTokenizer
{
    private readonly Dictionary<int, string> _specialText = new();
    // Added tokens that are not "special" (HF added_tokens with special=false): matched and decoded alike, never skipped.
    private readonly HashSet<int> _unskippable = new();
    // Literal special tokens grouped by first char, longest first, for leftmost-longest matching.
    private readonly Dictionary<char, List<(string Text, int Id)>> _specialByFirstChar = new();
    private readonly List<int> _eosIds = new();

    protected TextTokenizerBase(string format, string source)
    {
        Format = format;
        Source = source;
    }

    /// <summary>"sentencepiece", "tiktoken", "hf-bpe-bytelevel", "hf-bpe-sentencepiece", "llama2c".</summary>
    public string Format { get; }
    /// <summary>The file this tokenizer was read from.</summary>
    public string Source { get; }
    /// <summary>Defects of the file that loading worked around (empty for a clean file).</summary>
    public List<string> Warnings { get; } = new();

    public int VocabSize { get; protected set; }
    public int? BosId { get; protected set; }
    public int? EosId { get; protected set; }
    public IReadOnlyList<int> EosIds => _eosIds;

    /// <summary>SentencePiece-style dummy prefix: Decode drops one leading space from the first text piece.</summary>
    protected bool StripLeadingSpace { get; set; }

    /// <summary>Registers a special token: decoded as its text, and matched literally in Encode when <paramref name="matchInText"/>.</summary>
    protected internal void AddSpecial(string text, int id, bool matchInText = true, bool special = true)
    {
        _specialText[id] = text;
        if (special) _unskippable.Remove(id); else _unskippable.Add(id);
        if (!matchInText || text.Length == 0) return;
        if (!_specialByFirstChar.TryGetValue(text[0], out var list)) _specialByFirstChar[text[0]] = list = new();
        list.RemoveAll(t => t.Text == text);
        list.Add((text, id));
        list.Sort((a, b) => b.Text.Length.CompareTo(a.Text.Length));
        if (id >= VocabSize) VocabSize = id + 1;
    }

    protected internal void SetEos(int? eosId, IEnumerable<int>? extraStopIds = null)
    {
        EosId = eosId;
        _eosIds.Clear();
        if (eosId is int e) _eosIds.Add(e);
        if (extraStopIds != null)
            foreach (var id in extraStopIds)
                if (!_eosIds.Contains(id)) _eosIds.Add(id);
    }

    protected internal void SetBos(int? bosId) => BosId = bosId;

    /// <summary>Where a run of ordinary text sits: it decides SentencePiece's dummy prefix ("▁" before the text).</summary>
    protected enum Segment
    {
        /// <summary>The text begins here: dummy prefix applies.</summary>
        TextStart,
        /// <summary>Right after a literal special token: HF's legacy Llama behaviour prefixes again ("always" schemes).</summary>
        AfterSpecial,
        /// <summary><see cref="EncodeContinuation"/>: the text continues earlier text, no prefix.</summary>
        Continuation,
    }

    /// <summary>Encodes text that contains no special tokens.</summary>
    protected abstract void EncodeOrdinary(string text, Segment position, List<int> output);

    /// <summary>The raw bytes a non-special token stands for (spaces as 0x20, byte-fallback as that byte).</summary>
    protected abstract ReadOnlySpan<byte> TokenBytes(int id);

    public abstract int? TokenToId(string token);
    public abstract string? IdToToken(int id);

    public bool IsSpecial(int id) => _specialText.ContainsKey(id) && !_unskippable.Contains(id);

    public int[] Encode(string text, bool addBos = false) => EncodeCore(text, addBos, continuation: false);

    public int[] EncodeContinuation(string text) => EncodeCore(text, addBos: false, continuation: true);

    private int[] EncodeCore(string text, bool addBos, bool continuation)
    {
        ArgumentNullException.ThrowIfNull(text);
        var ids = new List<int>(text.Length / 3 + 2);
        if (addBos)
        {
            if (BosId is not int bos) throw new InvalidOperationException($"{Source}: this tokenizer defines no BOS token");
            ids.Add(bos);
        }
        int segStart = 0;
        var position = continuation ? Segment.Continuation : Segment.TextStart;
        for (int i = 0; i < text.Length; i++)
        {
            if (!_specialByFirstChar.TryGetValue(text[i], out var cands)) continue;
            foreach (var (s, id) in cands)
            {
                if (string.CompareOrdinal(text, i, s, 0, s.Length) != 0) continue;
                if (i > segStart) { EncodeOrdinary(text.Substring(segStart, i - segStart), position, ids); }
                position = Segment.AfterSpecial;
                ids.Add(id);
                segStart = i + s.Length;
                i = segStart - 1;
                break;
            }
        }
        if (segStart < text.Length) EncodeOrdinary(segStart == 0 ? text : text.Substring(segStart), position, ids);
        return ids.ToArray();
    }

    public string Decode(ReadOnlySpan<int> ids) => Decode(ids, skipSpecialTokens: false);

    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens)
    {
        var sb = new StringBuilder();
        var bytes = new List<byte>();
        bool anyText = false;
        foreach (int id in ids)
        {
            if ((uint)id >= (uint)VocabSize)
                throw new ArgumentOutOfRangeException(nameof(ids), $"token id {id} is outside the vocabulary (size {VocabSize}) of {Source}");
            if (_specialText.TryGetValue(id, out var special))
            {
                Flush(sb, bytes);
                if (!skipSpecialTokens || _unskippable.Contains(id)) sb.Append(special);
                continue;
            }
            var b = TokenBytes(id);
            if (!anyText && StripLeadingSpace && b.Length > 0 && b[0] == (byte)' ') b = b[1..];
            anyText = true;
            foreach (var x in b) bytes.Add(x);
        }
        Flush(sb, bytes);
        return sb.ToString();
    }

    private static void Flush(StringBuilder sb, List<byte> bytes)
    {
        if (bytes.Count == 0) return;
        sb.Append(Encoding.UTF8.GetString(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(bytes)));
        bytes.Clear();
    }

    public virtual string Describe()
    {
        string Tok(int? id) => id is int i ? $"{Escape(_specialText.GetValueOrDefault(i) ?? IdToToken(i) ?? "?")}={i}" : "none";
        var s = $"{Format} tokenizer ({Path.GetFileName(Source)}): vocab {VocabSize}, BOS {Tok(BosId)}, EOS {Tok(EosId)}";
        if (EosIds.Count > 1) s += $", stop ids [{string.Join(",", EosIds)}]";
        if (Warnings.Count > 0) s += $"; {Warnings.Count} file defect(s) worked around: " + string.Join("; ", Warnings);
        return s;
    }

    public override string ToString() => Describe();

    private static string Escape(string s) =>
        string.Concat(s.Select(c => c switch { '\n' => "\\n", '\t' => "\\t", '\r' => "\\r", _ when char.IsControl(c) => $"\\x{(int)c:X2}", _ => c.ToString() }));
}
