using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The tensor-core flash attention forward without a GPU. (1) Its fragment layouts on a warp emulated from the PTX
/// ISA tables (MmaFragmentEmulationTests' ldmatrix and mma, plus ldmatrix .trans written here): the kernel's own
/// Q/K/V lane addressing and its reuse of the C fragments of S as the A fragments of P·V must reproduce S = Q·Kᵀ
/// and O = S·V bit for bit on small integers. (2) The kernel in ILGPU's simulator, where ldmatrix and mma are
/// emulated lane by lane with shuffles, against AttentionReference over the bf16/f16-rounded Q, K, V.
/// The inline-PTX path is proven by these plus PtxasTests (HMMA in the SASS, no local memory).
/// </summary>
public class AttentionTensorCoreTests
{
    private const int Lanes = 32;
    private const int Ld = AttentionTensorCoreKernels.Ld;

    // ---------------------------------------------------------------- emulation of the fragment layouts

    /// <summary>
    /// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 from the PTX ISA: lanes 8q..8q+7 give the addresses of rows
    /// 0..7 of matrix q; with .trans each lane L receives, in register q, the elements of rows 2·(L%4) and
    /// 2·(L%4)+1 at column L/4 (the matrix read column-major), the first in the lower half.
    /// </summary>
    private static uint[,] LdmatrixTrans4(ushort[] shared, int[] laneAddress)
    {
        var r = new uint[Lanes, 4];
        for (int q = 0; q < 4; q++)
        for (int lane = 0; lane < Lanes; lane++)
        {
            int col = lane / 4, row = 2 * (lane % 4);
            r[lane, q] = shared[laneAddress[8 * q + row] + col] | ((uint)shared[laneAddress[8 * q + row + 1] + col] << 16);
        }
        return r;
    }

    private static int[] Addresses(Func<int, int> lane) => Enumerable.Range(0, Lanes).Select(lane).ToArray();

    private static float[,] MmaInto(float[,] acc, int tile, uint[,] a, uint[,] b, int b0)
    {
        var bf = new uint[Lanes, 2];
        var c = new float[Lanes, 4];
        for (int l = 0; l < Lanes; l++)
        {
            bf[l, 0] = b[l, b0];
            bf[l, 1] = b[l, b0 + 1];
            for (int i = 0; i < 4; i++) c[l, i] = acc[l, tile * 4 + i];
        }
        var d = MmaFragmentEmulationTests.Mma(a, bf, c);
        for (int l = 0; l < Lanes; l++)
        for (int i = 0; i < 4; i++) acc[l, tile * 4 + i] = d[l, i];
        return acc;
    }

    /// <summary>
    /// One warp of the kernel over one key tile, on the emulator: S (16 × 32) from the Q/K addressing, the P
    /// fragments packed from S's C fragments by <paramref name="pFragment"/>, O (16 × hs) from the V addressing.
    /// Returns the numbers of S and O elements that differ from the exact products.
    /// </summary>
    private static (int S, int O) Mismatches(int warp, int hs, int seed,
        Func<MmaFrag, MmaFrag, uint[]> pFragment, Func<ushort[], int[], uint[,]> vLoad)
    {
        var rng = new Random(seed);
        var shared = new ushort[AttentionTensorCoreKernels.SharedElems];
        var q = new float[AttentionTensorCoreKernels.BQ, hs];
        var k = new float[AttentionTensorCoreKernels.BKV, hs];
        var v = new float[AttentionTensorCoreKernels.BKV, hs];
        for (int r = 0; r < AttentionTensorCoreKernels.BQ; r++)
        for (int d = 0; d < hs; d++)
            shared[AttentionTensorCoreKernels.QAt + r * Ld + d] = HalfBits.F32ToBf16(q[r, d] = rng.Next(-2, 3));
        for (int r = 0; r < AttentionTensorCoreKernels.BKV; r++)
        for (int d = 0; d < hs; d++)
        {
            shared[AttentionTensorCoreKernels.KAt + r * Ld + d] = HalfBits.F32ToBf16(k[r, d] = rng.Next(-2, 3));
            shared[AttentionTensorCoreKernels.VAt + r * Ld + d] = HalfBits.F32ToBf16(v[r, d] = rng.Next(-3, 4));
        }

        var s = new float[Lanes, 16]; // 4 n8 tiles × 4
        for (int k16 = 0; k16 < hs; k16 += 16)
        {
            var a = MmaFragmentEmulationTests.Ldmatrix4(shared, Addresses(l => AttentionTensorCoreKernels.QFragElement(warp, k16, l)));
            var b0 = MmaFragmentEmulationTests.Ldmatrix4(shared, Addresses(l => AttentionTensorCoreKernels.KFragElement(0, k16, l)));
            var b1 = MmaFragmentEmulationTests.Ldmatrix4(shared, Addresses(l => AttentionTensorCoreKernels.KFragElement(1, k16, l)));
            MmaInto(s, 0, a, b0, 0);
            MmaInto(s, 1, a, b0, 2);
            MmaInto(s, 2, a, b1, 0);
            MmaInto(s, 3, a, b1, 2);
        }
        int badS = 0;
        var exactS = new double[16, AttentionTensorCoreKernels.BKV];
        for (int row = 0; row < 16; row++)
        for (int key = 0; key < AttentionTensorCoreKernels.BKV; key++)
            for (int d = 0; d < hs; d++) exactS[row, key] += q[warp * 16 + row, d] * k[key, d];
        for (int l = 0; l < Lanes; l++)
        for (int nt = 0; nt < 4; nt++)
        for (int i = 0; i < 4; i++)
            if (s[l, nt * 4 + i] != (float)exactS[MmaLayout.CRow(l, i), nt * 8 + MmaLayout.CCol(l, i)]) badS++;

        // P = S (|S| <= 2·2·hs: exact in bf16 for hs <= 64), packed by the kernel's pairing
        var p = new uint[2][,];
        for (int half = 0; half < 2; half++)
        {
            p[half] = new uint[Lanes, 4];
            for (int l = 0; l < Lanes; l++)
            {
                MmaFrag Frag(int nt) => new() { C0 = s[l, nt * 4], C1 = s[l, nt * 4 + 1], C2 = s[l, nt * 4 + 2], C3 = s[l, nt * 4 + 3] };
                var regs = pFragment(Frag(2 * half), Frag(2 * half + 1));
                for (int r = 0; r < 4; r++) p[half][l, r] = regs[r];
            }
        }
        var o = new float[Lanes, hs / 8 * 4];
        for (int d0 = 0; d0 < hs; d0 += 16)
        for (int half = 0; half < 2; half++)
        {
            var vf = vLoad(shared, Addresses(l => AttentionTensorCoreKernels.VFragElement(half, d0, l)));
            MmaInto(o, d0 / 8, p[half], vf, 0);
            MmaInto(o, d0 / 8 + 1, p[half], vf, 2);
        }
        int badO = 0;
        var seen = new int[16, hs];
        for (int l = 0; l < Lanes; l++)
        for (int nt = 0; nt < hs / 8; nt++)
        for (int i = 0; i < 4; i++)
        {
            int row = MmaLayout.CRow(l, i), ch = nt * 8 + MmaLayout.CCol(l, i);
            seen[row, ch]++;
            double e = 0;
            for (int key = 0; key < AttentionTensorCoreKernels.BKV; key++) e += exactS[row, key] * v[key, ch];
            if (o[l, nt * 4 + i] != (float)e) badO++;
        }
        foreach (int n in seen) Assert.Equal(1, n);
        return (badS, badO);
    }

    private static uint[] KernelPFragment(MmaFrag lo, MmaFrag hi)
    {
        AttentionTensorCoreKernels.PFragment<Bf16Operand>(lo, hi, out uint a0, out uint a1, out uint a2, out uint a3);
        return new[] { a0, a1, a2, a3 };
    }

    [Theory]
    [InlineData(0, 16)]
    [InlineData(3, 32)] // the last warp; two k16 slices of Q·Kᵀ and two 16-channel halves of P·V
    [InlineData(1, 64)]
    public void KernelFragmentsReproduceScoresAndOutput(int warp, int hs)
        => Assert.Equal((0, 0), Mismatches(warp, hs, seed: warp * 31 + hs, KernelPFragment, LdmatrixTrans4));

    /// <summary>The emulation can fail: pairing a1 with the second key tile, or reading V without .trans, is caught.</summary>
    [Fact]
    public void WrongPAndVLayoutsAreDetected()
    {
        static uint[] Swapped(MmaFrag lo, MmaFrag hi)
        {
            var r = KernelPFragment(lo, hi);
            return new[] { r[0], r[2], r[1], r[3] };
        }
        Assert.True(Mismatches(0, 16, 1, Swapped, LdmatrixTrans4).O > 0);
        Assert.True(Mismatches(0, 16, 1, KernelPFragment, MmaFragmentEmulationTests.Ldmatrix4).O > 0);
    }

    // ---------------------------------------------------------------- the kernel in the simulator

    // Its own warp-32 simulator: the kernel set is launched directly (the backend dispatches to it only on CUDA sm_80+).
    private static readonly Lazy<IlgpuBackend> Sim = new(() => IlgpuBackend.CreateSimulator(32));

    private static float Round(float x, bool f16) => f16 ? HalfBits.F16ToF32(HalfBits.F32ToF16(x)) : HalfBits.Bf16ToF32(HalfBits.F32ToBf16(x));

    private static Tensor Up(IlgpuBackend b, DType dtype, float[] data)
    {
        var t = b.Allocate(dtype, data.Length);
        b.Upload(t, data);
        return t;
    }

    [Theory]
    [InlineData(false, DType.F32, 1, 40, 40, 40, 2, 1, 16)]  // bf16 from f32, GQA 2:1, two key tiles, one partial query tile
    [InlineData(true, DType.F16, 2, 5, 40, 37, 2, 2, 40)]    // f16 stored as f16, decode-like offset (queries at 32..36), head 40 padded to 48
    [InlineData(false, DType.BF16, 1, 70, 70, 70, 1, 1, 72)] // two query tiles (the second ragged), head 72: the third channel strip, half used
    public void ForwardMatchesReferenceOnRoundedOperands(bool f16, DType storage, int batch, int tq, int tkv, int kvLen, int nh, int nkv, int hs)
    {
        var b = Sim.Value;
        var tc = b.Kernels(x => new AttentionTensorCoreKernels(x));
        float scale = 1f / MathF.Sqrt(hs);
        var q = GradCheck.ToFloat(GradCheck.Random(batch * tq * nh * hs, 1, 1.0));
        var k = GradCheck.ToFloat(GradCheck.Random(batch * tkv * nkv * hs, 2, 1.0));
        var v = GradCheck.ToFloat(GradCheck.Random(batch * tkv * nkv * hs, 3, 1.0));
        using var tq_ = Up(b, storage, q);
        using var tk = Up(b, storage, k);
        using var tv = Up(b, storage, v);
        using var to = Up(b, DType.F32, GradCheck.ToFloat(GradCheck.Random(batch * tq * nh * hs, 4, 1.0))); // overwritten
        using var tl = b.Allocate(DType.F32, batch * nh * tq);
        var args = new AttentionArgs
        {
            Batch = batch, Tq = tq, Tkv = tkv, KvLen = kvLen, NHeads = nh, NKvHeads = nkv, HeadSize = hs, HasLse = 1, Scale = scale,
        };
        tc.Forward(f16, b.Floats(tq_, "q"), b.Floats(tk, "k"), b.Floats(tv, "v"), b.F32(to, "out"), b.F32(tl, "lse"), args);
        double[] R(float[] x) => x.Select(e => (double)Round(e, f16)).ToArray();
        var (eo, el) = AttentionReference.Forward(R(q), R(k), R(v), batch, tq, tkv, kvLen, nh, nkv, hs, scale);
        // P is rounded to the operand type before P·V: bf16/f16 tolerance on the output; the scores are exact
        // products of rounded operands accumulated in f32, so lse keeps the f32 tolerance
        var (atol, rtol) = Tolerance.For(f16 ? DType.F16 : DType.BF16);
        NumericAssert.Close(eo, to.ToArray(), atol, rtol, "out");
        NumericAssert.Close(el, tl.ToArray(), Tolerance.F32.Atol, Tolerance.F32.Rtol, "lse");
    }

    [Theory]
    [InlineData(false, DType.F32, 1, 40, 40, 2, 1, 16)]  // bf16; dk/dv sum over the two query heads of the kv head; two key tiles in the dq kernel
    [InlineData(true, DType.F16, 2, 20, 27, 2, 2, 40)]   // f16 stored as f16; a prefix of 7 keys every query sees; head 40 padded to 48
    [InlineData(false, DType.BF16, 1, 70, 70, 1, 1, 8)]  // two query tiles (dq kernel), two key tiles (dk/dv kernel), ragged
    [InlineData(false, DType.BF16, 1, 33, 33, 1, 1, 128)] // head 128: the head-split kernels, two 32-row tiles (the second ragged); ~1 min in the simulator
    [InlineData(true, DType.F16, 1, 20, 27, 2, 1, 72)]    // head 72 (padded to 80): the second channel half holds one 16-channel slice; prefix of 7; dk/dv sum two query heads
    public void BackwardMatchesReferenceOnRoundedOperands(bool f16, DType storage, int batch, int tq, int tkv, int nh, int nkv, int hs)
    {
        var b = Sim.Value;
        var tc = b.Kernels(x => new AttentionTensorCoreKernels(x));
        float scale = 1f / MathF.Sqrt(hs);
        var q = GradCheck.ToFloat(GradCheck.Random(batch * tq * nh * hs, 11, 1.0));
        var k = GradCheck.ToFloat(GradCheck.Random(batch * tkv * nkv * hs, 12, 1.0));
        var v = GradCheck.ToFloat(GradCheck.Random(batch * tkv * nkv * hs, 13, 1.0));
        var dO = GradCheck.ToFloat(GradCheck.Random(batch * tq * nh * hs, 14, 1.0));
        double[] R(float[] x) => x.Select(e => (double)Round(e, f16)).ToArray();
        var (eo, el) = AttentionReference.Forward(R(q), R(k), R(v), batch, tq, tkv, tkv, nh, nkv, hs, scale);
        var (edq, edk, edv) = AttentionReference.Backward(dO.Select(e => (double)e).ToArray(), R(q), R(k), R(v), batch, tq, tkv, nh, nkv, hs, scale);
        using var tq_ = Up(b, storage, q);
        using var tk = Up(b, storage, k);
        using var tv = Up(b, storage, v);
        using var to = Up(b, DType.F32, eo.Select(e => (float)e).ToArray());
        using var tl = Up(b, DType.F32, el.Select(e => (float)e).ToArray());
        using var tdo = Up(b, DType.F32, dO);
        using var tdq = Up(b, DType.F32, GradCheck.ToFloat(GradCheck.Random(q.Length, 15, 1.0))); // pre-filled: must be overwritten
        using var tdk = Up(b, DType.F32, GradCheck.ToFloat(GradCheck.Random(k.Length, 16, 1.0)));
        using var tdv = Up(b, DType.F32, GradCheck.ToFloat(GradCheck.Random(v.Length, 17, 1.0)));
        var args = new AttentionArgs
        {
            Batch = batch, Tq = tq, Tkv = tkv, KvLen = tkv, NHeads = nh, NKvHeads = nkv, HeadSize = hs, HasLse = 1, Scale = scale,
        };
        tc.Backward(f16, b.Floats(tq_, "q"), b.Floats(tk, "k"), b.Floats(tv, "v"), b.F32(to, "o"), b.F32(tdo, "dO"), b.F32(tl, "lse"),
            b.F32(tdq, "dq"), b.F32(tdk, "dk"), b.F32(tdv, "dv"), args);
        // dO, P and dS are rounded to the operand type for the mma: bf16/f16 tolerance
        var (atol, rtol) = Tolerance.For(f16 ? DType.F16 : DType.BF16);
        NumericAssert.Close(edq, tdq.ToArray(), atol, rtol, "dq");
        NumericAssert.Close(edk, tdk.ToArray(), atol, rtol, "dk");
        NumericAssert.Close(edv, tdv.ToArray(), atol, rtol, "dv");
    }

    /// <summary>The CUDA path binds its self-loaded kernel with <see cref="AttentionTensorCoreKernels.Bind"/>: the same binding on the simulator runs it.</summary>
    [Fact]
    public void TheSelfLoadedLauncherBindsAndRuns()
    {
        var b = Sim.Value;
        var launch = AttentionTensorCoreKernels.Bind(b, b.Accelerator.LoadKernel(AttentionTensorCoreKernels.Method(typeof(Bf16Operand))));
        // one query at position 1 over two keys with equal scores: the output is the mean of the two value rows
        float[] q = { 0, 0 }, k = { 1, 2, 3, 4 }, v = { 2, 4, 6, 8 };
        using var tq_ = Up(b, DType.F32, q);
        using var tk = Up(b, DType.F32, k);
        using var tv = Up(b, DType.F32, v);
        using var to = b.Allocate(DType.F32, 2);
        using var tl = b.Allocate(DType.F32, 1);
        launch(new KernelConfig(1, AttentionTensorCoreKernels.Threads), b.Floats(tq_, "q"), b.Floats(tk, "k"), b.Floats(tv, "v"), b.F32(to, "o"), b.F32(tl, "lse"),
            new AttentionArgs { Batch = 1, Tq = 1, Tkv = 2, KvLen = 2, NHeads = 1, NKvHeads = 1, HeadSize = 2, HasLse = 1, Scale = 1f });
        Assert.Equal(new float[] { 4, 6 }, to.ToArray());
        Assert.Equal(MathF.Log(2), tl.ToArray()[0], 5);
    }
}
