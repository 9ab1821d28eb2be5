using System.Buffers;
using System.Collections;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Parquet;
using Parquet.Schema;
using Parquet.Serialization;

namespace FineTuneNative.Peft.Data;

/// <summary>
/// CSV / TSV (RFC 4180: a header row, fields optionally in double quotes with "" for a quote, newlines allowed
/// inside quotes) and Parquet (read with Parquet.Net) datasets. Columns name the fields: instruction/input/output/system
/// (alpaca), text (raw text), or messages/conversations holding JSON text. Parquet files with nested columns (the
/// Hugging Face layout of chat data: messages as list&lt;struct&lt;role, content&gt;&gt;, conversations as
/// list&lt;struct&lt;from, value&gt;&gt;) have each row read as the JSON record it stands for.
/// </summary>
public static class TabularReader
{
    public static DatasetReadResult ReadCsv(string path, char separator) => ParseCsv(File.ReadAllText(path), path, separator);

    /// <summary>Parses CSV text; a row with the wrong number of fields or an unclosed quote is an issue naming its line.</summary>
    public static DatasetReadResult ParseCsv(string text, string name, char separator = ',')
    {
        var result = new DatasetReadResult();
        if (text.Length > 0 && text[0] == '\uFEFF') text = text[1..];
        string[]? header = null;
        int line = 1;
        int i = 0;
        while (i < text.Length)
        {
            int startLine = line;
            var fields = new List<string>();
            var field = new StringBuilder();
            bool quoted = false, inQuotes = false, endOfRow = false, error = false;
            while (i < text.Length && !endOfRow)
            {
                char c = text[i];
                if (inQuotes)
                {
                    if (c == '"')
                    {
                        if (i + 1 < text.Length && text[i + 1] == '"') { field.Append('"'); i += 2; continue; }
                        inQuotes = false;
                        i++;
                        continue;
                    }
                    if (c == '\n') line++;
                    field.Append(c);
                    i++;
                    continue;
                }
                if (c == '"' && field.Length == 0 && !quoted) { quoted = inQuotes = true; i++; continue; }
                if (c == separator) { fields.Add(field.ToString()); field.Clear(); quoted = false; i++; continue; }
                if (c == '\r' && i + 1 < text.Length && text[i + 1] == '\n') { i++; continue; }
                if (c == '\n') { endOfRow = true; line++; i++; continue; }
                if (quoted) { error = true; }
                field.Append(c);
                i++;
            }
            fields.Add(field.ToString());
            string loc = $"{name}:{startLine}";
            if (inQuotes) { result.Issues.Add(new DatasetIssue(loc, "a quoted field is not closed before the end of the file")); break; }
            if (fields.Count == 1 && fields[0].Length == 0) continue; // blank line
            if (error) { result.Issues.Add(new DatasetIssue(loc, "text after a closing quote (a quote inside a field must be doubled)")); continue; }
            if (header is null)
            {
                header = fields.Select(f => f.Trim()).ToArray();
                if (header.Distinct().Count() != header.Length) { result.Issues.Add(new DatasetIssue(loc, "the header repeats a column name")); return result; }
                continue;
            }
            if (fields.Count != header.Length)
            {
                result.Issues.Add(new DatasetIssue(loc, $"{fields.Count} fields, the header has {header.Length}"));
                continue;
            }
            var row = new Dictionary<string, string?>();
            for (int k = 0; k < header.Length; k++) row[header[k]] = fields[k];
            DatasetReader.AddColumns(row, loc, result);
        }
        if (header is null) result.Issues.Add(new DatasetIssue($"{name}:1", "the file is empty (no header row)"));
        return result;
    }

    /// <summary>Reads the string columns of every row group; a row's location is "file: row N" (0-based over the file).</summary>
    public static DatasetReadResult ReadParquet(string path)
    {
        var result = new DatasetReadResult();
        try { ReadParquetAsync(path, result).GetAwaiter().GetResult(); }
        catch (Exception e) when (e is IOException or InvalidDataException or NotSupportedException or ArgumentException or InvalidOperationException
                                      || e.GetType().Namespace?.StartsWith("Parquet", StringComparison.Ordinal) == true)
        {
            result.Issues.Add(new DatasetIssue(path, $"not a readable Parquet file: {e.Message}"));
        }
        return result;
    }

    private static async Task ReadParquetAsync(string path, DatasetReadResult result)
    {
        using var stream = File.OpenRead(path);
        ParquetSchema schema;
        await using (var probe = await ParquetReader.CreateAsync(stream, leaveStreamOpen: true)) schema = probe.Schema;
        if (schema.Fields.Any(f => f.SchemaType != SchemaType.Data || ((DataField)f).IsArray))
        {
            stream.Position = 0;
            await ReadNestedParquetAsync(stream, path, schema, result);
            return;
        }
        stream.Position = 0;
        await using var reader = await ParquetReader.CreateAsync(stream);
        var fields = reader.Schema.GetDataFields();
        var strings = fields.Where(f => (f.ClrType == typeof(string) || f.ClrType == typeof(ReadOnlyMemory<char>)) && !f.IsArray && f.Path.Length == 1).ToArray();
        var skipped = fields.Except(strings).Select(f => f.Path.ToString()).ToArray();
        if (strings.Length == 0)
        {
            result.Issues.Add(new DatasetIssue(path, $"no flat string column (columns: {string.Join(", ", fields.Select(f => $"{f.Path} {f.ClrType.Name}{(f.IsArray ? "[]" : "")}"))})"));
            return;
        }
        long row0 = 0;
        for (int g = 0; g < reader.RowGroupCount; g++)
        {
            using var rg = reader.OpenRowGroupReader(g);
            int n = checked((int)rg.RowCount);
            var cols = new Dictionary<string, string?[]>();
            foreach (var f in strings)
            {
                var data = new string?[n];
                await rg.ReadAsync(f, data.AsMemory(), null);
                cols[f.Name] = data;
            }
            for (int r = 0; r < n; r++)
            {
                var row = new Dictionary<string, string?>();
                foreach (var (k, v) in cols) row[k] = v[r];
                DatasetReader.AddColumns(row, $"{path}: row {row0 + r}", result);
            }
            row0 += n;
        }
        if (skipped.Length > 0 && result.Records.Count == 0)
            result.Issues.Add(new DatasetIssue(path, $"non-string columns were not read: {string.Join(", ", skipped)}"));
    }

    /// <summary>
    /// A file with list/struct/map columns: every row becomes the JSON object of its columns (lists as arrays, structs
    /// as objects, strings, numbers, booleans, null; a column holding JSON text stays a string unless it is
    /// messages/conversations) and is read as a JSON record: {"messages": [{"role", "content"}...], ...},
    /// {"conversations": [{"from", "value"}...], "system": ...}, alpaca fields or text.
    /// </summary>
    private static async Task ReadNestedParquetAsync(Stream stream, string path, ParquetSchema schema, DatasetReadResult result)
    {
        var data = await ParquetSerializer.DeserializeUntypedAsync(stream);
        for (int r = 0; r < data.Data.Count; r++)
        {
            string loc = $"{path}: row {r}";
            var buffer = new ArrayBufferWriter<byte>();
            using (var w = new Utf8JsonWriter(buffer))
            {
                w.WriteStartObject();
                foreach (var f in schema.Fields)
                {
                    data.Data[r].TryGetValue(f.Name, out var v);
                    w.WritePropertyName(f.Name);
                    // a flat string column named messages/conversations holds the JSON text of the turns (as in CSV)
                    if (f.Name is "messages" or "conversations" && v is string json && IsJson(json)) w.WriteRawValue(json);
                    else WriteJson(w, v);
                }
                w.WriteEndObject();
            }
            using var doc = JsonDocument.Parse(buffer.WrittenMemory);
            DatasetReader.AddRecord(doc.RootElement, loc, result);
        }
    }

    private static bool IsJson(string s)
    {
        try { using var _ = JsonDocument.Parse(s); return true; }
        catch (JsonException) { return false; }
    }

    /// <summary>A deserialized Parquet value as JSON (Parquet.Net's untyped form: dictionaries for structs and maps, lists for lists).</summary>
    private static void WriteJson(Utf8JsonWriter w, object? v)
    {
        switch (v)
        {
            case null: w.WriteNullValue(); break;
            case string s: w.WriteStringValue(s); break;
            case bool b: w.WriteBooleanValue(b); break;
            case byte or sbyte or short or ushort or int or uint or long: w.WriteNumberValue(Convert.ToInt64(v, CultureInfo.InvariantCulture)); break;
            case ulong u: w.WriteNumberValue(u); break;
            case float f: w.WriteNumberValue(f); break;
            case double d: w.WriteNumberValue(d); break;
            case decimal m: w.WriteNumberValue(m); break;
            case byte[] bytes: w.WriteStringValue(Encoding.UTF8.GetString(bytes)); break;
            case DateTime t: w.WriteStringValue(t.ToString("o", CultureInfo.InvariantCulture)); break;
            case IDictionary<string, object?> d:
                w.WriteStartObject();
                foreach (var (k, x) in d) { w.WritePropertyName(k); WriteJson(w, x); }
                w.WriteEndObject();
                break;
            case IDictionary d:
                w.WriteStartObject();
                foreach (DictionaryEntry e in d) { w.WritePropertyName(Convert.ToString(e.Key, CultureInfo.InvariantCulture) ?? ""); WriteJson(w, e.Value); }
                w.WriteEndObject();
                break;
            case IEnumerable list:
                w.WriteStartArray();
                foreach (var x in list) WriteJson(w, x);
                w.WriteEndArray();
                break;
            default: w.WriteStringValue(Convert.ToString(v, CultureInfo.InvariantCulture)); break;
        }
    }
}
