using System.Text;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// A tiktoken BPE file (Llama 3 / 3.1 / 3.2 / 3.3 tokenizer.model: one "&lt;base64 token bytes&gt; &lt;rank&gt;" line per
/// token, rank = id) through Microsoft.ML.Tokenizers' <see cref="TiktokenTokenizer"/> with Llama 3's pre-tokenizer
/// regex. The file holds no special tokens: Llama 3's 256 are assigned from the first id after the ranks.
/// </summary>
public sealed class TiktokenTextTokenizer : TextTokenizerBase
{
    /// <summary>Llama 3's pat_str (meta-llama/llama-models models/llama3/tokenizer.py).</summary>
    public const string Llama3Pattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>Llama 3.1+'s 256 special tokens in id order from num_base_tokens (128000).</summary>
    public static IReadOnlyList<string> Llama3SpecialTokens { get; } = BuildLlama3Specials();

    private static string[] BuildLlama3Specials()
    {
        var named = new[]
        {
            "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
        };
        var all = new List<string>(named);
        for (int i = 2; all.Count < 256; i++) all.Add($"<|reserved_special_token_{i}|>");
        return all.ToArray();
    }

    private readonly TiktokenTokenizer _tk;
    private readonly byte[][] _bytes;
    private readonly Dictionary<string, int> _specialIds = new(StringComparer.Ordinal);

    public int NumBaseTokens { get; }

    private TiktokenTextTokenizer(string path, byte[][] bytes, TiktokenTokenizer tk) : base("tiktoken", path)
    {
        _bytes = bytes;
        _tk = tk;
        NumBaseTokens = bytes.Length;
        VocabSize = bytes.Length;
        for (int i = 0; i < Llama3SpecialTokens.Count; i++) SetSpecial(Llama3SpecialTokens[i], NumBaseTokens + i);
        SetBos(_specialIds["<|begin_of_text|>"]);
        SetEos(_specialIds["<|end_of_text|>"], new[] { _specialIds["<|eom_id|>"], _specialIds["<|eot_id|>"] });
    }

    /// <summary>Adds or renames a special token (tokenizer_config.json added_tokens_decoder may rename reserved ones).</summary>
    internal void SetSpecial(string text, int id)
    {
        _specialIds[text] = id;
        AddSpecial(text, id);
    }

    internal static TiktokenTextTokenizer Load(string path, byte[] data)
    {
        // Parse the ranks ourselves first: a clear error with the line number, and id -> bytes for decoding.
        var text = Encoding.ASCII.GetString(data);
        var byRank = new Dictionary<int, byte[]>();
        int lineNo = 0;
        foreach (var rawLine in text.Split('\n'))
        {
            lineNo++;
            var line = rawLine.TrimEnd('\r');
            if (line.Length == 0) continue;
            int sp = line.IndexOf(' ');
            if (sp <= 0 || !int.TryParse(line.AsSpan(sp + 1), out int rank) || rank < 0)
                throw new InvalidDataException($"{path}:{lineNo}: expected '<base64 token> <rank>', got '{Trunc(line)}'");
            byte[] tok;
            try { tok = Convert.FromBase64String(line[..sp]); }
            catch (FormatException) { throw new InvalidDataException($"{path}:{lineNo}: token '{Trunc(line[..sp])}' is not base64"); }
            if (!byRank.TryAdd(rank, tok)) throw new InvalidDataException($"{path}:{lineNo}: rank {rank} appears twice");
        }
        if (byRank.Count == 0) throw new InvalidDataException($"{path}: empty tiktoken file");
        var bytes = new byte[byRank.Count][];
        for (int i = 0; i < bytes.Length; i++)
            if (!byRank.TryGetValue(i, out bytes[i]!))
                throw new InvalidDataException($"{path}: ranks are not contiguous: rank {i} is missing among {byRank.Count}");

        TiktokenTokenizer tk;
        try
        {
            using var ms = new MemoryStream(data, writable: false);
            var pre = new RegexPreTokenizer(new Regex(Llama3Pattern, RegexOptions.Compiled), null);
            tk = TiktokenTokenizer.Create(ms, pre, normalizer: null, specialTokens: null);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new InvalidDataException($"{path}: Microsoft.ML.Tokenizers could not load this tiktoken file: {e.Message}", e);
        }
        return new TiktokenTextTokenizer(path, bytes, tk);
    }

    private static string Trunc(string s) => s.Length > 60 ? s[..60] + "..." : s;

    protected override void EncodeOrdinary(string text, Segment position, List<int> output)
    {
        if (text.Length == 0) return;
        output.AddRange(_tk.EncodeToIds(text));
    }

    protected override ReadOnlySpan<byte> TokenBytes(int id) =>
        id < _bytes.Length ? _bytes[id] : ReadOnlySpan<byte>.Empty;

    public override int? TokenToId(string token)
    {
        if (_specialIds.TryGetValue(token, out int sid)) return sid;
        var ids = _tk.EncodeToIds(token);
        return ids.Count == 1 && _bytes[ids[0]].AsSpan().SequenceEqual(Encoding.UTF8.GetBytes(token)) ? ids[0] : null;
    }

    public override string? IdToToken(int id)
    {
        if ((uint)id >= (uint)VocabSize) return null;
        if (id < _bytes.Length) return Encoding.UTF8.GetString(_bytes[id]);
        foreach (var kv in _specialIds) if (kv.Value == id) return kv.Key;
        return null;
    }

    public override string Describe() => base.Describe() + $", {NumBaseTokens} ranks + {VocabSize - NumBaseTokens} special, Llama 3 pat_str, via Microsoft.ML.Tokenizers";
}
