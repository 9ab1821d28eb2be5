using FineTuneNative.Runtime.Text;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Runtime.Text;

public class BpeTrainerTests : IDisposable
{
    private readonly ITestOutputHelper _out;
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "ftn-bpe-" + Guid.NewGuid().ToString("N"));

    public BpeTrainerTests(ITestOutputHelper output) { _out = output; }
    public void Dispose() { if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true); }

    private static readonly string[] Specials = { "<|user|>", "<|assistant|>", "<|end|>" };

    /// <summary>A small deterministic corpus: simple chat-shaped stories with digits, punctuation and some non-ASCII words.</summary>
    internal static List<string> Corpus(int lines, int seed)
    {
        var rng = new Random(seed);
        string[] names = { "Lily", "Tom", "Sam", "Mia", "Ben", "Zoë", "José" };
        string[] verbs = { "played", "jumped", "looked", "found", "wanted", "liked", "saw" };
        string[] things = { "a red ball", "the big tree", "a little dog", "the café", "a shiny stone", "the blue sky", "日本の本" };
        var list = new List<string>();
        for (int i = 0; i < lines; i++)
        {
            string n = names[rng.Next(names.Length)], v = verbs[rng.Next(verbs.Length)], t = things[rng.Next(things.Length)];
            int a = rng.Next(100), b = rng.Next(100);
            list.Add(rng.Next(3) == 0
                ? $"<|user|>What is {a} + {b}?<|end|><|assistant|>{a + b}<|end|>"
                : $"Once upon a time, {n} {v} {t}. \"Wow!\" said {n}.\n{n} was happy ({i % 7} times).");
        }
        return list;
    }

    [Fact]
    public void Train_WritesHfTokenizerJson_LoaderMatchesTrainerEncoding()
    {
        var opts = new BpeTrainerOptions { SpecialTokens = Specials };
        var result = BpeTrainer.Train(Corpus(3000, 1), 600, _dir, opts);
        Assert.Equal(600, result.VocabSize);                           // 3 + 3 specials, 256 bytes, 338 merges
        Assert.Equal(600 - 6 - 256, result.Merges.Count);
        Assert.True(File.Exists(Path.Combine(_dir, "tokenizer.json")));
        Assert.True(File.Exists(Path.Combine(_dir, "tokenizer_config.json")));

        var tok = TokenizerLoader.Load(_dir);                          // directory: tokenizer.json + tokenizer_config.json
        var own = HfBpeTokenizer.Load(result.TokenizerJsonPath, preferOwnEncoder: true);
        Assert.True(((HfBpeTokenizer)tok).UsesLibrary, tok.Describe());
        Assert.False(own.UsesLibrary);
        _out.WriteLine(tok.Describe());
        Assert.Equal(600, tok.VocabSize);
        Assert.Equal(0, tok.BosId);
        Assert.Equal(1, tok.EosId);
        Assert.Equal(2, tok.TokenToId("<pad>"));
        for (int i = 0; i < Specials.Length; i++)
        {
            Assert.Equal(3 + i, tok.TokenToId(Specials[i]));
            Assert.True(tok.IsSpecial(3 + i));
        }

        var texts = new List<string>(Corpus(200, 2))   // unseen lines from the same distribution
        {
            "", " ", "  leading and trailing  ", "tabs\tand\r\nnewlines\n\n", "numbers 1234567 and 3.14",
            "emoji 🦙🚀 and accents déjà vu, ñ, 日本語 text", "<|user|>hi<|end|>", "unseen word: xylophone!!",
        };
        int same = 0;
        long chars = 0, ids = 0;
        foreach (var t in texts)
        {
            var expected = result.Encode(t);
            var got = tok.Encode(t);
            Assert.True(expected.SequenceEqual(got), $"{TextAssets.Show(t)}: trainer [{string.Join(" ", expected)}] loader [{string.Join(" ", got)}]");
            Assert.Equal(expected, own.Encode(t));
            Assert.Equal(t, tok.Decode(got));
            Assert.Equal(t, own.Decode(got));
            same++;
            chars += t.Length; ids += got.Length;
        }
        _out.WriteLine($"{same}/{texts.Count} texts: loader (ML BpeTokenizer and our merge loop) == trainer's own encoding, round trip exact; {chars / (double)ids:F2} chars/token");
        Assert.True(chars / (double)ids > 2.5, $"merges should compress the text: {chars / (double)ids:F2} chars/token");

        // Special tokens are single ids; BOS only on request; EOS is the caller's.
        var chat = tok.Encode("<|user|>What is 2 + 3?<|end|><|assistant|>5<|end|>", addBos: true);
        Assert.Equal(0, chat[0]);
        Assert.Equal(3, chat[1]);
        Assert.Equal(5, chat[^1]);
        Assert.Equal(new[] { 3, 5, 4 }, chat.Where(i => i is >= 3 and <= 5).Take(3).ToArray());
        Assert.Equal("What is 2 + 3?5", tok.Decode(chat, skipSpecialTokens: true));
    }

    [Fact]
    public void Train_IsDeterministic_AndStopsWhenPairsRunOut()
    {
        var a = BpeTrainer.Train(Corpus(500, 3), 520, Path.Combine(_dir, "a"));
        var b = BpeTrainer.Train(Corpus(500, 3), 520, Path.Combine(_dir, "b"));
        Assert.Equal(File.ReadAllBytes(a.TokenizerJsonPath), File.ReadAllBytes(b.TokenizerJsonPath));
        Assert.Equal(File.ReadAllBytes(a.TokenizerConfigPath), File.ReadAllBytes(b.TokenizerConfigPath));

        // A tiny corpus cannot fill a large vocabulary: training stops at MinFrequency and says so in VocabSize.
        var small = BpeTrainer.Train(new[] { "abab abab" }, 1000, Path.Combine(_dir, "small"), new BpeTrainerOptions { PadToken = null });
        Assert.True(small.VocabSize < 1000);
        Assert.Equal(2 + 256 + small.Merges.Count, small.VocabSize);
        var tok = TokenizerLoader.Load(Path.Combine(_dir, "small"));
        Assert.Equal(small.VocabSize, tok.VocabSize);
        Assert.Equal(small.Encode("abab abab"), tok.Encode("abab abab"));
        // (a,b) x4 -> "ab"; (ab,ab) x2 -> "abab"; (Ġ,abab) is seen once < MinFrequency 2: "abab", "Ġ", "abab".
        Assert.Equal(3, small.Merges.Count + 1);
        Assert.Equal(new[] { "abab", "Ġ", "abab" }, tok.Encode("abab abab").Select(i => tok.IdToToken(i)));

        Assert.Throws<ArgumentOutOfRangeException>(() => BpeTrainer.Train(new[] { "x" }, 100, Path.Combine(_dir, "c")));
    }

    /// <summary>The first merges of a hand-checkable corpus: most frequent pair first, ties to the smaller ids.</summary>
    [Fact]
    public void Train_HandCheckableMerges()
    {
        // words: "aaab" x1 ; " aaab" ... pre-tokenized by GPT-2's regex. Byte ids start after <s>, </s> (pad off).
        var r = BpeTrainer.Train(new[] { "aaa aaa ab" }, 2 + 256 + 3, Path.Combine(_dir, "h"),
            new BpeTrainerOptions { PadToken = null, MinFrequency = 1 });
        string T(int id) => r.Tokens[id];
        // words: "aaa" (1), "Ġaaa" (1), "Ġab" (1). Pairs: (a,a) 4, (Ġ,a) 2, (a,b) 1.
        Assert.Equal(("a", "a"), (T(r.Merges[0].A), T(r.Merges[0].B)));
        // then: "aa a" (1), "Ġ aa a"(1), "Ġ a b": pairs (aa,a) 2, (Ġ,aa) 1, (Ġ,a) 1, (a,b) 1 -> (aa, a)
        Assert.Equal(("aa", "a"), (T(r.Merges[1].A), T(r.Merges[1].B)));
        var tok = TokenizerLoader.Load(Path.Combine(_dir, "h"));
        Assert.Equal(r.Encode("aaa aaa ab"), tok.Encode("aaa aaa ab"));
    }
}
