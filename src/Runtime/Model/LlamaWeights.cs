using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>The weights of one decoder layer. Linear weights are (out, in) as in nn.Linear.</summary>
public sealed class LlamaLayerWeights
{
    public required Tensor AttnNorm { get; init; }   // (C)
    public required Tensor Wq { get; init; }         // (NH·HS, C)
    public required Tensor Wk { get; init; }         // (NKV·HS, C)
    public required Tensor Wv { get; init; }         // (NKV·HS, C)
    public required Tensor Wo { get; init; }         // (C, NH·HS)
    public Tensor? Bq { get; init; }                 // (NH·HS) when attention_bias
    public Tensor? Bk { get; init; }                 // (NKV·HS)
    public Tensor? Bv { get; init; }                 // (NKV·HS)
    public required Tensor FfnNorm { get; init; }    // (C)
    public required Tensor Wgate { get; init; }      // (F, C)
    public required Tensor Wup { get; init; }        // (F, C)
    public required Tensor Wdown { get; init; }      // (C, F)

    /// <summary>The seven projections by their PEFT target-module names.</summary>
    public Tensor Linear(string module) => module switch
    {
        "q_proj" => Wq,
        "k_proj" => Wk,
        "v_proj" => Wv,
        "o_proj" => Wo,
        "gate_proj" => Wgate,
        "up_proj" => Wup,
        "down_proj" => Wdown,
        _ => throw new ArgumentException($"unknown linear module '{module}' (expected one of {string.Join(", ", LlamaWeights.LinearModules)})"),
    };

    public Tensor? LinearBias(string module) => module switch
    {
        "q_proj" => Bq,
        "k_proj" => Bk,
        "v_proj" => Bv,
        _ => null,
    };
}

/// <summary>
/// All parameters of a Llama-family model on one backend, with the one table that maps Hugging Face checkpoint
/// names to parameters and their shapes.
/// </summary>
public sealed class LlamaWeights : IDisposable
{
    /// <summary>PEFT target-module names of the seven linear projections, in layer order.</summary>
    public static readonly string[] LinearModules = { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" };

    public required LlamaConfig Config { get; init; }
    public required Tensor Embedding { get; init; }        // (V, C)  model.embed_tokens.weight
    public required LlamaLayerWeights[] Layers { get; init; }
    public required Tensor FinalNorm { get; init; }        // (C)     model.norm.weight
    /// <summary>(V, C) lm_head.weight; null when tied to <see cref="Embedding"/>.</summary>
    public Tensor? LmHead { get; init; }

    /// <summary>The LM head actually used (the embedding when tied).</summary>
    public Tensor Output => LmHead ?? Embedding;

    /// <summary>The module path of layer i's linear in HF naming ("model.layers.3.self_attn.q_proj").</summary>
    public static string LinearPath(int layer, string module) => module switch
    {
        "q_proj" or "k_proj" or "v_proj" or "o_proj" => $"model.layers.{layer}.self_attn.{module}",
        "gate_proj" or "up_proj" or "down_proj" => $"model.layers.{layer}.mlp.{module}",
        _ => throw new ArgumentException($"unknown linear module '{module}'"),
    };

    /// <summary>Expected HF name and shape of every parameter, in checkpoint order.</summary>
    public static IEnumerable<(string Name, int[] Shape)> Schema(LlamaConfig c)
    {
        yield return ("model.embed_tokens.weight", new[] { c.VocabSize, c.HiddenSize });
        for (int i = 0; i < c.NumLayers; i++)
        {
            string p = $"model.layers.{i}";
            yield return ($"{p}.input_layernorm.weight", new[] { c.HiddenSize });
            yield return ($"{p}.self_attn.q_proj.weight", new[] { c.QDim, c.HiddenSize });
            yield return ($"{p}.self_attn.k_proj.weight", new[] { c.KvDim, c.HiddenSize });
            yield return ($"{p}.self_attn.v_proj.weight", new[] { c.KvDim, c.HiddenSize });
            if (c.AttentionBias)
            {
                yield return ($"{p}.self_attn.q_proj.bias", new[] { c.QDim });
                yield return ($"{p}.self_attn.k_proj.bias", new[] { c.KvDim });
                yield return ($"{p}.self_attn.v_proj.bias", new[] { c.KvDim });
            }
            yield return ($"{p}.self_attn.o_proj.weight", new[] { c.HiddenSize, c.QDim });
            yield return ($"{p}.post_attention_layernorm.weight", new[] { c.HiddenSize });
            yield return ($"{p}.mlp.gate_proj.weight", new[] { c.IntermediateSize, c.HiddenSize });
            yield return ($"{p}.mlp.up_proj.weight", new[] { c.IntermediateSize, c.HiddenSize });
            yield return ($"{p}.mlp.down_proj.weight", new[] { c.HiddenSize, c.IntermediateSize });
        }
        yield return ("model.norm.weight", new[] { c.HiddenSize });
        if (!c.TieWordEmbeddings) yield return ("lm_head.weight", new[] { c.VocabSize, c.HiddenSize });
    }

    /// <summary>Every parameter with its HF name (same order as <see cref="Schema"/>).</summary>
    public IEnumerable<(string Name, Tensor Tensor)> Named()
    {
        yield return ("model.embed_tokens.weight", Embedding);
        for (int i = 0; i < Layers.Length; i++)
        {
            var l = Layers[i];
            string p = $"model.layers.{i}";
            yield return ($"{p}.input_layernorm.weight", l.AttnNorm);
            yield return ($"{p}.self_attn.q_proj.weight", l.Wq);
            yield return ($"{p}.self_attn.k_proj.weight", l.Wk);
            yield return ($"{p}.self_attn.v_proj.weight", l.Wv);
            if (l.Bq is not null) yield return ($"{p}.self_attn.q_proj.bias", l.Bq);
            if (l.Bk is not null) yield return ($"{p}.self_attn.k_proj.bias", l.Bk);
            if (l.Bv is not null) yield return ($"{p}.self_attn.v_proj.bias", l.Bv);
            yield return ($"{p}.self_attn.o_proj.weight", l.Wo);
            yield return ($"{p}.post_attention_layernorm.weight", l.FfnNorm);
            yield return ($"{p}.mlp.gate_proj.weight", l.Wgate);
            yield return ($"{p}.mlp.up_proj.weight", l.Wup);
            yield return ($"{p}.mlp.down_proj.weight", l.Wdown);
        }
        yield return ("model.norm.weight", FinalNorm);
        if (LmHead is not null) yield return ("lm_head.weight", LmHead);
    }

    /// <summary>
    /// Allocates every parameter (zero-filled) on <paramref name="backend"/>; linear weights in
    /// <paramref name="linearDType"/> (F32 or BF16), norms, biases and embeddings in F32.
    /// </summary>
    public static LlamaWeights Allocate(LlamaConfig c, IBackend backend, DType linearDType = DType.F32)
    {
        c.Validate("config");
        Tensor T(DType d, string name, params int[] shape) { var t = backend.Allocate(d, shape); t.Name = name; return t; }
        var layers = new LlamaLayerWeights[c.NumLayers];
        for (int i = 0; i < c.NumLayers; i++)
        {
            string p = $"model.layers.{i}";
            layers[i] = new LlamaLayerWeights
            {
                AttnNorm = T(DType.F32, $"{p}.input_layernorm.weight", c.HiddenSize),
                Wq = T(linearDType, $"{p}.self_attn.q_proj.weight", c.QDim, c.HiddenSize),
                Wk = T(linearDType, $"{p}.self_attn.k_proj.weight", c.KvDim, c.HiddenSize),
                Wv = T(linearDType, $"{p}.self_attn.v_proj.weight", c.KvDim, c.HiddenSize),
                Bq = c.AttentionBias ? T(DType.F32, $"{p}.self_attn.q_proj.bias", c.QDim) : null,
                Bk = c.AttentionBias ? T(DType.F32, $"{p}.self_attn.k_proj.bias", c.KvDim) : null,
                Bv = c.AttentionBias ? T(DType.F32, $"{p}.self_attn.v_proj.bias", c.KvDim) : null,
                Wo = T(linearDType, $"{p}.self_attn.o_proj.weight", c.HiddenSize, c.QDim),
                FfnNorm = T(DType.F32, $"{p}.post_attention_layernorm.weight", c.HiddenSize),
                Wgate = T(linearDType, $"{p}.mlp.gate_proj.weight", c.IntermediateSize, c.HiddenSize),
                Wup = T(linearDType, $"{p}.mlp.up_proj.weight", c.IntermediateSize, c.HiddenSize),
                Wdown = T(linearDType, $"{p}.mlp.down_proj.weight", c.HiddenSize, c.IntermediateSize),
            };
        }
        return new LlamaWeights
        {
            Config = c,
            Embedding = T(DType.F32, "model.embed_tokens.weight", c.VocabSize, c.HiddenSize),
            Layers = layers,
            FinalNorm = T(DType.F32, "model.norm.weight", c.HiddenSize),
            LmHead = c.TieWordEmbeddings ? null : T(linearDType, "lm_head.weight", c.VocabSize, c.HiddenSize),
        };
    }

    public long ParameterCount => Named().Sum(p => p.Tensor.Length);

    /// <summary>Slack per tensor in <see cref="AllocationBytes"/>: a GPU pool rounds every tensor up to 256 bytes (DevicePool.Alignment).</summary>
    public const long TensorSlackBytes = 256;

    /// <summary>
    /// An upper bound of the device bytes <see cref="Allocate"/>(<paramref name="c"/>, backend, <paramref name="linearDType"/>)
    /// takes: each tensor's bytes plus <see cref="TensorSlackBytes"/>. What to IBackend.Reserve first so that every tensor
    /// lands in one pool chunk (a big model's tensors would otherwise get a chunk each, and a multi-tensor launch covers
    /// at most 8 chunks).
    /// </summary>
    public static long AllocationBytes(LlamaConfig c, DType linearDType = DType.F32)
    {
        long C = c.HiddenSize, F = c.IntermediateSize, QD = c.QDim, KVD = c.KvDim, V = c.VocabSize;
        long lin = linearDType.SizeOf();
        long perLayer = 4 * 2 * C + (c.AttentionBias ? 4 * (QD + 2 * KVD) : 0) + lin * (2 * QD * C + 2 * KVD * C + 3 * F * C);
        int perLayerTensors = 9 + (c.AttentionBias ? 3 : 0);
        long bytes = c.NumLayers * perLayer + 4 * V * C + 4 * C + (c.TieWordEmbeddings ? 0 : lin * V * C);
        long tensors = (long)c.NumLayers * perLayerTensors + 2 + (c.TieWordEmbeddings ? 0 : 1);
        return bytes + tensors * TensorSlackBytes;
    }

    public void Dispose()
    {
        foreach (var (_, t) in Named()) t.Dispose();
    }
}
