using CommandLine;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Cli;

[Verb("info", HelpText = "Describe a model: architecture, parameter count, dtypes per tensor group, tokenizer, file format.")]
public sealed class InfoOptions
{
    [Option("model", MetaValue = "PATH",
        HelpText = "Hugging Face model directory (config.json + safetensors) or llama2.c .bin checkpoint. Default: the embedded models/ftn-tiny.")]
    public string? Model { get; set; }

    [Option("tokenizer", MetaValue = "PATH",
        HelpText = "Tokenizer file or directory (default: the one next to the model).")]
    public string? Tokenizer { get; set; }
}

/// <summary><c>ftn info</c>: what a model is.</summary>
public static class InfoCommand
{
    public static int Run(InfoOptions o, TextWriter stdout)
    {
        string path = ModelSource.Resolve(o.Model);
        using var backend = Backends.Create("cpu:1");
        using var loaded = ModelSource.Load(path, backend);
        string tokenizer;
        try { tokenizer = Program.OneLine(ModelSource.LoadTokenizer(path, o.Tokenizer).Describe()); }
        catch (UserError e) when (o.Tokenizer is null) { tokenizer = $"none ({e.Message})"; }
        foreach (var line in Describe(loaded, tokenizer)) stdout.WriteLine(line);
        return 0;
    }

    /// <summary>The lines <c>ftn info</c> prints.</summary>
    public static IEnumerable<string> Describe(LoadedModel m, string tokenizer)
    {
        var w = m.Weights;
        var c = w.Config;
        yield return $"model        {m.Path}";
        yield return $"format       {FormatName(m)}";
        yield return $"architecture {c.Architecture} (model_type {c.ModelType})";
        yield return $"shape        L={c.NumLayers} C={c.HiddenSize} F={c.IntermediateSize} NH={c.NumHeads} NKV={c.NumKvHeads} HS={c.HeadDim} V={c.VocabSize}";
        yield return $"attention    {(c.NumKvHeads == c.NumHeads ? "multi-head" : c.NumKvHeads == 1 ? "multi-query" : $"grouped-query ({c.NumHeads / c.NumKvHeads} query heads per kv head)")}, " +
                     $"rope theta {CliCommon.F(c.RopeTheta, "0.###")} ({(c.RopeLayout == RopeLayout.RotateHalf ? "rotate-half" : "interleaved")}), q/k/v bias {(c.AttentionBias ? "yes" : "no")}";
        yield return $"other        rms_norm_eps {c.RmsNormEps:g}, max positions {c.MaxPositions}, tied embeddings {(c.TieWordEmbeddings ? "yes" : "no")}, " +
                     $"bos {c.BosTokenId?.ToString() ?? "-"}, eos {(c.EosTokenIds.Length == 0 ? "-" : string.Join(",", c.EosTokenIds))}";

        var groups = new (string Name, Func<string, bool> Match)[]
        {
            ("embedding", n => n.StartsWith("model.embed_tokens", StringComparison.Ordinal)),
            ("attention", n => n.Contains(".self_attn.", StringComparison.Ordinal)),
            ("mlp", n => n.Contains(".mlp.", StringComparison.Ordinal)),
            ("norms", n => n.EndsWith("norm.weight", StringComparison.Ordinal)),
            ("lm_head", n => n.StartsWith("lm_head", StringComparison.Ordinal)),
        };
        var named = w.Named().ToList();
        long total = named.Sum(p => p.Tensor.Length);
        yield return $"parameters   {CliCommon.Count(total)} ({total:N0})";
        foreach (var (name, match) in groups)
        {
            var members = named.Where(p => match(p.Name)).ToList();
            if (members.Count == 0)
            {
                if (name == "lm_head") yield return "  lm_head    tied to the embedding";
                continue;
            }
            long n = members.Sum(p => p.Tensor.Length);
            var stored = members.Select(p => m.SourceDTypes.TryGetValue(p.Name, out var d) ? d : "?").Distinct().OrderBy(x => x, StringComparer.Ordinal);
            var loaded = members.Select(p => p.Tensor.DType.Name()).Distinct().OrderBy(x => x, StringComparer.Ordinal);
            yield return $"  {name,-10} {CliCommon.Count(n),8}  {members.Count,3} tensors  stored {string.Join("/", stored)}, loaded as {string.Join("/", loaded)}";
        }
        yield return $"tokenizer    {tokenizer}";
        if (Directory.Exists(m.Path))
        {
            var files = Directory.GetFiles(m.Path).Select(Path.GetFileName).OrderBy(f => f, StringComparer.Ordinal)
                .Select(f => $"{f} ({CliCommon.Bytes(new FileInfo(Path.Combine(m.Path, f!)).Length)})");
            yield return $"files        {string.Join(", ", files)}";
        }
        else yield return $"file         {Path.GetFileName(m.Path)} ({CliCommon.Bytes(new FileInfo(m.Path).Length)})";
    }

    private static string FormatName(LoadedModel m) => m.Format switch
    {
        "hf" => File.Exists(Path.Combine(m.Path, "model.safetensors.index.json"))
            ? "Hugging Face directory, sharded safetensors" : "Hugging Face directory, safetensors",
        "llama2c" => "llama2.c checkpoint (.bin)",
        var f => f,
    };
}
