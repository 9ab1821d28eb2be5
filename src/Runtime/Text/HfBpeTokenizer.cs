using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// A Hugging Face tokenizer.json whose model is BPE, in either of its two Llama-family shapes:
/// <list type="bullet">
/// <item>byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): regex pre-tokenizer, bytes mapped through GPT-2's
/// byte-to-unicode table, rank-ordered merges. Encoded by Microsoft.ML.Tokenizers' <see cref="BpeTokenizer"/>;
/// our own merge loop is used only when the file sets "ignore_merges" (Llama 3), which the library lacks.</item>
/// <item>SentencePiece-style BPE (Llama 2, TinyLlama, Mistral): "▁" for spaces, a prepended "▁",
/// rank-ordered merges over characters, byte fallback to &lt;0xHH&gt;. The library's BpeTokenizer has no byte
/// fallback, so our merge loop encodes these.</item>
/// </list>
/// Added tokens are matched literally in the text first, as Hugging Face does.
/// </summary>
public sealed class HfBpeTokenizer : TextTokenizerBase
{
    /// <summary>GPT-2's pre-tokenizer regex (HF ByteLevel with use_regex=true).</summary>
    public const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    private readonly Dictionary<string, int> _vocab = new(StringComparer.Ordinal);
    private string?[] _idToToken = Array.Empty<string>();
    private byte[]?[] _tokenBytes = Array.Empty<byte[]>();
    private readonly Dictionary<long, (int Rank, int Merged)> _merges = new();
    private readonly List<string> _mergeStrings = new();
    private List<KeyValuePair<string, int>> _modelVocab = new();
    private readonly List<Func<string, string>> _normalizers = new();
    private readonly List<(Regex Regex, bool Remove)> _splits = new();
    private readonly int[] _byteFallbackIds = Enumerable.Repeat(-1, 256).ToArray();
    private readonly int[] _byteLevelIds = Enumerable.Repeat(-1, 256).ToArray();
    private BpeTokenizer? _ml;
    private int? _unkId;
    private bool _fuseUnk;
    private bool _byteFallback;
    private bool _ignoreMerges;
    private bool _addPrefixSpace;             // ByteLevel add_prefix_space
    private string? _metaspace;               // Metaspace pre-tokenizer replacement char
    private string _metaspacePrepend = "never"; // "always" | "first" | "never"
    private bool _metaspaceSplit;
    private bool _normalizerReplacesSpace;
    private Func<string, string>? _prependNormalizer;   // HF "Prepend" normalizer: the SentencePiece dummy prefix

    /// <summary>True for GPT-2-style byte-level BPE, false for SentencePiece-style BPE.</summary>
    public bool ByteLevel { get; private set; }
    /// <summary>Whether encoding goes through Microsoft.ML.Tokenizers' BpeTokenizer (else our merge loop).</summary>
    public bool UsesLibrary => _ml != null;

    private HfBpeTokenizer(string path, string format) : base(format, path) { }

    /// <summary>Reads a tokenizer.json. <paramref name="preferOwnEncoder"/> forces our merge loop for byte-level
    /// files too (tests use it to check the library and our loop against each other).</summary>
    public static HfBpeTokenizer Load(string path, bool preferOwnEncoder = false)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllBytes(path), new JsonDocumentOptions { AllowTrailingCommas = true }); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: invalid JSON at line {e.LineNumber + 1}: {e.Message}", e); }
        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("model", out var model) || model.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{path}: not a Hugging Face tokenizer.json (no \"model\" object)");
            string type = Str(model, "type") ?? (model.TryGetProperty("merges", out _) ? "BPE" : "?");
            if (type != "BPE")
                throw new NotSupportedException($"{path}: tokenizer model type \"{type}\" is not supported (only BPE: byte-level as in Llama 3/Qwen2/GPT-2, or SentencePiece-style as in Llama 2)");

            bool byteLevel = HasType(root, "pre_tokenizer", "ByteLevel") || HasType(root, "decoder", "ByteLevel");
            var t = new HfBpeTokenizer(path, byteLevel ? "hf-bpe-bytelevel" : "hf-bpe-sentencepiece") { ByteLevel = byteLevel };
            t.ReadModel(model);
            t.ReadNormalizer(root.TryGetProperty("normalizer", out var n) ? n : default);
            t.ReadPreTokenizer(root.TryGetProperty("pre_tokenizer", out var p) ? p : default);
            t.ReadDecoder(root.TryGetProperty("decoder", out var d) ? d : default);
            t.ReadAddedTokens(root);
            t.CheckUnreachableTokens();
            t.GuessBosEos(root);
            if (byteLevel && !t._ignoreMerges && !preferOwnEncoder) t.CreateLibraryEncoder();
            return t;
        }
    }

    private static string? Str(JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static bool Bool(JsonElement e, string name, bool dflt) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind is JsonValueKind.True or JsonValueKind.False ? v.GetBoolean() : dflt;

    /// <summary>Whether the component (or any member of its Sequence) has this type.</summary>
    private static bool HasType(JsonElement root, string component, string type)
    {
        if (!root.TryGetProperty(component, out var c)) return false;
        return Flatten(c).Any(x => Str(x, "type") == type);
    }

    private static IEnumerable<JsonElement> Flatten(JsonElement e)
    {
        if (e.ValueKind != JsonValueKind.Object) yield break;
        if (Str(e, "type") == "Sequence")
        {
            foreach (var key in new[] { "normalizers", "pretokenizers", "decoders", "processors" })
                if (e.TryGetProperty(key, out var arr) && arr.ValueKind == JsonValueKind.Array)
                    foreach (var x in arr.EnumerateArray())
                        foreach (var y in Flatten(x)) yield return y;
        }
        else yield return e;
    }

    private void ReadModel(JsonElement model)
    {
        if (!model.TryGetProperty("vocab", out var vocab) || vocab.ValueKind != JsonValueKind.Object)
            throw new InvalidDataException($"{Source}: model.vocab is missing or not an object");
        int maxId = -1;
        var idTok = new Dictionary<int, string>();
        foreach (var kv in vocab.EnumerateObject())
        {
            if (kv.Value.ValueKind != JsonValueKind.Number || !kv.Value.TryGetInt32(out int id) || id < 0)
                throw new InvalidDataException($"{Source}: model.vocab[\"{kv.Name}\"] is not a non-negative integer id");
            if (kv.Name.Length == 0)
            {
                Warnings.Add($"vocab entry for id {id} has an empty string as its token (unreachable; decodes to nothing)");
                idTok[id] = "";
                maxId = Math.Max(maxId, id);
                continue;
            }
            if (!_vocab.TryAdd(kv.Name, id))
                Warnings.Add($"vocab token \"{kv.Name}\" is listed twice (ids {_vocab[kv.Name]} and {id}); the first is used");
            if (!idTok.TryAdd(id, kv.Name))
                Warnings.Add($"id {id} is given to both \"{idTok[id]}\" and \"{kv.Name}\"; the first is used for decoding");
            maxId = Math.Max(maxId, id);
        }
        if (_vocab.Count == 0) throw new InvalidDataException($"{Source}: model.vocab is empty");
        _modelVocab = _vocab.ToList();
        Resize(maxId + 1);
        foreach (var (id, tok) in idTok) _idToToken[id] = tok;

        _unkId = Str(model, "unk_token") is string unk ? (_vocab.TryGetValue(unk, out int u) ? u : null) : null;
        _fuseUnk = Bool(model, "fuse_unk", false);
        _byteFallback = Bool(model, "byte_fallback", false);
        _ignoreMerges = Bool(model, "ignore_merges", false);
        if (Str(model, "continuing_subword_prefix") is { Length: > 0 } csp)
            throw new NotSupportedException($"{Source}: BPE continuing_subword_prefix \"{csp}\" is not supported");
        if (Str(model, "end_of_word_suffix") is { Length: > 0 } eow)
            throw new NotSupportedException($"{Source}: BPE end_of_word_suffix \"{eow}\" is not supported");
        if (model.TryGetProperty("dropout", out var dr) && dr.ValueKind == JsonValueKind.Number && dr.GetDouble() > 0)
            Warnings.Add($"BPE dropout {dr.GetDouble()} ignored (encoding is deterministic)");

        for (int b = 0; b < 256; b++)
        {
            if (_vocab.TryGetValue($"<0x{b:X2}>", out int id)) _byteFallbackIds[b] = id;
            if (_vocab.TryGetValue(ByteLevelMap.ByteToChar[b].ToString(), out int bl)) _byteLevelIds[b] = bl;
        }

        if (!model.TryGetProperty("merges", out var merges) || merges.ValueKind != JsonValueKind.Array)
            throw new InvalidDataException($"{Source}: model.merges is missing or not an array");
        int rank = 0, broken = 0;
        var brokenExamples = new List<string>();
        foreach (var m in merges.EnumerateArray())
        {
            int r = rank++;
            string? a = null, b = null;
            if (m.ValueKind == JsonValueKind.Array && m.GetArrayLength() == 2)
            {
                a = m[0].GetString(); b = m[1].GetString();
            }
            else if (m.ValueKind == JsonValueKind.String)
            {
                var s = m.GetString()!;
                int sp = s.IndexOf(' ');
                // "a b": exactly one separator. A merge whose tokens themselves contain ' ' cannot be split reliably:
                // accept it only when exactly one split gives two vocab tokens whose concatenation is a vocab token.
                if (sp > 0 && s.IndexOf(' ', sp + 1) < 0) { a = s[..sp]; b = s[(sp + 1)..]; }
                else
                {
                    var ok = new List<(string, string)>();
                    for (int i = 0; i < s.Length; i++)
                        if (s[i] == ' ' && i > 0 && i < s.Length - 1)
                        {
                            string l = s[..i], rr = s[(i + 1)..];
                            if (_vocab.ContainsKey(l) && _vocab.ContainsKey(rr) && _vocab.ContainsKey(l + rr)) ok.Add((l, rr));
                        }
                    if (ok.Count == 1) (a, b) = ok[0];
                }
            }
            else throw new InvalidDataException($"{Source}: model.merges[{r}] is neither \"a b\" nor [\"a\", \"b\"]");

            if (a == null || b == null || !_vocab.TryGetValue(a, out int ia) || !_vocab.TryGetValue(b, out int ib)
                || !_vocab.TryGetValue(a + b, out int im))
            {
                broken++;
                if (brokenExamples.Count < 3) brokenExamples.Add($"#{r} {JsonSerializer.Serialize(m.ValueKind == JsonValueKind.String ? m.GetString() : m.ToString())}");
                continue;
            }
            _merges.TryAdd(Key(ia, ib), (r, im));
            if (!a.Contains(' ') && !b.Contains(' ')) _mergeStrings.Add(a + " " + b);
        }
        if (broken > 0)
            Warnings.Add($"{broken} merge(s) skipped because their tokens are not in the vocabulary or the line cannot be split (e.g. {string.Join(", ", brokenExamples)})");
    }

    private static long Key(int a, int b) => ((long)a << 32) | (uint)b;

    private void Resize(int size)
    {
        if (size <= _idToToken.Length) return;
        Array.Resize(ref _idToToken, size);
        Array.Resize(ref _tokenBytes, size);
        if (size > VocabSize) VocabSize = size;
    }

    private void ReadNormalizer(JsonElement n)
    {
        foreach (var e in Flatten(n))
        {
            switch (Str(e, "type"))
            {
                case "Prepend":
                    {
                        var pre = Str(e, "prepend") ?? "";
                        _prependNormalizer = s => s.Length == 0 ? s : pre + s;
                        _normalizers.Add(_prependNormalizer);
                        break;
                    }
                case "Replace":
                    {
                        var (pattern, isRegex) = Pattern(e);
                        var content = Str(e, "content") ?? "";
                        if (pattern == " " && content.Length > 0) _normalizerReplacesSpace = true;
                        if (isRegex) { var rx = new Regex(pattern); _normalizers.Add(s => rx.Replace(s, content)); }
                        else _normalizers.Add(s => s.Replace(pattern, content, StringComparison.Ordinal));
                        break;
                    }
                case "NFC": _normalizers.Add(s => s.IsNormalized(NormalizationForm.FormC) ? s : s.Normalize(NormalizationForm.FormC)); break;
                case "NFKC": _normalizers.Add(s => s.IsNormalized(NormalizationForm.FormKC) ? s : s.Normalize(NormalizationForm.FormKC)); break;
                case "NFD": _normalizers.Add(s => s.Normalize(NormalizationForm.FormD)); break;
                case "NFKD": _normalizers.Add(s => s.Normalize(NormalizationForm.FormKD)); break;
                case "Lowercase": _normalizers.Add(s => s.ToLowerInvariant()); break;
                case var other:
                    throw new NotSupportedException($"{Source}: normalizer \"{other}\" is not supported (supported: Sequence, Prepend, Replace, NFC, NFKC, NFD, NFKD, Lowercase)");
            }
        }
    }

    private (string Pattern, bool IsRegex) Pattern(JsonElement e)
    {
        if (e.TryGetProperty("pattern", out var p) && p.ValueKind == JsonValueKind.Object)
        {
            if (Str(p, "String") is string s) return (s, false);
            if (Str(p, "Regex") is string r) return (r, true);
        }
        throw new InvalidDataException($"{Source}: {Str(e, "type")} has no pattern {{\"String\"|\"Regex\": ...}}");
    }

    private void ReadPreTokenizer(JsonElement p)
    {
        foreach (var e in Flatten(p))
        {
            switch (Str(e, "type"))
            {
                case "ByteLevel":
                    _addPrefixSpace = Bool(e, "add_prefix_space", false);
                    if (Bool(e, "use_regex", true)) _splits.Add((new Regex(Gpt2Pattern, RegexOptions.Compiled), false));
                    break;
                case "Split":
                    {
                        var (pattern, isRegex) = Pattern(e);
                        var behavior = Str(e, "behavior") ?? "Isolated";
                        if (Bool(e, "invert", false)) throw new NotSupportedException($"{Source}: Split pre-tokenizer with invert=true is not supported");
                        if (behavior is not ("Isolated" or "Removed"))
                            throw new NotSupportedException($"{Source}: Split pre-tokenizer behavior \"{behavior}\" is not supported (Isolated, Removed)");
                        _splits.Add((new Regex(isRegex ? pattern : Regex.Escape(pattern), RegexOptions.Compiled), behavior == "Removed"));
                        break;
                    }
                case "Digits":
                    _splits.Add((new Regex(Bool(e, "individual_digits", false) ? @"\p{N}" : @"\p{N}+", RegexOptions.Compiled), false));
                    break;
                case "Metaspace":
                    _metaspace = Str(e, "replacement") ?? "\u2581";
                    _metaspacePrepend = Str(e, "prepend_scheme") ?? (Bool(e, "add_prefix_space", true) ? "always" : "never");
                    _metaspaceSplit = Bool(e, "split", true);
                    break;
                case var other:
                    throw new NotSupportedException($"{Source}: pre_tokenizer \"{other}\" is not supported (supported: Sequence, ByteLevel, Split, Digits, Metaspace)");
            }
        }
    }

    private void ReadDecoder(JsonElement d)
    {
        foreach (var e in Flatten(d))
        {
            var type = Str(e, "type");
            if (type == "Strip" && (Str(e, "content") ?? " ") == " " && e.TryGetProperty("start", out var st) && st.GetInt32() > 0)
                StripLeadingSpace = true;
            else if (type == "Metaspace" && (Str(e, "prepend_scheme") ?? (Bool(e, "add_prefix_space", true) ? "always" : "never")) != "never")
                StripLeadingSpace = true;
        }
        if (!ByteLevel)
        {
            for (int id = 0; id < _idToToken.Length; id++)
            {
                var tok = _idToToken[id];
                if (tok == null) continue;
                _tokenBytes[id] = _byteFallback && tok.Length == 6 && tok.StartsWith("<0x", StringComparison.Ordinal) && tok[5] == '>'
                    && byte.TryParse(tok.AsSpan(3, 2), System.Globalization.NumberStyles.HexNumber, null, out byte b)
                    ? ByteTable.Single[b]
                    : Encoding.UTF8.GetBytes(tok.Replace(_metaspace ?? "\u2581", " "));
            }
        }
        else
        {
            for (int id = 0; id < _idToToken.Length; id++)
                if (_idToToken[id] is string tok) _tokenBytes[id] = ByteLevelMap.Decode(tok);
        }
    }

    private void ReadAddedTokens(JsonElement root)
    {
        if (!root.TryGetProperty("added_tokens", out var added) || added.ValueKind != JsonValueKind.Array) return;
        int i = 0;
        foreach (var a in added.EnumerateArray())
        {
            if (!a.TryGetProperty("id", out var idEl) || !idEl.TryGetInt32(out int id) || id < 0 || Str(a, "content") is not string content)
                throw new InvalidDataException($"{Source}: added_tokens[{i}] needs an integer \"id\" and a string \"content\"");
            i++;
            Resize(id + 1);
            _idToToken[id] ??= content;
            _tokenBytes[id] ??= Encoding.UTF8.GetBytes(content);
            _vocab.TryAdd(content, id);
            AddSpecial(content, id, matchInText: true, special: Bool(a, "special", false));
        }
    }

    /// <summary>
    /// In a SentencePiece-style vocabulary every space becomes "▁" before the model sees the text, so a token
    /// containing a plain ' ' can never be produced. Known cause: a re-save that turned U+00A0 into U+0020.
    /// </summary>
    private void CheckUnreachableTokens()
    {
        if (ByteLevel) return;
        bool spacesEscaped = _metaspace != null || _normalizerReplacesSpace;
        if (!spacesEscaped) return;
        var ids = _modelVocab.Where(kv => kv.Key.Contains(' ')).Select(kv => kv.Value).OrderBy(i => i).ToList();
        if (ids.Count > 0)
            Warnings.Add($"{ids.Count} vocab token(s) contain a plain space, which the normalizer never leaves in the text, so they are unreachable (ids {string.Join(", ", ids.Take(8))}); a U+00A0 -> U+0020 corruption would look like this");
    }

    /// <summary>Registers an added token from tokenizer_config.json's added_tokens_decoder.</summary>
    internal void AddAddedToken(string content, int id, bool special)
    {
        Resize(id + 1);
        _idToToken[id] ??= content;
        _tokenBytes[id] ??= Encoding.UTF8.GetBytes(content);
        _vocab.TryAdd(content, id);
        AddSpecial(content, id, matchInText: true, special: special);
    }

    /// <summary>Without tokenizer_config.json: BOS from the post-processor template, EOS from well-known names.</summary>
    private void GuessBosEos(JsonElement root)
    {
        if (root.TryGetProperty("post_processor", out var pp))
        {
            foreach (var e in Flatten(pp))
            {
                if (Str(e, "type") != "TemplateProcessing" || !e.TryGetProperty("single", out var single) || single.ValueKind != JsonValueKind.Array) continue;
                if (single.GetArrayLength() > 0 && single[0].TryGetProperty("SpecialToken", out var stok) && Str(stok, "id") is string bos
                    && _vocab.TryGetValue(bos, out int bid)) SetBos(bid);
            }
        }
        foreach (var name in new[] { "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>" })
            if (_vocab.TryGetValue(name, out int eid)) { SetEos(eid); break; }
    }

    private void CreateLibraryEncoder()
    {
        try
        {
            var opts = new BpeOptions(_modelVocab)
            {
                Merges = _mergeStrings,
                ByteLevel = true,
                PreTokenizer = new SplitChainPreTokenizer(_splits),
                UnknownToken = _unkId is int u ? _idToToken[u] : null,
            };
            _ml = BpeTokenizer.Create(opts);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            Warnings.Add($"Microsoft.ML.Tokenizers BpeTokenizer refused this vocabulary ({e.Message}); using our BPE merge loop");
            _ml = null;
        }
    }

    protected override void EncodeOrdinary(string text, Segment position, List<int> output)
    {
        if (position == Segment.Continuation && _prependNormalizer != null && text.Length > 0)
        {
            // A continuation gets every normalizer except Prepend (the dummy prefix).
            foreach (var f in _normalizers) if (f != _prependNormalizer) text = f(text);
        }
        else foreach (var f in _normalizers) text = f(text);
        if (ByteLevel)
        {
            if (_addPrefixSpace && position != Segment.Continuation && text.Length > 0 && text[0] != ' ') text = " " + text;
            if (text.Length == 0) return;
            if (_ml != null) { output.AddRange(_ml.EncodeToIds(text, considerPreTokenization: true, considerNormalization: false)); return; }
            foreach (var piece in Split(text)) EncodeByteLevelWord(piece, output);
            return;
        }
        if (_metaspace != null)
        {
            text = text.Replace(" ", _metaspace, StringComparison.Ordinal);
            bool prepend = position != Segment.Continuation
                && (_metaspacePrepend == "always" || (_metaspacePrepend == "first" && position == Segment.TextStart));
            if (prepend && text.Length > 0 && !text.StartsWith(_metaspace, StringComparison.Ordinal)) text = _metaspace + text;
        }
        if (text.Length == 0) return;
        foreach (var piece in Split(text))
        {
            if (_metaspace != null && _metaspaceSplit)
            {
                // Metaspace split: each word starts at a replacement char.
                int s = 0;
                for (int i = 1; i <= piece.Length; i++)
                    if (i == piece.Length || piece.AsSpan(i).StartsWith(_metaspace, StringComparison.Ordinal))
                    {
                        EncodeCharWord(piece[s..i], output);
                        s = i;
                    }
            }
            else EncodeCharWord(piece, output);
        }
    }

    /// <summary>Applies the Split/ByteLevel-regex chain: each regex splits every piece left by the previous one.</summary>
    private List<string> Split(string text)
    {
        var pieces = new List<string> { text };
        foreach (var (rx, remove) in _splits)
        {
            var next = new List<string>();
            foreach (var p in pieces)
            {
                int last = 0;
                foreach (Match m in rx.Matches(p))
                {
                    if (m.Length == 0) continue;
                    if (m.Index > last) next.Add(p[last..m.Index]);
                    if (!remove) next.Add(m.Value);
                    last = m.Index + m.Length;
                }
                if (last < p.Length) next.Add(p[last..]);
            }
            pieces = next;
        }
        return pieces;
    }

    private bool TryMerge(int left, int right, out float priority, out int merged)
    {
        if (_merges.TryGetValue(Key(left, right), out var m)) { priority = m.Rank; merged = m.Merged; return true; }
        priority = 0; merged = -1; return false;
    }

    private void EncodeByteLevelWord(string word, List<int> output)
    {
        var bytes = Encoding.UTF8.GetBytes(word);
        if (_ignoreMerges && _vocab.TryGetValue(ByteLevelMap.Encode(bytes), out int whole)) { output.Add(whole); return; }
        int start = output.Count;
        foreach (var b in bytes)
        {
            int id = _byteLevelIds[b];
            if (id < 0)
            {
                if (_unkId is int u) id = u;
                else throw new InvalidOperationException($"{Source}: byte 0x{b:X2} has no byte-level token and there is no unk_token");
            }
            output.Add(id);
        }
        BpeMerger.Merge(output, start, TryMerge);
    }

    private void EncodeCharWord(string word, List<int> output)
    {
        if (_ignoreMerges && _vocab.TryGetValue(word, out int whole)) { output.Add(whole); return; }
        int start = output.Count;
        for (int i = 0; i < word.Length;)
        {
            int len = char.IsHighSurrogate(word[i]) && i + 1 < word.Length && char.IsLowSurrogate(word[i + 1]) ? 2 : 1;
            var ch = word.Substring(i, len);
            i += len;
            if (_vocab.TryGetValue(ch, out int id)) { output.Add(id); continue; }
            if (_byteFallback)
            {
                var bytes = Encoding.UTF8.GetBytes(ch);
                if (bytes.All(b => _byteFallbackIds[b] >= 0)) { foreach (var b in bytes) output.Add(_byteFallbackIds[b]); continue; }
            }
            if (_unkId is not int unk) throw new InvalidOperationException($"{Source}: \"{ch}\" is not in the vocabulary and there is no unk_token");
            if (_fuseUnk && output.Count > start && output[^1] == unk) continue;
            output.Add(unk);
        }
        BpeMerger.Merge(output, start, TryMerge);
    }

    protected override ReadOnlySpan<byte> TokenBytes(int id) => _tokenBytes[id] ?? ReadOnlySpan<byte>.Empty;
    public override int? TokenToId(string token) => _vocab.TryGetValue(token, out int id) ? id : null;
    public override string? IdToToken(int id) => (uint)id < (uint)_idToToken.Length ? _idToToken[id] : null;

    public override string Describe() =>
        base.Describe() + $", {_merges.Count} merges, " + (ByteLevel ? "byte-level" : "SentencePiece-style" + (_byteFallback ? " with byte fallback" : ""))
        + (UsesLibrary ? " via Microsoft.ML.Tokenizers BpeTokenizer" : " via our BPE merge loop" + (_ignoreMerges ? " (ignore_merges)" : ""));

    /// <summary>The Split/ByteLevel regex chain as a Microsoft.ML.Tokenizers pre-tokenizer.</summary>
    private sealed class SplitChainPreTokenizer : PreTokenizer
    {
        private readonly List<(Regex Regex, bool Remove)> _splits;
        public SplitChainPreTokenizer(List<(Regex, bool)> splits) { _splits = splits; }

        public override IEnumerable<(int Offset, int Length)> PreTokenize(string text) => Run(text);
        public override IEnumerable<(int Offset, int Length)> PreTokenize(ReadOnlySpan<char> text) => Run(text.ToString());

        private List<(int Offset, int Length)> Run(string text)
        {
            var pieces = new List<(int Offset, int Length)> { (0, text.Length) };
            if (text.Length == 0) return new();
            foreach (var (rx, remove) in _splits)
            {
                var next = new List<(int, int)>();
                foreach (var (off, len) in pieces)
                {
                    int last = off, end = off + len;
                    foreach (Match m in rx.Matches(text.Substring(off, len)))
                    {
                        if (m.Length == 0) continue;
                        int s = off + m.Index;
                        if (s > last) next.Add((last, s - last));
                        if (!remove) next.Add((s, m.Length));
                        last = s + m.Length;
                    }
                    if (last < end) next.Add((last, end - last));
                }
                pieces = next;
            }
            return pieces;
        }
    }
}
