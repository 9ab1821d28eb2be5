using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Peft.Data;

/// <summary>How datasets are read, cleaned, mixed, split, augmented, templated and packed for a run.</summary>
public sealed class DataOptions
{
    /// <summary>"auto" (the model's tokenizer_config.json chat_template, else the built-in format), "none", a built-in
    /// name (<see cref="ChatTemplate.BuiltinNames"/>), a .jinja file or a tokenizer_config.json.</summary>
    public string ChatTemplate { get; init; } = "auto";
    /// <summary>Relative weight of each dataset file in the mixture (empty = every record once).</summary>
    public IReadOnlyList<double> DatasetWeights { get; init; } = Array.Empty<double>();
    /// <summary>Pack short training samples into full rows (block-diagonal attention, positions restarting).</summary>
    public bool Pack { get; init; }
    /// <summary>NEFTune α (0 = off), applied to the model by the job.</summary>
    public float NeftuneAlpha { get; init; }
    /// <summary>Collapse runs of spaces/tabs, strip line ends, at most one blank line, trim, Unicode NFC.</summary>
    public bool NormalizeWhitespace { get; init; }
    /// <summary>Drop records with an empty response (or empty text).</summary>
    public bool DropEmpty { get; init; } = true;
    /// <summary>Drop exact duplicates (after whitespace normalisation when on); the first one is kept.</summary>
    public bool Dedupe { get; init; } = true;
    /// <summary>Share of the records held out as a test split (reported, never trained or evaluated on during training).</summary>
    public double TestFraction { get; init; }
    /// <summary>Text augmentation: per-word probability of a synonym substitution and of a noise-word insertion (training split, prompt text only).</summary>
    public double AugmentRatio { get; init; }
    /// <summary>Synonym table: one line per group of interchangeable words, comma- or tab-separated.</summary>
    public string? SynonymsPath { get; init; }
    /// <summary>Words inserted as noise; empty = words drawn from the training prompts themselves.</summary>
    public IReadOnlyList<string> NoiseWords { get; init; } = Array.Empty<string>();
    public ulong AugmentSeed { get; init; } = 1234;

    public void Validate()
    {
        if (DatasetWeights.Any(w => !(w >= 0) || double.IsInfinity(w))) throw new ArgumentException($"dataset weights must be finite and >= 0 (got {string.Join(", ", DatasetWeights)})");
        if (DatasetWeights.Count > 0 && DatasetWeights.Sum() <= 0) throw new ArgumentException("at least one dataset weight must be > 0");
        if (!(TestFraction >= 0 && TestFraction < 1)) throw new ArgumentException($"test fraction must be in [0, 1) (got {TestFraction})");
        if (!(AugmentRatio >= 0 && AugmentRatio <= 1)) throw new ArgumentException($"augmentation ratio must be in [0, 1] (got {AugmentRatio})");
        if (!(NeftuneAlpha >= 0 && float.IsFinite(NeftuneAlpha))) throw new ArgumentException($"NEFTune alpha must be >= 0 (got {NeftuneAlpha})");
        if (SynonymsPath is not null && AugmentRatio == 0) throw new ArgumentException("a synonym table needs an augmentation ratio > 0");
    }
}

/// <summary>Token-length statistics of a split.</summary>
public sealed record LengthStats(int Count, int Min, double Mean, int Median, int P95, int Max, long Targets)
{
    public static LengthStats Of(IReadOnlyList<TokenizedSample> samples)
    {
        if (samples.Count == 0) return new LengthStats(0, 0, 0, 0, 0, 0, 0);
        var l = samples.Select(s => s.Length).OrderBy(x => x).ToArray();
        return new LengthStats(l.Length, l[0], l.Average(), l[(l.Length - 1) / 2], l[Math.Min(l.Length - 1, (int)Math.Ceiling(0.95 * l.Length) - 1)], l[^1],
            samples.Sum(s => (long)s.TargetCount));
    }

    public override string ToString() => Count == 0 ? "no samples" : string.Create(CultureInfo.InvariantCulture,
        $"{Count} samples, tokens min {Min} / mean {Mean:0.0} / median {Median} / p95 {P95} / max {Max}, {Targets} target tokens");
}

/// <summary>Everything <see cref="DataPipeline.Prepare"/> produced.</summary>
public sealed class PreparedDataset
{
    public required List<TokenizedSample> Train { get; init; }
    public required List<TokenizedSample> Eval { get; init; }
    public required List<TokenizedSample> Test { get; init; }
    /// <summary>Malformed, empty, duplicate, untrainable records, each with file:line.</summary>
    public required List<DatasetIssue> Issues { get; init; }
    public required int PadId { get; init; }
    public int RecordsRead { get; init; }
    public ChatTemplate? Template { get; init; }
    /// <summary>Readable lines: mixture, cleaning, lengths, truncation, EOS check, packing.</summary>
    public required List<string> Report { get; init; }
}

/// <summary>
/// Read → clean (whitespace, empty, duplicates) → mix by weights → cap → split train/eval/test (seeded, on records,
/// so augmentation never leaks) → augment the training prompts → encode with the chat template → length and
/// truncation report → EOS pre-flight → pack. Malformed input becomes issues with file:line; nothing throws for bad
/// records. Throws for what makes the run meaningless (no EOS in any target, bad options).
/// </summary>
public static class DataPipeline
{
    public static PreparedDataset Prepare(IReadOnlyList<string> paths, ITextTokenizer tokenizer, DataOptions o, int maxLength, bool trainOnPrompt,
        double evalFraction, ulong seed, int maxRecords = 0, string? modelPath = null)
    {
        o.Validate();
        if (o.DatasetWeights.Count > 0 && o.DatasetWeights.Count != paths.Count)
            throw new ArgumentException($"{o.DatasetWeights.Count} dataset weights for {paths.Count} datasets");
        if (evalFraction + o.TestFraction >= 1) throw new ArgumentException($"eval ({evalFraction}) + test ({o.TestFraction}) fractions must leave training data");
        var issues = new List<DatasetIssue>();
        var report = new List<string>();
        var perFile = new List<List<DatasetRecord>>();
        int read = 0;
        var seen = new Dictionary<string, string>();
        int empty = 0, dup = 0;
        foreach (var p in paths)
        {
            var r = DatasetReader.Read(p);
            issues.AddRange(r.Issues);
            read += r.Records.Count;
            var kept = new List<DatasetRecord>();
            foreach (var rec0 in r.Records)
            {
                var rec = o.NormalizeWhitespace ? Cleaning.Normalize(rec0) : rec0;
                if (o.DropEmpty && Cleaning.IsEmpty(rec)) { empty++; issues.Add(new DatasetIssue(rec.Location, "empty response or text; dropped")); continue; }
                if (o.Dedupe)
                {
                    string key = Cleaning.Key(rec);
                    if (seen.TryGetValue(key, out var first)) { dup++; issues.Add(new DatasetIssue(rec.Location, $"duplicate of {first}; dropped")); continue; }
                    seen[key] = rec.Location;
                }
                kept.Add(rec);
            }
            perFile.Add(kept);
        }
        report.Add($"read {read} records from {paths.Count} file(s); dropped {empty} empty, {dup} duplicate" + (o.NormalizeWhitespace ? " (whitespace normalised)" : ""));

        var records = Mix(perFile, o.DatasetWeights, seed, paths, report);
        if (maxRecords > 0 && records.Count > maxRecords) records = records.Take(maxRecords).ToList();
        var (train, eval, test) = Split3(records, evalFraction, o.TestFraction, seed);

        if (o.AugmentRatio > 0)
        {
            var aug = new TextAugmenter(o.SynonymsPath is null ? new Dictionary<string, string[]>() : TextAugmenter.ReadSynonyms(o.SynonymsPath),
                o.NoiseWords.Count > 0 ? o.NoiseWords.ToArray() : TextAugmenter.VocabularyOf(train), o.AugmentRatio, o.AugmentSeed);
            train = train.Select(aug.Augment).ToList();
            report.Add($"augmentation: {aug.Substitutions} synonym substitutions, {aug.Insertions} noise insertions (ratio {o.AugmentRatio}, seed {o.AugmentSeed})");
        }

        var template = ChatTemplate.Resolve(o.ChatTemplate, modelPath, tokenizer);
        report.Add(template is null ? "prompt format: built-in (### Instruction / ### Role)" : $"chat template: {template.Source}");
        var encoder = new SampleEncoder(tokenizer, new EncodeOptions { MaxLength = maxLength, TrainOnPrompt = trainOnPrompt, Template = template });
        var trainS = encoder.EncodeAll(train, issues);
        var evalS = encoder.EncodeAll(eval, issues);
        var testS = encoder.EncodeAll(test, issues);
        report.Add($"train: {LengthStats.Of(trainS)}");
        report.Add($"eval: {LengthStats.Of(evalS)}");
        if (test.Count > 0) report.Add($"test: {LengthStats.Of(testS)}");
        report.Add($"truncated to {maxLength} tokens: {encoder.Truncated} sample(s)");
        if (trainS.Count > 0) report.Add(SampleEncoder.CheckEosInTargets(trainS, tokenizer));
        if (o.Pack && trainS.Count > 0)
        {
            trainS = Packing.Pack(trainS, maxLength, out var stats);
            report.Add(stats.ToString());
        }
        return new PreparedDataset
        {
            Train = trainS, Eval = evalS, Test = testS, Issues = issues, PadId = encoder.PadId, RecordsRead = read, Template = template, Report = report,
        };
    }

    /// <summary>
    /// The mixture: with weights w, dataset i contributes round(N·wᵢ/Σw) records (N = all kept records), drawn
    /// from a seeded shuffle of it and repeated when the share exceeds its size (oversampling); without weights,
    /// every record once in file order.
    /// </summary>
    public static List<DatasetRecord> Mix(IReadOnlyList<List<DatasetRecord>> perFile, IReadOnlyList<double> weights, ulong seed, IReadOnlyList<string> names, List<string>? report = null)
    {
        if (weights.Count == 0) return perFile.SelectMany(x => x).ToList();
        int n = perFile.Sum(f => f.Count);
        double total = weights.Sum();
        var result = new List<DatasetRecord>();
        for (int i = 0; i < perFile.Count; i++)
        {
            int want = (int)Math.Round(n * weights[i] / total, MidpointRounding.AwayFromZero);
            var f = perFile[i];
            if (f.Count == 0)
            {
                if (want > 0) throw new ArgumentException($"{names[i]}: weight {weights[i]} but no usable record");
                continue;
            }
            var order = Batching.Permutation(f.Count, seed ^ (0x9E3779B97F4A7C15UL * (ulong)(i + 1)));
            for (int k = 0; k < want; k++) result.Add(f[order[k % f.Count]]);
            report?.Add(string.Create(CultureInfo.InvariantCulture, $"mixture: {names[i]} weight {weights[i]} -> {want} records of {f.Count}{(want > f.Count ? " (oversampled)" : "")}"));
        }
        var shuffle = Batching.Permutation(result.Count, seed ^ 0xD1B54A32D192ED03UL);
        return shuffle.Select(k => result[k]).ToList();
    }

    /// <summary>Seeded split into train / eval / test: eval and test counts are round(n·fraction), at least 1 each when
    /// its fraction is &gt; 0 and there are enough records, always leaving one for training.</summary>
    public static (List<T> Train, List<T> Eval, List<T> Test) Split3<T>(IReadOnlyList<T> items, double evalFraction, double testFraction, ulong seed)
    {
        if (evalFraction < 0 || testFraction < 0 || evalFraction + testFraction >= 1)
            throw new ArgumentOutOfRangeException(nameof(evalFraction), $"eval ({evalFraction}) and test ({testFraction}) fractions must be >= 0 and sum below 1");
        var order = Batching.Permutation(items.Count, seed);
        int Count(double f)
        {
            int c = (int)Math.Round(items.Count * f, MidpointRounding.AwayFromZero);
            return f > 0 && items.Count >= 2 ? Math.Max(c, 1) : c;
        }
        int nEval = Count(evalFraction), nTest = Count(testFraction);
        while (nEval + nTest > items.Count - 1 && (nEval > 0 || nTest > 0)) { if (nTest >= nEval && nTest > 0) nTest--; else nEval--; }
        var eval = order.Take(nEval).Select(i => items[i]).ToList();
        var test = order.Skip(nEval).Take(nTest).Select(i => items[i]).ToList();
        var train = order.Skip(nEval + nTest).Select(i => items[i]).ToList();
        return (train, eval, test);
    }
}

/// <summary>Record cleaning: whitespace normalisation, emptiness, a duplicate key.</summary>
public static class Cleaning
{
    private static readonly Regex Spaces = new("[ \\t\\u00A0]+", RegexOptions.Compiled);
    private static readonly Regex BlankLines = new("\\n{3,}", RegexOptions.Compiled);

    /// <summary>NFC; CRLF → LF; runs of spaces/tabs → one space; spaces at line ends removed; at most one blank line; trimmed.</summary>
    public static string NormalizeText(string s)
    {
        s = s.Normalize(NormalizationForm.FormC).Replace("\r\n", "\n").Replace('\r', '\n');
        s = Spaces.Replace(s, " ");
        s = string.Join('\n', s.Split('\n').Select(l => l.Trim(' ')));
        s = BlankLines.Replace(s, "\n\n");
        return s.Trim();
    }

    public static DatasetRecord Normalize(DatasetRecord r) => r.Format switch
    {
        RecordFormat.Alpaca => new DatasetRecord
        {
            Location = r.Location, Format = r.Format, Instruction = NormalizeText(r.Instruction), Input = NormalizeText(r.Input),
            Output = NormalizeText(r.Output), System = NormalizeText(r.System),
        },
        RecordFormat.Chat => DatasetRecord.Chat(r.Messages.Select(m => m with { Content = NormalizeText(m.Content) }).ToList(), r.Location),
        _ => DatasetRecord.Raw(NormalizeText(r.Text), r.Location),
    };

    /// <summary>True when there is nothing to learn: an empty output, an empty assistant turn, or empty text.</summary>
    public static bool IsEmpty(DatasetRecord r) => r.Format switch
    {
        RecordFormat.Alpaca => r.Output.Trim().Length == 0 || (r.Instruction.Trim().Length == 0 && r.Input.Trim().Length == 0),
        RecordFormat.Chat => r.Messages.Where(m => m.Role == "assistant").All(m => m.Content.Trim().Length == 0),
        _ => r.Text.Trim().Length == 0,
    };

    /// <summary>The content that makes two records the same example (format, every field, every turn).</summary>
    public static string Key(DatasetRecord r) => r.Format switch
    {
        RecordFormat.Alpaca => string.Join('\u0001', "a", r.System, r.Instruction, r.Input, r.Output),
        RecordFormat.Chat => "c\u0001" + string.Join('\u0001', r.Messages.Select(m => m.Role + "\u0002" + m.Content)),
        _ => "t\u0001" + r.Text,
    };
}

/// <summary>
/// Text augmentation of training prompts (never of responses: the model must not learn to write noise): each word
/// is, with probability ratio, replaced by a random other member of its synonym group, and, independently with
/// probability ratio, followed by a random noise word. Deterministic per (seed, record location).
/// </summary>
public sealed class TextAugmenter(IReadOnlyDictionary<string, string[]> synonyms, string[] noiseWords, double ratio, ulong seed)
{
    public int Substitutions { get; private set; }
    public int Insertions { get; private set; }

    /// <summary>Reads a synonym table: each non-blank, non-# line a group of words separated by commas or tabs.
    /// A malformed line (fewer than two words) is an error naming the file and line.</summary>
    public static Dictionary<string, string[]> ReadSynonyms(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"synonym table '{path}' not found", path);
        var map = new Dictionary<string, string[]>(StringComparer.OrdinalIgnoreCase);
        int line = 0;
        foreach (var raw in File.ReadLines(path))
        {
            line++;
            var l = raw.Trim();
            if (l.Length == 0 || l.StartsWith('#')) continue;
            var group = l.Split(new[] { ',', '\t' }, StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            if (group.Length < 2) throw new InvalidDataException($"{path}:{line}: a synonym group needs at least two words separated by commas or tabs");
            foreach (var w in group) map[w] = group;
        }
        return map;
    }

    /// <summary>The distinct words of the training prompts (the default noise vocabulary), in first-seen order.</summary>
    public static string[] VocabularyOf(IEnumerable<DatasetRecord> records)
    {
        var seen = new HashSet<string>();
        var list = new List<string>();
        foreach (var r in records)
            foreach (var text in PromptTexts(r))
                foreach (var w in text.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries))
                    if (seen.Add(w)) list.Add(w);
        return list.ToArray();
    }

    private static IEnumerable<string> PromptTexts(DatasetRecord r) => r.Format switch
    {
        RecordFormat.Alpaca => new[] { r.Instruction, r.Input },
        RecordFormat.Chat => r.Messages.Where(m => m.Role == "user").Select(m => m.Content),
        _ => new[] { r.Text },
    };

    public DatasetRecord Augment(DatasetRecord r)
    {
        ulong state = seed ^ StableHash(r.Location);
        string A(string s) => AugmentText(s, ref state);
        return r.Format switch
        {
            RecordFormat.Alpaca => new DatasetRecord { Location = r.Location, Format = r.Format, Instruction = A(r.Instruction), Input = A(r.Input), Output = r.Output, System = r.System },
            RecordFormat.Chat => DatasetRecord.Chat(r.Messages.Select(m => m.Role == "user" ? m with { Content = A(m.Content) } : m).ToList(), r.Location),
            _ => DatasetRecord.Raw(A(r.Text), r.Location),
        };
    }

    /// <summary>Augments the words of <paramref name="s"/> (split on spaces; the spacing between words is kept).</summary>
    public string AugmentText(string s, ref ulong state)
    {
        if (s.Length == 0) return s;
        var sb = new StringBuilder(s.Length + 16);
        int i = 0;
        while (i < s.Length)
        {
            if (s[i] == ' ' || s[i] == '\n' || s[i] == '\t') { sb.Append(s[i++]); continue; }
            int j = i;
            while (j < s.Length && s[j] is not (' ' or '\n' or '\t')) j++;
            string word = s[i..j];
            // the word without trailing punctuation is what the table is looked up with
            int core = word.Length;
            while (core > 0 && char.IsPunctuation(word[core - 1])) core--;
            string stem = word[..core], tail = word[core..];
            if (stem.Length > 0 && synonyms.TryGetValue(stem, out var group) && Uniform(ref state) < ratio)
            {
                var others = group.Where(g => !g.Equals(stem, StringComparison.OrdinalIgnoreCase)).ToArray();
                if (others.Length > 0)
                {
                    string pick = others[(int)(Next(ref state) % (ulong)others.Length)];
                    stem = char.IsUpper(stem[0]) && pick.Length > 0 ? char.ToUpperInvariant(pick[0]) + pick[1..] : pick;
                    Substitutions++;
                }
            }
            sb.Append(stem).Append(tail);
            if (noiseWords.Length > 0 && Uniform(ref state) < ratio)
            {
                sb.Append(' ').Append(noiseWords[(int)(Next(ref state) % (ulong)noiseWords.Length)]);
                Insertions++;
            }
            i = j;
        }
        return sb.ToString();
    }

    private static ulong Next(ref ulong state) => Batching.SplitMix64(ref state);
    private static double Uniform(ref ulong state) => (Next(ref state) >> 11) * (1.0 / (1UL << 53));

    /// <summary>FNV-1a over UTF-16 code units: the same on every run and platform (string.GetHashCode is randomised).</summary>
    private static ulong StableHash(string s)
    {
        ulong h = 0xCBF29CE484222325UL;
        foreach (char c in s) { h ^= c; h *= 0x100000001B3UL; }
        return h;
    }
}
