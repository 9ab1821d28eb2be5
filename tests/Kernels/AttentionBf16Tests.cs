using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// bf16/f16 q, k, v on every backend (IBackend.AttentionForward/Backward): the CPU backend and the ILGPU SIMT kernels
/// widen the 16-bit values exactly, so forward and backward must equal the double reference on the rounded inputs to
/// f32 tolerance, the gradient check of the bf16 path. The simulator has no tensor cores, so on "ilgpu-sim:*" this is
/// the pre-sm_80 fallback (AttentionKernels.TensorCores = false) that used to throw for bf16 inputs. On tensor cores
/// (CUDA sm_80+, "ilgpu-sim-tc") q, k, v of one 16-bit dtype take the tensor-core kernels, which also round P (and dO,
/// dS in the backward) to that dtype, at tile boundaries of the online softmax no reference reproduces: there out and
/// the gradients get the dtype's tolerance, as AttentionTensorCoreTests give them; lse (f32 from exact products) stays f32.
/// </summary>
public class AttentionBf16Tests
{
    // (B, Tq, Tkv, NH, NKV, HS, q/k/v dtypes); Tq < Tkv: a prefix of Tkv - Tq keys every query sees
    public static readonly (int B, int Tq, int Tkv, int NH, int NKV, int HS, DType Q, DType K, DType V)[] Shapes =
    {
        (1, 5, 5, 2, 1, 8, DType.BF16, DType.BF16, DType.BF16),   // GQA 2:1
        (2, 6, 9, 4, 2, 6, DType.BF16, DType.BF16, DType.BF16),   // prefix of 3, odd-ish head size, two sequences
        (1, 7, 7, 2, 2, 5, DType.F16, DType.F16, DType.F16),      // f16
        (1, 4, 4, 2, 1, 4, DType.BF16, DType.F32, DType.F16),     // mixed: each input widened on its own
        (1, 33, 33, 1, 1, 72, DType.BF16, DType.BF16, DType.BF16), // head > 64, more than one key tile of the SIMT kernels (32)
    };

    private static double[] Round(double[] x, DType d) => d switch
    {
        DType.BF16 => RoundBf16(x),
        DType.F16 => Array.ConvertAll(x, e => (double)HalfBits.F16ToF32(HalfBits.F32ToF16((float)e))),
        _ => x,
    };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void HalfInputs_MatchReferenceOnRoundedInputs(string backend)
    {
        var b = Backend(backend);
        int seed = 500;
        foreach (var (bs, t, tkv, nh, nkv, hs, dq_, dk_, dv_) in Shapes)
        {
            string what = $"B={bs} Tq={t} Tkv={tkv} NH={nh} NKV={nkv} HS={hs} q {dq_.Name()} k {dk_.Name()} v {dv_.Name()}";
            float scale = 1f / MathF.Sqrt(hs);
            int qn = bs * t * nh * hs, kn = bs * tkv * nkv * hs;
            var qd = Rand(qn, seed++, 2); var kd = Rand(kn, seed++, 2); var vd = Rand(kn, seed++); var dod = Rand(qn, seed++);
            using var q = UpAs(b, dq_, qd, bs, t, nh, hs);
            using var k = UpAs(b, dk_, kd, bs, tkv, nkv, hs);
            using var v = UpAs(b, dv_, vd, bs, tkv, nkv, hs);
            var (rq, rk, rv) = (Round(qd, dq_), Round(kd, dk_), Round(vd, dv_));
            using var o = Up(b, Rand(qn, seed++, 9), bs, t, nh, hs); // overwritten
            using var lse = b.Allocate(DType.F32, bs, nh, t);
            b.AttentionForward(o, lse, q, k, v, bs, t, tkv, tkv, nh, nkv, hs, scale);
            var (eo, el) = AttentionReference.Forward(rq, rk, rv, bs, t, tkv, tkv, nh, nkv, hs, scale);
            bool tc = TestBackends.RoundsOperands(b) && (dq_ is DType.BF16 or DType.F16) && dk_ == dq_ && dv_ == dq_; // AttentionTensorCoreKernels.Takes (HS ≤ 128 here)
            var tol = tc ? Tolerance.For(dq_) : Tolerance.F32;
            Close(eo, o, "out " + what, tol);
            Close(el, lse, "lse " + what);

            using var dOut = Up(b, dod, bs, t, nh, hs);
            using var dq = Up(b, Rand(qn, seed++, 9), bs, t, nh, hs); // pre-filled: overwritten
            using var dk = Up(b, Rand(kn, seed++, 9), bs, tkv, nkv, hs);
            using var dv = Up(b, Rand(kn, seed++, 9), bs, tkv, nkv, hs);
            b.AttentionBackward(dq, dk, dv, dOut, o, lse, q, k, v, bs, t, tkv, nh, nkv, hs, scale);
            var (edq, edk, edv) = AttentionReference.Backward(dod, rq, rk, rv, bs, t, tkv, nh, nkv, hs, scale);
            Close(edq, dq, "dq " + what, tol);
            Close(edk, dk, "dk " + what, tol);
            Close(edv, dv, "dv " + what, tol);
        }
    }

    [Fact]
    public void Cpu_refuses_an_integer_input_naming_it()
    {
        var b = Backend("cpu");
        using var q = b.Allocate(DType.BF16, 1, 2, 1, 4);
        using var k = b.Allocate(DType.I32, 1, 2, 1, 4);
        using var v = b.Allocate(DType.BF16, 1, 2, 1, 4);
        using var o = b.Allocate(DType.F32, 1, 2, 1, 4);
        var e = Assert.Throws<ArgumentException>(() => b.AttentionForward(o, null, q, k, v, 1, 2, 2, 2, 1, 1, 4, 0.5f));
        Assert.Contains("k", e.Message);
        Assert.Contains("f32, bf16 or f16", e.Message);
    }
}
