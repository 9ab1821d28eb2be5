using System.Text;
using System.Text.Json;

namespace FineTuneNative.Peft.Data;

/// <summary>One generated instruction example in alpaca form.</summary>
/// <param name="Task">The task family ("reverse", "sort", ...).</param>
public sealed record SyntheticExample(string Task, string Instruction, string Input, string Output);

/// <summary>
/// A deterministic generator of small word- and digit-level instruction tasks. It is the pretraining corpus of the
/// embedded model (models/ftn-tiny) and the source of the sample fine-tuning dataset (data/).
/// </summary>
/// <remarks>
/// Every example depends only on (seed, index): example i is drawn from its own SplitMix64 stream seeded by
/// Mix(seed, i), so a corpus is reproducible on any machine and any .NET version (System.Random's sequence is
/// not part of .NET's contract), and two corpora with different seeds are independent.
///
/// The tasks work on whole words from a fixed list of short English nouns and colours, never on letters
/// inside a word: a small BPE vocabulary turns each word into one or two tokens, and a model of about a
/// million parameters learns token-level copying, reordering and counting in a few minutes of CPU training,
/// while letter-level tasks (spelling, counting letters) would need it to learn each token's spelling first.
///
/// <see cref="PretrainTasks"/> are what the base model is trained on. <see cref="HeldOutTasks"/> never appear
/// in pretraining: the LoRA demo fine-tunes on one of them, so its exact match starts near zero and rises.
/// </remarks>
public static class SyntheticTasks
{
    /// <summary>The word list (64 short lowercase words).</summary>
    public static readonly string[] Words =
    {
        "cat", "dog", "sun", "moon", "star", "tree", "fish", "bird", "book", "lamp",
        "door", "road", "milk", "rain", "snow", "wind", "fire", "rock", "sand", "ship",
        "cake", "bell", "coat", "ring", "rose", "leaf", "frog", "bear", "wolf", "lion",
        "goat", "duck", "king", "hill", "lake", "corn", "salt", "gold", "iron", "wood",
        "red", "blue", "green", "pink", "gray", "black", "white", "brown",
        "apple", "bread", "chair", "clock", "cloud", "horse", "house", "mouse", "plant", "river",
        "stone", "table", "tiger", "water",
    };

    public static readonly string[] PretrainTasks =
    {
        "copy", "reverse", "sort", "upper", "first", "last", "count", "drop_first", "add", "sort_digits", "max_digit",
    };

    public static readonly string[] HeldOutTasks = { "count_plus_one", "repeat_twice", "swap_ends" };

    public static IEnumerable<string> AllTasks => PretrainTasks.Concat(HeldOutTasks);

    /// <summary>Example <paramref name="index"/> of the stream (seed, tasks), choosing the task uniformly.</summary>
    public static SyntheticExample Generate(ulong seed, long index, IReadOnlyList<string> tasks)
    {
        if (tasks.Count == 0) throw new ArgumentException("no task given");
        var rng = new SplitMix64(Mix(seed, index));
        string task = tasks[rng.Next(tasks.Count)];
        return Make(task, ref rng);
    }

    /// <summary>Examples [start, start + count) of the stream (seed, tasks).</summary>
    public static IEnumerable<SyntheticExample> Stream(ulong seed, IReadOnlyList<string> tasks, long start = 0, long count = long.MaxValue)
    {
        for (long i = start; i - start < count; i++) yield return Generate(seed, i, tasks);
    }

    /// <summary>Parses a task list ("all", "pretrain", "heldout" or comma-separated names), validating each name.</summary>
    public static string[] ParseTasks(string spec)
    {
        var result = new List<string>();
        foreach (var raw in spec.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            switch (raw)
            {
                case "all": result.AddRange(AllTasks); break;
                case "pretrain": result.AddRange(PretrainTasks); break;
                case "heldout": result.AddRange(HeldOutTasks); break;
                default:
                    if (!AllTasks.Contains(raw))
                        throw new ArgumentException($"unknown synthetic task '{raw}' (expected all, pretrain, heldout or one of {string.Join(", ", AllTasks)})");
                    result.Add(raw);
                    break;
            }
        }
        if (result.Count == 0) throw new ArgumentException($"no synthetic task in '{spec}'");
        return result.Distinct().ToArray();
    }

    /// <summary>One JSONL line in alpaca form: {"instruction", "input", "output"}.</summary>
    public static string ToJsonLine(SyntheticExample e)
    {
        using var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms))
        {
            w.WriteStartObject();
            w.WriteString("instruction", e.Instruction);
            w.WriteString("input", e.Input);
            w.WriteString("output", e.Output);
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(ms.ToArray());
    }

    private static SyntheticExample Make(string task, ref SplitMix64 rng)
    {
        switch (task)
        {
            case "copy":
            {
                var w = RandomWords(ref rng, 2, 6);
                return new(task, "Repeat the words.", Join(w), Join(w));
            }
            case "reverse":
            {
                var w = RandomWords(ref rng, 2, 6);
                return new(task, "Reverse the order of the words.", Join(w), Join(w.AsEnumerable().Reverse()));
            }
            case "sort":
            {
                var w = RandomWords(ref rng, 2, 6);
                return new(task, "Sort the words alphabetically.", Join(w), Join(w.OrderBy(x => x, StringComparer.Ordinal)));
            }
            case "upper":
            {
                var w = RandomWords(ref rng, 1, 4);
                return new(task, "Write the words in capital letters.", Join(w), Join(w.Select(x => x.ToUpperInvariant())));
            }
            case "first":
            {
                var w = RandomWords(ref rng, 2, 6);
                return new(task, "What is the first word?", Join(w), w[0]);
            }
            case "last":
            {
                var w = RandomWords(ref rng, 2, 6);
                return new(task, "What is the last word?", Join(w), w[^1]);
            }
            case "count":
            {
                var w = RandomWords(ref rng, 1, 9);
                return new(task, "How many words are there?", Join(w), w.Length.ToString(System.Globalization.CultureInfo.InvariantCulture));
            }
            case "drop_first":
            {
                var w = RandomWords(ref rng, 2, 6);
                return new(task, "Remove the first word.", Join(w), Join(w.Skip(1)));
            }
            case "add":
            {
                int a = rng.Next(10), b = rng.Next(10);
                return new(task, "Add the two numbers.", $"{a} {b}", (a + b).ToString(System.Globalization.CultureInfo.InvariantCulture));
            }
            case "sort_digits":
            {
                var d = RandomDigits(ref rng, 2, 8);
                return new(task, "Sort the digits from smallest to largest.", Join(d), Join(d.OrderBy(x => x, StringComparer.Ordinal)));
            }
            case "max_digit":
            {
                var d = RandomDigits(ref rng, 2, 8);
                return new(task, "What is the largest digit?", Join(d), d.Max(StringComparer.Ordinal)!);
            }
            // ---- held out from pretraining (fine-tuning targets)
            case "count_plus_one":
            {
                var w = RandomWords(ref rng, 1, 9);
                return new(task, "Count the words, then add one.", Join(w), (w.Length + 1).ToString(System.Globalization.CultureInfo.InvariantCulture));
            }
            case "repeat_twice":
            {
                var w = RandomWords(ref rng, 2, 5);
                return new(task, "Write each word twice.", Join(w), Join(w.SelectMany(x => new[] { x, x })));
            }
            case "swap_ends":
            {
                var w = RandomWords(ref rng, 2, 6);
                var s = (string[])w.Clone();
                (s[0], s[^1]) = (s[^1], s[0]);
                return new(task, "Swap the first and the last word.", Join(w), Join(s));
            }
            default:
                throw new ArgumentException($"unknown synthetic task '{task}'");
        }
    }

    private static string Join(IEnumerable<string> w) => string.Join(' ', w);

    private static string[] RandomWords(ref SplitMix64 rng, int min, int max)
    {
        int n = min + rng.Next(max - min + 1);
        var w = new string[n];
        for (int i = 0; i < n; i++) w[i] = Words[rng.Next(Words.Length)];
        return w;
    }

    private static string[] RandomDigits(ref SplitMix64 rng, int min, int max)
    {
        int n = min + rng.Next(max - min + 1);
        var d = new string[n];
        for (int i = 0; i < n; i++) d[i] = ((char)('0' + rng.Next(10))).ToString();
        return d;
    }

    private static ulong Mix(ulong seed, long index)
    {
        var r = new SplitMix64(seed ^ 0x5851F42D4C957F2DUL);
        ulong a = r.NextU64();
        var r2 = new SplitMix64(a + (ulong)index * 0x9E3779B97F4A7C15UL);
        return r2.NextU64();
    }

    /// <summary>SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, fully specified.</summary>
    private struct SplitMix64
    {
        private ulong _s;
        public SplitMix64(ulong seed) { _s = seed; }

        public ulong NextU64()
        {
            ulong z = _s += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }

        /// <summary>Uniform in [0, n) by multiply-shift (Lemire); the bias, at most n/2^32, is irrelevant here.</summary>
        public int Next(int n) => (int)(((NextU64() >> 32) * (ulong)n) >> 32);
    }
}
