using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// The DoRA linear (Liu et al. 2024, PEFT use_dora) as a sequence of backend ops:
/// norm = ‖W + s·B·A‖ per output row; z = x·Wᵀ + s·(x·Aᵀ)·Bᵀ; y = z ⊙ m / norm [+ bias].
/// </summary>
/// <remarks>
/// PEFT's variant: the norm is detached (a constant for the gradient, DoRA paper §4.3), so
/// dz = dy ⊙ m / norm, dm = Σ_rows dy ⊙ z / norm, and dA, dB, dx come from the LoRA linear's backward of dz.
/// Without dropout this equals PEFT's result = base + (m/norm - 1)·base + m/norm·s·lora exactly; LoRA dropout with
/// DoRA is refused (PEFT then evaluates the base on the dropped input too, another matmul we do not implement).
/// Saved for the backward: z (M, N) and the norm (N, in the slot). Reference: DoraReference.
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
        if (s.Dropout != 0) throw new ArgumentException($"{where}: DoRA with LoRA dropout {s.Dropout} is not supported (use lora_dropout 0)");
    }

    /// <summary>y(M,N) = DoRA(x(M,K)); writes the slot's WeightNorm, u(M,R) and z(M,N) for the backward.</summary>
    public static void Forward(IBackend b, Tensor y, Tensor x, Tensor w, Tensor? bias, LoraSlot s, Tensor u, Tensor z, int m, int n, int k)
    {
        int r = s.Rank;
        b.DoraWeightNorm(s.WeightNorm!, w, s.A, s.B, s.Scale, n, k, r);
        b.LoraLinearForward(z, x, w, null, new LoraParams(s.A, s.B, s.Scale, 0f, 0), u, null, m, n, k, r);
        b.DoraScale(y, z, s.Magnitude!, s.WeightNorm!, bias, m, n);
    }

    /// <summary>
    /// Backward of <see cref="Forward"/>: accumulates (+=) DA, DB and DMagnitude of the slot; dx(M,K) (+)= (overwritten
    /// unless <paramref name="accumulate"/>). z is consumed (overwritten by dz); g (M,R) is scratch.
    /// </summary>
    public static void Backward(IBackend b, Tensor dx, Tensor dy, Tensor x, Tensor w, LoraSlot s, Tensor u, Tensor z, Tensor g, int m, int n, int k, bool accumulate)
    {
        int r = s.Rank;
        b.DoraScaleBackward(z, s.DMagnitude!, dy, z, s.Magnitude!, s.WeightNorm!, m, n);
        b.LoraLinearBackward(dx, z, x, w, new LoraParams(s.A, s.B, s.Scale, 0f, 0), u, null, g, s.DA, s.DB, null, null, m, n, k, r, accumulate);
    }
}
