using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class RmsNormTests
{
    public static readonly (int M, int C)[] Shapes = { (1, 1), (3, 7), (5, 33), (2, 64), (4, 300), (9, 17) };
    private const float Eps = 1e-5f;

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_LiteralCase(string backend)
    {
        var b = Backend(backend);
        using var x = Up(b, new float[] { 3, 4 }, 1, 2);
        using var w = Up(b, new float[] { 1, 2 }, 2);
        using var y = b.Allocate(DType.F32, 1, 2);
        using var rstd = b.Allocate(DType.F32, 1);
        b.RmsNormForward(y, rstd, x, w, 1, 2, 0f);
        double rs = 1 / Math.Sqrt(12.5); // mean(9, 16) = 12.5
        Close(new[] { 3 * rs, 8 * rs }, y, "y");
        Close(new[] { rs }, rstd, "rstd");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_MatchesReference(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (var (m, c) in Shapes)
        {
            var xd = Rand(m * c, seed++, 3); var wd = Rand(c, seed++);
            using var x = Up(b, xd, m, c); using var w = Up(b, wd, c);
            using var y = Up(b, Rand(m * c, seed++, 9), m, c); using var rstd = b.Allocate(DType.F32, m);
            b.RmsNormForward(y, rstd, x, w, m, c, Eps);
            var (ey, er) = RmsNormReference.Forward(xd, wd, m, c, Eps);
            Close(ey, y, $"y M={m} C={c}");
            Close(er, rstd, $"rstd M={m} C={c}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Backward_MatchesReference(string backend)
    {
        var b = Backend(backend);
        int seed = 100;
        foreach (var (m, c) in Shapes)
            foreach (bool acc in new[] { false, true })
            {
                string what = $"M={m} C={c} acc={acc}";
                var xd = Rand(m * c, seed++, 3); var wd = Rand(c, seed++); var dyd = Rand(m * c, seed++);
                var dx0 = Rand(m * c, seed++, 9); var dw0 = Rand(c, seed++, 2);
                using var x = Up(b, xd, m, c); using var w = Up(b, wd, c); using var dy = Up(b, dyd, m, c);
                using var y = b.Allocate(DType.F32, m, c); using var rstd = b.Allocate(DType.F32, m);
                using var dx = Up(b, dx0, m, c); using var dw = Up(b, dw0, c);
                b.RmsNormForward(y, rstd, x, w, m, c, Eps);
                b.RmsNormBackward(dx, dw, dy, x, w, rstd, m, c, acc);
                var (edx, edw) = RmsNormReference.Backward(dyd, xd, wd, m, c, Eps);
                Close(acc ? Plus(edx, dx0) : edx, dx, "dx " + what);
                Close(Plus(edw, dw0), dw, "dw " + what);
            }
    }

    [Fact]
    public void ReferenceBackward_MatchesFiniteDifferences()
    {
        const int m = 3, c = 5;
        var x = Rand(m * c, 1, 2); var w = Rand(c, 2); var dy = Rand(m * c, 3);
        var (dx, dw) = RmsNormReference.Backward(dy, x, w, m, c, Eps);
        GradMatches(p => RmsNormReference.Forward(p, w, m, c, Eps).Y, x, dy, dx, "dx");
        GradMatches(p => RmsNormReference.Forward(x, p, m, c, Eps).Y, w, dy, dw, "dw");
    }
}
