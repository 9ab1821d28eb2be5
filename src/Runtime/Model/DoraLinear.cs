using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// The DoRA linear (Liu et al. 2024, PEFT use_dora) as a sequence of backend ops:
/// norm = ‖W + s·B·A‖ per output row; z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ; y = z ⊙ m / norm [+ bias].
/// </summary>
/// <remarks>
/// PEFT's variant: the norm is detached (a constant for the gradient, DoRA paper §4.3), so
/// dz = dy ⊙ m / norm, dm = Σ_rows dy ⊙ z / norm, and dA, dB, dx come from the LoRA linear's backward of dz.
/// Without dropout this equals PEFT's result = base + (m/norm - 1)·base + m/norm·s·lora exactly.
/// With LoRA dropout in training PEFT (lora.Linear.forward with use_dora) keeps the base layer on the undropped x and
/// gives DoraLinearLayer the dropped xd = drop(x), whose base result it recomputes:
/// y = x·Wᵀ + bias + (m/norm − 1) ⊙ (xd·Wᵀ) + m/norm ⊙ s·(xd·Aᵀ)·Bᵀ = x·Wᵀ − xd·Wᵀ + m/norm ⊙ zd + bias,
/// zd = xd·Wᵀ + s·(xd·Aᵀ)·Bᵀ. Backward: dzd = dy ⊙ m/norm, dm += Σ dy ⊙ zd / norm, dA/dB from the LoRA backward of dzd on
/// xd, dx = dy·W + drop′(dzd·W + s·(dzd·B)·A − dy·W) where drop′ applies the same mask and 1/(1−p). This costs a second
/// base product in the forward and two more in the backward (as PEFT's autograd does), an (M, K) copy of xd kept for
/// the backward, and a transient scratch of M·max(N, K) floats. The mask is DropoutHash's (the one LoraLinearForward
/// draws), regenerated in the backward by IBackend.DropoutBackward on the backend itself (no host round trip).
/// Saved for the backward: z (M, N), the norm (N, in the slot),
/// u (M, R) and, with dropout, xd (M, K). Reference: DoraReference (ForwardDropout for the dropout form).
/// </remarks>
public static class DoraLinear
{
    public static void Validate(LoraSlot s, int n, string where, string backendName)
    {
        if (s.DMagnitude is null || s.WeightNorm is null) throw new ArgumentException($"{where}: a DoRA slot needs Magnitude, DMagnitude and WeightNorm");
        foreach (var t in new[] { s.Magnitude!, s.DMagnitude, s.WeightNorm })
        {
            if (t.Length != n) throw new ArgumentException($"{where}: {t.Describe()} must have {n} elements (the output size)");
            if (t.DType != DType.F32) throw new ArgumentException($"{where}: {t.Describe()} must be f32");
            if (t.Backend.Name != backendName) throw new ArgumentException($"{where}: {t.Describe()} lives on backend {t.Backend.Name}, the model on {backendName}");
        }
    }

    /// <summary>y(M,N) = DoRA(x(M,K)) without dropout (evaluation, or lora_dropout 0).</summary>
    public static void Forward(IBackend b, Tensor y, Tensor x, Tensor w, Tensor? bias, LoraSlot s, Tensor u, Tensor z, int m, int n, int k) =>
        Forward(b, y, x, w, bias, s, new LoraParams(s.A, s.B, s.Scale, 0f, 0), u, z, null, null, m, n, k);

    /// <summary>Backward of the forward without dropout.</summary>
    public static void Backward(IBackend b, Tensor dx, Tensor dy, Tensor x, Tensor w, LoraSlot s, Tensor u, Tensor z, Tensor g, int m, int n, int k, bool accumulate) =>
        Backward(b, dx, dy, x, w, s, new LoraParams(s.A, s.B, s.Scale, 0f, 0), u, z, g, null, null, m, n, k, accumulate);

    /// <summary>
    /// y(M,N) = DoRA(x(M,K)); writes the slot's WeightNorm, u(M,R) and z(M,N) for the backward. With
    /// <paramref name="p"/>.Dropout &gt; 0 (training) also xDrop(M,K) = drop(x) and uses scratch (≥ M·N floats).
    /// </summary>
    public static void Forward(IBackend b, Tensor y, Tensor x, Tensor w, Tensor? bias, LoraSlot s, LoraParams p, Tensor u, Tensor z,
        Tensor? xDrop, Tensor? scratch, int m, int n, int k)
    {
        int r = s.Rank;
        b.DoraWeightNorm(s.WeightNorm!, w, s.A, s.B, s.Scale, n, k, r);
        if (p.Dropout == 0)
        {
            b.LoraLinearForward(z, x, w, null, new LoraParams(s.A, s.B, s.Scale, 0f, 0), u, null, m, n, k, r);
            b.DoraScale(y, z, s.Magnitude!, s.WeightNorm!, bias, m, n);
            return;
        }
        if (xDrop is null || scratch is null || scratch.Length < (long)m * n) throw new ArgumentException("DoRA with dropout needs xDrop (M, K) and a scratch of at least M·N floats");
        var e = scratch.Length == (long)m * n ? scratch : scratch.View(0, m, n); // an exact-size scratch is used as it is (no view object)
        b.LoraLinearForward(y, x, w, bias, p, u, xDrop, m, n, k, r);                  // y = x·Wᵀ + bias + s·u·Bᵀ, xd, u = xd·Aᵀ
        b.LoraLinearForward(z, xDrop, w, null, p with { Dropout = 0f }, u, null, m, n, k, r); // zd = xd·Wᵀ + s·u·Bᵀ
        b.DoraScale(e, z, s.Magnitude!, s.WeightNorm!, null, m, n);                  // m/norm ⊙ zd
        b.Add(y, y, e);
        b.Copy(e, z);
        b.Scale(e, -1f);
        b.Add(y, y, e);                                                               // − zd: y = x·Wᵀ − xd·Wᵀ + m/norm ⊙ zd + bias
    }

    /// <summary>
    /// Backward of <see cref="Forward"/>: accumulates (+=) DA, DB and DMagnitude of the slot; dx(M,K) (+)= (overwritten
    /// unless <paramref name="accumulate"/>). z is consumed (overwritten); g (M,R) is scratch; with dropout, xDrop is
    /// the forward's and scratch (≥ M·K floats) is overwritten.
    /// </summary>
    public static void Backward(IBackend b, Tensor dx, Tensor dy, Tensor x, Tensor w, LoraSlot s, LoraParams p, Tensor u, Tensor z, Tensor g,
        Tensor? xDrop, Tensor? scratch, int m, int n, int k, bool accumulate)
    {
        int r = s.Rank;
        b.DoraScaleBackward(z, s.DMagnitude!, dy, z, s.Magnitude!, s.WeightNorm!, m, n);   // z = dz(d) = dy ⊙ m/norm
        if (p.Dropout == 0)
        {
            b.LoraLinearBackward(dx, z, x, w, new LoraParams(s.A, s.B, s.Scale, 0f, 0), u, null, g, s.DA, s.DB, null, null, m, n, k, r, accumulate);
            return;
        }
        if (xDrop is null || scratch is null || scratch.Length < (long)m * k) throw new ArgumentException("DoRA with dropout needs xDrop (M, K) and a scratch of at least M·K floats");
        var q = scratch.Length == (long)m * k ? scratch : scratch.View(0, m, k);
        b.LoraLinearBackward(q, z, xDrop, w, p with { Dropout = 0f }, u, null, g, s.DA, s.DB, null, null, m, n, k, r, accumulate: false); // q = dzd·W + s·(dzd·B)·A
        b.Copy(z, dy);
        b.Scale(z, -1f);
        b.MatMulBackwardInput(q, z, w, m, n, k, accumulate: true);                   // q −= dy·W (the −xd·Wᵀ term)
        b.MatMulBackwardInput(dx, dy, w, m, n, k, accumulate);                        // dx (+)= dy·W (the undropped base)
        b.DropoutBackward(dx, q, p.Dropout, p.Seed, (long)m * k);                     // dx += mask ⊙ q / (1 − p), on the device
    }
}
