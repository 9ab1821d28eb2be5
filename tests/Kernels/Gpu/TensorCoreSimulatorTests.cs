using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The tensor-core matmul kernel in ILGPU's simulator, where inline PTX is unavailable and its scalar path
/// computes, lane by lane, the fragment elements the mma would: the global→register→shared pipeline (both
/// buffers, ragged tiles, k-contiguous and row-contiguous operands), the bf16/f16 rounding and the fused epilogue
/// (bias, LoRA term with and without dropout, accumulate) against plain double loops over the rounded operands.
/// The inline-PTX path itself is proven by MmaFragmentEmulationTests and PtxasTests (HMMA in the SASS).
/// </summary>
public class TensorCoreSimulatorTests
{
    // Its own simulator: the kernel set is launched directly, outside the shared backends' locks.
    private static readonly Lazy<IlgpuBackend> Sim = new(() => IlgpuBackend.CreateSimulator(32));

    private static float[] Rand(int n, int seed) => GradCheck.ToFloat(GradCheck.Random(n, seed, 1.0));

    private static float Round(float v, bool f16) => f16 ? HalfBits.F16ToF32(HalfBits.F32ToF16(v)) : HalfBits.Bf16ToF32(HalfBits.F32ToBf16(v));

    private static Tensor Up(IlgpuBackend b, DType dtype, float[] data)
    {
        var t = b.Allocate(dtype, data.Length);
        b.Upload(t, data);
        return t;
    }

    public enum Layout { Nt, Nn, Tn }

    [Theory]
    [InlineData(Layout.Nt, false, 20, 12, 40, true)]   // forward x·Wᵀ, bf16 weight, bias + LoRA + residual in the epilogue
    [InlineData(Layout.Nn, true, 20, 12, 40, true)]    // dx = dy·W, f16, LoRA term with dropout
    [InlineData(Layout.Tn, false, 20, 12, 40, false)]  // dW = dyᵀ·x
    [InlineData(Layout.Nt, false, 130, 5, 7, false)]   // two row tiles, ragged everything, one partial k step (scalar loads)
    [InlineData(Layout.Nt, true, 9, 20, 36, false)]    // f16 with vector loads and a k tail of 4
    [InlineData(Layout.Nn, false, 37, 136, 45, true)]  // dx = dy·W, bf16 W k-major (vector loads, cp.async on CUDA): two column tiles, ragged k and columns
    [InlineData(Layout.Nn, false, 5, 10, 19, false)]   // dx, k-major B with scalar loads (10 columns: no 8-byte runs)
    public void MatchesRoundedReference(Layout layout, bool f16, int m, int n, int r, bool epilogue)
    {
        var b = Sim.Value;
        var tc = b.Kernels(x => new MatMulTensorCoreKernels(x));
        var args = layout switch
        {
            Layout.Nt => MatMulTensorCoreKernels.From(MatMulKernels.Nt(m, n, r, 1f, epilogue)),
            Layout.Nn => MatMulTensorCoreKernels.From(MatMulKernels.Nn(m, n, r, 1f, epilogue)),
            _ => MatMulTensorCoreKernels.From(MatMulKernels.Tn(m, n, r, 0.5f, false)),
        };
        const int rank = 3;
        var wType = f16 ? DType.F16 : DType.BF16;
        float[] a = Rand(m * r, 1), w = Rand(n * r, 2), prior = Rand(m * n, 3), bias = Rand(n, 4), u = Rand(m * rank, 5), lb = Rand(n * rank, 6);
        // the weight operand is stored in the 16-bit type (as a model's bf16 weight); for Tn both are f32 activations
        var bType = layout == Layout.Tn ? DType.F32 : wType;
        if (bType != DType.F32) for (int i = 0; i < w.Length; i++) w[i] = Round(w[i], f16);
        if (epilogue)
        {
            args.HasBias = layout == Layout.Nt ? 1 : 0;
            args.LoraRank = rank;
            args.LoraScale = 0.75f;
            if (layout == Layout.Nt) { args.Slj = rank; args.Slq = 1; }
            else { args.Slj = 1; args.Slq = n; }
            if (layout == Layout.Nn)
            {
                args.Dropout = 1;
                args.DropP = 0.3f;
                args.DropScale = 1f / 0.7f;
                args.Seed = 99;
            }
        }
        using var ta = Up(b, DType.F32, a);
        using var tw = Up(b, bType, w);
        using var to = Up(b, DType.F32, prior);
        using var tbias = Up(b, DType.F32, bias);
        using var tu = Up(b, DType.F32, u);
        using var tlb = Up(b, DType.F32, lb);
        args = MatMulTensorCoreKernels.Vectorized(args, ta, tw, f16);
        // the vector paths are exercised where the layout allows them: along k for A of Nt/Nn, along rows for A of Tn and B of Nn/Tn
        Assert.Equal((layout == Layout.Tn ? m : r) % 4 == 0 ? 1 : 0, args.VecA);
        Assert.Equal((layout == Layout.Nt ? r : n) % 4 == 0 ? 1 : 0, args.VecB);
        // cp.async (ignored by the simulator) for the 16-bit weight in both layouts that read it
        Assert.Equal(layout != Layout.Tn && (layout == Layout.Nt ? r : n) % 8 == 0 ? 1 : 0, args.AsyncB);
        tc.Launch(f16, b.Floats(ta, "a"), b.Floats(tw, "w"), b.F32(to, "out"), b.Floats(tbias, "bias"),
            epilogue ? b.F32(tu, "u") : ArrayView<float>.Empty, b.Floats(tlb, "lb"), args);
        var got = new float[m * n];
        b.Download(to, got);

        var expected = new double[m * n];
        for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
        {
            double s = 0;
            for (int q = 0; q < r; q++)
            {
                float av = a[i * args.Sai + q * args.Sar], bv = w[j * args.Sbj + q * args.Sbr];
                s += (double)Round(av, f16) * Round(bv, f16);
            }
            double v = args.Alpha * s;
            long idx = (long)i * n + j;
            if (args.HasBias != 0) v += bias[j];
            if (args.LoraRank > 0)
            {
                double low = 0;
                for (int q = 0; q < rank; q++) low += (double)u[i * rank + q] * lb[j * args.Slj + q * args.Slq];
                if (args.Dropout != 0) low = DropoutHash.Keep(args.Seed, idx, args.DropP) ? low * args.DropScale : 0;
                v += args.LoraScale * low;
            }
            if (args.Accumulate != 0) v += prior[idx];
            expected[idx] = v;
        }
        // f32 accumulation of exactly representable products: f32 tolerance
        NumericAssert.Close(expected, got, Tolerance.F32.Atol, Tolerance.F32.Rtol, $"{layout} f16={f16} {m}x{n}x{r}");
    }

    /// <summary>
    /// The bf16-compute weight gradient routed through the backend (MatMulBackwardWeightBf16, tensor-core kernel forced
    /// on a simulator of its own): dW(N, K) += dyᵀ·x over bf16-rounded dy and x with f32 accumulation onto a non-zero
    /// dW, dBias the exact f32 column sum of the unrounded dy; ragged M, N, K (not tile multiples), with the row-run
    /// vector loads (N, K % 4 == 0) and without. With the flag off the same call is the exact f32 product.
    /// </summary>
    [Theory]
    [InlineData(37, 20, 44, true)]   // vector loads of dy and x along their rows, two k steps with a tail of 5
    [InlineData(70, 13, 9, true)]    // scalar loads, three k steps (r = m = 70)
    [InlineData(37, 20, 44, false)]  // flag off: f32 SIMT, exact
    public void WeightGradientBf16MatchesRoundedReference(int m, int n, int k, bool tensorCores)
    {
        var b = IlgpuBackend.CreateSimulator(32);
        try
        {
            b.Kernels(x => new MatMulKernels(x)).WeightGradTensorCores = tensorCores;
            float[] dy = Rand(m * n, 11), x = Rand(m * k, 12), dw0 = Rand(n * k, 13), db0 = Rand(n, 14);
            using var tdy = Up(b, DType.F32, dy);
            using var tx = Up(b, DType.F32, x);
            using var tdw = Up(b, DType.F32, dw0);
            using var tdb = Up(b, DType.F32, db0);
            var args = MatMulKernels.WeightGradArgs(tdy, tx, m, n, k);
            Assert.Equal((1L, (long)n, 1L, (long)k, 1), (args.Sai, args.Sar, args.Sbj, args.Sbr, args.Accumulate));
            Assert.Equal(n % 4 == 0 ? 1 : 0, args.VecA);
            Assert.Equal(k % 4 == 0 ? 1 : 0, args.VecB);
            Assert.Equal((0, 0), (args.AsyncA, args.AsyncB)); // f32 activations are converted, never copied raw
            b.MatMulBackwardWeightBf16(tdw, tdb, tdy, tx, m, n, k);
            var got = new float[n * k];
            var gotB = new float[n];
            b.Download(tdw, got);
            b.Download(tdb, gotB);
            var expected = new double[n * k];
            var expectedB = new double[n];
            for (int j = 0; j < n; j++)
            {
                for (int c = 0; c < k; c++)
                {
                    double s = dw0[j * k + c];
                    for (int r = 0; r < m; r++)
                    {
                        float a = dy[r * n + j], v = x[r * k + c];
                        s += tensorCores ? (double)Round(a, false) * Round(v, false) : (double)a * v;
                    }
                    expected[j * k + c] = s;
                }
                double sb = db0[j];
                for (int r = 0; r < m; r++) sb += dy[r * n + j];
                expectedB[j] = sb;
            }
            NumericAssert.Close(expected, got, Tolerance.F32.Atol, Tolerance.F32.Rtol, $"dW {m}x{n}x{k} tc={tensorCores}");
            NumericAssert.Close(expectedB, gotB, Tolerance.F32.Atol, Tolerance.F32.Rtol, $"dBias {m}x{n} tc={tensorCores}");
            if (tensorCores)
            {
                // the rounding is real: the exact f32 product is further off than the f32 tolerance somewhere
                double worst = 0;
                for (int j = 0; j < n; j++)
                for (int c = 0; c < k; c++)
                {
                    double s = dw0[j * k + c];
                    for (int r = 0; r < m; r++) s += (double)dy[r * n + j] * x[r * k + c];
                    worst = Math.Max(worst, Math.Abs(s - got[j * k + c]));
                }
                Assert.True(worst > 1e-3, $"bf16 route indistinguishable from f32 (max diff {worst})");
            }
        }
        finally { b.Dispose(); }
    }

    /// <summary>
    /// GGUF Q8_0/Q4_0 weights through the backend's MatMul and MatMulBackwardInput on the simulator: the blocks are
    /// dequantized inside the tensor-core kernel's tile loads (q·d, then rounded to bf16 like the activations).
    /// Reference: QuantBlocks.Dequantize (the CPU's) then the same rounding, double accumulation.
    /// </summary>
    [Theory]
    [InlineData(DType.Q8_0, false)]
    [InlineData(DType.Q4_0, false)]
    [InlineData(DType.Q4_0, true)]
    public void QuantizedWeightsAreDequantizedInTheTileLoads(DType type, bool backwardInput)
    {
        var b = (IlgpuBackend)TestBackends.Get("ilgpu-sim:32");
        const int m = MatMulGemvKernels.MaxRows + 1, n = 6, k = 64; // two blocks per weight row; Nn walks the blocks across rows; fewer rows forward take the GEMV
        float[] wf = Rand(n * k, 7);
        var raw = new byte[type.StorageBytes(n * k)];
        QuantBlocks.Quantize(type, wf, raw);
        var deq = new float[n * k];
        QuantBlocks.Dequantize(type, raw, deq);
        using var w = b.Allocate(type, n, k);
        b.UploadRaw(w, raw);
        int rows = m, inner = backwardInput ? n : k, outer = backwardInput ? k : n;
        float[] x = Rand(rows * inner, 8), prior = Rand(rows * outer, 9);
        using var tx = Up(b, DType.F32, x);
        using var ty = Up(b, DType.F32, prior);
        if (backwardInput) b.MatMulBackwardInput(ty, tx, w, m, n, k, accumulate: true);
        else b.MatMul(ty, tx, w, null, m, n, k, accumulate: true);
        var got = new float[rows * outer];
        b.Download(ty, got);
        var expected = new double[rows * outer];
        for (int i = 0; i < rows; i++)
        for (int j = 0; j < outer; j++)
        {
            double s = prior[i * outer + j];
            for (int q = 0; q < inner; q++)
            {
                float wv = backwardInput ? deq[q * k + j] : deq[j * k + q];
                s += (double)Round(x[i * inner + q], false) * Round(wv, false);
            }
            expected[i * outer + j] = s;
        }
        NumericAssert.Close(expected, got, Tolerance.F32.Atol, Tolerance.F32.Rtol, $"{type} backwardInput={backwardInput}");
    }

    /// <summary>
    /// NF4 dequantized inside the tensor-core kernel's tile loads (the CUDA path of Nf4Kernels, whose simulator path
    /// stays the f32 panel): forward and input-gradient layouts over a weight of 1.5 groups of blocks (the group
    /// absmax index and the element count that locates the statistics are exercised), against Nf4Reference.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Nf4IsDequantizedInTheTileLoads(bool backwardInput)
    {
        var b = Sim.Value;
        var tc = b.Kernels(x => new MatMulTensorCoreKernels(x));
        var nf4 = b.Kernels(x => new Nf4Kernels(x));
        const int m = 3, n = 96, k = 256; // 384 blocks of 64: 1.5 groups of 256 blocks
        var rng = new Random(11);
        var wf = new float[n * k];
        for (int i = 0; i < wf.Length; i++) wf[i] = (float)(rng.NextDouble() * 2 - 1) * (1 + i / 4096);
        var bytes = Nf4.Quantize(wf);
        var deq = Nf4Reference.Dequantize(bytes, (long)n * k);
        using var w = b.Allocate(DType.NF4, n, k);
        b.UploadRaw(w, bytes);
        int inner = backwardInput ? n : k, outer = backwardInput ? k : n;
        float[] x = Rand(m * inner, 12);
        using var tx = Up(b, DType.F32, x);
        using var ty = b.Allocate(DType.F32, m * outer);
        var args = backwardInput
            ? MatMulTensorCoreKernels.From(MatMulKernels.Nn(m, k, n, 1f, false))
            : MatMulTensorCoreKernels.From(MatMulKernels.Nt(m, n, k, 1f, false));
        tc.Launch(false, b.Floats(tx, "x"), nf4.Fused(w), b.F32(ty, "y"), MatMulKernels.None, ArrayView<float>.Empty, MatMulKernels.None, args);
        var got = new float[m * outer];
        b.Download(ty, got);
        var expected = new double[m * outer];
        for (int i = 0; i < m; i++)
        for (int j = 0; j < outer; j++)
        {
            double s = 0;
            for (int q = 0; q < inner; q++)
                s += (double)Round(x[i * inner + q], false) * Round((float)(backwardInput ? deq[q * k + j] : deq[j * k + q]), false);
            expected[i * outer + j] = s;
        }
        NumericAssert.Close(expected, got, Tolerance.F32.Atol, Tolerance.F32.Rtol, $"nf4 backwardInput={backwardInput}");
    }

    /// <summary>
    /// The residual add in the epilogue (o_proj / down_proj feeding the residual stream): out = residual + x·Wᵀ + bias +
    /// s·u·Bᵀ in one launch equals the launch without it followed by the add, bit for bit (the same f32 operations in the
    /// same order); the output's previous contents (NaN) are not read and the residual is not written.
    /// </summary>
    [Theory]
    [InlineData(false, 37, 20, 40)]   // bf16: ragged rows and columns, cp.async-able W (ignored here), vector loads
    [InlineData(true, 130, 9, 19)]    // f16: two row tiles, scalar loads
    public void ResidualInTheEpilogueEqualsLaunchThenAdd(bool f16, int m, int n, int r)
    {
        var b = Sim.Value;
        var tc = b.Kernels(x => new MatMulTensorCoreKernels(x));
        const int rank = 2;
        float[] a = Rand(m * r, 21), w = Rand(n * r, 22), res = Rand(m * n, 23), bias = Rand(n, 24), u = Rand(m * rank, 25), lb = Rand(n * rank, 26);
        for (int i = 0; i < w.Length; i++) w[i] = Round(w[i], f16);
        using var ta = Up(b, DType.F32, a);
        using var tw = Up(b, f16 ? DType.F16 : DType.BF16, w);
        using var tres = Up(b, DType.F32, res);
        using var tbias = Up(b, DType.F32, bias);
        using var tu = Up(b, DType.F32, u);
        using var tlb = Up(b, DType.F32, lb);
        using var fused = Up(b, DType.F32, Enumerable.Repeat(float.NaN, m * n).ToArray());
        using var plain = Up(b, DType.F32, new float[m * n]);
        var args = MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(MatMulKernels.Nt(m, n, r, 1f, false)), ta, tw, f16);
        args.HasBias = 1;
        args.LoraRank = rank;
        args.Slj = rank;
        args.Slq = 1;
        args.LoraScale = 0.5f;
        tc.Launch(f16, b.Floats(ta, "a"), b.Floats(tw, "w"), b.F32(fused, "out"), b.Floats(tbias, "bias"), b.F32(tu, "u"), b.Floats(tlb, "lb"), args, b.F32(tres, "res"));
        tc.Launch(f16, b.Floats(ta, "a"), b.Floats(tw, "w"), b.F32(plain, "out"), b.Floats(tbias, "bias"), b.F32(tu, "u"), b.Floats(tlb, "lb"), args);
        float[] got = new float[m * n], linear = new float[m * n], resAfter = new float[m * n];
        b.Download(fused, got);
        b.Download(plain, linear);
        b.Download(tres, resAfter);
        for (int i = 0; i < got.Length; i++) Assert.Equal(linear[i] + res[i], got[i]);
        Assert.Equal(res, resAfter);
    }

    /// <summary>
    /// The LoRA forward's rank-r term reduced by the mma (<see cref="MatMulTensorCoreKernels.WithLoraInMma"/>, the args
    /// LoraLinearKernels.Forward launches on CUDA): y = [residual +] rnd(x)·rnd(W)ᵀ + rnd(s·u)·rnd(B)ᵀ + bias, rnd = the
    /// operand rounding (bf16: what autocast does to PEFT's lora_B input and weight), against double loops over the rounded
    /// operands. Ragged M, N, K; r = 1 and 8 (one k16 slice of mostly zero padding), 16, 24 (both slices, the second half
    /// padding), 40 (two rank steps); u read with vector loads where r % 4 == 0; B f32 or already 16-bit. s = 0.75 is not a
    /// power of two, so rounding s·u (not u) is what the reference checks.
    /// </summary>
    [Theory]
    [InlineData(false, 1, 37, 20, 40, DType.F32, true)]
    [InlineData(false, 8, 21, 13, 19, DType.BF16, false)]
    [InlineData(true, 16, 9, 136, 45, DType.F32, true)]
    [InlineData(false, 24, 130, 11, 33, DType.F32, false)]
    [InlineData(false, 40, 5, 10, 7, DType.BF16, true)]
    public void LoraTermInTheMmaMatchesRoundedReference(bool f16, int rank, int m, int n, int k, DType bType, bool residual)
    {
        var b = Sim.Value;
        var tc = b.Kernels(x => new MatMulTensorCoreKernels(x));
        const float scale = 0.75f;
        float[] x = Rand(m * k, 31), w = Rand(n * k, 32), res = Rand(m * n, 33), bias = Rand(n, 34), u = Rand(m * rank, 35), lb = Rand(n * rank, 36);
        for (int i = 0; i < w.Length; i++) w[i] = Round(w[i], f16);
        if (bType != DType.F32) for (int i = 0; i < lb.Length; i++) lb[i] = Round(lb[i], bType == DType.F16);
        using var tx = Up(b, DType.F32, x);
        using var tw = Up(b, f16 ? DType.F16 : DType.BF16, w);
        using var tres = Up(b, DType.F32, res);
        using var tbias = Up(b, DType.F32, bias);
        using var tu = Up(b, DType.F32, u);
        using var tlb = Up(b, bType, lb);
        using var ty = Up(b, DType.F32, Enumerable.Repeat(float.NaN, m * n).ToArray()); // not read: no accumulate
        var args = MatMulTensorCoreKernels.From(MatMulKernels.Nt(m, n, k, 1f, false));
        args.HasBias = 1;
        args = MatMulTensorCoreKernels.WithLoraInMma(MatMulTensorCoreKernels.Vectorized(args, tx, tw, f16), tu, tlb, rank, scale, f16);
        Assert.Equal(1, args.LoraInMma);
        Assert.Equal(rank % 4 == 0 ? 1 : 0, args.VecU);
        Assert.Equal(rank % 4 == 0 && bType != (f16 ? DType.BF16 : DType.F16) ? 1 : 0, args.VecL);
        tc.Launch(f16, b.Floats(tx, "x"), b.Floats(tw, "w"), b.F32(ty, "y"), b.Floats(tbias, "bias"), b.F32(tu, "u"), b.Floats(tlb, "lb"), args,
            residual ? b.F32(tres, "res") : default);
        var got = new float[m * n];
        b.Download(ty, got);

        var expected = new double[m * n];
        for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++)
        {
            double v = 0;
            for (int q = 0; q < k; q++) v += (double)Round(x[i * k + q], f16) * Round(w[j * k + q], f16);
            for (int q = 0; q < rank; q++) v += (double)Round(scale * u[i * rank + q], f16) * Round(lb[j * rank + q], f16);
            v += bias[j];
            if (residual) v += res[i * n + j];
            expected[i * n + j] = v;
        }
        // f32 accumulation of exactly representable products (as MatchesRoundedReference): f32 tolerance
        NumericAssert.Close(expected, got, Tolerance.F32.Atol, Tolerance.F32.Rtol, $"r={rank} f16={f16} {m}x{n}x{k} B {bType}");
    }

    /// <summary>The rank-r term goes into the mma only for y = x·Wᵀ: a k-major B operand, an Alpha or a dropout mask keep the epilogue.</summary>
    [Fact]
    public void LoraTermInTheMmaRefusesOtherLayouts()
    {
        var b = Sim.Value;
        using var u = Up(b, DType.F32, new float[8]);
        using var lb = Up(b, DType.F32, new float[8]);
        Assert.Throws<ArgumentException>(() => MatMulTensorCoreKernels.WithLoraInMma(MatMulTensorCoreKernels.From(MatMulKernels.Nn(2, 4, 4, 1f, false)), u, lb, 2, 1f, false));
        Assert.Throws<ArgumentException>(() => MatMulTensorCoreKernels.WithLoraInMma(MatMulTensorCoreKernels.From(MatMulKernels.Nt(2, 4, 4, 0.5f, false)), u, lb, 2, 1f, false));
        var masked = MatMulTensorCoreKernels.From(MatMulKernels.Nt(2, 4, 4, 1f, false));
        masked.Dropout = 1;
        Assert.Throws<ArgumentException>(() => MatMulTensorCoreKernels.WithLoraInMma(masked, u, lb, 2, 1f, false));
    }

    /// <summary>
    /// The CUDA path loads the kernel itself (LoadKernel + CreateLauncherDelegate, after the PTX pass) instead of
    /// LoadStreamKernel: the same binding, on a kernel the simulator loads, launches and computes the product.
    /// </summary>
    [Fact]
    public void TheSelfLoadedLauncherBindsAndRuns()
    {
        var b = Sim.Value;
        var method = typeof(MatMulTensorCoreKernels).GetMethod(nameof(MatMulTensorCoreKernels.MatMulTensorCoreKernel))!.MakeGenericMethod(typeof(Bf16Operand));
        var launch = MatMulTensorCoreKernels.Bind(b, b.Accelerator.LoadKernel(method));
        const int m = 2, n = 3, r = 4;
        float[] a = { 1, 2, 3, 4, 5, 6, 7, 8 }, w = { 1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1 };
        using var ta = Up(b, DType.F32, a);
        using var tw = Up(b, DType.BF16, w);
        using var ty = b.Allocate(DType.F32, m * n);
        launch(new KernelConfig(1, MatMulTensorCoreKernels.Threads), b.Floats(ta, "a"), b.Floats(tw, "w"), b.F32(ty, "y"), b.F32(ty, "y"), MatMulKernels.None,
            ArrayView<float>.Empty, MatMulKernels.None, MatMulTensorCoreKernels.From(MatMulKernels.Nt(m, n, r, 1f, false)));
        var got = new float[m * n];
        b.Download(ty, got);
        Assert.Equal(new float[] { 1, 2, 10, 5, 6, 26 }, got); // hand-checked: rows of A against e0, e1, ones
    }
}
