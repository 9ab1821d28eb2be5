using FineTuneNative.Kernels;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Cli;

/// <summary>Loads the model and tokenizer a command names (or the embedded default) with user-level errors.</summary>
internal static class ModelSource
{
    /// <summary>The model path: the one given, else the embedded models/ftn-tiny.</summary>
    public static string Resolve(string? model) => model is null ? EmbeddedDefault.ModelPath : CliCommon.RequireModelPath(model);

    /// <summary>The model at <paramref name="path"/>; linear weights in <paramref name="linearDType"/> (null: as in the file).</summary>
    public static LoadedModel Load(string path, IBackend backend, DType? linearDType = null)
    {
        try { return ModelLoader.Load(path, backend, linearDType); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException or InvalidDataException or NotSupportedException)
        {
            throw new UserError($"cannot load model '{path}': {Program.OneLine(e.Message)}");
        }
    }

    /// <summary>
    /// The tokenizer: <paramref name="explicitPath"/> when given, else the one next to the model (the model directory,
    /// or tokenizer.bin / tokenizer.model beside a llama2.c checkpoint).
    /// </summary>
    public static ITextTokenizer LoadTokenizer(string modelPath, string? explicitPath)
    {
        string where = explicitPath ?? (Directory.Exists(modelPath) ? modelPath : FindBeside(modelPath));
        if (explicitPath is not null && !File.Exists(explicitPath) && !Directory.Exists(explicitPath))
            throw new UserError($"tokenizer '{explicitPath}' not found");
        try { return TokenizerLoader.Load(where); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException or InvalidDataException or NotSupportedException or ArgumentException)
        {
            throw new UserError($"cannot load the tokenizer from '{where}': {Program.OneLine(e.Message)}" +
                                (explicitPath is null ? " (pass --tokenizer PATH)" : ""));
        }
    }

    private static string FindBeside(string file)
    {
        string dir = Path.GetDirectoryName(Path.GetFullPath(file)) ?? ".";
        foreach (var name in new[] { "tokenizer.json", "tokenizer.model", "tokenizer.bin" })
            if (File.Exists(Path.Combine(dir, name))) return Path.Combine(dir, name);
        var bins = Directory.GetFiles(dir, "tok*.bin");
        if (bins.Length == 1) return bins[0];
        throw new UserError($"no tokenizer found beside '{file}' (pass --tokenizer PATH)");
    }

    /// <summary>
    /// A writable f32 copy of <paramref name="w"/> on the same backend. Loaded weights may be read-only views of
    /// a memory-mapped file; merging an adapter writes into them, so it merges into this copy instead.
    /// </summary>
    public static LlamaWeights CloneWritable(LlamaWeights w, IBackend backend)
    {
        var copy = LlamaWeights.Allocate(w.Config, backend, DType.F32);
        var src = w.Named().ToList();
        var dst = copy.Named().ToList();
        if (src.Count != dst.Count) throw new InvalidOperationException("weight tables differ");
        for (int i = 0; i < src.Count; i++)
        {
            if (src[i].Name != dst[i].Name) throw new InvalidOperationException($"weight order differs: {src[i].Name} vs {dst[i].Name}");
            backend.Copy(dst[i].Tensor, src[i].Tensor);
        }
        return copy;
    }
}
