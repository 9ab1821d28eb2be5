using System.Text;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// A byte-level tokenizer with hand-checkable ids for data tests: BOS = 1, EOS = 2, byte b = b + 3.
/// Every id is one UTF-8 byte, so expected token sequences can be written from the text alone.
/// </summary>
internal sealed class ByteTokenizer(bool dummyPrefix = false) : ITextTokenizer
{
    public const int Bos = 1, Eos = 2, Offset = 3;
    /// <summary>Like SentencePiece (add_dummy_prefix), every non-empty Encode starts with a space: segment
    /// boundaries then show in the ids, so code that encodes text in different pieces is caught.</summary>
    public bool DummyPrefix { get; } = dummyPrefix;
    public int VocabSize => 259;
    public int? BosId => Bos;
    public int? EosId => Eos;
    public IReadOnlyList<int> EosIds => new[] { Eos };

    public int[] Encode(string text, bool addBos = false)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        var ids = new List<int>();
        if (addBos) ids.Add(Bos);
        if (DummyPrefix && bytes.Length > 0) ids.Add(' ' + Offset);
        foreach (var b in bytes) ids.Add(b + Offset);
        return ids.ToArray();
    }

    public static int[] Ids(string text) => Encoding.UTF8.GetBytes(text).Select(b => b + Offset).ToArray();

    public string Decode(ReadOnlySpan<int> ids) => Decode(ids, false);

    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens)
    {
        var bytes = new List<byte>();
        var sb = new StringBuilder();
        foreach (int id in ids)
        {
            if (id >= Offset) { bytes.Add((byte)(id - Offset)); continue; }
            sb.Append(Encoding.UTF8.GetString(bytes.ToArray()));
            bytes.Clear();
            if (!skipSpecialTokens) sb.Append(id == Bos ? "<s>" : id == Eos ? "</s>" : "<unk>");
        }
        sb.Append(Encoding.UTF8.GetString(bytes.ToArray()));
        return sb.ToString();
    }

    public string Describe() => "test byte tokenizer (259 ids)";
    public int? TokenToId(string token) => token switch { "<s>" => Bos, "</s>" => Eos, _ => null };
    public string? IdToToken(int id) => id switch { 0 => "<unk>", Bos => "<s>", Eos => "</s>", >= Offset and < 259 => $"<0x{id - Offset:X2}>", _ => null };
    public bool IsSpecial(int id) => id < Offset;
}

/// <summary>Locates ../shared/assets (a sibling of the repository root) by walking up from the test binaries.</summary>
internal static class PeftAssets
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

    public static string? Dir => Root.Value;

    /// <summary>The path of an asset, or a skip (with the reason) when ../shared/assets or the file is absent.</summary>
    public static string Require(params string[] parts)
    {
        Skip.If(Dir is null, "../shared/assets not found next to the repository (real datasets/models are not available here)");
        string p = Path.Combine(new[] { Dir! }.Concat(parts).ToArray());
        Skip.If(!File.Exists(p) && !Directory.Exists(p), $"asset {p} not found");
        return p;
    }
}

/// <summary>A temporary directory deleted on dispose.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "ftn-peft-" + Guid.NewGuid().ToString("N")));
    public string Path { get; }
    public string File(string name, string content)
    {
        string p = System.IO.Path.Combine(Path, name);
        System.IO.File.WriteAllText(p, content);
        return p;
    }
    public void Dispose() { try { Directory.Delete(Path, true); } catch (IOException) { } }
}

/// <summary>
/// The CPU backend of the Peft model tests. CpuBackend is not safe for concurrent calls (shared per-thread scratch)
/// and xunit runs test classes in parallel, so these tests own an instance (not TestBackends' shared one) and run
/// one at a time in the "PeftModel" collection.
/// </summary>
internal static class PeftBackend
{
    private static readonly Lazy<IBackend> Instance = new(() => Backends.Create("cpu"));
    public static IBackend Cpu => Instance.Value;
}

[CollectionDefinition("PeftModel", DisableParallelization = true)]
public sealed class PeftModelCollection;
