using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class AdamWTests
{
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void FirstStep_MovesByLrTimesSign(string backend)
    {
        var b = Backend(backend);
        // step 1: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps) ≈ lr·sign(g) (no weight decay)
        using var p = Up(b, new float[] { 1, 1, 1 }, 3); using var g = Up(b, new float[] { 2, -0.5f, 1e-3f }, 3);
        using var m = b.Allocate(DType.F32, 3); using var v = b.Allocate(DType.F32, 3);
        b.AdamW(p, g, m, v, 0.1f, 0.9f, 0.999f, 1e-8f, 0f, 1, 1f);
        Close(new[] { 0.9, 1.1, 0.9 }, p, "param", (1e-5, 1e-4));
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void ThreeSteps_MatchReference(string backend)
    {
        var b = Backend(backend);
        foreach (int n in new[] { 1, 17, 1000 })
        {
            var pd = Rand(n, 1); var md = new double[n]; var vd = new double[n];
            using var p = Up(b, pd, n); using var m = b.Allocate(DType.F32, n); using var v = b.Allocate(DType.F32, n);
            for (int step = 1; step <= 3; step++)
            {
                var gd = Rand(n, 10 + step);
                using var g = Up(b, gd, n);
                b.AdamW(p, g, m, v, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, step, 0.5f);
                AdamWReference.Step(pd, gd, md, vd, 1e-2, 0.9, 0.95, 1e-8, 0.1, step, 0.5);
                Close(pd, p, $"param n={n} step={step}");
                Close(md, m, $"m n={n} step={step}");
                Close(vd, v, $"v n={n} step={step}");
            }
        }
    }
}
