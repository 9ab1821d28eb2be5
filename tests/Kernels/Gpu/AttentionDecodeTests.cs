using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The single-query decode attention (AttentionDecode.cs) on both simulator shapes against AttentionReference with
/// Tq = 1: through IBackend.AttentionForward (which sends Tq == 1 to it), split over several key ranges with the
/// combine pass, per-sequence cache lengths (ragged batch, a range past the end of a short sequence), a bf16 cache.
/// </summary>
public class AttentionDecodeTests
{
    public static IEnumerable<object[]> Sims() => new[] { new object[] { "ilgpu-sim:32" }, new object[] { "ilgpu-sim:4" } };

    private static float[] Rand(int n, int seed) => GradCheck.ToFloat(GradCheck.Random(n, seed, 1.0));

    private static Tensor Up(IBackend b, DType dtype, float[] data)
    {
        var t = b.Allocate(dtype, data.Length);
        b.Upload(t, data);
        return t;
    }

    private static double[] D(float[] x) => x.Select(e => (double)e).ToArray();

    /// <summary>The reference for sequence <paramref name="seq"/> alone with <paramref name="len"/> cache rows.</summary>
    private static (double[] Out, double[] Lse) Reference(float[] q, float[] k, float[] v, int seq, int tkv, int len, int nh, int nkv, int hs, float scale)
    {
        int qn = nh * hs, kn = tkv * nkv * hs;
        return AttentionReference.Forward(D(q[(seq * qn)..((seq + 1) * qn)]), D(k[(seq * kn)..((seq + 1) * kn)]), D(v[(seq * kn)..((seq + 1) * kn)]),
            1, 1, tkv, len, nh, nkv, hs, scale);
    }

    [Theory, MemberData(nameof(Sims))]
    public void BackendDecodeStepMatchesReference(string name)
    {
        var b = TestBackends.Get(name);
        int bsz = 2, tkv = 40, kvLen = 37, nh = 4, nkv = 2, hs = 6;
        float scale = 1f / MathF.Sqrt(hs);
        float[] q = Rand(bsz * nh * hs, 1), k = Rand(bsz * tkv * nkv * hs, 2), v = Rand(bsz * tkv * nkv * hs, 3);
        using var tq = Up(b, DType.F32, q);
        using var tk = Up(b, DType.F32, k);
        using var tv = Up(b, DType.F32, v);
        using var to = Up(b, DType.F32, Rand(q.Length, 4)); // overwritten
        using var tl = b.Allocate(DType.F32, bsz * nh);
        b.AttentionForward(to, tl, tq, tk, tv, bsz, 1, tkv, kvLen, nh, nkv, hs, scale);
        var e = AttentionReference.Forward(D(q), D(k), D(v), bsz, 1, tkv, kvLen, nh, nkv, hs, scale);
        NumericAssert.Close(e.Out, to.ToArray(), Tolerance.F32.Atol, Tolerance.F32.Rtol, "out");
        NumericAssert.Close(e.Lse, tl.ToArray(), Tolerance.F32.Atol, Tolerance.F32.Rtol, "lse");
    }

    /// <summary>Ranges of 8 keys: lengths 37 (5 ranges, the last of 5 keys), 9 (a second range of one key, three empty ones) and 1.</summary>
    [Theory, MemberData(nameof(Sims))]
    public void SplitRangesAndRaggedLengthsMatchReference(string name)
    {
        var b = (IlgpuBackend)TestBackends.Get(name);
        int[] lengths = { 37, 9, 1 };
        int bsz = lengths.Length, tkv = 40, nh = 3, nkv = 1, hs = 20;
        float scale = 0.3f;
        float[] q = Rand(bsz * nh * hs, 11), k = Rand(bsz * tkv * nkv * hs, 12), v = Rand(bsz * tkv * nkv * hs, 13);
        using var tq = Up(b, DType.F32, q);
        using var tk = Up(b, DType.F32, k);
        using var tv = Up(b, DType.F32, v);
        using var to = b.Allocate(DType.F32, q.Length);
        using var tl = b.Allocate(DType.F32, bsz * nh);
        using var tlen = b.Allocate(DType.I32, bsz);
        b.Upload(tlen, lengths);
        b.Exclusive(() => b.Kernels(x => new AttentionDecodeKernels(x)).Forward(to, tl, tq, tk, tv, tlen, bsz, tkv, 0, nh, nkv, hs, scale, splitKeys: 8)); // shared backend
        float[] o = to.ToArray(), l = tl.ToArray();
        for (int s = 0; s < bsz; s++)
        {
            var e = Reference(q, k, v, s, tkv, lengths[s], nh, nkv, hs, scale);
            NumericAssert.Close(e.Out, o.AsSpan(s * nh * hs, nh * hs), Tolerance.F32.Atol, Tolerance.F32.Rtol, $"out of sequence {s}");
            NumericAssert.Close(e.Lse, l.AsSpan(s * nh, nh), Tolerance.F32.Atol, Tolerance.F32.Rtol, $"lse of sequence {s}");
        }
    }

    [Theory, MemberData(nameof(Sims))]
    public void Bf16CacheMatchesReferenceOnItsValues(string name)
    {
        var b = TestBackends.Get(name);
        int tkv = 24, kvLen = 24, nh = 2, nkv = 2, hs = 16;
        float scale = 0.25f;
        float[] q = Rand(nh * hs, 21), k = Rand(tkv * nkv * hs, 22), v = Rand(tkv * nkv * hs, 23);
        float[] Rounded(float[] x) => x.Select(e => HalfBits.Bf16ToF32(HalfBits.F32ToBf16(e))).ToArray();
        using var tq = Up(b, DType.F32, q);
        using var tk = Up(b, DType.BF16, k);
        using var tv = Up(b, DType.BF16, v);
        using var to = b.Allocate(DType.F32, q.Length);
        b.AttentionForward(to, null, tq, tk, tv, 1, 1, tkv, kvLen, nh, nkv, hs, scale);
        var e = AttentionReference.Forward(D(q), D(Rounded(k)), D(Rounded(v)), 1, 1, tkv, kvLen, nh, nkv, hs, scale);
        NumericAssert.Close(e.Out, to.ToArray(), Tolerance.F32.Atol, Tolerance.F32.Rtol, "out");
    }

    [Fact]
    public void PlanGivesTwoGroupsPerMultiprocessorWithinTheRangeBounds()
    {
        // H100 (132 SMs), Llama-3.2-1B decode (NH = 32), batch 1: 264 / 32 -> 9 ranges of 456 keys for a 4096 cache
        Assert.Equal((9, 456), AttentionDecodeKernels.Plan(32, 4096, 132));
        // 8192 keys: 9 ranges would exceed 512 keys each -> 16 of 512
        Assert.Equal((16, 512), AttentionDecodeKernels.Plan(32, 8192, 132));
        // a short cache is not cut below 64 keys per range; a large batch needs no split
        Assert.Equal((2, 50), AttentionDecodeKernels.Plan(32, 100, 132));
        Assert.Equal((1, 400), AttentionDecodeKernels.Plan(64 * 32, 400, 132));
        Assert.Equal((8, 512), AttentionDecodeKernels.Plan(64 * 32, 4096, 132)); // but never more than 512 keys per range (shared scores)
        Assert.Equal((5, 8), AttentionDecodeKernels.Plan(3, 37, 1, splitKeys: 8));
    }
}
