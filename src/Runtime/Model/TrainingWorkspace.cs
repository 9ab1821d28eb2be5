using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// Every buffer one training step of <see cref="LlamaModel"/> needs for a given (batch, seqLen): the activations
/// the forward saves for the backward, the activation-gradient scratch, one chunk of logits, and the LoRA
/// buffers of each attached slot. Allocated once per shape and reused by every step.
/// </summary>
/// <remarks>
/// Saved per layer (read by the backward): ResidIn (the layer input; also the previous layer's output),
/// ResidMid (after attention), Q and K after RoPE, V (f32, or bf16 with bf16 attention), the attention output Att
/// and its log-sum-exp Lse, Gate and Up. Recomputed in the backward instead of saved (cheap, and it saves 2·C + F floats per token per layer):
/// both RMSNorm outputs and their rstd, and the SwiGLU output H.
/// M = B·T rows; (M, X) below means M rows of X.
/// </remarks>
internal sealed class TrainingWorkspace : IDisposable
{
    private readonly List<Tensor> _owned = new();
    private readonly IBackend _b;
    private readonly Dictionary<int, LoraBuffers> _lora = new();

    public int Batch { get; }
    public int SeqLen { get; }
    public int M { get; }
    public int ChunkRows { get; }
    /// <summary>True with activation checkpointing: one set of layer activations, recomputed per layer in the backward.</summary>
    public bool SharedLayers { get; }
    /// <summary>Bytes of every buffer this workspace allocated (activations, scratch, LoRA buffers).</summary>
    public long Bytes => _owned.Sum(t => t.Bytes) + _lora.Values.Sum(e => e.U.Bytes + (e.XDrop?.Bytes ?? 0) + (e.Z?.Bytes ?? 0)) + (LoraG?.Bytes ?? 0) + (_doraScratch?.Bytes ?? 0) + (Peft?.Bytes ?? 0);

    public Tensor Tokens { get; }     // (M) I32
    public Tensor Targets { get; }    // (M) I32
    public Tensor Positions { get; }  // (M) I32, t within its sequence (within its segment for packed rows)
    /// <summary>(start row, length) of each packed segment; null when every row is one sequence (see LlamaModel.ForwardBackward).</summary>
    public (int Start, int Length)[]? Segments { get; private set; }
    public Tensor Losses { get; }     // (M)
    public float[] LossHost { get; }  // (M) host copy of Losses

    public Tensor[] Resid { get; }    // L+1 × (M, C): Resid[l] is layer l's input, Resid[L] the last output
    public LayerActivations[] Layers { get; }

    public Tensor Xn { get; }         // (M, C) RMSNorm output (forward; recomputed in backward)
    public Tensor Rstd { get; }       // (M)
    public Tensor XnF { get; }        // (M, C) final RMSNorm output, read by every LM-head chunk
    public Tensor RstdF { get; }      // (M)
    public Tensor Tmp { get; }        // (M, C) o_proj / down_proj output before the residual add
    public Tensor H { get; }          // (M, F) SwiGLU output; in the backward reused as dGate once down_proj's backward has read it
    public Tensor Logits { get; }     // (ChunkRows, V) logits, then dlogits, of one chunk

    public Tensor DResid { get; }     // (M, C) gradient of the residual stream
    public Tensor DXn { get; }        // (M, C) gradient of an RMSNorm output
    public Tensor DAtt { get; }       // (M, NH·HS)
    public Tensor DQ { get; }         // (M, NH·HS)
    public Tensor DK { get; }         // (M, NKV·HS)
    public Tensor DV { get; }         // (M, NKV·HS)
    public Tensor DH { get; }         // (M, F)
    public Tensor DUp { get; }        // (M, F)
    public Tensor NormGradSink { get; } // (C) dWeight of RMSNorm when the base is frozen (the op always accumulates one)
    public Tensor? LoraG { get; private set; } // (M, maxR) scratch g = dy·B of LoraLinearBackward

    /// <summary>One chunk of rows [Start, Start + Rows) of the LM head + loss, as views made once.</summary>
    public readonly record struct HeadChunk(int Start, int Rows, Tensor Logits, Tensor X, Tensor DX, Tensor Targets, Tensor Losses);
    public HeadChunk[] Chunks { get; }

    /// <summary>Buffers of prompt/prefix tuning and bottleneck adapters when the model has such slots (owned: disposed with the workspace).</summary>
    public PeftBuffers? Peft { get; set; }

    /// <summary>The LoRA buffers of one slot: u (M, R); drop(x) (M, K) when dropout is used; G, the (M, R) view of LoraG.</summary>
    public sealed record LoraBuffers(Tensor U, Tensor? XDrop, int R, int K)
    {
        /// <summary>DoRA slots: z (M, N), the LoRA linear's output before the magnitude scale (dz in the backward).</summary>
        public Tensor? Z { get; init; }
        public Tensor G { get; set; } = null!;
    }

    public sealed class LayerActivations
    {
        public required Tensor ResidMid { get; init; } // (M, C)
        public required Tensor Q { get; init; }        // (B, T, NH, HS) after RoPE; f32 or bf16 (the attention dtype)
        public required Tensor K { get; init; }        // (B, T, NKV, HS) after RoPE; f32 or bf16
        public required Tensor V { get; init; }        // (B, T, NKV, HS); f32 or bf16
        public required Tensor Att { get; init; }      // (B, T, NH, HS)
        public required Tensor Lse { get; init; }      // (B, NH, T)
        public required Tensor Gate { get; init; }     // (M, F)
        public required Tensor Up { get; init; }       // (M, F)
    }

    /// <param name="shareLayerActivations">Activation checkpointing: every ws.Layers[l] is the same set of buffers.</param>
    /// <param name="attentionDType">Storage of the saved Q, K, V (f32, or bf16 for bf16 attention: see LlamaModel.AttentionDType).</param>
    public TrainingWorkspace(IBackend b, LlamaConfig c, int batch, int seqLen, int chunkRows, bool shareLayerActivations = false,
        DType attentionDType = DType.F32)
    {
        SharedLayers = shareLayerActivations;
        _b = b;
        Batch = batch;
        SeqLen = seqLen;
        M = checked(batch * seqLen);
        ChunkRows = Math.Clamp(chunkRows, 1, M);
        int m = M, C = c.HiddenSize, F = c.IntermediateSize, QD = c.QDim, KVD = c.KvDim;

        Tokens = New(DType.I32, "tokens", m);
        Targets = New(DType.I32, "targets", m);
        Positions = New(DType.I32, "positions", m);
        Losses = New(DType.F32, "losses", m);
        LossHost = new float[m];
        var pos = new int[m];
        for (int i = 0; i < m; i++) pos[i] = i % seqLen;
        b.Upload(Positions, pos);

        Resid = new Tensor[c.NumLayers + 1];
        for (int l = 0; l <= c.NumLayers; l++) Resid[l] = New(DType.F32, $"resid{l}", m, C);
        Layers = new LayerActivations[c.NumLayers];
        for (int l = 0; l < c.NumLayers; l++)
        {
            if (shareLayerActivations && l > 0) { Layers[l] = Layers[0]; continue; }
            Layers[l] = new LayerActivations
            {
                ResidMid = New(DType.F32, $"layer{l}.resid_mid", m, C),
                Q = New(attentionDType, $"layer{l}.q", batch, seqLen, c.NumHeads, c.HeadDim),
                K = New(attentionDType, $"layer{l}.k", batch, seqLen, c.NumKvHeads, c.HeadDim),
                V = New(attentionDType, $"layer{l}.v", batch, seqLen, c.NumKvHeads, c.HeadDim),
                Att = New(DType.F32, $"layer{l}.att", batch, seqLen, c.NumHeads, c.HeadDim),
                Lse = New(DType.F32, $"layer{l}.lse", batch, c.NumHeads, seqLen),
                Gate = New(DType.F32, $"layer{l}.gate", m, F),
                Up = New(DType.F32, $"layer{l}.up", m, F),
            };
        }
        Xn = New(DType.F32, "xn", m, C);
        Rstd = New(DType.F32, "rstd", m);
        XnF = New(DType.F32, "xn_final", m, C);
        RstdF = New(DType.F32, "rstd_final", m);
        Tmp = New(DType.F32, "tmp", m, C);
        H = New(DType.F32, "h", m, F);
        Logits = New(DType.F32, "logits_chunk", ChunkRows, c.VocabSize);
        DResid = New(DType.F32, "d_resid", m, C);
        DXn = New(DType.F32, "d_xn", m, C);
        DAtt = New(DType.F32, "d_att", m, QD);
        DQ = New(DType.F32, "d_q", m, QD);
        DK = New(DType.F32, "d_k", m, KVD);
        DV = New(DType.F32, "d_v", m, KVD);
        DH = New(DType.F32, "d_h", m, F);
        DUp = New(DType.F32, "d_up", m, F);
        NormGradSink = New(DType.F32, "norm_grad_sink", C);

        // views are made here once, so a step allocates nothing (not even view objects)
        var chunks = new List<HeadChunk>();
        for (int r0 = 0; r0 < m; r0 += ChunkRows)
        {
            int rows = Math.Min(ChunkRows, m - r0);
            chunks.Add(new HeadChunk(r0, rows, Logits.View(0, rows, c.VocabSize), XnF.View((long)r0 * C, rows, C),
                DXn.View((long)r0 * C, rows, C), Targets.View(r0, rows), Losses.View(r0, rows)));
        }
        Chunks = chunks.ToArray();
    }

    /// <summary>Sets the packed segments and uploads their positions; null restores positions 0..T-1 per row.</summary>
    public void SetSegments((int Start, int Length)[]? segments, ReadOnlySpan<int> positions)
    {
        if (segments is not null) _b.Upload(Positions, positions);
        else if (Segments is not null)
        {
            var pos = new int[M];
            for (int i = 0; i < M; i++) pos[i] = i % SeqLen;
            _b.Upload(Positions, pos);
        }
        Segments = segments;
    }

    private Tensor New(DType d, string name, params int[] shape)
    {
        var t = _b.Allocate(d, shape);
        t.Name = name;
        _owned.Add(t);
        return t;
    }

    /// <summary>
    /// The LoRA buffers of slot <paramref name="key"/>. Allocated on first use after the slot was attached or
    /// changed (or the first step with dropout); never inside a steady-state step.
    /// </summary>
    public LoraBuffers Lora(int key, int r, int k, bool needXDrop, int doraN = 0)
    {
        if (_lora.TryGetValue(key, out var e) && e.R == r && e.K == k && (e.XDrop is not null || !needXDrop) && (doraN == 0 || e.Z?.Dim(1) == doraN))
            return e;
        ForgetLora(key);
        var u = _b.Allocate(DType.F32, M, r);
        u.Name = $"lora{key}.u";
        Tensor? xd = null;
        if (needXDrop) { xd = _b.Allocate(DType.F32, M, k); xd.Name = $"lora{key}.x_drop"; }
        Tensor? z = null;
        if (doraN > 0) { z = _b.Allocate(DType.F32, M, doraN); z.Name = $"lora{key}.dora_z"; }
        e = new LoraBuffers(u, xd, r, k) { Z = z };
        _lora[key] = e;
        if (LoraG is null || LoraG.Length < (long)M * r)
        {
            LoraG?.Dispose();
            LoraG = _b.Allocate(DType.F32, M, r);
            LoraG.Name = "lora_g";
            foreach (var other in _lora.Values) other.G = LoraG.View(0, M, other.R);
        }
        else e.G = LoraG.View(0, M, r);
        return e;
    }

    /// <summary>Transient scratch of DoRA with dropout (at least <paramref name="length"/> floats; shared by all linears, grown on demand).</summary>
    public Tensor DoraScratch(long length)
    {
        if (_doraScratch is null || _doraScratch.Length < length)
        {
            _doraScratch?.Dispose();
            _doraScratch = _b.Allocate(DType.F32, checked((int)length));
            _doraScratch.Name = "dora_scratch";
        }
        return _doraScratch;
    }

    private Tensor? _doraScratch;

    /// <summary>
    /// A (rows, cols) view of <see cref="DoraScratch"/>, cached per shape (a Tensor view is an object: DoraLinear's per-call
    /// views allocated ~144 B per DoRA linear per pass); the cache restarts when the scratch grows.
    /// </summary>
    public Tensor DoraScratchView(int rows, int cols)
    {
        var s = DoraScratch((long)rows * cols);
        if (!ReferenceEquals(s, _doraViewsOf)) { _doraViews.Clear(); _doraViewsOf = s; }
        if (!_doraViews.TryGetValue((rows, cols), out var v)) _doraViews[(rows, cols)] = v = s.View(0, rows, cols);
        return v;
    }

    private readonly Dictionary<(int Rows, int Cols), Tensor> _doraViews = new();
    private Tensor? _doraViewsOf;

    public void ForgetLora(int key)
    {
        if (_lora.Remove(key, out var e)) { e.U.Dispose(); e.XDrop?.Dispose(); e.Z?.Dispose(); }
    }

    public void Dispose()
    {
        foreach (var t in _owned) t.Dispose();
        _owned.Clear();
        foreach (var key in _lora.Keys.ToArray()) ForgetLora(key);
        LoraG?.Dispose();
        LoraG = null;
        _doraScratch?.Dispose();
        _doraScratch = null;
        Peft?.Dispose();
        Peft = null;
    }
}
