namespace FineTuneNative.Peft.Data;

/// <summary>What packing did: how many rows it made and how full they are.</summary>
public sealed record PackingStats(int Samples, int Rows, long Tokens, int RowLength)
{
    /// <summary>Share of the Rows·RowLength slots holding a real token.</summary>
    public double Fill => Rows == 0 ? 0 : (double)Tokens / ((long)Rows * RowLength);
    public override string ToString() => $"packed {Samples} samples into {Rows} rows of {RowLength} tokens ({Fill:P1} full)";
}

/// <summary>
/// Packs short samples into rows of at most <c>rowLength</c> tokens without attention across them: each packed
/// row is a <see cref="TokenizedSample"/> whose <see cref="TokenizedSample.Positions"/> restart at 0 for every
/// sample it holds, and the model runs one causal attention per such segment (block-diagonal attention).
/// A sample's targets never point into its neighbour (they were shifted inside the sample by the encoder), so a
/// packed row's summed loss equals the sum of its samples' losses.
/// </summary>
/// <remarks>
/// First-fit decreasing: samples sorted by length (longest first, ties by input order, so the result is
/// deterministic), each put into the first row with room. Within a row, samples keep that order.
/// </remarks>
public static class Packing
{
    public static List<TokenizedSample> Pack(IReadOnlyList<TokenizedSample> samples, int rowLength, out PackingStats stats)
    {
        if (rowLength < 1) throw new ArgumentOutOfRangeException(nameof(rowLength), $"row length must be >= 1 (got {rowLength})");
        var order = Enumerable.Range(0, samples.Count).OrderByDescending(i => samples[i].Length).ThenBy(i => i).ToArray();
        var rows = new List<List<TokenizedSample>>();
        var room = new List<int>();
        foreach (int i in order)
        {
            var s = samples[i];
            if (s.Length > rowLength) throw new ArgumentException($"{s.Location}: sample of {s.Length} tokens does not fit a packed row of {rowLength}");
            if (s.Positions is not null) throw new ArgumentException($"{s.Location}: the sample is already packed");
            int r = room.FindIndex(x => x >= s.Length);
            if (r < 0) { rows.Add(new List<TokenizedSample>()); room.Add(rowLength); r = rows.Count - 1; }
            rows[r].Add(s);
            room[r] -= s.Length;
        }
        var result = new List<TokenizedSample>(rows.Count);
        long tokens = 0;
        foreach (var row in rows)
        {
            int n = row.Sum(s => s.Length);
            var tok = new int[n];
            var tgt = new int[n];
            var pos = new int[n];
            int o = 0;
            foreach (var s in row)
            {
                s.Tokens.CopyTo(tok, o);
                s.Targets.CopyTo(tgt, o);
                for (int t = 0; t < s.Length; t++) pos[o + t] = t;
                o += s.Length;
            }
            tokens += n;
            string loc = row.Count == 1 ? row[0].Location : $"{row[0].Location} (+{row.Count - 1} packed)";
            result.Add(new TokenizedSample(loc, tok, tgt) { Positions = pos });
        }
        stats = new PackingStats(samples.Count, result.Count, tokens, rowLength);
        return result;
    }
}
