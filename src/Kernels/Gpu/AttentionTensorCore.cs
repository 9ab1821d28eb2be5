using System.Reflection;
using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Causal grouped-query flash attention forward on tensor cores (FlashAttention-2 style): bf16 (or f16) Q, K, V
/// operands, f32 accumulation and an online softmax held in registers. Same contract as
/// <see cref="IBackend.AttentionForward"/>: out(B, Tq, NH, HS), lse(B, NH, Tq) = log Σ_j exp(scale·q·k_j).
/// </summary>
/// <remarks>
/// A group of 4 warps owns 64 query rows of one (batch, head); warp w owns rows 16w..16w+15, the M of the mma.
/// Q is rounded to the operand type once into shared memory; tiles of 32 keys and values stream through shared
/// memory (rounded on the way, f32 or 16-bit sources). Per key tile each warp computes S = Q·Kᵀ (16 × 32, one
/// m16 × n32 strip: per k16 slice of the head one ldmatrix.x4 of Q and two of K, four m16n8k16 mma), masks the
/// causal triangle, updates the running max and sum of its rows (the four lanes of a quad hold one row: two
/// xor-shuffles), and then multiplies P·V without leaving registers: the C fragments of S, exponentiated and
/// packed in pairs, are the A fragments of P·V (<see cref="PFragment"/>), and V is read with ldmatrix.x4.trans
/// from its [key][channel] tile as the B fragments. The output accumulator (16 × HS per warp, up to 64 f32 per
/// lane) stays in registers; the row sum is kept per lane and reduced over the quad once at the end.
/// Rows are padded to <see cref="Ld"/> = 136 16-bit elements (272 B: the eight rows of one ldmatrix phase fall in
/// distinct banks); head sizes that are not a multiple of 16 are zero-padded in shared memory.
/// Where inline PTX is unavailable (ILGPU's CPU simulator), ldmatrix and mma are emulated lane by lane with warp
/// shuffles (<see cref="Ldsm4"/>, <see cref="Mma"/>), so the simulator runs the same fragment bookkeeping; the
/// layouts themselves are proven by AttentionTensorCoreEmulationTests against the PTX ISA tables.
/// Saves lse for the backward. Needs a 32-lane warp. Matches AttentionReference within bf16/f16 rounding of
/// Q, K, V and P.
/// </remarks>
internal sealed partial class AttentionTensorCoreKernels
{
    public const int Warps = 4, Threads = Warps * MmaLayout.WarpThreads, BQ = Warps * 16, BKV = 32, MaxHeadSize = 128;
    public const int Ld = MaxHeadSize + 8;
    public const int QAt = 0, KAt = BQ * Ld, VAt = KAt + BKV * Ld, SharedElems = VAt + BKV * Ld;
    /// <summary>Resident groups per SM the register budget is set for (ptxas launch bounds): 3 × 4 warps, ≤ 168 registers.</summary>
    public const int MinGroupsPerSm = 3, MinGroupsPerSmBackward = 2;
    private const float Log2E = 1.44269504088896340736f, Ln2 = 0.693147180559945309417f;

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs> _bf16, _f16;

    public AttentionTensorCoreKernels(IlgpuBackend b)
    {
        if (b.WarpSize != MmaLayout.WarpThreads)
            throw new NotSupportedException($"{b.Name}: the tensor-core attention needs {MmaLayout.WarpThreads}-lane warps (warp size {b.WarpSize})");
        _b = b;
        if (b.Accelerator is CudaAccelerator cuda)
        {
            using var backend = new PTXBackend(cuda.Context, cuda.Architecture, cuda.InstructionSet, null!); // the device's target, no NVVM
            _bf16 = Bind(b, b.Accelerator.LoadKernel(CompileForwarded(backend, Method(typeof(Bf16Operand)))));
            _f16 = Bind(b, b.Accelerator.LoadKernel(CompileForwarded(backend, Method(typeof(F16Operand)))));
        }
        else
        {
            _bf16 = b.Accelerator.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreForwardKernel<Bf16Operand>);
            _f16 = b.Accelerator.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreForwardKernel<F16Operand>);
        }
    }

    internal static MethodInfo Method(Type op) =>
        typeof(AttentionTensorCoreKernels).GetMethod(nameof(AttentionTensorCoreForwardKernel))!.MakeGenericMethod(op);

    /// <summary>The PTX the CUDA path loads: ILGPU's, with the inline-asm local round trips forwarded, launch bounds added and the shared tile buffer 16-byte aligned (PtxasTests assemble exactly this).</summary>
    public static PTXCompiledKernel CompileForwarded(PTXBackend backend, MethodInfo kernel)
    {
        var compiled = (PTXCompiledKernel)backend.Compile(EntryPointDescription.FromExplicitlyGroupedKernel(kernel), new KernelSpecialization());
        var text = typeof(PTXCompiledKernel).GetField("<PTXAssembly>k__BackingField", BindingFlags.Instance | BindingFlags.NonPublic)
                   ?? throw new NotSupportedException("this ILGPU version stores PTXCompiledKernel.PTXAssembly differently; PtxLocalForwarding cannot be applied");
        // the backward kernels hold two accumulator sets (dq: S and dP; dk/dv: dk and dv): two groups per SM, up to 255 registers
        int minGroups = kernel.Name.StartsWith("AttentionTensorCoreBackward", StringComparison.Ordinal) ? MinGroupsPerSmBackward : MinGroupsPerSm;
        // ldmatrix needs 16-byte aligned shared addresses; ILGPU declares the buffer .align 4 (see PtxLocalForwarding.AlignShared)
        text.SetValue(compiled, PtxLocalForwarding.AlignShared(
            PtxLocalForwarding.AddLaunchBounds(PtxLocalForwarding.Rewrite(compiled.PTXAssembly), Threads, minGroups), 16));
        return compiled;
    }

    /// <summary>A launcher on the backend's stream for a self-loaded kernel (as ILGPU's LoadStreamKernel binds one).</summary>
    internal static Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs> Bind(IlgpuBackend b, Kernel kernel)
    {
        var launch = kernel.CreateLauncherDelegate<Action<AcceleratorStream, KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs>>();
        return (config, q, k, v, output, lse, a) => launch(b.Stream, config, q, k, v, output, lse, a);
    }

    /// <summary>Group = (b, h, tile of <see cref="BQ"/> queries, the longest tiles first); warp = 16 query rows.</summary>
    [GpuKernel(true, typeof(Bf16Operand), typeof(F16Operand), TensorCore = true)]
    public static void AttentionTensorCoreForwardKernel<TOp>(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> output, ArrayView<float> lse,
        AttentionArgs a) where TOp : struct, IMmaOperand
    {
        var sm = SharedMemory.Allocate<ushort>(SharedElems);
        int tid = Group.IdxX;
        int warp = tid / MmaLayout.WarpThreads, lane = tid % MmaLayout.WarpThreads;
        int hs = a.HeadSize, hsp = (hs + 15) & ~15;
        int tilesQ = (a.Tq + BQ - 1) / BQ;
        int tile = tilesQ - 1 - Grid.IdxX % tilesQ; // causal: the last query tiles see the most keys, start them first
        int bh = Grid.IdxX / tilesQ;
        int h = bh % a.NHeads, b = bh / a.NHeads;
        int kvh = h / (a.NHeads / a.NKvHeads);
        int q0 = tile * BQ;
        int offset = a.KvLen - a.Tq; // query t sits at position offset + t
        int maxKey = offset + IntrinsicMath.Min(a.Tq - 1, q0 + BQ - 1);
        int wRow0 = q0 + warp * 16;
        bool warpActive = wRow0 < a.Tq;
        int warpMaxKey = offset + IntrinsicMath.Min(a.Tq - 1, wRow0 + 15);
        long qStride = (long)a.NHeads * hs, kvStride = (long)a.NKvHeads * hs;
        long qBase = ((long)b * a.Tq * a.NHeads + h) * hs;
        long kvBase = ((long)b * a.Tkv * a.NKvHeads + kvh) * hs;
        int rowA = wRow0 + (lane >> 2), rowB = rowA + 8; // the two rows of this lane's C fragments
        int posA = offset + rowA, posB = offset + rowB;
        float scaleLog2 = a.Scale * Log2E;

        LoadRows<TOp>(sm, QAt, q, qBase, qStride, q0, a.Tq, BQ, hs, hsp, tid);
        var o0 = default(MmaStrip);
        var o1 = default(MmaStrip);
        var o2 = default(MmaStrip);
        var o3 = default(MmaStrip);
        float mA = float.NegativeInfinity, mB = float.NegativeInfinity, lA = 0f, lB = 0f; // running max (log2 units) and this lane's share of the sum
        int qRow = QFragElement(warp, 0, lane), kRow = KFragElement(0, 0, lane), vRow = VFragElement(0, 0, lane);

        for (int kb = 0; kb <= maxKey; kb += BKV)
        {
            Group.Barrier(); // the previous tile is consumed (and Q is visible on the first pass)
            LoadRows<TOp>(sm, KAt, k, kvBase, kvStride, kb, maxKey + 1, BKV, hs, hsp, tid);
            LoadRows<TOp>(sm, VAt, v, kvBase, kvStride, kb, maxKey + 1, BKV, hs, hsp, tid);
            Group.Barrier();
            if (!warpActive || kb > warpMaxKey) continue; // warp-uniform: every key of the tile is in the future of all 16 rows

            // S = Q·Kᵀ for 16 rows × 32 keys
            var s = default(MmaStrip);
            for (int k16 = 0; k16 < hsp; k16 += 16)
            {
                Ldsm4(sm, qRow + k16, lane, false, out uint a0, out uint a1, out uint a2, out uint a3);     // = QFragElement(warp, k16, lane)
                Ldsm4(sm, kRow + k16, lane, false, out uint b00, out uint b01, out uint b10, out uint b11); // = KFragElement(0, k16, lane)
                Ldsm4(sm, kRow + 16 * Ld + k16, lane, false, out uint b20, out uint b21, out uint b30, out uint b31); // = KFragElement(1, k16, lane)
                Mma<TOp>(ref s.T0, a0, a1, a2, a3, b00, b01, lane);
                Mma<TOp>(ref s.T1, a0, a1, a2, a3, b10, b11, lane);
                Mma<TOp>(ref s.T2, a0, a1, a2, a3, b20, b21, lane);
                Mma<TOp>(ref s.T3, a0, a1, a2, a3, b30, b31, lane);
            }
            int key = kb + MmaLayout.CCol(lane, 0);
            Mask(ref s.T0, key, posA, posB, scaleLog2);
            Mask(ref s.T1, key + 8, posA, posB, scaleLog2);
            Mask(ref s.T2, key + 16, posA, posB, scaleLog2);
            Mask(ref s.T3, key + 24, posA, posB, scaleLog2);

            // online softmax: the quad (lanes 4g..4g+3) holds rows g and g + 8
            float tA = MathF.Max(MathF.Max(MathF.Max(s.T0.C0, s.T0.C1), MathF.Max(s.T1.C0, s.T1.C1)), MathF.Max(MathF.Max(s.T2.C0, s.T2.C1), MathF.Max(s.T3.C0, s.T3.C1)));
            float tB = MathF.Max(MathF.Max(MathF.Max(s.T0.C2, s.T0.C3), MathF.Max(s.T1.C2, s.T1.C3)), MathF.Max(MathF.Max(s.T2.C2, s.T2.C3), MathF.Max(s.T3.C2, s.T3.C3)));
            tA = MathF.Max(tA, Warp.ShuffleXor(tA, 1));
            tA = MathF.Max(tA, Warp.ShuffleXor(tA, 2));
            tB = MathF.Max(tB, Warp.ShuffleXor(tB, 1));
            tB = MathF.Max(tB, Warp.ShuffleXor(tB, 2));
            // finite: key 0 is in the first tile and every row sees it, so m is finite from then on
            float nA = MathF.Max(mA, tA), nB = MathF.Max(mB, tB);
            float cA = Exp2(mA - nA), cB = Exp2(mB - nB); // 0 on the first tile
            mA = nA;
            mB = nB;
            lA = lA * cA + Exponentiate(ref s.T0, nA, nB, out float sB0) + Exponentiate(ref s.T1, nA, nB, out float sB1)
                 + Exponentiate(ref s.T2, nA, nB, out float sB2) + Exponentiate(ref s.T3, nA, nB, out float sB3);
            lB = lB * cB + sB0 + sB1 + sB2 + sB3;
            Rescale(ref o0, cA, cB);
            Rescale(ref o1, cA, cB);
            Rescale(ref o2, cA, cB);
            Rescale(ref o3, cA, cB);

            // O += P·V: the C fragments of S are the A fragments of P (keys 0-15 from n8 tiles 0 and 1, keys 16-31 from 2 and 3)
            PFragment<TOp>(s.T0, s.T1, out uint p0, out uint p1, out uint p2, out uint p3);
            PFragment<TOp>(s.T2, s.T3, out uint p4, out uint p5, out uint p6, out uint p7);
            PvStrip<TOp>(ref o0, sm, vRow, Ld, 0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
            if (hsp > 32) PvStrip<TOp>(ref o1, sm, vRow, Ld, 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
            if (hsp > 64) PvStrip<TOp>(ref o2, sm, vRow, Ld, 64, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
            if (hsp > 96) PvStrip<TOp>(ref o3, sm, vRow, Ld, 96, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
        }

        lA += Warp.ShuffleXor(lA, 1);
        lA += Warp.ShuffleXor(lA, 2);
        lB += Warp.ShuffleXor(lB, 1);
        lB += Warp.ShuffleXor(lB, 2);
        if (!warpActive) return;
        float iA = 1f / lA, iB = 1f / lB;
        bool inA = rowA < a.Tq, inB = rowB < a.Tq;
        long outA = qBase + rowA * qStride, outB = qBase + rowB * qStride;
        int col = MmaLayout.CCol(lane, 0);
        StoreStrip(output, o0, outA, outB, inA, inB, col, hs, iA, iB);
        StoreStrip(output, o1, outA, outB, inA, inB, col + 32, hs, iA, iB);
        StoreStrip(output, o2, outA, outB, inA, inB, col + 64, hs, iA, iB);
        StoreStrip(output, o3, outA, outB, inA, inB, col + 96, hs, iA, iB);
        if (a.HasLse != 0 && (lane & 3) == 0)
        {
            long lseRow = ((long)b * a.NHeads + h) * a.Tq;
            if (inA) lse[lseRow + rowA] = mA * Ln2 + MathF.Log(lA);
            if (inB) lse[lseRow + rowB] = mB * Ln2 + MathF.Log(lB);
        }
    }

    // ------------------------------------------------------------------ lane addressing (shared with the emulation test)

    /// <summary>The element this lane hands to the ldmatrix.x4 of Q's A fragment: rows 16·warp.., channels k16..k16+15.</summary>
    public static int QFragElement(int warp, int k16, int lane) => ARowElement(QAt, Ld, warp * 16, k16, lane);

    /// <summary>The element this lane hands to the ldmatrix.x4 of K's B fragments for keys 16·half..16·half+15 (two n8 tiles), channels k16...</summary>
    public static int KFragElement(int half, int k16, int lane) => BRowElement(KAt, Ld, half, k16, lane);

    /// <summary>The element this lane hands to the ldmatrix.x4.trans of V's B fragments for keys 16·keyHalf.., channels d0..d0+15.</summary>
    public static int VFragElement(int keyHalf, int d0, int lane) => BTransElement(VAt, Ld, keyHalf, d0, lane);

    /// <summary>A fragment from a [row][k] tile at <paramref name="at"/> (row stride <paramref name="ld"/>): rows row0..row0+15, k16..k16+15.</summary>
    public static int ARowElement(int at, int ld, int row0, int k16, int lane)
        => at + (row0 + MmaLayout.LdmatrixARow(lane)) * ld + k16 + MmaLayout.LdmatrixAK(lane);

    /// <summary>B fragments of two n8 tiles from an [n][k] tile: n = 16·half..16·half+15, k16..k16+15 (ldmatrix without .trans).</summary>
    public static int BRowElement(int at, int ld, int half, int k16, int lane)
        => at + (half * 16 + MmaLayout.LdmatrixBRow(lane)) * ld + k16 + MmaLayout.LdmatrixBK(lane);

    /// <summary>B fragments of two n8 tiles from a [k][n] tile: k = 16·keyHalf.., n = d0..d0+15 (ldmatrix .trans).</summary>
    public static int BTransElement(int at, int ld, int keyHalf, int d0, int lane)
        => at + (keyHalf * 16 + VTransRow(lane)) * ld + d0 + VTransCol(lane);

    /// <summary>
    /// The key row (0..15 within a k16 slice) this lane addresses for the ldmatrix.x4.trans that reads V from its
    /// [key][channel] tile as the B fragments of two n8 channel tiles: matrices (keys 0-7, ch 0-7), (keys 8-15, ch 0-7),
    /// (keys 0-7, ch 8-15), (keys 8-15, ch 8-15) give registers (b0, b1) of channels 0-7 and (b0, b1) of channels 8-15.
    /// </summary>
    public static int VTransRow(int lane) => (lane & 7) + ((lane >> 3) & 1) * 8;

    /// <summary>The channel offset (0 or 8) this lane addresses for the V ldmatrix.x4.trans.</summary>
    public static int VTransCol(int lane) => (lane >> 4) * 8;

    /// <summary>
    /// The A fragment (registers a0..a3) of P over the 16 keys covered by two adjacent n8 accumulator tiles of S:
    /// a0 = row g keys 2t, 2t+1 = (lo.C0, lo.C1); a1 = row g+8 = (lo.C2, lo.C3); a2, a3 the same from the second tile
    /// (keys 8 + 2t, 9 + 2t), each pair rounded to the operand type with the lower key in the low half.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void PFragment<TOp>(MmaFrag lo, MmaFrag hi, out uint a0, out uint a1, out uint a2, out uint a3) where TOp : struct, IMmaOperand
    {
        a0 = Pack<TOp>(lo.C0, lo.C1);
        a1 = Pack<TOp>(lo.C2, lo.C3);
        a2 = Pack<TOp>(hi.C0, hi.C1);
        a3 = Pack<TOp>(hi.C2, hi.C3);
    }

    // ------------------------------------------------------------------ softmax pieces

    /// <summary>Scales the scores to log2 units and sets those of future keys (key &gt; position of the row) to −∞.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Mask(ref MmaFrag f, int key, int posA, int posB, float scaleLog2)
    {
        f.C0 = key <= posA ? f.C0 * scaleLog2 : float.NegativeInfinity;
        f.C1 = key + 1 <= posA ? f.C1 * scaleLog2 : float.NegativeInfinity;
        f.C2 = key <= posB ? f.C2 * scaleLog2 : float.NegativeInfinity;
        f.C3 = key + 1 <= posB ? f.C3 * scaleLog2 : float.NegativeInfinity;
    }

    /// <summary>p = 2^(s − m) in place; returns the row-A sum, the row-B sum in <paramref name="sumB"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Exponentiate(ref MmaFrag f, float mA, float mB, out float sumB)
    {
        f.C0 = Exp2(f.C0 - mA);
        f.C1 = Exp2(f.C1 - mA);
        f.C2 = Exp2(f.C2 - mB);
        f.C3 = Exp2(f.C3 - mB);
        sumB = f.C2 + f.C3;
        return f.C0 + f.C1;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Rescale(ref MmaStrip o, float cA, float cB)
    {
        o.T0.C0 *= cA; o.T0.C1 *= cA; o.T0.C2 *= cB; o.T0.C3 *= cB;
        o.T1.C0 *= cA; o.T1.C1 *= cA; o.T1.C2 *= cB; o.T1.C3 *= cB;
        o.T2.C0 *= cA; o.T2.C1 *= cA; o.T2.C2 *= cB; o.T2.C3 *= cB;
        o.T3.C0 *= cA; o.T3.C1 *= cA; o.T3.C2 *= cB; o.T3.C3 *= cB;
    }

    /// <summary>O[:, d0..d0+32) += P·V[:, d0..d0+32): per k16 slice of keys one ldmatrix.x4.trans per 16 channels, two mma.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PvStrip<TOp>(ref MmaStrip o, ArrayView<ushort> sm, int vRow, int ld, int d0, int hsp, int lane,
        uint p0, uint p1, uint p2, uint p3, uint p4, uint p5, uint p6, uint p7) where TOp : struct, IMmaOperand
    {
        Ldsm4(sm, vRow + d0, lane, true, out uint v0, out uint v1, out uint v2, out uint v3); // = VFragElement(0, d0, lane)
        Mma<TOp>(ref o.T0, p0, p1, p2, p3, v0, v1, lane);
        Mma<TOp>(ref o.T1, p0, p1, p2, p3, v2, v3, lane);
        Ldsm4(sm, vRow + 16 * ld + d0, lane, true, out v0, out v1, out v2, out v3);          // = VFragElement(1, d0, lane)
        Mma<TOp>(ref o.T0, p4, p5, p6, p7, v0, v1, lane);
        Mma<TOp>(ref o.T1, p4, p5, p6, p7, v2, v3, lane);
        if (d0 + 16 >= hsp) return; // channels past the padded head size: nothing loaded there
        Ldsm4(sm, vRow + d0 + 16, lane, true, out v0, out v1, out v2, out v3);
        Mma<TOp>(ref o.T2, p0, p1, p2, p3, v0, v1, lane);
        Mma<TOp>(ref o.T3, p0, p1, p2, p3, v2, v3, lane);
        Ldsm4(sm, vRow + 16 * ld + d0 + 16, lane, true, out v0, out v1, out v2, out v3);
        Mma<TOp>(ref o.T2, p4, p5, p6, p7, v0, v1, lane);
        Mma<TOp>(ref o.T3, p4, p5, p6, p7, v2, v3, lane);
    }

    private static void StoreStrip(ArrayView<float> output, MmaStrip o, long outA, long outB, bool inA, bool inB, int col, int hs, float iA, float iB)
    {
        StoreFrag(output, o.T0, outA, outB, inA, inB, col, hs, iA, iB);
        StoreFrag(output, o.T1, outA, outB, inA, inB, col + 8, hs, iA, iB);
        StoreFrag(output, o.T2, outA, outB, inA, inB, col + 16, hs, iA, iB);
        StoreFrag(output, o.T3, outA, outB, inA, inB, col + 24, hs, iA, iB);
    }

    private static void StoreFrag(ArrayView<float> output, MmaFrag f, long outA, long outB, bool inA, bool inB, int col, int hs, float iA, float iB)
    {
        if (inA && col < hs) output[outA + col] = f.C0 * iA;
        if (inA && col + 1 < hs) output[outA + col + 1] = f.C1 * iA;
        if (inB && col < hs) output[outB + col] = f.C2 * iB;
        if (inB && col + 1 < hs) output[outB + col + 1] = f.C3 * iB;
    }

    // ------------------------------------------------------------------ global -> shared

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Bits<TOp>(DeviceFloats v, long i) where TOp : struct, IMmaOperand
    {
        if (!TOp.IsF16 && v.Kind == DeviceFloats.KindBF16) return v.U16[i];
        if (TOp.IsF16 && v.Kind == DeviceFloats.KindF16) return v.U16[i];
        float x = v.Load(i);
        return TOp.IsF16 ? HalfMath.F32ToF16(x) : HalfMath.F32ToBf16(x);
    }

    /// <summary>
    /// Rows row0..row0+rows of a (·, HS) head slice (row r at base + r·stride) into shared memory at <paramref name="at"/>
    /// as [row][channel] 16-bit values, in pairs; channels hs..hsp and rows at or past <paramref name="end"/> are zero.
    /// </summary>
    private static void LoadRows<TOp>(ArrayView<ushort> sm, int at, DeviceFloats src, long base_, long stride, int row0, int end, int rows,
        int hs, int hsp, int tid, int ld = Ld) where TOp : struct, IMmaOperand
    {
        var sm32 = sm.Cast<uint>();
        int pairs = hsp / 2;
        for (int e = tid; e < rows * pairs; e += Threads)
        {
            int r = e / pairs, d = e % pairs * 2;
            int row = row0 + r;
            bool rowIn = row < end;
            long g = base_ + row * stride + d;
            uint lo = rowIn && d < hs ? Bits<TOp>(src, g) : 0u;
            uint hi = rowIn && d + 1 < hs ? Bits<TOp>(src, g + 1) : 0u;
            sm32[(at + r * ld + d) / 2] = lo | (hi << 16);
        }
    }

    // ------------------------------------------------------------------ instructions: inline PTX, or emulated lane by lane

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Exp2(float x)
    {
        if (!CudaAsm.IsSupported) return MathF.Exp(x * Ln2);
        Output<float> r = default;
        Input<float> i = x;
        CudaAsm.EmitRef("ex2.approx.ftz.f32 %0, %1;", ref r, ref i);
        return r.Value;
    }

    /// <summary>Two f32 rounded to the operand type, <paramref name="lo"/> in the low half (cvt.rn.{bf16,f16}x2.f32 takes the high operand first).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Pack<TOp>(float lo, float hi) where TOp : struct, IMmaOperand
    {
        if (!CudaAsm.IsSupported)
            return TOp.IsF16 ? HalfMath.F32ToF16(lo) | ((uint)HalfMath.F32ToF16(hi) << 16) : HalfMath.F32ToBf16(lo) | ((uint)HalfMath.F32ToBf16(hi) << 16);
        Output<uint> r = default;
        Input<float> h = hi, l = lo;
        if (TOp.IsF16) CudaAsm.EmitRef("cvt.rn.f16x2.f32 %0, %1, %2;", ref r, ref h, ref l);
        else CudaAsm.EmitRef("cvt.rn.bf16x2.f32 %0, %1, %2;", ref r, ref h, ref l);
        return r.Value;
    }

    /// <summary>
    /// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 with this lane's row address at 16-bit element
    /// <paramref name="element"/> of the shared buffer. Emulated: lanes 8q..8q+7 address the rows of matrix q;
    /// without .trans lane L receives row L/4, columns 2(L%4) and +1 of matrix q; with .trans rows 2(L%4) and +1 of column L/4.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Ldsm4(ArrayView<ushort> sm, int element, int lane, bool trans, out uint r0, out uint r1, out uint r2, out uint r3)
    {
        if (CudaAsm.IsSupported)
        {
            Output<uint> o0 = default, o1 = default, o2 = default, o3 = default;
            Input<long> offset = element * 2L;
            if (trans)
                CudaAsm.EmitRef("{ .reg .b64 t; mov.b64 t, __shared_alloca0; add.s64 t, t, %4; ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [t]; }",
                    ref o0, ref o1, ref o2, ref o3, ref offset);
            else
                CudaAsm.EmitRef("{ .reg .b64 t; mov.b64 t, __shared_alloca0; add.s64 t, t, %4; ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [t]; }",
                    ref o0, ref o1, ref o2, ref o3, ref offset);
            r0 = o0.Value;
            r1 = o1.Value;
            r2 = o2.Value;
            r3 = o3.Value;
            return;
        }
        r0 = EmulatedLdmatrix(sm, element, lane, 0, trans);
        r1 = EmulatedLdmatrix(sm, element, lane, 1, trans);
        r2 = EmulatedLdmatrix(sm, element, lane, 2, trans);
        r3 = EmulatedLdmatrix(sm, element, lane, 3, trans);
    }

    private static uint EmulatedLdmatrix(ArrayView<ushort> sm, int element, int lane, int matrix, bool trans)
    {
        if (!trans)
        {
            int row = Warp.Shuffle(element, 8 * matrix + (lane >> 2));
            return sm[row + 2 * (lane & 3)] | ((uint)sm[row + 2 * (lane & 3) + 1] << 16);
        }
        int row0 = Warp.Shuffle(element, 8 * matrix + 2 * (lane & 3));
        int row1 = Warp.Shuffle(element, 8 * matrix + 2 * (lane & 3) + 1);
        return sm[row0 + (lane >> 2)] | ((uint)sm[row1 + (lane >> 2)] << 16);
    }

    /// <summary>
    /// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: c += A·B. Emulated with shuffles from the
    /// fragment tables (A row g / g+8, k pairs in a0..a3; B k pairs in b0, b1 at column g; C rows g, g+8, columns 2t, 2t+1).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Mma<TOp>(ref MmaFrag c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1, int lane) where TOp : struct, IMmaOperand
    {
        if (CudaAsm.IsSupported)
        {
            MatMulTensorCoreKernels.Mma<TOp>(ref c, a0, a1, a2, a3, b0, b1);
            return;
        }
        int g = lane >> 2, t = lane & 3;
        for (int kp = 0; kp < 8; kp++) // k = 2·kp, 2·kp + 1
        {
            int src = g * 4 + (kp & 3);
            uint rowA = Warp.Shuffle(kp < 4 ? a0 : a2, src);     // row g
            uint rowB = Warp.Shuffle(kp < 4 ? a1 : a3, src);     // row g + 8
            uint col0 = Warp.Shuffle(kp < 4 ? b0 : b1, 2 * t * 4 + (kp & 3));       // column 2t
            uint col1 = Warp.Shuffle(kp < 4 ? b0 : b1, (2 * t + 1) * 4 + (kp & 3)); // column 2t + 1
            c.C0 += Dot2<TOp>(rowA, col0);
            c.C1 += Dot2<TOp>(rowA, col1);
            c.C2 += Dot2<TOp>(rowB, col0);
            c.C3 += Dot2<TOp>(rowB, col1);
        }
    }

    private static float Dot2<TOp>(uint x, uint y) where TOp : struct, IMmaOperand
        => Operand<TOp>((ushort)x) * Operand<TOp>((ushort)y) + Operand<TOp>((ushort)(x >> 16)) * Operand<TOp>((ushort)(y >> 16));

    private static float Operand<TOp>(ushort bits) where TOp : struct, IMmaOperand => TOp.IsF16 ? HalfMath.F16ToF32(bits) : HalfMath.Bf16ToF32(bits);

    // ------------------------------------------------------------------ launch

    /// <summary>
    /// Whether the tensor-core forward takes this call: tensor cores in use (<paramref name="tensorCores"/>: CUDA sm_80+),
    /// q, k and v all bf16 or all f16, head size ≤ 128. Anything else runs the SIMT kernels, which widen 16-bit inputs.
    /// </summary>
    internal static bool Takes(bool tensorCores, Tensor q, Tensor k, Tensor v, int headSize)
        => tensorCores && headSize <= MaxHeadSize && (q.DType is DType.BF16 or DType.F16) && k.DType == q.DType && v.DType == q.DType;

    /// <summary>Launches the forward (shapes validated by the caller, as <see cref="AttentionKernels.Forward"/> does).</summary>
    internal void Forward(bool f16, DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> output, ArrayView<float> lse, AttentionArgs a)
    {
        if (a.Batch == 0 || a.Tq == 0) return;
        if (a.HeadSize > MaxHeadSize) throw new ArgumentException($"AttentionForward: head size {a.HeadSize} exceeds {MaxHeadSize} for the tensor-core kernel");
        long groups = (long)a.Batch * a.NHeads * ((a.Tq + BQ - 1) / BQ);
        (f16 ? _f16 : _bf16)(new KernelConfig(IlgpuBackend.CheckedCount(groups, "AttentionForward"), Threads), q, k, v, output, lse, a);
    }
}
