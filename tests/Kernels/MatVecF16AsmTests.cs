using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using Xunit;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// The VCVTPH2PS machine code of MatVecF16Asm: the f16 decode products (MatVec.RowsF16 on rows, PackedGemm.RowsF16 on
/// 16-row panels) against the double reference on ragged shapes, bit for bit against the managed widening it replaces, the widening exact over all 65536 halves, the
/// managed fallback forced on the test thread, and the encoding read back by objdump.
/// </summary>
public sealed unsafe class MatVecF16AsmTests(ITestOutputHelper output)
{
    private static string NoKernel => $"no VCVTPH2PS kernel on this machine ({MatVecF16Asm.Unavailable}); the managed widening runs (Fallback_* test)";

    /// <summary>Weights that f16 holds exactly (so the reference sees the kernel's values) and their bits.</summary>
    private static (double[] W, ushort[] H) F16Weights(long count, int seed, double scale = 1.0)
    {
        var h = KernelTest.Rand(count, seed, scale).Select(v => HalfBits.F32ToF16((float)v)).ToArray();
        return (h.Select(b => (double)HalfBits.F16ToF32(b)).ToArray(), h);
    }

    /// <summary>RowsF16 on rows [r0, n) of y pre-filled with 7 (accumulate adds to it), on the calling thread's path.</summary>
    private static float[] Rows(ushort[] h, float[] x, float[]? bias, int n, int k, int r0, bool accumulate)
    {
        var y = Enumerable.Repeat(7f, n).ToArray();
        fixed (ushort* pw = h) fixed (float* px = x) fixed (float* py = y) fixed (float* pb = bias)
            MatVec.RowsF16(pw, k, r0, n, px, py, pb, accumulate);
        return y;
    }

    // (N, K, first row): one 4-row tile, tiles plus 1..3 leftover rows, K a multiple of 16, K % 16 = 1 and 15,
    // K < 32, the SmolLM2 shapes (576, 1536), a range that starts mid-tile.
    public static readonly TheoryData<int, int, int> Shapes = new()
    {
        { 4, 16, 0 }, { 5, 17, 0 }, { 7, 31, 0 }, { 13, 45, 0 }, { 37, 96, 3 }, { 6, 576, 1 }, { 9, 1536, 0 }, { 11, 1023, 2 },
    };

    [SkippableTheory]
    [MemberData(nameof(Shapes))]
    public void Rows_Match_Double_Reference_And_The_Managed_Widening_Bit_For_Bit(int n, int k, int r0)
    {
        Skip.If(MatVecF16Asm.Rows4 == null, NoKernel);
        var (w, h) = F16Weights((long)n * k, 51 + n, 0.5);
        var xd = KernelTest.Rand(k, 52 + k, 1.5);
        var biasD = KernelTest.Rand(n, 53);
        var x = GradCheck.ToFloat(xd);
        var bias = GradCheck.ToFloat(biasD);
        foreach (bool accumulate in new[] { false, true })
        {
            var y = Rows(h, x, bias, n, k, r0, accumulate);
            var expected = MatMulReference.Forward(xd, w, biasD, 1, n, k);
            Assert.Equal(Enumerable.Repeat(7f, r0), y[..r0]);   // rows before the range stay untouched
            var (atol, rtol) = Tolerance.F32;
            NumericAssert.Close(expected[r0..].Select(v => accumulate ? v + 7 : v).ToArray(), y[r0..], atol, rtol, $"f16 rows {n}x{k} from {r0}");

            // same summation order as the managed widening (one FMA chain per row, lane sum, tail): same bits
            MatVecF16Asm.ForceFallback = true;
            float[] managed;
            try { managed = Rows(h, x, bias, n, k, r0, accumulate); }
            finally { MatVecF16Asm.ForceFallback = false; }
            Assert.Equal(managed, y);
        }
    }

    // (N, K, r0, r1): partial first and last panels, K % 4 = 1 and 3, K < 4 (tail only), a 4-column tail after the kernel,
    // the SmolLM2 depth on whole panels.
    public static readonly TheoryData<int, int, int, int> PanelShapes = new()
    {
        { 37, 45, 3, 35 }, { 37, 7, 0, 37 }, { 5, 3, 0, 5 }, { 64, 576, 16, 48 }, { 40, 1535, 0, 40 }, { 16, 4, 0, 16 },
    };

    [SkippableTheory]
    [MemberData(nameof(PanelShapes))]
    public void Packed_Panel_Rows_Match_Double_Reference(int n, int k, int r0, int r1)
    {
        Skip.IfNot(PackedGemm.F16DecodeAvailable, NoKernel);
        var (w, h) = F16Weights((long)n * k, 81 + k, 0.5);
        var x = KernelTest.Rand(k, 82, 1.5).Select(v => (float)v).ToArray();
        var bias = KernelTest.Rand(n, 83).Select(v => (float)v).ToArray();
        foreach (bool accumulate in new[] { false, true })
        {
            var y = Enumerable.Repeat(7f, n).ToArray();
            fixed (ushort* pw = h) fixed (float* px = x) fixed (float* py = y) fixed (float* pb = bias)
            {
                using var pm = new PackedMatrix(DType.F16, pw, n, k, "w");
                PackedGemm.RowsF16(pm.Data, k, r0, r1, px, py, pb, accumulate);
            }
            for (int r = 0; r < n; r++)
            {
                if (r < r0 || r >= r1) { Assert.Equal(7f, y[r]); continue; }
                double e = bias[r] + (accumulate ? 7 : 0), mag = 0;
                for (int j = 0; j < k; j++) { e += w[(long)r * k + j] * x[j]; mag += Math.Abs(w[(long)r * k + j] * x[j]); }
                Assert.True(Math.Abs(y[r] - e) <= 1e-6 + 1e-5 * (mag + Math.Abs(e)), $"row {r} of {n}x{k}: {y[r]} vs {e}");
            }
        }
    }

    [SkippableFact]
    public void Widening_Is_Exact_For_All_65536_Halves()
    {
        Skip.If(MatVecF16Asm.Widen == null, NoKernel);
        var h = new ushort[65536 + 5];   // a ragged tail for HalfConvert's scalar end
        for (int i = 0; i < h.Length; i++) h[i] = (ushort)i;
        var direct = new float[65536];
        var viaConvert = new float[h.Length];
        fixed (ushort* ph = h) fixed (float* pd = direct) MatVecF16Asm.Widen(ph, pd, 65536 / 16);
        HalfConvert.F16ToF32(h, viaConvert);
        int subnormals = 0, nans = 0;
        for (int i = 0; i < h.Length; i++)
        {
            ushort bits = h[i];
            float expected = (float)BitConverter.UInt16BitsToHalf(bits);
            float got = i < 65536 ? direct[i] : viaConvert[i];
            foreach (float v in i < 65536 ? new[] { got, viaConvert[i] } : new[] { got })
            {
                if (float.IsNaN(expected))
                {
                    Assert.True(float.IsNaN(v), $"half 0x{bits:X4} (NaN) widened to {v}");
                    Assert.Equal(float.IsNegative(expected), float.IsNegative(v));
                    nans++;
                }
                else Assert.True(BitConverter.SingleToInt32Bits(expected) == BitConverter.SingleToInt32Bits(v),
                    $"half 0x{bits:X4}: expected {expected} (0x{BitConverter.SingleToInt32Bits(expected):X8}), got {v} (0x{BitConverter.SingleToInt32Bits(v):X8})");
            }
            if ((bits & 0x7C00) == 0 && (bits & 0x3FF) != 0) subnormals++;
        }
        Assert.Equal(2 * 1023 + 4, subnormals);               // 1023 per sign, and 0x0001..0x0004 again in the tail
        Assert.Equal(2 * 2 * 1023, nans);                      // both sign halves, every NaN payload, checked twice
        Assert.Equal(float.PositiveInfinity, direct[0x7C00]);
        Assert.Equal(float.NegativeInfinity, direct[0xFC00]);
        Assert.Equal(5.9604645e-8f, direct[0x0001]);           // smallest subnormal, 2^-24
        Assert.Equal(65504f, direct[0x7BFF]);                  // largest finite
    }

    [SkippableFact]
    public void Inf_And_NaN_Weights_Reach_The_Output()
    {
        Skip.If(MatVecF16Asm.Rows4 == null, NoKernel);
        const int n = 5, k = 40;   // rows 0..3 in the 4-row kernel, row 4 in the 1-row kernel
        var (_, h) = F16Weights(n * k, 61);
        var x = Enumerable.Repeat(1f, k).ToArray();
        h[0 * k + 3] = 0x7C00;    // +inf in a 16-column step
        h[1 * k + 35] = 0xFC00;   // -inf in the K % 16 tail
        h[2 * k + 20] = 0x7E00;   // NaN
        h[4 * k + 5] = 0x7C00;    // +inf, leftover row
        var y = Rows(h, x, null, n, k, 0, false);
        Assert.Equal(float.PositiveInfinity, y[0]);
        Assert.Equal(float.NegativeInfinity, y[1]);
        Assert.True(float.IsNaN(y[2]), $"row 2: {y[2]}");
        Assert.True(float.IsFinite(y[3]), $"row 3: {y[3]}");
        Assert.Equal(float.PositiveInfinity, y[4]);
    }

    [Fact]
    public void Fallback_Forced_On_This_Thread_Matches_Reference()
    {
        const int n = 9, k = 45;
        var (w, h) = F16Weights(n * k, 71, 0.5);
        var xd = KernelTest.Rand(k, 72);
        var x = GradCheck.ToFloat(xd);
        MatVecF16Asm.ForceFallback = true;
        try
        {
            Assert.False(MatVecF16Asm.IsAvailable);
            var y = Rows(h, x, null, n, k, 0, false);
            var (atol, rtol) = Tolerance.F32;
            NumericAssert.Close(MatMulReference.Forward(xd, w, null, 1, n, k), y, atol, rtol, "managed f16 rows");
            // the managed widening is exact for finite halves only: +inf comes out finite, which shows this path ran
            h[2] = 0x7C00;
            var yInf = Rows(h, Enumerable.Repeat(1f, k).ToArray(), null, n, k, 0, false);
            Assert.True(float.IsFinite(yInf[0]), $"forced fallback gave {yInf[0]}: the machine code ran");
            // another thread is not forced
            bool otherThread = false;
            var t = new Thread(() => otherThread = MatVecF16Asm.IsAvailable);
            t.Start();
            t.Join();
            Assert.Equal(MatVecF16Asm.Rows4 != null, otherThread);
        }
        finally { MatVecF16Asm.ForceFallback = false; }
        Assert.Equal(MatVecF16Asm.Rows4 != null, MatVecF16Asm.IsAvailable);
    }

    [SkippableFact]
    public void Encoding_Disassembles_To_The_Documented_Instructions()
    {
        Skip.IfNot(File.Exists(X64Disassembly.Objdump), "binutils objdump not installed");
        var code = MatVecF16Asm.Encode(out var entries);
        Assert.Equal(0, entries.Rows4);
        Assert.True(entries.Rows1 % 64 == 0 && entries.Widen % 64 == 0 && entries.Panel16 % 64 == 0
            && entries.Rows1 < entries.Widen && entries.Widen < entries.Panel16, $"entries {entries}");
        // (offset, instruction) in AT&T order: op src2, src1, dst
        var ins = X64Disassembly.Disassemble(code, "matvecf16");
        Assert.DoesNotContain(ins, i => i.Text.StartsWith("(bad)", StringComparison.Ordinal));
        List<string> Part(int from, int to) => ins.Where(i => i.At >= from && i.At < to).Select(i => i.Text).ToList();
        var rows4 = Part(entries.Rows4, entries.Rows1);
        var rows1 = Part(entries.Rows1, entries.Widen);
        var widen = Part(entries.Widen, code.Length);   // up to the panel kernel: narrowed below
        string[] bases = { "%rdi", "%rax", "%r10", "%r11" };
        for (int r = 0; r < 4; r++)
        {
            Assert.Contains($"vpxord %zmm{r},%zmm{r},%zmm{r}", rows4);
            Assert.Contains($"vcvtph2ps ({bases[r]}),%zmm{4 + r}", rows4);
            Assert.Contains($"vfmadd231ps %zmm8,%zmm{4 + r},%zmm{r}", rows4);
            Assert.Contains($"vmovups %zmm{r},{(r == 0 ? "" : $"0x{64 * r:x}")}(%rdx)", rows4);
        }
        foreach (var s in new[] { "lea (%rdi,%r8,1),%rax", "lea (%rax,%r8,1),%r10", "lea (%r10,%r8,1),%r11", "vmovups (%rsi),%zmm8",
                     "prefetcht0 (%r9)", "prefetcht0 0x40(%r9)", "add $0x20,%rdi", "add $0x20,%r11", "add $0x40,%rsi", "sub $0xffffffffffffff80,%r9", "dec %rcx", "vzeroupper", "ret" })
            Assert.Contains(s, rows4);
        Assert.Equal(new[] { "vpxord %zmm0,%zmm0,%zmm0", "vcvtph2ps (%rdi),%zmm4", "vfmadd231ps (%rsi),%zmm4,%zmm0", "add $0x20,%rdi", "add $0x40,%rsi", "dec %rcx" }, rows1.Take(6));
        Assert.Equal(new[] { "vmovups %zmm0,(%rdx)", "vzeroupper", "ret" }, rows1.TakeLast(3));
        Assert.Equal(new[] { "vcvtph2ps (%rdi),%zmm0", "vmovups %zmm0,(%rsi)", "add $0x20,%rdi", "add $0x40,%rsi", "dec %rdx" }, widen.Take(5));
        Assert.Equal(new[] { "vzeroupper", "ret" }, widen.TakeLast(2));
        var panel = Part(entries.Panel16, code.Length);
        widen = Part(entries.Widen, entries.Panel16);
        Assert.Equal(new[] { "vzeroupper", "ret" }, widen.TakeLast(2));
        for (int u = 0; u < 4; u++)
        {
            Assert.Contains($"vbroadcastss {(u == 0 ? "" : $"0x{4 * u:x}")}(%rsi),%zmm{8 + u}", panel);
            Assert.Contains($"vcvtph2ps {(u == 0 ? "" : $"0x{32 * u:x}")}(%rdi),%zmm{4 + u}", panel);
            Assert.Contains($"vfmadd231ps %zmm{8 + u},%zmm{4 + u},%zmm{u}", panel);
        }
        foreach (var s in new[] { "prefetcht0 (%r8)", "prefetcht0 0x40(%r8)", "sub $0xffffffffffffff80,%rdi", "add $0x10,%rsi",
                     "vaddps %zmm1,%zmm0,%zmm0", "vaddps %zmm3,%zmm2,%zmm2", "vaddps %zmm2,%zmm0,%zmm0", "vmovups %zmm0,(%rdx)" })
            Assert.Contains(s, panel);
        Assert.Equal(new[] { "vzeroupper", "ret" }, panel.TakeLast(2));
        output.WriteLine($"{code.Length} bytes; rows4 {rows4.Count}, rows1 {rows1.Count}, widen {widen.Count}, panel16 {panel.Count} instructions");
    }
}
