using FineTuneNative.Peft.Data;

namespace FineTuneNative.Tests.Peft;

public class SampleEncoderTests
{
    private const int Ignore = TokenizedSample.IgnoreIndex;
    private static readonly ByteTokenizer Tok = new();

    private static SampleEncoder Encoder(int maxLength = 512, bool trainOnPrompt = false) =>
        new(Tok, new EncodeOptions { MaxLength = maxLength, TrainOnPrompt = trainOnPrompt });

    [Fact]
    public void Alpaca_loss_is_only_on_the_response_and_its_eos()
    {
        var rec = DatasetRecord.Alpaca("Say hi", "", "ok", location: "t.json:1");
        const string prompt = "### Instruction:\nSay hi\n\n### Response:\n";
        // Full sequence: BOS, the prompt bytes, "o", "k", EOS. Inputs drop the last id, targets drop the first.
        int[] p = ByteTokenizer.Ids(prompt);
        int o = 'o' + ByteTokenizer.Offset, k = 'k' + ByteTokenizer.Offset;

        var s = Encoder().Encode(rec, out var issue)!;

        Assert.Null(issue);
        Assert.Equal(new[] { ByteTokenizer.Bos }.Concat(p).Concat(new[] { o, k }), s.Tokens);
        // Position i predicts id i+1: the P prompt ids are never targets; 'o', 'k' and EOS are.
        var expected = Enumerable.Repeat(Ignore, p.Length).Concat(new[] { o, k, ByteTokenizer.Eos }).ToArray();
        Assert.Equal(expected, s.Targets);
        Assert.Equal(3, s.TargetCount);
        Assert.Equal(prompt.Length + 3, s.Length);
    }

    [Fact]
    public void Alpaca_input_block_and_system_text_are_part_of_the_prompt()
    {
        var segs = PromptTemplate.Render(DatasetRecord.Alpaca("Add", "2 3", "5", system: "You add."));
        Assert.Equal(new[]
        {
            new PromptSegment("You add.\n\n### Instruction:\nAdd\n\n### Input:\n2 3\n\n### Response:\n", false),
            new PromptSegment("5", true, EosAfter: true),
        }, segs);
    }

    [Fact]
    public void Train_on_prompt_makes_every_next_token_a_target()
    {
        var rec = DatasetRecord.Alpaca("Say hi", "", "ok");
        var s = Encoder(trainOnPrompt: true).Encode(rec, out _)!;
        Assert.Equal(s.Tokens.Skip(1).Append(ByteTokenizer.Eos), s.Targets);
    }

    [Fact]
    public void Chat_trains_every_assistant_turn_and_nothing_else()
    {
        var rec = DatasetRecord.Chat(new[]
        {
            new ChatMessage("system", "S"), new ChatMessage("user", "U1"), new ChatMessage("assistant", "A1"),
            new ChatMessage("user", "U2"), new ChatMessage("assistant", "A2"),
        });
        var s = Encoder().Encode(rec, out _)!;

        // Rebuild the full id sequence with its trained flags from the documented template.
        var ids = new List<int> { ByteTokenizer.Bos };
        var trained = new List<bool> { false };
        void Add(string text, bool t) { foreach (var id in ByteTokenizer.Ids(text)) { ids.Add(id); trained.Add(t); } }
        Add("### System:\nS\n\n### User:\nU1\n\n### Assistant:\n", false);
        Add("A1", true); ids.Add(ByteTokenizer.Eos); trained.Add(true);
        Add("### User:\nU2\n\n### Assistant:\n", false);
        Add("A2", true); ids.Add(ByteTokenizer.Eos); trained.Add(true);

        Assert.Equal(ids.Take(ids.Count - 1), s.Tokens);
        Assert.Equal(Enumerable.Range(1, ids.Count - 1).Select(i => trained[i] ? ids[i] : Ignore), s.Targets);
        Assert.Equal(6, s.TargetCount); // "A1" EOS "A2" EOS
        Assert.Equal("A1</s>A2</s>", Tok.Decode(s.Targets.Where(t => t != Ignore).ToArray()));
    }

    [Fact]
    public void Truncation_keeps_max_length_tokens_and_drops_samples_with_no_target_left()
    {
        var rec = DatasetRecord.Alpaca("Say hi", "", "okay", location: "t.jsonl:7");
        int promptIds = 1 + "### Instruction:\nSay hi\n\n### Response:\n".Length;

        // Room for the prompt and two response ids: targets are "o", "k" only (EOS and the rest cut).
        var s = Encoder(maxLength: promptIds + 1).Encode(rec, out var issue)!;
        Assert.Null(issue);
        Assert.Equal(promptIds + 1, s.Length);
        Assert.Equal(new[] { 'o' + 3, 'k' + 3 }, s.Targets.Where(t => t != Ignore));

        // The prompt alone fills the budget: every target is masked, the sample is dropped and reported.
        Assert.Null(Encoder(maxLength: promptIds - 1).Encode(rec, out issue));
        Assert.NotNull(issue);
        Assert.Equal("t.jsonl:7", issue!.Location);
        Assert.Contains("masked", issue.Message);

        var issues = new List<DatasetIssue>();
        var kept = Encoder(maxLength: promptIds + 1).EncodeAll(new[] { DatasetRecord.Alpaca("Say hi, at length", "", "x", location: "t.jsonl:8"), rec }, issues);
        Assert.Equal("t.jsonl:8", Assert.Single(issues).Location);
        Assert.Equal("t.jsonl:7", Assert.Single(kept).Location);
    }

    [Fact]
    public void Generation_prompts_match_the_training_prefix()
    {
        // A dummy-prefix tokenizer makes every segment boundary visible in the ids.
        var enc = new SampleEncoder(new ByteTokenizer(dummyPrefix: true), new EncodeOptions());
        var train = enc.Encode(DatasetRecord.Alpaca("Say hi", "x", "ok"), out _)!;
        var prompt = enc.EncodeAlpacaPrompt("Say hi", "x");
        Assert.Equal(prompt, train.Tokens.Take(prompt.Length));
        Assert.Equal(train.Targets.ToList().FindIndex(t => t != Ignore), prompt.Length - 1);

        var msgs = new[] { new ChatMessage("user", "U1"), new ChatMessage("assistant", "A1"), new ChatMessage("user", "U2") };
        var chatPrompt = enc.EncodeChatPrompt(msgs);
        var full = enc.Encode(DatasetRecord.Chat(msgs.Append(new ChatMessage("assistant", "A2")).ToArray()), out _)!;
        Assert.Equal(chatPrompt, full.Tokens.Take(chatPrompt.Length));
    }

    [Fact]
    public void Batches_pad_with_ignored_targets_and_keep_a_fixed_shape()
    {
        var a = new TokenizedSample("a", new[] { 1, 10, 11 }, new[] { Ignore, 11, 2 });
        var b = new TokenizedSample("b", new[] { 1, 12 }, new[] { 12, 2 });
        var c = new TokenizedSample("c", new[] { 1 }, new[] { 2 });

        var batches = Batching.Batches(new[] { a, b, c }, batchSize: 2, seqLen: 4, padId: 0).ToList();

        Assert.Equal(2, batches.Count);
        Assert.Equal(new[] { 1, 10, 11, 0, 1, 12, 0, 0 }, batches[0].Tokens);
        Assert.Equal(new[] { Ignore, 11, 2, Ignore, 12, 2, Ignore, Ignore }, batches[0].Targets);
        Assert.Equal((2, 4, 2, 4, 5), (batches[0].BatchSize, batches[0].SeqLen, batches[0].Samples, batches[0].TargetCount, batches[0].TokenCount));
        // The last batch has an empty second row: all padding, nothing to learn from.
        Assert.Equal(new[] { 1, 0, 0, 0, 0, 0, 0, 0 }, batches[1].Tokens);
        Assert.Equal(new[] { 2, Ignore, Ignore, Ignore, Ignore, Ignore, Ignore, Ignore }, batches[1].Targets);
        Assert.Equal(1, batches[1].TargetCount);
        Assert.Throws<ArgumentException>(() => Batching.Pad(new[] { a }, 1, 2, 0));
    }

    [Fact]
    public void Split_is_deterministic_disjoint_and_complete()
    {
        var items = Enumerable.Range(0, 50).ToArray();
        var (train1, eval1) = Batching.Split(items, 0.1, seed: 7);
        var (train2, eval2) = Batching.Split(items, 0.1, seed: 7);
        var (_, eval3) = Batching.Split(items, 0.1, seed: 8);

        Assert.Equal(5, eval1.Count);
        Assert.Equal(45, train1.Count);
        Assert.Equal(train1, train2);
        Assert.Equal(eval1, eval2);
        Assert.NotEqual(eval1, eval3);
        Assert.Equal(items, train1.Concat(eval1).OrderBy(x => x));
        Assert.NotEqual(items.Take(5), eval1); // shuffled, not the head of the file

        Assert.Single(Batching.Split(new[] { 1, 2 }, 0.01, 1).Eval);   // at least one held out
        Assert.Single(Batching.Split(new[] { 1, 2 }, 0.9, 1).Train);   // at least one to train on
        Assert.Empty(Batching.Split(items, 0, 1).Eval);
        // A fixed seed gives a fixed permutation (splitmix64 Fisher-Yates; platform independent).
        Assert.Equal(Batching.Permutation(10, 42), Batching.Permutation(10, 42));
    }
}
