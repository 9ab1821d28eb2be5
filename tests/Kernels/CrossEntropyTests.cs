using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class CrossEntropyTests
{
    private const int Ignore = -100;

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void LiteralCase(string backend)
    {
        var b = Backend(backend);
        // row 0: logits [0, 0] target 0 → ln 2, grad [1/2 - 1, 1/2]; row 1 ignored
        using var logits = Up(b, new float[] { 0, 0, 5, -5 }, 2, 2);
        using var targets = UpInt(b, new[] { 0, Ignore });
        using var losses = b.Allocate(DType.F32, 2);
        b.CrossEntropy(logits, targets, losses, 2, 2, Ignore, 1f, true);
        Close(new[] { Math.Log(2), 0 }, losses, "losses");
        Close(new[] { -0.5, 0.5, 0, 0 }, logits, "grad");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void MatchesReference_WithIgnoredRows(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (var (m, v) in new[] { (1, 1), (1, 7), (4, 33), (9, 50), (3, 1000) })
            foreach (bool grad in new[] { false, true })
            {
                string what = $"M={m} V={v} grad={grad}";
                var ld = Rand(m * v, seed++, 8);
                var targets = Enumerable.Range(0, m).Select(i => i % 3 == 2 ? Ignore : (i * 5 + 1) % v).ToArray();
                const float gradScale = 0.37f;
                using var logits = Up(b, ld, m, v); using var t = UpInt(b, targets);
                using var losses = Up(b, Rand(m, seed++, 9), m);
                b.CrossEntropy(logits, t, losses, m, v, Ignore, gradScale, grad);
                Close(CrossEntropyReference.Forward(ld, targets, m, v, Ignore), losses, "losses " + what);
                Close(grad ? CrossEntropyReference.Gradient(ld, targets, m, v, Ignore, gradScale) : ld, logits, "logits " + what);
            }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void TargetOutsideVocabulary_Throws(string backend)
    {
        var b = Backend(backend);
        using var logits = b.Allocate(DType.F32, 2, 3); using var t = UpInt(b, new[] { 1, 3 }); using var losses = b.Allocate(DType.F32, 2);
        Assert.ThrowsAny<ArgumentException>(() => { b.CrossEntropy(logits, t, losses, 2, 3, Ignore, 1, true); b.Synchronize(); });
    }

    [Fact]
    public void ReferenceGradient_MatchesFiniteDifferences()
    {
        const int m = 4, v = 5;
        var logits = Rand(m * v, 1, 3); var targets = new[] { 2, Ignore, 0, 4 };
        var ones = Enumerable.Repeat(1.0, m).ToArray();
        GradMatches(p => CrossEntropyReference.Forward(p, targets, m, v, Ignore), logits, ones,
            CrossEntropyReference.Gradient(logits, targets, m, v, Ignore, 1.0), "dLogits");
    }
}
