using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Shape and epilogue of one tiled matmul: out(i, j) = Alpha · Σ_r A(i, r)·B(j, r) [⊙ dropout mask] [+ bias(j)] [+ out(i, j) or residual(i, j)].
/// A(i, r) = a[i·Sai + r·Sar], B(j, r) = b[j·Sbj + r·Sbr], out(i, j) = out[i·Ldo + j]. The strides express the
/// three training layouts without transposing anything in memory.
/// </summary>
public struct MatMulArgs
{
    public int M, N, R, Ldo;
    public long Sai, Sar, Sbj, Sbr;
    public float Alpha;
    public int Accumulate, HasBias;
    /// <summary>When Dropout != 0, out(i, j) is multiplied by DropScale if DropoutHash.Keep(Seed, i·Ldo + j, DropP), else by 0.</summary>
    public int Dropout;
    public float DropP, DropScale;
    public ulong Seed;
    /// <summary>
    /// Split-K (set by <see cref="MatMulKernels.Launch"/> only): when Splits &gt; 1 the grid is Splits copies of the tile
    /// grid, copy s reduces r in [s·SliceR, (s+1)·SliceR) and stores its raw partial sums at out[s·M·Ldo + i·Ldo + j].
    /// </summary>
    public int Splits, SliceR;
}

/// <summary>Which kernel a matmul forward ran (<see cref="MatMulKernels.LastForwardPathOnThisThread"/>).</summary>
internal enum MatMulPath { None, Tiled, TensorCore, Gemv, GemvVectorized, Nf4 }

/// <summary>
/// Matmul in the three layouts a linear layer needs, with f32 accumulation over f32 or bf16 weights:
/// y = x·Wᵀ (+bias), dx = dy·W, dW += dyᵀ·x (dBias += Σ dy).
/// </summary>
/// <remarks>
/// One explicitly grouped kernel: a group of 256 threads computes a 64×64 output tile, each thread a 4×4
/// register block; 64×16 slices of A and B are staged through shared memory (rows padded by one float so
/// neither the transposing stores nor the reads conflict on banks). Loads are coalesced along whichever
/// operand dimension is contiguous. A product with few output tiles and a long reduction (the LoRA gradients dA, dB
/// over all tokens) is split along r into one launch of (tiles × slices) groups writing partial sums, and
/// <see cref="SplitKReduceKernel"/> sums them in a fixed order and applies the epilogue. Matches MatMulReference. Against bf16/f16 weights on CUDA sm_80+ the forward
/// and input-gradient matmuls run on tensor cores instead (<see cref="MatMulTensorCoreKernels"/>), and the weight gradient of a bf16 weight
/// (IBackend.MatMulBackwardWeightBf16: dy and x rounded to bf16) too. A forward of at most
/// <see cref="MatMulGemvKernels.MaxRows"/> rows (decode) over f32/bf16/f16/Q8_0/Q4_0 weights runs <see cref="MatMulGemvKernels"/> instead, on any accelerator.
/// </remarks>
internal sealed class MatMulKernels : IDisposable
{
    public const int BM = 64, BN = 64, BK = 16, Threads = 256;
    private const int SA = BM + 1, SB = BN + 1;

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, ArrayView<float>, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, MatMulArgs> _tiled;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, DeviceFloats, MatMulArgs> _splitReduce;
    private readonly ColumnSumKernels _columnSum;
    private MatMulTensorCoreKernels? _tensorCore;
    private MatMulGemvKernels? _gemv;
    private MemoryBuffer1D<float, Stride1D.Dense>? _partials;

    /// <summary>
    /// Split-K policy: a product with fewer output tiles than <see cref="SplitBelowTiles"/> (an H100 has 132 SMs, 5 groups
    /// each) and a reduction of at least <see cref="SplitMinR"/> is cut along r into slices of at least <see cref="SplitMinSlice"/>,
    /// enough for about <see cref="SplitTargetGroups"/> groups. The LoRA gradients need it: dB (N, R) += s·dyᵀ·u and
    /// dA (R, K) reduce over all M = B·T tokens into a single row of tiles (SmolLM2 at 8×2048: 9 groups, each walking
    /// 16384 rows in steps of 16).
    /// </summary>
    internal const int SplitBelowTiles = 128, SplitMinR = 2048, SplitMinSlice = 512, SplitTargetGroups = 264, MaxSplits = 64;

    public MatMulKernels(IlgpuBackend b)
    {
        _b = b;
        _tiled = b.Accelerator.LoadStreamKernel<ArrayView<float>, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, MatMulArgs>(MatMulTiledKernel);
        _splitReduce = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, DeviceFloats, MatMulArgs>(SplitKReduceKernel);
        _columnSum = b.Kernels(x => new ColumnSumKernels(x));
        WeightGradTensorCores = b.TensorCores;
    }

    /// <summary>
    /// Whether the bf16-compute weight gradient (<see cref="BackwardWeight"/> with bf16 = true) runs on the tensor-core
    /// kernel: CUDA sm_80+ (<see cref="IlgpuBackend.TensorCores"/>); tests set it on the simulator to run the kernel's scalar path.
    /// </summary>
    internal bool WeightGradTensorCores { get; set; }

    /// <summary>How many r slices a product of <paramref name="tiles"/> output tiles and reduction <paramref name="r"/> is cut into (1: none).</summary>
    internal static int SplitsFor(long tiles, int r)
    {
        if (tiles >= SplitBelowTiles || r < SplitMinR) return 1;
        long bySlice = r / SplitMinSlice, byGroups = (SplitTargetGroups + tiles - 1) / tiles;
        return (int)Math.Max(1, Math.Min(MaxSplits, Math.Min(bySlice, byGroups)));
    }

    /// <summary>
    /// Split-K second pass: out(i, j) = Alpha · Σ_s partial[s](i, j) [⊙ dropout] [+ bias(j)] [+ residual(i, j)], the slices
    /// summed in order (deterministic), the epilogue of <see cref="MatMulTiledKernel"/>. partial[s] is (M, N) dense.
    /// </summary>
    [GpuKernel(false)]
    public static void SplitKReduceKernel(Index1D e, ArrayView<float> partials, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, MatMulArgs p)
    {
        int i = e / p.N, j = e % p.N;
        long slice = (long)p.M * p.N;
        float acc = 0f;
        for (int s = 0; s < p.Splits; s++) acc += partials[s * slice + e];
        Store(p, output, residual, bias, i, j, acc);
    }

    [GpuKernel(true)]
    public static void MatMulTiledKernel(ArrayView<float> a, DeviceFloats b, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, MatMulArgs p)
    {
        var sa = SharedMemory.Allocate<float>(BK * SA);
        var sb = SharedMemory.Allocate<float>(BK * SB);
        int tid = Group.IdxX;
        int tx = tid % 16, ty = tid / 16;
        int tilesN = (p.N + BN - 1) / BN;
        int tiles = (p.M + BM - 1) / BM * tilesN;
        int tile = Grid.IdxX % tiles, split = Grid.IdxX / tiles;
        int bi = tile / tilesN * BM;
        int bj = tile % tilesN * BN;
        // this group's r range: all of it, or its split-K slice (whose raw sums go to its own (M, Ldo) block of the output)
        int rBegin = p.Splits > 1 ? split * p.SliceR : 0;
        int rEnd = p.Splits > 1 ? Math.Min(p.R, rBegin + p.SliceR) : p.R;
        if (p.Splits > 1) output = output.SubView((long)split * p.M * p.Ldo, (long)p.M * p.Ldo);

        float c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
        float c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;

        for (int r0 = rBegin; r0 < rEnd; r0 += BK)
        {
            for (int l = 0; l < BM * BK / Threads; l++)
            {
                int idx = tid + l * Threads;
                int ii, rr;
                if (p.Sar == 1) { rr = idx % BK; ii = idx / BK; }
                else { ii = idx % BM; rr = idx / BM; }
                int gi = bi + ii, gr = r0 + rr;
                sa[rr * SA + ii] = gi < p.M && gr < rEnd ? a[gi * p.Sai + gr * p.Sar] : 0f;
            }
            for (int l = 0; l < BN * BK / Threads; l++)
            {
                int idx = tid + l * Threads;
                int jj, rr;
                if (p.Sbr == 1) { rr = idx % BK; jj = idx / BK; }
                else { jj = idx % BN; rr = idx / BN; }
                int gj = bj + jj, gr = r0 + rr;
                sb[rr * SB + jj] = gj < p.N && gr < rEnd ? b.Load(gj * p.Sbj + gr * p.Sbr) : 0f;
            }
            Group.Barrier();
            for (int rr = 0; rr < BK; rr++)
            {
                float a0 = sa[rr * SA + ty], a1 = sa[rr * SA + ty + 16], a2 = sa[rr * SA + ty + 32], a3 = sa[rr * SA + ty + 48];
                float b0 = sb[rr * SB + tx], b1 = sb[rr * SB + tx + 16], b2 = sb[rr * SB + tx + 32], b3 = sb[rr * SB + tx + 48];
                c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
                c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
                c20 += a2 * b0; c21 += a2 * b1; c22 += a2 * b2; c23 += a2 * b3;
                c30 += a3 * b0; c31 += a3 * b1; c32 += a3 * b2; c33 += a3 * b3;
            }
            Group.Barrier();
        }

        int i0 = bi + ty, j0 = bj + tx;
        Store(p, output, residual, bias, i0, j0, c00); Store(p, output, residual, bias, i0, j0 + 16, c01); Store(p, output, residual, bias, i0, j0 + 32, c02); Store(p, output, residual, bias, i0, j0 + 48, c03);
        Store(p, output, residual, bias, i0 + 16, j0, c10); Store(p, output, residual, bias, i0 + 16, j0 + 16, c11); Store(p, output, residual, bias, i0 + 16, j0 + 32, c12); Store(p, output, residual, bias, i0 + 16, j0 + 48, c13);
        Store(p, output, residual, bias, i0 + 32, j0, c20); Store(p, output, residual, bias, i0 + 32, j0 + 16, c21); Store(p, output, residual, bias, i0 + 32, j0 + 32, c22); Store(p, output, residual, bias, i0 + 32, j0 + 48, c23);
        Store(p, output, residual, bias, i0 + 48, j0, c30); Store(p, output, residual, bias, i0 + 48, j0 + 16, c31); Store(p, output, residual, bias, i0 + 48, j0 + 32, c32); Store(p, output, residual, bias, i0 + 48, j0 + 48, c33);
    }

    private static void Store(MatMulArgs p, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, int i, int j, float acc)
    {
        if (i >= p.M || j >= p.N) return;
        long idx = (long)i * p.Ldo + j;
        float v = p.Alpha * acc;
        if (p.Dropout != 0) v = DropoutHash.Keep(p.Seed, idx, p.DropP) ? v * p.DropScale : 0f;
        if (p.HasBias != 0) v += bias.Load(j);
        if (p.Accumulate != 0) v += residual[idx]; // (the output itself for +=, or the residual stream: see Launch)
        output[idx] = v;
    }

    /// <summary>
    /// Launches the tiled kernel (no validation: callers check shapes). With a <paramref name="residual"/> (laid out as
    /// the output) it writes out = residual + ... (Accumulate is set); without one, Accumulate adds the output's previous value.
    /// </summary>
    internal void Launch(ArrayView<float> a, DeviceFloats b, ArrayView<float> output, DeviceFloats bias, MatMulArgs p, ArrayView<float> residual = default)
    {
        if (p.M == 0 || p.N == 0) return;
        if (residual.Length > 0) p.Accumulate = 1;
        else residual = output;
        long groups = (long)((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
        if (groups > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(p), $"matmul {p.M}×{p.N} needs too many groups");
        p.Splits = 0;
        int splits = SplitsFor(groups, p.R);
        t_lastSplits = splits;
        if (splits <= 1)
        {
            _tiled(new KernelConfig((int)groups, Threads), a, b, output, residual, bias, p);
            return;
        }
        // Split-K: raw partial sums of each r slice into a dense (splits, M, N) scratch, then one pass applies the epilogue.
        long slice = (long)p.M * p.N;
        var partials = Partials(splits * slice);
        var q = p;
        q.Splits = splits;
        q.SliceR = (p.R + splits - 1) / splits;
        q.SliceR = (q.SliceR + BK - 1) / BK * BK;
        q.Ldo = p.N;
        q.Alpha = 1f;
        q.Accumulate = 0;
        q.HasBias = 0;
        q.Dropout = 0;
        _tiled(new KernelConfig((int)(groups * splits), Threads), a, b, partials, partials, bias, q);
        p.Splits = splits;
        _splitReduce(checked((int)slice), partials, output, residual, bias, p);
    }

    /// <summary>
    /// The r slices of the last <see cref="Launch"/> made by the calling thread, on any backend (1: not split); for tests.
    /// Per thread, not per instance: the test backends are shared, and another test's matmul on the same backend between
    /// a test's launch and its check must not change what the check sees (it did, once, in CI).
    /// </summary>
    internal static int LastSplitsOnThisThread => t_lastSplits;

    [ThreadStatic] private static int t_lastSplits;

    /// <summary>
    /// The kernel the last <see cref="Forward"/> of the calling thread took, on any backend; for tests. Per thread, as
    /// <see cref="LastSplitsOnThisThread"/>: the test backends are shared between test classes running in parallel.
    /// </summary>
    internal static MatMulPath LastForwardPathOnThisThread => t_lastPath;

    [ThreadStatic] private static MatMulPath t_lastPath;

    public void Dispose() => _partials?.Dispose();

    /// <summary>The split-K scratch (grow-only: the first step of a shape allocates it, later steps reuse it).</summary>
    private ArrayView<float> Partials(long floats)
    {
        if (_partials is null || _partials.Length < floats)
        {
            if (_partials is not null)
            {
                _b.WaitForDevice(); // earlier launches may still read the old buffer (none can before the first)
                _partials.Dispose();
            }
            _partials = _b.AllocateScratch<float>(floats);
        }
        return _partials.View.SubView(0, floats);
    }

    /// <summary>
    /// The tensor-core kernels when this backend multiplies a weight of dtype <paramref name="w"/> on tensor cores
    /// (bf16/f16 weights on CUDA sm_80+: the activations are rounded to the weight's 16-bit type, f32 accumulation), else null.
    /// </summary>
    internal MatMulTensorCoreKernels? TensorCoreFor(DType w)
    {
        if (!_b.TensorCores || (w != DType.BF16 && w != DType.F16)) return null;
        return _tensorCore ??= _b.Kernels(x => new MatMulTensorCoreKernels(x));
    }

    /// <summary>The kernels for GGUF Q8_0/Q4_0 weights: the tensor-core kernel on every accelerator (bf16 operands).</summary>
    private MatMulTensorCoreKernels Quantized => _tensorCore ??= _b.Kernels(x => new MatMulTensorCoreKernels(x));

    internal static DeviceFloats None => new(ArrayView<float>.Empty, ArrayView<ushort>.Empty, DeviceFloats.KindF32);

    /// <summary>out(M,N) (+)= alpha · A(M,R)·B(N,R)ᵀ, both row-major (the nn.Linear forward layout).</summary>
    internal static MatMulArgs Nt(int m, int n, int r, float alpha, bool accumulate) => new()
    {
        M = m, N = n, R = r, Ldo = n, Sai = r, Sar = 1, Sbj = r, Sbr = 1, Alpha = alpha, Accumulate = accumulate ? 1 : 0,
    };

    /// <summary>out(M,N) (+)= alpha · A(M,R)·B(R,N) (the input-gradient layout; B given as (R, N) row-major).</summary>
    internal static MatMulArgs Nn(int m, int n, int r, float alpha, bool accumulate) => new()
    {
        M = m, N = n, R = r, Ldo = n, Sai = r, Sar = 1, Sbj = 1, Sbr = n, Alpha = alpha, Accumulate = accumulate ? 1 : 0,
    };

    /// <summary>out(M,N) (+)= alpha · A(R,M)ᵀ·B(R,N) (the weight-gradient layout: both operands row-major over R).</summary>
    internal static MatMulArgs Tn(int m, int n, int r, float alpha, bool accumulate) => new()
    {
        M = m, N = n, R = r, Ldo = n, Sai = 1, Sar = m, Sbj = 1, Sbr = n, Alpha = alpha, Accumulate = accumulate ? 1 : 0,
    };

    /// <summary>
    /// y (+)= x·Wᵀ [+ bias], or with <paramref name="residual"/> (M, N), not overlapping y: y = residual + x·Wᵀ [+ bias]
    /// with the add in the matmul's epilogue (one write of y instead of a write, then a read of y and residual and a
    /// write by a separate add). NF4 weights add the residual in a second pass.
    /// </summary>
    public void Forward(Tensor y, Tensor x, Tensor w, Tensor? bias, int m, int n, int k, bool accumulate, Tensor? residual = null)
    {
        string op = residual is null ? "MatMul" : "MatMulResidual";
        IlgpuBackend.Positive(op, ("m", m), ("n", n), ("k", k));
        IlgpuBackend.Need(y, (long)m * n, "y", op);  // (M, N)
        IlgpuBackend.Need(x, (long)m * k, "x", op);  // (M, K)
        IlgpuBackend.Need(w, (long)n * k, "w", op);  // (N, K)
        if (bias is not null) IlgpuBackend.Need(bias, n, "bias", op); // (N)
        if (residual is not null) IlgpuBackend.Need(residual, (long)m * n, "residual", op); // (M, N)
        var rv = residual is null ? default : _b.F32(residual, "residual");
        if (w.DType == DType.NF4)
        {
            t_lastPath = MatMulPath.Nf4;
            _b.Kernels(b => new Nf4Kernels(b)).Forward(w, _b.F32(x, "x"), _b.F32(y, "y"), bias, m, n, k, 1f, accumulate, op);
            if (residual is not null) _b.Add(y, y, residual);
            return;
        }
        if (m <= MatMulGemvKernels.MaxRows)
        {
            // decode (a few rows): one memory-bound pass over W in f32 (x not rounded), not 64/128-row tiles of padding
            bool vec = MatMulGemvKernels.CanVectorize(x, w, k);
            t_lastPath = vec ? MatMulPath.GemvVectorized : MatMulPath.Gemv;
            _gemv ??= _b.Kernels(x => new MatMulGemvKernels(x));
            _gemv.Launch(_b.Floats(x, "x"), w.DType.IsBlockQuantized() ? _b.QuantWeight(w, "w") : _b.Weight(w, "w"), _b.F32(y, "y"),
                bias is null ? None : _b.Floats(bias, "bias"), m, n, k, accumulate, bias is not null, vec, rv);
            return;
        }
        var p = Nt(m, n, k, 1f, accumulate);
        p.HasBias = bias is null ? 0 : 1;
        if (w.DType.IsBlockQuantized())
        {
            t_lastPath = MatMulPath.TensorCore;
            // Q8_0/Q4_0: dequantized inside the tensor-core kernel's tile loads (its scalar path off CUDA)
            Quantized.Launch(false, _b.Floats(x, "x"), _b.QuantWeight(w, "w"), _b.F32(y, "y"), bias is null ? None : _b.Floats(bias, "bias"),
                ArrayView<float>.Empty, None, MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(p), x, w, false), rv);
            return;
        }
        var tc = TensorCoreFor(w.DType);
        t_lastPath = tc is null ? MatMulPath.Tiled : MatMulPath.TensorCore;
        if (tc is not null)
            tc.Launch(w.DType == DType.F16, _b.Floats(x, "x"), _b.Weight(w, "w"), _b.F32(y, "y"), bias is null ? None : _b.Floats(bias, "bias"),
                ArrayView<float>.Empty, None, MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(p), x, w, w.DType == DType.F16), rv);
        else Launch(_b.F32(x, "x"), _b.Weight(w, "w"), _b.F32(y, "y"), bias is null ? None : _b.Floats(bias, "bias"), p, rv);
    }

    public void BackwardInput(Tensor dx, Tensor dy, Tensor w, int m, int n, int k, bool accumulate)
    {
        const string op = "MatMulBackwardInput";
        IlgpuBackend.Positive(op, ("m", m), ("n", n), ("k", k));
        IlgpuBackend.Need(dx, (long)m * k, "dx", op); // (M, K)
        IlgpuBackend.Need(dy, (long)m * n, "dy", op); // (M, N)
        IlgpuBackend.Need(w, (long)n * k, "w", op);   // (N, K)
        if (w.DType == DType.NF4) { _b.Kernels(b => new Nf4Kernels(b)).BackwardInput(w, _b.F32(dy, "dy"), _b.F32(dx, "dx"), m, n, k, accumulate, op); return; }
        if (w.DType.IsBlockQuantized())
        {
            Quantized.Launch(false, _b.Floats(dy, "dy"), _b.QuantWeight(w, "w"), _b.F32(dx, "dx"), None, ArrayView<float>.Empty, None,
                MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(Nn(m, k, n, 1f, accumulate)), dy, w, false));
            return;
        }
        var tc = TensorCoreFor(w.DType);
        if (tc is not null)
            tc.Launch(w.DType == DType.F16, _b.Floats(dy, "dy"), _b.Weight(w, "w"), _b.F32(dx, "dx"), None, ArrayView<float>.Empty, None,
                MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(Nn(m, k, n, 1f, accumulate)), dy, w, w.DType == DType.F16));
        else Launch(_b.F32(dy, "dy"), _b.Weight(w, "w"), _b.F32(dx, "dx"), None, Nn(m, k, n, 1f, accumulate));
    }

    /// <summary>
    /// The tensor-core arguments of dW(N, K) += dyᵀ·x: A(i = n, r = m) = dy[m·N + n], B(j = k, r = m) = x[m·K + k], both
    /// rows-contiguous (A staged transposed, B k-major; runs of 4 along rows read with one vector load when N (K) % 4 == 0).
    /// </summary>
    internal static TensorCoreArgs WeightGradArgs(Tensor dy, Tensor x, int m, int n, int k)
        => MatMulTensorCoreKernels.Vectorized(MatMulTensorCoreKernels.From(Tn(n, k, m, 1f, true)), dy, x, false);

    /// <summary>
    /// dW += dyᵀ·x (f32 exact), or with <paramref name="bf16"/> on tensor cores (<see cref="WeightGradTensorCores"/>) in
    /// autocast semantics: dy and x rounded to bf16, f32 accumulation into the f32 dW. dBias stays an exact f32 column sum.
    /// </summary>
    public void BackwardWeight(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k, bool bf16 = false)
    {
        const string op = "MatMulBackwardWeight";
        IlgpuBackend.Positive(op, ("m", m), ("n", n), ("k", k));
        IlgpuBackend.Need(dw, (long)n * k, "dw", op); // (N, K)
        IlgpuBackend.Need(dy, (long)m * n, "dy", op); // (M, N)
        IlgpuBackend.Need(x, (long)m * k, "x", op);   // (M, K)
        if (bf16 && WeightGradTensorCores)
        {
            var tc = _tensorCore ??= _b.Kernels(b => new MatMulTensorCoreKernels(b));
            tc.Launch(false, _b.Floats(dy, "dy"), _b.Floats(x, "x"), _b.F32(dw, "dw"), None, ArrayView<float>.Empty, None, WeightGradArgs(dy, x, m, n, k));
        }
        else Launch(_b.F32(dy, "dy"), _b.Floats(x, "x"), _b.F32(dw, "dw"), None, Tn(n, k, m, 1f, true));
        if (dBias is not null) _columnSum.Accumulate(dBias, dy, m, n, op);
    }
}
