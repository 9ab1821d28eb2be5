using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// Proof of the tensor-core matmul's fragment layouts without a GPU. A 32-lane warp is emulated here with
/// <c>ldmatrix.sync.aligned.m8n8.x4.shared.b16</c> and <c>mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32</c>
/// written from the PTX ISA manual's fragment tables (sections "Warp-level matrix load instruction: ldmatrix"
/// and "Matrix Fragments for mma.m16n8k16 with floating point type"), independently of
/// <see cref="MmaLayout"/>. The kernel's own lane addressing (<see cref="MatMulTensorCoreKernels.AFragElement"/>,
/// <see cref="MatMulTensorCoreKernels.BFragElement"/>), its register-to-tile pairing and its epilogue indices
/// (<see cref="MmaLayout.CRow"/>/<see cref="MmaLayout.CCol"/>) then drive the emulator over a whole warp tile
/// and must reproduce a reference matmul bit for bit (small integers: every sum is exact).
/// </summary>
public class MmaFragmentEmulationTests
{
    private const int Lanes = 32;

    // ---------------------------------------------------------------- the instructions, from the PTX ISA tables

    /// <summary>
    /// ldmatrix .x4 .b16 (no .trans): lanes 8q..8q+7 supply the addresses of rows 0..7 of matrix q (each row
    /// 8 contiguous 16-bit elements); afterwards each lane L holds, in its register q, the two elements of row
    /// L/4 of matrix q at columns 2·(L%4) and 2·(L%4)+1, the lower column in the lower half.
    /// </summary>
    internal static uint[,] Ldmatrix4(ushort[] shared, int[] laneAddress)
    {
        var r = new uint[Lanes, 4];
        for (int q = 0; q < 4; q++)
        for (int lane = 0; lane < Lanes; lane++)
        {
            int row = lane / 4, col = 2 * (lane % 4);
            int address = laneAddress[8 * q + row];
            r[lane, q] = shared[address + col] | ((uint)shared[address + col + 1] << 16);
        }
        return r;
    }

    /// <summary>
    /// ldmatrix .x4 .trans .b16: lanes 8q..8q+7 supply the addresses of rows 0..7 of matrix q; each lane L receives,
    /// in register q, the elements of rows 2·(L%4) and 2·(L%4)+1 at column L/4 (the matrix read column-major), the
    /// first in the lower half.
    /// </summary>
    internal static uint[,] LdmatrixTrans4(ushort[] shared, int[] laneAddress)
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

    // (row, col) of a0..a7 for groupID g = lane/4, threadID_in_group t = lane%4: the manual's table for .bf16/.f16 A.
    private static (int Row, int Col) AElement(int lane, int i)
    {
        int g = lane / 4, t = lane % 4;
        return i switch
        {
            0 => (g, 2 * t), 1 => (g, 2 * t + 1), 2 => (g + 8, 2 * t), 3 => (g + 8, 2 * t + 1),
            4 => (g, 2 * t + 8), 5 => (g, 2 * t + 9), 6 => (g + 8, 2 * t + 8), _ => (g + 8, 2 * t + 9),
        };
    }

    // (k, n) of b0..b3.
    private static (int K, int N) BElement(int lane, int i)
    {
        int g = lane / 4, t = lane % 4;
        return i switch { 0 => (2 * t, g), 1 => (2 * t + 1, g), 2 => (2 * t + 8, g), _ => (2 * t + 9, g) };
    }

    // (row, col) of c0..c3 / d0..d3.
    private static (int Row, int Col) CElement(int lane, int i)
    {
        int g = lane / 4, t = lane % 4;
        return i switch { 0 => (g, 2 * t), 1 => (g, 2 * t + 1), 2 => (g + 8, 2 * t), _ => (g + 8, 2 * t + 1) };
    }

    private static ushort Half(uint reg, int which) => (ushort)(which == 0 ? reg : reg >> 16);

    /// <summary>D = A·B + C for one warp: gathers the 16×16 A, 16×8 B and 16×8 C from the lanes' registers, multiplies, scatters D.</summary>
    internal static float[,] Mma(uint[,] a, uint[,] b, float[,] c)
    {
        var am = new float[16, 16];
        var bm = new float[16, 8];
        var cm = new float[16, 8];
        for (int lane = 0; lane < Lanes; lane++)
        {
            for (int i = 0; i < 8; i++)
            {
                var (row, col) = AElement(lane, i);
                am[row, col] = HalfBits.Bf16ToF32(Half(a[lane, i / 2], i % 2));
            }
            for (int i = 0; i < 4; i++)
            {
                var (k, n) = BElement(lane, i);
                bm[k, n] = HalfBits.Bf16ToF32(Half(b[lane, i / 2], i % 2));
                var (row, col) = CElement(lane, i);
                cm[row, col] = c[lane, i];
            }
        }
        var d = new float[Lanes, 4];
        for (int lane = 0; lane < Lanes; lane++)
        for (int i = 0; i < 4; i++)
        {
            var (row, col) = CElement(lane, i);
            double s = cm[row, col];
            for (int k = 0; k < 16; k++) s += (double)am[row, k] * bm[k, col];
            d[lane, i] = (float)s;
        }
        return d;
    }

    // ---------------------------------------------------------------- the kernel's warp, on the emulator

    /// <summary>
    /// One warp of the tensor-core kernel over one shared buffer: for each k16 slice two B ldmatrix.x4 (registers
    /// paired to n8 tiles as MmaStripStep does), then per m16 strip one A ldmatrix.x4 and four mma; returns each
    /// lane's 4 × 4 × 4 accumulators [strip, tile, element].
    /// </summary>
    private static float[,,,] RunWarp(ushort[] shared, int wm, int wn,
        Func<int, int, int, int, int, int> aElement, Func<int, int, int, int, int, int> bElement, bool kMajorB)
    {
        var acc = new float[Lanes, 4, 4, 4];
        Func<ushort[], int[], uint[,]> ldB = kMajorB ? LdmatrixTrans4 : Ldmatrix4; // the kernel's choice for a k-major B tile
        for (int k16 = 0; k16 < MatMulTensorCoreKernels.BK; k16 += 16)
        {
            var b0 = ldB(shared, Enumerable.Range(0, Lanes).Select(l => bElement(0, wn, 0, k16, l)).ToArray());
            var b1 = ldB(shared, Enumerable.Range(0, Lanes).Select(l => bElement(0, wn, 1, k16, l)).ToArray());
            for (int mt = 0; mt < 4; mt++)
            {
                var a = Ldmatrix4(shared, Enumerable.Range(0, Lanes).Select(l => aElement(0, wm, mt, k16, l)).ToArray());
                for (int nt = 0; nt < 4; nt++)
                {
                    var src = nt < 2 ? b0 : b1;
                    int r0 = nt % 2 * 2; // (r0, r1) for the first n8 tile of an x4, (r2, r3) for the second
                    var bf = new uint[Lanes, 2];
                    var c = new float[Lanes, 4];
                    for (int l = 0; l < Lanes; l++)
                    {
                        bf[l, 0] = src[l, r0];
                        bf[l, 1] = src[l, r0 + 1];
                        for (int i = 0; i < 4; i++) c[l, i] = acc[l, mt, nt, i];
                    }
                    var d = Mma(a, bf, c);
                    for (int l = 0; l < Lanes; l++)
                    for (int i = 0; i < 4; i++) acc[l, mt, nt, i] = d[l, i];
                }
            }
        }
        return acc;
    }

    /// <summary>
    /// Fills a shared buffer's A (128×32) and B (128×32) tiles with small integers; returns them as matrices. B is
    /// stored [n][k] (rows of Ld) or, with <paramref name="kMajorB"/>, [k][n] (rows of LdT: the k-major tile of dx = dy·W).
    /// </summary>
    private static (ushort[] Shared, float[,] A, float[,] B) Tiles(int seed, bool kMajorB)
    {
        var rng = new Random(seed);
        var shared = new ushort[MatMulTensorCoreKernels.SharedElems];
        var a = new float[MatMulTensorCoreKernels.BM, MatMulTensorCoreKernels.BK];
        var b = new float[MatMulTensorCoreKernels.BN, MatMulTensorCoreKernels.BK];
        for (int r = 0; r < MatMulTensorCoreKernels.BM; r++)
        for (int k = 0; k < MatMulTensorCoreKernels.BK; k++)
        {
            a[r, k] = rng.Next(-8, 9);
            b[r, k] = rng.Next(-8, 9);
            shared[r * MatMulTensorCoreKernels.Ld + k] = HalfBits.F32ToBf16(a[r, k]);
            shared[MatMulTensorCoreKernels.TileElems + (kMajorB ? k * MatMulTensorCoreKernels.LdT + r : r * MatMulTensorCoreKernels.Ld + k)] = HalfBits.F32ToBf16(b[r, k]);
        }
        return (shared, a, b);
    }

    /// <summary>Number of output elements of the warp tile whose emulated value differs from A·Bᵀ (each element must be written exactly once).</summary>
    private static int Mismatches(int wm, int wn, Func<int, int, int, int, int, int> aElement, Func<int, int, int, int, int, int> bElement, bool kMajorB = false)
    {
        var (shared, a, b) = Tiles(seed: wm * 7 + wn, kMajorB);
        var acc = RunWarp(shared, wm, wn, aElement, bElement, kMajorB);
        var seen = new int[64, 32];
        int bad = 0;
        for (int lane = 0; lane < Lanes; lane++)
        for (int mt = 0; mt < 4; mt++)
        for (int nt = 0; nt < 4; nt++)
        for (int i = 0; i < 4; i++)
        {
            // the epilogue's indices (StoreStrip/StoreFrag): row0 = wm + 16·mt, col0 = wn + 8·nt
            int row = mt * 16 + MmaLayout.CRow(lane, i), col = nt * 8 + MmaLayout.CCol(lane, i);
            seen[row, col]++;
            double expected = 0;
            for (int k = 0; k < MatMulTensorCoreKernels.BK; k++) expected += a[wm + row, k] * b[wn + col, k];
            if (acc[lane, mt, nt, i] != (float)expected) bad++;
        }
        foreach (int n in seen) Assert.Equal(1, n);
        return bad;
    }

    [Theory]
    [InlineData(0, 0)]
    [InlineData(64, 96)] // the last warp of the 2 × 4 arrangement
    [InlineData(0, 32)]
    public void KernelLaneAddressingReproducesTheMatmul(int wm, int wn)
        => Assert.Equal(0, Mismatches(wm, wn, MatMulTensorCoreKernels.AFragElement, MatMulTensorCoreKernels.BFragElement));

    /// <summary>
    /// The k-major B tile (dx = dy·W: W's rows copied as they are) read with ldmatrix.x4.trans through
    /// <see cref="MatMulTensorCoreKernels.BFragElementKMajor"/> gives the same fragments, hence the same matmul.
    /// </summary>
    [Theory]
    [InlineData(0, 0)]
    [InlineData(64, 96)]
    [InlineData(0, 32)]
    public void KernelKMajorBAddressingReproducesTheMatmul(int wm, int wn)
        => Assert.Equal(0, Mismatches(wm, wn, MatMulTensorCoreKernels.AFragElement, MatMulTensorCoreKernels.BFragElementKMajor, kMajorB: true));

    /// <summary>The k-major check can fail: the n/k roles of its lane addressing swapped, or the tile read without .trans.</summary>
    [Fact]
    public void WrongKMajorLayoutsAreDetected()
    {
        int SwappedHalves(int cur, int wn, int half, int k16, int lane)
            => cur + MatMulTensorCoreKernels.TileElems + (k16 + (lane & 7) + (lane >> 4) * 8) * MatMulTensorCoreKernels.LdT + wn + half * 16 + ((lane >> 3) & 1) * 8;
        Assert.True(Mismatches(0, 0, MatMulTensorCoreKernels.AFragElement, SwappedHalves, kMajorB: true) > 0);
        var (shared, _, _) = Tiles(seed: 0, kMajorB: true);
        var noTrans = RunWarp(shared, 0, 0, MatMulTensorCoreKernels.AFragElement, MatMulTensorCoreKernels.BFragElementKMajor, kMajorB: false);
        var withTrans = RunWarp(shared, 0, 0, MatMulTensorCoreKernels.AFragElement, MatMulTensorCoreKernels.BFragElementKMajor, kMajorB: true);
        Assert.NotEqual(withTrans.Cast<float>(), noTrans.Cast<float>());
    }

    /// <summary>The emulation can fail: swapping the k halves of the A addressing, or the n/k roles of B, is caught.</summary>
    [Fact]
    public void WrongLayoutsAreDetected()
    {
        int SwappedA(int cur, int wm, int mt, int k16, int lane)
            => cur + (wm + mt * 16 + MmaLayout.LdmatrixARow(lane)) * MatMulTensorCoreKernels.Ld + k16 + 8 - MmaLayout.LdmatrixAK(lane);
        int SwappedB(int cur, int wn, int half, int k16, int lane)
            => cur + MatMulTensorCoreKernels.TileElems + (wn + half * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * MatMulTensorCoreKernels.Ld + k16 + (lane >> 4) * 8;
        Assert.True(Mismatches(0, 0, SwappedA, MatMulTensorCoreKernels.BFragElement) > 0);
        Assert.True(Mismatches(0, 0, MatMulTensorCoreKernels.AFragElement, SwappedB) > 0);
    }

    /// <summary>The emulated mma on fragments placed straight from the manual's tables is a matmul (the emulator itself is consistent).</summary>
    [Fact]
    public void EmulatedMmaIsAMatmul()
    {
        var rng = new Random(5);
        var am = new float[16, 16];
        var bm = new float[16, 8];
        for (int r = 0; r < 16; r++) for (int k = 0; k < 16; k++) am[r, k] = rng.Next(-4, 5);
        for (int k = 0; k < 16; k++) for (int n = 0; n < 8; n++) bm[k, n] = rng.Next(-4, 5);
        var a = new uint[Lanes, 4];
        var b = new uint[Lanes, 2];
        for (int lane = 0; lane < Lanes; lane++)
        {
            for (int i = 0; i < 8; i++)
            {
                var (row, col) = AElement(lane, i);
                a[lane, i / 2] |= (uint)HalfBits.F32ToBf16(am[row, col]) << (16 * (i % 2));
            }
            for (int i = 0; i < 4; i++)
            {
                var (k, n) = BElement(lane, i);
                b[lane, i / 2] |= (uint)HalfBits.F32ToBf16(bm[k, n]) << (16 * (i % 2));
            }
        }
        var d = Mma(a, b, new float[Lanes, 4]);
        for (int lane = 0; lane < Lanes; lane++)
        for (int i = 0; i < 4; i++)
        {
            var (row, col) = CElement(lane, i);
            Assert.Equal(MmaLayout.CRow(lane, i), row);
            Assert.Equal(MmaLayout.CCol(lane, i), col);
            double s = 0;
            for (int k = 0; k < 16; k++) s += am[row, k] * bm[k, col];
            Assert.Equal((float)s, d[lane, i]);
        }
    }
}
