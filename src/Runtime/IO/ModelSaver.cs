using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Runtime.IO;

/// <summary>Writes weights as a Hugging Face model directory (config.json + model.safetensors).</summary>
public static class ModelSaver
{
    /// <summary>Metadata key recording that q/k rows were permuted from the interleaved RoPE layout.</summary>
    public const string RopePermutationKey = "ftn.rope_permutation";

    /// <summary>Metadata key recording which quantized tensors were written dequantized, and from which format.</summary>
    public const string DequantizedKey = "ftn.dequantized";

    /// <summary>
    /// Writes <paramref name="dir"/>/config.json and <paramref name="dir"/>/model.safetensors, each through a
    /// temporary file and a rename. Tensors keep their own dtype unless <paramref name="dtype"/> is given
    /// (F32, BF16 or F16 for every tensor). A model in the interleaved RoPE layout (llama2.c) is written in
    /// Hugging Face's rotate-half layout: the rows of each head of q_proj/k_proj (and their biases) are
    /// permuted so that pair (2i, 2i+1) becomes (i, i + HS/2), the permutation Meta-to-HF converters apply;
    /// the safetensors metadata records it under <see cref="RopePermutationKey"/>.
    /// <para>Quantized tensors (an NF4 QLoRA base, Q8_0/Q4_0) have no Hugging Face safetensors dtype: they are written
    /// dequantized (the values their matmuls compute with), in <paramref name="dtype"/> or else in the dtype of the
    /// model's unquantized float tensors (the precision the base was loaded in); the metadata lists them under
    /// <see cref="DequantizedKey"/>.</para>
    /// </summary>
    public static void SaveHf(LlamaWeights w, string dir, DType? dtype = null, IDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(w);
        if (dtype is DType d && d is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"safetensors weights can be written as f32, bf16 or f16, not {d.Name()}", nameof(dtype));
        var cfg = w.Config;
        bool permute = cfg.RopeLayout == RopeLayout.Interleaved;
        var schema = LlamaWeights.Schema(cfg).ToDictionary(s => s.Name, s => s.Shape, StringComparer.Ordinal);

        // the precision of the unquantized float tensors (embedding, norms...): quantized ones are written back in it
        var floatDType = w.Named().Select(p => p.Tensor.DType).FirstOrDefault(x => x is DType.F32 or DType.BF16 or DType.F16, DType.F32);
        var dequantized = new SortedDictionary<string, int>(StringComparer.Ordinal); // format -> tensors
        var sources = new List<SafeTensorSource>();
        foreach (var (name, t) in w.Named())
        {
            if (!schema.TryGetValue(name, out var shape))
                throw new InvalidOperationException($"tensor '{name}' is not in the schema of this config");
            if (t.Length != shape.Aggregate(1L, (a, b) => a * b))
                throw new InvalidOperationException($"tensor '{name}' has {t.Length} elements, the schema says [{string.Join(", ", shape)}]");
            int heads = 0;
            if (permute && (name.Contains(".q_proj.", StringComparison.Ordinal) || name.Contains(".k_proj.", StringComparison.Ordinal)))
                heads = name.Contains(".q_proj.", StringComparison.Ordinal) ? cfg.NumHeads : cfg.NumKvHeads;
            var tensor = t;
            int h = heads;
            bool quantized = t.DType.IsQuantized();
            if (quantized) dequantized[t.DType.Name()] = dequantized.GetValueOrDefault(t.DType.Name()) + 1;
            sources.Add(new SafeTensorSource(name, dtype ?? (quantized ? floatDType : t.DType), shape, () =>
            {
                var data = quantized ? QuantBlocks.ToFloats(tensor) : tensor.ToArray();
                return h > 0 ? InterleavedToRotateHalf(data, h, cfg.HeadDim) : data;
            }));
        }

        var meta = new Dictionary<string, string> { ["format"] = "pt" };
        if (permute) meta[RopePermutationKey] = "q_proj/k_proj rows permuted from interleaved (llama2.c/Meta) to rotate-half (Hugging Face)";
        if (dequantized.Count > 0)
            meta[DequantizedKey] = string.Join("; ", dequantized.Select(kv => $"{kv.Value} {kv.Key} tensors written as {(dtype ?? floatDType).Name()}")) +
                                   (dequantized.ContainsKey(DType.NF4.Name()) ? " (NF4: bitsandbytes layout, 64-element blocks, double-quantized absmax)" : "");
        if (metadata is not null) foreach (var kv in metadata) meta[kv.Key] = kv.Value;

        var linear = dtype ?? (w.Layers[0].Wq.DType.IsQuantized() ? floatDType : w.Layers[0].Wq.DType);
        var outCfg = cfg with
        {
            RopeLayout = RopeLayout.RotateHalf,
            TorchDtype = linear switch { DType.BF16 => "bfloat16", DType.F16 => "float16", _ => "float32" },
        };
        Directory.CreateDirectory(dir);
        SafeTensors.Write(Path.Combine(dir, "model.safetensors"), sources, meta);
        SafeTensors.WriteAllTextAtomic(Path.Combine(dir, "config.json"), outCfg.ToHfJson());
    }

    /// <summary>
    /// Reorders the rows of a (heads·HS, cols) matrix (or a heads·HS vector, cols = 1) head by head:
    /// new row h·HS + j·HS/2 + i = old row h·HS + 2i + j (j ∈ {0, 1}).
    /// </summary>
    public static float[] InterleavedToRotateHalf(float[] data, int heads, int headSize)
    {
        int rows = heads * headSize;
        if (data.Length % rows != 0) throw new ArgumentException($"{data.Length} values are not {rows} rows");
        int cols = data.Length / rows, half = headSize / 2;
        var o = new float[data.Length];
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
                for (int j = 0; j < 2; j++)
                    Array.Copy(data, (long)(h * headSize + 2 * i + j) * cols, o, (long)(h * headSize + j * half + i) * cols, cols);
        return o;
    }

    /// <summary>The inverse of <see cref="InterleavedToRotateHalf"/>.</summary>
    public static float[] RotateHalfToInterleaved(float[] data, int heads, int headSize)
    {
        int rows = heads * headSize;
        if (data.Length % rows != 0) throw new ArgumentException($"{data.Length} values are not {rows} rows");
        int cols = data.Length / rows, half = headSize / 2;
        var o = new float[data.Length];
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++)
                for (int j = 0; j < 2; j++)
                    Array.Copy(data, (long)(h * headSize + j * half + i) * cols, o, (long)(h * headSize + 2 * i + j) * cols, cols);
        return o;
    }
}
