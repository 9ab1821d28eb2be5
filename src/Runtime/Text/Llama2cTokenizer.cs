using System.Text;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// llama2.c's tokenizer.bin (the tinyllamas tokenizers): uint32 max_token_length, then per token float32 score,
/// int32 byte length, UTF-8 bytes. The vocabulary size is not stored: records run to the end of the file.
/// </summary>
/// <remarks>
/// Encoding is llama2.c run.c's: a dummy prefix " " when the text is non-empty, every code point to its piece
/// (or its UTF-8 bytes to the byte-fallback ids 3..258, "&lt;0xHH&gt;"), then repeatedly merge the adjacent pair
/// whose concatenation is a piece with the highest score, leftmost first. Microsoft.ML.Tokenizers has no reader
/// for this format, hence this small encoder. Pieces use ' ' where SentencePiece uses U+2581; ids 1 and 2 are
/// "\n&lt;s&gt;\n" and "\n&lt;/s&gt;\n". run.c stops generation when the model emits BOS, so BOS is in EosIds.
/// </remarks>
public sealed class Llama2cTokenizer : TextTokenizerBase
{
    private readonly byte[][] _pieces;
    private readonly float[] _scores;
    private readonly Dictionary<string, int> _ids = new(StringComparer.Ordinal);
    private readonly int[] _byteIds = new int[256];

    public int MaxTokenLength { get; }

    private Llama2cTokenizer(string path, int maxLen, byte[][] pieces, float[] scores) : base("llama2c", path)
    {
        MaxTokenLength = maxLen;
        _pieces = pieces;
        _scores = scores;
        VocabSize = pieces.Length;
        for (int i = 0; i < pieces.Length; i++) _ids.TryAdd(Encoding.UTF8.GetString(pieces[i]), i);
        for (int b = 0; b < 256; b++) _byteIds[b] = _ids.TryGetValue($"<0x{b:X2}>", out int id) ? id : -1;
        StripLeadingSpace = true;
        if (pieces.Length > 2)
        {
            AddSpecial("<unk>", 0, matchInText: false);
            AddSpecial("<s>", 1, matchInText: false);
            AddSpecial("</s>", 2, matchInText: false);
            SetBos(1);
            SetEos(2, new[] { 1 });
        }
    }

    public static Llama2cTokenizer Load(string path)
    {
        byte[] data;
        try { data = File.ReadAllBytes(path); }
        catch (IOException e) { throw new InvalidDataException($"{path}: cannot read llama2.c tokenizer: {e.Message}", e); }
        if (data.Length < 4) throw new InvalidDataException($"{path}: too short for a llama2.c tokenizer.bin (need a uint32 max_token_length)");
        int maxLen = (int)BitConverter.ToUInt32(data, 0);
        if (maxLen <= 0 || maxLen > 1 << 16)
            throw new InvalidDataException($"{path}: max_token_length {maxLen} is implausible; not a llama2.c tokenizer.bin");
        var pieces = new List<byte[]>();
        var scores = new List<float>();
        int pos = 4;
        while (pos < data.Length)
        {
            if (pos + 8 > data.Length)
                throw new InvalidDataException($"{path}: truncated record header for token {pieces.Count} at byte {pos}");
            float score = BitConverter.ToSingle(data, pos);
            int len = BitConverter.ToInt32(data, pos + 4);
            if (len < 0 || len > maxLen || pos + 8 + len > data.Length)
                throw new InvalidDataException($"{path}: token {pieces.Count} at byte {pos} has length {len} (max_token_length {maxLen}, {data.Length - pos - 8} bytes left)");
            if (float.IsNaN(score)) throw new InvalidDataException($"{path}: token {pieces.Count} has a NaN score");
            pieces.Add(data.AsSpan(pos + 8, len).ToArray());
            scores.Add(score);
            pos += 8 + len;
        }
        if (pieces.Count < 259)
            throw new InvalidDataException($"{path}: only {pieces.Count} tokens; a llama2.c tokenizer has <unk>, <s>, </s> and 256 byte pieces at least");
        return new Llama2cTokenizer(path, maxLen, pieces.ToArray(), scores.ToArray());
    }

    protected override void EncodeOrdinary(string text, Segment position, List<int> output)
    {
        if (text.Length == 0) return;
        int start = output.Count;
        // Dummy prefix (SentencePiece add_dummy_prefix): run.c prepends the " " piece to non-empty text.
        if (position != Segment.Continuation && _ids.TryGetValue(" ", out int space)) output.Add(space);
        for (int i = 0; i < text.Length;)
        {
            int len = char.IsHighSurrogate(text[i]) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]) ? 2 : 1;
            var cp = text.Substring(i, len);
            if (_ids.TryGetValue(cp, out int id)) output.Add(id);
            else
            {
                foreach (var b in Encoding.UTF8.GetBytes(cp))
                {
                    int bid = _byteIds[b];
                    output.Add(bid >= 0 ? bid : 0);
                }
            }
            i += len;
        }
        BpeMerger.Merge(output, start, TryMerge);
    }

    private bool TryMerge(int left, int right, out float priority, out int merged)
    {
        var a = _pieces[left];
        var b = _pieces[right];
        priority = 0; merged = -1;
        if (a.Length + b.Length > MaxTokenLength) return false;
        Span<byte> buf = stackalloc byte[a.Length + b.Length];
        a.CopyTo(buf);
        b.CopyTo(buf[a.Length..]);
        if (!_ids.TryGetValue(Encoding.UTF8.GetString(buf), out merged)) return false;
        priority = -_scores[merged];
        return true;
    }

    protected override ReadOnlySpan<byte> TokenBytes(int id)
    {
        var p = _pieces[id];
        // "<0xHH>" pieces are raw bytes (run.c decode).
        if (p.Length == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>' && id >= 3 && id < 259)
            return ByteTable.Single[Convert.ToByte(Encoding.ASCII.GetString(p, 3, 2), 16)];
        return p;
    }

    public override int? TokenToId(string token) => _ids.TryGetValue(token, out int id) ? id : null;
    public override string? IdToToken(int id) => (uint)id < (uint)_pieces.Length ? Encoding.UTF8.GetString(_pieces[id]) : null;
    public float Score(int id) => _scores[id];
}

/// <summary>Shared one-byte arrays so byte tokens decode without allocating.</summary>
internal static class ByteTable
{
    public static readonly byte[][] Single = Enumerable.Range(0, 256).Select(b => new[] { (byte)b }).ToArray();
}
