using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

// Prompt tuning, prefix tuning and bottleneck adapters: the slots and the forward/backward pieces the main
// forward and backward call at their hook points (after the embedding, around attention, after o_proj and down_proj).
public sealed partial class LlamaModel
{
    private PromptSlot? _prompt;
    private PrefixSlot? _prefix;
    private BottleneckSlot?[]? _bottleneck;          // [layer * 2 + site]
    private int[]? _promptTokens, _promptTargets;    // host (B, P+T) inputs with the virtual rows in front

    /// <summary>
    /// Prompt tuning's virtual tokens (null: none). With a slot of P rows, ForwardBackward and Loss take the same
    /// (B, T) tokens as without and run (B, P+T) internally: the P virtual rows come first at positions 0..P-1,
    /// carry no loss, and their gradient is accumulated (+=) into <see cref="PromptSlot.Grad"/>.
    /// </summary>
    public PromptSlot? Prompt
    {
        get => _prompt;
        set
        {
            if (value is not null)
            {
                CheckSlotTensor("prompt embeddings", value.Embeddings, value.Grad);
                if (value.Embeddings.Rank != 2 || value.Embeddings.Dim(1) != Config.HiddenSize || value.Length <= 0)
                    throw new ArgumentException($"prompt: embeddings {value.Embeddings.Describe()} must be (P > 0, C = {Config.HiddenSize})");
            }
            _prompt = value;
            ReleaseWorkspaces();
        }
    }

    /// <summary>Prefix tuning's learned keys/values (null: none); see <see cref="PrefixSlot"/> for the exact semantics.</summary>
    public PrefixSlot? Prefix
    {
        get => _prefix;
        set
        {
            if (value is not null)
            {
                CheckSlotTensor("prefix values", value.Values, value.Grad);
                if (value.Values.Dim(0) != Config.NumLayers || value.KvDim != Config.KvDim || value.Length <= 0)
                    throw new ArgumentException($"prefix: values {value.Values.Describe()} must be (L = {Config.NumLayers}, 2, P > 0, NKV·HS = {Config.KvDim})");
            }
            _prefix = value;
            ReleaseWorkspaces();
        }
    }

    /// <summary>Attaches (or with null detaches) the bottleneck adapter at one site of one layer. All attached adapters share one size.</summary>
    public void SetBottleneck(int layer, BottleneckSite site, BottleneckSlot? slot)
    {
        if ((uint)layer >= (uint)Config.NumLayers) throw new ArgumentOutOfRangeException(nameof(layer), $"layer {layer} outside [0, {Config.NumLayers})");
        _bottleneck ??= new BottleneckSlot?[Config.NumLayers * 2];
        if (slot is not null)
        {
            int C = Config.HiddenSize, n = slot.Size;
            string where = $"bottleneck adapter layer {layer} {site}";
            void Shape(Tensor t, params int[] shape)
            {
                if (!t.Shape.SequenceEqual(shape)) throw new ArgumentException($"{where}: {t.Describe()} must be [{string.Join(", ", shape)}]");
            }
            Shape(slot.Down, n, C); Shape(slot.DownBias, n); Shape(slot.Up, C, n); Shape(slot.UpBias, C);
            Shape(slot.DDown, n, C); Shape(slot.DDownBias, n); Shape(slot.DUp, C, n); Shape(slot.DUpBias, C);
            foreach (var (p, g) in slot.Pairs()) CheckSlotTensor(where, p, g);
            foreach (var other in _bottleneck)
                if (other is not null && other.Size != n)
                    throw new ArgumentException($"{where}: size {n} differs from the attached adapters' size {other.Size}");
        }
        _bottleneck[layer * 2 + (int)site] = slot;
        ReleaseWorkspaces();
    }

    public BottleneckSlot? GetBottleneck(int layer, BottleneckSite site) => _bottleneck?[layer * 2 + (int)site];

    private void CheckSlotTensor(string where, Tensor param, Tensor grad)
    {
        if (!grad.Shape.SequenceEqual(param.Shape)) throw new ArgumentException($"{where}: gradient {grad.Describe()} must match {param.Describe()}");
        foreach (var t in new[] { param, grad })
        {
            if (t.DType != DType.F32) throw new ArgumentException($"{where}: {t.Describe()} must be f32");
            if (t.Backend.Name != _b.Name) throw new ArgumentException($"{where}: {t.Describe()} lives on backend {t.Backend.Name}, the model on {_b.Name}");
        }
    }

    /// <summary>Rows prompt tuning adds in front of every sequence (0 without a prompt slot): a step of T tokens runs P + T.</summary>
    public int PromptLength => _prompt?.Length ?? 0;

    /// <summary>
    /// Floats of the prompt/prefix/bottleneck buffers a step of (batch, seqLen) allocates (PeftBuffers), for memory
    /// plans; seqLen is the length the workspace runs (P + T with a prompt).
    /// </summary>
    public long PeftWorkspaceFloats(int batch, int seqLen)
    {
        var c = Config;
        long m = (long)batch * seqLen, L = c.NumLayers;
        long floats = 0;
        if (_prefix is not null)
        {
            long rows = (long)batch * (_prefix.Length + seqLen);
            long kv = AttentionDType == DType.BF16 ? L : 2 * L;        // per-layer K/V with prefix: 2·L tensors, in 2 bytes with bf16 attention
            floats += m + (kv + 2) * rows * c.KvDim;                   // positions, per-layer K/V with prefix, their gradients
        }
        int n = BottleneckSize();
        if (n > 0) floats += 2 * L * m * (c.HiddenSize + n) + 5 * m * n + m * c.HiddenSize; // saved y, h; a, ones, da, dh, d-scratch; dy
        return floats;
    }

    private int BottleneckSize()
    {
        if (_bottleneck is null) return 0;
        foreach (var s in _bottleneck) if (s is not null) return s.Size;
        return 0;
    }

    /// <summary>With a prompt slot: the (B, P+T) tokens/targets with P virtual rows in front (token 0, target ignored).</summary>
    private void ExpandForPrompt(ref ReadOnlySpan<int> tokens, ref ReadOnlySpan<int> targets, ref int seqLen, int batch, ReadOnlySpan<int> positions)
    {
        if (_prompt is null) return;
        if (!positions.IsEmpty) throw new ArgumentException("prompt tuning does not support packed rows (positions): every sequence gets its own virtual tokens in front");
        if (batch <= 0 || seqLen <= 0) return; // Prepare reports it
        long m = (long)batch * seqLen;
        if (tokens.Length != m || targets.Length != m) return; // Prepare reports it
        int p = _prompt.Length, s = p + seqLen;
        if (_promptTokens is null || _promptTokens.Length != batch * s)
        {
            _promptTokens = new int[batch * s];
            _promptTargets = new int[batch * s];
        }
        for (int r = 0; r < batch; r++)
        {
            _promptTokens.AsSpan(r * s, p).Clear();
            _promptTargets.AsSpan(r * s, p).Fill(IgnoreIndex);
            tokens.Slice(r * seqLen, seqLen).CopyTo(_promptTokens.AsSpan(r * s + p, seqLen));
            targets.Slice(r * seqLen, seqLen).CopyTo(_promptTargets!.AsSpan(r * s + p, seqLen));
        }
        tokens = _promptTokens;
        targets = _promptTargets;
        seqLen = s;
    }

    /// <summary>Makes (or reuses) the workspace's prompt/prefix/bottleneck buffers for the attached slots.</summary>
    private void PreparePeft(TrainingWorkspace ws)
    {
        int prefix = _prefix?.Length ?? 0, bn = BottleneckSize(), prompt = _prompt?.Length ?? 0;
        if ((prefix > 0 || prompt > 0) && ws.Segments is not null)
            throw new ArgumentException("prefix and prompt tuning do not support packed rows (positions): the virtual tokens belong to one sequence per row");
        if (ws.Peft is { } pb && pb.PrefixLength == prefix && pb.BottleneckSize == bn && pb.PromptLength == prompt) return;
        ws.Peft?.Dispose();
        ws.Peft = prefix == 0 && bn == 0 && prompt == 0 ? null : new PeftBuffers(_b, Config, ws, prefix, bn, prompt);
    }

    private Tensor RopePositions(TrainingWorkspace ws) => ws.Peft?.PrefixPositions ?? ws.Positions;

    /// <summary>Forward hook after the input embeddings: the prompt's rows replace each sequence's first P rows.</summary>
    private void PromptForward(TrainingWorkspace ws)
    {
        if (_prompt is null) return;
        foreach (var rows in ws.Peft!.PromptRows) _b.Copy(rows, _prompt.Embeddings);
    }

    /// <summary>Backward hook below layer 0: dPrompt += Σ_b dResid[b, 0:P].</summary>
    private void PromptBackward(TrainingWorkspace ws)
    {
        if (_prompt is null) return;
        foreach (var rows in ws.Peft!.PromptGradRows) _b.Add(_prompt.Grad, _prompt.Grad, rows);
    }

    /// <summary>
    /// Attention of layer l with the prefix: the layer's K/V buffers (rotated with positions P + t) are copied behind
    /// the P prefix rows of every sequence, and the queries attend over P + T keys.
    /// </summary>
    private void PrefixAttentionForward(TrainingWorkspace ws, int l, float attnScale)
    {
        var c = Config;
        var pb = ws.Peft!;
        var s = ws.Layers[l];
        var pk = _prefix!.Block(l, 0);
        var pv = _prefix.Block(l, 1);
        for (int r = 0; r < ws.Batch; r++)
        {
            _b.Copy(pb.KPre[l][r], pk);
            _b.Copy(pb.VPre[l][r], pv);
            _b.Copy(pb.KReal[l][r], pb.LayerK[l][r]);
            _b.Copy(pb.VReal[l][r], pb.LayerV[l][r]);
        }
        int kv = _prefix.Length + ws.SeqLen;
        _b.AttentionForward(s.Att, s.Lse, s.Q, pb.KFull[l], pb.VFull[l], ws.Batch, ws.SeqLen, kv, kv, c.NumHeads, c.NumKvHeads, c.HeadDim, attnScale);
    }

    /// <summary>Backward of <see cref="PrefixAttentionForward"/>: DQ, DK, DV (real rows) overwritten, prefix gradients accumulated.</summary>
    private void PrefixAttentionBackward(TrainingWorkspace ws, int l, float attnScale)
    {
        var c = Config;
        var pb = ws.Peft!;
        var s = ws.Layers[l];
        int kv = _prefix!.Length + ws.SeqLen;
        _b.AttentionBackward(ws.DQ, pb.DKFull!, pb.DVFull!, ws.DAtt, s.Att, s.Lse, s.Q, pb.KFull[l], pb.VFull[l],
            ws.Batch, ws.SeqLen, kv, c.NumHeads, c.NumKvHeads, c.HeadDim, attnScale);
        var gk = _prefix.GradBlock(l, 0);
        var gv = _prefix.GradBlock(l, 1);
        for (int r = 0; r < ws.Batch; r++)
        {
            _b.Copy(pb.RowsDK[r], pb.DKReal[r]);
            _b.Copy(pb.RowsDV[r], pb.DVReal[r]);
            _b.Add(gk, gk, pb.DKPre[r]);
            _b.Add(gv, gv, pb.DVPre[r]);
        }
    }

    /// <summary>y(M, C) ← y + Up·silu(Down·y + bDown) + bUp. Saves y and the pre-activation h.</summary>
    private void BottleneckForward(TrainingWorkspace ws, int l, BottleneckSite site, Tensor y)
    {
        if (_bottleneck?[l * 2 + (int)site] is not { } a) return;
        var pb = ws.Peft!;
        int m = ws.M, C = Config.HiddenSize, n = a.Size, i = l * 2 + (int)site;
        _b.Copy(pb.BnY[i], y);
        _b.MatMul(pb.BnH[i], y, a.Down, a.DownBias, m, n, C, accumulate: false);
        _b.SwiGluForward(pb.BnA!, pb.BnH[i], pb.BnOnes!, (long)m * n); // silu(h)·1
        _b.MatMul(y, pb.BnA!, a.Up, a.UpBias, m, C, n, accumulate: true);
    }

    /// <summary>
    /// Backward of <see cref="BottleneckForward"/> given dOut (M, C) = d(adapter output): accumulates (+=) the four
    /// parameter gradients and returns dy = dOut + Downᵀ-path (a workspace buffer, overwritten), or dOut itself when
    /// no adapter sits there.
    /// </summary>
    private Tensor BottleneckBackward(TrainingWorkspace ws, int l, BottleneckSite site, Tensor dOut)
    {
        if (_bottleneck?[l * 2 + (int)site] is not { } a) return dOut;
        var pb = ws.Peft!;
        int m = ws.M, C = Config.HiddenSize, n = a.Size, i = l * 2 + (int)site;
        _b.SwiGluForward(pb.BnA!, pb.BnH[i], pb.BnOnes!, (long)m * n);                // recompute a = silu(h)
        _b.MatMulBackwardWeight(a.DUp, a.DUpBias, dOut, pb.BnA!, m, C, n);             // dUp += dOutᵀ·a, dbUp += Σ dOut
        _b.MatMulBackwardInput(pb.BnDA!, dOut, a.Up, m, C, n, accumulate: false);      // da = dOut·Up
        _b.SwiGluBackward(pb.BnDH!, pb.BnDScratch!, pb.BnDA!, pb.BnH[i], pb.BnOnes!, (long)m * n); // dh = da ⊙ silu'(h)
        _b.MatMulBackwardWeight(a.DDown, a.DDownBias, pb.BnDH!, pb.BnY[i], m, n, C);   // dDown += dhᵀ·y, dbDown += Σ dh
        _b.Copy(pb.BnDY!, dOut);
        _b.MatMulBackwardInput(pb.BnDY!, pb.BnDH!, a.Down, m, n, C, accumulate: true); // dy = dOut + dh·Down
        return pb.BnDY!;
    }

    private void ZeroPeftGrads()
    {
        if (_prompt is not null) _b.Fill(_prompt.Grad, 0);
        if (_prefix is not null) _b.Fill(_prefix.Grad, 0);
        if (_bottleneck is not null)
            foreach (var a in _bottleneck)
                if (a is not null) foreach (var (_, g) in a.Pairs()) _b.Fill(g, 0);
    }
}
