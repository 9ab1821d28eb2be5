using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class SwiGluTests
{
    public static readonly int[] Counts = { 1, 7, 33, 1000, 40000 };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_LiteralCase(string backend)
    {
        var b = Backend(backend);
        using var g = Up(b, new float[] { 0, 1, -2 }, 3); using var u = Up(b, new float[] { 5, 2, 3 }, 3);
        using var h = b.Allocate(DType.F32, 3);
        b.SwiGluForward(h, g, u, 3);
        // silu(0) = 0, silu(1) = 1/(1+e^-1), silu(-2) = -2/(1+e^2)
        Close(new[] { 0.0, 2 / (1 + Math.Exp(-1)), 3 * -2 / (1 + Math.Exp(2)) }, h, "h");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void ForwardAndBackward_MatchReference(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (int n in Counts)
        {
            if (n > 1000 && TestBackends.IsSimulator(backend)) continue; // the simulator is slow; the 1000 case has the ragged tail
            var gd = Rand(n, seed++, 6); var ud = Rand(n, seed++, 2); var dhd = Rand(n, seed++);
            using var g = Up(b, gd, n); using var u = Up(b, ud, n); using var dh = Up(b, dhd, n);
            using var h = Up(b, Rand(n, seed++, 9), n); using var dg = Up(b, Rand(n, seed++, 9), n); using var du = Up(b, Rand(n, seed++, 9), n);
            b.SwiGluForward(h, g, u, n);
            b.SwiGluBackward(dg, du, dh, g, u, n);
            Close(SwiGluReference.Forward(gd, ud), h, $"h n={n}");
            var (edg, edu) = SwiGluReference.Backward(dhd, gd, ud);
            Close(edg, dg, $"dGate n={n}");
            Close(edu, du, $"dUp n={n}");
        }
    }

    [Fact]
    public void ReferenceBackward_MatchesFiniteDifferences()
    {
        var g = Rand(9, 1, 4); var u = Rand(9, 2); var dh = Rand(9, 3);
        var (dg, du) = SwiGluReference.Backward(dh, g, u);
        GradMatches(p => SwiGluReference.Forward(p, u), g, dh, dg, "dGate");
        GradMatches(p => SwiGluReference.Forward(g, p), u, dh, du, "dUp");
    }
}
