using System.Text;
using System.Text.Json;

namespace FineTuneNative.Peft.Data;

/// <summary>The records read from one file and the problems found in it.</summary>
public sealed class DatasetReadResult
{
    public List<DatasetRecord> Records { get; } = new();
    public List<DatasetIssue> Issues { get; } = new();
}

/// <summary>
/// Reads instruction datasets: a JSON array of records, or JSON Lines (one record per line). A record is
/// alpaca ({"instruction", "input"?, "output", "system"?}), OpenAI chat ({"messages": [{"role", "content"}]})
/// or ShareGPT ({"conversations": [{"from", "value"}], "system"?}).
/// </summary>
/// <remarks>
/// A malformed record (invalid JSON, a missing field, a field of the wrong type, an unknown role) becomes a
/// <see cref="DatasetIssue"/> naming the file and line (and the record index in a JSON array) and is skipped;
/// reading never throws for bad content. In a JSON array a syntax error ends the file (nothing after it can
/// be located reliably); the records before it are kept. Only a missing or unreadable file throws.
/// </remarks>
public static class DatasetReader
{
    /// <summary>Reads a dataset by its extension: .csv, .tsv, .parquet, .txt (one record per non-blank line),
    /// otherwise JSON / JSON Lines.</summary>
    public static DatasetReadResult Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"dataset '{path}' not found", path);
        string ext = Path.GetExtension(path).ToLowerInvariant();
        return ext switch
        {
            ".csv" => TabularReader.ReadCsv(path, ','),
            ".tsv" => TabularReader.ReadCsv(path, '\t'),
            ".parquet" => TabularReader.ReadParquet(path),
            ".txt" or ".text" => ParseText(File.ReadAllText(path), path),
            _ => Parse(File.ReadAllBytes(path), path),
        };
    }

    /// <summary>Plain text: every non-blank line is one raw-text record (as LLaMA-Factory reads a .txt dataset).</summary>
    public static DatasetReadResult ParseText(string text, string name)
    {
        var result = new DatasetReadResult();
        int line = 0;
        foreach (var l in text.Split('\n'))
        {
            line++;
            string t = l.TrimEnd('\r');
            if (t.Trim().Length > 0) result.Records.Add(DatasetRecord.Raw(t, $"{name}:{line}"));
        }
        if (result.Records.Count == 0) result.Issues.Add(new DatasetIssue($"{name}:1", "the file has no text"));
        return result;
    }

    /// <summary>One record from named string columns (CSV / Parquet rows); issues carry <paramref name="loc"/>.</summary>
    internal static void AddColumns(IReadOnlyDictionary<string, string?> row, string loc, DatasetReadResult result)
    {
        try
        {
            string Get(string k) => row.TryGetValue(k, out var v) ? v ?? "" : "";
            foreach (var key in new[] { "messages", "conversations" })
                if (row.TryGetValue(key, out var json) && json is not null)
                {
                    // a JSON column: {"messages": "[...]"}, as when a chat dataset is saved to CSV / Parquet
                    using var doc = JsonDocument.Parse($"{{\"{key}\": {json}}}");
                    result.Records.Add(ToRecord(doc.RootElement, loc));
                    return;
                }
            if (row.ContainsKey("instruction") || row.ContainsKey("output"))
            {
                if (!row.ContainsKey("instruction") || !row.ContainsKey("output")) throw new RecordError("alpaca rows need both \"instruction\" and \"output\" columns");
                result.Records.Add(new DatasetRecord { Location = loc, Format = RecordFormat.Alpaca, Instruction = Get("instruction"), Input = Get("input"), Output = Get("output"), System = Get("system") });
                return;
            }
            if (row.ContainsKey("text")) { result.Records.Add(DatasetRecord.Raw(Get("text"), loc)); return; }
            throw new RecordError($"expected columns instruction/output, text, messages or conversations; found {string.Join(", ", row.Keys.Select(k => $"\"{k}\""))}");
        }
        catch (RecordError e) { result.Issues.Add(new DatasetIssue(loc, e.Message)); }
        catch (JsonException e) { result.Issues.Add(new DatasetIssue(loc, $"invalid JSON in a messages/conversations column: {FirstSentence(e.Message)}")); }
    }

    /// <summary>Parses dataset bytes; <paramref name="name"/> is used in locations. A name ending in .jsonl/.ndjson is
    /// JSON Lines; otherwise a JSON array when the first non-blank character is '[', a single record when the whole
    /// text is one object, JSON Lines otherwise.</summary>
    public static DatasetReadResult Parse(ReadOnlySpan<byte> bytes, string name)
    {
        if (bytes.StartsWith(Encoding.UTF8.Preamble)) bytes = bytes[3..];
        var result = new DatasetReadResult();
        int first = 0;
        while (first < bytes.Length && IsBlank(bytes[first])) first++;
        if (first == bytes.Length)
        {
            result.Issues.Add(new DatasetIssue($"{name}:1", "the file is empty"));
            return result;
        }
        bool jsonl = name.EndsWith(".jsonl", StringComparison.OrdinalIgnoreCase) || name.EndsWith(".ndjson", StringComparison.OrdinalIgnoreCase);
        if (!jsonl && bytes[first] == (byte)'[') ParseArray(bytes, name, result);
        else if (!jsonl && IsSingleObject(bytes)) AddRecordParsed(bytes, $"{name}:{LineAt(bytes, first)} (record 0)", result);
        else ParseLines(bytes, name, result);
        return result;
    }

    /// <summary>True when the whole text is one JSON object (a .json file holding a single pretty-printed record).</summary>
    private static bool IsSingleObject(ReadOnlySpan<byte> bytes)
    {
        try
        {
            var reader = new Utf8JsonReader(bytes);
            return reader.Read() && reader.TokenType == JsonTokenType.StartObject && reader.TrySkip() && !reader.Read();
        }
        catch (JsonException) { return false; }
    }

    private static int LineAt(ReadOnlySpan<byte> bytes, int offset) => bytes[..offset].Count((byte)'\n') + 1;

    private static void AddRecordParsed(ReadOnlySpan<byte> bytes, string loc, DatasetReadResult result)
    {
        using var doc = JsonDocument.Parse(bytes.ToArray());
        AddRecord(doc.RootElement, loc, result);
    }

    private static bool IsBlank(byte b) => b is (byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n';

    private static void ParseLines(ReadOnlySpan<byte> bytes, string name, DatasetReadResult result)
    {
        int line = 0, start = 0;
        while (start <= bytes.Length)
        {
            line++;
            int nl = bytes[start..].IndexOf((byte)'\n');
            int end = nl < 0 ? bytes.Length : start + nl;
            var text = bytes[start..end];
            if (!text.IsEmpty && text[^1] == (byte)'\r') text = text[..^1];
            string loc = $"{name}:{line}";
            bool blank = true;
            foreach (byte b in text) if (!IsBlank(b)) { blank = false; break; }
            if (!blank)
            {
                try
                {
                    using var doc = JsonDocument.Parse(text.ToArray());
                    AddRecord(doc.RootElement, loc, result);
                }
                catch (JsonException e)
                {
                    result.Issues.Add(new DatasetIssue(loc, $"invalid JSON at column {(e.BytePositionInLine ?? 0) + 1}: {FirstSentence(e.Message)}"));
                }
            }
            if (nl < 0) break;
            start = end + 1;
        }
    }

    private static void ParseArray(ReadOnlySpan<byte> bytes, string name, DatasetReadResult result)
    {
        var lineStarts = new List<int> { 0 };
        for (int i = 0; i < bytes.Length; i++) if (bytes[i] == (byte)'\n') lineStarts.Add(i + 1);
        int LineOf(long offset)
        {
            int idx = lineStarts.BinarySearch((int)offset);
            return (idx >= 0 ? idx : ~idx - 1) + 1;
        }

        var reader = new Utf8JsonReader(bytes, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true });
        int index = 0;
        try
        {
            reader.Read(); // StartArray (checked by the caller)
            while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
            {
                string loc = $"{name}:{LineOf(reader.TokenStartIndex)} (record {index})";
                using (var doc = JsonDocument.ParseValue(ref reader)) AddRecord(doc.RootElement, loc, result);
                index++;
            }
            if (reader.TokenType != JsonTokenType.EndArray)
                result.Issues.Add(new DatasetIssue($"{name}:{lineStarts.Count}", $"the JSON array is not closed (after record {index - 1})"));
        }
        catch (JsonException e)
        {
            result.Issues.Add(new DatasetIssue($"{name}:{(e.LineNumber ?? 0) + 1} (record {index})",
                $"invalid JSON at column {(e.BytePositionInLine ?? 0) + 1}: {FirstSentence(e.Message)}; the rest of the file is skipped"));
        }
    }

    private static string FirstSentence(string message)
    {
        int cut = message.IndexOf(" LineNumber:", StringComparison.Ordinal);
        return (cut > 0 ? message[..cut] : message).TrimEnd();
    }

    private sealed class RecordError(string message) : Exception(message);

    internal static void AddRecord(JsonElement e, string loc, DatasetReadResult result)
    {
        try
        {
            // Stanford Alpaca's seed tasks: {"instruction", "instances": [{"input", "output"}...]}, one record per instance
            if (e.ValueKind == JsonValueKind.Object && e.TryGetProperty("instances", out var inst) && e.TryGetProperty("instruction", out _))
            {
                if (inst.ValueKind != JsonValueKind.Array || inst.GetArrayLength() == 0) throw new RecordError("\"instances\" must be a non-empty array of {\"input\", \"output\"}");
                string instruction = RequiredString(e, "instruction");
                int i = 0;
                foreach (var x in inst.EnumerateArray())
                {
                    if (x.ValueKind != JsonValueKind.Object) throw new RecordError($"instances[{i}] must be an object, found {Kind(x)}");
                    string where = i == 0 ? loc : $"{loc} (instance {i})";
                    result.Records.Add(DatasetRecord.Alpaca(instruction, OptionalString(x, "input"), RequiredString(x, "output"), "", where));
                    i++;
                }
                return;
            }
            result.Records.Add(ToRecord(e, loc));
        }
        catch (RecordError err) { result.Issues.Add(new DatasetIssue(loc, err.Message)); }
    }

    /// <summary>Converts one JSON value to a record; throws <see cref="RecordError"/> with a readable reason.</summary>
    private static DatasetRecord ToRecord(JsonElement e, string loc)
    {
        if (e.ValueKind != JsonValueKind.Object) throw new RecordError($"expected a JSON object, found {Kind(e)}");
        if (e.TryGetProperty("messages", out var messages)) return ChatRecord(messages, "messages", "role", "content", "", loc);
        if (e.TryGetProperty("conversations", out var conv))
        {
            string system = OptionalString(e, "system");
            return ChatRecord(conv, "conversations", "from", "value", system, loc);
        }
        if (e.TryGetProperty("instruction", out _) || e.TryGetProperty("output", out _))
        {
            if (e.TryGetProperty("history", out var h) && h.ValueKind == JsonValueKind.Array && h.GetArrayLength() > 0)
                throw new RecordError("\"history\" (multi-turn alpaca) is not supported; use the messages form");
            return new DatasetRecord
            {
                Location = loc,
                Format = RecordFormat.Alpaca,
                Instruction = RequiredString(e, "instruction"),
                Input = OptionalString(e, "input"),
                Output = RequiredString(e, "output"),
                System = OptionalString(e, "system"),
            };
        }
        if (e.TryGetProperty("text", out var text))
        {
            if (text.ValueKind != JsonValueKind.String) throw new RecordError($"field \"text\" must be a string, found {Kind(text)}");
            return DatasetRecord.Raw(text.GetString()!, loc);
        }
        if (e.TryGetProperty("chosen", out _) || e.TryGetProperty("chosen_messages", out _))
            throw new RecordError("a preference record (chosen/rejected) is for DPO, not supervised fine-tuning");
        throw new RecordError("expected alpaca fields (\"instruction\", \"output\"), \"messages\", \"conversations\" or \"text\"; found " +
            (e.EnumerateObject().Any() ? string.Join(", ", e.EnumerateObject().Select(p => $"\"{p.Name}\"")) : "an empty object"));
    }

    private static DatasetRecord ChatRecord(JsonElement turns, string field, string roleKey, string contentKey, string system, string loc)
    {
        if (turns.ValueKind != JsonValueKind.Array) throw new RecordError($"\"{field}\" must be an array, found {Kind(turns)}");
        var list = new List<ChatMessage>();
        if (system.Length > 0) list.Add(new ChatMessage("system", system));
        int i = 0;
        foreach (var t in turns.EnumerateArray())
        {
            string where = $"{field}[{i}]";
            if (t.ValueKind != JsonValueKind.Object) throw new RecordError($"{where} must be an object, found {Kind(t)}");
            if (!t.TryGetProperty(roleKey, out var r)) throw new RecordError($"{where} has no \"{roleKey}\"");
            if (r.ValueKind != JsonValueKind.String) throw new RecordError($"{where}.{roleKey} must be a string, found {Kind(r)}");
            string role = NormaliseRole(r.GetString()!) ?? throw new RecordError(
                $"{where}.{roleKey} \"{r.GetString()}\" is not a known role (system, user, assistant, tool; human, gpt, function_call, observation)");
            if (!t.TryGetProperty(contentKey, out var c)) throw new RecordError($"{where} has no \"{contentKey}\"");
            bool trained = true;
            if (t.TryGetProperty("loss_weight", out var lw))
            {
                if (lw.ValueKind != JsonValueKind.Number || !lw.TryGetDouble(out double w) || w < 0)
                    throw new RecordError($"{where}.loss_weight must be a number >= 0, found {Kind(lw)}");
                trained = w > 0;
            }
            list.Add(new ChatMessage(role, Content(c, $"{where}.{contentKey}")) { Trained = trained });
            i++;
        }
        if (!list.Any(m => m.Role == "assistant")) throw new RecordError($"\"{field}\" has no assistant turn to train on");
        return new DatasetRecord { Location = loc, Format = RecordFormat.Chat, Messages = list };
    }

    /// <summary>A string, or an array of content parts {"type": "text"|"reasoning"|"tool_call", "text"|"value": "..."} joined
    /// (reasoning as "&lt;think&gt;\n…\n&lt;/think&gt;\n\n", tool calls as "&lt;tool_call&gt;\n{json}\n&lt;/tool_call&gt;").</summary>
    private static string Content(JsonElement c, string where)
    {
        if (c.ValueKind == JsonValueKind.String) return c.GetString()!;
        if (c.ValueKind != JsonValueKind.Array) throw new RecordError($"{where} must be a string or an array of text parts, found {Kind(c)}");
        var sb = new StringBuilder();
        int i = 0;
        foreach (var part in c.EnumerateArray())
        {
            if (part.ValueKind != JsonValueKind.Object) throw new RecordError($"{where}[{i}] must be an object, found {Kind(part)}");
            string type = part.TryGetProperty("type", out var ty) && ty.ValueKind == JsonValueKind.String ? ty.GetString()! : "text";
            if (type is not ("text" or "reasoning" or "tool_call"))
                throw new RecordError($"{where}[{i}] has type \"{type}\"; only text, reasoning and tool_call parts are supported");
            JsonElement v = part.TryGetProperty("text", out var tx) ? tx : part.TryGetProperty("value", out var va) ? va : default;
            if (v.ValueKind != JsonValueKind.String) throw new RecordError($"{where}[{i}] needs a string \"text\" (or \"value\")");
            // reasoning and tool calls become text in the Qwen / Hermes conventions most chat templates expect
            if (type == "reasoning") sb.Append("<think>\n").Append(v.GetString()).Append("\n</think>\n\n");
            else if (type == "tool_call") sb.Append(sb.Length > 0 ? "\n" : "").Append("<tool_call>\n").Append(v.GetString()).Append("\n</tool_call>");
            else sb.Append(v.GetString());
            i++;
        }
        return sb.ToString();
    }

    private static string? NormaliseRole(string role) => role.ToLowerInvariant() switch
    {
        "system" => "system",
        "user" or "human" => "user",
        "assistant" or "gpt" or "function_call" or "model" => "assistant",
        "tool" or "observation" or "function" => "tool",
        _ => null,
    };

    private static string RequiredString(JsonElement e, string key)
    {
        if (!e.TryGetProperty(key, out var v)) throw new RecordError($"missing field \"{key}\"");
        if (v.ValueKind != JsonValueKind.String) throw new RecordError($"field \"{key}\" must be a string, found {Kind(v)}");
        return v.GetString()!;
    }

    private static string OptionalString(JsonElement e, string key)
    {
        if (!e.TryGetProperty(key, out var v) || v.ValueKind == JsonValueKind.Null) return "";
        if (v.ValueKind != JsonValueKind.String) throw new RecordError($"field \"{key}\" must be a string, found {Kind(v)}");
        return v.GetString()!;
    }

    private static string Kind(JsonElement e) => e.ValueKind switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => e.ValueKind.ToString(),
    };
}
