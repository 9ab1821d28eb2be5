using FineTuneNative.Peft.Data;

namespace FineTuneNative.Tests.Peft;

public class DatasetReaderTests
{
    [Fact]
    public void Jsonl_reads_every_form_and_reports_malformed_lines_with_file_and_line()
    {
        using var tmp = new TempDir();
        string path = tmp.File("mixed.jsonl", string.Join("\n", new[]
        {
            /* 1 */ """{"instruction": "Add", "input": "2 and 3", "output": "5"}""",
            /* 2 */ """{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}""",
            /* 3 */ """{"instruction": "broken", "output": "x" """,
            /* 4 */ """{"instruction": "no output"}""",
            /* 5 */ "",
            /* 6 */ """{"instruction": "Count", "output": 3}""",
            /* 7 */ """{"messages": [{"role": "wizard", "content": "?"}, {"role": "assistant", "content": "!"}]}""",
            /* 8 */ """[1, 2]""",
            /* 9 */ """{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "S"}""",
            /* 10 */ """{"messages": [{"role": "user", "content": [{"type": "text", "value": "par"}, {"type": "text", "text": "ts"}]}, {"role": "assistant", "content": [{"type": "text", "value": "ok"}]}]}""",
            /* 11 */ """{"messages": [{"role": "user", "content": "only a question"}]}""",
            /* 12 */ """{"text": "pretraining text"}""",
        }) + "\r\n");

        var r = DatasetReader.Read(path);

        Assert.Equal(5, r.Records.Count);
        Assert.Equal($"{path}:1", r.Records[0].Location);
        Assert.Equal(RecordFormat.Alpaca, r.Records[0].Format);
        Assert.Equal(("Add", "2 and 3", "5"), (r.Records[0].Instruction, r.Records[0].Input, r.Records[0].Output));
        Assert.Equal(new[] { new ChatMessage("system", "Be brief."), new ChatMessage("user", "Hi"), new ChatMessage("assistant", "Hello") }, r.Records[1].Messages);
        Assert.Equal($"{path}:9", r.Records[2].Location);
        Assert.Equal(new[] { new ChatMessage("system", "S"), new ChatMessage("user", "Q"), new ChatMessage("assistant", "A") }, r.Records[2].Messages);
        Assert.Equal(new[] { new ChatMessage("user", "parts"), new ChatMessage("assistant", "ok") }, r.Records[3].Messages);

        var byLine = r.Issues.ToDictionary(i => i.Location, i => i.Message);
        Assert.Equal(DatasetRecord.Raw("pretraining text", $"{path}:12").Text, r.Records[4].Text);
        Assert.Equal(RecordFormat.Text, r.Records[4].Format);
        Assert.Equal(new[] { 3, 4, 6, 7, 8, 11 }.Select(l => $"{path}:{l}"), r.Issues.Select(i => i.Location));
        Assert.Contains("invalid JSON", byLine[$"{path}:3"]);
        Assert.Contains("missing field \"output\"", byLine[$"{path}:4"]);
        Assert.Contains("\"output\" must be a string, found a number", byLine[$"{path}:6"]);
        Assert.Contains("\"wizard\" is not a known role", byLine[$"{path}:7"]);
        Assert.Contains("expected a JSON object, found an array", byLine[$"{path}:8"]);
        Assert.Contains("no assistant turn", byLine[$"{path}:11"]);
    }

    [Fact]
    public void Json_array_reports_the_record_index_and_its_line()
    {
        using var tmp = new TempDir();
        string path = tmp.File("data.json", """
            [
              {"instruction": "a", "input": "", "output": "A"},
              {
                "instruction": "b",
                "output": "B"
              },
              {
                "instruction": ["not", "a", "string"],
                "output": "C"
              },
              {"instruction": "d", "input": null, "output": "D"}
            ]
            """);

        var r = DatasetReader.Read(path);

        Assert.Equal(new[] { "A", "B", "D" }, r.Records.Select(x => x.Output));
        Assert.Equal($"{path}:3 (record 1)", r.Records[1].Location);
        Assert.Equal($"{path}:11 (record 3)", r.Records[2].Location);
        var issue = Assert.Single(r.Issues);
        Assert.Equal($"{path}:7 (record 2)", issue.Location);
        Assert.Contains("\"instruction\" must be a string, found an array", issue.Message);
    }

    [Fact]
    public void Json_array_syntax_error_keeps_earlier_records_and_names_the_line()
    {
        using var tmp = new TempDir();
        string path = tmp.File("broken.json", "[\n{\"instruction\": \"a\", \"output\": \"A\"},\n{\"instruction\": \"b\" \"output\": \"B\"},\n{\"instruction\": \"c\", \"output\": \"C\"}\n]");

        var r = DatasetReader.Read(path);

        Assert.Equal("A", Assert.Single(r.Records).Output);
        var issue = Assert.Single(r.Issues);
        Assert.StartsWith($"{path}:3 (record 1)", issue.Location);
        Assert.Contains("invalid JSON", issue.Message);
    }

    [Fact]
    public void A_json_file_may_hold_one_pretty_printed_record_or_json_lines()
    {
        using var tmp = new TempDir();
        string single = tmp.File("one.json", "\n{\n  \"instruction\": \"a\",\n  \"output\": 1\n}\n");
        var r = DatasetReader.Read(single);
        Assert.Empty(r.Records);
        Assert.Equal($"{single}:2 (record 0)", Assert.Single(r.Issues).Location);

        string lines = tmp.File("lines.json", "{\"instruction\": \"a\", \"output\": \"A\"}\n{\"instruction\": \"b\", \"output\": \"B\"}\n");
        Assert.Equal(new[] { "A", "B" }, DatasetReader.Read(lines).Records.Select(x => x.Output));

        // .jsonl is always line by line, even when a line is an array.
        string jl = tmp.File("arr.jsonl", "[{\"instruction\": \"a\", \"output\": \"A\"}]\n{\"instruction\": \"b\", \"output\": \"B\"}\n");
        var rj = DatasetReader.Read(jl);
        Assert.Equal("B", Assert.Single(rj.Records).Output);
        Assert.Equal($"{jl}:1", Assert.Single(rj.Issues).Location);
    }

    [Fact]
    public void Empty_file_is_an_issue_and_a_missing_file_an_error()
    {
        using var tmp = new TempDir();
        var r = DatasetReader.Read(tmp.File("empty.jsonl", "  \n"));
        Assert.Empty(r.Records);
        Assert.Contains("empty", Assert.Single(r.Issues).Message);
        var e = Assert.Throws<FileNotFoundException>(() => DatasetReader.Read(Path.Combine(tmp.Path, "nope.json")));
        Assert.Contains("nope.json", e.Message);
    }

    [SkippableTheory]
    [InlineData("alpaca_en_demo.json", 999, RecordFormat.Alpaca)]
    [InlineData("identity.json", 91, RecordFormat.Alpaca)]
    [InlineData("glaive_toolcall_en_demo.json", 300, RecordFormat.Chat)]
    [InlineData("kto_en_demo.json", 300, RecordFormat.Chat)]
    [InlineData("v1_sft_demo.jsonl", 500, RecordFormat.Chat)]
    [InlineData("reason_tool_use_demo_50.jsonl", 50, RecordFormat.Chat)]
    [InlineData("alpaca_zh_demo.json", 1000, RecordFormat.Alpaca)]
    [InlineData("glaive_toolcall_zh_demo.json", 300, RecordFormat.Chat)]
    [InlineData("wiki_demo.txt", 30, RecordFormat.Text)]
    public void Reads_the_real_llama_factory_demo_datasets(string file, int records, RecordFormat format)
    {
        string path = PeftAssets.Require("datasets", "llama-factory", file);
        var r = DatasetReader.Read(path);
        Assert.Empty(r.Issues);
        Assert.Equal(records, r.Records.Count);
        Assert.All(r.Records, x => Assert.Equal(format, x.Format));
    }

    [SkippableFact]
    public void Pretraining_text_records_are_read_as_raw_text()
    {
        string path = PeftAssets.Require("datasets", "llama-factory", "c4_demo.jsonl");
        var r = DatasetReader.Read(path);
        Assert.Empty(r.Issues);
        Assert.Equal(300, r.Records.Count);
        Assert.All(r.Records, x => Assert.Equal(RecordFormat.Text, x.Format));
        Assert.Equal($"{path}:1", r.Records[0].Location);
    }
}
