using System.Runtime.CompilerServices;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// The f16-weight decode product (GEMV: row-major rows and packed 16-row panels) and the f16 → f32 widening as machine code built on VCVTPH2PS (AVX-512F,
/// EVEX.512.66.0F38.W0 13 /r: 16 halves → 16 floats, exact for every half including subnormals, ±inf and NaN). .NET 10
/// exposes no F16C/AVX512-FP16 conversion intrinsic, so without it a widening costs 4 AVX-512 instructions per 16
/// halves (<see cref="Quant.PackedGemm.F16x16"/>); here it is one, folded into the load. Same route as
/// <see cref="GemmBf16Asm"/>: encoded byte by byte, written into an executable page (<see cref="X64Code"/>), called
/// through unmanaged function pointers.
/// </summary>
/// <remarks>
/// Available on x64 Linux when the CPU has AVX-512F; elsewhere <see cref="Rows4"/> is null and the callers run their
/// managed widening. The bytes can be checked with <c>objdump -D -b binary -mi386:x86-64</c> on <see cref="Encode"/>
/// (MatVecF16AsmTests.Encoding_Disassembles_To_The_Documented_Instructions). Reference: MatMulReference.Forward on the
/// f16 values (tests/Kernels/MatVecF16AsmTests.cs).
/// </remarks>
internal static unsafe class MatVecF16Asm
{
    /// <summary>
    /// rows4(w, x, acc, n16, strideBytes, prefetch): for r &lt; 4, acc[16r .. 16r+16) = Σ_{q &lt; n16} f32(w_r[16q .. 16q+16)) ⊙ x[16q ..
    /// 16q+16) with one fused multiply-add chain per row (lane-wise: the caller reduces the 16 lanes), w_r = w + r·strideBytes
    /// (f16 rows), n16 ≥ 1. Requests 128 bytes at prefetch (prefetcht0) per 16 columns: pass the next 4-row tile, which
    /// is 4·32 bytes per step of the current one when the rows are contiguous (this VM's hardware prefetcher does not keep
    /// row streams ahead: see MatVec's Prefetch). A prefetch never faults, so the address may pass the end of the weights.
    /// </summary>
    public static readonly delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void> Rows4;

    /// <summary>rows1(w, x, acc, n16): acc[0..16) = Σ_{q &lt; n16} f32(w[16q..]) ⊙ x[16q..], one chain (the rows past the last tile of 4).</summary>
    public static readonly delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, void> Rows1;

    /// <summary>widen(src, dst, n16): dst[0 .. 16·n16) = f32(src[0 .. 16·n16)), n16 ≥ 1, exactly (NaN stays NaN, quieted).</summary>
    public static readonly delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, long, void> Widen;

    /// <summary>
    /// panel16(panel, x, y16, k4, prefetch): y16[c] = Σ_{k &lt; 4·k4} f32(panel[16k + c])·x[k] for the 16 rows c of a packed
    /// f16 panel (<see cref="Quant.PackedMatrix"/>: element k of row c at 16k + c), k4 ≥ 1; four FMA chains (k mod 4)
    /// added as (c0 + c1) + (c2 + c3) at the end; x[k] broadcast from memory. Requests 128 bytes at prefetch per 4
    /// columns: pass the next panel (32·K bytes on).
    /// </summary>
    public static readonly delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, byte*, void> Panel16;

    /// <summary>Why the kernels are null (empty when they are available).</summary>
    public static readonly string Unavailable = "";

    /// <summary>
    /// Tests: the calling thread runs the managed paths even where the kernels exist (proves the fallback). Per thread,
    /// so a test that forces it does not change what other tests running in parallel measure.
    /// </summary>
    [ThreadStatic] internal static bool ForceFallback;

    /// <summary>True when the machine-code kernels run on this thread.</summary>
    public static bool IsAvailable
    {
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        get => Rows4 != null && !ForceFallback;
    }

    /// <summary>Byte offsets of the three entry points inside <see cref="Encode"/>'s code.</summary>
    public static readonly (int Rows4, int Rows1, int Widen, int Panel16) Entries;

    static MatVecF16Asm()
    {
        byte[] code = Encode(out Entries);
        Unavailable = X64Code.Unsupported();
        if (Unavailable.Length > 0) return;
        byte* page = (byte*)X64Code.ExecutablePage(code, out string why);
        if (page == null) { Unavailable = why; return; }
        Rows4 = (delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, long, byte*, void>)(page + Entries.Rows4);
        Rows1 = (delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, void>)(page + Entries.Rows1);
        Widen = (delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, long, void>)(page + Entries.Widen);
        Panel16 = (delegate* unmanaged[Cdecl, SuppressGCTransition]<ushort*, float*, float*, long, byte*, void>)(page + Entries.Panel16);
    }

    private const int Rax = X64Code.Rax, Rcx = X64Code.Rcx, Rdx = X64Code.Rdx, Rsi = X64Code.Rsi, Rdi = X64Code.Rdi,
        R10 = X64Code.R10, R11 = X64Code.R11;

    /// <summary>
    /// The machine code of the three kernels, each starting on a 64-byte boundary. Arguments (System V): rdi, rsi, rdx, rcx,
    /// r8, r9. zmm0..3 accumulators (row r in zmm r), zmm4..7 widened weights, zmm8 the activations.
    /// <code>
    /// rows4: vpxord zmm0..3
    ///        lea rax, [rdi+r8]; lea r10, [rax+r8]; lea r11, [r10+r8]       ; rows 1..3
    /// loop:  vmovups zmm8, [rsi]
    ///        vcvtph2ps zmm4, [rdi]; vcvtph2ps zmm5, [rax]; vcvtph2ps zmm6, [r10]; vcvtph2ps zmm7, [r11]
    ///        vfmadd231ps zmm(r), zmm(4+r), zmm8                             ; r = 0..3
    ///        prefetcht0 [r9]; prefetcht0 [r9+64]
    ///        add rdi, 32; add rax, 32; add r10, 32; add r11, 32; add rsi, 64; sub r9, -128
    ///        dec rcx; jnz loop
    ///        vmovups [rdx + 64r], zmm(r)                                    ; r = 0..3
    ///        vzeroupper; ret
    /// rows1: vpxord zmm0
    /// loop:  vcvtph2ps zmm4, [rdi]; vfmadd231ps zmm0, zmm4, [rsi]
    ///        add rdi, 32; add rsi, 64; dec rcx; jnz loop
    ///        vmovups [rdx], zmm0; vzeroupper; ret
    /// widen: vcvtph2ps zmm0, [rdi]; vmovups [rsi], zmm0; add rdi, 32; add rsi, 64; dec rdx; jnz widen
    ///        vzeroupper; ret
    /// panel16: vpxord zmm0..3
    /// loop:  prefetcht0 [r8]; prefetcht0 [r8+64]
    ///        vbroadcastss zmm(8+u), [rsi+4u]; vcvtph2ps zmm(4+u), [rdi+32u]; vfmadd231ps zmm(u), zmm(4+u), zmm(8+u)   ; u = 0..3
    ///        sub rdi, -128; add rsi, 16; sub r8, -128; dec rcx; jnz loop
    ///        vaddps zmm0, zmm0, zmm1; vaddps zmm2, zmm2, zmm3; vaddps zmm0, zmm0, zmm2
    ///        vmovups [rdx], zmm0; vzeroupper; ret
    /// </code>
    /// </summary>
    public static byte[] Encode(out (int Rows4, int Rows1, int Widen, int Panel16) entries)
    {
        var e = new X64Code.Emitter();
        int[] rowBase = { Rdi, Rax, R10, R11 };

        int rows4 = e.Position;
        for (int r = 0; r < 4; r++) e.EvexRR(map: 1, pp: 1, op: 0xEF, reg: r, vvvv: r, rm: r);             // vpxord zmm(r)
        e.Bytes(0x4A, 0x8D, 0x04, 0x07);                                                                     // lea rax, [rdi+r8]
        e.Bytes(0x4E, 0x8D, 0x14, 0x00);                                                                     // lea r10, [rax+r8]
        e.Bytes(0x4F, 0x8D, 0x1C, 0x02);                                                                     // lea r11, [r10+r8]
        int loop4 = e.Position;
        e.EvexRM(map: 1, pp: 0, op: 0x10, reg: 8, vvvv: 0, baseReg: Rsi, disp: 0, n: 64);                   // vmovups zmm8, [rsi]
        for (int r = 0; r < 4; r++) e.EvexRM(map: 2, pp: 1, op: 0x13, reg: 4 + r, vvvv: 0, baseReg: rowBase[r], disp: 0, n: 32); // vcvtph2ps zmm(4+r), [row r]
        for (int r = 0; r < 4; r++) e.EvexRR(map: 2, pp: 1, op: 0xB8, reg: r, vvvv: 4 + r, rm: 8);          // vfmadd231ps zmm(r), zmm(4+r), zmm8
        e.Bytes(0x41, 0x0F, 0x18, 0x09);                                                                     // prefetcht0 [r9]
        e.Bytes(0x41, 0x0F, 0x18, 0x49, 0x40);                                                               // prefetcht0 [r9+64]
        e.Bytes(0x48, 0x83, 0xC7, 0x20);                                                                     // add rdi, 32
        e.Bytes(0x48, 0x83, 0xC0, 0x20);                                                                     // add rax, 32
        e.Bytes(0x49, 0x83, 0xC2, 0x20);                                                                     // add r10, 32
        e.Bytes(0x49, 0x83, 0xC3, 0x20);                                                                     // add r11, 32
        e.Bytes(0x48, 0x83, 0xC6, 0x40);                                                                     // add rsi, 64
        e.Bytes(0x49, 0x83, 0xE9, 0x80);                                                                     // sub r9, -128
        e.Bytes(0x48, 0xFF, 0xC9);                                                                           // dec rcx
        e.Jcc(0x85, loop4);                                                                                  // jnz loop4
        for (int r = 0; r < 4; r++) e.EvexRM(map: 1, pp: 0, op: 0x11, reg: r, vvvv: 0, baseReg: Rdx, disp: 64 * r, n: 64); // vmovups [rdx+64r], zmm(r)
        e.Bytes(0xC5, 0xF8, 0x77);                                                                           // vzeroupper
        e.Bytes(0xC3);                                                                                       // ret

        Align64(e);
        int rows1 = e.Position;
        e.EvexRR(map: 1, pp: 1, op: 0xEF, reg: 0, vvvv: 0, rm: 0);                                          // vpxord zmm0
        int loop1 = e.Position;
        e.EvexRM(map: 2, pp: 1, op: 0x13, reg: 4, vvvv: 0, baseReg: Rdi, disp: 0, n: 32);                   // vcvtph2ps zmm4, [rdi]
        e.EvexRM(map: 2, pp: 1, op: 0xB8, reg: 0, vvvv: 4, baseReg: Rsi, disp: 0, n: 64);                   // vfmadd231ps zmm0, zmm4, [rsi]
        e.Bytes(0x48, 0x83, 0xC7, 0x20);                                                                     // add rdi, 32
        e.Bytes(0x48, 0x83, 0xC6, 0x40);                                                                     // add rsi, 64
        e.Bytes(0x48, 0xFF, 0xC9);                                                                           // dec rcx
        e.Jcc(0x85, loop1);                                                                                  // jnz loop1
        e.EvexRM(map: 1, pp: 0, op: 0x11, reg: 0, vvvv: 0, baseReg: Rdx, disp: 0, n: 64);                   // vmovups [rdx], zmm0
        e.Bytes(0xC5, 0xF8, 0x77);                                                                           // vzeroupper
        e.Bytes(0xC3);                                                                                       // ret

        Align64(e);
        int widen = e.Position;
        e.EvexRM(map: 2, pp: 1, op: 0x13, reg: 0, vvvv: 0, baseReg: Rdi, disp: 0, n: 32);                   // vcvtph2ps zmm0, [rdi]
        e.EvexRM(map: 1, pp: 0, op: 0x11, reg: 0, vvvv: 0, baseReg: Rsi, disp: 0, n: 64);                   // vmovups [rsi], zmm0
        e.Bytes(0x48, 0x83, 0xC7, 0x20);                                                                     // add rdi, 32
        e.Bytes(0x48, 0x83, 0xC6, 0x40);                                                                     // add rsi, 64
        e.Bytes(0x48, 0xFF, 0xCA);                                                                           // dec rdx
        e.Jcc(0x85, widen);                                                                                  // jnz widen
        e.Bytes(0xC5, 0xF8, 0x77);                                                                           // vzeroupper
        e.Bytes(0xC3);                                                                                       // ret

        Align64(e);
        int panel16 = e.Position;
        for (int u = 0; u < 4; u++) e.EvexRR(map: 1, pp: 1, op: 0xEF, reg: u, vvvv: u, rm: u);             // vpxord zmm(u)
        int loopP = e.Position;
        e.Bytes(0x41, 0x0F, 0x18, 0x08);                                                                     // prefetcht0 [r8]
        e.Bytes(0x41, 0x0F, 0x18, 0x48, 0x40);                                                               // prefetcht0 [r8+64]
        for (int u = 0; u < 4; u++)
        {
            e.EvexRM(map: 2, pp: 1, op: 0x18, reg: 8 + u, vvvv: 0, baseReg: Rsi, disp: 4 * u, n: 4);         // vbroadcastss zmm(8+u), [rsi+4u]
            e.EvexRM(map: 2, pp: 1, op: 0x13, reg: 4 + u, vvvv: 0, baseReg: Rdi, disp: 32 * u, n: 32);       // vcvtph2ps zmm(4+u), [rdi+32u]
            e.EvexRR(map: 2, pp: 1, op: 0xB8, reg: u, vvvv: 4 + u, rm: 8 + u);                               // vfmadd231ps zmm(u), zmm(4+u), zmm(8+u)
        }
        e.Bytes(0x48, 0x83, 0xEF, 0x80);                                                                     // sub rdi, -128
        e.Bytes(0x48, 0x83, 0xC6, 0x10);                                                                     // add rsi, 16
        e.Bytes(0x49, 0x83, 0xE8, 0x80);                                                                     // sub r8, -128
        e.Bytes(0x48, 0xFF, 0xC9);                                                                           // dec rcx
        e.Jcc(0x85, loopP);                                                                                  // jnz loopP
        e.EvexRR(map: 1, pp: 0, op: 0x58, reg: 0, vvvv: 0, rm: 1);                                          // vaddps zmm0, zmm0, zmm1
        e.EvexRR(map: 1, pp: 0, op: 0x58, reg: 2, vvvv: 2, rm: 3);                                          // vaddps zmm2, zmm2, zmm3
        e.EvexRR(map: 1, pp: 0, op: 0x58, reg: 0, vvvv: 0, rm: 2);                                          // vaddps zmm0, zmm0, zmm2
        e.EvexRM(map: 1, pp: 0, op: 0x11, reg: 0, vvvv: 0, baseReg: Rdx, disp: 0, n: 64);                   // vmovups [rdx], zmm0
        e.Bytes(0xC5, 0xF8, 0x77);                                                                           // vzeroupper
        e.Bytes(0xC3);                                                                                       // ret

        entries = (rows4, rows1, widen, panel16);
        return e.ToArray();
    }

    /// <summary>Pads with int3 (never executed: every kernel ends in ret) to the next 64-byte boundary.</summary>
    private static void Align64(X64Code.Emitter e)
    {
        while (e.Position % 64 != 0) e.Bytes(0xCC);
    }
}
