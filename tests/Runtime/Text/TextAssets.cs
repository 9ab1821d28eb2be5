using System.Text;

namespace FineTuneNative.Tests.Runtime.Text;

/// <summary>Locates ../shared/assets (read-only real tokenizers and test vectors) and reads llama.cpp's vectors.</summary>
internal static class TextAssets
{
    private static readonly Lazy<string?> Root = new(() =>
    {
        // Walk up from the test binary: <repo>/../shared/assets for /work/main, and further up for worktrees.
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
        {
            var p = Path.Combine(d.FullName, "shared", "assets");
            if (Directory.Exists(p)) return p;
        }
        return null;
    });

    public static string? Dir => Root.Value;

    /// <summary>Path under shared/assets; skips the test (visibly) when the folder or file is absent.</summary>
    public static string Require(string relative)
    {
        Skip.If(Dir == null, "../shared/assets not found (walked up from the test binary): real tokenizer tests skipped");
        var p = Path.Combine(Dir!, relative);
        Skip.If(!File.Exists(p) && !Directory.Exists(p), $"{p} is absent: test skipped");
        return p;
    }

    public const string Separator = "\n__ggml_vocab_test__\n";

    /// <summary>llama.cpp's ggml-vocab-*.gguf.inp/.out: inputs split on the separator (the final empty piece
    /// dropped), expected ids one line per input, no BOS.</summary>
    public static List<(string Text, int[] Ids)> LlamaCppCases(string vocab)
    {
        var inp = File.ReadAllText(Require($"llama-cpp-vocab/ggml-vocab-{vocab}.gguf.inp"), Encoding.UTF8);
        var outLines = File.ReadAllText(Require($"llama-cpp-vocab/ggml-vocab-{vocab}.gguf.out"), Encoding.UTF8).Split('\n');
        var texts = inp.Split(Separator);
        Assert.Equal("", texts[^1]);
        texts = texts[..^1];
        Assert.True(outLines.Length >= texts.Length, $"{vocab}: {texts.Length} inputs but {outLines.Length} output lines");
        var cases = new List<(string, int[])>();
        for (int i = 0; i < texts.Length; i++)
            cases.Add((texts[i], outLines[i].Split(' ', StringSplitOptions.RemoveEmptyEntries).Select(int.Parse).ToArray()));
        return cases;
    }

    public static string Show(string s) =>
        "\"" + string.Concat(s.Select(c => c switch { '\n' => "\\n", '\t' => "\\t", '\r' => "\\r", _ when c < ' ' => $"\\x{(int)c:X2}", _ => c.ToString() })) + "\"";
}
