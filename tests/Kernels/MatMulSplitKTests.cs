using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// Split-K of the tiled matmul (few output tiles, long reduction: the LoRA gradients dA, dB and small dW over all
/// tokens): the policy, and the weight-gradient and LoRA backward at a reduction long enough to be split, against the
/// double reference with pre-filled (+=) outputs, on every backend. On ILGPU the test checks the split ran.
/// </summary>
public class MatMulSplitKTests
{
    [Theory]
    [InlineData(9, 16384, 30)]   // SmolLM2 dB (576 × 16) at 8×2048 tokens: 9 tiles -> 270 groups
    [InlineData(81, 16384, 4)]   // a 576 × 576 dW
    [InlineData(300, 16384, 1)]  // enough tiles already
    [InlineData(9, 2047, 1)]     // short reduction
    [InlineData(1, 2100, 4)]     // slices of at least 512
    [InlineData(1, 1 << 20, 64)] // capped
    public void Policy(long tiles, int r, int expected) => Assert.Equal(expected, MatMulKernels.SplitsFor(tiles, r));

    private static void SplitRan(IBackend b)
    {
        if (b is IlgpuBackend) Assert.True(MatMulKernels.LastSplitsOnThisThread > 1, "the reduction was not split");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void BackwardWeight_SplitAlongTokens_MatchesReference(string backend)
    {
        var b = Backend(backend);
        const int m = 2100, n = 5, k = 7; // one 64×64 tile, r = m = 2100: 4 slices (the last one ragged)
        var dyd = Rand((long)m * n, 1); var xd = Rand((long)m * k, 2); var dw0 = Rand((long)n * k, 3); var db0 = Rand(n, 4);
        using var dy = Up(b, dyd, m, n); using var x = Up(b, xd, m, k); using var dw = Up(b, dw0, n, k); using var db = Up(b, db0, n);
        b.MatMulBackwardWeight(dw, db, dy, x, m, n, k);
        SplitRan(b);
        Close(Plus(dw0, MatMulReference.BackwardWeight(dyd, xd, m, n, k)), dw, "dW");
        Close(Plus(db0, MatMulReference.BackwardBias(dyd, m, n)), db, "dBias");
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void LoraBackward_SplitAlongTokens_MatchesReference(string backend)
    {
        var b = Backend(backend);
        const int m = 2100, n = 6, k = 5, r = 2;
        const float scale = 0.5f, p = 0.2f;
        const ulong seed = 7;
        var xd = Rand((long)m * k, 11); var wd = Rand((long)n * k, 12); var ad = Rand((long)r * k, 13); var bbd = Rand((long)n * r, 14);
        var dyd = Rand((long)m * n, 15); var dA0 = Rand((long)r * k, 16); var dB0 = Rand((long)n * r, 17);
        using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r);
        using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r); using var xDrop = b.Allocate(DType.F32, m, k);
        using var dy = Up(b, dyd, m, n); using var g = b.Allocate(DType.F32, m, r); using var dx = b.Allocate(DType.F32, m, k);
        using var dA = Up(b, dA0, r, k); using var dB = Up(b, dB0, n, r);
        var lora = new LoraParams(a, bb, scale, p, seed);
        b.LoraLinearForward(y, x, w, null, lora, u, xDrop, m, n, k, r);
        b.LoraLinearBackward(dx, dy, x, w, lora, u, xDrop, g, dA, dB, null, null, m, n, k, r, accumulate: false);
        var e = LoraLinearReference.Backward(dyd, xd, wd, ad, bbd, scale, p, seed, m, n, k, r);
        Close(Plus(e.DA, dA0), dA, "dA");
        Close(Plus(e.DB, dB0), dB, "dB");
        Close(e.DX, dx, "dx");
    }
}
