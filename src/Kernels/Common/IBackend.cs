namespace FineTuneNative.Kernels;

/// <summary>How rotary position embedding pairs the channels of one head.</summary>
public enum RopeLayout
{
    /// <summary>Hugging Face "rotate half": channel i pairs with channel i + HS/2.</summary>
    RotateHalf,
    /// <summary>Meta / llama2.c: channel 2i pairs with channel 2i + 1.</summary>
    Interleaved,
}

/// <summary>The low-rank path of a LoRA linear: y += Scale · dropout(x) · Aᵀ · Bᵀ.</summary>
/// <param name="A">(R, K) down projection (PEFT lora_A.weight).</param>
/// <param name="B">(N, R) up projection (PEFT lora_B.weight).</param>
/// <param name="Scale">alpha / r (or alpha / sqrt(r) for rsLoRA).</param>
/// <param name="Dropout">drop probability p on the LoRA input; kept elements are scaled by 1/(1-p).</param>
/// <param name="Seed">dropout seed; element (m, k) is kept iff DropoutHash.Keep(Seed, m·K + k, p).</param>
public readonly record struct LoraParams(Tensor A, Tensor B, float Scale, float Dropout, ulong Seed);

/// <summary>One tensor of <see cref="IBackend.AdamWMultiTensor"/>.</summary>
/// <param name="Param">f32 parameter (an f32 master for a bf16/f16 weight), updated in place.</param>
/// <param name="Grad">f32 gradient of the same length.</param>
/// <param name="M">f32 first moment, updated in place.</param>
/// <param name="V">f32 second moment, updated in place.</param>
/// <param name="Decay">whether decoupled weight decay applies (not to norms and biases).</param>
/// <param name="Rounded">optional bf16/f16 tensor of the same length that receives the updated parameter rounded
/// (round to nearest even): the weight the model reads when it stores bf16, written in the same pass.</param>
public readonly record struct AdamWTensor(Tensor Param, Tensor Grad, Tensor M, Tensor V, bool Decay, Tensor? Rounded = null);

/// <summary>Hyper-parameters of one AdamW step; <paramref name="Step"/> is 1-based (bias corrections).</summary>
public readonly record struct AdamWHyper(float Lr, float Beta1, float Beta2, float Eps, float WeightDecay, int Step);

/// <summary>
/// The one interface model code is written against. Every op exists on every backend (CPU SIMD, ILGPU) and
/// matches the double-precision reference in Kernels/Reference.
/// </summary>
/// <remarks>
/// Conventions:
/// - All tensors are row-major and contiguous; "(M, K)" names the logical shape, only the element count and
///   the stated sizes are checked (any tensor with Length == M·K works).
/// - Activation gradients are overwritten (=) unless an <c>accumulate</c> flag says +=.
///   Parameter gradients (dW, dA, dB, dBias, dWeight of norms, dTable) are always accumulated (+=), so
///   micro-batches add up.
/// - Weights W may be F32 or BF16 (then converted to f32 on the fly); every accumulation is in f32. The CPU and
///   ILGPU backends also take NF4 W in MatMul, MatMulBackwardInput and the LoRA linear (dequantized per row panel).
/// - Ops are asynchronous on GPU backends; <see cref="Download"/> and the reductions returning a value
///   synchronize.
/// </remarks>
public interface IBackend : IDisposable
{
    /// <summary>"cpu", "ilgpu-cuda", "ilgpu-sim" ...</summary>
    string Name { get; }

    // ---------------------------------------------------------------- memory
    /// <summary>A new zero-filled tensor owned by this backend.</summary>
    Tensor Allocate(DType dtype, params int[] shape);
    /// <summary>Copies host floats into <paramref name="dst"/>, converting to its dtype (F32/BF16/F16).</summary>
    /// <remarks>Like every op, ordered after the ops before it and before the ops after it; it may return before the device
    /// has the data (GPU backends stage small uploads), but <paramref name="src"/> may be reused as soon as it returns.</remarks>
    void Upload(Tensor dst, ReadOnlySpan<float> src);
    /// <summary>Copies host ints into an I32 tensor.</summary>
    void Upload(Tensor dst, ReadOnlySpan<int> src);
    /// <summary>Copies raw little-endian element bytes (exactly dst.Bytes) into <paramref name="dst"/>.</summary>
    void UploadRaw(Tensor dst, ReadOnlySpan<byte> src);
    /// <summary>Copies the storage bytes of <paramref name="src"/> (exactly src.Bytes) to the host, e.g. a quantized tensor's blocks.</summary>
    void DownloadRaw(Tensor src, Span<byte> dst);
    /// <summary>Copies a tensor to host floats (converting BF16/F16).</summary>
    void Download(Tensor src, Span<float> dst);
    void Download(Tensor src, Span<int> dst);
    void Synchronize();
    /// <summary>
    /// Makes <paramref name="bytes"/> of memory ready for the tensors allocated after this call, so that later
    /// allocations (a training step's) need no call of the device allocator. GPU backends reserve one pool chunk;
    /// the default (CPU) does nothing.
    /// </summary>
    void Reserve(long bytes) { }

    // ---------------------------------------------------------------- elementwise
    void Fill(Tensor t, float value);
    /// <summary>dst = src (same length; converts between float dtypes).</summary>
    void Copy(Tensor dst, Tensor src);
    /// <summary>dst = a + b (may alias).</summary>
    void Add(Tensor dst, Tensor a, Tensor b);
    /// <summary>t *= s.</summary>
    void Scale(Tensor t, float s);
    /// <summary>Σ t², accumulated in double, synchronizing. Used for the gradient norm.</summary>
    double SumOfSquares(Tensor t);

    // ---------------------------------------------------------------- matmul (f32 accumulation)
    /// <summary>y(M,N) (+)= x(M,K) · w(N,K)ᵀ  [+ bias(N)]. The nn.Linear forward.</summary>
    void MatMul(Tensor y, Tensor x, Tensor w, Tensor? bias, int m, int n, int k, bool accumulate);
    /// <summary>dx(M,K) (+)= dy(M,N) · w(N,K). The nn.Linear input gradient.</summary>
    void MatMulBackwardInput(Tensor dx, Tensor dy, Tensor w, int m, int n, int k, bool accumulate);
    /// <summary>dw(N,K) += dy(M,N)ᵀ · x(M,K); dBias(N) += Σ_m dy(m,:) when given. The nn.Linear weight gradient.</summary>
    void MatMulBackwardWeight(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k);
    /// <summary>
    /// <see cref="MatMulBackwardWeight"/> for a weight trained in bf16 (autocast semantics): a backend with tensor cores
    /// may round dy and x to bf16 and accumulate in f32 into the f32 dw; dBias stays exact. Default: the exact f32 product.
    /// </summary>
    void MatMulBackwardWeightBf16(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k)
        => MatMulBackwardWeight(dw, dBias, dy, x, m, n, k);

    // ---------------------------------------------------------------- LoRA linear
    /// <summary>
    /// y(M,N) = x·wᵀ [+ bias] + s·(drop(x)·Aᵀ)·Bᵀ.
    /// Saves u(M,R) = drop(x)·Aᵀ for the backward; when Dropout &gt; 0 also saves xDrop(M,K) = drop(x)
    /// (may be null when Dropout == 0).
    /// </summary>
    void LoraLinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r);

    // ---------------------------------------------------------------- linears that feed a residual add
    // y = residual + linear(x): the attention o_proj and MLP down_proj outputs. residual (M, N) must not overlap y.
    // The defaults run the linear, then Add (y + residual: the same f32 sum as residual + y); the ILGPU backend adds
    // the residual in the matmul's epilogue (one write of y instead of write y, read y and residual, write the sum).

    /// <summary>y(M,N) = residual(M,N) + x(M,K)·w(N,K)ᵀ [+ bias(N)].</summary>
    void MatMulResidual(Tensor y, Tensor residual, Tensor x, Tensor w, Tensor? bias, int m, int n, int k)
    {
        MatMul(y, x, w, bias, m, n, k, accumulate: false);
        Add(y, y, residual);
    }

    /// <summary>y(M,N) = residual(M,N) + <see cref="LoraLinearForward"/>(x) (saving u and xDrop as it does).</summary>
    void LoraLinearForwardResidual(Tensor y, Tensor residual, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r)
    {
        LoraLinearForward(y, x, w, bias, lora, u, xDrop, m, n, k, r);
        Add(y, y, residual);
    }

    /// <summary>
    /// Backward of <see cref="LoraLinearForward"/>: g(M,R) = dy·B (scratch, overwritten);
    /// dB(N,R) += s·dyᵀ·u; dA(R,K) += s·gᵀ·drop(x); dx(M,K) (+)= dy·w + s·mask⊙(g·A)/(1-p).
    /// dW/dBias are accumulated only when given (base trained).
    /// </summary>
    void LoraLinearBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, LoraParams lora, Tensor u, Tensor? xDrop, Tensor g,
        Tensor dA, Tensor dB, Tensor? dW, Tensor? dBias, int m, int n, int k, int r, bool accumulate);

    // ---------------------------------------------------------------- DoRA (weight-decomposed LoRA)
    // y = z ⊙ m / ‖W + s·B·A‖ [+ bias] with z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (the LoRA linear without bias); the norm is a
    // constant in the backward, as in PEFT (DoRA paper §4.3). The default bodies run on the host through
    // Download/Upload (any backend, f32/bf16 W); the CPU and ILGPU backends override them (and accept nf4 W).

    /// <summary>norm(N) = ‖W(j,:) + s·B(j,:)·A‖₂ for every output row j. W (N,K); A (R,K); B (N,R).</summary>
    void DoraWeightNorm(Tensor norm, Tensor w, Tensor a, Tensor b, float scale, int n, int k, int r)
        => DoraHost.WeightNorm(this, norm, w, a, b, scale, n, k, r);

    /// <summary>y(M,N) = z ⊙ (magnitude / norm) [+ bias], per column j; y may alias z.</summary>
    void DoraScale(Tensor y, Tensor z, Tensor magnitude, Tensor norm, Tensor? bias, int m, int n)
        => DoraHost.Scale(this, y, z, magnitude, norm, bias, m, n);

    /// <summary>
    /// Backward of <see cref="DoraScale"/> with the norm constant: dMagnitude(N) += Σ_m dy ⊙ z / norm (accumulated);
    /// dz(M,N) = dy ⊙ magnitude / norm (overwritten; dz may alias z).
    /// </summary>
    void DoraScaleBackward(Tensor dz, Tensor dMagnitude, Tensor dy, Tensor z, Tensor magnitude, Tensor norm, int m, int n)
        => DoraHost.ScaleBackward(this, dz, dMagnitude, dy, z, magnitude, norm, m, n);

    /// <summary>
    /// The backward of the LoRA-input dropout, accumulated: dInput[i] += dOut[i]·(1/(1 − p)) where DropoutHash.Keep(seed, i, p)
    /// (the mask <see cref="LoraLinearForward"/> draws for xDrop, regenerated, not stored), unchanged elsewhere; i in [0, count).
    /// Computed as written in f32 (the keep scale 1f/(1f − p) rounded once, then one product and one sum, each rounded), so
    /// every backend gives the same bits. The default runs on the host through Download/Upload.
    /// </summary>
    void DropoutBackward(Tensor dInput, Tensor dOut, float dropout, ulong seed, long count)
        => DoraHost.DropoutBackward(this, dInput, dOut, dropout, seed, count);

    /// <summary>
    /// NEFTune on the embedding output x (B, S, C), in place: element i = (b·S + t)·C + c with offset ≤ t &lt; offset + L_b,
    /// L_b = lengths[b] (I32 (B): row b's real tokens), gets x[i] += (float)((2u − 1)·α/√(L_b·C)) with u ∈ [0, 1) from the
    /// counter hash of (seed, i) (<see cref="NeftuneHash"/>); padding and the <paramref name="offset"/> virtual tokens in
    /// front are unchanged. Bit-identical on every backend and thread count. The default runs on the host.
    /// </summary>
    void NeftuneNoise(Tensor x, Tensor lengths, float alpha, int batch, int seqLen, int hidden, int offset, ulong seed)
        => NeftuneHash.AddHost(this, x, lengths, alpha, batch, seqLen, hidden, offset, seed);

    // ---------------------------------------------------------------- normalization, position, activation
    /// <summary>y(M,C) = x / sqrt(mean(x²) + eps) ⊙ w(C). Saves rstd(M).</summary>
    void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int m, int c, float eps);
    /// <summary>dx(M,C) (+)= ∂; dw(C) += Σ_m dy ⊙ x·rstd.</summary>
    void RmsNormBackward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor rstd, int m, int c, bool accumulate);

    /// <summary>
    /// Rotates x(M, NH, HS) in place by angle pos(m)·θ^(-2i/HS) for pair i (pos from I32 positions(M)).
    /// inverse = true rotates by the negative angle, which is the backward.
    /// </summary>
    void Rope(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse);

    /// <summary>
    /// dst(M, NH, HS) = the forward <see cref="Rope"/> rotation of x(M, NH, HS) f32, stored in dst's float dtype (f32, bf16
    /// or f16, round to nearest even): bf16 attention's q and k rotated and rounded into the saved tensors in one pass.
    /// </summary>
    /// <remarks>
    /// x is scratch: this default rotates it in place and converts it with one <see cref="Copy"/> (two passes over it);
    /// the CPU and ILGPU backends read it once and leave it unrotated. dst's bits are the same either way.
    /// </remarks>
    void RopeInto(Tensor dst, Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout)
    {
        Rope(x, positions, m, nHeads, headSize, theta, layout, inverse: false);
        Copy(dst, x);
    }

    /// <summary>h(M,F) = silu(gate) ⊙ up.</summary>
    void SwiGluForward(Tensor h, Tensor gate, Tensor up, long count);
    /// <summary>dGate = dh ⊙ up ⊙ silu'(gate); dUp = dh ⊙ silu(gate) (both overwritten; may not alias inputs).</summary>
    void SwiGluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long count);

    // ---------------------------------------------------------------- attention
    /// <summary>
    /// Causal grouped-query attention with online softmax (no T×T matrix).
    /// q(B, Tq, NH, HS); k, v (B, Tkv, NKV, HS) of which the first kvLen rows per batch are used;
    /// query t sits at position kvLen - Tq + t and sees keys 0..that position. out (B, Tq, NH, HS);
    /// lse (B, NH, Tq) = log Σ exp(score) saved for the backward (may be null at inference).
    /// Head h reads kv head h / (NH / NKV). scale is usually 1/sqrt(HS).
    /// q, k, v may each be f32, bf16 or f16 (bf16 attention, as PyTorch's SDPA under autocast: the rounded inputs,
    /// f32 accumulation, f32 softmax statistics); every backend takes them, widening on the fly where it has no 16-bit
    /// kernel (CUDA sm_80+ runs bf16/f16 q, k, v on tensor cores). output and lse are f32.
    /// </summary>
    void AttentionForward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale);

    /// <summary>
    /// Backward of <see cref="AttentionForward"/> for training, every key row used (kvLen == Tkv, Tq &lt;= Tkv):
    /// q, dq (B, Tq, NH, HS); k, v, dk, dv (B, Tkv, NKV, HS). Query i sits at position P + i, P = Tkv - Tq, so
    /// Tq == Tkv is plain causal training and Tq &lt; Tkv puts P prefix keys (prefix tuning) before the sequence.
    /// dq, dk, dv overwritten (dk/dv sum over the query heads sharing a kv head).
    /// q, k, v as in the forward (f32, bf16 or f16: the values the forward saw); output, dOut, lse and dq, dk, dv are f32.
    /// </summary>
    void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int nHeads, int nKvHeads, int headSize, float scale);

    // ---------------------------------------------------------------- embedding, loss, optimizer
    /// <summary>out(M,C) = table(V,C)[tokens(M)]. Throws on a token outside [0, V).</summary>
    void EmbeddingForward(Tensor output, Tensor tokens, Tensor table, int m, int c);
    /// <summary>dTable(V,C) += scatter of dOut(M,C) at tokens(M).</summary>
    void EmbeddingBackward(Tensor dTable, Tensor dOut, Tensor tokens, int m, int c);

    /// <summary>
    /// Cross-entropy of logits(M,V) against targets(M) (I32; rows whose target == ignoreIndex contribute 0).
    /// losses(M) = logsumexp(row) - row[target] (0 when ignored). When computeGrad, logits are overwritten by
    /// gradScale·(softmax(row) - onehot(target)) (zeros for ignored rows). The caller chunks rows so the full
    /// (B·T, V) logits never exist at once.
    /// </summary>
    void CrossEntropy(Tensor logits, Tensor targets, Tensor losses, int m, int v, int ignoreIndex, float gradScale, bool computeGrad);

    /// <summary>
    /// Decoupled AdamW on one f32 parameter: m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²;
    /// p -= lr·( m̂ / (sqrt(v̂) + eps) + weightDecay·p ), with bias corrections for 1-based <paramref name="step"/>.
    /// The gradient is read as gradScale·grad (clipping folded in).
    /// </summary>
    void AdamW(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale);

    /// <summary>
    /// The global gradient norm ‖g‖ = sqrt(Σ over every tensor of Σ g²) (accumulated in double) in one reduction over all
    /// of <paramref name="grads"/> (f32), and the clipping scale that follows from it, written to the device tensor
    /// <paramref name="clip"/> (f32, 2): clip[0] = ‖g‖; clip[1] = maxNorm / (‖g‖ + 1e-6) when 0 &lt; maxNorm &lt; ‖g‖, else 1,
    /// and NaN when ‖g‖ is not finite. No host round trip: <see cref="AdamWMultiTensor"/> reads clip[1] on the device;
    /// download clip to see the norm.
    /// </summary>
    void GradNormClip(IReadOnlyList<Tensor> grads, Tensor clip, float maxNorm)
        => MultiTensorHost.GradNormClip(this, grads, clip, maxNorm);

    /// <summary>
    /// <see cref="AdamW"/> over every tensor of <paramref name="tensors"/> in one pass (one launch on GPU backends), each with
    /// weight decay <c>Decay ? hyper.WeightDecay : 0</c> and gradScale = clip[1] read on the device (the output of
    /// <see cref="GradNormClip"/>); when clip[1] is not finite nothing is written (the step is skipped). A tensor's
    /// <see cref="AdamWTensor.Rounded"/> receives its updated parameter in bf16/f16.
    /// </summary>
    void AdamWMultiTensor(IReadOnlyList<AdamWTensor> tensors, AdamWHyper hyper, Tensor clip)
        => MultiTensorHost.AdamWMultiTensor(this, tensors, hyper, clip);
}
