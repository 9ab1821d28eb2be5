using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Runtime.IO;

/// <summary>
/// A model read from disk: its weights on a backend, where it came from, the dtype each tensor had in the
/// file, and its tokenizer when one sits next to it. Disposing releases the weights and the file mapping.
/// </summary>
public sealed class LoadedModel : IDisposable
{
    private readonly List<IDisposable> _resources;
    private bool _disposed;

    internal LoadedModel(LlamaWeights weights, string path, string format, IReadOnlyDictionary<string, string> sourceDTypes,
        int zeroCopyTensors, List<IDisposable> resources)
    {
        Weights = weights;
        Path = path;
        Format = format;
        SourceDTypes = sourceDTypes;
        ZeroCopyTensors = zeroCopyTensors;
        _resources = resources;
    }

    public LlamaWeights Weights { get; }
    /// <summary>The model directory (HF) or checkpoint file (llama2.c).</summary>
    public string Path { get; }
    /// <summary>"hf" or "llama2c".</summary>
    public string Format { get; }
    /// <summary>HF tensor name -> dtype in the file ("F32", "BF16", "F16").</summary>
    public IReadOnlyDictionary<string, string> SourceDTypes { get; }
    /// <summary>The tokenizer found next to the model (or given explicitly); null when there is none.</summary>
    public ITextTokenizer? Tokenizer { get; internal set; }
    /// <summary>How many parameters are zero-copy views over the memory-mapped file (CPU backend only).</summary>
    public int ZeroCopyTensors { get; }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Weights.Dispose();
        for (int i = _resources.Count - 1; i >= 0; i--) _resources[i].Dispose();
    }
}
