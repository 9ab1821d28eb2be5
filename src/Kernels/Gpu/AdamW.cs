using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Hyper-parameters of one AdamW step, with the bias corrections computed on the host.</summary>
public struct AdamWArgs
{
    public float Lr, Beta1, Beta2, Eps, WeightDecay, GradScale;
    /// <summary>1 - β1^step and 1 - β2^step.</summary>
    public float Correction1, Correction2;
}

/// <summary>Decoupled AdamW over one f32 parameter, one thread per element.</summary>
/// <remarks>Matches AdamWReference: m, v and param updated in place; the gradient is read as gradScale·grad.</remarks>
internal sealed class AdamWKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamWArgs> _step;

    public AdamWKernels(IlgpuBackend b)
    {
        _b = b;
        _step = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamWArgs>(AdamWKernel);
    }

    /// <summary>m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²; p -= lr·(m̂/(sqrt(v̂)+eps) + wd·p).</summary>
    [GpuKernel(false)]
    public static void AdamWKernel(Index1D i, ArrayView<float> param, ArrayView<float> grad, ArrayView<float> m, ArrayView<float> v, AdamWArgs a)
    {
        float g = grad[i] * a.GradScale;
        float mi = a.Beta1 * m[i] + (1f - a.Beta1) * g;
        float vi = a.Beta2 * v[i] + (1f - a.Beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mHat = mi / a.Correction1;
        float vHat = vi / a.Correction2;
        float p = param[i];
        param[i] = p - a.Lr * (mHat / (MathF.Sqrt(vHat) + a.Eps) + a.WeightDecay * p);
    }

    public void Step(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale)
    {
        const string op = "AdamW";
        if (step < 1) throw new ArgumentOutOfRangeException(nameof(step), $"{op}: step is 1-based, got {step}");
        IlgpuBackend.Need(grad, param.Length, "grad", op);
        IlgpuBackend.Need(m, param.Length, "m", op);
        IlgpuBackend.Need(v, param.Length, "v", op);
        int n = IlgpuBackend.CheckedCount(param.Length, op);
        if (n == 0) return;
        var args = new AdamWArgs
        {
            Lr = lr, Beta1 = beta1, Beta2 = beta2, Eps = eps, WeightDecay = weightDecay, GradScale = gradScale,
            Correction1 = (float)(1.0 - Math.Pow(beta1, step)),
            Correction2 = (float)(1.0 - Math.Pow(beta2, step)),
        };
        _step(n, _b.F32(param, "param"), _b.F32(grad, "grad"), _b.F32(m, "m"), _b.F32(v, "v"), args);
    }
}
