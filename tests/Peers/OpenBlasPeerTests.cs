using FineTuneNative.Bench.Peers;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Peers;

/// <summary>
/// The GEMM peer harness (bench/peers) compares ftn against OpenBLAS on the same buffers; these tests prove the
/// two compute the same product in each layout the harness times, so the ratios it prints compare equal work.
/// Skipped, with the reason, where Debian's libopenblas is not installed.
/// </summary>
public unsafe class OpenBlasPeerTests
{
    // Shapes that cross the GEMM's blocks (K over 128, N over one 256 column block, M over a 96-row block) with ragged edges.
    public static readonly TheoryData<int, int, int> Shapes = new() { { 197, 83, 131 }, { 300, 520, 260 }, { 5, 300, 77 } };

    private static OpenBlas Blas()
    {
        var blas = OpenBlas.TryLoad(out string why);
        Skip.If(blas is null, why);
        blas!.SetThreads(2);
        return blas;
    }

    [SkippableTheory]
    [MemberData(nameof(Shapes))]
    public void Sgemm_EqualsFtn_InTheThreeTrainingLayouts(int m, int n, int k)
    {
        var blas = Blas();
        using var be = new CpuBackend(2);
        for (int layout = 0; layout < 3; layout++)
        {
            var ad = GradCheck.ToFloat(GradCheck.Random(m * k, 10 + layout));
            var bd = GradCheck.ToFloat(GradCheck.Random(n * k, 20 + layout));
            var c0 = GradCheck.ToFloat(GradCheck.Random(m * n, 30 + layout));
            using var a = be.Allocate(DType.F32, layout == 2 ? new[] { k, m } : new[] { m, k });
            using var b = be.Allocate(DType.F32, layout == 0 ? new[] { n, k } : new[] { k, n });
            using var cf = be.Allocate(DType.F32, m, n);
            var cp = (float[])c0.Clone();
            be.Upload(a, ad); be.Upload(b, bd); be.Upload(cf, c0);
            fixed (float* pa = ad, pb = bd, pc = cp)
            {
                switch (layout)
                {
                    case 0: be.MatMul(cf, a, b, null, m, n, k, false); blas.Sgemm(false, true, m, n, k, 1f, pa, k, pb, k, 0f, pc, n); break;
                    case 1: be.MatMulBackwardInput(cf, a, b, m, k, n, false); blas.Sgemm(false, false, m, n, k, 1f, pa, k, pb, n, 0f, pc, n); break;
                    default: be.MatMulBackwardWeight(cf, null, a, b, k, m, n); blas.Sgemm(true, false, m, n, k, 1f, pa, m, pb, n, 1f, pc, n); break;
                }
            }
            var got = new float[m * n];
            be.Download(cf, got);
            // Two f32 sums of K products in different orders: each is within ~K·eps·Σ|a·b| of the exact value.
            NumericAssert.Close(cp, got, 1e-4, 1e-4, $"layout {layout} M={m} N={n} K={k}");
            // and the peer really computed something (C was pre-filled with other numbers)
            Assert.NotEqual(c0[0], cp[0]);
        }
    }
}
