using FineTuneNative.Peft.Data;
using Xunit;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Parquet datasets with nested columns, written by an independent implementation (arrow-rs through parquet-wasm,
/// tests/reference/parquet_nested.mjs): messages as list&lt;struct&lt;role, content&gt;&gt; and ShareGPT conversations as
/// list&lt;struct&lt;from, value&gt;&gt; with a system column, two rows per row group, Snappy.
/// </summary>
public class ParquetNestedTests
{
    private static string Fixture(string name)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string p = Path.Combine(dir.FullName, "tests", "Fixtures", "parquet", name);
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException($"tests/Fixtures/parquet/{name} not found above {AppContext.BaseDirectory}");
    }

    [Fact]
    public void Messages_list_of_struct_column_reads_as_chat_records()
    {
        string path = Fixture("messages_nested.parquet");
        var r = DatasetReader.Read(path);
        // rows 0-1 are conversations; row 2 has no assistant turn, row 3 is a null list, row 4 an assistant turn whose
        // content is null: each reported with its row
        Assert.Equal(2, r.Records.Count);
        var c0 = r.Records[0].AsMessages();
        Assert.Equal(new[] { "system", "user", "assistant" }, c0.Select(m => m.Role));
        Assert.Equal(new[] { "Be brief.", "Hi", "Hello!" }, c0.Select(m => m.Content));
        var c1 = r.Records[1].AsMessages();
        Assert.Equal("Übersetze \"ja\" — 你好\nbitte", c1[0].Content);
        Assert.Equal(new[] { "user", "assistant", "user", "assistant" }, c1.Select(m => m.Role));
        Assert.Equal("no", c1[3].Content);
        Assert.Equal(new[] { $"{path}: row 0", $"{path}: row 1" }, r.Records.Select(x => x.Location));
        Assert.Equal(new[] { $"{path}: row 2", $"{path}: row 3", $"{path}: row 4" }, r.Issues.Select(i => i.Location));
        Assert.Contains("no assistant turn", r.Issues[0].Message);
        Assert.Contains("must be an array, found null", r.Issues[1].Message);
        Assert.Contains("messages[1]", r.Issues[2].Message);
    }

    [Fact]
    public void Sharegpt_conversations_with_a_system_column_read_as_chat_records()
    {
        string path = Fixture("sharegpt_nested.parquet");
        var r = DatasetReader.Read(path);
        Assert.Empty(r.Issues);
        Assert.Equal(3, r.Records.Count);
        var c0 = r.Records[0].AsMessages();
        Assert.Equal(new[] { "system", "user", "assistant" }, c0.Select(m => m.Role));
        Assert.Equal(new[] { "You are a calculator.", "What is 2+2?", "4" }, c0.Select(m => m.Content));
        Assert.Equal(new[] { "user", "assistant", "user", "assistant" }, r.Records[1].AsMessages().Select(m => m.Role));   // null system: none
        var c2 = r.Records[2].AsMessages();
        Assert.Equal(new[] { "system", "user", "assistant", "tool", "assistant" }, c2.Select(m => m.Role));  // function_call, observation
        Assert.Equal("sunny", c2[3].Content);
        Assert.Equal($"{path}: row 2", r.Records[2].Location);   // the third row is in the second row group
    }
}
