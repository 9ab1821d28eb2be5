using System.Runtime.InteropServices;
using System.Runtime.Intrinsics.X86;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// What the hand-encoded x64 kernels share (<see cref="GemmBf16Asm"/>, <see cref="MatVecF16Asm"/>): the platform probe,
/// an executable page (written while PROT_READ|WRITE, then switched to PROT_READ|EXEC: never writable and executable
/// at once) and a small EVEX/legacy encoder. x64 Linux only (System V calls, mmap/mprotect).
/// </summary>
internal static unsafe class X64Code
{
    /// <summary>Why hand-encoded kernels cannot run here (not x64, not Linux, no AVX-512F); empty when they can.</summary>
    public static string Unsupported()
    {
        if (RuntimeInformation.ProcessArchitecture != Architecture.X64) return $"not x64 ({RuntimeInformation.ProcessArchitecture})";
        if (!OperatingSystem.IsLinux()) return "the hand-assembled kernels are built for Linux only (System V calls, mmap)";
        if (!X86Base.IsSupported || !Avx512F.IsSupported) return "the CPU (or the runtime) has no AVX-512F";
        return "";
    }

    private const int PROT_READ = 1, PROT_WRITE = 2, PROT_EXEC = 4, MAP_PRIVATE = 2, MAP_ANONYMOUS = 0x20;

    [DllImport("libc", EntryPoint = "mmap", SetLastError = true)]
    private static extern void* Mmap(void* addr, nuint length, int prot, int flags, int fd, nint offset);

    [DllImport("libc", EntryPoint = "mprotect", SetLastError = true)]
    private static extern int Mprotect(void* addr, nuint length, int prot);

    /// <summary>Fresh pages holding <paramref name="code"/>, read+execute only; null (and the reason) on failure.</summary>
    public static void* ExecutablePage(byte[] code, out string why)
    {
        nuint size = (nuint)((code.Length + 4095) & ~4095);
        try
        {
            void* p = Mmap(null, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == (void*)-1 || p == null) { why = $"mmap failed (errno {Marshal.GetLastPInvokeError()})"; return null; }
            code.CopyTo(new Span<byte>(p, code.Length));
            if (Mprotect(p, size, PROT_READ | PROT_EXEC) != 0) { why = $"mprotect(PROT_READ|PROT_EXEC) refused (errno {Marshal.GetLastPInvokeError()})"; return null; }
            why = "";
            return p; // kept for the life of the process
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            why = "libc mmap/mprotect not found: " + e.Message;
            return null;
        }
    }

    public const int Rax = 0, Rcx = 1, Rdx = 2, Rsi = 6, Rdi = 7, R8 = 8, R9 = 9, R10 = 10, R11 = 11;

    /// <summary>Just enough of an x86-64 encoder for the kernels: 512-bit EVEX forms without masking or embedded broadcast.</summary>
    public sealed class Emitter
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

        /// <summary>
        /// op zmm(reg), [zmm(vvvv),] [base + disp] with EVEX's compressed disp8 (disp / n when it divides); base is a
        /// general register 0..15 other than rsp/rbp/r12/r13 (those need a SIB byte or a displacement: not needed here).
        /// </summary>
        public void EvexRM(int map, int pp, int op, int reg, int vvvv, int baseReg, int disp, int n)
        {
            if ((baseReg & 7) is 4 or 5 || baseReg > 15) throw new ArgumentException("base must be rax/rcx/rdx/rbx/rsi/rdi/r8-r11/r14/r15 (no SIB)");
            Evex(map, pp, reg, vvvv, rmHigh: (baseReg >> 3) & 1, xHigh: 0);
            int b = baseReg & 7;
            if (disp == 0) Bytes(op, 0x00 | (reg & 7) << 3 | b);
            else if (disp % n == 0 && disp / n is >= -128 and <= 127) Bytes(op, 0x40 | (reg & 7) << 3 | b, (sbyte)(disp / n));
            else { Bytes(op, 0x80 | (reg & 7) << 3 | b); Bytes(disp & 0xFF, (disp >> 8) & 0xFF, (disp >> 16) & 0xFF, (disp >> 24) & 0xFF); }
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
