using System.Reflection;
using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Shape and epilogue of one tensor-core matmul:
/// out(i, j) = Alpha · Σ_r A(i, r)·B(j, r) [+ bias(j)] [+ LoraScale · drop(i, j) · Σ_q U(i, q)·L(j, q)] [+ out(i, j) or residual(i, j)].
/// A(i, r) = a[i·Sai + r·Sar], B(j, r) = b[j·Sbj + r·Sbr] (the three training layouts without a transpose in
/// memory); U(i, q) = u[i·LoraRank + q], L(j, q) = l[j·Slj + q·Slq]; out(i, j) = out[i·Ldo + j].
/// A and B are rounded to the operand type of the kernel instantiation (bf16 or f16) and multiplied with f32 accumulation.
/// With <see cref="LoraInMma"/> the rank-r term is not added in the epilogue but reduced by the mma as more k:
/// out(i, j) = Σ_r A(i, r)·B(j, r) + Σ_q rnd(LoraScale·U(i, q))·rnd(L(j, q)) [+ bias(j)] [+ residual(i, j)], rnd = the
/// operand rounding (Alpha = 1, no dropout mask: see <see cref="MatMulTensorCoreKernels.WithLoraInMma"/>).
/// </summary>
public struct TensorCoreArgs
{
    public int M, N, R, Ldo;
    public long Sai, Sar, Sbj, Sbr;
    public float Alpha;
    public int Accumulate, HasBias;
    /// <summary>1 when runs of 4 along k of A (of B) may be read with one 16-byte (f32) or 8-byte (16-bit) load: see <see cref="MatMulTensorCoreKernels.CanVectorize"/>.</summary>
    public int VecA, VecB;
    /// <summary>1 when A's (B's) tiles go global -> shared with cp.async (sm_80+): see <see cref="MatMulTensorCoreKernels.CanCopyAsync"/>.</summary>
    public int AsyncA, AsyncB;
    /// <summary>Device addresses of element 0 of A's (B's) 16-bit view, set by the launcher for cp.async (PTX takes raw addresses; ILGPU kernels cannot take one).</summary>
    public long AddrA, AddrB;
    /// <summary>Rank of the low-rank term added in the epilogue (0: none).</summary>
    public int LoraRank;
    public long Slj, Slq;
    public float LoraScale;
    /// <summary>When Dropout != 0 the low-rank term of out(i, j) is multiplied by DropScale if DropoutHash.Keep(Seed, i·Ldo + j, DropP), else by 0.</summary>
    public int Dropout;
    public float DropP, DropScale;
    public ulong Seed;
    /// <summary>
    /// 1: the rank-r term is reduced on the tensor cores as ⌈LoraRank/32⌉ extra k steps over [LoraScale·U | L] (rounded to
    /// the operand type, zeros past rank column r), not in the f32 epilogue. Needs L(j, q) = l[j·Slj + q] and a
    /// B operand that is k contiguous (Sbr = 1).
    /// </summary>
    public int LoraInMma;
    /// <summary>1 when runs of 4 of U (of L) along q may be read with one vector load (as <see cref="VecA"/>).</summary>
    public int VecU, VecL;
}

/// <summary>The 16-bit operand type of a tensor-core matmul instantiation (a compile-time constant to ILGPU).</summary>
public interface IMmaOperand
{
    static abstract bool IsF16 { get; }
}

/// <summary>bf16 operands (8-bit exponent: the range of f32, so activations never overflow).</summary>
public struct Bf16Operand : IMmaOperand
{
    public static bool IsF16 => false;
}

/// <summary>f16 operands (3 more mantissa bits than bf16; values beyond ±65504 overflow to infinity).</summary>
public struct F16Operand : IMmaOperand
{
    public static bool IsF16 => true;
}

/// <summary>Four f32 read as one 16-byte vector load.</summary>
public struct Float4
{
    public float X, Y, Z, W;
}

/// <summary>One m16n8 accumulator fragment of a lane (see <see cref="MmaLayout"/> for which elements).</summary>
public struct MmaFrag
{
    public float C0, C1, C2, C3;
}

/// <summary>Four m16n8 accumulators side by side: one m16 × n32 strip of a warp tile.</summary>
public struct MmaStrip
{
    public MmaFrag T0, T1, T2, T3;
}

/// <summary>Sixteen 16-bit operands of one thread's share of a 128×32 tile, packed in pairs, held while the previous tile is multiplied.</summary>
public struct MmaStage
{
    // (one comment for the layout: U0/U1 hold run 0's four 16-bit values, U2/U3 run 1's, and so on)
    public uint U0, U1, U2, U3, U4, U5, U6, U7;
}

/// <summary>
/// Matmul on tensor cores: bf16 (or f16) operands, f32 accumulation, <c>mma.sync.aligned.m16n8k16</c> and
/// <c>ldmatrix</c> emitted as inline PTX; a scalar path over the same shared-memory tiles where inline PTX is
/// not available (ILGPU's CPU simulator).
/// </summary>
/// <remarks>
/// A group of 256 threads (8 warps as 2 × 4) computes a 128×128 output tile; each warp a 64×32 tile as 4 × 4
/// m16n8 fragments (64 f32 accumulators per thread). The reduction dimension advances 32 at a time through two
/// shared-memory buffers, each holding the A and B tiles as [row][k] 16-bit values with rows padded to 40
/// elements (80 bytes: the eight 16-byte rows one ldmatrix phase reads fall in distinct banks). While the
/// warps multiply one buffer, every thread already holds its 16 + 16 elements of the next tile in registers
/// (loaded, rounded and packed to 16 bits) and stores them into the other buffer afterwards: one barrier per
/// step. f32 activations are converted on the way into shared memory, so cp.async (a raw byte copy) cannot be used
/// for them (they are read 16 bytes at a time along their contiguous dimension instead); an operand already stored in
/// the operand type (the bf16 weight, both in the forward and in dx = dy·W) goes global -> shared by 16-byte
/// cp.async.cg, issued into the free buffer before the multiply and waited for (cp.async.wait_group 0) before the
/// step's barrier. Loads are coalesced along whichever operand dimension is contiguous. A B operand contiguous along n
/// (W in dx = dy·W) is kept k-major ([k][n] rows of <see cref="LdT"/>: its global rows copied as they are) and read
/// with ldmatrix.trans; an A contiguous along m is transposed by the shared-memory store.
/// The shared buffer must be the kernel's only shared allocation: the inline PTX addresses it by the name
/// ILGPU gives the first one (<c>__shared_alloca0</c>); ptxas fails on the PTX if that ever changes.
/// On CUDA the kernel is loaded from its PTX after <see cref="PtxLocalForwarding"/> (ILGPU puts every inline-asm
/// operand in a local variable: without the pass, 1040 bytes of stack and 428 LDL/STL in the SASS).
/// The LoRA forward's rank-r term can be reduced by the same mma as ⌈r/32⌉ more k steps over [s·u | B]
/// (<see cref="WithLoraInMma"/>; u and B rounded like x and W) instead of the f32 epilogue's 2·r loads per output element.
/// Matches MatMulReference within bf16/f16 operand rounding.
/// </remarks>
internal sealed class MatMulTensorCoreKernels
{
    public const int BM = 128, BN = 128, BK = 32, Ld = BK + 8, Threads = 256;
    /// <summary>
    /// Row stride of a B tile stored k-major ([k][n], for a B contiguous along n: the weight of dx = dy·W): 136 elements
    /// = 272 bytes, so the eight 16-byte rows one ldmatrix.trans phase reads start 16 bytes apart modulo 128 (distinct banks).
    /// </summary>
    public const int LdT = BN + 8;
    public const int MinGroupsPerSm = 2;
    public const int TileElems = BM * Ld;            // one operand tile in 16-bit elements (a k-major B tile, BK·LdT = 4352, fits too)
    public const int SharedElems = 2 * 2 * TileElems; // two buffers of (A, B)

    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs> _bf16, _f16;

    public MatMulTensorCoreKernels(IlgpuBackend b)
    {
        if (b.Accelerator is CudaAccelerator)
        {
            _bf16 = LoadForwarded(b, (Action<DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs>)MatMulTensorCoreKernel<Bf16Operand>);
            _f16 = LoadForwarded(b, (Action<DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs>)MatMulTensorCoreKernel<F16Operand>);
        }
        else
        {
            _bf16 = b.Accelerator.LoadStreamKernel<DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs>(MatMulTensorCoreKernel<Bf16Operand>);
            _f16 = b.Accelerator.LoadStreamKernel<DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs>(MatMulTensorCoreKernel<F16Operand>);
        }
    }

    /// <summary>
    /// The kernel's PTX as the CUDA path loads it: ILGPU's PTX with the inline-assembly local round trips forwarded
    /// (<see cref="PtxLocalForwarding"/>). PtxasTests assemble exactly this.
    /// </summary>
    public static PTXCompiledKernel CompileForwarded(PTXBackend backend, MethodInfo kernel)
    {
        var compiled = (PTXCompiledKernel)backend.Compile(EntryPointDescription.FromExplicitlyGroupedKernel(kernel), new KernelSpecialization());
        // ILGPU 1.5.3 offers no public way to build a compiled kernel from edited PTX: replace the text in place.
        var text = typeof(PTXCompiledKernel).GetField("<PTXAssembly>k__BackingField", BindingFlags.Instance | BindingFlags.NonPublic)
                   ?? throw new NotSupportedException("this ILGPU version stores PTXCompiledKernel.PTXAssembly differently; PtxLocalForwarding cannot be applied");
        // two resident groups per SM (16 warps, 128 registers per thread) hide the ldmatrix/global latency one group cannot
        // and ldmatrix / cp.async need the shared tile buffer 16-byte aligned (ILGPU declares it .align 4)
        text.SetValue(compiled, PtxLocalForwarding.AlignShared(
            PtxLocalForwarding.AddLaunchBounds(PtxLocalForwarding.Rewrite(compiled.PTXAssembly), Threads, MinGroupsPerSm), 16));
        return compiled;
    }

    private static Action<KernelConfig, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs> LoadForwarded(
        IlgpuBackend b, Delegate kernel)
    {
        var cuda = (CudaAccelerator)b.Accelerator;
        using var backend = new PTXBackend(cuda.Context, cuda.Architecture, cuda.InstructionSet, null!); // the device's target, no NVVM (as ILGPU's own loader)
        return Bind(b, b.Accelerator.LoadKernel(CompileForwarded(backend, kernel.Method)));
    }

    /// <summary>A launcher on the backend's stream for a loaded tensor-core kernel (the way ILGPU's LoadStreamKernel binds one; tested on the simulator).</summary>
    internal static Action<KernelConfig, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs> Bind(
        IlgpuBackend b, Kernel kernel)
    {
        var launch = kernel.CreateLauncherDelegate<Action<AcceleratorStream, KernelConfig, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, DeviceFloats, ArrayView<float>, DeviceFloats, TensorCoreArgs>>();
        return (config, x, w, output, residual, bias, u, loraB, p) => launch(b.Stream, config, x, w, output, residual, bias, u, loraB, p);
    }

    // 12 LDGSTS = 2 per thread per tile copy × (A [row][k], B [n][k], B k-major) × (prologue, loop)
    [GpuKernel(true, typeof(Bf16Operand), typeof(F16Operand), TensorCore = true, CpAsync = true, MinLdgsts = 12)]
    public static void MatMulTensorCoreKernel<TOp>(DeviceFloats a, DeviceFloats b, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias,
        ArrayView<float> u, DeviceFloats loraB, TensorCoreArgs p) where TOp : struct, IMmaOperand
    {
        var sm = SharedMemory.Allocate<ushort>(SharedElems);
        int tid = Group.IdxX;
        int warp = tid / MmaLayout.WarpThreads, lane = tid % MmaLayout.WarpThreads; // the mma layout is defined on 32-lane warps
        int wm = warp / 4 * 64, wn = warp % 4 * 32;
        int tilesN = (p.N + BN - 1) / BN;
        int bi = Grid.IdxX / tilesN * BM;
        int bj = Grid.IdxX % tilesN * BN;

        var acc0 = default(MmaStrip);
        var acc1 = default(MmaStrip);
        var acc2 = default(MmaStrip);
        var acc3 = default(MmaStrip);

        // Operands already in the operand type with k contiguous go global -> shared by cp.async (no registers, no
        // conversion); the others are loaded into registers, converted, and stored after the multiply.
        bool asyncA = CudaAsm.IsSupported && p.AsyncA != 0;
        bool asyncB = CudaAsm.IsSupported && p.AsyncB != 0;
        // A B that is not k-contiguous (W of dx = dy·W, x of dW) is kept k-major in shared memory, [k][n] rows of LdT:
        // a straight copy of its global rows (so cp.async can move a 16-bit one), read back with ldmatrix.trans.
        bool transB = p.Sbr != 1;
        // this lane's B ldmatrix rows at k16 = 0 of buffer 0 for the two n16 halves, and the element step per k (lane
        // constants: selecting the address per slice instead spills 4 B on sm_80)
        int bLane0 = transB ? BFragElementKMajor(0, wn, 0, 0, lane) : BFragElement(0, wn, 0, 0, lane);
        int bLane1 = transB ? BFragElementKMajor(0, wn, 1, 0, lane) : BFragElement(0, wn, 1, 0, lane);
        int bStepK = transB ? LdT : 1;
        var stA = default(MmaStage);
        var stB = default(MmaStage);
        if (asyncA) CopyTileAsync(p.AddrA, p.Sai, bi, p.M, 0, p.R, tid, 0);
        else StoreTile(sm, 0, LoadTile<TOp>(a, p.Sai, p.Sar, bi, p.M, 0, p.R, tid, p.VecA), p.Sar == 1 ? StoreRowK : StoreTransposed, tid);
        if (asyncB && transB) CopyTileAsyncKMajor(p.AddrB, p.Sbr, bj, p.N, 0, p.R, tid, TileElems);
        else if (asyncB) CopyTileAsync(p.AddrB, p.Sbj, bj, p.N, 0, p.R, tid, TileElems);
        else StoreTile(sm, TileElems, LoadTile<TOp>(b, p.Sbj, p.Sbr, bj, p.N, 0, p.R, tid, p.VecB), p.Sbr == 1 ? StoreRowK : StoreKMajor, tid);
        if (asyncA || asyncB) CpAsyncCommitAndWait();
        Group.Barrier();

        int stepsK = (p.R + BK - 1) / BK;
        // with the rank-r term in the mma, ⌈r/32⌉ more steps reduce [s·u | B] after the K steps of [x | W]
        int steps = p.LoraInMma != 0 ? stepsK + (p.LoraRank + BK - 1) / BK : stepsK;
        for (int s = 0; s < steps; s++)
        {
            int cur = (s & 1) * 2 * TileElems;
            int next = cur ^ (2 * TileElems);
            bool more = s + 1 < stepsK;
            if (s + 1 >= stepsK && s + 1 < steps)
            {
                // The next tile is one of the rank-r term: s·u (f32, rounded) and B (f32 or 16-bit) through registers
                // straight into the free buffer, both [row][k]. Stored before the multiply, so nothing stays live across
                // it (one load latency per rank step, against the K/32 steps that hide theirs).
                int q0 = (s + 1 - stepsK) * BK;
                StoreTile(sm, next, LoadRankTile<TOp>(u, p.LoraScale, bi, p.M, q0, p.LoraRank, tid, p.VecU), StoreRowK, tid);
                StoreTile(sm, next + TileElems, LoadTile<TOp>(loraB, p.Slj, 1, bj, p.N, q0, p.LoraRank, tid, p.VecL), StoreRowK, tid);
            }
            if (more)
            {
                // The other buffer is free: every warp passed the barrier that ended the step which read it.
                if (asyncA) CopyTileAsync(p.AddrA, p.Sai, bi, p.M, (s + 1) * BK, p.R, tid, next);
                else stA = LoadTile<TOp>(a, p.Sai, p.Sar, bi, p.M, (s + 1) * BK, p.R, tid, p.VecA);
                if (asyncB && transB) CopyTileAsyncKMajor(p.AddrB, p.Sbr, bj, p.N, (s + 1) * BK, p.R, tid, next + TileElems);
                else if (asyncB) CopyTileAsync(p.AddrB, p.Sbj, bj, p.N, (s + 1) * BK, p.R, tid, next + TileElems);
                else stB = LoadTile<TOp>(b, p.Sbj, p.Sbr, bj, p.N, (s + 1) * BK, p.R, tid, p.VecB);
                if (asyncA || asyncB) CpAsyncCommit();
            }
            // (ptxas keeps this a 2-trip loop since the k-major B path: unrolled by hand it spills 36 B at the 128-register cap)
            // A rank step multiplies both k16 slices, zero padding included (r = 16: one slice of zeros, 1/36 of the mma of
            // K = 576): stopping after the slices that hold rank columns costs a register, and at the 128-register cap
            // 4 B of spill on sm_80 (measured for a variable k16 bound, a bound from the total reduction length, and a break).
            for (int k16 = 0; k16 < BK; k16 += 16)
                MultiplySlice<TOp>(ref acc0, ref acc1, ref acc2, ref acc3, sm, cur, k16, wm, wn, lane, bLane0, bLane1, bStepK, transB);
            if (more)
            {
                if (!asyncA) StoreTile(sm, next, stA, p.Sar == 1 ? StoreRowK : StoreTransposed, tid);
                if (!asyncB) StoreTile(sm, next + TileElems, stB, p.Sbr == 1 ? StoreRowK : StoreKMajor, tid);
                if (asyncA || asyncB) CpAsyncWait();
            }
            Group.Barrier();
        }

        StoreStrip(p, output, residual, bias, u, loraB, acc0, bi + wm, bj + wn, lane);
        StoreStrip(p, output, residual, bias, u, loraB, acc1, bi + wm + 16, bj + wn, lane);
        StoreStrip(p, output, residual, bias, u, loraB, acc2, bi + wm + 32, bj + wn, lane);
        StoreStrip(p, output, residual, bias, u, loraB, acc3, bi + wm + 48, bj + wn, lane);
    }

    /// <summary>One k16 slice of the warp tile: tensor cores (two B ldmatrix.x4, four A strips) or the scalar path.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void MultiplySlice<TOp>(ref MmaStrip acc0, ref MmaStrip acc1, ref MmaStrip acc2, ref MmaStrip acc3, ArrayView<ushort> sm,
        int cur, int k16, int wm, int wn, int lane, int bLane0, int bLane1, int bStepK, bool transB) where TOp : struct, IMmaOperand
    {
        if (CudaAsm.IsSupported)
        {
            // = BFragElement / BFragElementKMajor (cur, wn, half, k16, lane): both are linear in cur and k16
            LdmatrixB4(cur + bLane0 + k16 * bStepK, transB, out uint b00, out uint b01, out uint b10, out uint b11);
            LdmatrixB4(cur + bLane1 + k16 * bStepK, transB, out uint b20, out uint b21, out uint b30, out uint b31);
            MmaStripStep<TOp>(ref acc0, AFragElement(cur, wm, 0, k16, lane), b00, b01, b10, b11, b20, b21, b30, b31);
            MmaStripStep<TOp>(ref acc1, AFragElement(cur, wm, 1, k16, lane), b00, b01, b10, b11, b20, b21, b30, b31);
            MmaStripStep<TOp>(ref acc2, AFragElement(cur, wm, 2, k16, lane), b00, b01, b10, b11, b20, b21, b30, b31);
            MmaStripStep<TOp>(ref acc3, AFragElement(cur, wm, 3, k16, lane), b00, b01, b10, b11, b20, b21, b30, b31);
        }
        else
        {
            ScalarStrip<TOp>(ref acc0, sm, cur, wm, wn, lane, k16, transB);
            ScalarStrip<TOp>(ref acc1, sm, cur, wm + 16, wn, lane, k16, transB);
            ScalarStrip<TOp>(ref acc2, sm, cur, wm + 32, wn, lane, k16, transB);
            ScalarStrip<TOp>(ref acc3, sm, cur, wm + 48, wn, lane, k16, transB);
        }
    }

    // ------------------------------------------------------------------ lane addressing (shared with the emulation test)

    /// <summary>
    /// The shared-memory element this lane hands to the A ldmatrix.x4 of m16 strip <paramref name="mt"/> (0..3) of the
    /// warp whose tile starts at row <paramref name="wm"/>, for the k16 slice at <paramref name="k16"/> of the buffer at <paramref name="cur"/>.
    /// </summary>
    public static int AFragElement(int cur, int wm, int mt, int k16, int lane)
        => cur + (wm + mt * 16 + MmaLayout.LdmatrixARow(lane)) * Ld + k16 + MmaLayout.LdmatrixAK(lane);

    /// <summary>
    /// The element this lane hands to the B ldmatrix.x4 of n16 half <paramref name="half"/> (0: n8 tiles 0 and 1,
    /// 1: tiles 2 and 3) of the warp whose tile starts at column <paramref name="wn"/>.
    /// </summary>
    public static int BFragElement(int cur, int wn, int half, int k16, int lane)
        => cur + TileElems + (wn + half * 16 + MmaLayout.LdmatrixBRow(lane)) * Ld + k16 + MmaLayout.LdmatrixBK(lane);

    /// <summary>
    /// The element this lane hands to the B ldmatrix.x4.trans of n16 half <paramref name="half"/> when the B tile is
    /// k-major ([k][n] rows of <see cref="LdT"/>): the same registers, in the same order, as <see cref="BFragElement"/>.
    /// </summary>
    public static int BFragElementKMajor(int cur, int wn, int half, int k16, int lane)
        => cur + TileElems + (k16 + MmaLayout.LdmatrixBTransK(lane)) * LdT + wn + half * 16 + MmaLayout.LdmatrixBTransN(lane);

    // ------------------------------------------------------------------ global -> registers -> shared

    /// <summary>The 16-bit operand bits of element i: the stored bits when the tensor already has the operand type, else rounded from f32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Bits<TOp>(DeviceFloats v, long i, long count) where TOp : struct, IMmaOperand
    {
        if (v.Kind >= DeviceFloats.KindQ8_0) return Round<TOp>(v.QuantLoad(i, count)); // dequantized in the tile load
        if (!TOp.IsF16 && v.Kind == DeviceFloats.KindBF16) return v.U16[i];
        if (TOp.IsF16 && v.Kind == DeviceFloats.KindF16) return v.U16[i];
        return Round<TOp>(v.Load(i));
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Round<TOp>(float x) where TOp : struct, IMmaOperand => TOp.IsF16 ? HalfMath.F32ToF16(x) : HalfMath.F32ToBf16(x);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Pair<TOp>(DeviceFloats v, long i0, long step, bool in0, bool in1, long count) where TOp : struct, IMmaOperand
        => (in0 ? Bits<TOp>(v, i0, count) : 0u) | ((in1 ? Bits<TOp>(v, i0 + step, count) : 0u) << 16);

    /// <summary>
    /// This thread's 16 elements of the 128-row × 32-k tile starting at (row0, k0), as four runs of 4 along the
    /// contiguous dimension (k when sk == 1, else the row): consecutive threads read consecutive addresses.
    /// </summary>
    private static MmaStage LoadTile<TOp>(DeviceFloats v, long srow, long sk, int row0, int rows, int k0, int ks, int tid, int vec) where TOp : struct, IMmaOperand
    {
        var st = default(MmaStage);
        for (int l = 0; l < 4; l++)
        {
            int idx = tid + l * Threads;
            int row, k;
            long step;
            bool in0, in1, in2, in3;
            if (sk == 1)
            {
                row = idx / (BK / 4);
                k = idx % (BK / 4) * 4;
                step = 1;
                bool rowIn = row0 + row < rows;
                in0 = rowIn && k0 + k < ks; in1 = rowIn && k0 + k + 1 < ks; in2 = rowIn && k0 + k + 2 < ks; in3 = rowIn && k0 + k + 3 < ks;
            }
            else
            {
                k = idx / (BM / 4);
                row = idx % (BM / 4) * 4;
                step = srow;
                bool kIn = k0 + k < ks;
                in0 = kIn && row0 + row < rows; in1 = kIn && row0 + row + 1 < rows; in2 = kIn && row0 + row + 2 < rows; in3 = kIn && row0 + row + 3 < rows;
            }
            long g = (long)(row0 + row) * srow + (long)(k0 + k) * sk;
            uint lo, hi;
            if (vec != 0 && in3 && v.Kind < DeviceFloats.KindQ8_0)
            {
                // the run is contiguous (sk == 1, or srow == 1 for a row-contiguous operand), g is a multiple of 4 and
                // the view starts 16-byte aligned (CanVectorize): one vector load
                if (v.Kind == DeviceFloats.KindF32)
                {
                    var f = v.F32.Cast<Float4>()[g >> 2];
                    lo = Round<TOp>(f.X) | (Round<TOp>(f.Y) << 16);
                    hi = Round<TOp>(f.Z) | (Round<TOp>(f.W) << 16);
                }
                else
                {
                    ulong d = v.U16.Cast<ulong>()[g >> 2];
                    lo = (uint)d;
                    hi = (uint)(d >> 32);
                }
            }
            else
            {
                long count = (long)rows * ks; // the operand's element count (NF4 locates its statistics from it)
                lo = Pair<TOp>(v, g, step, in0, in1, count);
                hi = Pair<TOp>(v, g + 2 * step, step, in2, in3, count);
            }
            if (l == 0) { st.U0 = lo; st.U1 = hi; }
            else if (l == 1) { st.U2 = lo; st.U3 = hi; }
            else if (l == 2) { st.U4 = lo; st.U5 = hi; }
            else { st.U6 = lo; st.U7 = hi; }
        }
        return st;
    }

    /// <summary>
    /// This thread's 16 elements of the 128-row × 32-q tile at (row0, q0) of <paramref name="scale"/>·u, u (rows, r) f32 with
    /// q contiguous, rounded to the operand type, zero past the last row and past rank column r (the padding the mma
    /// reduces over). Runs of 4 along q as <see cref="LoadTile"/>'s k-contiguous case; one 16-byte load per run when
    /// <paramref name="vec"/> (r % 4 == 0, u 16-byte aligned).
    /// </summary>
    private static MmaStage LoadRankTile<TOp>(ArrayView<float> u, float scale, int row0, int rows, int q0, int r, int tid, int vec) where TOp : struct, IMmaOperand
    {
        var st = default(MmaStage);
        for (int l = 0; l < 4; l++)
        {
            int idx = tid + l * Threads;
            int row = idx / (BK / 4), q = q0 + idx % (BK / 4) * 4;
            bool rowIn = row0 + row < rows;
            long g = (long)(row0 + row) * r + q;
            uint lo, hi;
            if (vec != 0 && rowIn && q + 3 < r)
            {
                var f = u.Cast<Float4>()[g >> 2];
                lo = Round<TOp>(scale * f.X) | (Round<TOp>(scale * f.Y) << 16);
                hi = Round<TOp>(scale * f.Z) | (Round<TOp>(scale * f.W) << 16);
            }
            else
            {
                lo = (rowIn && q < r ? Round<TOp>(scale * u[g]) : 0u) | ((rowIn && q + 1 < r ? Round<TOp>(scale * u[g + 1]) : 0u) << 16);
                hi = (rowIn && q + 2 < r ? Round<TOp>(scale * u[g + 2]) : 0u) | ((rowIn && q + 3 < r ? Round<TOp>(scale * u[g + 3]) : 0u) << 16);
            }
            if (l == 0) { st.U0 = lo; st.U1 = hi; }
            else if (l == 1) { st.U2 = lo; st.U3 = hi; }
            else if (l == 2) { st.U4 = lo; st.U5 = hi; }
            else { st.U6 = lo; st.U7 = hi; }
        }
        return st;
    }

    /// <summary>Shared layouts a loaded run can be stored in (<see cref="StoreTile"/>).</summary>
    private const int StoreRowK = 0, StoreTransposed = 1, StoreKMajor = 2;

    /// <summary>
    /// Stores what <see cref="LoadTile"/> loaded at element offset <paramref name="at"/>: runs along k as [row][k]
    /// (<see cref="StoreRowK"/>), runs along rows transposed into [row][k] (<see cref="StoreTransposed"/>: four 16-bit
    /// stores), or runs along rows as [k][row] rows of <see cref="LdT"/> (<see cref="StoreKMajor"/>: two 32-bit stores).
    /// </summary>
    private static void StoreTile(ArrayView<ushort> sm, int at, MmaStage st, int mode, int tid)
    {
        var sm32 = sm.Cast<uint>();
        for (int l = 0; l < 4; l++)
        {
            uint lo = l == 0 ? st.U0 : l == 1 ? st.U2 : l == 2 ? st.U4 : st.U6;
            uint hi = l == 0 ? st.U1 : l == 1 ? st.U3 : l == 2 ? st.U5 : st.U7;
            int idx = tid + l * Threads;
            if (mode == StoreRowK)
            {
                int e = at + idx / (BK / 4) * Ld + idx % (BK / 4) * 4; // even: two aligned 32-bit stores
                sm32[e / 2] = lo;
                sm32[e / 2 + 1] = hi;
            }
            else if (mode == StoreKMajor)
            {
                int e = at + idx / (BM / 4) * LdT + idx % (BM / 4) * 4; // k row, then 4 consecutive rows: even
                sm32[e / 2] = lo;
                sm32[e / 2 + 1] = hi;
            }
            else
            {
                int e = at + idx % (BM / 4) * 4 * Ld + idx / (BM / 4);
                sm[e] = (ushort)lo;
                sm[e + Ld] = (ushort)(lo >> 16);
                sm[e + 2 * Ld] = (ushort)hi;
                sm[e + 3 * Ld] = (ushort)(hi >> 16);
            }
        }
    }

    // ------------------------------------------------------------------ global -> shared by cp.async (sm_80+)

    /// <summary>
    /// Which 16-byte piece of a 128-row × 32-k tile thread <paramref name="tid"/> copies in pass <paramref name="pass"/>
    /// (0, 1): row and first k (a multiple of 8). Four consecutive threads cover one row's 64 bytes, so a warp reads 8
    /// rows of 64 contiguous bytes. Shared with the coverage test.
    /// </summary>
    public static (int Row, int K) AsyncPiece(int tid, int pass)
    {
        int idx = tid + pass * Threads;
        return (idx / (BK / 8), idx % (BK / 8) * 8);
    }

    /// <summary>
    /// Bytes of a piece to read: 16 inside the operand, fewer at the k tail (cp.async zero-fills the rest of the 16),
    /// 0 for a row past the last (all zeros, nothing read).
    /// </summary>
    public static int AsyncBytes(int row, int k, int rows, int ks) => row >= rows || k >= ks ? 0 : ks - k >= 8 ? 16 : (ks - k) * 2; // (no Math.Clamp: its throw is not kernel code)

    /// <summary>
    /// The tile starting at (row0, k0) of a k-contiguous 16-bit operand straight into shared memory at element
    /// <paramref name="at"/> as [row][k] rows of <see cref="Ld"/>: two 16-byte cp.async.cg per thread (L2 only: the tile
    /// is read once per group). Needs rows 16-byte aligned (<see cref="CanCopyAsync"/>); completes at the next wait.
    /// </summary>
    private static void CopyTileAsync(long base0, long srow, int row0, int rows, int k0, int ks, int tid, int at)
    {
        for (int pass = 0; pass < 2; pass++)
        {
            var (row, k) = AsyncPiece(tid, pass);
            int bytes = AsyncBytes(row0 + row, k0 + k, rows, ks);
            long g = bytes > 0 ? (long)(row0 + row) * srow + k0 + k : 0; // a zero-byte copy still names a valid address
            CpAsync16(at + row * Ld + k, base0 + g * 2, bytes);
        }
    }

    /// <summary>
    /// Which 16-byte piece of a 32-k × 128-column k-major tile thread <paramref name="tid"/> copies in pass
    /// <paramref name="pass"/> (0, 1): k row and first column (a multiple of 8). Sixteen consecutive threads cover one
    /// k row's 256 bytes, so a warp reads 2 rows of 256 contiguous bytes. Shared with the coverage test.
    /// </summary>
    public static (int K, int Col) AsyncPieceKMajor(int tid, int pass)
    {
        int idx = tid + pass * Threads;
        return (idx / (BN / 8), idx % (BN / 8) * 8);
    }

    /// <summary>
    /// The tile k0..k0+31 × col0..col0+127 of a 16-bit operand whose k rows are contiguous along the column
    /// (B(j, r) = b[r·<paramref name="sk"/> + j]: the weight W (N, K) read as dx = dy·W) straight into shared memory
    /// at <paramref name="at"/> as [k][col] rows of <see cref="LdT"/>, for ldmatrix.trans: two 16-byte cp.async.cg per
    /// thread, a column tail zero-filled, k rows past <paramref name="ks"/> all zeros. Needs sk % 8 == 0 and the tensor
    /// 16-byte aligned (<see cref="CanCopyAsync"/>).
    /// </summary>
    private static void CopyTileAsyncKMajor(long base0, long sk, int col0, int cols, int k0, int ks, int tid, int at)
    {
        for (int pass = 0; pass < 2; pass++)
        {
            var (k, col) = AsyncPieceKMajor(tid, pass);
            int bytes = AsyncBytes(k0 + k, col0 + col, ks, cols); // (whole k rows past the end, then the column tail)
            long g = bytes > 0 ? (long)(k0 + k) * sk + col0 + col : 0;
            CpAsync16(at + k * LdT + col, base0 + g * 2, bytes);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CpAsync16(int element, long global, int bytes)
    {
        Input<long> offset = element * 2L;
        Input<long> src = global;
        Input<int> size = bytes;
        CudaAsm.EmitRef("{ .reg .b64 t, g; mov.b64 t, __shared_alloca0; add.s64 t, t, %0; cvta.to.global.u64 g, %1; cp.async.cg.shared.global [t], [g], 16, %2; }",
            ref offset, ref src, ref size);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CpAsyncCommit() => CudaAsm.Emit("cp.async.commit_group;");

    /// <summary>Waits for every committed group of this thread (the barrier after it publishes them to the group).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CpAsyncWait() => CudaAsm.Emit("cp.async.wait_group 0;");

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CpAsyncCommitAndWait() => CudaAsm.Emit("cp.async.commit_group; cp.async.wait_group 0;");

    // ------------------------------------------------------------------ tensor cores (inline PTX)

    /// <summary>ldmatrix.x4 from the shared buffer at 16-bit element offset <paramref name="element"/> (this lane's row).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Ldmatrix4(int element, out uint r0, out uint r1, out uint r2, out uint r3)
    {
        Output<uint> o0 = default, o1 = default, o2 = default, o3 = default;
        Input<long> offset = element * 2L;
        CudaAsm.EmitRef("{ .reg .b64 t; mov.b64 t, __shared_alloca0; add.s64 t, t, %4; ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [t]; }",
            ref o0, ref o1, ref o2, ref o3, ref offset);
        r0 = o0.Value;
        r1 = o1.Value;
        r2 = o2.Value;
        r3 = o3.Value;
    }

    /// <summary>
    /// The B fragments' ldmatrix.x4: with <paramref name="trans"/> (a k-major tile) .trans, each 8×8 matrix delivered
    /// transposed. One instruction sequence with a (launch-uniform) predicate, not two code paths: a branch here cost the
    /// sm_80 build 4 bytes of spill at the 128-register cap.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void LdmatrixB4(int element, bool trans, out uint r0, out uint r1, out uint r2, out uint r3)
    {
        Output<uint> o0 = default, o1 = default, o2 = default, o3 = default;
        Input<long> offset = element * 2L;
        Input<int> t = trans ? 1 : 0;
        CudaAsm.EmitRef("{ .reg .b64 t; .reg .pred p; mov.b64 t, __shared_alloca0; add.s64 t, t, %4; setp.ne.s32 p, %5, 0; " +
                        "@p ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [t]; @!p ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [t]; }",
            ref o0, ref o1, ref o2, ref o3, ref offset, ref t);
        r0 = o0.Value;
        r1 = o1.Value;
        r2 = o2.Value;
        r3 = o3.Value;
    }

    /// <summary>mma.sync m16n8k16 (f32 accumulate) through inline PTX: CUDA only (the tensor-core attention shares it).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void Mma<TOp>(ref MmaFrag c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1) where TOp : struct, IMmaOperand
    {
        Output<float> d0 = default, d1 = default, d2 = default, d3 = default;
        Input<uint> ia0 = a0, ia1 = a1, ia2 = a2, ia3 = a3, ib0 = b0, ib1 = b1;
        Input<float> c0 = c.C0, c1 = c.C1, c2 = c.C2, c3 = c.C3;
        if (TOp.IsF16)
            CudaAsm.EmitRef("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};",
                ref d0, ref d1, ref d2, ref d3, ref ia0, ref ia1, ref ia2, ref ia3, ref ib0, ref ib1, ref c0, ref c1, ref c2, ref c3);
        else
            CudaAsm.EmitRef("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};",
                ref d0, ref d1, ref d2, ref d3, ref ia0, ref ia1, ref ia2, ref ia3, ref ib0, ref ib1, ref c0, ref c1, ref c2, ref c3);
        c.C0 = d0.Value;
        c.C1 = d1.Value;
        c.C2 = d2.Value;
        c.C3 = d3.Value;
    }

    /// <summary>One k16 step of an m16 × n32 strip: one ldmatrix.x4 for A, four mma against the B fragments.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void MmaStripStep<TOp>(ref MmaStrip acc, int aElement, uint b00, uint b01, uint b10, uint b11, uint b20, uint b21, uint b30, uint b31) where TOp : struct, IMmaOperand
    {
        Ldmatrix4(aElement, out uint a0, out uint a1, out uint a2, out uint a3);
        Mma<TOp>(ref acc.T0, a0, a1, a2, a3, b00, b01);
        Mma<TOp>(ref acc.T1, a0, a1, a2, a3, b10, b11);
        Mma<TOp>(ref acc.T2, a0, a1, a2, a3, b20, b21);
        Mma<TOp>(ref acc.T3, a0, a1, a2, a3, b30, b31);
    }

    // ------------------------------------------------------------------ scalar path (simulator)

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Operand<TOp>(ushort bits) where TOp : struct, IMmaOperand => TOp.IsF16 ? HalfMath.F16ToF32(bits) : HalfMath.Bf16ToF32(bits);

    /// <summary>What the four mma of one strip compute, element by element, for the elements this lane holds.</summary>
    private static void ScalarStrip<TOp>(ref MmaStrip acc, ArrayView<ushort> sm, int cur, int row0, int col0, int lane, int k16, bool transB) where TOp : struct, IMmaOperand
    {
        ScalarFrag<TOp>(ref acc.T0, sm, cur, row0, col0, lane, k16, transB);
        ScalarFrag<TOp>(ref acc.T1, sm, cur, row0, col0 + 8, lane, k16, transB);
        ScalarFrag<TOp>(ref acc.T2, sm, cur, row0, col0 + 16, lane, k16, transB);
        ScalarFrag<TOp>(ref acc.T3, sm, cur, row0, col0 + 24, lane, k16, transB);
    }

    private static void ScalarFrag<TOp>(ref MmaFrag f, ArrayView<ushort> sm, int cur, int row0, int col0, int lane, int k16, bool transB) where TOp : struct, IMmaOperand
    {
        f.C0 += ScalarDot<TOp>(sm, cur, row0 + MmaLayout.CRow(lane, 0), col0 + MmaLayout.CCol(lane, 0), k16, transB);
        f.C1 += ScalarDot<TOp>(sm, cur, row0 + MmaLayout.CRow(lane, 1), col0 + MmaLayout.CCol(lane, 1), k16, transB);
        f.C2 += ScalarDot<TOp>(sm, cur, row0 + MmaLayout.CRow(lane, 2), col0 + MmaLayout.CCol(lane, 2), k16, transB);
        f.C3 += ScalarDot<TOp>(sm, cur, row0 + MmaLayout.CRow(lane, 3), col0 + MmaLayout.CCol(lane, 3), k16, transB);
    }

    private static float ScalarDot<TOp>(ArrayView<ushort> sm, int cur, int row, int col, int k16, bool transB) where TOp : struct, IMmaOperand
    {
        float s = 0f;
        int a = cur + row * Ld + k16;
        // B(col, k) at [col][k] (row stride Ld), or k-major at [k][col] (row stride LdT)
        int b = transB ? cur + TileElems + k16 * LdT + col : cur + TileElems + col * Ld + k16, bStep = transB ? LdT : 1;
        for (int k = 0; k < 16; k++) s += Operand<TOp>(sm[a + k]) * Operand<TOp>(sm[b + k * bStep]);
        return s;
    }

    // ------------------------------------------------------------------ epilogue

    private static void StoreStrip(TensorCoreArgs p, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, ArrayView<float> u, DeviceFloats loraB,
        MmaStrip acc, int row0, int col0, int lane)
    {
        StoreFrag(p, output, residual, bias, u, loraB, acc.T0, row0, col0, lane);
        StoreFrag(p, output, residual, bias, u, loraB, acc.T1, row0, col0 + 8, lane);
        StoreFrag(p, output, residual, bias, u, loraB, acc.T2, row0, col0 + 16, lane);
        StoreFrag(p, output, residual, bias, u, loraB, acc.T3, row0, col0 + 24, lane);
    }

    private static void StoreFrag(TensorCoreArgs p, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, ArrayView<float> u, DeviceFloats loraB,
        MmaFrag f, int row0, int col0, int lane)
    {
        Store(p, output, residual, bias, u, loraB, row0 + MmaLayout.CRow(lane, 0), col0 + MmaLayout.CCol(lane, 0), f.C0);
        Store(p, output, residual, bias, u, loraB, row0 + MmaLayout.CRow(lane, 1), col0 + MmaLayout.CCol(lane, 1), f.C1);
        Store(p, output, residual, bias, u, loraB, row0 + MmaLayout.CRow(lane, 2), col0 + MmaLayout.CCol(lane, 2), f.C2);
        Store(p, output, residual, bias, u, loraB, row0 + MmaLayout.CRow(lane, 3), col0 + MmaLayout.CCol(lane, 3), f.C3);
    }

    private static void Store(TensorCoreArgs p, ArrayView<float> output, ArrayView<float> residual, DeviceFloats bias, ArrayView<float> u, DeviceFloats loraB, int i, int j, float acc)
    {
        if (i >= p.M || j >= p.N) return;
        long idx = (long)i * p.Ldo + j;
        float v = p.Alpha * acc;
        if (p.HasBias != 0) v += bias.Load(j);
        if (p.LoraRank > 0 && p.LoraInMma == 0)
        {
            float low = 0f;
            long ui = (long)i * p.LoraRank, lj = j * p.Slj;
            for (int q = 0; q < p.LoraRank; q++) low += u[ui + q] * loraB.Load(lj + q * p.Slq);
            if (p.Dropout != 0) low = DropoutHash.Keep(p.Seed, idx, p.DropP) ? low * p.DropScale : 0f;
            v += p.LoraScale * low;
        }
        if (p.Accumulate != 0) v += residual[idx]; // (the output itself for +=, or the residual stream: see Launch)
        output[idx] = v;
    }

    // ------------------------------------------------------------------ launch

    /// <summary>
    /// Launches the kernel (no validation: callers check shapes). An empty <paramref name="u"/> needs LoraRank = 0.
    /// With a <paramref name="residual"/> (laid out as the output, Ldo) the epilogue writes out = residual + ... (the
    /// residual add fused: Accumulate is set); without one, Accumulate adds the output's previous value.
    /// </summary>
    internal void Launch(bool f16, DeviceFloats a, DeviceFloats b, ArrayView<float> output, DeviceFloats bias, ArrayView<float> u, DeviceFloats loraB, TensorCoreArgs p,
        ArrayView<float> residual = default)
    {
        if (p.M == 0 || p.N == 0) return;
        if (residual.Length > 0) p.Accumulate = 1;
        else residual = output;
        if (p.AsyncA != 0) p.AddrA = a.U16.LoadEffectiveAddressAsPtr().ToInt64();
        if (p.AsyncB != 0) p.AddrB = b.U16.LoadEffectiveAddressAsPtr().ToInt64();
        long groups = (long)((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
        if (groups > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(p), $"matmul {p.M}×{p.N} needs too many groups");
        (f16 ? _f16 : _bf16)(new KernelConfig((int)groups, Threads), a, b, output, residual, bias, u, loraB, p);
    }

    /// <summary>
    /// Whether an operand's runs of 4 along its contiguous dimension can be read as one vector load (16 bytes of f32,
    /// 8 of 16-bit): k contiguous with rows a multiple of 4 elements apart, or rows contiguous with k steps a multiple
    /// of 4 (dy and x of dW = dyᵀ·x, W of dx = dy·W); the tensor starting 16-byte aligned in its (256-byte aligned)
    /// buffer, and stored as f32 or already in the operand type (a 16-bit tensor of the other type is converted element by element).
    /// </summary>
    internal static bool CanVectorize(Tensor t, long rowStride, long kStride, bool f16)
        => !t.DType.IsQuantized() && ((kStride == 1 && rowStride % 4 == 0) || (rowStride == 1 && kStride % 4 == 0)) && t.Offset % 4 == 0 &&
           (t.DType == DType.F32 || t.DType == (f16 ? DType.F16 : DType.BF16));

    /// <summary>
    /// Whether an operand's tiles can be copied to shared memory by 16-byte cp.async: stored in the operand type
    /// (bf16 for the bf16 kernel, f16 for f16; f32 activations need converting), 16-byte runs along one dimension
    /// (k contiguous with rows a multiple of 8 elements apart, or rows contiguous with k steps a multiple of 8) and the
    /// tensor starting 16-byte aligned (pool ranges are 256-byte aligned). In training: the weight W (N, K), K % 8 == 0,
    /// of the forward (k contiguous) and of dx = dy·W (rows contiguous: copied k-major, read with ldmatrix.trans).
    /// Only B has a k-major tile: an A must be k contiguous (<see cref="Vectorized"/>).
    /// </summary>
    internal static bool CanCopyAsync(Tensor t, long rowStride, long kStride, bool f16)
        => t.DType == (f16 ? DType.F16 : DType.BF16) && t.Offset % 8 == 0 &&
           ((kStride == 1 && rowStride % 8 == 0) || (rowStride == 1 && kStride % 8 == 0));

    /// <summary>
    /// Sets <see cref="TensorCoreArgs.VecA"/>/<see cref="TensorCoreArgs.VecB"/> and <see cref="TensorCoreArgs.AsyncA"/>/
    /// <see cref="TensorCoreArgs.AsyncB"/> for operands <paramref name="a"/> and <paramref name="b"/> (the kernel uses
    /// cp.async only where inline PTX runs: on the simulator the flags are ignored).
    /// </summary>
    internal static TensorCoreArgs Vectorized(TensorCoreArgs p, Tensor a, Tensor b, bool f16)
    {
        p.VecA = CanVectorize(a, p.Sai, p.Sar, f16) ? 1 : 0;
        p.VecB = CanVectorize(b, p.Sbj, p.Sbr, f16) ? 1 : 0;
        p.AsyncA = p.Sar == 1 && CanCopyAsync(a, p.Sai, p.Sar, f16) ? 1 : 0; // A's tile is [row][k] only
        p.AsyncB = CanCopyAsync(b, p.Sbj, p.Sbr, f16) ? 1 : 0;
        return p;
    }

    /// <summary>
    /// Adds the LoRA forward's rank-r term s·u·Bᵀ (<paramref name="u"/> (M, R) f32, <paramref name="loraB"/> (N, R)) to
    /// <paramref name="p"/> (y = x·Wᵀ, B operand k contiguous, Alpha = 1) as R more reduction steps of the mma:
    /// y = [x | s·u]·[W | B]ᵀ with s·u and B rounded to the operand type (bf16 or f16), R zero-padded to the 32-k step.
    /// For bf16 this is the rounding PyTorch autocast applies to PEFT's lora_B(lora_A(x)) (u and B cast to bf16 for the
    /// lora_B matmul, f32 accumulation), except that s is applied to u before its rounding instead of to the product:
    /// the same bits when s is a power of two (lora_alpha = r, 2r, r/2 ...), otherwise within one bf16 rounding of s·u.
    /// The f32 epilogue (LoraInMma = 0) stays for the SIMT path and the backward's dropout-masked term.
    /// </summary>
    internal static TensorCoreArgs WithLoraInMma(TensorCoreArgs p, Tensor u, Tensor loraB, int r, float scale, bool f16)
    {
        if (p.Sbr != 1 || p.Alpha != 1f || p.Dropout != 0)
            throw new ArgumentException($"the rank-r term goes into the mma only for y = x·Wᵀ (Sbr = 1, Alpha = 1, no mask), got Sbr={p.Sbr} Alpha={p.Alpha} Dropout={p.Dropout}", nameof(p));
        p.LoraRank = r;
        p.Slj = r;
        p.Slq = 1;
        p.LoraScale = scale;
        p.LoraInMma = 1;
        p.VecU = u.DType == DType.F32 && r % 4 == 0 && u.Offset % 4 == 0 ? 1 : 0;
        p.VecL = CanVectorize(loraB, r, 1, f16) ? 1 : 0;
        return p;
    }

    /// <summary>The tensor-core arguments of a SIMT matmul's shape and layout (no LoRA term, no dropout).</summary>
    internal static TensorCoreArgs From(MatMulArgs m) => new()
    {
        M = m.M, N = m.N, R = m.R, Ldo = m.Ldo, Sai = m.Sai, Sar = m.Sar, Sbj = m.Sbj, Sbr = m.Sbr, Alpha = m.Alpha,
        Accumulate = m.Accumulate, HasBias = m.HasBias,
    };
}
