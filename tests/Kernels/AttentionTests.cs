using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class AttentionTests
{
    // (B, Tq, Tkv, kvLen, NH, NKV, HS)
    public static readonly (int B, int Tq, int Tkv, int KvLen, int NH, int NKV, int HS)[] ForwardShapes =
    {
        (1, 1, 1, 1, 1, 1, 4),     // one token
        (2, 5, 5, 5, 4, 2, 8),     // GQA 4 heads on 2 kv heads
        (1, 13, 13, 13, 2, 2, 16), // T not a multiple of any tile
        (2, 1, 9, 6, 4, 2, 8),     // decode: one query, kvLen < Tkv (cache not full)
        (1, 3, 10, 7, 4, 1, 6),    // chunked prefill: 3 new queries at positions 4..6, one kv head
        (1, 19, 19, 19, 3, 1, 5),  // odd head size, MQA
        (1, 70, 70, 70, 2, 1, 8),  // more than one block of keys (CPU: 64) and of query rows (CPU: 16)
        (1, 1, 150, 130, 2, 2, 16), // decode over three key blocks
        (1, 30, 90, 80, 2, 1, 8),  // chunked prefill whose row block straddles a key block edge
    };

    // (B, Tq, Tkv, NH, NKV, HS); Tq < Tkv: the first Tkv - Tq keys are a prefix every query sees (prefix tuning)
    public static readonly (int B, int Tq, int Tkv, int NH, int NKV, int HS)[] BackwardShapes =
    {
        (1, 1, 1, 1, 1, 4), (2, 5, 5, 4, 2, 8), (1, 13, 13, 2, 2, 16), (1, 19, 19, 3, 1, 5), (2, 7, 7, 4, 4, 6), (1, 70, 70, 2, 1, 8),
        (1, 1, 4, 2, 1, 4),    // one query after a prefix of 3
        (2, 5, 8, 4, 2, 8),    // GQA with a prefix of 3
        (1, 6, 7, 1, 1, 5),    // prefix of 1, odd head size
        (1, 20, 70, 2, 1, 8),  // prefix of 50: the first key block (CPU: 64) mixes prefix and causal keys
        (1, 17, 100, 2, 2, 4), // prefix of 83 spans a whole key block; rows straddle a query block (CPU: 16)
    };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_LiteralCase(string backend)
    {
        var b = Backend(backend);
        // T=2, HS=1, scale 1: q = [1, 2], k = [0, ln 3], v = [10, 20].
        // row 0 sees key 0 only: out = 10, lse = 0. Row 1: scores 0 and 2 ln 3 → weights 1/10, 9/10: out = 19, lse = ln 10.
        using var q = Up(b, new float[] { 1, 2 }, 1, 2, 1, 1);
        using var k = Up(b, new float[] { 0, (float)Math.Log(3) }, 1, 2, 1, 1);
        using var v = Up(b, new float[] { 10, 20 }, 1, 2, 1, 1);
        using var o = b.Allocate(DType.F32, 1, 2, 1, 1); using var lse = b.Allocate(DType.F32, 1, 1, 2);
        b.AttentionForward(o, lse, q, k, v, 1, 2, 2, 2, 1, 1, 1, 1f);
        Close(new double[] { 10, 19 }, o, "out");
        Close(new double[] { 0, Math.Log(10) }, lse, "lse");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Forward_MatchesReference(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (var (bs, tq, tkv, kvLen, nh, nkv, hs) in ForwardShapes)
        {
            string what = $"B={bs} Tq={tq} Tkv={tkv} kvLen={kvLen} NH={nh} NKV={nkv} HS={hs}";
            float scale = 1f / MathF.Sqrt(hs);
            var qd = Rand(bs * tq * nh * hs, seed++, 2); var kd = Rand(bs * tkv * nkv * hs, seed++, 2); var vd = Rand(bs * tkv * nkv * hs, seed++);
            // rows past kvLen hold garbage the kernel must not read
            for (int bb = 0; bb < bs; bb++)
                for (int t = kvLen; t < tkv; t++)
                    for (int c = 0; c < nkv * hs; c++) { kd[(bb * tkv + t) * nkv * hs + c] = 1e4; vd[(bb * tkv + t) * nkv * hs + c] = 1e4; }
            using var q = Up(b, qd, bs, tq, nh, hs); using var k = Up(b, kd, bs, tkv, nkv, hs); using var v = Up(b, vd, bs, tkv, nkv, hs);
            using var o = Up(b, Rand(qd.Length, seed++, 9), bs, tq, nh, hs); using var lse = b.Allocate(DType.F32, bs, nh, tq);
            b.AttentionForward(o, lse, q, k, v, bs, tq, tkv, kvLen, nh, nkv, hs, scale);
            var (eo, el) = AttentionReference.Forward(qd, kd, vd, bs, tq, tkv, kvLen, nh, nkv, hs, scale);
            Close(eo, o, "out " + what);
            Close(el, lse, "lse " + what);
            // lse is optional at inference
            using var o2 = b.Allocate(DType.F32, bs, tq, nh, hs);
            b.AttentionForward(o2, null, q, k, v, bs, tq, tkv, kvLen, nh, nkv, hs, scale);
            Close(eo, o2, "out without lse " + what);
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Backward_MatchesReference_Overwrites(string backend)
    {
        var b = Backend(backend);
        int seed = 100;
        foreach (var (bs, t, tkv, nh, nkv, hs) in BackwardShapes)
        {
            string what = $"B={bs} Tq={t} Tkv={tkv} NH={nh} NKV={nkv} HS={hs}";
            float scale = 1f / MathF.Sqrt(hs);
            int qn = bs * t * nh * hs, kn = bs * tkv * nkv * hs;
            var qd = Rand(qn, seed++, 2); var kd = Rand(kn, seed++, 2); var vd = Rand(kn, seed++); var dod = Rand(qn, seed++);
            using var q = Up(b, qd, bs, t, nh, hs); using var k = Up(b, kd, bs, tkv, nkv, hs); using var v = Up(b, vd, bs, tkv, nkv, hs);
            using var o = b.Allocate(DType.F32, bs, t, nh, hs); using var lse = b.Allocate(DType.F32, bs, nh, t);
            using var dOut = Up(b, dod, bs, t, nh, hs);
            using var dq = Up(b, Rand(qn, seed++, 9), bs, t, nh, hs);
            using var dk = Up(b, Rand(kn, seed++, 9), bs, tkv, nkv, hs);
            using var dv = Up(b, Rand(kn, seed++, 9), bs, tkv, nkv, hs);
            b.AttentionForward(o, lse, q, k, v, bs, t, tkv, tkv, nh, nkv, hs, scale);
            b.AttentionBackward(dq, dk, dv, dOut, o, lse, q, k, v, bs, t, tkv, nh, nkv, hs, scale);
            var (edq, edk, edv) = AttentionReference.Backward(dod, qd, kd, vd, bs, t, tkv, nh, nkv, hs, scale);
            Close(edq, dq, "dq " + what);
            Close(edk, dk, "dk " + what);
            Close(edv, dv, "dv " + what);
        }
    }

    [Theory]
    [InlineData(4)] // plain causal
    [InlineData(7)] // a prefix of 3 keys every query sees
    public void ReferenceBackward_MatchesFiniteDifferences(int tkv)
    {
        const int bs = 2, t = 4, nh = 4, nkv = 2, hs = 3;
        const double scale = 0.7;
        var q = Rand(bs * t * nh * hs, 1); var k = Rand(bs * tkv * nkv * hs, 2); var v = Rand(bs * tkv * nkv * hs, 3); var dOut = Rand(q.Length, 4);
        var (dq, dk, dv) = AttentionReference.Backward(dOut, q, k, v, bs, t, tkv, nh, nkv, hs, scale);
        double[] F(double[] qq, double[] kk, double[] vv) => AttentionReference.Forward(qq, kk, vv, bs, t, tkv, tkv, nh, nkv, hs, scale).Out;
        GradMatches(p => F(p, k, v), q, dOut, dq, "dq");
        GradMatches(p => F(q, p, v), k, dOut, dk, "dk");
        GradMatches(p => F(q, k, p), v, dOut, dv, "dv");
    }
}
