using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Backward of the tensor-core flash attention (FlashAttention-2 style, P recomputed from the saved lse), for head
/// sizes up to <see cref="NarrowHeadSize"/> (65..<see cref="MaxBackwardHeadSize"/>: AttentionTensorCoreBackwardWide.cs):
/// dq, dk, dv overwritten, as <see cref="IBackend.AttentionBackward"/>.
/// </summary>
/// <remarks>
/// With p_ij = exp(scale·q_i·k_j − lse_i), D_i = dO_i·O_i and ds_ij = p_ij·(dO_i·v_j − D_i):
/// dq_i = scale·Σ_j ds_ij·k_j, dk_j = scale·Σ_i ds_ij·q_i, dv_j = Σ_i p_ij·dO_i (summed over the query heads of a kv head).
/// Two kernels, no atomics. The dq kernel (group = 64 queries of one head, warp = 16 of them) also writes D for the
/// second: per tile of 32 keys S = Q·Kᵀ and dP = dO·Vᵀ (A from the Q/dO rows, B from the K/V rows without
/// transpose), dS in registers, then dq += dS·K with dS's C fragments as the A operand and K read with
/// ldmatrix.trans. The dk/dv kernel (group = 64 keys of one kv head, warp = 16 keys) walks the query tiles of
/// every head sharing the kv head: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, then dv += Pᵀ·dO and dk += dSᵀ·Q, both B operands
/// read with ldmatrix.trans. These are the forward's fragment patterns (rows as A, [n][k] tiles as B, [k][n]
/// tiles as B through .trans, C fragments reused as A), proven by AttentionTensorCoreTests' emulation.
/// Q, K, V, dO and the P/dS operands are rounded to the operand type; accumulation, softmax and D are f32.
/// Rows are padded to <see cref="LdB"/> = 72 16-bit elements (144 B, an odd number of 16-byte units).
/// </remarks>
internal sealed partial class AttentionTensorCoreKernels : IDisposable
{
    /// <summary>Head sizes up to <see cref="NarrowHeadSize"/> run the kernels here; up to <see cref="MaxBackwardHeadSize"/> the head-split ones (AttentionTensorCoreBackwardWide.cs).</summary>
    public const int NarrowHeadSize = 64, MaxBackwardHeadSize = MaxHeadSize, LdB = NarrowHeadSize + 8;
    /// <summary>dq kernel: Q and dO of 64 queries, K and V of 32 keys.</summary>
    public const int DqQAt = 0, DqDoAt = BQ * LdB, DqKAt = 2 * BQ * LdB, DqVAt = DqKAt + BKV * LdB, DqSharedElems = DqVAt + BKV * LdB;
    /// <summary>dk/dv kernel: K and V of 64 keys, Q and dO of 32 queries, then lse·log2(e) and D of those queries as f32.</summary>
    public const int BKB = Warps * 16, BQB = 32;
    public const int KvKAt = 0, KvVAt = BKB * LdB, KvQAt = 2 * BKB * LdB, KvDoAt = KvQAt + BQB * LdB, KvRowAt = KvDoAt + BQB * LdB,
        KvSharedElems = KvRowAt + 4 * BQB;

    private Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>? _dqBf16, _dqF16;
    private Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>? _dkvBf16, _dkvF16;
    private Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>? _dqWideBf16, _dqWideF16, _dkvWideBf16, _dkvWideF16;
    private MemoryBuffer1D<float, Stride1D.Dense>? _delta;

    /// <summary>Group = (b, h, tile of 64 queries, the longest first); warp = 16 query rows. Writes dq and D = rowsum(dO ⊙ O).</summary>
    [GpuKernel(true, typeof(Bf16Operand), typeof(F16Operand), TensorCore = true)]
    public static void AttentionTensorCoreBackwardQueryKernel<TOp>(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> o, ArrayView<float> dOut,
        ArrayView<float> lse, ArrayView<float> delta, ArrayView<float> dq, AttentionArgs a) where TOp : struct, IMmaOperand
    {
        var sm = SharedMemory.Allocate<ushort>(DqSharedElems);
        int tid = Group.IdxX;
        int warp = tid / MmaLayout.WarpThreads, lane = tid % MmaLayout.WarpThreads;
        int hs = a.HeadSize, hsp = (hs + 15) & ~15;
        int tilesQ = (a.Tq + BQ - 1) / BQ;
        int tile = tilesQ - 1 - Grid.IdxX % tilesQ;
        int bh = Grid.IdxX / tilesQ;
        int h = bh % a.NHeads, b = bh / a.NHeads;
        int kvh = h / (a.NHeads / a.NKvHeads);
        int q0 = tile * BQ;
        int prefix = a.Tkv - a.Tq; // query t sits at position prefix + t
        int maxKey = prefix + IntrinsicMath.Min(a.Tq - 1, q0 + BQ - 1);
        int wRow0 = q0 + warp * 16;
        bool warpActive = wRow0 < a.Tq;
        int warpMaxKey = prefix + IntrinsicMath.Min(a.Tq - 1, wRow0 + 15);
        long qStride = (long)a.NHeads * hs, kvStride = (long)a.NKvHeads * hs;
        long qBase = ((long)b * a.Tq * a.NHeads + h) * hs;
        long kvBase = ((long)b * a.Tkv * a.NKvHeads + kvh) * hs;
        long lseRow = ((long)b * a.NHeads + h) * a.Tq;
        int rowA = wRow0 + (lane >> 2), rowB = rowA + 8;
        int posA = prefix + rowA, posB = prefix + rowB;
        bool inA = rowA < a.Tq, inB = rowB < a.Tq;
        long rA = qBase + rowA * qStride, rB = qBase + rowB * qStride;
        float scaleLog2 = a.Scale * Log2E;

        LoadRows<TOp>(sm, DqQAt, q, qBase, qStride, q0, a.Tq, BQ, hs, hsp, tid, LdB);
        LoadRows<TOp>(sm, DqDoAt, new DeviceFloats(dOut, ArrayView<ushort>.Empty, DeviceFloats.KindF32), qBase, qStride, q0, a.Tq, BQ, hs, hsp, tid, LdB);
        // D and lse of this lane's two rows: the quad splits the channels
        float dA = 0f, dB = 0f;
        for (int d = lane & 3; d < hs; d += 4)
        {
            if (inA) dA += dOut[rA + d] * o[rA + d];
            if (inB) dB += dOut[rB + d] * o[rB + d];
        }
        dA += Warp.ShuffleXor(dA, 1);
        dA += Warp.ShuffleXor(dA, 2);
        dB += Warp.ShuffleXor(dB, 1);
        dB += Warp.ShuffleXor(dB, 2);
        if ((lane & 3) == 0)
        {
            if (inA) delta[lseRow + rowA] = dA;
            if (inB) delta[lseRow + rowB] = dB;
        }
        float lA = inA ? lse[lseRow + rowA] * Log2E : 0f, lB = inB ? lse[lseRow + rowB] * Log2E : 0f;

        var dq0 = default(MmaStrip);
        var dq1 = default(MmaStrip);
        int qA = ARowElement(DqQAt, LdB, warp * 16, 0, lane), doA = ARowElement(DqDoAt, LdB, warp * 16, 0, lane);
        int kB = BRowElement(DqKAt, LdB, 0, 0, lane), vB = BRowElement(DqVAt, LdB, 0, 0, lane), kT = BTransElement(DqKAt, LdB, 0, 0, lane);
        for (int kb = 0; kb <= maxKey; kb += BKV)
        {
            Group.Barrier();
            LoadRows<TOp>(sm, DqKAt, k, kvBase, kvStride, kb, maxKey + 1, BKV, hs, hsp, tid, LdB);
            LoadRows<TOp>(sm, DqVAt, v, kvBase, kvStride, kb, maxKey + 1, BKV, hs, hsp, tid, LdB);
            Group.Barrier();
            if (!warpActive || kb > warpMaxKey) continue;
            var s = default(MmaStrip);
            var dp = default(MmaStrip);
            ScoreStrip<TOp>(ref s, sm, qA, kB, hsp, lane);   // S = Q·Kᵀ
            ScoreStrip<TOp>(ref dp, sm, doA, vB, hsp, lane); // dP = dO·Vᵀ
            int key = kb + MmaLayout.CCol(lane, 0);
            RowDs(ref s.T0, dp.T0, key, posA, posB, scaleLog2, lA, lB, dA, dB);
            RowDs(ref s.T1, dp.T1, key + 8, posA, posB, scaleLog2, lA, lB, dA, dB);
            RowDs(ref s.T2, dp.T2, key + 16, posA, posB, scaleLog2, lA, lB, dA, dB);
            RowDs(ref s.T3, dp.T3, key + 24, posA, posB, scaleLog2, lA, lB, dA, dB);
            PFragment<TOp>(s.T0, s.T1, out uint p0, out uint p1, out uint p2, out uint p3);
            PFragment<TOp>(s.T2, s.T3, out uint p4, out uint p5, out uint p6, out uint p7);
            PvStrip<TOp>(ref dq0, sm, kT, LdB, 0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7); // dq += dS·K
            if (hsp > 32) PvStrip<TOp>(ref dq1, sm, kT, LdB, 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
        }
        if (!warpActive) return;
        int col = MmaLayout.CCol(lane, 0);
        StoreStrip(dq, dq0, rA, rB, inA, inB, col, hs, a.Scale, a.Scale);
        StoreStrip(dq, dq1, rA, rB, inA, inB, col + 32, hs, a.Scale, a.Scale);
    }

    /// <summary>
    /// Group = (b, kv head g, tile of 64 keys); warp = 16 keys. Over every query head sharing g and every query
    /// that sees one of the tile's keys: dv += Pᵀ·dO, dk += dSᵀ·Q. Reads D from the dq kernel.
    /// </summary>
    [GpuKernel(true, typeof(Bf16Operand), typeof(F16Operand), TensorCore = true)]
    public static void AttentionTensorCoreBackwardKeyValueKernel<TOp>(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> dOut,
        ArrayView<float> lse, ArrayView<float> delta, ArrayView<float> dk, ArrayView<float> dv, AttentionArgs a) where TOp : struct, IMmaOperand
    {
        var sm = SharedMemory.Allocate<ushort>(KvSharedElems);
        var rows = sm.Cast<float>();
        int tid = Group.IdxX;
        int warp = tid / MmaLayout.WarpThreads, lane = tid % MmaLayout.WarpThreads;
        int hs = a.HeadSize, hsp = (hs + 15) & ~15;
        int tLen = a.Tq, kLen = a.Tkv, prefix = kLen - tLen; // query i sees key j iff j <= prefix + i
        int tilesK = (kLen + BKB - 1) / BKB;
        int tile = Grid.IdxX % tilesK; // the first keys are seen by the most queries: they start first
        int bg = Grid.IdxX / tilesK;
        int g = bg % a.NKvHeads, b = bg / a.NKvHeads;
        int heads = a.NHeads / a.NKvHeads;
        int j0 = tile * BKB, jw = j0 + warp * 16;
        bool warpActive = jw < kLen;
        long kvStride = (long)a.NKvHeads * hs, qStride = (long)a.NHeads * hs;
        long kvBase = ((long)b * kLen * a.NKvHeads + g) * hs;
        int keyA = jw + (lane >> 2), keyB = keyA + 8; // the rows of this lane's C fragments are keys
        int lseAt = KvRowAt / 2, dAt = KvRowAt / 2 + BQB;
        float scaleLog2 = a.Scale * Log2E;

        LoadRows<TOp>(sm, KvKAt, k, kvBase, kvStride, j0, kLen, BKB, hs, hsp, tid, LdB);
        LoadRows<TOp>(sm, KvVAt, v, kvBase, kvStride, j0, kLen, BKB, hs, hsp, tid, LdB);
        var dk0 = default(MmaStrip);
        var dk1 = default(MmaStrip);
        var dv0 = default(MmaStrip);
        var dv1 = default(MmaStrip);
        int kA = ARowElement(KvKAt, LdB, warp * 16, 0, lane), vA = ARowElement(KvVAt, LdB, warp * 16, 0, lane);
        int qB = BRowElement(KvQAt, LdB, 0, 0, lane), doB = BRowElement(KvDoAt, LdB, 0, 0, lane);
        int qT = BTransElement(KvQAt, LdB, 0, 0, lane), doT = BTransElement(KvDoAt, LdB, 0, 0, lane);
        var dOutF = new DeviceFloats(dOut, ArrayView<ushort>.Empty, DeviceFloats.KindF32);
        int iStart = IntrinsicMath.Max(0, j0 - prefix);
        for (int hh = 0; hh < heads; hh++)
        {
            int h = g * heads + hh;
            long qBase = ((long)b * tLen * a.NHeads + h) * hs;
            long lseRow = ((long)b * a.NHeads + h) * tLen;
            for (int i0 = iStart; i0 < tLen; i0 += BQB)
            {
                Group.Barrier();
                LoadRows<TOp>(sm, KvQAt, q, qBase, qStride, i0, tLen, BQB, hs, hsp, tid, LdB);
                LoadRows<TOp>(sm, KvDoAt, dOutF, qBase, qStride, i0, tLen, BQB, hs, hsp, tid, LdB);
                for (int r = tid; r < BQB; r += Threads)
                {
                    bool inside = i0 + r < tLen;
                    rows[lseAt + r] = inside ? lse[lseRow + i0 + r] * Log2E : 0f;
                    rows[dAt + r] = inside ? delta[lseRow + i0 + r] : 0f;
                }
                Group.Barrier();
                if (!warpActive || prefix + IntrinsicMath.Min(tLen - 1, i0 + BQB - 1) < jw) continue; // no query of the tile sees the warp's keys
                var st = default(MmaStrip);
                var dpt = default(MmaStrip);
                ScoreStrip<TOp>(ref st, sm, kA, qB, hsp, lane);  // Sᵀ = K·Qᵀ
                ScoreStrip<TOp>(ref dpt, sm, vA, doB, hsp, lane); // dPᵀ = V·dOᵀ
                int c = MmaLayout.CCol(lane, 0);
                ColumnDs(ref st.T0, ref dpt.T0, rows, c, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                ColumnDs(ref st.T1, ref dpt.T1, rows, c + 8, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                ColumnDs(ref st.T2, ref dpt.T2, rows, c + 16, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                ColumnDs(ref st.T3, ref dpt.T3, rows, c + 24, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                PFragment<TOp>(st.T0, st.T1, out uint p0, out uint p1, out uint p2, out uint p3);
                PFragment<TOp>(st.T2, st.T3, out uint p4, out uint p5, out uint p6, out uint p7);
                PvStrip<TOp>(ref dv0, sm, doT, LdB, 0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7); // dv += Pᵀ·dO
                if (hsp > 32) PvStrip<TOp>(ref dv1, sm, doT, LdB, 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
                PFragment<TOp>(dpt.T0, dpt.T1, out p0, out p1, out p2, out p3);
                PFragment<TOp>(dpt.T2, dpt.T3, out p4, out p5, out p6, out p7);
                PvStrip<TOp>(ref dk0, sm, qT, LdB, 0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7); // dk += dSᵀ·Q
                if (hsp > 32) PvStrip<TOp>(ref dk1, sm, qT, LdB, 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
            }
        }
        if (!warpActive) return;
        bool inA = keyA < kLen, inB = keyB < kLen;
        long rA = kvBase + keyA * kvStride, rB = kvBase + keyB * kvStride;
        int col = MmaLayout.CCol(lane, 0);
        StoreStrip(dk, dk0, rA, rB, inA, inB, col, hs, a.Scale, a.Scale);
        StoreStrip(dk, dk1, rA, rB, inA, inB, col + 32, hs, a.Scale, a.Scale);
        StoreStrip(dv, dv0, rA, rB, inA, inB, col, hs, 1f, 1f);
        StoreStrip(dv, dv1, rA, rB, inA, inB, col + 32, hs, 1f, 1f);
    }

    /// <summary>acc (16 × 32) += A·Bᵀ over the head: per k16 slice one ldmatrix.x4 of A rows, two of B rows, four mma.</summary>
    private static void ScoreStrip<TOp>(ref MmaStrip acc, ArrayView<ushort> sm, int aElement, int bElement, int hsp, int lane, int ld = LdB) where TOp : struct, IMmaOperand
    {
        for (int k16 = 0; k16 < hsp; k16 += 16)
        {
            Ldsm4(sm, aElement + k16, lane, false, out uint a0, out uint a1, out uint a2, out uint a3);
            Ldsm4(sm, bElement + k16, lane, false, out uint b00, out uint b01, out uint b10, out uint b11);
            Ldsm4(sm, bElement + 16 * ld + k16, lane, false, out uint b20, out uint b21, out uint b30, out uint b31);
            Mma<TOp>(ref acc.T0, a0, a1, a2, a3, b00, b01, lane);
            Mma<TOp>(ref acc.T1, a0, a1, a2, a3, b10, b11, lane);
            Mma<TOp>(ref acc.T2, a0, a1, a2, a3, b20, b21, lane);
            Mma<TOp>(ref acc.T3, a0, a1, a2, a3, b30, b31, lane);
        }
    }

    /// <summary>Rows are queries (dq kernel): s becomes ds = p·(dp − D_row), p = 2^(s·scale·log2e − lse_row·log2e), 0 for future keys.</summary>
    private static void RowDs(ref MmaFrag s, MmaFrag dp, int key, int posA, int posB, float scaleLog2, float lA, float lB, float dA, float dB)
    {
        s.C0 = key <= posA ? Exp2(s.C0 * scaleLog2 - lA) * (dp.C0 - dA) : 0f;
        s.C1 = key + 1 <= posA ? Exp2(s.C1 * scaleLog2 - lA) * (dp.C1 - dA) : 0f;
        s.C2 = key <= posB ? Exp2(s.C2 * scaleLog2 - lB) * (dp.C2 - dB) : 0f;
        s.C3 = key + 1 <= posB ? Exp2(s.C3 * scaleLog2 - lB) * (dp.C3 - dB) : 0f;
    }

    /// <summary>
    /// Rows are keys, columns queries (dk/dv kernel): s becomes pᵀ and dp becomes dsᵀ = p·(dp − D_col); 0 where the
    /// query is past the end or does not see the key.
    /// </summary>
    private static void ColumnDs(ref MmaFrag s, ref MmaFrag dp, ArrayView<float> rows, int c, int i0, int keyA, int keyB, int tLen, int prefix,
        float scaleLog2, int lseAt, int dAt)
    {
        int i = i0 + c;
        bool in0 = i < tLen, in1 = i + 1 < tLen;
        float l0 = rows[lseAt + c], l1 = rows[lseAt + c + 1], d0 = rows[dAt + c], d1 = rows[dAt + c + 1];
        float p0 = in0 && keyA <= prefix + i ? Exp2(s.C0 * scaleLog2 - l0) : 0f;
        float p1 = in1 && keyA <= prefix + i + 1 ? Exp2(s.C1 * scaleLog2 - l1) : 0f;
        float p2 = in0 && keyB <= prefix + i ? Exp2(s.C2 * scaleLog2 - l0) : 0f;
        float p3 = in1 && keyB <= prefix + i + 1 ? Exp2(s.C3 * scaleLog2 - l1) : 0f;
        s.C0 = p0;
        s.C1 = p1;
        s.C2 = p2;
        s.C3 = p3;
        dp.C0 = p0 * (dp.C0 - d0);
        dp.C1 = p1 * (dp.C1 - d1);
        dp.C2 = p2 * (dp.C2 - d0);
        dp.C3 = p3 * (dp.C3 - d1);
    }

    // ------------------------------------------------------------------ launch

    /// <summary>Whether the tensor-core backward takes this call: as <see cref="Takes"/> (head size ≤ 128).</summary>
    internal static bool TakesBackward(bool tensorCores, Tensor q, Tensor k, Tensor v, int headSize)
        => headSize <= MaxBackwardHeadSize && Takes(tensorCores, q, k, v, headSize);

    private void LoadBackward()
    {
        if (_dqBf16 is not null) return;
        if (_b.Accelerator is CudaAccelerator cuda)
        {
            using var backend = new ILGPU.Backends.PTX.PTXBackend(cuda.Context, cuda.Architecture, cuda.InstructionSet, null!);
            _dqF16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(true, typeof(F16Operand)))));
            _dkvF16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(false, typeof(F16Operand)))));
            _dkvBf16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(false, typeof(Bf16Operand)))));
            _dqWideF16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(true, typeof(F16Operand), wide: true))));
            _dkvWideF16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(false, typeof(F16Operand), wide: true))));
            _dkvWideBf16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(false, typeof(Bf16Operand), wide: true))));
            _dqWideBf16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(true, typeof(Bf16Operand), wide: true))));
            _dqBf16 = BindBackward(_b, _b.Accelerator.LoadKernel(CompileForwarded(backend, BackwardMethod(true, typeof(Bf16Operand)))));
            return;
        }
        var acc = _b.Accelerator;
        _dqF16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardQueryKernel<F16Operand>);
        _dkvF16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardKeyValueKernel<F16Operand>);
        _dkvBf16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardKeyValueKernel<Bf16Operand>);
        _dqWideF16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardQueryWideKernel<F16Operand>);
        _dkvWideF16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardKeyValueWideKernel<F16Operand>);
        _dkvWideBf16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardKeyValueWideKernel<Bf16Operand>);
        _dqWideBf16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardQueryWideKernel<Bf16Operand>);
        _dqBf16 = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionTensorCoreBackwardQueryKernel<Bf16Operand>);
    }

    internal static System.Reflection.MethodInfo BackwardMethod(bool query, Type op, bool wide = false) =>
        typeof(AttentionTensorCoreKernels).GetMethod(wide
            ? query ? nameof(AttentionTensorCoreBackwardQueryWideKernel) : nameof(AttentionTensorCoreBackwardKeyValueWideKernel)
            : query ? nameof(AttentionTensorCoreBackwardQueryKernel) : nameof(AttentionTensorCoreBackwardKeyValueKernel))!.MakeGenericMethod(op);

    private static Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs> BindBackward(
        IlgpuBackend b, Kernel kernel)
    {
        var launch = kernel.CreateLauncherDelegate<Action<AcceleratorStream, KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>>();
        return (config, q, k, v, x0, x1, x2, x3, x4, a) => launch(b.Stream, config, q, k, v, x0, x1, x2, x3, x4, a);
    }

    /// <summary>Launches dq (and D) then dk/dv (shapes validated by the caller, as <see cref="AttentionKernels.Backward"/> does).</summary>
    internal void Backward(bool f16, DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> output, ArrayView<float> dOut, ArrayView<float> lse,
        ArrayView<float> dq, ArrayView<float> dk, ArrayView<float> dv, AttentionArgs a)
    {
        if (a.Batch == 0 || a.Tq == 0) return;
        if (a.HeadSize > MaxBackwardHeadSize) throw new ArgumentException($"AttentionBackward: head size {a.HeadSize} exceeds {MaxBackwardHeadSize} for the tensor-core kernels");
        LoadBackward();
        long rowsCount = (long)a.Batch * a.NHeads * a.Tq;
        if (_delta is null || _delta.Length < rowsCount)
        {
            _delta?.Dispose();
            _delta = _b.Accelerator.Allocate1D<float>(rowsCount); // D = rowsum(dO ⊙ O), grows once to the largest shape
        }
        if (a.HeadSize > NarrowHeadSize)
        {
            // head 65..128: 32 rows per group, the head split between warp pairs (AttentionTensorCoreBackwardWide.cs)
            long dqWide = (long)a.Batch * a.NHeads * ((a.Tq + BW - 1) / BW);
            long kvWide = (long)a.Batch * a.NKvHeads * ((a.Tkv + BW - 1) / BW);
            (f16 ? _dqWideF16 : _dqWideBf16)!(new KernelConfig(IlgpuBackend.CheckedCount(dqWide, "AttentionBackward"), Threads), q, k, v, output, dOut, lse, _delta.View, dq, a);
            (f16 ? _dkvWideF16 : _dkvWideBf16)!(new KernelConfig(IlgpuBackend.CheckedCount(kvWide, "AttentionBackward"), Threads), q, k, v, dOut, lse, _delta.View, dk, dv, a);
            return;
        }
        long dqGroups = (long)a.Batch * a.NHeads * ((a.Tq + BQ - 1) / BQ);
        long kvGroups = (long)a.Batch * a.NKvHeads * ((a.Tkv + BKB - 1) / BKB);
        (f16 ? _dqF16 : _dqBf16)!(new KernelConfig(IlgpuBackend.CheckedCount(dqGroups, "AttentionBackward"), Threads), q, k, v, output, dOut, lse, _delta.View, dq, a);
        (f16 ? _dkvF16 : _dkvBf16)!(new KernelConfig(IlgpuBackend.CheckedCount(kvGroups, "AttentionBackward"), Threads), q, k, v, dOut, lse, _delta.View, dk, dv, a);
    }

    public void Dispose() => _delta?.Dispose();
}
