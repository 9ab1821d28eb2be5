namespace FineTuneNative.Tests.Runtime.IO;

/// <summary>Finds ../shared/assets (read-only real models and tokenizers) by walking up from the test binaries.</summary>
internal static class SharedAssets
{
    private static readonly Lazy<string?> Root = new(() =>
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            string candidate = Path.Combine(d.FullName, "shared", "assets");
            if (Directory.Exists(candidate)) return candidate;
        }
        return null;
    });

    /// <summary>The full path of an asset, or null (with the reason in <paramref name="why"/>) when it is absent.</summary>
    public static string? Find(string relative, out string why)
    {
        why = "";
        if (Root.Value is null) { why = $"../shared/assets not found above {AppContext.BaseDirectory}"; return null; }
        string p = Path.Combine(Root.Value, relative);
        if (!File.Exists(p) && !Directory.Exists(p)) { why = $"{p} is absent"; return null; }
        return p;
    }

    /// <summary>The path of an asset; skips the calling test (with the reason) when it is absent.</summary>
    public static string Require(string relative)
    {
        string? p = Find(relative, out string why);
        Skip.If(p is null, why);
        return p!;
    }
}
