using System.Text.RegularExpressions;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Tests.Numerics;
using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Backends.PTX;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The tensor-core matmul's cp.async tile copy, proven without a GPU: the 512 pieces its 256 threads copy (two
/// 16-byte cp.async.cg each, <see cref="MatMulTensorCoreKernels.AsyncPiece"/>) are emulated with the PTX ISA's
/// semantics (copy src-size bytes, zero-fill the rest of the 16) into a shared-memory image, which must equal the
/// [row][k] tile with rows of Ld elements that the ldmatrix addressing reads (the layout the register path stores),
/// for full tiles and for row and k tails; every destination and source address must be 16-byte aligned.
/// </summary>
public class CpAsyncTileTests
{
    private const int BM = MatMulTensorCoreKernels.BM, BK = MatMulTensorCoreKernels.BK, Ld = MatMulTensorCoreKernels.Ld;

    [Theory]
    [InlineData(300, 96, 96, 0, 0)]     // full tile
    [InlineData(300, 96, 96, 256, 64)]  // rows 256..299: 44 of 128 rows present
    [InlineData(200, 70, 72, 128, 64)]  // k tail: 6 of 32 k present in rows 72 apart (a partial 16-byte piece)
    [InlineData(5, 8, 8, 0, 0)]         // tiny operand: 5 rows, one 8-element piece per row
    public void Async_pieces_build_the_tile_the_ldmatrix_addressing_reads(int rows, int ks, int srow, int row0, int k0)
    {
        // A k-contiguous 16-bit operand (rows, ks) with rows srow apart, srow % 8 == 0 as CanCopyAsync requires.
        var operand = new ushort[rows * srow];
        for (int i = 0; i < operand.Length; i++) operand[i] = (ushort)(1 + i % 65000);
        const int at = MatMulTensorCoreKernels.TileElems; // the second operand slot of buffer 0
        var shared = new ushort[MatMulTensorCoreKernels.SharedElems];
        Array.Fill(shared, (ushort)0xDEAD); // stale data from an earlier step: every element of the tile must be written
        var covered = new int[BM * BK];

        for (int tid = 0; tid < MatMulTensorCoreKernels.Threads; tid++)
        for (int pass = 0; pass < 2; pass++)
        {
            var (row, k) = MatMulTensorCoreKernels.AsyncPiece(tid, pass);
            int bytes = MatMulTensorCoreKernels.AsyncBytes(row0 + row, k0 + k, rows, ks);
            int dst = at + row * Ld + k;
            Assert.True(dst * 2 % 16 == 0, $"thread {tid} pass {pass}: shared destination byte {dst * 2} not 16-byte aligned");
            Assert.InRange(bytes, 0, 16);
            long src = bytes > 0 ? (long)(row0 + row) * srow + k0 + k : 0;
            Assert.True(src * 2 % 16 == 0, $"thread {tid} pass {pass}: global source byte {src * 2} not 16-byte aligned");
            // cp.async.cg.shared.global [dst], [src], 16, bytes: copy `bytes`, zero-fill up to 16
            for (int e = 0; e < 8; e++)
            {
                shared[dst + e] = e * 2 < bytes ? operand[src + e] : (ushort)0;
                covered[row * BK + k + e]++;
            }
        }

        Assert.All(covered, c => Assert.Equal(1, c)); // each tile element written exactly once
        for (int r = 0; r < BM; r++)
        for (int k = 0; k < BK; k++)
        {
            bool inside = row0 + r < rows && k0 + k < ks;
            ushort expected = inside ? operand[(row0 + r) * srow + k0 + k] : (ushort)0;
            Assert.True(expected == shared[at + r * Ld + k], $"tile ({r}, {k}): expected {expected}, cp.async wrote {shared[at + r * Ld + k]}");
        }
        // The padding columns (k = 32..39 of each row) and the other buffers are not touched.
        for (int r = 0; r < BM; r++)
            for (int k = BK; k < Ld; k++) Assert.Equal((ushort)0xDEAD, shared[at + r * Ld + k]);
        Assert.Equal((ushort)0xDEAD, shared[0]);
        Assert.Equal((ushort)0xDEAD, shared[at + MatMulTensorCoreKernels.TileElems]);
    }

    [Theory]
    [InlineData(96, 300, 0, 0)]      // full tile: 32 k rows of 128 columns
    [InlineData(70, 300, 64, 256)]   // k tail (6 of 32 rows) and column tail (44 of 128)
    [InlineData(40, 133, 32, 128)]   // 5-column tail: a partial 16-byte piece (10 bytes) then whole-zero pieces
    [InlineData(5, 8, 0, 0)]         // tiny: 5 k rows of one piece
    public void Async_k_major_pieces_build_the_tile_the_ldmatrix_trans_addressing_reads(int ks, int cols, int k0, int col0)
    {
        // W (ks, cols) row-major as dx = dy·W reads it: B(j, r) = w[r·sk + j], sk % 8 == 0 (CanCopyAsync)
        int sk = (cols + 7) / 8 * 8;
        var operand = new ushort[ks * sk];
        for (int i = 0; i < operand.Length; i++) operand[i] = (ushort)(1 + i % 65000);
        const int at = MatMulTensorCoreKernels.TileElems;
        const int LdT = MatMulTensorCoreKernels.LdT, BN = MatMulTensorCoreKernels.BN;
        var shared = new ushort[MatMulTensorCoreKernels.SharedElems];
        Array.Fill(shared, (ushort)0xDEAD);
        var covered = new int[BK * BN];
        for (int tid = 0; tid < MatMulTensorCoreKernels.Threads; tid++)
        for (int pass = 0; pass < 2; pass++)
        {
            var (k, col) = MatMulTensorCoreKernels.AsyncPieceKMajor(tid, pass);
            int bytes = MatMulTensorCoreKernels.AsyncBytes(k0 + k, col0 + col, ks, cols);
            int dst = at + k * LdT + col;
            Assert.True(dst * 2 % 16 == 0, $"thread {tid} pass {pass}: shared destination byte {dst * 2} not 16-byte aligned");
            Assert.InRange(bytes, 0, 16);
            long src = bytes > 0 ? (long)(k0 + k) * sk + col0 + col : 0;
            Assert.True(src * 2 % 16 == 0, $"thread {tid} pass {pass}: global source byte {src * 2} not 16-byte aligned");
            for (int e = 0; e < 8; e++)
            {
                shared[dst + e] = e * 2 < bytes ? operand[src + e] : (ushort)0;
                covered[k * BN + col + e]++;
            }
        }
        Assert.All(covered, c => Assert.Equal(1, c));
        for (int k = 0; k < BK; k++)
        for (int c = 0; c < BN; c++)
        {
            bool inside = k0 + k < ks && col0 + c < cols;
            ushort expected = inside ? operand[(k0 + k) * sk + col0 + c] : (ushort)0;
            Assert.True(expected == shared[at + k * LdT + c], $"tile (k {k}, col {c}): expected {expected}, cp.async wrote {shared[at + k * LdT + c]}");
        }
        for (int k = 0; k < BK; k++)
            for (int c = BN; c < LdT; c++) Assert.Equal((ushort)0xDEAD, shared[at + k * LdT + c]); // padding untouched
        Assert.Equal((ushort)0xDEAD, shared[at + BK * LdT]); // the rest of the slot and the next buffer untouched
        Assert.Equal((ushort)0xDEAD, shared[at - 1]);
        Assert.True(BK * LdT <= MatMulTensorCoreKernels.TileElems);
    }

    [Fact]
    public void Only_16_byte_aligned_operands_in_the_operand_type_with_k_contiguous_are_copied_async()
    {
        var b = TestBackends.Get("cpu");
        using var w = b.Allocate(DType.BF16, 16, 64);
        using var f = b.Allocate(DType.F32, 16, 64);
        using var h = b.Allocate(DType.F16, 16, 64);
        Assert.True(MatMulTensorCoreKernels.CanCopyAsync(w, 64, 1, f16: false));       // forward weight W (N, K)
        Assert.True(MatMulTensorCoreKernels.CanCopyAsync(w, 1, 64, f16: false));       // dx = dy·W reads W k-major (rows contiguous)
        Assert.False(MatMulTensorCoreKernels.CanCopyAsync(w, 1, 60, f16: false));      // ... with k rows 120 bytes apart: not aligned
        Assert.False(MatMulTensorCoreKernels.CanCopyAsync(f, 64, 1, f16: false));      // f32 activations are converted
        Assert.False(MatMulTensorCoreKernels.CanCopyAsync(w, 64, 1, f16: true));       // bf16 into the f16 kernel is converted
        Assert.True(MatMulTensorCoreKernels.CanCopyAsync(h, 64, 1, f16: true));
        Assert.False(MatMulTensorCoreKernels.CanCopyAsync(w, 60, 1, f16: false));      // rows 120 bytes apart: not 16-byte aligned
        Assert.False(MatMulTensorCoreKernels.CanCopyAsync(w.View(4, 8, 64 - 4), 64, 1, f16: false)); // starts 8 bytes in
        Assert.True(MatMulTensorCoreKernels.CanCopyAsync(w.Slice(1, 2), 64, 1, f16: false));
    }

    [Fact]
    public void The_shared_tile_buffer_is_declared_16_byte_aligned_in_the_loaded_ptx()
    {
        // cp.async.cg 16 and ldmatrix need 16-byte aligned shared addresses; the kernel adds multiples of 16 to the
        // address of __shared_alloca0, so the buffer itself must be 16-byte aligned in the PTX the CUDA path loads.
        using var context = Context.Create(b => b.CPU(CPUDevice.Default).Math(MathMode.Default).EnableAlgorithms());
        using var backend = new PTXBackend(context, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70, null!);
        var method = typeof(MatMulTensorCoreKernels).GetMethod(nameof(MatMulTensorCoreKernels.MatMulTensorCoreKernel))!.MakeGenericMethod(typeof(Bf16Operand));
        string ptx = MatMulTensorCoreKernels.CompileForwarded(backend, method).PTXAssembly;
        var decl = Regex.Match(ptx, @"\.shared\s+\.align\s+(\d+)\s+\S+\s+__shared_alloca0\b");
        Assert.True(decl.Success, "no __shared_alloca0 declaration in the PTX");
        Assert.True(int.Parse(decl.Groups[1].Value) % 16 == 0, decl.Value);
        Assert.Contains("cp.async.cg.shared.global", ptx); // (LDGSTS in the SASS is checked by PtxasTests)
        Assert.Contains("cp.async.wait_group 0;", ptx);
    }

    [Fact]
    public void Every_ldmatrix_attention_kernel_declares_its_shared_buffer_16_byte_aligned()
    {
        // The tensor-core attention kernels read their K/V/Q tiles with ldmatrix, which faults on shared addresses that
        // are not 16-byte aligned; ILGPU declares the buffer .align 4, so the loaded PTX must raise it.
        using var context = Context.Create(b => b.CPU(CPUDevice.Default).Math(MathMode.Default).EnableAlgorithms());
        using var backend = new PTXBackend(context, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70, null!);
        var methods = new[]
        {
            AttentionTensorCoreKernels.Method(typeof(Bf16Operand)),
            AttentionTensorCoreKernels.BackwardMethod(true, typeof(Bf16Operand)),
            AttentionTensorCoreKernels.BackwardMethod(false, typeof(F16Operand)),
        };
        foreach (var method in methods)
        {
            string ptx = AttentionTensorCoreKernels.CompileForwarded(backend, method).PTXAssembly;
            Assert.Contains("ldmatrix", ptx);
            var decls = Regex.Matches(ptx, @"\.shared\s+\.align\s+(\d+)\s+\S+\s+(__shared_alloca\d+)\b");
            Assert.NotEmpty(decls);
            foreach (Match d in decls)
                Assert.True(int.Parse(d.Groups[1].Value) % 16 == 0, $"{method.Name}: {d.Value}");
        }
    }
}
