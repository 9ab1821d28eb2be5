using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class RopeTests
{
    // (M, NH, HS)
    public static readonly (int M, int NH, int HS)[] Shapes = { (1, 1, 2), (3, 2, 4), (5, 3, 6), (7, 2, 16), (4, 1, 34) };
    private const float Theta = 10000f;

    private static int[] Positions(int m) => Enumerable.Range(0, m).Select(i => i * i * 3 + (i % 2)).ToArray(); // 0, 4, 12, 27, ...

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void LiteralCase_RotatesByPosition(string backend)
    {
        var b = Backend(backend);
        foreach (var layout in new[] { RopeLayout.RotateHalf, RopeLayout.Interleaved })
        {
            // HS = 2: one pair, angle = pos·θ⁰ = pos; [1, 0] at position 1 turns into [cos 1, sin 1]
            using var x = Up(b, new float[] { 1, 0, 0, 2 }, 2, 1, 2);
            using var pos = UpInt(b, new[] { 1, 3 });
            b.Rope(x, pos, 2, 1, 2, Theta, layout, false);
            Close(new[] { Math.Cos(1), Math.Sin(1), -2 * Math.Sin(3), 2 * Math.Cos(3) }, x, $"x {layout}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void MatchesReference_AndInverseUndoes(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (var (m, nh, hs) in Shapes)
            foreach (var layout in new[] { RopeLayout.RotateHalf, RopeLayout.Interleaved })
                foreach (bool inverse in new[] { false, true })
                {
                    string what = $"M={m} NH={nh} HS={hs} {layout} inverse={inverse}";
                    var xd = Rand(m * nh * hs, seed++); var pd = Positions(m);
                    using var x = Up(b, xd, m, nh, hs); using var pos = UpInt(b, pd);
                    b.Rope(x, pos, m, nh, hs, Theta, layout, inverse);
                    Close(RopeReference.Apply(xd, pd, m, nh, hs, Theta, layout, inverse), x, what);
                    b.Rope(x, pos, m, nh, hs, Theta, layout, !inverse);
                    Close(xd, x, "round trip " + what);
                }
    }

    /// <summary>RoPE is a rotation, so its backward (the gradient of Σ dy⊙rope(x)) is the inverse rotation of dy.</summary>
    [Fact]
    public void ReferenceInverse_IsTheGradient()
    {
        const int m = 3, nh = 2, hs = 6;
        var pd = Positions(m);
        foreach (var layout in new[] { RopeLayout.RotateHalf, RopeLayout.Interleaved })
        {
            var x = Rand(m * nh * hs, 1); var dy = Rand(m * nh * hs, 2);
            GradMatches(p => RopeReference.Apply(p, pd, m, nh, hs, Theta, layout, false), x, dy,
                RopeReference.Apply(dy, pd, m, nh, hs, Theta, layout, true), $"dx {layout}");
        }
    }
}
