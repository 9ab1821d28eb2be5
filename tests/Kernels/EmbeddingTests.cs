using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class EmbeddingTests
{
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_GathersRows_F32AndBf16(string backend)
    {
        var b = Backend(backend);
        foreach (var (v, c, m) in new[] { (1, 1, 1), (5, 3, 4), (37, 19, 11), (10, 300, 6) })
            foreach (bool bf16 in new[] { false, true })
            {
                var table = Rand(v * c, v + c, 2);
                if (bf16) table = RoundBf16(table);
                var tokens = Enumerable.Range(0, m).Select(i => (i * 7 + 3) % v).ToArray();
                using var tt = bf16 ? UpBf16(b, GradCheck.ToFloat(table), v, c) : Up(b, table, v, c);
                using var tok = UpInt(b, tokens);
                using var o = Up(b, Rand(m * c, 9, 9), m, c);
                b.EmbeddingForward(o, tok, tt, m, c);
                Close(EmbeddingReference.Forward(tokens, table, m, c), o, $"out V={v} C={c} M={m} bf16={bf16}");
            }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Backward_ScatterAdds_RepeatedTokens(string backend)
    {
        var b = Backend(backend);
        foreach (var (v, c, m) in new[] { (1, 1, 1), (5, 3, 9), (37, 19, 40), (4, 300, 6) })
        {
            var tokens = Enumerable.Range(0, m).Select(i => (i * i + 1) % v).ToArray(); // repeats
            var dOut = Rand(m * c, m, 1); var d0 = Rand(v * c, c, 3);
            using var dTable = Up(b, d0, v, c); using var d = Up(b, dOut, m, c); using var tok = UpInt(b, tokens);
            b.EmbeddingBackward(dTable, d, tok, m, c);
            Close(Plus(d0, EmbeddingReference.Backward(dOut, tokens, m, v, c)), dTable, $"dTable V={v} C={c} M={m}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_TokenOutsideVocabulary_Throws(string backend)
    {
        var b = Backend(backend);
        using var table = b.Allocate(DType.F32, 4, 2); using var o = b.Allocate(DType.F32, 2, 2);
        foreach (int bad in new[] { 4, -1 })
        {
            using var tok = UpInt(b, new[] { 1, bad });
            var e = Assert.ThrowsAny<ArgumentException>(() => { b.EmbeddingForward(o, tok, table, 2, 2); b.Synchronize(); });
            Assert.Contains(bad.ToString(), e.Message);
        }
    }

    [Fact]
    public void ReferenceBackward_MatchesFiniteDifferences()
    {
        const int v = 4, c = 3, m = 5;
        var tokens = new[] { 1, 3, 1, 0, 1 };
        var table = Rand(v * c, 1); var dOut = Rand(m * c, 2);
        GradMatches(p => EmbeddingReference.Forward(tokens, p, m, c), table, dOut, EmbeddingReference.Backward(dOut, tokens, m, v, c), "dTable");
    }
}
