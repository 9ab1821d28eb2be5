using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using System.Runtime.InteropServices;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Quant;

namespace FineTuneNative.Bench.Variants;

/// <summary>
/// <c>quick-f16gemv [cpu]</c>: the f16 decode product (y = W·x, one row of x) over one SmolLM2-135M token's worth of
/// weights (30 layers of q,k,v,o,gate,up,down + the 49152-row head, 270 MB of f16: far past the 32 MiB L3), one thread,
/// per variant. <c>cpu</c> = process CPU time (the machine is shared). See README.md "f16 decode".
/// </summary>
internal static unsafe class MatVecF16Variants
{
    private readonly struct Mat(ushort* w, int n, int k) { public readonly ushort* W = w; public readonly int N = n, K = k; }

    public static void Run(string[] args)
    {
        bool cpu = args.Contains("cpu");
        const int C = 576, F = 1536, KV = 192, V = 49152, L = 30;
        var shapes = new List<(int N, int K)>();
        for (int l = 0; l < L; l++) shapes.AddRange(new[] { (C, C), (KV, C), (KV, C), (C, C), (F, C), (F, C), (C, F) });
        shapes.Add((V, C));
        var mats = new List<Mat>();
        ulong state = 0x9E3779B97F4A7C15;
        long bytes = 0;
        foreach (var (n, k) in shapes)
        {
            var w = (ushort*)NativeMemory.AlignedAlloc((nuint)(2L * n * k), 64);
            for (long i = 0; i < (long)n * k; i++)
            {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                w[i] = HalfBits.F32ToF16(0.05f * ((state >> 40) * (2f / (1 << 24)) - 1f));
            }
            mats.Add(new Mat(w, n, k));
            bytes += 2L * n * k;
        }
        var packed = new Dictionary<IntPtr, PackedMatrix>();
        if (args.Contains("packed"))
            foreach (var m in mats) packed[(IntPtr)m.W] = new PackedMatrix(DType.F16, m.W, m.N, m.K);
        P1 = BuildPacked();
        var x = (float*)NativeMemory.AlignedAlloc(4 * F, 64);
        for (int j = 0; j < F; j++) x[j] = MathF.Sin(j);
        var y = (float*)NativeMemory.AlignedAlloc(4 * V, 64);
        Console.WriteLine($"f16 decode product, SmolLM2-135M token ({bytes / 1e6:F0} MB of weights), 1 thread, {(cpu ? "CPU time" : "wall clock")}; asm {(MatVecF16Asm.Rows4 != null ? "yes" : MatVecF16Asm.Unavailable)}");
        var variants = new (string Name, Action<Mat> Op)[]
        {
            ("m0 managed widening, no prefetch (before)", m => Managed(m, x, y, prefetch: false)),
            ("m1 managed widening + prefetch next tile", m => Managed(m, x, y, prefetch: true)),
            ("a0 vcvtph2ps, no prefetch", m => Asm(m, x, y, tilesAhead: 0)),
            ("a1 vcvtph2ps + prefetch next tile (src)", m => MatVec.RowsF16(m.W, m.K, 0, m.N, x, y, null, false)),
            ("a2 vcvtph2ps + prefetch 2 tiles ahead", m => Asm(m, x, y, tilesAhead: 2)),
            ("b1 a1 with the prefetches first in the loop", m => AsmB(B1, false, m, x, y, 1)),
            ("b2 b1, 32 columns per step, 2 chains per row", m => AsmB(B2, true, m, x, y, 1)),
            ("b3 b1, vmovdqu ymm + vcvtph2ps zmm, ymm", m => AsmB(B3, false, m, x, y, 1)),
            ("p1 packed 16-row panels, broadcast x, 4 chains", m => { if (packed.Count > 0) Packed(packed[(IntPtr)m.W], x, y); }),
        };
        B1 = Build(pfFirst: true, twoChains: false, regForm: false);
        B2 = Build(pfFirst: true, twoChains: true, regForm: false);
        B3 = Build(pfFirst: true, twoChains: false, regForm: true);
        if (packed.Count > 0)
        {
            var yr = new float[576];
            MatVec.RowsF16(mats[0].W, 576, 0, 576, x, y, null, false);
            new Span<float>(y, 576).CopyTo(yr);
            Packed(packed[(IntPtr)mats[0].W], x, y);
            double md = 0;
            for (int i = 0; i < 576; i++) md = Math.Max(md, Math.Abs(yr[i] - y[i]) / (Math.Abs(yr[i]) + 1e-3));
            Console.WriteLine($"  p1 vs a1 on 576x576: max rel diff {md:E2}");
        }
        var hot = mats[0];   // 576 x 576 (648 KiB: stays in L2): the instruction cost alone
        foreach (var (name, op) in variants)
        {
            if (name[0] != 'm' && MatVecF16Asm.Rows4 == null) continue;
            double s = Quick.BestOf(() => { for (int i = 0; i < 200; i++) op(hot); }, cpu, 1, 10, 2.0);
            Console.WriteLine($"  hot 576x576 {name,-45} {s / 200 * 1e6,7:F2} us  {2.0 * 576 * 576 * 200 / s / 1e9,6:F1} GB/s");
        }
        for (int round = 0; round < 2; round++)
            foreach (var (name, op) in variants)
            {
                if (name[0] != 'm' && MatVecF16Asm.Rows4 == null) continue;
                double s = Quick.BestOf(() => { foreach (var m in mats) op(m); }, cpu, 1, 10, 3.0);
                Console.WriteLine($"  {name,-45} {s * 1e3,7:F2} ms/token  {bytes / s / 1e9,6:F1} GB/s");
            }
    }

    private static delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void> B1, B2, B3, P1;

    private static void Packed(PackedMatrix pm, float* x, float* y)
    {
        for (int p = 0; p < pm.Panels; p++)
        {
            byte* panel = pm.Panel(p);
            P1((ushort*)panel, x, y + 16 * p, pm.K / 4, 0, panel + pm.PanelBytes);
        }
    }

    /// <summary>p1(panel, x, y16, k/4, _, prefetch): y16 = Σ_k f32(panel[16k..16k+16])·x[k], chains k mod 4, summed at the end.</summary>
    private static delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void> BuildPacked()
    {
        var e = new X64Code.Emitter();
        for (int r = 0; r < 4; r++) e.EvexRR(1, 1, 0xEF, r, r, r);
        int loop = e.Position;
        e.Bytes(0x41, 0x0F, 0x18, 0x09); e.Bytes(0x41, 0x0F, 0x18, 0x49, 0x40);
        for (int u = 0; u < 4; u++)
        {
            e.EvexRM(2, 1, 0x18, 8 + u, 0, X64Code.Rsi, 4 * u, 4);        // vbroadcastss zmm(8+u), [rsi+4u]
            e.EvexRM(2, 1, 0x13, 4 + u, 0, X64Code.Rdi, 32 * u, 32);      // vcvtph2ps zmm(4+u), [rdi+32u]
            e.EvexRR(2, 1, 0xB8, u, 4 + u, 8 + u);                        // vfmadd231ps zmm(u), zmm(4+u), zmm(8+u)
        }
        e.Bytes(0x48, 0x83, 0xEF, 0x80);                                   // sub rdi, -128
        e.Bytes(0x48, 0x83, 0xC6, 0x10);                                   // add rsi, 16
        e.Bytes(0x49, 0x83, 0xE9, 0x80);                                   // sub r9, -128
        e.Bytes(0x48, 0xFF, 0xC9);
        e.Jcc(0x85, loop);
        e.EvexRR(1, 0, 0x58, 0, 0, 1); e.EvexRR(1, 0, 0x58, 2, 2, 3); e.EvexRR(1, 0, 0x58, 0, 0, 2);   // vaddps
        e.EvexRM(1, 0, 0x11, 0, 0, X64Code.Rdx, 0, 64);
        e.Bytes(0xC5, 0xF8, 0x77, 0xC3);
        var page = X64Code.ExecutablePage(e.ToArray(), out string why);
        if (page == null) throw new InvalidOperationException(why);
        return (delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void>)page;
    }

    private static void AsmB(delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void> kern, bool two, Mat m, float* x, float* y, int tilesAhead)
    {
        float* acc = stackalloc float[128];
        int k = m.K;
        for (int r = 0; r + 4 <= m.N; r += 4)
        {
            ushort* w0 = m.W + (long)r * k;
            kern(w0, x, acc, two ? k / 32 : k / 16, 2L * k, (byte*)(w0 + 4L * k * tilesAhead));
            for (int q = 0; q < 4; q++)
                y[r + q] = two ? Vector512.Sum(Vector512.Load(acc + 16 * q) + Vector512.Load(acc + 64 + 16 * q)) : Vector512.Sum(Vector512.Load(acc + 16 * q));
        }
    }

    /// <summary>Variants of MatVecF16Asm's rows4 (same arguments; twoChains: n = K/32, acc holds 8 vectors).</summary>
    private static delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void> Build(bool pfFirst, bool twoChains, bool regForm)
    {
        var e = new X64Code.Emitter();
        int[] rowBase = { X64Code.Rdi, X64Code.Rax, X64Code.R10, X64Code.R11 };
        int chains = twoChains ? 2 : 1;
        for (int r = 0; r < 4 * chains; r++) e.EvexRR(1, 1, 0xEF, r, r, r);
        e.Bytes(0x4A, 0x8D, 0x04, 0x07); e.Bytes(0x4E, 0x8D, 0x14, 0x00); e.Bytes(0x4F, 0x8D, 0x1C, 0x02);
        int loop = e.Position;
        void Pf(int lines)
        {
            for (int i = 0; i < lines; i++)
            {
                int d = 64 * i;
                if (d == 0) e.Bytes(0x41, 0x0F, 0x18, 0x09);                                               // prefetcht0 [r9]
                else if (d < 128) e.Bytes(0x41, 0x0F, 0x18, 0x49, d);                                      // prefetcht0 [r9+d8]
                else e.Bytes(0x41, 0x0F, 0x18, 0x89, d & 0xFF, (d >> 8) & 0xFF, 0, 0);                     // prefetcht0 [r9+d32]
            }
        }
        if (pfFirst) Pf(2 * chains);
        for (int c = 0; c < chains; c++)
        {
            e.EvexRM(1, 0, 0x10, 16 + c, 0, X64Code.Rsi, 64 * c, 64);                                      // vmovups zmm(16+c), [rsi+64c]
            for (int r = 0; r < 4; r++)
            {
                int cv = 8 + r + 4 * c, bse = rowBase[r];
                if (regForm)
                {
                    int t = 12 + r;                                                                         // vmovdqu ymm(t), [row + 32c] (VEX.256.F3.0F 6F)
                    e.Bytes(0xC4, (((~t >> 3) & 1) << 7) | (1 << 6) | (((~bse >> 3) & 1) << 5) | 0x01, 0x7E, 0x6F);
                    if (c == 0) e.Bytes((t & 7) << 3 | (bse & 7)); else e.Bytes(0x40 | (t & 7) << 3 | (bse & 7), 32);
                    e.EvexRR(2, 1, 0x13, cv, 0, t);                                                         // vcvtph2ps zmm(cv), ymm(t)
                }
                else e.EvexRM(2, 1, 0x13, cv, 0, bse, 32 * c, 32);                                         // vcvtph2ps zmm(cv), [row + 32c]
            }
            for (int r = 0; r < 4; r++) e.EvexRR(2, 1, 0xB8, r + 4 * c, 8 + r + 4 * c, 16 + c);            // vfmadd231ps
        }
        if (!pfFirst) Pf(2 * chains);
        int step = 32 * chains;
        e.Bytes(0x48, 0x83, 0xC7, step); e.Bytes(0x48, 0x83, 0xC0, step); e.Bytes(0x49, 0x83, 0xC2, step); e.Bytes(0x49, 0x83, 0xC3, step);
        if (chains == 1) { e.Bytes(0x48, 0x83, 0xC6, 0x40); e.Bytes(0x49, 0x83, 0xE9, 0x80); }
        else { e.Bytes(0x48, 0x83, 0xEE, 0x80); e.Bytes(0x49, 0x81, 0xC1, 0x00, 0x01, 0x00, 0x00); }       // sub rsi,-128; add r9,256
        e.Bytes(0x48, 0xFF, 0xC9);
        e.Jcc(0x85, loop);
        for (int r = 0; r < 4 * chains; r++) e.EvexRM(1, 0, 0x11, r, 0, X64Code.Rdx, 64 * r, 64);
        e.Bytes(0xC5, 0xF8, 0x77, 0xC3);
        var page = X64Code.ExecutablePage(e.ToArray(), out string why);
        if (page == null) throw new InvalidOperationException(why);
        return (delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void>)page;
    }

    private static void Asm(Mat m, float* x, float* y, int tilesAhead)
    {
        float* acc = stackalloc float[64];
        int k = m.K;
        for (int r = 0; r + 4 <= m.N; r += 4)
        {
            ushort* w0 = m.W + (long)r * k;
            MatVecF16Asm.Rows4(w0, x, acc, k / 16, 2L * k, (byte*)(w0 + 4L * k * tilesAhead));
            y[r] = Vector512.Sum(Vector512.Load(acc)); y[r + 1] = Vector512.Sum(Vector512.Load(acc + 16));
            y[r + 2] = Vector512.Sum(Vector512.Load(acc + 32)); y[r + 3] = Vector512.Sum(Vector512.Load(acc + 48));
        }
    }

    private static void Managed(Mat m, float* x, float* y, bool prefetch)
    {
        int k = m.K;
        for (int r = 0; r + 4 <= m.N; r += 4)
        {
            ushort* w0 = m.W + (long)r * k, w1 = w0 + k, w2 = w1 + k, w3 = w2 + k;
            byte* next = (byte*)(w0 + 4L * k);
            Vector512<float> a0 = default, a1 = default, a2 = default, a3 = default;
            for (int j = 0; j < k; j += 16, next += 128)
            {
                if (prefetch) { Sse.Prefetch0(next); Sse.Prefetch0(next + 64); }
                var vx = Vector512.Load(x + j);
                a0 = Vector512.FusedMultiplyAdd(PackedGemm.F16x16(w0 + j), vx, a0);
                a1 = Vector512.FusedMultiplyAdd(PackedGemm.F16x16(w1 + j), vx, a1);
                a2 = Vector512.FusedMultiplyAdd(PackedGemm.F16x16(w2 + j), vx, a2);
                a3 = Vector512.FusedMultiplyAdd(PackedGemm.F16x16(w3 + j), vx, a3);
            }
            y[r] = Vector512.Sum(a0); y[r + 1] = Vector512.Sum(a1); y[r + 2] = Vector512.Sum(a2); y[r + 3] = Vector512.Sum(a3);
        }
    }
}
