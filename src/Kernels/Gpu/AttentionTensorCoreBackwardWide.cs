using ILGPU;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>One lane's A fragment of an m16n8k16 mma (16 rows × one k16 slice), as ldmatrix.x4 returns it.</summary>
public struct AFrag
{
    public uint R0, R1, R2, R3;
}

/// <summary>
/// The tensor-core attention backward for head sizes 65..128 (Llama-3-8B, Qwen2.5-7B: 128), by splitting the head
/// dimension of the accumulators between the warps of a group: the dk/dv kernel recomputes S and dP in each channel half,
/// the dq kernel adds the halves' partial S and dP.
/// </summary>
/// <remarks>
/// The head-64 kernels (AttentionTensorCoreBackward.cs) keep a 16 × HS accumulator per warp for each output (dq; dk
/// and dv): at HS = 128 that is 64 f32 per lane per output, 128 + 32 for S and dP in the dk/dv kernel, past the
/// 255-register limit, and 64 rows of Q and dO (or K and V) at 272 B plus the 32-row tiles need 52 KiB of shared
/// memory, past the 48 KiB of a static allocation. Here a group owns 32 rows (queries, or keys) and its four warps
/// are (row half w &amp; 1) × (channel half w &gt;&gt; 1): each warp recomputes S (and dP) for its 16 rows over the whole
/// head, which needs only shared memory, and accumulates only its 64 output channels, the same accumulator set as a
/// head-64 warp (dq kernel: 32 f32 + 32 for S, dP; dk/dv kernel: 64 + 32). Shared memory: four 32-row tiles at
/// <see cref="Ld"/> = 136 (34 KiB, 34.25 KiB with the dk/dv kernel's lse and D rows).
/// The price is FLOPs. The dk/dv kernel computes S and dP twice (once per channel half): per (query, key) pair and
/// head channel it executes 12 mma FLOPs (S 2 + dP 2, twice, + dv 2 + dk 2). The dq kernel does not: each warp holds
/// the A fragments of its 16 rows of Q and dO over its own 64 channels in registers (32 registers, read once), forms
/// partial S and dP over those channels, and the two channel halves of a row half add each other's partials through
/// shared memory (the Q and dO tiles, free once the fragments are read: 16 KiB of the 17 KiB), so it executes 6 (S 2 +
/// dP 2 + dq 2). 18·HS in all (22·HS when the dq kernel recomputed too), against 14·HS for the head-64 kernels and
/// 10·HS useful: 1.29x the mma work of a head-64-style schedule, 1.8x the useful FLOPs. The cost: ptxas keeps the
/// fragments and the unrolled slices' operands live, 232-236 registers instead of 128-134, so 2 groups per SM instead
/// of 3 (docs/kernels.md); 0 spills. Tried and not kept: only dO in registers, Q read from shared memory per slice, the S
/// partials exchanged over the dO tile and the dP partials over the V tile (one more barrier per key tile): 210-214
/// registers, still 2 groups per SM. Which wins on an H100 (40% less mma work in the dq kernel, one third fewer
/// resident warps) is not measured yet: bench gpu times this backward at head 128. Global traffic per group is
/// unchanged per row (each tile is loaded once into shared memory and read by both channel halves).
/// </remarks>
internal sealed partial class AttentionTensorCoreKernels
{
    /// <summary>Rows (queries in the dq kernel, keys in the dk/dv kernel) per group of the head-65..128 kernels.</summary>
    public const int BW = 32;
    /// <summary>dq kernel: Q, dO of 32 queries; K, V of 32 keys; rows of <see cref="Ld"/>.</summary>
    public const int WqQAt = 0, WqDoAt = BW * Ld, WqKAt = 2 * BW * Ld, WqVAt = 3 * BW * Ld, WqSharedElems = 4 * BW * Ld;
    /// <summary>dk/dv kernel: K, V of 32 keys; Q, dO of 32 queries; then lse·log2(e) and D of those queries as f32.</summary>
    public const int WkKAt = 0, WkVAt = BW * Ld, WkQAt = 2 * BW * Ld, WkDoAt = 3 * BW * Ld, WkRowAt = 4 * BW * Ld, WkSharedElems = WkRowAt + 4 * BQB;

    /// <summary>
    /// Group = (b, h, tile of 32 queries, the longest first); warp = 16 query rows × 64 channels of dq, forming S and dP
    /// over its 64 channels and adding the other channel half's partials. Writes dq and D.
    /// </summary>
    [GpuKernel(true, typeof(Bf16Operand), typeof(F16Operand), TensorCore = true)]
    public static void AttentionTensorCoreBackwardQueryWideKernel<TOp>(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> o, ArrayView<float> dOut,
        ArrayView<float> lse, ArrayView<float> delta, ArrayView<float> dq, AttentionArgs a) where TOp : struct, IMmaOperand
    {
        var sm = SharedMemory.Allocate<ushort>(WqSharedElems);
        int tid = Group.IdxX;
        int warp = tid / MmaLayout.WarpThreads, lane = tid % MmaLayout.WarpThreads;
        int half = warp & 1, c0 = (warp >> 1) * 64; // this warp's rows (16·half..) and dq channels (c0..c0+63)
        int hs = a.HeadSize, hsp = (hs + 15) & ~15;
        int tilesQ = (a.Tq + BW - 1) / BW;
        int tile = tilesQ - 1 - Grid.IdxX % tilesQ;
        int bh = Grid.IdxX / tilesQ;
        int h = bh % a.NHeads, b = bh / a.NHeads;
        int kvh = h / (a.NHeads / a.NKvHeads);
        int q0 = tile * BW;
        int prefix = a.Tkv - a.Tq; // query t sits at position prefix + t
        int maxKey = prefix + IntrinsicMath.Min(a.Tq - 1, q0 + BW - 1);
        int wRow0 = q0 + half * 16;
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

        LoadRows<TOp>(sm, WqQAt, q, qBase, qStride, q0, a.Tq, BW, hs, hsp, tid);
        LoadRows<TOp>(sm, WqDoAt, new DeviceFloats(dOut, ArrayView<ushort>.Empty, DeviceFloats.KindF32), qBase, qStride, q0, a.Tq, BW, hs, hsp, tid);
        float dA = 0f, dB = 0f; // D of this lane's two rows (both channel halves compute it; the first writes it)
        for (int d = lane & 3; d < hs; d += 4)
        {
            if (inA) dA += dOut[rA + d] * o[rA + d];
            if (inB) dB += dOut[rB + d] * o[rB + d];
        }
        dA += Warp.ShuffleXor(dA, 1);
        dA += Warp.ShuffleXor(dA, 2);
        dB += Warp.ShuffleXor(dB, 1);
        dB += Warp.ShuffleXor(dB, 2);
        if ((lane & 3) == 0 && c0 == 0)
        {
            if (inA) delta[lseRow + rowA] = dA;
            if (inB) delta[lseRow + rowB] = dB;
        }
        float lA = inA ? lse[lseRow + rowA] * Log2E : 0f, lB = inB ? lse[lseRow + rowB] * Log2E : 0f;

        var dq0 = default(MmaStrip);
        var dq1 = default(MmaStrip);
        // Q and dO of this warp's 16 rows over its 64 channels, as A fragments held in registers for the whole key loop;
        // their shared tiles then hold the S / dP partials the two channel halves exchange
        Group.Barrier();
        int qA = ARowElement(WqQAt, Ld, half * 16, c0, lane), doA = ARowElement(WqDoAt, Ld, half * 16, c0, lane);
        var q0f = ASlice(sm, qA, c0, hsp, lane);
        var q1f = ASlice(sm, qA + 16, c0 + 16, hsp, lane);
        var q2f = ASlice(sm, qA + 32, c0 + 32, hsp, lane);
        var q3f = ASlice(sm, qA + 48, c0 + 48, hsp, lane);
        var o0f = ASlice(sm, doA, c0, hsp, lane);
        var o1f = ASlice(sm, doA + 16, c0 + 16, hsp, lane);
        var o2f = ASlice(sm, doA + 32, c0 + 32, hsp, lane);
        var o3f = ASlice(sm, doA + 48, c0 + 48, hsp, lane);
        var xch = sm.Cast<float>(); // WqXchFloats per warp, over the Q and dO tiles once the fragments are read
        int mine = warp * WqXchFloats + lane, theirs = (warp ^ 2) * WqXchFloats + lane;
        int kB = BRowElement(WqKAt, Ld, 0, c0, lane), vB = BRowElement(WqVAt, Ld, 0, c0, lane), kT = BTransElement(WqKAt, Ld, 0, 0, lane);
        for (int kb = 0; kb <= maxKey; kb += BKV)
        {
            Group.Barrier(); // the previous keys' K, V and partials are read
            LoadRows<TOp>(sm, WqKAt, k, kvBase, kvStride, kb, maxKey + 1, BKV, hs, hsp, tid);
            LoadRows<TOp>(sm, WqVAt, v, kvBase, kvStride, kb, maxKey + 1, BKV, hs, hsp, tid);
            Group.Barrier();
            bool live = warpActive && kb <= warpMaxKey; // the same for both channel halves of a row half
            var s = default(MmaStrip);
            var dp = default(MmaStrip);
            if (live)
            {
                // partial S = Q·Kᵀ and dP = dO·Vᵀ over this warp's 64 channels only
                ScoreSlice<TOp>(ref s, q0f, sm, kB, c0, hsp, lane);
                ScoreSlice<TOp>(ref s, q1f, sm, kB + 16, c0 + 16, hsp, lane);
                ScoreSlice<TOp>(ref s, q2f, sm, kB + 32, c0 + 32, hsp, lane);
                ScoreSlice<TOp>(ref s, q3f, sm, kB + 48, c0 + 48, hsp, lane);
                ScoreSlice<TOp>(ref dp, o0f, sm, vB, c0, hsp, lane);
                ScoreSlice<TOp>(ref dp, o1f, sm, vB + 16, c0 + 16, hsp, lane);
                ScoreSlice<TOp>(ref dp, o2f, sm, vB + 32, c0 + 32, hsp, lane);
                ScoreSlice<TOp>(ref dp, o3f, sm, vB + 48, c0 + 48, hsp, lane);
                PutStrip(xch, mine, s);
                PutStrip(xch, mine + 16 * MmaLayout.WarpThreads, dp);
            }
            Group.Barrier();
            if (!live) continue;
            // whole-head S and dP: own + other half's partial (a sum that commutes, so both halves hold the same bits)
            AddStrip(ref s, xch, theirs);
            AddStrip(ref dp, xch, theirs + 16 * MmaLayout.WarpThreads);
            int key = kb + MmaLayout.CCol(lane, 0);
            RowDs(ref s.T0, dp.T0, key, posA, posB, scaleLog2, lA, lB, dA, dB);
            RowDs(ref s.T1, dp.T1, key + 8, posA, posB, scaleLog2, lA, lB, dA, dB);
            RowDs(ref s.T2, dp.T2, key + 16, posA, posB, scaleLog2, lA, lB, dA, dB);
            RowDs(ref s.T3, dp.T3, key + 24, posA, posB, scaleLog2, lA, lB, dA, dB);
            PFragment<TOp>(s.T0, s.T1, out uint p0, out uint p1, out uint p2, out uint p3);
            PFragment<TOp>(s.T2, s.T3, out uint p4, out uint p5, out uint p6, out uint p7);
            PvStrip<TOp>(ref dq0, sm, kT, Ld, c0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7); // dq[:, c0..c0+32) += dS·K
            if (c0 + 32 < hsp) PvStrip<TOp>(ref dq1, sm, kT, Ld, c0 + 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
        }
        if (!warpActive) return;
        int col = MmaLayout.CCol(lane, 0) + c0;
        StoreStrip(dq, dq0, rA, rB, inA, inB, col, hs, a.Scale, a.Scale);
        StoreStrip(dq, dq1, rA, rB, inA, inB, col + 32, hs, a.Scale, a.Scale);
    }

    /// <summary>Floats of S and dP partials each warp of the dq kernel exchanges per key tile: 32 per lane.</summary>
    public const int WqXchFloats = 32 * MmaLayout.WarpThreads;

    /// <summary>An A fragment (16 rows × k16 slice at channel c) read once by ldmatrix.x4; zero past the padded head.</summary>
    private static AFrag ASlice(ArrayView<ushort> sm, int element, int c, int hsp, int lane)
    {
        var f = default(AFrag);
        if (c < hsp) Ldsm4(sm, element, lane, false, out f.R0, out f.R1, out f.R2, out f.R3);
        return f;
    }

    /// <summary>acc (16 × 32) += A·Bᵀ over one k16 slice at channel c (A from registers, B rows from shared memory); nothing past the padded head.</summary>
    private static void ScoreSlice<TOp>(ref MmaStrip acc, AFrag a, ArrayView<ushort> sm, int bElement, int c, int hsp, int lane) where TOp : struct, IMmaOperand
    {
        if (c >= hsp) return;
        Ldsm4(sm, bElement, lane, false, out uint b00, out uint b01, out uint b10, out uint b11);
        Ldsm4(sm, bElement + 16 * Ld, lane, false, out uint b20, out uint b21, out uint b30, out uint b31);
        Mma<TOp>(ref acc.T0, a.R0, a.R1, a.R2, a.R3, b00, b01, lane);
        Mma<TOp>(ref acc.T1, a.R0, a.R1, a.R2, a.R3, b10, b11, lane);
        Mma<TOp>(ref acc.T2, a.R0, a.R1, a.R2, a.R3, b20, b21, lane);
        Mma<TOp>(ref acc.T3, a.R0, a.R1, a.R2, a.R3, b30, b31, lane);
    }

    /// <summary>Lane-strided store of a strip's 16 accumulators (x[at + 32·r], conflict-free).</summary>
    private static void PutStrip(ArrayView<float> x, int at, MmaStrip m)
    {
        const int W = MmaLayout.WarpThreads;
        x[at] = m.T0.C0; x[at + W] = m.T0.C1; x[at + 2 * W] = m.T0.C2; x[at + 3 * W] = m.T0.C3;
        x[at + 4 * W] = m.T1.C0; x[at + 5 * W] = m.T1.C1; x[at + 6 * W] = m.T1.C2; x[at + 7 * W] = m.T1.C3;
        x[at + 8 * W] = m.T2.C0; x[at + 9 * W] = m.T2.C1; x[at + 10 * W] = m.T2.C2; x[at + 11 * W] = m.T2.C3;
        x[at + 12 * W] = m.T3.C0; x[at + 13 * W] = m.T3.C1; x[at + 14 * W] = m.T3.C2; x[at + 15 * W] = m.T3.C3;
    }

    /// <summary>m += the strip another warp stored with <see cref="PutStrip"/> at <paramref name="at"/> (same lane).</summary>
    private static void AddStrip(ref MmaStrip m, ArrayView<float> x, int at)
    {
        const int W = MmaLayout.WarpThreads;
        m.T0.C0 += x[at]; m.T0.C1 += x[at + W]; m.T0.C2 += x[at + 2 * W]; m.T0.C3 += x[at + 3 * W];
        m.T1.C0 += x[at + 4 * W]; m.T1.C1 += x[at + 5 * W]; m.T1.C2 += x[at + 6 * W]; m.T1.C3 += x[at + 7 * W];
        m.T2.C0 += x[at + 8 * W]; m.T2.C1 += x[at + 9 * W]; m.T2.C2 += x[at + 10 * W]; m.T2.C3 += x[at + 11 * W];
        m.T3.C0 += x[at + 12 * W]; m.T3.C1 += x[at + 13 * W]; m.T3.C2 += x[at + 14 * W]; m.T3.C3 += x[at + 15 * W];
    }

    /// <summary>
    /// Group = (b, kv head g, tile of 32 keys); warp = 16 keys × 64 channels of dk and dv. Over every query head sharing g
    /// and every query that sees one of the tile's keys: dv += Pᵀ·dO, dk += dSᵀ·Q. Reads D from the dq kernel.
    /// </summary>
    [GpuKernel(true, typeof(Bf16Operand), typeof(F16Operand), TensorCore = true)]
    public static void AttentionTensorCoreBackwardKeyValueWideKernel<TOp>(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> dOut,
        ArrayView<float> lse, ArrayView<float> delta, ArrayView<float> dk, ArrayView<float> dv, AttentionArgs a) where TOp : struct, IMmaOperand
    {
        var sm = SharedMemory.Allocate<ushort>(WkSharedElems);
        var rows = sm.Cast<float>();
        int tid = Group.IdxX;
        int warp = tid / MmaLayout.WarpThreads, lane = tid % MmaLayout.WarpThreads;
        int half = warp & 1, c0 = (warp >> 1) * 64;
        int hs = a.HeadSize, hsp = (hs + 15) & ~15;
        int tLen = a.Tq, kLen = a.Tkv, prefix = kLen - tLen; // query i sees key j iff j <= prefix + i
        int tilesK = (kLen + BW - 1) / BW;
        int tile = Grid.IdxX % tilesK;
        int bg = Grid.IdxX / tilesK;
        int g = bg % a.NKvHeads, b = bg / a.NKvHeads;
        int heads = a.NHeads / a.NKvHeads;
        int j0 = tile * BW, jw = j0 + half * 16;
        bool warpActive = jw < kLen;
        long kvStride = (long)a.NKvHeads * hs, qStride = (long)a.NHeads * hs;
        long kvBase = ((long)b * kLen * a.NKvHeads + g) * hs;
        int keyA = jw + (lane >> 2), keyB = keyA + 8;
        int lseAt = WkRowAt / 2, dAt = WkRowAt / 2 + BQB;
        float scaleLog2 = a.Scale * Log2E;

        LoadRows<TOp>(sm, WkKAt, k, kvBase, kvStride, j0, kLen, BW, hs, hsp, tid);
        LoadRows<TOp>(sm, WkVAt, v, kvBase, kvStride, j0, kLen, BW, hs, hsp, tid);
        var dk0 = default(MmaStrip);
        var dk1 = default(MmaStrip);
        var dv0 = default(MmaStrip);
        var dv1 = default(MmaStrip);
        int kA = ARowElement(WkKAt, Ld, half * 16, 0, lane), vA = ARowElement(WkVAt, Ld, half * 16, 0, lane);
        int qB = BRowElement(WkQAt, Ld, 0, 0, lane), doB = BRowElement(WkDoAt, Ld, 0, 0, lane);
        int qT = BTransElement(WkQAt, Ld, 0, 0, lane), doT = BTransElement(WkDoAt, Ld, 0, 0, lane);
        var dOutF = new DeviceFloats(dOut, ArrayView<ushort>.Empty, DeviceFloats.KindF32);
        bool second = c0 + 32 < hsp;
        int iStart = IntrinsicMath.Max(0, j0 - prefix);
        for (int hh = 0; hh < heads; hh++)
        {
            int h = g * heads + hh;
            long qBase = ((long)b * tLen * a.NHeads + h) * hs;
            long lseRow = ((long)b * a.NHeads + h) * tLen;
            for (int i0 = iStart; i0 < tLen; i0 += BQB)
            {
                Group.Barrier();
                LoadRows<TOp>(sm, WkQAt, q, qBase, qStride, i0, tLen, BQB, hs, hsp, tid);
                LoadRows<TOp>(sm, WkDoAt, dOutF, qBase, qStride, i0, tLen, BQB, hs, hsp, tid);
                for (int r = tid; r < BQB; r += Threads)
                {
                    bool inside = i0 + r < tLen;
                    rows[lseAt + r] = inside ? lse[lseRow + i0 + r] * Log2E : 0f;
                    rows[dAt + r] = inside ? delta[lseRow + i0 + r] : 0f;
                }
                Group.Barrier();
                if (!warpActive || prefix + IntrinsicMath.Min(tLen - 1, i0 + BQB - 1) < jw) continue;
                var st = default(MmaStrip);
                var dpt = default(MmaStrip);
                ScoreStrip<TOp>(ref st, sm, kA, qB, hsp, lane, Ld);  // Sᵀ = K·Qᵀ over the whole head
                ScoreStrip<TOp>(ref dpt, sm, vA, doB, hsp, lane, Ld); // dPᵀ = V·dOᵀ
                int c = MmaLayout.CCol(lane, 0);
                ColumnDs(ref st.T0, ref dpt.T0, rows, c, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                ColumnDs(ref st.T1, ref dpt.T1, rows, c + 8, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                ColumnDs(ref st.T2, ref dpt.T2, rows, c + 16, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                ColumnDs(ref st.T3, ref dpt.T3, rows, c + 24, i0, keyA, keyB, tLen, prefix, scaleLog2, lseAt, dAt);
                PFragment<TOp>(st.T0, st.T1, out uint p0, out uint p1, out uint p2, out uint p3);
                PFragment<TOp>(st.T2, st.T3, out uint p4, out uint p5, out uint p6, out uint p7);
                PvStrip<TOp>(ref dv0, sm, doT, Ld, c0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7); // dv[:, c0..] += Pᵀ·dO
                if (second) PvStrip<TOp>(ref dv1, sm, doT, Ld, c0 + 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
                PFragment<TOp>(dpt.T0, dpt.T1, out p0, out p1, out p2, out p3);
                PFragment<TOp>(dpt.T2, dpt.T3, out p4, out p5, out p6, out p7);
                PvStrip<TOp>(ref dk0, sm, qT, Ld, c0, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7); // dk[:, c0..] += dSᵀ·Q
                if (second) PvStrip<TOp>(ref dk1, sm, qT, Ld, c0 + 32, hsp, lane, p0, p1, p2, p3, p4, p5, p6, p7);
            }
        }
        if (!warpActive) return;
        bool inA = keyA < kLen, inB = keyB < kLen;
        long rA = kvBase + keyA * kvStride, rB = kvBase + keyB * kvStride;
        int col = MmaLayout.CCol(lane, 0) + c0;
        StoreStrip(dk, dk0, rA, rB, inA, inB, col, hs, a.Scale, a.Scale);
        StoreStrip(dk, dk1, rA, rB, inA, inB, col + 32, hs, a.Scale, a.Scale);
        StoreStrip(dv, dv0, rA, rB, inA, inB, col, hs, 1f, 1f);
        StoreStrip(dv, dv1, rA, rB, inA, inB, col + 32, hs, 1f, 1f);
    }
}
