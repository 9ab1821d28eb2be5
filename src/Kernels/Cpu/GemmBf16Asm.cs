using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// The AVX512_BF16 micro-kernel of <see cref="GemmBf16"/> as machine code: .NET 10 has no intrinsic for
/// VDPBF16PS (no Avx512Bf16 class; Avx10v1/Avx10v2 expose no bf16 dot product, checked by reflection on 10.0.12),
/// so the 12×32 kernel is encoded here byte by byte, copied into an executable page (<see cref="X64Code"/>: written
/// while PROT_READ|WRITE, then switched to PROT_READ|EXEC) and called through an unmanaged function pointer.
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
        void* page = X64Code.ExecutablePage(code, out string why);
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
        string why = X64Code.Unsupported();
        if (why.Length > 0) return why;
        if (!CpuHasAvx512Bf16()) return "the CPU has no AVX512_BF16 (CPUID leaf 7 sub-leaf 1 EAX bit 5)";
        return "";
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
        var e = new X64Code.Emitter();
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

    private const int Rax = X64Code.Rax, Rcx = X64Code.Rcx, Rdx = X64Code.Rdx, Rsi = X64Code.Rsi;
}
