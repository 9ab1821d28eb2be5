using System.Diagnostics;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// binutils' objdump over the raw x86-64 bytes of a hand-encoded kernel (GemmBf16Asm, MatVecF16Asm): the tests assert
/// that the encoder wrote the instructions its comments document.
/// </summary>
internal static class X64Disassembly
{
    public const string Objdump = "/usr/bin/objdump";

    /// <summary>(offset, instruction in AT&amp;T order with single spaces) per decoded instruction; padding int3 dropped.</summary>
    public static List<(int At, string Text)> Disassemble(byte[] code, string name)
    {
        string path = Path.Combine(Path.GetTempPath(), $"ftn-{name}-{Environment.ProcessId}-{Guid.NewGuid():N}.bin");
        File.WriteAllBytes(path, code);
        try
        {
            var psi = new ProcessStartInfo(Objdump, $"-D -b binary -mi386:x86-64 \"{path}\"") { RedirectStandardOutput = true, UseShellExecute = false };
            using var p = Process.Start(psi)!;
            string text = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            return text.Split('\n').Select(l => l.Split('\t')).Where(f => f.Length >= 3)
                .Select(f => (At: Convert.ToInt32(f[0].Trim().TrimEnd(':'), 16), Text: string.Join(' ', f[2].Split(' ', StringSplitOptions.RemoveEmptyEntries))))
                .Where(i => i.Text != "int3").ToList();
        }
        finally { File.Delete(path); }
    }
}
