using System.Text;
using Microsoft.ML.Tokenizers;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// A SentencePiece tokenizer.model (Llama 2, TinyLlama, Mistral v0.1, the llama2.c tok*.model files).
/// </summary>
/// <remarks>
/// Control pieces (&lt;s&gt;, &lt;/s&gt;, &lt;unk&gt;) and user-defined pieces are matched literally in the text,
/// as Hugging Face's LlamaTokenizer does. BPE models with the identity normalizer (every Llama-family one) are
/// encoded by our merge loop with SentencePiece's rules: optional whitespace collapsing, dummy prefix, U+2581 for
/// spaces, merge the adjacent pair whose concatenation is the NORMAL piece with the highest score (leftmost on
/// ties), byte fallback &lt;0xHH&gt; for characters not in the vocabulary. Microsoft.ML.Tokenizers 2.0.1's
/// LlamaTokenizer breaks score ties differently from SentencePiece ("!!!!!!" gives ▁! !!! !! instead of
/// ▁! !! !!!: 44/46 on llama.cpp's llama-spm vectors), so it is used only for what we do not implement:
/// unigram models and non-identity normalizers.
/// </remarks>
public sealed class SentencePieceTextTokenizer : TextTokenizerBase
{
    private readonly SentencePieceTokenizer? _sp;
    private readonly Dictionary<string, int> _normal = new(StringComparer.Ordinal);
    private readonly int[] _byteIds = Enumerable.Repeat(-1, 256).ToArray();
    private readonly SentencePieceModelFile _model;
    private readonly byte[][] _bytes;
    private readonly Dictionary<string, int> _ids = new(StringComparer.Ordinal);

    private SentencePieceTextTokenizer(string path, SentencePieceModelFile model, SentencePieceTokenizer? sp)
        : base("sentencepiece", path)
    {
        _model = model;
        _sp = sp;
        VocabSize = model.Pieces.Count;
        _bytes = new byte[model.Pieces.Count][];
        for (int i = 0; i < model.Pieces.Count; i++)
        {
            var p = model.Pieces[i];
            _ids.TryAdd(p.Text, i);
            if (p.Type == SentencePieceModelFile.PieceType.Normal) _normal.TryAdd(p.Text, i);
            if (p.Type == SentencePieceModelFile.PieceType.Byte && p.Text.Length == 6 && p.Text.StartsWith("<0x", StringComparison.Ordinal))
            {
                byte b = Convert.ToByte(p.Text.Substring(3, 2), 16);
                _bytes[i] = ByteTable.Single[b];
                _byteIds[b] = i;
            }
            else
                _bytes[i] = Encoding.UTF8.GetBytes(p.Text.Replace('\u2581', ' '));
            if (p.Type is SentencePieceModelFile.PieceType.Control or SentencePieceModelFile.PieceType.Unknown
                or SentencePieceModelFile.PieceType.UserDefined)
                AddSpecial(p.Text, i, special: p.Type != SentencePieceModelFile.PieceType.UserDefined);
        }
        StripLeadingSpace = model.AddDummyPrefix;
        SetBos(model.BosId >= 0 && model.BosId < VocabSize ? model.BosId : null);
        SetEos(model.EosId >= 0 && model.EosId < VocabSize ? model.EosId : null);
    }

    internal static SentencePieceTextTokenizer Load(string path, byte[] data)
    {
        var model = SentencePieceModelFile.Parse(data, path);
        if (UsesOwnEncoder(model)) return new SentencePieceTextTokenizer(path, model, null);
        SentencePieceTokenizer sp;
        try
        {
            using var ms = new MemoryStream(data, writable: false);
            sp = model.ModelType == 2
                ? LlamaTokenizer.Create(ms, addBeginOfSentence: false, addEndOfSentence: false)
                : SentencePieceTokenizer.Create(ms, addBeginningOfSentence: false, addEndOfSentence: false);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new InvalidDataException($"{path}: Microsoft.ML.Tokenizers could not load this SentencePiece model (model type {model.ModelType}): {e.Message}", e);
        }
        return new SentencePieceTextTokenizer(path, model, sp);
    }

    private static bool UsesOwnEncoder(SentencePieceModelFile m) => m.ModelType == 2 && m.NormalizerName == "identity";

    /// <summary>Whether encoding goes through Microsoft.ML.Tokenizers (unigram or non-identity normalizer) or our BPE loop.</summary>
    public bool UsesLibrary => _sp != null;

    /// <summary>normalizer_spec.remove_extra_whitespaces: leading/trailing spaces dropped and runs collapsed
    /// (the protobuf default is true; Llama 2 sets false, llama2.c's tok512.model leaves the default).</summary>
    public bool RemoveExtraWhitespaces => _model.RemoveExtraWhitespaces;

    /// <summary>1 unigram, 2 BPE (sentencepiece_model.proto).</summary>
    public int ModelType => _model.ModelType;
    public float Score(int id) => _model.Pieces[id].Score;

    protected override void EncodeOrdinary(string text, Segment position, List<int> output)
    {
        if (text.Length == 0) return;
        if (_sp == null) { EncodeBpe(text, _model.AddDummyPrefix && position != Segment.Continuation, output); return; }
        if (position == Segment.Continuation && _model.AddDummyPrefix)
            throw new NotSupportedException($"{Source}: EncodeContinuation is not available for SentencePiece unigram models or non-identity normalizers");
        output.AddRange(_sp.EncodeToIds(text, addBeginningOfSentence: false, addEndOfSentence: false,
            considerPreTokenization: true, considerNormalization: true));
    }

    private void EncodeBpe(string text, bool dummyPrefix, List<int> output)
    {
        if (_model.RemoveExtraWhitespaces)
        {
            text = System.Text.RegularExpressions.Regex.Replace(text.Trim(' '), " {2,}", " ");
            if (text.Length == 0) return;
        }
        if (_model.EscapeWhitespaces) text = text.Replace(' ', '\u2581');
        if (dummyPrefix) text = (_model.EscapeWhitespaces ? "\u2581" : " ") + text;
        int start = output.Count;
        for (int i = 0; i < text.Length;)
        {
            int len = char.IsHighSurrogate(text[i]) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]) ? 2 : 1;
            var ch = text.Substring(i, len);
            i += len;
            if (_normal.TryGetValue(ch, out int id)) { output.Add(id); continue; }
            var bytes = Encoding.UTF8.GetBytes(ch);
            if (_model.ByteFallback && bytes.All(b => _byteIds[b] >= 0)) { foreach (var b in bytes) output.Add(_byteIds[b]); continue; }
            output.Add(_model.UnkId);
        }
        BpeMerger.Merge(output, start, TryMerge);
    }

    private bool TryMerge(int left, int right, out float priority, out int merged)
    {
        priority = 0;
        merged = -1;
        var a = _model.Pieces[left];
        var b = _model.Pieces[right];
        if (a.Type != SentencePieceModelFile.PieceType.Normal || b.Type != SentencePieceModelFile.PieceType.Normal) return false;
        if (!_normal.TryGetValue(string.Concat(a.Text, b.Text), out merged)) return false;
        priority = -_model.Pieces[merged].Score;
        return true;
    }

    protected override ReadOnlySpan<byte> TokenBytes(int id) => _bytes[id];
    public override int? TokenToId(string token) => _ids.TryGetValue(token, out int id) ? id : null;
    public override string? IdToToken(int id) => (uint)id < (uint)_model.Pieces.Count ? _model.Pieces[id].Text : null;

    public override string Describe() =>
        base.Describe() + $", {(_model.ModelType == 2 ? "BPE" : _model.ModelType == 1 ? "unigram" : $"model type {_model.ModelType}")}"
        + (_model.ByteFallback ? " with byte fallback" : "") + (UsesLibrary ? " via Microsoft.ML.Tokenizers" : " via our SentencePiece BPE merge loop");
}
