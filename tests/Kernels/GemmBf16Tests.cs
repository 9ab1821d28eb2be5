using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using FineTuneNative.Tests.Peft;
using Xunit;
using Xunit.Abstractions;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// bf16 compute on the CPU (GemmBf16 + the AVX512_BF16 machine code of GemmBf16Asm): against the double reference on
/// bf16-rounded inputs, every edge of the tiling, the f32 fallback, and a LoRA training run.
/// </summary>
[Collection(ForceFallbackCollection.Name)]
public sealed unsafe class GemmBf16Tests(ITestOutputHelper output)
{
    private const string NoKernel = "no AVX512_BF16 kernel on this machine (bf16 compute runs the f32 GEMM; see Fallback_* tests)";

    // (M, N, K): the smallest product taken (5×17×32), one exact 12×32 tile, ragged row/column tiles and odd K, two and
    // three depth slices (KCMax 576) with an odd tail, more rows than a row block (2040) and more columns than a
    // column block (4096).
    public static readonly (int M, int N, int K)[] Shapes =
    {
        (5, 17, 32), (12, 32, 64), (13, 33, 33), (37, 100, 95), (100, 70, 577), (24, 64, 1155), (2050, 40, 40), (13, 4100, 34),
    };

    /// <summary>The products are bf16·bf16 = exact in f32, so only f32 accumulation error remains: grows with the depth.</summary>
    private static (double Atol, double Rtol) Tol(int k) => (2e-6 * Math.Sqrt(k), 1e-5);

    private static CpuBackend Bf16Backend(int threads = 2) => new(threads) { MatMulCompute = DType.BF16 };

    [SkippableFact]
    public void Forward_MatchesReferenceOnBf16RoundedInputs_F32AndBf16Weights()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel + ": " + CpuBackend.Bf16ComputeUnavailableReason);
        using var b = Bf16Backend();
        int seed = 1;
        double maxErr = 0;
        foreach (var (m, n, k) in Shapes)
            foreach (bool bf16W in new[] { false, true })
                foreach (bool withBias in new[] { false, true })
                {
                    bool acc = withBias; // bias and accumulate together: the edge store path and the kernel's beta path
                    var xd = Rand((long)m * k, seed++); var wd = Rand((long)n * k, seed++); var bd = Rand(n, seed++); var y0 = Rand((long)m * n, seed++);
                    if (bf16W) wd = RoundBf16(wd);
                    using var x = Up(b, xd, m, k);
                    using var w = bf16W ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
                    using var bias = Up(b, bd, n);
                    using var y = Up(b, y0, m, n);
                    b.MatMul(y, x, w, withBias ? bias : null, m, n, k, acc);
                    var expected = MatMulReference.Forward(RoundBf16(xd), RoundBf16(wd), withBias ? bd : null, m, n, k);
                    if (acc) for (int i = 0; i < expected.Length; i++) expected[i] += y0[i];
                    var (atol, rtol) = Tol(k);
                    var got = Down(b, y);
                    maxErr = Math.Max(maxErr, MaxAbs(expected, got));
                    NumericAssert.Close(expected, got, atol, rtol, $"y M={m} N={n} K={k} bf16W={bf16W} bias/acc={withBias}");
                }
        output.WriteLine($"max |error| vs the bf16-rounded double reference: {maxErr:E2}");
    }

    [SkippableFact]
    public void BackwardInput_MatchesReferenceOnBf16RoundedInputs_OverwritesOrAccumulates()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel);
        using var b = Bf16Backend();
        int seed = 500;
        // dx(M,K) = dy(M,N)·W(N,K): the GEMM's depth is N, its columns K
        foreach (var (m, n, k) in Shapes)
            foreach (bool bf16W in new[] { false, true })
                foreach (bool acc in new[] { false, true })
                {
                    var dyd = Rand((long)m * n, seed++); var wd = Rand((long)n * k, seed++); var dx0 = Rand((long)m * k, seed++);
                    if (bf16W) wd = RoundBf16(wd);
                    using var dy = Up(b, dyd, m, n);
                    using var w = bf16W ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
                    using var dx = Up(b, dx0, m, k);
                    b.MatMulBackwardInput(dx, dy, w, m, n, k, acc);
                    // the GEMM is (M, K columns, depth N): (5, 17, 32) has a depth of 17 and stays f32
                    bool taken = GemmBf16.Applies(m, k, n, aTrans: false);
                    var expected = taken ? MatMulReference.BackwardInput(RoundBf16(dyd), RoundBf16(wd), m, n, k) : MatMulReference.BackwardInput(dyd, wd, m, n, k);
                    if (acc) for (int i = 0; i < expected.Length; i++) expected[i] += dx0[i];
                    var (atol, rtol) = Tol(n);
                    NumericAssert.Close(expected, Down(b, dx), atol, rtol, $"dx M={m} N={n} K={k} bf16W={bf16W} acc={acc}");
                }
    }

    [SkippableFact]
    public void Alpha_And_LiteralCase()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel);
        using var b = Bf16Backend(1);
        // 5×17×32 with x = 1 + 2^-8 (rounds to 1 in bf16: the tie goes to even) and w = 0.5: every y = alpha·32·0.5 + beta·C
        const int m = 5, n = 17, k = 32;
        var x = new float[m * k]; Array.Fill(x, 1f + 1f / 256);
        var w = new float[n * k]; Array.Fill(w, 0.5f);
        var c = new float[m * n]; Array.Fill(c, 3f);
        fixed (float* px = x, pw = w, pc = c)
            Gemm.Run(b, m, n, k, px, k, false, pw, false, k, true, pc, n, 0.25f, true, null);
        Assert.All(c, v => Assert.Equal(0.25f * 16f + 3f, v));
    }

    [SkippableFact]
    public void Bf16Compute_Rounds_The_Operands()
    {
        // guards against the mode silently running f32: the result must differ from the unrounded f32 product by the
        // bf16 rounding of the inputs (~2^-9 relative per operand), and equal the rounded one
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel);
        using var b = Bf16Backend();
        const int m = 37, n = 100, k = 95;
        var xd = Rand((long)m * k, 7); var wd = Rand((long)n * k, 8);
        using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var y = b.Allocate(DType.F32, m, n);
        b.MatMul(y, x, w, null, m, n, k, false);
        var got = Down(b, y);
        double vsF32 = MaxAbs(MatMulReference.Forward(xd, wd, null, m, n, k), got);
        double vsBf16 = MaxAbs(MatMulReference.Forward(RoundBf16(xd), RoundBf16(wd), null, m, n, k), got);
        output.WriteLine($"max |y - f32 product| = {vsF32:E2}, max |y - bf16-rounded product| = {vsBf16:E2}");
        Assert.True(vsF32 > 1e-3, $"bf16 compute equals the f32 product to {vsF32:E2}: the operands were not rounded");
        Assert.True(vsBf16 < 1e-4, $"bf16 compute is {vsBf16:E2} from the bf16-rounded product");
    }

    [SkippableFact]
    public void NaN_In_An_Activation_Row_Stays_In_That_Row()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel);
        using var b = Bf16Backend();
        const int m = 13, n = 33, k = 40;
        var xd = GradCheck.ToFloat(Rand((long)m * k, 9));
        // a NaN whose payload is in the low mantissa bits: naive rounding (+0x7FFF) would carry it into Inf
        xd[3 * k + 5] = BitConverter.Int32BitsToSingle(0x7F800001);
        using var x = Up(b, xd, m, k); using var w = Up(b, Rand((long)n * k, 10), n, k); using var y = b.Allocate(DType.F32, m, n);
        b.MatMul(y, x, w, null, m, n, k, false);
        var got = Down(b, y);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                Assert.True(i == 3 ? float.IsNaN(got[i * n + j]) : float.IsFinite(got[i * n + j]), $"y[{i},{j}] = {got[i * n + j]}");
    }

    [SkippableFact]
    public void LoraLinear_Bf16Compute_Base_Product_In_Bf16_Adapter_In_F32()
    {
        // y = bf16(x)·bf16(W)ᵀ + s·(x·Aᵀ)·Bᵀ: the base product takes the bf16 kernel, the fused rank update is added in
        // f32 to each C tile after the last depth slice; dx = bf16(dy)·bf16(W) + s·(dy·B)·A; dA, dB in f32.
        // Shapes: ragged row and column tiles (37×100), and two depth slices in both products (K, N = 700).
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel);
        using var b = Bf16Backend();
        const int r = 16;
        const float s = 2f;
        foreach (var (m, n, k) in new[] { (37, 100, 95), (50, 700, 700) })
        foreach (bool bf16W in new[] { false, true })
        {
            var xd = Rand((long)m * k, 20); var wd = Rand((long)n * k, 21); var ad = Rand((long)r * k, 22); var bd = Rand((long)n * r, 23);
            var dyd = Rand((long)m * n, 24);
            if (bf16W) wd = RoundBf16(wd);
            using var x = Up(b, xd, m, k); using var w = bf16W ? UpBf16(b, GradCheck.ToFloat(wd), n, k) : Up(b, wd, n, k);
            using var a = Up(b, ad, r, k); using var bb = Up(b, bd, n, r); using var dy = Up(b, dyd, m, n);
            using var y = b.Allocate(DType.F32, m, n); using var u = b.Allocate(DType.F32, m, r); using var g = b.Allocate(DType.F32, m, r);
            using var dx = b.Allocate(DType.F32, m, k); using var dA = Up(b, new float[r * k], r, k); using var dB = Up(b, new float[n * r], n, r);
            var lora = new LoraParams(a, bb, s, 0, 0);
            b.LoraLinearForward(y, x, w, null, lora, u, null, m, n, k, r);
            b.LoraLinearBackward(dx, dy, x, w, lora, u, null, g, dA, dB, null, null, m, n, k, r, accumulate: false);
            var zeroW = new double[n * k];
            var adapterY = LoraLinearReference.Forward(xd, zeroW, null, ad, bd, s, 0, 0, m, n, k, r).Y;
            var yExp = MatMulReference.Forward(RoundBf16(xd), RoundBf16(wd), null, m, n, k);
            for (int i = 0; i < yExp.Length; i++) yExp[i] += adapterY[i];
            var (adapterDx, dAExp, dBExp, _, _) = LoraLinearReference.Backward(dyd, xd, zeroW, ad, bd, s, 0, 0, m, n, k, r);
            var dxExp = MatMulReference.BackwardInput(RoundBf16(dyd), RoundBf16(wd), m, n, k);
            for (int i = 0; i < dxExp.Length; i++) dxExp[i] += adapterDx[i];
            // looser than Tol: the f32 adapter term s·(x·Aᵀ)·Bᵀ carries the accumulation error of u (a depth-K sum) times
            // s·|B| over R terms (measured max 9e-5 at K = 700, values up to ~4)
            double atol = 2e-4, rtol = 1e-4;
            string what = $"M={m} N={n} K={k} bf16W={bf16W}";
            NumericAssert.Close(yExp, Down(b, y), atol, rtol, "y " + what);
            NumericAssert.Close(dxExp, Down(b, dx), atol, rtol, "dx " + what);
            NumericAssert.Close(dAExp, Down(b, dA), atol, rtol, "dA " + what);
            NumericAssert.Close(dBExp, Down(b, dB), atol, rtol, "dB " + what);
        }
    }

    [Fact]
    public void Fallback_And_Untaken_Products_Equal_The_F32_Gemm_Bit_For_Bit()
    {
        // Without the kernel (forced here, as on a CPU without AVX512_BF16) bf16 compute is the f32 GEMM; so are the
        // products the mode does not take (weight gradients, LoRA rank ≤ 16 columns, depth < 32, ≤ 4 rows).
        using var f32 = new CpuBackend(2);
        using var bf = Bf16Backend();
        var cases = new List<(int M, int N, int K, bool Forced)>
        {
            (37, 100, 95, true), (13, 4100, 34, true), // would be taken: run forced onto the fallback
            (37, 16, 95, false), (37, 100, 16, false), (4, 100, 95, false), (37, 100, 31, false),
        };
        int seed = 900;
        foreach (var (m, n, k, forced) in cases)
        {
            var xd = Rand((long)m * k, seed++); var wd = Rand((long)n * k, seed++); var dyd = Rand((long)m * n, seed++);
            float[] Run(CpuBackend be, out float[] dx, out float[] dw)
            {
                using var x = Up(be, xd, m, k); using var w = Up(be, wd, n, k); using var dy = Up(be, dyd, m, n);
                using var y = be.Allocate(DType.F32, m, n); using var tdx = be.Allocate(DType.F32, m, k);
                using var tdw = Up(be, new float[n * k], n, k);
                be.MatMul(y, x, w, null, m, n, k, false);
                be.MatMulBackwardInput(tdx, dy, w, m, n, k, false);
                be.MatMulBackwardWeight(tdw, null, dy, x, m, n, k);
                dx = Down(be, tdx); dw = Down(be, tdw);
                return Down(be, y);
            }
            var yRef = Run(f32, out var dxRef, out var dwRef);
            GemmBf16.ForceFallback = forced;
            try
            {
                var y = Run(bf, out var dx, out var dw);
                Assert.True(forced || !GemmBf16.Applies(m, n, k, false), $"case {m}x{n}x{k} is taken by bf16 compute");
                Assert.Equal(yRef, y);
                if (forced || !GemmBf16.Applies(m, k, n, false)) Assert.Equal(dxRef, dx); // dx = dy·W: GEMM (M, K, depth N)
                Assert.Equal(dwRef, dw); // weight gradients are f32 in bf16 mode too
            }
            finally { GemmBf16.ForceFallback = false; }
        }
    }

    [Fact]
    public void MatMulCompute_Accepts_Only_F32_And_Bf16()
    {
        using var b = new CpuBackend(1);
        Assert.Equal(DType.F32, b.MatMulCompute);
        var e = Assert.Throws<ArgumentException>(() => b.MatMulCompute = DType.F16);
        Assert.Contains("f16", e.Message);
    }

    [SkippableFact]
    public void Encoding_Disassembles_To_The_Documented_Instructions()
    {
        Skip.IfNot(File.Exists(X64Disassembly.Objdump), "binutils objdump not installed");
        var code = GemmBf16Asm.Encode();
        var ins = X64Disassembly.Disassemble(code, "gemmbf16").Select(i => i.Text).ToList();
        Assert.DoesNotContain(ins, i => i.StartsWith("(bad)", StringComparison.Ordinal));
        Assert.Equal(24, ins.Count(i => i.StartsWith("vpxord", StringComparison.Ordinal)));
        // AT&T order: vdpbf16ps src2, src1, dst  (dst += src1·src2 pairwise)
        for (int r = 0; r < 12; r++)
        {
            Assert.Contains($"vpbroadcastd {(r == 0 ? "" : $"0x{4 * r:x}")}(%rsi),%zmm{26 + r % 4}", ins);
            Assert.Contains($"vdpbf16ps %zmm{26 + r % 4},%zmm24,%zmm{2 * r}", ins);
            Assert.Contains($"vdpbf16ps %zmm{26 + r % 4},%zmm25,%zmm{2 * r + 1}", ins);
            Assert.Contains($"vmovups %zmm{2 * r},(%rcx)", ins);
            Assert.Contains($"vmovups %zmm{2 * r + 1},0x40(%rcx)", ins);
        }
        Assert.Contains("vmovups (%rdx),%zmm24", ins);
        Assert.Contains("vmovups 0x40(%rdx),%zmm25", ins);
        Assert.Contains("vaddps 0x40(%rax),%zmm23,%zmm23", ins);
        Assert.Equal("ret", ins[^1]);
        output.WriteLine($"{code.Length} bytes, {ins.Count} instructions");
    }

    [SkippableFact]
    public void Lora_Training_With_Bf16_Compute_Lowers_Loss_Like_F32()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, NoKernel);
        // Wide enough (hidden 64, ffn 96, vocab 48) that every base product and the head take the bf16 kernel.
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = 96, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 16,
            VocabSize = 48, MaxPositions = 64, RmsNormEps = 1e-5f, RopeTheta = 10000f, TieWordEmbeddings = false,
        };
        const int V = 48;
        var all = new List<TokenizedSample>();
        for (int s = 0; s < 40; s++)
        {
            int start = (s * 7) % V, len = 8 + s % 5;
            var ids = Enumerable.Range(0, len + 1).Select(i => (start + i) % V).ToArray();
            var targets = Enumerable.Range(0, len).Select(i => i >= 2 ? ids[i + 1] : TokenizedSample.IgnoreIndex).ToArray();
            all.Add(new TokenizedSample($"count:{s}", ids[..len], targets));
        }
        var (train, eval) = Batching.Split(all, 0.2, seed: 1);
        TrainResult Run(DType compute)
        {
            using var be = new CpuBackend(2) { MatMulCompute = compute };
            using var w = TinyModel.Weights(be, 1, config);
            using var model = new LlamaModel(w, be);
            using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 8, Alpha = 16, Dropout = 0f }, 1);
            using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 4, LearningRate = 2e-2, WarmupSteps = 3, MaxSteps = 30, Seed = 1 });
            return trainer.Train(train, eval, padId: 0);
        }
        var f32 = Run(DType.F32);
        var bf16 = Run(DType.BF16);
        output.WriteLine($"eval loss f32 {f32.EvalLossBefore:F4} -> {f32.EvalLossAfter:F4}; bf16 compute {bf16.EvalLossBefore:F4} -> {bf16.EvalLossAfter:F4}");
        Assert.True(f32.EvalLossAfter < f32.EvalLossBefore - 1.0, $"f32 eval loss {f32.EvalLossBefore} -> {f32.EvalLossAfter}");
        Assert.True(bf16.EvalLossAfter < bf16.EvalLossBefore - 1.0, $"bf16 eval loss {bf16.EvalLossBefore} -> {bf16.EvalLossAfter}");
        Assert.NotEqual(f32.StepLosses, bf16.StepLosses); // the mode was on
        // bf16 rounding moves the start by ~1e-3 and the end by a few percent at most
        Assert.True(Math.Abs(bf16.EvalLossBefore - f32.EvalLossBefore) < 0.01, $"eval loss before: f32 {f32.EvalLossBefore}, bf16 {bf16.EvalLossBefore}");
        Assert.True(Math.Abs(bf16.EvalLossAfter - f32.EvalLossAfter) < 0.1 * f32.EvalLossAfter + 0.05, $"eval loss after: f32 {f32.EvalLossAfter}, bf16 {bf16.EvalLossAfter}");
    }

    private static float[] Down(IBackend b, Tensor t)
    {
        var a = new float[t.Length];
        b.Download(t, a);
        return a;
    }

    private static double MaxAbs(double[] e, float[] a)
    {
        double m = 0;
        for (int i = 0; i < e.Length; i++) m = Math.Max(m, Math.Abs(e[i] - a[i]));
        return m;
    }
}

/// <summary>
/// Classes that run bf16 compute (in-process <c>ftn train --compute bf16</c> too) do not run alongside the fallback test,
/// which sets the process-wide <c>GemmBf16.ForceFallback</c>: test classes run in parallel.
/// </summary>
[CollectionDefinition(Name)]
public sealed class ForceFallbackCollection
{
    public const string Name = "GemmBf16.ForceFallback";
}

/// <summary>bf16 compute keeps a LoRA training step allocation-free (counted on the step's threads, as TrainingStepAllocationTests).</summary>
[Collection(nameof(FineTuneNative.Tests.Peft.TrainingStepAllocationTests))]
public sealed class GemmBf16AllocationTests(ITestOutputHelper output)
{
    [SkippableFact]
    public void Lora_ForwardBackward_Step_With_Bf16_Compute_Allocates_Nothing()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, "no AVX512_BF16 kernel on this machine");
        using var cpu = new CpuBackend(2) { MatMulCompute = DType.BF16 };
        var config = new LlamaConfig
        {
            HiddenSize = 64, IntermediateSize = 96, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 16,
            VocabSize = 48, MaxPositions = 64, RmsNormEps = 1e-5f, RopeTheta = 10000f, TieWordEmbeddings = false,
        };
        using var w = TinyModel.Weights(cpu, 1, config);
        using var model = new LlamaModel(w, cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0f }, 3);
        const int B = 2, T = 12;
        var tokens = new int[B * T];
        var targets = new int[B * T];
        for (int i = 0; i < tokens.Length; i++) { tokens[i] = (i * 7) % 48; targets[i] = (i * 11) % 48; }
        for (int warm = 0; warm < 100; warm++) model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)warm);
        // counted on the step's own threads (StepAllocations); the whole-process figure is only reported
        const int steps = 20;
        var (windows, process) = StepAllocations.Count(cpu, 5, steps, s => model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, (ulong)s));
        output.WriteLine($"bytes allocated per {steps} steps on the step's threads, {windows.Length} windows: {string.Join(", ", windows)}; whole process: {string.Join(", ", process)}");
        Assert.Equal(0, windows.Sum());
    }
}
