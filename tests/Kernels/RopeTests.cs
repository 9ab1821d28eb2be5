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

    /// <summary>
    /// RopeInto (bf16 attention's fused RoPE + rounding) writes exactly what Rope in place followed by a converting Copy
    /// wrote before it, for every float dst dtype, both layouts and ragged shapes (37·3·20 pairs: no whole thread group),
    /// and leaves its f32 input unrotated.
    /// </summary>
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void RopeInto_EqualsRopeThenCopy_BitForBit(string backend)
    {
        var b = Backend(backend);
        int seed = 100;
        foreach (var (m, nh, hs) in Shapes.Append((37, 3, 40)))
            foreach (var layout in new[] { RopeLayout.RotateHalf, RopeLayout.Interleaved })
                foreach (var dtype in new[] { DType.BF16, DType.F16, DType.F32 })
                {
                    string what = $"M={m} NH={nh} HS={hs} {layout} {dtype.Name()}";
                    var xd = Rand(m * nh * hs, seed++, 3.0); var pd = Positions(m);
                    using var x = Up(b, xd, m, nh, hs); using var pos = UpInt(b, pd);
                    using var before = b.Allocate(dtype, m, nh, hs);
                    using var fused = b.Allocate(dtype, m, nh, hs);
                    b.Fill(fused, float.NaN); // every element must be written
                    var xBits = Bits(b, x);
                    b.RopeInto(fused, x, pos, m, nh, hs, Theta, layout);
                    Assert.Equal(xBits, Bits(b, x)); // read only
                    b.Rope(x, pos, m, nh, hs, Theta, layout, inverse: false);
                    b.Copy(before, x);
                    if (TestBackends.Contracts(backend))
                        // two kernels: ptxas may contract x0·c − x1·s into an FFMA on either product, not necessarily the
                        // same one in both, so the f32 values may differ in their last bit and a 16-bit rounding by one ulp
                        Close(Down(before), fused, what, dtype == DType.F32 ? (1e-6, 1e-6) : (1e-6, dtype == DType.BF16 ? 1.0 / 128 : 1.0 / 1024));
                    else Assert.True(Bits(b, before).SequenceEqual(Bits(b, fused)), what);
                    Close(RopeReference.Apply(xd, pd, m, nh, hs, Theta, layout, false), fused, what,
                        Tolerance.For(dtype));
                }
    }

    /// <summary>
    /// The CPU kernel (Vector512 rotate-half, inverse frequencies formed once per call) gives the bits of the scalar
    /// per-row formula written out here: angle = pos·θ^(-2i/HS) in double, sin/cos rounded to f32, f32 products.
    /// </summary>
    [Fact]
    public void Cpu_EqualsTheScalarFormula_BitForBit()
    {
        var b = Backend("cpu");
        foreach (var (m, nh, hs) in Shapes.Append((9, 3, 64)).Append((5, 2, 128)).Append((3, 2, 40)))
            foreach (var layout in new[] { RopeLayout.RotateHalf, RopeLayout.Interleaved })
                foreach (bool inverse in new[] { false, true })
                {
                    var xf = FineTuneNative.Tests.Numerics.GradCheck.ToFloat(Rand(m * nh * hs, m + hs, 2.0)); var pd = Positions(m);
                    var expected = (float[])xf.Clone();
                    int half = hs / 2;
                    for (int t = 0; t < m; t++)
                        for (int i = 0; i < half; i++)
                        {
                            (double sd, double cd) = Math.SinCos(pd[t] * Math.Pow(Theta, -2.0 * i / hs));
                            float c = (float)cd, s = inverse ? (float)-sd : (float)sd;
                            for (int h = 0; h < nh; h++)
                            {
                                int at = (t * nh + h) * hs;
                                int ia = layout == RopeLayout.Interleaved ? at + 2 * i : at + i, ib = layout == RopeLayout.Interleaved ? ia + 1 : ia + half;
                                float x0 = xf[ia], x1 = xf[ib];
                                expected[ia] = x0 * c - x1 * s;
                                expected[ib] = x0 * s + x1 * c;
                            }
                        }
                    using var x = Up(b, xf, m, nh, hs); using var pos = UpInt(b, pd);
                    b.Rope(x, pos, m, nh, hs, Theta, layout, inverse);
                    Assert.Equal(expected, x.ToArray());
                }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void RopeInto_RefusesAShortDestination(string backend)
    {
        var b = Backend(backend);
        using var x = Up(b, Rand(2 * 4, 1), 2, 1, 4); using var pos = UpInt(b, new[] { 0, 1 });
        using var dst = b.Allocate(DType.BF16, 1, 1, 4);
        ThrowsNaming("dst", () => b.RopeInto(dst, x, pos, 2, 1, 4, Theta, RopeLayout.RotateHalf));
    }

    private static byte[] Bits(IBackend b, Tensor t)
    {
        var bytes = new byte[t.Bytes];
        b.DownloadRaw(t, bytes);
        return bytes;
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
