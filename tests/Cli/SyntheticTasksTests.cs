using System.Text.Json;
using FineTuneNative.Peft.Data;

namespace FineTuneNative.Tests.Cli;

public class SyntheticTasksTests
{
    [Fact]
    public void ExampleDependsOnlyOnSeedAndIndex()
    {
        var tasks = SyntheticTasks.PretrainTasks;
        var all = SyntheticTasks.Stream(11, tasks, 0, 200).ToList();
        var tail = SyntheticTasks.Stream(11, tasks, 150, 50).ToList();
        Assert.Equal(all.Skip(150), tail);
        Assert.Equal(all[37], SyntheticTasks.Generate(11, 37, tasks));
        var other = SyntheticTasks.Stream(12, tasks, 0, 200).ToList();
        Assert.True(all.Zip(other).Count(p => p.First == p.Second) < 20, "different seeds should give different streams");
    }

    [Fact]
    public void EveryTaskAppears_AndHeldOutTasksNeverAppearInPretraining()
    {
        var pre = SyntheticTasks.Stream(1, SyntheticTasks.PretrainTasks, 0, 2000).ToList();
        Assert.Equal(SyntheticTasks.PretrainTasks.OrderBy(x => x), pre.Select(e => e.Task).Distinct().OrderBy(x => x));
        var heldOutInstructions = SyntheticTasks.HeldOutTasks
            .Select(t => SyntheticTasks.Generate(1, 0, new[] { t }).Instruction).ToHashSet();
        Assert.DoesNotContain(pre, e => heldOutInstructions.Contains(e.Instruction));
    }

    // Hand-checked answers: every task's output is recomputed here from its input, independently of the generator.
    [Fact]
    public void AnswersAreCorrect()
    {
        foreach (var e in SyntheticTasks.Stream(5, SyntheticTasks.AllTasks.ToArray(), 0, 3000))
        {
            var w = e.Input.Split(' ');
            string expected = e.Task switch
            {
                "copy" => e.Input,
                "reverse" => string.Join(' ', w.Reverse()),
                "sort" => string.Join(' ', w.OrderBy(x => x, StringComparer.Ordinal)),
                "upper" => e.Input.ToUpperInvariant(),
                "first" => w[0],
                "last" => w[^1],
                "count" => w.Length.ToString(),
                "drop_first" => string.Join(' ', w.Skip(1)),
                "add" => (int.Parse(w[0]) + int.Parse(w[1])).ToString(),
                "sort_digits" => string.Join(' ', w.Select(int.Parse).Order()),
                "max_digit" => w.Select(int.Parse).Max().ToString(),
                "count_plus_one" => (w.Length + 1).ToString(),
                "repeat_twice" => string.Join(' ', w.SelectMany(x => new[] { x, x })),
                "swap_ends" => string.Join(' ', new[] { w[^1] }.Concat(w[1..^1]).Append(w[0])),
                _ => throw new InvalidOperationException(e.Task),
            };
            Assert.True(expected == e.Output, $"{e.Task}: '{e.Input}' -> '{e.Output}', expected '{expected}'");
        }
    }

    [Fact]
    public void JsonLineIsAlpaca()
    {
        var e = new SyntheticExample("copy", "Say \"hi\".", "a b", "a b");
        using var doc = JsonDocument.Parse(SyntheticTasks.ToJsonLine(e));
        Assert.Equal("Say \"hi\".", doc.RootElement.GetProperty("instruction").GetString());
        Assert.Equal("a b", doc.RootElement.GetProperty("input").GetString());
        Assert.Equal("a b", doc.RootElement.GetProperty("output").GetString());
    }

    [Theory]
    [InlineData("pretrain", 11)]
    [InlineData("heldout", 3)]
    [InlineData("all", 14)]
    [InlineData("copy, reverse,copy", 2)]
    public void ParseTasks(string spec, int count) => Assert.Equal(count, SyntheticTasks.ParseTasks(spec).Length);

    [Fact]
    public void ParseTasks_RejectsUnknownNames()
    {
        var e = Assert.Throws<ArgumentException>(() => SyntheticTasks.ParseTasks("copy,jump"));
        Assert.Contains("'jump'", e.Message);
    }
}
