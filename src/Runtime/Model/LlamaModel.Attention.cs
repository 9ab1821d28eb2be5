using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

// bf16 attention for training: where q, k, v are produced and stored.
public sealed partial class LlamaModel
{
    private DType _attentionDType = DType.F32;

    /// <summary>
    /// Storage of the q, k, v the attention reads (and the backward reads again): <see cref="DType.F32"/> (default) or
    /// <see cref="DType.BF16"/>, the bf16 attention of PyTorch autocast/SDPA: q and k after RoPE and v are rounded to
    /// bf16 once; the attention accumulates in f32, keeps f32 softmax statistics (lse) and writes an f32 output (the
    /// o_proj input, whose matmul rounds it to its operand type itself); the backward reads the bf16 q, k, v and writes
    /// f32 dq, dk, dv into the f32 backward of RoPE and the projections. On CUDA sm_80+ this is what reaches the
    /// tensor-core flash attention (forward and backward); other backends widen the bf16 values on the fly.
    /// Saves 2·(NH + 2·NKV)·HS bytes per token per saved layer. Changing it frees the cached workspaces.
    /// </summary>
    public DType AttentionDType
    {
        get => _attentionDType;
        set
        {
            if (value is not (DType.F32 or DType.BF16))
                throw new ArgumentException($"attention dtype {value.Name()}: expected f32 or bf16");
            if (value != _attentionDType) { _attentionDType = value; ReleaseWorkspaces(); }
        }
    }

    /// <summary>
    /// The f32 tensors the q, k, v projections write: the saved s.Q, s.K, s.V themselves (RoPE rotates q, k in place)
    /// in f32 attention; with bf16 attention the activation-gradient scratch DQ, DK, DV, free during a layer's forward
    /// (the backward consumes them within each layer before the next layer's recompute), so rounding costs no buffer.
    /// </summary>
    private static (Tensor Q, Tensor K, Tensor V) ProjectionTargets(TrainingWorkspace ws, TrainingWorkspace.LayerActivations s) =>
        s.Q.DType == DType.F32 ? (s.Q, s.K, s.V) : (ws.DQ, ws.DK, ws.DV);

    /// <summary>
    /// false: bf16 attention stores q, k, v in two passes (RoPE in place on the f32 scratch, then one Copy each), the
    /// path before <see cref="IBackend.RopeInto"/>; kept so tests prove the fused one bit-identical on real backends.
    /// </summary>
    internal bool FusedRopeStore { get; set; } = true;

    /// <summary>
    /// RoPE on the projected f32 q and k, then the attention inputs: in f32 attention q and k rotate in place (they are
    /// s.Q, s.K); with bf16 attention RoPE writes its rotation straight into the saved bf16 s.Q, s.K (one pass each,
    /// <see cref="IBackend.RopeInto"/>; the f32 scratch is left unrotated) and v is rounded by one conversion pass.
    /// </summary>
    private void RopeAndStoreAttentionInputs(TrainingWorkspace.LayerActivations s, Tensor q, Tensor k, Tensor v, Tensor ropePos, int m)
    {
        var c = Config;
        if (ReferenceEquals(q, s.Q) || !FusedRopeStore)
        {
            _b.Rope(q, ropePos, m, c.NumHeads, c.HeadDim, c.RopeTheta, c.RopeLayout, inverse: false);
            _b.Rope(k, ropePos, m, c.NumKvHeads, c.HeadDim, c.RopeTheta, c.RopeLayout, inverse: false);
            if (ReferenceEquals(q, s.Q)) return;
            _b.Copy(s.Q, q);
            _b.Copy(s.K, k);
            _b.Copy(s.V, v);
            return;
        }
        _b.RopeInto(s.Q, q, ropePos, m, c.NumHeads, c.HeadDim, c.RopeTheta, c.RopeLayout);
        _b.RopeInto(s.K, k, ropePos, m, c.NumKvHeads, c.HeadDim, c.RopeTheta, c.RopeLayout);
        _b.Copy(s.V, v);
    }
}
