using FineTuneNative.Peft.Data;
using FineTuneNative.Tests.Runtime.IO;
using Parquet;
using Parquet.Schema;
using Xunit;

namespace FineTuneNative.Tests.Peft;

public class DataPipelineTests
{
    private const int Ignore = TokenizedSample.IgnoreIndex;

    [Fact]
    public void Csv_quotes_multiline_fields_and_reports_bad_rows_with_their_line()
    {
        string csv = "instruction,input,output\n" +
                     "Say hi,,\"Hi, \"\"you\"\"\"\n" +
                     "\"Two\nlines\",x,y\n" +
                     "too,many,fields,here\n" +
                     "\n" +
                     "a,b,\"c\"d\n" +
                     "last,,ok\r\n";
        var r = TabularReader.ParseCsv(csv, "d.csv");
        Assert.Equal(3, r.Records.Count);
        Assert.Equal("Hi, \"you\"", r.Records[0].Output);
        Assert.Equal("d.csv:2", r.Records[0].Location);
        Assert.Equal("Two\nlines", r.Records[1].Instruction);
        Assert.Equal("d.csv:3", r.Records[1].Location);
        Assert.Equal("d.csv:8", r.Records[2].Location);
        Assert.Equal(new[] { "d.csv:5", "d.csv:7" }, r.Issues.Select(i => i.Location));
        Assert.Contains("4 fields, the header has 3", r.Issues[0].Message);
        var unclosed = TabularReader.ParseCsv("text\n\"open\n", "u.csv");
        Assert.Equal("u.csv:2", Assert.Single(unclosed.Issues).Location);
        var chat = TabularReader.ParseCsv("messages\n\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"q\"\"}, {\"\"role\"\": \"\"assistant\"\", \"\"content\"\": \"\"a\"\"}]\"\n", "c.csv");
        Assert.Equal(RecordFormat.Chat, Assert.Single(chat.Records).Format);
        var unknown = TabularReader.ParseCsv("foo,bar\n1,2\n", "k.csv");
        Assert.Contains("expected columns", Assert.Single(unknown.Issues).Message);
    }

    [Fact]
    public async Task Parquet_string_columns_are_read_by_row()
    {
        using var dir = new TempDir();
        string path = Path.Combine(dir.Path, "d.parquet");
        var fIns = new DataField<string>("instruction");
        var fOut = new DataField<string>("output");
        var fN = new DataField<int>("n");
        using (var fs = File.Create(path))
        {
            await using var w = await ParquetWriter.CreateAsync(new ParquetSchema(fIns, fOut, fN), fs);
            using (var g = w.CreateRowGroup())
            {
                await g.WriteAsync(fIns, new[] { "a", "b" });
                await g.WriteAsync(fOut, new[] { "A", "B" });
                await g.WriteAsync<int>(fN, new[] { 1, 2 });
            }
            using (var g = w.CreateRowGroup())
            {
                await g.WriteAsync(fIns, new[] { "c" });
                await g.WriteAsync(fOut, new[] { "C" });
                await g.WriteAsync<int>(fN, new[] { 3 });
            }
        }
        var r = DatasetReader.Read(path);
        Assert.Empty(r.Issues);
        Assert.Equal(new[] { "a", "b", "c" }, r.Records.Select(x => x.Instruction));
        Assert.Equal(new[] { "A", "B", "C" }, r.Records.Select(x => x.Output));
        Assert.Equal($"{path}: row 2", r.Records[2].Location);
        File.WriteAllText(Path.Combine(dir.Path, "bad.parquet"), "not parquet");
        Assert.Contains("not a readable Parquet file", Assert.Single(DatasetReader.Read(Path.Combine(dir.Path, "bad.parquet")).Issues).Message);
    }

    [SkippableFact]
    public void Real_pretraining_text_files_become_windows_with_every_token_trained()
    {
        var wiki = DatasetReader.Read(PeftAssets.Require("datasets", "llama-factory", "wiki_demo.txt"));
        Assert.Equal(30, wiki.Records.Count);
        Assert.All(wiki.Records, r => Assert.Equal(RecordFormat.Text, r.Format));
        var c4 = DatasetReader.Read(PeftAssets.Require("datasets", "llama-factory", "c4_demo.jsonl"));
        Assert.Empty(c4.Issues);
        Assert.Equal(300, c4.Records.Count);
        var enc = new SampleEncoder(new ByteTokenizer(), new EncodeOptions { MaxLength = 64 });
        var issues = new List<DatasetIssue>();
        var samples = enc.EncodeAll(wiki.Records.Take(2), issues);
        Assert.Empty(issues);
        // windows overlap by one id: every id after the first is a target exactly once, nothing is cut
        int ids = wiki.Records.Take(2).Sum(r => System.Text.Encoding.UTF8.GetByteCount(r.Text) + 2);
        Assert.Equal(ids - 2, samples.Sum(s => s.TargetCount));
        Assert.All(samples, s => Assert.True(s.Length <= 64 && s.TargetCount == s.Length));
        Assert.Equal(ByteTokenizer.Bos, samples[0].Tokens[0]);
    }

    [SkippableFact]
    public void Real_seed_tasks_give_one_record_per_instance_and_line_numbers_stay()
    {
        var r = DatasetReader.Read(PeftAssets.Require("datasets", "stanford-alpaca", "seed_tasks.jsonl"));
        Assert.Empty(r.Issues);
        Assert.Equal(175, r.Records.Count); // one instance each in this file
        Assert.All(r.Records, x => Assert.Equal(RecordFormat.Alpaca, x.Format));
        var two = DatasetReader.Parse("{\"instruction\": \"I\", \"instances\": [{\"input\": \"a\", \"output\": \"b\"}, {\"input\": \"c\", \"output\": \"d\"}]}\n"u8, "s.jsonl");
        Assert.Equal(new[] { "s.jsonl:1", "s.jsonl:1 (instance 1)" }, two.Records.Select(x => x.Location));
        Assert.Equal(new[] { "b", "d" }, two.Records.Select(x => x.Output));
    }

    [SkippableFact]
    public void Real_sharegpt_function_calls_and_observations_map_to_assistant_and_tool()
    {
        var r = DatasetReader.Read(PeftAssets.Require("datasets", "llama-factory", "glaive_toolcall_en_demo.json"));
        var withTool = r.Records.First(x => x.Messages.Any(m => m.Role == "tool"));
        Assert.Contains(withTool.Messages, m => m.Role == "assistant" && m.Content.Contains("\"name\"", StringComparison.Ordinal));
        var enc = new SampleEncoder(new ByteTokenizer(), new EncodeOptions { Template = ChatTemplate.Builtin("qwen2.5"), MaxLength = 4096 });
        var s = enc.Encode(withTool, out var issue);
        Assert.Null(issue);
        Assert.Contains("<tool_response>", string.Concat(s!.Tokens.Select(t => (char)(t - ByteTokenizer.Offset))));
        var reason = DatasetReader.Read(PeftAssets.Require("datasets", "llama-factory", "reason_tool_use_demo_50.jsonl"));
        var turn = reason.Records.SelectMany(x => x.Messages).First(m => m.Content.Contains("<tool_call>", StringComparison.Ordinal));
        Assert.Equal("assistant", turn.Role);
        Assert.Contains(reason.Records.SelectMany(x => x.Messages), m => m.Content.StartsWith("<think>\n", StringComparison.Ordinal));
        var dpo = DatasetReader.Read(PeftAssets.Require("datasets", "llama-factory", "v1_dpo_demo.jsonl"));
        Assert.Empty(dpo.Records);
        Assert.All(dpo.Issues, i => Assert.Contains("DPO", i.Message));
    }

    /// <summary>Loss only on assistant tokens by default, proven on the label mask of a multi-turn record; a record
    /// whose targets are all masked is reported with its location, never trained on.</summary>
    [Fact]
    public void Label_mask_covers_exactly_the_assistant_tokens_and_all_masked_samples_are_reported()
    {
        var tok = new ByteTokenizer();
        var tpl = ChatTemplate.Builtin("chatml", tok);
        var conv = new List<ChatMessage> { new("system", "S"), new("user", "q1"), new("assistant", "a1"), new("user", "q2"), new("assistant", "a2") };
        var enc = new SampleEncoder(tok, new EncodeOptions { Template = tpl });
        var s = enc.Encode(DatasetRecord.Chat(conv, "f:1"), out _)!;
        string full = tpl.Render(conv, false);
        var expected = new int[s.Length];
        Array.Fill(expected, Ignore);
        foreach (var answer in new[] { "a1<|im_end|>", "a2<|im_end|>" })
        {
            int at = full.IndexOf(answer, StringComparison.Ordinal);
            for (int k = 0; k < answer.Length; k++) expected[at + k - 1] = answer[k] + ByteTokenizer.Offset; // the token before predicts it
        }
        Assert.Equal(expected, s.Targets);

        // a response cut away by truncation: all targets masked -> reported with file:line, not returned
        var shortEnc = new SampleEncoder(tok, new EncodeOptions { Template = tpl, MaxLength = 20 });
        var issues = new List<DatasetIssue>();
        var kept = shortEnc.EncodeAll(new[] { DatasetRecord.Chat(conv, "data.jsonl:42") }, issues);
        Assert.Empty(kept);
        Assert.Equal("data.jsonl:42", Assert.Single(issues).Location);
        Assert.Contains("masked", issues[0].Message);
        Assert.Equal(1, shortEnc.Truncated);
    }

    /// <summary>LLaMA-Factory v1 "loss_weight": an assistant turn with weight 0 stays as context but is not trained,
    /// with the model's template and with the built-in format (whose EOS after that turn is then input only).</summary>
    [Fact]
    public void Loss_weight_zero_keeps_an_assistant_turn_as_untrained_context()
    {
        var r = DatasetReader.Parse(System.Text.Encoding.UTF8.GetBytes("""{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss_weight": 0.0}, """ +
            """{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "loss_weight": 1.0}]}""" + "\n" +
            """{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": "x"}]}""" + "\n"), "w.jsonl");
        Assert.Contains("loss_weight must be a number", Assert.Single(r.Issues).Message);
        var rec = Assert.Single(r.Records);
        Assert.Equal(new[] { true, false, true, true }, rec.Messages.Select(m => m.Trained));
        var tok = new ByteTokenizer();
        var tpl = new SampleEncoder(tok, new EncodeOptions { Template = ChatTemplate.Builtin("chatml", tok) }).Encode(rec, out _)!;
        string Targets(TokenizedSample s) => string.Concat(s.Targets.Where(t => t >= ByteTokenizer.Offset).Select(t => (char)(t - ByteTokenizer.Offset)));
        Assert.Equal("a2<|im_end|>", Targets(tpl));
        var builtin = new SampleEncoder(tok, new EncodeOptions()).Encode(rec, out _)!;
        Assert.Equal("a2", Targets(builtin));
        Assert.Equal(1, builtin.Targets.Count(t => t == ByteTokenizer.Eos));
        Assert.Equal(2, builtin.Tokens.Count(t => t == ByteTokenizer.Eos) + (builtin.Targets[^1] == ByteTokenizer.Eos ? 1 : 0));
    }

    [Fact]
    public void Cleaning_normalises_whitespace_drops_empty_and_duplicates_with_locations()
    {
        Assert.Equal("a b\n\nc", Cleaning.NormalizeText("  a \t  b  \r\n\n\n\n c  "));
        using var dir = new TempDir();
        string p = Path.Combine(dir.Path, "d.jsonl");
        File.WriteAllLines(p, new[]
        {
            "{\"instruction\": \"Say  hi\", \"output\": \"hi\"}",
            "{\"instruction\": \"Say hi\", \"output\": \"hi \"}",
            "{\"instruction\": \"empty\", \"output\": \"   \"}",
            "{\"instruction\": \"other\", \"output\": \"x\"}",
            "{\"instruction\": \"other\", \"output\": \"x\"}",
        });
        var tok = new ByteTokenizer();
        var d = DataPipeline.Prepare(new[] { p }, tok, new DataOptions { NormalizeWhitespace = true }, 64, false, 0, 1);
        Assert.Equal(2, d.Train.Count);
        Assert.Equal(new[] { $"{p}:2", $"{p}:3", $"{p}:5" }, d.Issues.Select(i => i.Location));
        Assert.Contains($"duplicate of {p}:1", d.Issues[0].Message);
        Assert.Contains("empty", d.Issues[1].Message);
        Assert.Contains(d.Report, l => l.Contains("dropped 1 empty, 2 duplicate", StringComparison.Ordinal));
        var raw = DataPipeline.Prepare(new[] { p }, tok, new DataOptions { Dedupe = false, DropEmpty = false }, 64, false, 0, 1);
        Assert.Equal(5, raw.Train.Count);
        Assert.Contains(raw.Report, l => l.StartsWith("train: 5 samples, tokens min", StringComparison.Ordinal));
    }

    [Fact]
    public void Split3_is_seeded_disjoint_and_complete()
    {
        var items = Enumerable.Range(0, 100).ToList();
        var (tr, ev, te) = DataPipeline.Split3(items, 0.1, 0.2, 7);
        Assert.Equal((70, 10, 20), (tr.Count, ev.Count, te.Count));
        Assert.Equal(items, tr.Concat(ev).Concat(te).OrderBy(x => x));
        Assert.Equal(te, DataPipeline.Split3(items, 0.1, 0.2, 7).Test);
        Assert.NotEqual(te, DataPipeline.Split3(items, 0.1, 0.2, 8).Test);
        var (t2, e2, s2) = DataPipeline.Split3(new[] { 1, 2 }, 0.3, 0.3, 1);
        Assert.Single(t2);
        Assert.Equal(1, e2.Count + s2.Count);
        Assert.Throws<ArgumentOutOfRangeException>(() => DataPipeline.Split3(items, 0.5, 0.5, 1));
    }

    [Fact]
    public void Mixture_weights_set_each_datasets_share()
    {
        var a = Enumerable.Range(0, 30).Select(i => DatasetRecord.Raw($"a{i}", $"a:{i}")).ToList();
        var b = Enumerable.Range(0, 10).Select(i => DatasetRecord.Raw($"b{i}", $"b:{i}")).ToList();
        var report = new List<string>();
        var mix = DataPipeline.Mix(new[] { a, b }, new[] { 1.0, 1.0 }, 3, new[] { "a", "b" }, report);
        Assert.Equal(40, mix.Count);
        Assert.Equal(20, mix.Count(r => r.Text.StartsWith('a')));
        Assert.Equal(20, mix.Count(r => r.Text.StartsWith('b')));
        Assert.Equal(10, mix.Where(r => r.Text.StartsWith('b')).Select(r => r.Text).Distinct().Count()); // every b, twice
        Assert.Contains(report, l => l.Contains("oversampled", StringComparison.Ordinal));
        var none = DataPipeline.Mix(new[] { a, b }, new[] { 1.0, 0.0 }, 3, new[] { "a", "b" });
        Assert.All(none, r => Assert.StartsWith("a", r.Text));
        Assert.Equal(a.Concat(b), DataPipeline.Mix(new[] { a, b }, Array.Empty<double>(), 3, new[] { "a", "b" }));
    }

    [Fact]
    public void Augmentation_substitutes_synonyms_and_inserts_noise_in_prompts_only()
    {
        using var dir = new TempDir();
        string syn = Path.Combine(dir.Path, "syn.txt");
        File.WriteAllText(syn, "# groups\nbig, large, huge\nquick\tfast\n");
        var table = TextAugmenter.ReadSynonyms(syn);
        var rec = DatasetRecord.Alpaca("A big quick dog, big.", "big", "big answer", location: "x:1");
        var aug = new TextAugmenter(table, Array.Empty<string>(), 1.0, 5);
        var r = aug.Augment(rec);
        Assert.Equal("big answer", r.Output); // responses untouched
        Assert.DoesNotContain("big", r.Instruction, StringComparison.Ordinal);
        Assert.DoesNotContain("quick", r.Instruction, StringComparison.Ordinal);
        Assert.EndsWith(".", r.Instruction, StringComparison.Ordinal);
        Assert.Equal(4, aug.Substitutions); // big, quick, big in the instruction; big in the input
        Assert.Equal(r.Instruction, new TextAugmenter(table, Array.Empty<string>(), 1.0, 5).Augment(rec).Instruction); // seeded
        var noisy = new TextAugmenter(new Dictionary<string, string[]>(), new[] { "zzz" }, 0.5, 9);
        var n = noisy.Augment(DatasetRecord.Alpaca(string.Join(' ', Enumerable.Repeat("w", 400)), "", "o", location: "x:2"));
        int inserted = n.Instruction.Split(' ').Count(w => w == "zzz");
        Assert.InRange(inserted, 160, 240); // ~ ratio 0.5 of 400 words
        Assert.Equal(inserted, noisy.Insertions);
        Assert.Equal(rec.Instruction, new TextAugmenter(table, new[] { "zzz" }, 0, 5).Augment(rec).Instruction);
        File.WriteAllText(syn, "ok, fine\nlonely\n");
        var e = Assert.Throws<InvalidDataException>(() => TextAugmenter.ReadSynonyms(syn));
        Assert.Contains($"{syn}:2", e.Message);
    }

    [SkippableFact]
    public void Pipeline_on_real_alpaca_with_packing_and_a_test_split()
    {
        string p = PeftAssets.Require("datasets", "llama-factory", "alpaca_en_demo.json");
        var tok = new ByteTokenizer();
        var d = DataPipeline.Prepare(new[] { p }, tok, new DataOptions { Pack = true, TestFraction = 0.1, ChatTemplate = "none" }, 1024, false, 0.1, 42, maxRecords: 200);
        Assert.Equal(20, d.Test.Count);
        Assert.Equal(20, d.Eval.Count);
        Assert.All(d.Train, s => Assert.NotNull(s.Positions));
        Assert.True(d.Train.Count < 160);
        Assert.Contains(d.Report, l => l.StartsWith("packed ", StringComparison.Ordinal));
        Assert.Contains(d.Report, l => l.StartsWith("EOS (2 ", StringComparison.Ordinal));
        Assert.Contains(d.Report, l => l.StartsWith("truncated to 1024 tokens: ", StringComparison.Ordinal));
    }
}
