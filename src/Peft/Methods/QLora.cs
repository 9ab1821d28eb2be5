using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>What quantizing a base model for QLoRA changed: the new weights and the memory they take.</summary>
/// <param name="Weights">The base with NF4 linear projections; the other tensors are shared with the source.</param>
/// <param name="LinearBytesBefore">Bytes of the seven projections of every layer before (f32 or bf16).</param>
/// <param name="LinearBytesAfter">Bytes of the same projections in NF4 (codes + double-quantised statistics).</param>
/// <param name="TotalBytesBefore">Bytes of every base parameter before.</param>
/// <param name="TotalBytesAfter">Bytes of every base parameter after.</param>
public sealed record QuantizedBase(LlamaWeights Weights, long LinearBytesBefore, long LinearBytesAfter, long TotalBytesBefore, long TotalBytesAfter)
{
    public string Describe() =>
        $"NF4 base: linear weights {LinearBytesBefore / 1048576.0:F2} MiB -> {LinearBytesAfter / 1048576.0:F2} MiB " +
        $"({(double)LinearBytesBefore / Math.Max(1, LinearBytesAfter):F2}x smaller); all base parameters {TotalBytesBefore / 1048576.0:F2} MiB -> " +
        $"{TotalBytesAfter / 1048576.0:F2} MiB (saved {(TotalBytesBefore - TotalBytesAfter) / 1048576.0:F2} MiB)";
}

/// <summary>
/// QLoRA (Dettmers et al. 2023): the frozen base's linear projections stored in NF4 (bitsandbytes layout, see
/// <see cref="Nf4"/>) and dequantized inside every matmul; the LoRA (or DoRA) adapter on top stays f32.
/// </summary>
/// <remarks>
/// Like bitsandbytes' Linear4bit replacement in QLoRA/PEFT, only the seven projections of each layer are quantized:
/// the embedding, the norms, the biases and the LM head stay in their precision. Training then runs the ordinary
/// LoRA/DoRA backward: the base gradient dx = dy·W dequantizes W per row panel; the base gets no gradient
/// (LlamaModel refuses TrainBase on a quantized base).
/// </remarks>
public static class QLora
{
    /// <summary>Parses --base-quant: "nf4" (or "none"/"" for no quantization, returning null).</summary>
    public static DType? ParseBaseQuant(string? name) => name?.ToLowerInvariant() switch
    {
        null or "" or "none" => null,
        "nf4" => DType.NF4,
        _ => throw new ArgumentException($"unknown base quantization '{name}' (expected nf4 or none)"),
    };

    /// <summary>
    /// An f32 copy of <paramref name="w"/> with every NF4 weight dequantized (what PEFT merges a QLoRA adapter into:
    /// the dequantized base). Other tensors are copied.
    /// </summary>
    public static LlamaWeights DequantizedCopy(LlamaWeights w)
    {
        var b = w.Embedding.Backend;
        var copy = LlamaWeights.Allocate(w.Config, b, DType.F32);
        try
        {
            foreach (var ((name, src), (_, dst)) in w.Named().Zip(copy.Named()))
            {
                if (src.DType == DType.NF4) b.Upload(dst, Nf4.ToFloats(src));
                else b.Copy(dst, src);
            }
            return copy;
        }
        catch
        {
            copy.Dispose();
            throw;
        }
    }

    /// <summary>
    /// A base whose linear projections are NF4 copies of <paramref name="src"/>'s; the replaced source tensors are
    /// disposed (their memory is what QLoRA saves). The result shares every other tensor with <paramref name="src"/>:
    /// keep using (and disposing) either, not both for different purposes.
    /// </summary>
    public static QuantizedBase QuantizeBase(LlamaWeights src)
    {
        ArgumentNullException.ThrowIfNull(src);
        long totalBefore = src.Named().Sum(p => p.Tensor.Bytes);
        var b = src.Embedding.Backend;
        long before = 0, after = 0;
        var made = new List<Tensor>();
        var replaced = new List<Tensor>();
        Tensor Q(Tensor t)
        {
            if (t.DType == DType.NF4) return t;
            if (t.DType is not (DType.F32 or DType.BF16 or DType.F16))
                throw new ArgumentException($"QLoRA: {t.Describe()} is {t.DType.Name()}; the base must be f32, bf16 or f16 to quantize it to nf4");
            var host = new float[t.Length];
            b.Download(t, host);
            var bytes = Nf4.Quantize(host);
            var q = b.Allocate(DType.NF4, t.Shape);
            q.Name = t.Name;
            made.Add(q);
            b.UploadRaw(q, bytes);
            before += t.Bytes;
            after += q.Bytes;
            replaced.Add(t);
            return q;
        }
        try
        {
            var layers = src.Layers.Select(L => new LlamaLayerWeights
            {
                AttnNorm = L.AttnNorm, FfnNorm = L.FfnNorm, Bq = L.Bq, Bk = L.Bk, Bv = L.Bv,
                Wq = Q(L.Wq), Wk = Q(L.Wk), Wv = Q(L.Wv), Wo = Q(L.Wo), Wgate = Q(L.Wgate), Wup = Q(L.Wup), Wdown = Q(L.Wdown),
            }).ToArray();
            var weights = new LlamaWeights { Config = src.Config, Embedding = src.Embedding, Layers = layers, FinalNorm = src.FinalNorm, LmHead = src.LmHead };
            foreach (var t in replaced) t.Dispose();
            return new QuantizedBase(weights, before, after, totalBefore, weights.Named().Sum(p => p.Tensor.Bytes));
        }
        catch
        {
            foreach (var t in made) t.Dispose();
            throw;
        }
    }
}
