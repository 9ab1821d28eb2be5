using FineTuneNative.Cli;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Tests.Cli;

public class PretrainerTests
{
    /// <summary>One id per character (byte value + 2); BOS = 0, EOS = 1. Enough to check packing by hand.</summary>
    private sealed class CharTokenizer : ITextTokenizer
    {
        public int VocabSize => 258;
        public int? BosId => 0;
        public int? EosId => 1;
        public IReadOnlyList<int> EosIds => new[] { 1 };
        public int[] Encode(string text, bool addBos = false) =>
            (addBos ? new[] { 0 } : Array.Empty<int>()).Concat(text.Select(c => (int)(byte)c + 2)).ToArray();
        public string Decode(ReadOnlySpan<int> ids) => Decode(ids, false);
        public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens)
        {
            var sb = new System.Text.StringBuilder();
            foreach (int id in ids) sb.Append(id switch { 0 => skipSpecialTokens ? "" : "<s>", 1 => skipSpecialTokens ? "" : "</s>", _ => ((char)(id - 2)).ToString() });
            return sb.ToString();
        }
        public string Describe() => "char tokenizer (test)";
        public int? TokenToId(string token) => token switch { "<s>" => 0, "</s>" => 1, _ => token.Length == 1 ? token[0] + 2 : null };
        public string? IdToToken(int id) => id switch { 0 => "<s>", 1 => "</s>", _ => ((char)(id - 2)).ToString() };
        public bool IsSpecial(int id) => id < 2;
    }

    [Fact]
    public void Packer_PacksWholeExamples_WithTargetsOnTheResponseOnly()
    {
        var tok = new CharTokenizer();
        const int T = 200, B = 3;
        var packer = new ExamplePacker(tok, T, B);
        var examples = SyntheticTasks.Stream(3, SyntheticTasks.PretrainTasks, 0, 1000).ToList();
        using var source = examples.GetEnumerator();
        var batch = packer.Next(source);
        Assert.Equal(B * T, batch.Tokens.Length);
        Assert.Equal(B * T, batch.Targets.Length);

        // Walk the rows and re-derive every example independently of the packer.
        int next = 0;
        for (int row = 0; row < B; row++)
        {
            int pos = 0;
            while (pos < T && batch.Tokens[row * T + pos] == 0)
            {
                var e = examples[next++];
                string prompt = PromptTemplate.AlpacaPrompt(e.Instruction, e.Input);
                var ids = new[] { 0 }.Concat(prompt.Select(c => (int)(byte)c + 2)).Concat(e.Output.Select(c => (int)(byte)c + 2)).Append(1).ToArray();
                int n = ids.Length - 1; // inputs: all but the final EOS
                for (int j = 0; j < n; j++)
                {
                    Assert.Equal(ids[j], batch.Tokens[row * T + pos + j]);
                    // Position j predicts ids[j+1] only inside the response (the output and its EOS).
                    int expected = j + 1 >= 1 + prompt.Length ? ids[j + 1] : -100;
                    Assert.Equal(expected, batch.Targets[row * T + pos + j]);
                }
                pos += n;
            }
            Assert.True(pos > T / 2, $"row {row} holds only {pos} tokens");
            for (int j = pos; j < T; j++) Assert.Equal(-100, batch.Targets[row * T + j]);
        }
        Assert.True(next >= 3);
        // The next batch continues with the next example (nothing is skipped).
        var second = packer.Next(source);
        string firstPrompt = PromptTemplate.AlpacaPrompt(examples[next].Instruction, examples[next].Input);
        Assert.Equal(0, second.Tokens[0]);
        Assert.Equal(firstPrompt[0] + 2, second.Tokens[1]);
    }

    [Fact]
    public void LearningRate_WarmsUpLinearly_ThenDecaysByCosineToTheFloor()
    {
        using var backend = Backends.Create("cpu:1");
        var cfg = new LlamaConfig { HiddenSize = 8, IntermediateSize = 16, NumLayers = 1, NumHeads = 2, NumKvHeads = 1, HeadDim = 4, VocabSize = 11 };
        using var w = LlamaWeights.Allocate(cfg, backend);
        using var model = new LlamaModel(w, backend);
        using var p = new Pretrainer(model, backend, new PretrainSettings { Steps = 110, WarmupSteps = 10, LearningRate = 1e-2f, MinLrRatio = 0.1f, BatchSize = 1, SeqLen = 4 });
        Assert.Equal(1e-3f, p.LearningRateAt(1), 6);
        Assert.Equal(1e-2f, p.LearningRateAt(10), 6);
        Assert.Equal(1e-3f + 0.5f * 9e-3f, p.LearningRateAt(60), 6); // half-way through the decay
        Assert.Equal(1e-3f, p.LearningRateAt(110), 6);
    }

    [Fact]
    public void Pretrainer_LowersTheLossOfALearnableMapping_AndIsDeterministic()
    {
        double[] Run()
        {
            using var backend = Backends.Create("cpu:1");
            var cfg = new LlamaConfig { HiddenSize = 16, IntermediateSize = 32, NumLayers = 2, NumHeads = 2, NumKvHeads = 1, HeadDim = 8, VocabSize = 13, MaxPositions = 16 };
            using var w = LlamaWeights.Allocate(cfg, backend);
            Pretrainer.InitializeWeights(w, backend, seed: 5);
            using var model = new LlamaModel(w, backend);
            using var p = new Pretrainer(model, backend, new PretrainSettings { Steps = 60, WarmupSteps = 5, LearningRate = 1e-2f, BatchSize = 2, SeqLen = 8, EvalEvery = 0 });
            // Next token = (3·token + 1) mod 13, every position trained but the first of each row.
            var tokens = new int[16];
            var targets = new int[16];
            for (int i = 0; i < 16; i++) { tokens[i] = (i * 5) % 13; targets[i] = i % 8 == 0 ? -100 : (3 * tokens[i] + 1) % 13; }
            var batch = new PretrainBatch(tokens, targets);
            var r = p.Run(_ => batch, new[] { batch });
            return new[] { r.FirstLoss, r.FinalLoss, r.EvalLossBefore!.Value, r.EvalLossAfter!.Value };
        }
        var a = Run();
        Assert.InRange(a[0], Math.Log(13) - 0.3, Math.Log(13) + 0.3); // small init: about uniform
        Assert.True(a[3] < 0.5 * a[2], $"eval loss {a[2]} -> {a[3]}");
        Assert.Equal(a, Run());
    }

    [Fact]
    public void InitializeWeights_NormsAreOne_MatricesHaveTheRequestedSpread()
    {
        using var backend = Backends.Create("cpu:1");
        var cfg = new LlamaConfig { HiddenSize = 64, IntermediateSize = 128, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 16, VocabSize = 300 };
        using var w = LlamaWeights.Allocate(cfg, backend);
        Pretrainer.InitializeWeights(w, backend, seed: 1, std: 0.02f);
        Assert.All(w.FinalNorm.ToArray(), v => Assert.Equal(1f, v));
        var emb = w.Embedding.ToArray();
        double sd = Math.Sqrt(emb.Select(v => (double)v * v).Average());
        Assert.InRange(sd, 0.019, 0.021);
        var down = w.Layers[1].Wdown.ToArray();
        double sdDown = Math.Sqrt(down.Select(v => (double)v * v).Average());
        Assert.InRange(sdDown, 0.02 / Math.Sqrt(4) * 0.95, 0.02 / Math.Sqrt(4) * 1.05); // std / sqrt(2L)
        Assert.NotEqual(w.Layers[0].Wq.ToArray(), w.Layers[1].Wq.ToArray());
    }
}
