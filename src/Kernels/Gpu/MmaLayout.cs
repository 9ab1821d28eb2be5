namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Which lane of a 32-thread warp holds which element of the fragments of
/// <c>mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32</c>, and which shared-memory row each lane
/// hands to <c>ldmatrix.sync.aligned.m8n8.x4.shared.b16</c>. The tensor-core matmul computes every address and
/// epilogue index through these functions, and the warp emulator test (MmaFragmentEmulationTests) runs the
/// same functions against an independent emulation of the two instructions written from the PTX ISA manual,
/// so a wrong layout fails on a machine without a GPU.
/// </summary>
/// <remarks>
/// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type": groupID = lane / 4,
/// threadID_in_group = lane % 4. A (16×16, row): a0..a7 in four .b32 registers (two 16-bit halves each, the
/// lower element in the low half); row = groupID (+8 for a2,a3,a6,a7), col = 2·tig + (i &amp; 1) (+8 for a4..a7).
/// B (16×8, col): b0..b3 in two registers; row (k) = 2·tig + (i &amp; 1) (+8 for b2,b3), col (n) = groupID.
/// C/D (16×8, f32): c0..c3; row = groupID (+8 for c2,c3), col = 2·tig + (i &amp; 1).
/// ldmatrix .x4: lanes 8q..8q+7 give the row addresses of matrix q; afterwards register q of lane L holds
/// row L / 4, columns 2·(L % 4) and +1 of matrix q.
/// </remarks>
public static class MmaLayout
{
    public const int WarpThreads = 32;

    /// <summary>Row (0..15) of the C/D fragment element <paramref name="i"/> (0..3) held by <paramref name="lane"/>.</summary>
    public static int CRow(int lane, int i) => (lane >> 2) + (i >> 1) * 8;

    /// <summary>Column (0..7) of the C/D fragment element <paramref name="i"/> (0..3) held by <paramref name="lane"/>.</summary>
    public static int CCol(int lane, int i) => (lane & 3) * 2 + (i & 1);

    /// <summary>
    /// A 16×16 tile stored row-major (k contiguous) in shared memory: the row this lane addresses for an
    /// ldmatrix.x4 whose four result registers are exactly the A fragment a0..a3 (matrices: rows 0-7/k 0-7,
    /// rows 8-15/k 0-7, rows 0-7/k 8-15, rows 8-15/k 8-15).
    /// </summary>
    public static int LdmatrixARow(int lane) => (lane & 7) + ((lane >> 3) & 1) * 8;

    /// <summary>The k offset (0 or 8) this lane addresses for the A fragment ldmatrix.x4.</summary>
    public static int LdmatrixAK(int lane) => (lane >> 4) * 8;

    /// <summary>
    /// Sixteen n-rows of B stored n-major (k contiguous): the n this lane addresses for an ldmatrix.x4 whose
    /// registers are the B fragments of two n8 tiles: (r0, r1) for n 0-7 and (r2, r3) for n 8-15.
    /// </summary>
    public static int LdmatrixBRow(int lane) => (lane & 7) + (lane >> 4) * 8;

    /// <summary>The k offset (0 or 8) this lane addresses for the B fragment ldmatrix.x4.</summary>
    public static int LdmatrixBK(int lane) => ((lane >> 3) & 1) * 8;

    /// <summary>
    /// Sixteen k-rows of B stored k-major (n contiguous): the k (0..15) this lane addresses for an ldmatrix.x4.trans
    /// whose registers are the B fragments of two n8 tiles in the order <see cref="LdmatrixBRow"/> gives them
    /// (matrices: k 0-7/n 0-7, k 8-15/n 0-7, k 0-7/n 8-15, k 8-15/n 8-15; .trans hands lane L rows 2·(L%4), +1 of
    /// column L/4 = the b0, b1 pair of n = L/4).
    /// </summary>
    public static int LdmatrixBTransK(int lane) => (lane & 7) + ((lane >> 3) & 1) * 8;

    /// <summary>The n offset (0 or 8) this lane addresses for the k-major B ldmatrix.x4.trans.</summary>
    public static int LdmatrixBTransN(int lane) => (lane >> 4) * 8;
}
