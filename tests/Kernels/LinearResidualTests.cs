using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// The linears whose output feeds a residual add (o_proj, down_proj): MatMulResidual and LoraLinearForwardResidual
/// (fused into the matmul epilogue on ILGPU, the linear then Add elsewhere) against the unfused pair on the same
/// backend and against the double reference; the output's previous contents (NaN) must never be read and the
/// residual must be left as it was.
/// </summary>
public class LinearResidualTests
{
    // ragged against the SIMT kernel's 64×64 tile: one and two row tiles, one and two column tiles
    private static readonly (int M, int N, int K)[] Shapes = { (1, 1, 1), (7, 33, 17), (20, 70, 13), (65, 5, 40) };

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void MatMulResidual_EqualsMatMulThenAdd(string backend)
    {
        var b = Backend(backend);
        int seed = 1;
        foreach (var (m, n, k) in Shapes)
        foreach (bool bf16 in new[] { false, true })
        foreach (bool withBias in new[] { false, true })
        {
            string what = $"M={m} N={n} K={k} bf16={bf16} bias={withBias}";
            var xd = Rand((long)m * k, seed++); var wd = Rand((long)n * k, seed++); var bd = Rand(n, seed++); var rd = Rand((long)m * n, seed++);
            if (bf16) wd = RoundBf16(wd);
            using var x = Up(b, xd, m, k); using var bias = Up(b, bd, n); using var res = Up(b, rd, m, n);
            using var w = bf16 ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
            using var fused = Up(b, Enumerable.Repeat(float.NaN, m * n).ToArray(), m, n);
            using var unfused = b.Allocate(DType.F32, m, n);
            b.MatMulResidual(fused, res, x, w, withBias ? bias : null, m, n, k);
            b.MatMul(unfused, x, w, withBias ? bias : null, m, n, k, accumulate: false);
            b.Add(unfused, res, unfused);
            // the same f32 operations in the same order: bit-identical. Also on CUDA, where ptxas contracts the epilogue's
            // Alpha·acc + bias (or + residual) into one FFMA: Alpha = 1 here, so the product is exact and the FFMA rounds once,
            // as the separate add does; both launches take the same kernel (same split-K policy, same accumulation order).
            Assert.True(Down(unfused).SequenceEqual(Down(fused)), $"fused != matmul + add: {what}");
            Close(Plus(MatMulReference.Forward(bf16 ? MatMulForwardInput(b, DType.BF16, xd, m) : xd, wd, withBias ? bd : null, m, n, k), rd), fused, what);
            Assert.True(rd.SequenceEqual(Down(res)), $"residual changed: {what}");
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void LoraLinearForwardResidual_EqualsLoraThenAdd(string backend)
    {
        var b = Backend(backend);
        const float scale = 0.75f;
        const ulong dropSeed = 42;
        int seed = 100;
        foreach (var (m, n, k) in Shapes)
        foreach (float p in new[] { 0f, 0.25f })
        {
            const int r = 3;
            string what = $"M={m} N={n} K={k} p={p}";
            var xd = Rand((long)m * k, seed++); var wd = Rand((long)n * k, seed++); var bd = Rand(n, seed++); var rd = Rand((long)m * n, seed++);
            var ad = Rand((long)r * k, seed++); var bbd = Rand((long)n * r, seed++);
            using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var bias = Up(b, bd, n); using var res = Up(b, rd, m, n);
            using var a = Up(b, ad, r, k); using var bb = Up(b, bbd, n, r);
            using var u = b.Allocate(DType.F32, m, r); using var u2 = b.Allocate(DType.F32, m, r);
            using var xDrop = b.Allocate(DType.F32, m, k); using var xDrop2 = b.Allocate(DType.F32, m, k);
            using var fused = Up(b, Enumerable.Repeat(float.NaN, m * n).ToArray(), m, n);
            using var unfused = b.Allocate(DType.F32, m, n);
            var lora = new LoraParams(a, bb, scale, p, dropSeed);
            b.LoraLinearForwardResidual(fused, res, x, w, bias, lora, u, p > 0 ? xDrop : null, m, n, k, r);
            b.LoraLinearForward(unfused, x, w, bias, lora, u2, p > 0 ? xDrop2 : null, m, n, k, r);
            b.Add(unfused, res, unfused);
            // SIMT ILGPU adds the residual with the base product, before the rank-r term: equal within f32 rounding
            Close(Down(unfused), fused, "fused vs lora + add " + what);
            Assert.True(Down(u2).SequenceEqual(Down(u)), $"u differs: {what}"); // the same launch on the same inputs (any device)
            if (p > 0) Assert.True(Down(xDrop2).SequenceEqual(Down(xDrop)), $"xDrop differs: {what}");
            var (ey, _, _) = LoraLinearReference.Forward(xd, wd, bd, ad, bbd, scale, p, dropSeed, m, n, k, r);
            Close(Plus(ey, rd), fused, what);
            Assert.True(rd.SequenceEqual(Down(res)), $"residual changed: {what}");
        }
    }
}
