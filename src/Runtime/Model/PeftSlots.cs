using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// Prompt tuning's learned virtual tokens, attached with <see cref="LlamaModel.Prompt"/>: P embeddings put in front of
/// every sequence's input embeddings (positions 0..P-1; the real tokens follow at P..P+T-1; the virtual rows carry no
/// loss). This is PEFT's PromptTuning for a causal LM: inputs_embeds = cat(prompt, embed(input_ids)), labels
/// prefixed with -100.
/// </summary>
/// <remarks>The tensors are owned by the caller. Embeddings and Grad are (P, C) f32 on the model's backend; Grad is
/// accumulated (+=) by the backward.</remarks>
public sealed class PromptSlot(Tensor embeddings, Tensor grad)
{
    /// <summary>(P, C) the virtual token embeddings (PEFT's prompt_embeddings).</summary>
    public Tensor Embeddings { get; } = embeddings;
    /// <summary>(P, C) gradient (accumulated).</summary>
    public Tensor Grad { get; } = grad;
    /// <summary>P.</summary>
    public int Length => Embeddings.Dim(0);
}

/// <summary>
/// Prefix tuning's learned keys and values, attached with <see cref="LlamaModel.Prefix"/>: in every layer, P key and
/// value rows per kv head sit before the sequence's own; every query attends to all P of them and causally to the
/// real keys. As in PEFT + transformers' Llama (the prefix is passed as past_key_values): the prefix keys are used as
/// given (no rotary position applied to them; a cache holds already-rotated keys) and the real tokens take positions
/// P..P+T-1 (transformers derives position ids from the cache length; PEFT drops any position_ids it is given).
/// </summary>
/// <remarks>
/// Values is (L, 2, P, NKV·HS) f32 (layer, key = 0 / value = 1, virtual token, kv channel): each (layer, kind) block
/// is contiguous so it copies straight into the key/value buffers. PEFT saves the same numbers as
/// prompt_embeddings (P, L·2·NKV·HS) with column ((l·2 + kind)·NKV + h)·HS + d; the permutation is done when saving
/// and loading. Grad has the same layout and is accumulated (+=). Views per (layer, kind) are made once here.
/// </remarks>
public sealed class PrefixSlot
{
    public PrefixSlot(Tensor values, Tensor grad, int numLayers)
    {
        if (values.Rank != 4 || values.Dim(0) != numLayers || values.Dim(1) != 2 || !grad.Shape.SequenceEqual(values.Shape))
            throw new ArgumentException($"prefix: values {values.Describe()} / grad {grad.Describe()} must both be (L={numLayers}, 2, P, NKV·HS)");
        Values = values;
        Grad = grad;
        int p = values.Dim(2), kv = values.Dim(3);
        _v = new Tensor[numLayers * 2];
        _g = new Tensor[numLayers * 2];
        for (int i = 0; i < numLayers * 2; i++)
        {
            _v[i] = values.View((long)i * p * kv, p, kv);
            _g[i] = grad.View((long)i * p * kv, p, kv);
        }
    }

    private readonly Tensor[] _v, _g;

    /// <summary>(L, 2, P, NKV·HS).</summary>
    public Tensor Values { get; }
    /// <summary>(L, 2, P, NKV·HS) gradient (accumulated).</summary>
    public Tensor Grad { get; }
    /// <summary>P.</summary>
    public int Length => Values.Dim(2);
    /// <summary>NKV·HS.</summary>
    public int KvDim => Values.Dim(3);

    /// <summary>(P, NKV·HS) keys (kind 0) or values (kind 1) of one layer.</summary>
    public Tensor Block(int layer, int kind) => _v[layer * 2 + kind];
    /// <summary>Gradient of <see cref="Block"/>.</summary>
    public Tensor GradBlock(int layer, int kind) => _g[layer * 2 + kind];
}

/// <summary>Where a bottleneck adapter sits in a layer: on the attention output or the MLP output (before the residual add).</summary>
public enum BottleneckSite
{
    Attention = 0,
    Mlp = 1,
}

/// <summary>
/// A bottleneck adapter (Houlsby et al. 2019; AdapterHub's "double_seq_bn" places one after attention and one after
/// the MLP): y ← y + Up·silu(Down·y + bDown) + bUp applied to a sublayer output y (M, C) before the residual add.
/// With Up = 0 and bUp = 0 the block is the identity.
/// </summary>
/// <remarks>Tensors owned by the caller, f32 on the model's backend; gradients are accumulated (+=).</remarks>
public sealed class BottleneckSlot
{
    /// <summary>(Bn, C) down projection (AdapterHub adapter_down.0.weight).</summary>
    public required Tensor Down { get; init; }
    /// <summary>(Bn) down bias.</summary>
    public required Tensor DownBias { get; init; }
    /// <summary>(C, Bn) up projection (AdapterHub adapter_up.weight).</summary>
    public required Tensor Up { get; init; }
    /// <summary>(C) up bias.</summary>
    public required Tensor UpBias { get; init; }
    public required Tensor DDown { get; init; }
    public required Tensor DDownBias { get; init; }
    public required Tensor DUp { get; init; }
    public required Tensor DUpBias { get; init; }
    /// <summary>Bn.</summary>
    public int Size => Down.Dim(0);

    public IEnumerable<(Tensor Param, Tensor Grad)> Pairs()
    {
        yield return (Down, DDown);
        yield return (DownBias, DDownBias);
        yield return (Up, DUp);
        yield return (UpBias, DUpBias);
    }
}

/// <summary>
/// The extra buffers of one <see cref="TrainingWorkspace"/> for prompt tuning, prefix tuning and bottleneck adapters,
/// made once per (workspace, prefix length, bottleneck size) with every view a step needs.
/// </summary>
/// <remarks>
/// Prefix: per layer the full key/value buffers (B, P+T, NKV, HS) read by attention and its backward (the layer's own
/// K/V buffers then hold the real rows as scratch), their gradients (shared by all layers), and positions P + t.
/// Bottleneck: per (layer, site) the adapter input y (M, C) and pre-activation h (M, Bn), saved for the backward;
/// shared scratch a = silu(h), its gradients, a tensor of ones (silu through SwiGLU with up = 1) and dy (M, C).
/// Prompt: (P, C) views of each sequence's first rows of the residual stream and of its gradient.
/// </remarks>
internal sealed class PeftBuffers : IDisposable
{
    private readonly List<Tensor> _owned = new();
    private readonly IBackend _b;

    /// <summary>Bytes allocated here (views excluded).</summary>
    public long Bytes => _owned.Sum(t => t.Bytes);

    public int PrefixLength { get; }
    public int BottleneckSize { get; }
    public int PromptLength { get; }

    // prefix
    public Tensor? PrefixPositions { get; }          // (M) I32: P + t
    public Tensor[] KFull { get; } = [];             // L × (B, P+T, NKV, HS)
    public Tensor[] VFull { get; } = [];
    public Tensor? DKFull { get; }                   // (B, P+T, NKV, HS)
    public Tensor? DVFull { get; }
    public Tensor[][] KPre { get; } = []; // [l][b] views
    public Tensor[][] KReal { get; } = [];
    public Tensor[][] VPre { get; } = [];
    public Tensor[][] VReal { get; } = [];
    public Tensor[] DKPre { get; } = []; // [b] views
    public Tensor[] DKReal { get; } = [];
    public Tensor[] DVPre { get; } = [];
    public Tensor[] DVReal { get; } = [];
    public Tensor[] RowsDK { get; } = []; // [b] (T, KVD) views of the (M, KVD) gradient buffers
    public Tensor[] RowsDV { get; } = [];
    public Tensor[][] LayerK { get; } = []; // [l][b] views of each layer's own K/V (scratch rows)
    public Tensor[][] LayerV { get; } = [];

    // bottleneck
    public Tensor[] BnY { get; } = [];   // [l*2+site] (M, C)
    public Tensor[] BnH { get; } = [];   // [l*2+site] (M, Bn)
    public Tensor? BnA { get; }          // (M, Bn)
    public Tensor? BnOnes { get; }
    public Tensor? BnDA { get; }
    public Tensor? BnDH { get; }
    public Tensor? BnDScratch { get; }
    public Tensor? BnDY { get; }         // (M, C)

    // prompt
    public Tensor[] PromptRows { get; } = []; // [b] (P, C)
    public Tensor[] PromptGradRows { get; } = [];

    public PeftBuffers(IBackend b, LlamaConfig c, TrainingWorkspace ws, int prefixLength, int bottleneckSize, int promptLength)
    {
        _b = b;
        PrefixLength = prefixLength;
        BottleneckSize = bottleneckSize;
        PromptLength = promptLength;
        int B = ws.Batch, T = ws.SeqLen, m = ws.M, C = c.HiddenSize, KVD = c.KvDim, L = c.NumLayers;
        if (prefixLength > 0)
        {
            int P = prefixLength, S = P + T;
            PrefixPositions = New(DType.I32, "prefix_positions", m);
            var pos = new int[m];
            for (int i = 0; i < m; i++) pos[i] = P + i % T;
            b.Upload(PrefixPositions, pos);
            KFull = new Tensor[L]; VFull = new Tensor[L];
            KPre = new Tensor[L][]; KReal = new Tensor[L][]; VPre = new Tensor[L][]; VReal = new Tensor[L][];
            LayerK = new Tensor[L][]; LayerV = new Tensor[L][];
            for (int l = 0; l < L; l++)
            {
                // the attention dtype (bf16 attention: the prefix rows are rounded with the sequence's own K, V)
                KFull[l] = New(ws.Layers[l].K.DType, $"layer{l}.k_prefixed", B, S, c.NumKvHeads, c.HeadDim);
                VFull[l] = New(ws.Layers[l].V.DType, $"layer{l}.v_prefixed", B, S, c.NumKvHeads, c.HeadDim);
                (KPre[l], KReal[l]) = Split(KFull[l], B, P, T, KVD);
                (VPre[l], VReal[l]) = Split(VFull[l], B, P, T, KVD);
                LayerK[l] = Rows(ws.Layers[l].K, B, T, KVD);
                LayerV[l] = Rows(ws.Layers[l].V, B, T, KVD);
            }
            DKFull = New(DType.F32, "d_k_prefixed", B, S, c.NumKvHeads, c.HeadDim);
            DVFull = New(DType.F32, "d_v_prefixed", B, S, c.NumKvHeads, c.HeadDim);
            (DKPre, DKReal) = Split(DKFull, B, P, T, KVD);
            (DVPre, DVReal) = Split(DVFull, B, P, T, KVD);
            RowsDK = Rows(ws.DK, B, T, KVD);
            RowsDV = Rows(ws.DV, B, T, KVD);
        }
        if (bottleneckSize > 0)
        {
            int n = bottleneckSize;
            BnY = new Tensor[L * 2];
            BnH = new Tensor[L * 2];
            for (int i = 0; i < L * 2; i++)
            {
                BnY[i] = New(DType.F32, $"layer{i / 2}.{(BottleneckSite)(i % 2)}.adapter_in", m, C);
                BnH[i] = New(DType.F32, $"layer{i / 2}.{(BottleneckSite)(i % 2)}.adapter_h", m, n);
            }
            BnA = New(DType.F32, "adapter_a", m, n);
            BnOnes = New(DType.F32, "adapter_ones", m, n);
            b.Fill(BnOnes, 1f);
            BnDA = New(DType.F32, "adapter_da", m, n);
            BnDH = New(DType.F32, "adapter_dh", m, n);
            BnDScratch = New(DType.F32, "adapter_dscratch", m, n);
            BnDY = New(DType.F32, "adapter_dy", m, C);
        }
        if (promptLength > 0)
        {
            PromptRows = new Tensor[B];
            PromptGradRows = new Tensor[B];
            for (int r = 0; r < B; r++)
            {
                PromptRows[r] = ws.Resid[0].View((long)r * T * C, promptLength, C);
                PromptGradRows[r] = ws.DResid.View((long)r * T * C, promptLength, C);
            }
        }
    }

    /// <summary>(P, KVD) prefix views and (T, KVD) real-row views of each sequence of a (B, P+T, KVD) buffer.</summary>
    private static (Tensor[] Pre, Tensor[] Real) Split(Tensor full, int batch, int p, int t, int kvd)
    {
        var pre = new Tensor[batch];
        var real = new Tensor[batch];
        for (int r = 0; r < batch; r++)
        {
            long o = (long)r * (p + t) * kvd;
            pre[r] = full.View(o, p, kvd);
            real[r] = full.View(o + (long)p * kvd, t, kvd);
        }
        return (pre, real);
    }

    private static Tensor[] Rows(Tensor x, int batch, int t, int kvd)
    {
        var v = new Tensor[batch];
        for (int r = 0; r < batch; r++) v[r] = x.View((long)r * t * kvd, t, kvd);
        return v;
    }

    private Tensor New(DType d, string name, params int[] shape)
    {
        var t = _b.Allocate(d, shape);
        t.Name = name;
        _owned.Add(t);
        return t;
    }

    public void Dispose()
    {
        foreach (var t in _owned) t.Dispose();
        _owned.Clear();
    }
}
