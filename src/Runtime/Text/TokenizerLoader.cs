using System.Text;
using System.Text.Json;

namespace FineTuneNative.Runtime.Text;

/// <summary>
/// Opens whatever tokenizer a model comes with: a model directory (tokenizer.json, else tokenizer.model, else
/// tokenizer.bin / tok*.bin), a Hugging Face tokenizer.json, a tokenizer.model (SentencePiece protobuf or
/// tiktoken ranks, told apart by content), or a llama2.c tokenizer.bin. Next to the file, tokenizer_config.json
/// (added tokens, bos_token, eos_token) and generation_config.json (eos_token_id, possibly a list) are applied.
/// </summary>
public static class TokenizerLoader
{
    public static ITextTokenizer Load(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        string file = Directory.Exists(path) ? FindInDirectory(path) : path;
        if (!File.Exists(file)) throw new FileNotFoundException($"{file}: tokenizer file not found", file);

        TextTokenizerBase tok = LoadFile(file);
        var dir = Path.GetDirectoryName(Path.GetFullPath(file))!;
        ApplyTokenizerConfig(tok, Path.Combine(dir, "tokenizer_config.json"));
        ApplyGenerationConfig(tok, Path.Combine(dir, "generation_config.json"));
        return tok;
    }

    private static string FindInDirectory(string dir)
    {
        foreach (var name in new[] { "tokenizer.json", "tokenizer.model", "tokenizer.bin" })
        {
            var p = Path.Combine(dir, name);
            if (File.Exists(p)) return p;
        }
        var tokBins = Directory.GetFiles(dir, "tok*.bin");
        if (tokBins.Length == 1) return tokBins[0];
        throw new FileNotFoundException(
            $"{dir}: no tokenizer found (looked for tokenizer.json, tokenizer.model, tokenizer.bin, a single tok*.bin)");
    }

    private static TextTokenizerBase LoadFile(string file)
    {
        if (file.EndsWith(".json", StringComparison.OrdinalIgnoreCase)) return HfBpeTokenizer.Load(file);
        byte[] data;
        try { data = File.ReadAllBytes(file); }
        catch (IOException e) { throw new InvalidDataException($"{file}: cannot read: {e.Message}", e); }
        if (data.Length == 0) throw new InvalidDataException($"{file}: empty tokenizer file");
        if (data[0] == (byte)'{') return HfBpeTokenizer.Load(file);
        if (file.EndsWith(".bin", StringComparison.OrdinalIgnoreCase)) return Llama2cTokenizer.Load(file);
        if (LooksLikeTiktoken(data)) return TiktokenTextTokenizer.Load(file, data);
        if (SentencePieceModelFile.LooksLikeModelProto(data)) return SentencePieceTextTokenizer.Load(file, data);
        if (data.Length >= 4 && BitConverter.ToUInt32(data, 0) is > 0 and < 4096) return Llama2cTokenizer.Load(file);
        throw new InvalidDataException(
            $"{file}: unrecognised tokenizer format (expected a tokenizer.json, a SentencePiece model, a tiktoken rank file or a llama2.c tokenizer.bin)");
    }

    /// <summary>A tiktoken file starts with "&lt;base64&gt; &lt;int&gt;\n".</summary>
    private static bool LooksLikeTiktoken(byte[] data)
    {
        int nl = Array.IndexOf(data, (byte)'\n', 0, Math.Min(data.Length, 512));
        if (nl <= 0) return false;
        var line = Encoding.ASCII.GetString(data, 0, nl).TrimEnd('\r');
        int sp = line.IndexOf(' ');
        if (sp <= 0 || !int.TryParse(line.AsSpan(sp + 1), out _)) return false;
        foreach (char c in line.AsSpan(0, sp))
            if (!(char.IsAsciiLetterOrDigit(c) || c is '+' or '/' or '=')) return false;
        return true;
    }

    private static JsonElement? ReadJson(string path)
    {
        if (!File.Exists(path)) return null;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllBytes(path), new JsonDocumentOptions { AllowTrailingCommas = true });
            return doc.RootElement.Clone();
        }
        catch (JsonException e) { throw new InvalidDataException($"{path}: invalid JSON at line {e.LineNumber + 1}: {e.Message}", e); }
    }

    /// <summary>bos_token / eos_token may be a string or an AddedToken object {"content": ...}.</summary>
    private static string? TokenContent(JsonElement cfg, string name)
    {
        if (!cfg.TryGetProperty(name, out var v)) return null;
        if (v.ValueKind == JsonValueKind.String) return v.GetString();
        if (v.ValueKind == JsonValueKind.Object && v.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String) return c.GetString();
        return null;
    }

    private static void ApplyTokenizerConfig(TextTokenizerBase tok, string path)
    {
        if (ReadJson(path) is not JsonElement cfg || cfg.ValueKind != JsonValueKind.Object) return;
        if (cfg.TryGetProperty("added_tokens_decoder", out var atd) && atd.ValueKind == JsonValueKind.Object)
        {
            foreach (var kv in atd.EnumerateObject())
            {
                if (!int.TryParse(kv.Name, out int id) || id < 0 || kv.Value.ValueKind != JsonValueKind.Object
                    || !kv.Value.TryGetProperty("content", out var c) || c.ValueKind != JsonValueKind.String)
                    throw new InvalidDataException($"{path}: added_tokens_decoder[\"{kv.Name}\"] needs an integer key and a \"content\" string");
                bool special = kv.Value.TryGetProperty("special", out var sp) && sp.ValueKind == JsonValueKind.True;
                var content = c.GetString()!;
                switch (tok)
                {
                    case HfBpeTokenizer hf: hf.AddAddedToken(content, id, special); break;
                    case TiktokenTextTokenizer tt when id >= tt.NumBaseTokens: tt.SetSpecial(content, id); break;
                    default:
                        if (tok.TokenToId(content) is int existing && existing != id)
                            throw new InvalidDataException($"{path}: added token \"{content}\" has id {id} but {tok.Source} gives it id {existing}");
                        if (id >= tok.VocabSize)
                            throw new InvalidDataException($"{path}: added token \"{content}\" id {id} is beyond the vocabulary of {tok.Source} ({tok.VocabSize})");
                        break;
                }
            }
        }
        int? Resolve(string name)
        {
            var content = TokenContent(cfg, name);
            if (content == null) return null;
            return tok.TokenToId(content)
                ?? throw new InvalidDataException($"{path}: {name} \"{content}\" is not a token of {tok.Source}");
        }
        if (cfg.TryGetProperty("bos_token", out var bosEl))
            tok.SetBos(bosEl.ValueKind == JsonValueKind.Null ? null : Resolve("bos_token"));
        if (Resolve("eos_token") is int eos)
            tok.SetEos(eos, tok.EosIds.Where(i => i != tok.EosId).ToList());
    }

    private static void ApplyGenerationConfig(TextTokenizerBase tok, string path)
    {
        if (ReadJson(path) is not JsonElement cfg || cfg.ValueKind != JsonValueKind.Object) return;
        if (!cfg.TryGetProperty("eos_token_id", out var e)) return;
        var ids = new List<int>();
        if (e.ValueKind == JsonValueKind.Number) ids.Add(e.GetInt32());
        else if (e.ValueKind == JsonValueKind.Array) ids.AddRange(e.EnumerateArray().Select(x => x.GetInt32()));
        foreach (var id in ids)
            if ((uint)id >= (uint)tok.VocabSize)
                throw new InvalidDataException($"{path}: eos_token_id {id} is beyond the vocabulary of {tok.Source} ({tok.VocabSize})");
        if (ids.Count > 0) tok.SetEos(tok.EosId ?? ids[0], tok.EosIds.Concat(ids).ToList());
    }
}
