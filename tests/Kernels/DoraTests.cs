using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// DoRA's linear (PEFT's variant: the row norm ‖W + s·B·A‖ is a constant in the backward): the double reference's
/// backward against central finite differences, then the backend ops composed by DoraLinear against the reference,
/// on every backend, with f32 and NF4 base weights.
/// </summary>
public class DoraTests
{
    private const float Scale = 1.75f;

    public static readonly (int M, int N, int K, int R)[] Cases = { (1, 3, 5, 1), (4, 7, 9, 2), (13, 19, 33, 4) };

    [Fact]
    public void Reference_backward_matches_finite_differences_with_the_norm_held_constant()
    {
        int seed = 1;
        foreach (var (m, n, k, r) in Cases)
        {
            string what = $"M={m} N={n} K={k} R={r}";
            var x = Rand(m * k, seed++); var w = Rand(n * k, seed++); var a = Rand(r * k, seed++); var b = Rand(n * r, seed++);
            var mag = Rand(n, seed++, 2); var dy = Rand(m * n, seed++);
            var norm = DoraReference.WeightNorm(w, a, b, Scale, n, k, r);
            var e = DoraReference.Backward(dy, x, w, a, b, mag, Scale, m, n, k, r);
            GradMatches(p => DoraReference.ForwardWithNorm(p, w, null, a, b, mag, norm, Scale, m, n, k, r).Y, x, dy, e.DX, "dx " + what);
            GradMatches(p => DoraReference.ForwardWithNorm(x, w, null, p, b, mag, norm, Scale, m, n, k, r).Y, a, dy, e.DA, "dA " + what);
            GradMatches(p => DoraReference.ForwardWithNorm(x, w, null, a, p, mag, norm, Scale, m, n, k, r).Y, b, dy, e.DB, "dB " + what);
            GradMatches(p => DoraReference.ForwardWithNorm(x, w, null, a, b, p, norm, Scale, m, n, k, r).Y, mag, dy, e.DMag, "dMagnitude " + what);
        }
    }

    [Fact]
    public void A_fresh_adapter_with_the_magnitude_at_the_weight_norm_is_the_base_linear()
    {
        const int m = 3, n = 4, k = 6, r = 2;
        var x = Rand(m * k, 1); var w = Rand(n * k, 2); var a = Rand(r * k, 3); var b = new double[n * r]; var bias = Rand(n, 4);
        var mag = DoraReference.WeightNorm(w, a, b, Scale, n, k, r);
        var y = DoraReference.Forward(x, w, bias, a, b, mag, Scale, m, n, k, r).Y;
        NumericAssert.Close(MatMulReference.Forward(x, w, bias, m, n, k), y, 1e-12, 1e-12, "y == x·Wᵀ + bias");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void DoraLinear_matches_the_reference_and_accumulates_parameter_grads(string backend)
    {
        var be = Backend(backend);
        int seed = 100;
        // the simulator runs the two smaller cases (the largest one costs ~30 s there and adds no new edge)
        foreach (var (m, n, k, r) in TestBackends.IsSimulator(backend) ? Cases[..2] : Cases)
            foreach (bool nf4 in new[] { false, true })
            {
                string what = $"M={m} N={n} K={k} R={r} nf4={nf4}";
                var xd = Rand(m * k, seed++); var wd = Rand(n * k, seed++); var bd = Rand(n, seed++);
                var ad = Rand(r * k, seed++); var bbd = Rand(n * r, seed++); var magd = Rand(n, seed++, 2); var dyd = Rand(m * n, seed++);
                Tensor w;
                if (nf4)
                {
                    var bytes = Nf4.Quantize(GradCheck.ToFloat(wd));
                    wd = Nf4Reference.Dequantize(bytes, (long)n * k);
                    w = be.Allocate(DType.NF4, n, k);
                    be.UploadRaw(w, bytes);
                }
                else w = Up(be, wd, n, k);
                using var _w = w;
                using var x = Up(be, xd, m, k); using var bias = Up(be, bd, n); using var dy = Up(be, dyd, m, n);
                // parameter gradients pre-filled: the backward must add to them
                var da0 = Rand(r * k, seed++); var db0 = Rand(n * r, seed++); var dm0 = Rand(n, seed++); var dx0 = Rand(m * k, seed++);
                var slot = new LoraSlot(Up(be, ad, r, k), Up(be, bbd, n, r), Up(be, da0, r, k), Up(be, db0, n, r), Scale, 0f)
                {
                    Magnitude = Up(be, magd, n), DMagnitude = Up(be, dm0, n), WeightNorm = be.Allocate(DType.F32, n),
                };
                using var y = Up(be, Rand(m * n, seed++, 7), m, n);
                using var u = be.Allocate(DType.F32, m, r); using var z = be.Allocate(DType.F32, m, n); using var g = be.Allocate(DType.F32, m, r);
                using var dx = Up(be, dx0, m, k);
                try
                {
                    DoraLinear.Forward(be, y, x, w, bias, slot, u, z, m, n, k);
                    var (ey, ez, enorm) = DoraReference.Forward(xd, wd, bd, ad, bbd, magd, Scale, m, n, k, r);
                    // NF4 on tensor cores: the base product x·Wᵀ takes bf16-rounded x and W (dz·W: dz and W), the rank-r
                    // term and the norm stay f32; the reference gets the difference of the base products (zero elsewhere)
                    bool tc = nf4 && TestBackends.RoundsOperands(be);
                    var rw = tc ? Nf4Operand(be, wd, "w " + what) : wd;
                    var dzBase = tc ? Minus(MatMulReference.Forward(RoundBf16(xd), rw, null, m, n, k), MatMulReference.Forward(xd, wd, null, m, n, k)) : new double[m * n];
                    var dyBase = new double[m * n];
                    for (int i = 0; i < m * n; i++) dyBase[i] = dzBase[i] * magd[i % n] / enorm[i % n];
                    Close(enorm, slot.WeightNorm, "norm " + what);
                    Close(Plus(ez, dzBase), z, "z " + what);
                    Close(Plus(ey, dyBase), y, "y " + what);

                    DoraLinear.Backward(be, dx, dy, x, w, slot, u, z, g, m, n, k, accumulate: true);
                    var e = DoraReference.Backward(dyd, xd, wd, ad, bbd, magd, Scale, m, n, k, r);
                    var dxBase = new double[m * k];
                    var dMagBase = new double[n];
                    if (tc)
                    {
                        var dz = new double[m * n]; // dy ⊙ magnitude/norm, the input gradient of z, rounded to bf16 by the mma
                        for (int i = 0; i < m * n; i++) dz[i] = dyd[i] * magd[i % n] / enorm[i % n];
                        AssertNoBf16Tie(dz, "dz " + what);
                        dxBase = Minus(MatMulReference.BackwardInput(RoundBf16(dz), rw, m, n, k), MatMulReference.BackwardInput(dz, wd, m, n, k));
                        for (int i = 0; i < m * n; i++) dMagBase[i % n] += dyd[i] * dzBase[i] / enorm[i % n]; // dMag = Σ dy·z/norm
                    }
                    Close(Plus(dx0, Plus(e.DX, dxBase)), dx, "dx += " + what);
                    Close(Plus(da0, e.DA), slot.DA, "dA += " + what);
                    Close(Plus(db0, e.DB), slot.DB, "dB += " + what);
                    Close(Plus(dm0, Plus(e.DMag, dMagBase)), slot.DMagnitude, "dMagnitude += " + what);
                }
                finally
                {
                    foreach (var t in new[] { slot.A, slot.B, slot.DA, slot.DB, slot.Magnitude, slot.DMagnitude, slot.WeightNorm }) t.Dispose();
                }
            }
    }
}
