using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Runtime.Inference;

/// <summary>
/// Makes an inference copy of a model with its linear weights (and the LM head) stored as f32, bf16, f16 (IEEE half,
/// f32 compute), Q8_0 or Q4_0, quantized by ftn itself in GGUF block layout (<see cref="Q8_0"/>, <see cref="Q4_0"/>).
/// </summary>
/// <remarks>
/// Norms, biases and the embedding table stay f32 (the embedding is read one row per token). A tied LM head gets
/// its own copy in the target type (the embedding stays f32 for lookups), like llama.cpp's quantized output
/// tensor. A matrix whose input size K is not a multiple of the 32-element block stays f32 and is listed in
/// <c>keptF32</c> (llama.cpp likewise falls back to another type for such rows).
/// </remarks>
public static class WeightQuantizer
{
    /// <summary>Parses "f32", "bf16", "f16", "q8_0", "q4_0" (case-insensitive).</summary>
    public static DType Parse(string name) => name.ToLowerInvariant() switch
    {
        "f32" => DType.F32,
        "bf16" => DType.BF16,
        "f16" => DType.F16,
        "q8_0" => DType.Q8_0,
        "q4_0" => DType.Q4_0,
        _ => throw new ArgumentException($"unknown weight precision '{name}' (expected f32, bf16, f16, q8_0 or q4_0)"),
    };

    public static LlamaWeights Quantize(LlamaWeights src, DType type, List<string>? keptF32 = null)
    {
        ArgumentNullException.ThrowIfNull(src);
        if (type is not (DType.F32 or DType.BF16 or DType.F16 or DType.Q8_0 or DType.Q4_0))
            throw new ArgumentException($"cannot store weights as {type.Name()} (expected f32, bf16, f16, q8_0 or q4_0)");
        var b = src.Embedding.Backend;
        var c = src.Config;
        var made = new List<Tensor>();

        Tensor Copy(Tensor t, DType d, int rows, int cols)
        {
            if (d.IsBlockQuantized() && cols % 32 != 0) { keptF32?.Add(t.Name ?? "tensor"); d = DType.F32; }
            var host = new float[t.Length];
            b.Download(t, host);
            var dst = b.Allocate(d, t.Shape);
            dst.Name = t.Name;
            made.Add(dst);
            if (!d.IsBlockQuantized()) { b.Upload(dst, host); return dst; }
            var bytes = new byte[d.StorageBytes(host.Length)];
            int rowBytes = (int)d.StorageBytes(cols);
            Parallel.For(0, rows, r => QuantBlocks.Quantize(d, host.AsSpan(r * cols, cols), bytes.AsSpan(r * rowBytes, rowBytes)));
            b.UploadRaw(dst, bytes);
            return dst;
        }
        Tensor? Opt(Tensor? t) => t is null ? null : Copy(t, DType.F32, 1, (int)t.Length);

        try
        {
            int C = c.HiddenSize, F = c.IntermediateSize, Q = c.QDim, KV = c.KvDim;
            var layers = src.Layers.Select(L => new LlamaLayerWeights
            {
                AttnNorm = Copy(L.AttnNorm, DType.F32, 1, C),
                Wq = Copy(L.Wq, type, Q, C), Wk = Copy(L.Wk, type, KV, C), Wv = Copy(L.Wv, type, KV, C),
                Bq = Opt(L.Bq), Bk = Opt(L.Bk), Bv = Opt(L.Bv),
                Wo = Copy(L.Wo, type, C, Q),
                FfnNorm = Copy(L.FfnNorm, DType.F32, 1, C),
                Wgate = Copy(L.Wgate, type, F, C), Wup = Copy(L.Wup, type, F, C), Wdown = Copy(L.Wdown, type, C, F),
            }).ToArray();
            var head = Copy(src.Output, type, c.VocabSize, C);
            if (src.LmHead is null) head.Name = "lm_head.weight";
            return new LlamaWeights
            {
                Config = c,
                Embedding = Copy(src.Embedding, DType.F32, c.VocabSize, C),
                Layers = layers,
                FinalNorm = Copy(src.FinalNorm, DType.F32, 1, C),
                LmHead = head,
            };
        }
        catch
        {
            foreach (var t in made) t.Dispose();
            throw;
        }
    }
}
