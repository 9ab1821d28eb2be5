using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace FineTuneNative.Runtime.Text;

/// <summary>Settings for <see cref="BpeTrainer.Train"/>.</summary>
public sealed record BpeTrainerOptions
{
    public string BosToken { get; init; } = "<s>";
    public string EosToken { get; init; } = "</s>";
    /// <summary>Padding token; null for none. May equal EOS (then it is not added twice).</summary>
    public string? PadToken { get; init; } = "<pad>";
    /// <summary>Further special tokens, e.g. "&lt;|user|&gt;", "&lt;|assistant|&gt;", "&lt;|end|&gt;": never split, never merged across.</summary>
    public IReadOnlyList<string> SpecialTokens { get; init; } = Array.Empty<string>();
    /// <summary>A pair seen fewer times than this is never merged (training stops early, the vocabulary is then smaller).</summary>
    public int MinFrequency { get; init; } = 2;
    /// <summary>Optional Jinja chat template written to tokenizer_config.json.</summary>
    public string? ChatTemplate { get; init; }
    public int ModelMaxLength { get; init; } = 2048;
}

/// <summary>What <see cref="BpeTrainer.Train"/> produced; <see cref="Encode"/> is the trainer's own reference encoder.</summary>
public sealed class BpeTrainingResult
{
    internal BpeTrainingResult(string tokenizerJson, string tokenizerConfig, string[] tokens, List<(int A, int B)> merges,
        Dictionary<string, int> specials, Regex pre)
    {
        TokenizerJsonPath = tokenizerJson;
        TokenizerConfigPath = tokenizerConfig;
        Tokens = tokens;
        Merges = merges;
        _specials = specials;
        _pre = pre;
        _ids = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < tokens.Length; i++) _ids.TryAdd(tokens[i], i);
    }

    private readonly Dictionary<string, int> _specials;
    private readonly Dictionary<string, int> _ids;
    private readonly Regex _pre;

    public string TokenizerJsonPath { get; }
    public string TokenizerConfigPath { get; }
    /// <summary>Token strings by id, byte-level form (specials first, then the 256 bytes, then one per merge).</summary>
    public IReadOnlyList<string> Tokens { get; }
    /// <summary>Learned merges in order, as id pairs.</summary>
    public IReadOnlyList<(int A, int B)> Merges { get; }
    public int VocabSize => Tokens.Count;

    /// <summary>
    /// The trainer's own encoding, independent of the loaders: split out special tokens, pre-tokenize, and apply the
    /// learned merges one after another in the order they were learned (each everywhere in the word). This is what
    /// rank-ordered BPE means, written the plain way; tests compare the loaded tokenizer.json against it.
    /// </summary>
    public int[] Encode(string text)
    {
        var ids = new List<int>();
        int seg = 0;
        for (int i = 0; i < text.Length; i++)
        {
            foreach (var (s, id) in _specials)
            {
                if (string.CompareOrdinal(text, i, s, 0, s.Length) != 0) continue;
                EncodePlain(text[seg..i], ids);
                ids.Add(id);
                seg = i + s.Length;
                i = seg - 1;
                break;
            }
        }
        EncodePlain(text[seg..], ids);
        return ids.ToArray();
    }

    private void EncodePlain(string text, List<int> output)
    {
        foreach (Match m in _pre.Matches(text))
        {
            var word = Encoding.UTF8.GetBytes(m.Value).Select(b => _ids[ByteLevelMap.ByteToChar[b].ToString()]).ToList();
            foreach (var (a, b) in Merges)
            {
                if (word.Count < 2) break;
                int merged = _ids[Tokens[a] + Tokens[b]];
                for (int i = 0; i + 1 < word.Count; i++)
                    if (word[i] == a && word[i + 1] == b) { word[i] = merged; word.RemoveAt(i + 1); }
            }
            output.AddRange(word);
        }
    }
}

/// <summary>
/// Trains a byte-level BPE vocabulary (GPT-2 / Llama 3 style: the 256 bytes as base symbols, so any text encodes
/// without an unknown token) and writes a standard Hugging Face tokenizer.json + tokenizer_config.json that
/// <see cref="TokenizerLoader"/> and Hugging Face's tokenizers both read.
/// </summary>
/// <remarks>
/// Layout of ids: BOS, EOS, PAD, the caller's special tokens, then the 256 byte symbols (in byte order), then one
/// token per merge in the order learned. Pre-tokenization is GPT-2's regex (HF ByteLevel with use_regex=true), so
/// merges never cross a word, space-prefix or digit-run boundary. At each step the most frequent adjacent pair is
/// merged (ties: the smallest pair of ids, so training is deterministic). The post-processor prepends BOS, like
/// Llama's tokenizers; <see cref="ITextTokenizer.Encode"/> adds BOS only when asked.
/// </remarks>
public static class BpeTrainer
{
    public static BpeTrainingResult Train(IEnumerable<string> corpus, int vocabSize, string outputDirectory, BpeTrainerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(corpus);
        ArgumentException.ThrowIfNullOrEmpty(outputDirectory);
        var o = options ?? new BpeTrainerOptions();
        if (o.MinFrequency < 1) throw new ArgumentOutOfRangeException(nameof(options), "MinFrequency must be >= 1");

        // Special tokens first, in a fixed order, without duplicates.
        var specialList = new List<string>();
        void AddSpecial(string? s)
        {
            if (s == null) return;
            if (s.Length == 0) throw new ArgumentException("special tokens must be non-empty");
            if (!specialList.Contains(s)) specialList.Add(s);
        }
        AddSpecial(o.BosToken); AddSpecial(o.EosToken); AddSpecial(o.PadToken);
        foreach (var s in o.SpecialTokens) AddSpecial(s);
        int baseSize = specialList.Count + 256;
        if (vocabSize < baseSize)
            throw new ArgumentOutOfRangeException(nameof(vocabSize), $"vocabSize {vocabSize} is smaller than the {specialList.Count} special tokens + 256 byte symbols");

        var tokens = new List<string>(specialList);
        int byteBase = tokens.Count;
        for (int b = 0; b < 256; b++) tokens.Add(ByteLevelMap.ByteToChar[b].ToString());
        var specials = specialList.Select((s, i) => (s, i)).OrderByDescending(t => t.s.Length)
            .ToDictionary(t => t.s, t => t.i, StringComparer.Ordinal);
        var pre = new Regex(HfBpeTokenizer.Gpt2Pattern, RegexOptions.Compiled);

        // Word frequencies (a word = one pre-tokenizer match, as bytes), special tokens cut out of the text.
        var wordCounts = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var doc in corpus)
        {
            if (doc == null) continue;
            foreach (var piece in SplitOnSpecials(doc, specials.Keys))
                foreach (Match m in pre.Matches(piece))
                {
                    var key = ByteLevelMap.Encode(Encoding.UTF8.GetBytes(m.Value));
                    wordCounts[key] = wordCounts.GetValueOrDefault(key) + 1;
                }
        }

        var words = new List<List<int>>(wordCounts.Count);
        var freqs = new List<int>(wordCounts.Count);
        foreach (var (w, c) in wordCounts.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            var bytes = ByteLevelMap.Decode(w);
            words.Add(bytes.Select(b => byteBase + b).ToList());
            freqs.Add(c);
        }

        // Pair statistics, kept up to date incrementally: count and the words each pair occurs in.
        var pairCount = new Dictionary<long, long>();
        var pairWords = new Dictionary<long, HashSet<int>>();
        static long Key(int a, int b) => ((long)a << 32) | (uint)b;
        void AddPairs(int wi, int sign)
        {
            var w = words[wi];
            for (int i = 0; i + 1 < w.Count; i++)
            {
                long k = Key(w[i], w[i + 1]);
                pairCount[k] = pairCount.GetValueOrDefault(k) + sign * freqs[wi];
                if (sign > 0)
                {
                    if (!pairWords.TryGetValue(k, out var set)) pairWords[k] = set = new HashSet<int>();
                    set.Add(wi);
                }
            }
        }
        for (int wi = 0; wi < words.Count; wi++) AddPairs(wi, +1);

        var merges = new List<(int A, int B)>();
        var tokenIds = new Dictionary<string, int>(StringComparer.Ordinal);
        for (int i = 0; i < tokens.Count; i++) tokenIds.TryAdd(tokens[i], i);
        while (tokens.Count < vocabSize)
        {
            long best = -1, bestCount = 0;
            foreach (var (k, c) in pairCount)
                if (c > bestCount || (c == bestCount && c > 0 && k < best)) { best = k; bestCount = c; }
            if (best < 0 || bestCount < o.MinFrequency) break;
            int a = (int)(best >> 32), b = (int)(best & 0xFFFFFFFF);
            var mergedText = tokens[a] + tokens[b];
            if (!tokenIds.TryGetValue(mergedText, out int merged))
            {
                merged = tokens.Count;
                tokens.Add(mergedText);
                tokenIds[mergedText] = merged;
            }
            merges.Add((a, b));
            // Rewrite every word containing the pair, updating pair statistics around it.
            foreach (int wi in pairWords[best].ToList())
            {
                var w = words[wi];
                bool has = false;
                for (int i = 0; i + 1 < w.Count; i++) if (w[i] == a && w[i + 1] == b) { has = true; break; }
                if (!has) continue;
                AddPairs(wi, -1);
                for (int i = 0; i + 1 < w.Count; i++)
                    if (w[i] == a && w[i + 1] == b) { w[i] = merged; w.RemoveAt(i + 1); }
                AddPairs(wi, +1);
            }
            pairCount.Remove(best);
            pairWords.Remove(best);
        }

        Directory.CreateDirectory(outputDirectory);
        var jsonPath = Path.Combine(outputDirectory, "tokenizer.json");
        var cfgPath = Path.Combine(outputDirectory, "tokenizer_config.json");
        WriteAtomic(jsonPath, w => WriteTokenizerJson(w, tokens, merges, specialList, o));
        WriteAtomic(cfgPath, w => WriteTokenizerConfig(w, specialList, o));
        return new BpeTrainingResult(jsonPath, cfgPath, tokens.ToArray(), merges, specials, pre);
    }

    private static IEnumerable<string> SplitOnSpecials(string text, IEnumerable<string> specialsLongestFirst)
    {
        var list = specialsLongestFirst.ToList();
        int seg = 0;
        for (int i = 0; i < text.Length; i++)
        {
            foreach (var s in list)
            {
                if (string.CompareOrdinal(text, i, s, 0, s.Length) != 0) continue;
                if (i > seg) yield return text[seg..i];
                seg = i + s.Length;
                i = seg - 1;
                break;
            }
        }
        if (seg < text.Length) yield return text[seg..];
    }

    private static readonly JsonWriterOptions WriterOptions = new() { Indented = true, Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private static void WriteAtomic(string path, Action<Utf8JsonWriter> write)
    {
        var tmp = path + ".tmp-" + Environment.ProcessId;
        try
        {
            using (var fs = File.Create(tmp))
            using (var w = new Utf8JsonWriter(fs, WriterOptions))
                write(w);
            File.Move(tmp, path, overwrite: true);
        }
        finally
        {
            if (File.Exists(tmp)) File.Delete(tmp);
        }
    }

    private static void WriteAddedToken(Utf8JsonWriter w, string content, int? id)
    {
        w.WriteStartObject();
        if (id is int i) w.WriteNumber("id", i);
        w.WriteString("content", content);
        w.WriteBoolean("single_word", false);
        w.WriteBoolean("lstrip", false);
        w.WriteBoolean("rstrip", false);
        w.WriteBoolean("normalized", false);
        w.WriteBoolean("special", true);
        w.WriteEndObject();
    }

    private static void WriteTokenizerJson(Utf8JsonWriter w, List<string> tokens, List<(int A, int B)> merges, List<string> specials, BpeTrainerOptions o)
    {
        w.WriteStartObject();
        w.WriteString("version", "1.0");
        w.WriteNull("truncation");
        w.WriteNull("padding");
        w.WriteStartArray("added_tokens");
        for (int i = 0; i < specials.Count; i++) WriteAddedToken(w, specials[i], i);
        w.WriteEndArray();
        w.WriteNull("normalizer");
        w.WriteStartObject("pre_tokenizer");
        w.WriteString("type", "ByteLevel");
        w.WriteBoolean("add_prefix_space", false);
        w.WriteBoolean("trim_offsets", true);
        w.WriteBoolean("use_regex", true);
        w.WriteEndObject();
        // post_processor: BOS + sequence, like Llama's tokenizers.
        w.WriteStartObject("post_processor");
        w.WriteString("type", "TemplateProcessing");
        w.WriteStartArray("single");
        WriteSpecialPiece(w, o.BosToken); WriteSequencePiece(w, "A", 0);
        w.WriteEndArray();
        w.WriteStartArray("pair");
        WriteSpecialPiece(w, o.BosToken); WriteSequencePiece(w, "A", 0); WriteSpecialPiece(w, o.BosToken, 1); WriteSequencePiece(w, "B", 1);
        w.WriteEndArray();
        w.WriteStartObject("special_tokens");
        w.WriteStartObject(o.BosToken);
        w.WriteString("id", o.BosToken);
        w.WriteStartArray("ids"); w.WriteNumberValue(specials.IndexOf(o.BosToken)); w.WriteEndArray();
        w.WriteStartArray("tokens"); w.WriteStringValue(o.BosToken); w.WriteEndArray();
        w.WriteEndObject();
        w.WriteEndObject();
        w.WriteEndObject();
        w.WriteStartObject("decoder");
        w.WriteString("type", "ByteLevel");
        w.WriteBoolean("add_prefix_space", true);
        w.WriteBoolean("trim_offsets", true);
        w.WriteBoolean("use_regex", true);
        w.WriteEndObject();
        w.WriteStartObject("model");
        w.WriteString("type", "BPE");
        w.WriteNull("dropout");
        w.WriteNull("unk_token");
        w.WriteNull("continuing_subword_prefix");
        w.WriteNull("end_of_word_suffix");
        w.WriteBoolean("fuse_unk", false);
        w.WriteBoolean("byte_fallback", false);
        w.WriteBoolean("ignore_merges", false);
        w.WriteStartObject("vocab");
        for (int i = 0; i < tokens.Count; i++) w.WriteNumber(tokens[i], i);
        w.WriteEndObject();
        w.WriteStartArray("merges");
        foreach (var (a, b) in merges) w.WriteStringValue(tokens[a] + " " + tokens[b]);
        w.WriteEndArray();
        w.WriteEndObject();
        w.WriteEndObject();
    }

    private static void WriteSpecialPiece(Utf8JsonWriter w, string token, int typeId = 0)
    {
        w.WriteStartObject(); w.WriteStartObject("SpecialToken"); w.WriteString("id", token); w.WriteNumber("type_id", typeId); w.WriteEndObject(); w.WriteEndObject();
    }

    private static void WriteSequencePiece(Utf8JsonWriter w, string id, int typeId)
    {
        w.WriteStartObject(); w.WriteStartObject("Sequence"); w.WriteString("id", id); w.WriteNumber("type_id", typeId); w.WriteEndObject(); w.WriteEndObject();
    }

    private static void WriteTokenizerConfig(Utf8JsonWriter w, List<string> specials, BpeTrainerOptions o)
    {
        w.WriteStartObject();
        w.WriteBoolean("add_bos_token", true);
        w.WriteBoolean("add_eos_token", false);
        w.WriteStartObject("added_tokens_decoder");
        for (int i = 0; i < specials.Count; i++)
        {
            w.WritePropertyName(i.ToString(System.Globalization.CultureInfo.InvariantCulture));
            WriteAddedToken(w, specials[i], null);
        }
        w.WriteEndObject();
        var extra = specials.Where(s => s != o.BosToken && s != o.EosToken && s != o.PadToken).ToList();
        w.WriteStartArray("additional_special_tokens");
        foreach (var s in extra) w.WriteStringValue(s);
        w.WriteEndArray();
        w.WriteString("bos_token", o.BosToken);
        w.WriteString("eos_token", o.EosToken);
        if (o.PadToken != null) w.WriteString("pad_token", o.PadToken); else w.WriteNull("pad_token");
        w.WriteNull("unk_token");
        if (o.ChatTemplate != null) w.WriteString("chat_template", o.ChatTemplate);
        w.WriteBoolean("clean_up_tokenization_spaces", false);
        w.WriteNumber("model_max_length", o.ModelMaxLength);
        w.WriteString("tokenizer_class", "PreTrainedTokenizerFast");
        w.WriteEndObject();
    }
}
