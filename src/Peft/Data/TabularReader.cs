using System.Text;
using Parquet;
using Parquet.Schema;

namespace FineTuneNative.Peft.Data;

/// <summary>
/// CSV / TSV (RFC 4180: a header row, fields optionally in double quotes with "" for a quote, newlines allowed
/// inside quotes) and Parquet (flat string columns, read with Parquet.Net) datasets. Columns name the fields:
/// instruction/input/output/system (alpaca), text (raw text), or messages/conversations holding JSON.
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
}
