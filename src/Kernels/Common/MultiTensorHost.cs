namespace FineTuneNative.Kernels;

/// <summary>
/// The multi-tensor ops (<see cref="IBackend.GradNormClip"/>, <see cref="IBackend.AdamWMultiTensor"/>) written with a
/// backend's single-tensor ops and one host round trip: the default for backends without a fused form, and the
/// definition the fused forms (CPU, ILGPU) are tested against.
/// </summary>
public static class MultiTensorHost
{
    /// <summary>maxNorm / (‖g‖ + 1e-6) when 0 &lt; maxNorm &lt; ‖g‖, else 1; NaN when ‖g‖ is not finite (the step is skipped).</summary>
    public static double ClipScale(double norm, float maxNorm) =>
        !double.IsFinite(norm) ? double.NaN : maxNorm > 0 && norm > maxNorm ? maxNorm / (norm + 1e-6) : 1.0;

    public static void GradNormClip(IBackend b, IReadOnlyList<Tensor> grads, Tensor clip, float maxNorm)
    {
        double sq = 0;
        foreach (var g in grads) sq += b.SumOfSquares(g);
        double norm = Math.Sqrt(sq);
        b.Upload(clip, stackalloc float[] { (float)norm, (float)ClipScale(norm, maxNorm) });
    }

    public static void AdamWMultiTensor(IBackend b, IReadOnlyList<AdamWTensor> tensors, AdamWHyper h, Tensor clip)
    {
        Span<float> c = stackalloc float[2];
        b.Download(clip, c);
        if (!float.IsFinite(c[1])) return;
        foreach (var t in tensors)
        {
            b.AdamW(t.Param, t.Grad, t.M, t.V, h.Lr, h.Beta1, h.Beta2, h.Eps, t.Decay ? h.WeightDecay : 0f, h.Step, c[1]);
            if (t.Rounded is not null) b.Copy(t.Rounded, t.Param);
        }
    }
}
