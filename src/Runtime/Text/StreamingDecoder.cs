namespace FineTuneNative.Runtime.Text;

/// <summary>
/// Turns generated ids into text as they arrive (for printing tokens while generating). Decoding ids one at a
/// time is wrong in two ways: a byte-fallback or byte-level token may carry only part of a UTF-8 character, and
/// SentencePiece-style tokenizers drop the leading space of the first piece only. This decodes the whole
/// sequence so far and returns what is new, holding back a trailing U+FFFD until the character completes.
/// </summary>
public sealed class StreamingDecoder
{
    private readonly ITextTokenizer _tok;
    private readonly bool _skipSpecial;
    private readonly List<int> _ids = new();
    private int _emitted;   // chars of the decoded text already returned

    /// <param name="prefix">Ids already shown (e.g. the prompt): they set the context, their text is not returned.</param>
    public StreamingDecoder(ITextTokenizer tokenizer, bool skipSpecialTokens = true, ReadOnlySpan<int> prefix = default)
    {
        _tok = tokenizer;
        _skipSpecial = skipSpecialTokens;
        foreach (var id in prefix) _ids.Add(id);
        _emitted = Stable(Decode()).Length;
    }

    /// <summary>Adds one id; returns the text it completes (possibly empty).</summary>
    public string Push(int id)
    {
        _ids.Add(id);
        var text = Stable(Decode());
        if (text.Length <= _emitted) return "";
        var delta = text[_emitted..];
        _emitted = text.Length;
        return delta;
    }

    /// <summary>Whatever is still held back (an incomplete character decodes as U+FFFD here).</summary>
    public string Flush()
    {
        var text = Decode();
        var delta = text.Length > _emitted ? text[_emitted..] : "";
        _emitted = text.Length;
        return delta;
    }

    private string Decode() => _tok.Decode(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(_ids), _skipSpecial);

    // A byte sequence cut inside a character decodes to U+FFFD at the end: wait for the rest (at most 3 more bytes).
    private static string Stable(string s)
    {
        int n = s.Length;
        int held = 0;
        while (n > 0 && s[n - 1] == '\uFFFD' && held < 3) { n--; held++; }
        return s[..n];
    }
}
