using System.Runtime.InteropServices;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// The AVX512_BF16 micro-kernel of <see cref="GemmBf16"/> as machine code: .NET 10 has no intrinsic for
/// VDPBF16PS (no Avx512Bf16 class; Avx10v1/Avx10v2 expose no bf16 dot product, checked by reflection on 10.0.12),
/// so the 12×32 kernel is encoded here byte by byte, copied into an executable page (written while PROT_READ|WRITE,
/// then switched to PROT_READ|EXEC: never writable and executable at once) and called through an unmanaged
/// function pointer.
/// </summary>
/// <remarks>
/// Available only on x64 Linux (the System V calling convention and mmap/mprotect) when CPUID reports AVX512_BF16
/// (leaf 7 sub-leaf 1, EAX bit 5) and AVX-512F; everywhere else <see cref="Kernel"/> is null and GemmBf16 is not
/// used. The encoding can be checked with
/// <c>objdump -D -b binary -mi386:x86-64 kernel.bin</c> on the bytes of <see cref="Encode"/> (the test
/// GemmBf16Tests.Encoding_Disassembles_To_The_Documented_Instructions does that when objdump is installed).
/// </remarks>
internal static unsafe class GemmBf16Asm
{
    /// <summary>Rows of the register tile (rows of A per kernel call).</summary>
    public const int MR = 12;
    /// <summary>Columns of the register tile (two zmm of 16 f32 accumulators per row).</summary>
    public const int NR = 32;

    /// <summary>
    /// kernel(kp, a, b, c, ldcBytes, beta): C[r, j] = (beta ? C[r, j] : 0) + Σ_q Σ_{e=0,1} A2[q][r].bf16[e]·B2[q][j].bf16[e]
    /// for r &lt; 12, j &lt; 32, where A2 = a (kp × 12 dwords: the k-pair (2q, 2q+1) of row r) and B2 = b (kp × 32 dwords:
    /// the k-pair of column j), f32 accumulation. kp ≥ 1. C rows are ldcBytes apart, 128 bytes each (unaligned is fine).
    /// </summary>
    public static readonly delegate* unmanaged[Cdecl, SuppressGCTransition]<long, uint*, uint*, float*, long, long, void> Kernel;

    /// <summary>Why <see cref="Kernel"/> is null (empty when it is available).</summary>
    public static readonly string Unavailable = "";

    static GemmBf16Asm()
    {
        Unavailable = Probe();
        if (Unavailable.Length > 0) return;
        byte[] code = Encode();
        void* page = ExecutablePage(code, out string why);
        if (page == null) { Unavailable = why; return; }
        Kernel = (delegate* unmanaged[Cdecl, SuppressGCTransition]<long, uint*, uint*, float*, long, long, void>)page;
    }

    /// <summary>True when the CPU has AVX512_BF16 (CPUID.(EAX=7,ECX=1):EAX bit 5) and AVX-512F.</summary>
    public static bool CpuHasAvx512Bf16()
    {
        if (!X86Base.IsSupported || !Avx512F.IsSupported) return false;
        var (maxLeaf, _, _, _) = X86Base.CpuId(0, 0);
        if (maxLeaf < 7) return false;
        var (eax, _, _, _) = X86Base.CpuId(7, 1);
        return (eax & (1 << 5)) != 0;
    }

    private static string Probe()
    {
        if (RuntimeInformation.ProcessArchitecture != Architecture.X64) return $"not x64 ({RuntimeInformation.ProcessArchitecture})";
        if (!OperatingSystem.IsLinux()) return "the hand-assembled kernel is built for Linux only (System V calls, mmap)";
        if (!CpuHasAvx512Bf16()) return "the CPU has no AVX512_BF16 (CPUID leaf 7 sub-leaf 1 EAX bit 5)";
        return "";
    }

    // ------------------------------------------------------------------ executable memory (Linux)

    private const int PROT_READ = 1, PROT_WRITE = 2, PROT_EXEC = 4, MAP_PRIVATE = 2, MAP_ANONYMOUS = 0x20;

    [DllImport("libc", EntryPoint = "mmap", SetLastError = true)]
    private static extern void* Mmap(void* addr, nuint length, int prot, int flags, int fd, nint offset);

    [DllImport("libc", EntryPoint = "mprotect", SetLastError = true)]
    private static extern int Mprotect(void* addr, nuint length, int prot);

    /// <summary>A fresh page holding <paramref name="code"/>, read+execute only; null (and the reason) on failure.</summary>
    private static void* ExecutablePage(byte[] code, out string why)
    {
        nuint size = (nuint)((code.Length + 4095) & ~4095);
        try
        {
            void* p = Mmap(null, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == (void*)-1 || p == null) { why = $"mmap failed (errno {Marshal.GetLastPInvokeError()})"; return null; }
            code.CopyTo(new Span<byte>(p, code.Length));
            if (Mprotect(p, size, PROT_READ | PROT_EXEC) != 0) { why = $"mprotect(PROT_READ|PROT_EXEC) refused (errno {Marshal.GetLastPInvokeError()})"; return null; }
            why = "";
            return p; // kept for the life of the process (one page)
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            why = "libc mmap/mprotect not found: " + e.Message;
            return null;
        }
    }

    // ------------------------------------------------------------------ the code

    /// <summary>
    /// The kernel's machine code. Registers: zmm0..zmm23 accumulators (row r, column half h in zmm(2r+h)), zmm24/25 the
    /// two 16-column halves of B's k-pair row, zmm26..29 broadcasts of A's k-pair (rotating). Arguments (System V):
    /// rdi = kp, rsi = a, rdx = b, rcx = c, r8 = ldc in bytes, r9 = beta.
    /// <code>
    ///       vpxord   zmm(i), zmm(i), zmm(i)          ; i = 0..23
    /// loop: vmovups  zmm24, [rdx]
    ///       vmovups  zmm25, [rdx+64]
    ///       ; r = 0..11:
    ///       vpbroadcastd zmm(26 + r%4), [rsi + 4r]
    ///       vdpbf16ps zmm(2r),   zmm24, zmm(26 + r%4)
    ///       vdpbf16ps zmm(2r+1), zmm25, zmm(26 + r%4)
    ///       add      rsi, 48
    ///       sub      rdx, -128
    ///       dec      rdi
    ///       jnz      loop
    ///       test     r9, r9
    ///       jz       store
    ///       mov      rax, rcx
    ///       ; r = 0..11: vaddps zmm(2r), zmm(2r), [rax]; vaddps zmm(2r+1), zmm(2r+1), [rax+64]; add rax, r8
    /// store: ; r = 0..11: vmovups [rcx], zmm(2r); vmovups [rcx+64], zmm(2r+1); add rcx, r8
    ///       vzeroupper
    ///       ret
    /// </code>
    /// </summary>
    public static byte[] Encode()
    {
        var e = new Emitter();
        for (int i = 0; i < 2 * MR; i++) e.EvexRR(map: 1, pp: 1, op: 0xEF, reg: i, vvvv: i, rm: i); // vpxord
        int loop = e.Position;
        e.EvexRM(map: 1, pp: 0, op: 0x10, reg: 24, vvvv: 0, baseReg: Rdx, disp: 0, n: 64);          // vmovups zmm24, [rdx]
        e.EvexRM(map: 1, pp: 0, op: 0x10, reg: 25, vvvv: 0, baseReg: Rdx, disp: 64, n: 64);         // vmovups zmm25, [rdx+64]
        for (int r = 0; r < MR; r++)
        {
            int bc = 26 + r % 4;
            e.EvexRM(map: 2, pp: 1, op: 0x58, reg: bc, vvvv: 0, baseReg: Rsi, disp: 4 * r, n: 4);  // vpbroadcastd zmm, [rsi+4r]
            e.EvexRR(map: 2, pp: 2, op: 0x52, reg: 2 * r, vvvv: 24, rm: bc);                       // vdpbf16ps zmm(2r), zmm24, zmm(bc)
            e.EvexRR(map: 2, pp: 2, op: 0x52, reg: 2 * r + 1, vvvv: 25, rm: bc);                   // vdpbf16ps zmm(2r+1), zmm25, zmm(bc)
        }
        e.Bytes(0x48, 0x83, 0xC6, 4 * MR);          // add rsi, 48
        e.Bytes(0x48, 0x83, 0xEA, 0x80);            // sub rdx, -128
        e.Bytes(0x48, 0xFF, 0xCF);                  // dec rdi
        e.Jcc(0x85, loop);                          // jnz loop (rel32)
        e.Bytes(0x4D, 0x85, 0xC9);                  // test r9, r9
        int jzAt = e.Jcc(0x84, 0);                  // jz store (patched below)
        e.Bytes(0x48, 0x89, 0xC8);                  // mov rax, rcx
        for (int r = 0; r < MR; r++)
        {
            e.EvexRM(map: 1, pp: 0, op: 0x58, reg: 2 * r, vvvv: 2 * r, baseReg: Rax, disp: 0, n: 64);          // vaddps zmm, zmm, [rax]
            e.EvexRM(map: 1, pp: 0, op: 0x58, reg: 2 * r + 1, vvvv: 2 * r + 1, baseReg: Rax, disp: 64, n: 64); // vaddps zmm, zmm, [rax+64]
            e.Bytes(0x4C, 0x01, 0xC0);                                                                          // add rax, r8
        }
        e.PatchRel32(jzAt, e.Position);
        for (int r = 0; r < MR; r++)
        {
            e.EvexRM(map: 1, pp: 0, op: 0x11, reg: 2 * r, vvvv: 0, baseReg: Rcx, disp: 0, n: 64);      // vmovups [rcx], zmm
            e.EvexRM(map: 1, pp: 0, op: 0x11, reg: 2 * r + 1, vvvv: 0, baseReg: Rcx, disp: 64, n: 64); // vmovups [rcx+64], zmm
            e.Bytes(0x4C, 0x01, 0xC1);                                                                  // add rcx, r8
        }
        e.Bytes(0xC5, 0xF8, 0x77);                  // vzeroupper
        e.Bytes(0xC3);                              // ret
        return e.ToArray();
    }

    private const int Rax = 0, Rcx = 1, Rdx = 2, Rsi = 6;

    /// <summary>Just enough of an x86-64 encoder for the kernel: 512-bit EVEX forms without masking or embedded broadcast.</summary>
    private sealed class Emitter
    {
        private readonly List<byte> _b = new();
        public int Position => _b.Count;
        public byte[] ToArray() => _b.ToArray();
        public void Bytes(params int[] bytes) { foreach (int x in bytes) _b.Add((byte)x); }

        /// <summary>
        /// EVEX prefix 62 P0 P1 P2 for a 512-bit, unmasked, W0 instruction. P0 = R̄ X̄ B̄ R̄' 0 0 m m (register bits 3 and 4
        /// inverted; map 1 = 0F, 2 = 0F38); P1 = W v̄v̄v̄v̄ 1 pp (pp 0 = none, 1 = 66, 2 = F3); P2 = z L'L b V̄' aaa with L'L = 10.
        /// </summary>
        private void Evex(int map, int pp, int reg, int vvvv, int rmHigh, int xHigh)
        {
            int p0 = ((~reg >> 3) & 1) << 7 | ((~xHigh) & 1) << 6 | ((~rmHigh) & 1) << 5 | ((~reg >> 4) & 1) << 4 | map;
            int p1 = 0 << 7 | ((~vvvv) & 0xF) << 3 | 0x04 | pp;
            int p2 = 0 << 7 | 2 << 5 | 0 << 4 | ((~vvvv >> 4) & 1) << 3 | 0;
            Bytes(0x62, p0, p1, p2);
        }

        /// <summary>op zmm(reg), zmm(vvvv), zmm(rm).</summary>
        public void EvexRR(int map, int pp, int op, int reg, int vvvv, int rm)
        {
            Evex(map, pp, reg, vvvv, rmHigh: (rm >> 3) & 1, xHigh: (rm >> 4) & 1);
            Bytes(op, 0xC0 | (reg & 7) << 3 | (rm & 7));
        }

        /// <summary>op zmm(reg), [zmm(vvvv),] [base + disp] with EVEX's compressed disp8 (disp / n when it divides).</summary>
        public void EvexRM(int map, int pp, int op, int reg, int vvvv, int baseReg, int disp, int n)
        {
            if (baseReg is 4 or 5 or > 7) throw new ArgumentException("base must be rax/rcx/rdx/rbx/rsi/rdi (no SIB, no REX.B)");
            Evex(map, pp, reg, vvvv, rmHigh: 0, xHigh: 0);
            if (disp == 0) Bytes(op, 0x00 | (reg & 7) << 3 | baseReg);
            else if (disp % n == 0 && disp / n is >= -128 and <= 127) Bytes(op, 0x40 | (reg & 7) << 3 | baseReg, (sbyte)(disp / n));
            else { Bytes(op, 0x80 | (reg & 7) << 3 | baseReg); Bytes(disp & 0xFF, (disp >> 8) & 0xFF, (disp >> 16) & 0xFF, (disp >> 24) & 0xFF); }
        }

        /// <summary>0F cc rel32 to <paramref name="target"/>; returns the position of the rel32 field.</summary>
        public int Jcc(int cc, int target)
        {
            Bytes(0x0F, cc);
            int at = Position;
            int rel = target - (at + 4);
            Bytes(rel & 0xFF, (rel >> 8) & 0xFF, (rel >> 16) & 0xFF, (rel >> 24) & 0xFF);
            return at;
        }

        public void PatchRel32(int at, int target)
        {
            int rel = target - (at + 4);
            for (int i = 0; i < 4; i++) _b[at + i] = (byte)(rel >> (8 * i));
        }
    }
}
