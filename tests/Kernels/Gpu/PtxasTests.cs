using System.Diagnostics;
using System.Reflection;
using System.Text;
using System.Text.RegularExpressions;
using FineTuneNative.Kernels.Gpu;
using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The static GPU proof: every ILGPU kernel (<see cref="GpuKernelCatalog"/>) is compiled to PTX by ILGPU's PTX
/// backend (no GPU needed) and assembled by NVIDIA's ptxas for sm_80 (A100) and sm_90 (H100). The registers,
/// spills and shared memory ptxas reports are written to docs/kernels.md. Without ptxas the test skips with the
/// reason, except under CI=true, where ptxas is mandatory and its absence fails.
/// </summary>
public class PtxasTests
{
    /// <summary>(name, ILGPU architecture, PTX ISA). ISA 7.0 is the oldest that knows sm_80; sm_90 needs 7.8,
    /// which is also the newest ptxas 11.8 (Debian's nvidia-cuda-toolkit) accepts.</summary>
    private static readonly (string Arch, CudaArchitecture Architecture, CudaInstructionSet Isa)[] Targets =
    {
        ("sm_80", CudaArchitecture.SM_80, CudaInstructionSet.ISA_70),
        ("sm_90", CudaArchitecture.SM_90, CudaInstructionSet.ISA_78),
    };

    public sealed record PtxasReport(string Kernel, string Arch, int Registers, int SpillStores, int SpillLoads, int StackFrame, int SharedBytes)
    {
        /// <summary>From cuobjdump -sass when available: HMMA instructions and local-memory accesses (LDL/STL).</summary>
        public int? Hmma { get; set; }
        public int? LocalAccesses { get; set; }
        /// <summary>LDGSTS (cp.async global -> shared) instructions in the SASS.</summary>
        public int? Ldgsts { get; set; }
        public bool TensorCore { get; set; }
    }

    private static string? FindPtxas()
    {
        var candidates = new List<string>();
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
            candidates.Add(Path.Combine(dir, "ptxas"));
        var cudaHome = Environment.GetEnvironmentVariable("CUDA_HOME") ?? Environment.GetEnvironmentVariable("CUDA_PATH");
        if (cudaHome is not null) candidates.Add(Path.Combine(cudaHome, "bin", "ptxas"));
        candidates.Add("/usr/local/cuda/bin/ptxas");
        candidates.Add("/usr/bin/ptxas");
        return candidates.FirstOrDefault(File.Exists);
    }

    private static string? FindCuobjdump()
    {
        var ptxas = FindPtxas();
        var dirs = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries).ToList();
        if (ptxas is not null) dirs.Insert(0, Path.GetDirectoryName(ptxas)!);
        dirs.Add("/usr/local/cuda/bin");
        return dirs.Select(d => Path.Combine(d, "cuobjdump")).FirstOrDefault(File.Exists);
    }

    private static bool InCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    [Fact]
    public void CatalogListsEveryKernel()
    {
        var names = GpuKernelCatalog.All().Select(k => k.Name).ToList();
        Assert.Equal(names.Count, names.Distinct().Count());
        foreach (var expected in new[]
                 {
                     "MatMulKernels.MatMulTiledKernel", "AttentionKernels.AttentionForwardKernel", "AttentionKernels.AttentionBackwardQueryKernel",
                     "AttentionKernels.AttentionBackwardKeyValueKernel", "CrossEntropyKernels.CrossEntropyKernel", "RmsNormKernels.RmsNormForwardKernel",
                     "EmbeddingKernels.EmbeddingBackwardKernel", "ElementwiseKernels.BinaryKernel<SwiGluOp>", "ReduceKernels.SumOfSquaresKernel",
                     "MatMulTensorCoreKernels.MatMulTensorCoreKernel<Bf16Operand>", "MatMulTensorCoreKernels.MatMulTensorCoreKernel<F16Operand>",
                     "AttentionTensorCoreKernels.AttentionTensorCoreForwardKernel<Bf16Operand>", "AttentionTensorCoreKernels.AttentionTensorCoreForwardKernel<F16Operand>",
                     "AttentionDecodeKernels.AttentionDecodeSplitKernel", "AttentionDecodeKernels.AttentionDecodeCombineKernel",
                     "AttentionTensorCoreKernels.AttentionTensorCoreBackwardQueryKernel<Bf16Operand>", "AttentionTensorCoreKernels.AttentionTensorCoreBackwardKeyValueKernel<F16Operand>",
                     "AttentionTensorCoreKernels.AttentionTensorCoreBackwardQueryWideKernel<Bf16Operand>", "AttentionTensorCoreKernels.AttentionTensorCoreBackwardKeyValueWideKernel<Bf16Operand>",
                 })
            Assert.Contains(expected, names);
    }

    /// <summary>
    /// Every method a kernel-set class hands to ILGPU (every ldftn in its IL: the delegates passed to
    /// Load*Kernel) must be a [GpuKernel], with its generic instantiation listed, so it cannot escape ptxas.
    /// </summary>
    [Fact]
    public void EveryLoadedKernelIsInTheCatalog()
    {
        var asm = typeof(IlgpuBackend).Assembly;
        var catalog = GpuKernelCatalog.All().Select(k => k.Method).ToHashSet();
        int loaded = 0;
        foreach (var type in asm.GetTypes().Where(t => t.Namespace == typeof(IlgpuBackend).Namespace))
        {
            const BindingFlags all = BindingFlags.Instance | BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly;
            foreach (var method in type.GetMethods(all).Cast<MethodBase>().Concat(type.GetConstructors(all)))
            {
                foreach (var target in LoadedFunctions(method))
                {
                    if (target.DeclaringType?.Assembly != asm || target.Name.Contains('<')) continue; // lambdas are not kernels here
                    var mi = (MethodInfo)target;
                    Assert.True(catalog.Contains(mi),
                        $"{type.Name}.{method.Name} takes the address of {mi.DeclaringType!.Name}.{mi.Name}" +
                        $"{(mi.IsGenericMethod ? "<" + string.Join(",", mi.GetGenericArguments().Select(a => a.Name)) + ">" : "")}, " +
                        "which is not a [GpuKernel] (or its instantiation is not listed): it would escape the ptxas proof");
                    loaded++;
                }
            }
        }
        Assert.True(loaded >= GpuKernelCatalog.All().Count, $"found {loaded} kernel loads, fewer than the {GpuKernelCatalog.All().Count} catalogued kernels");
    }

    private static void NotAKernel(Index1D i) { }

    private static Delegate TakesTheAddressOfAnUnmarkedMethod() => (Action<Index1D>)NotAKernel;

    /// <summary>The IL scan above really sees a delegate made from an unmarked method (so it can fail).</summary>
    [Fact]
    public void LoadScanSeesDelegatesToUnmarkedMethods()
    {
        var scanned = typeof(PtxasTests).GetMethod(nameof(TakesTheAddressOfAnUnmarkedMethod), BindingFlags.NonPublic | BindingFlags.Static)!;
        var found = LoadedFunctions(scanned).ToList();
        Assert.Contains(found, m => m.Name == nameof(NotAKernel));
        Assert.DoesNotContain(GpuKernelCatalog.All(), k => k.Method.Name == nameof(NotAKernel));
    }

    private static IEnumerable<MethodBase> LoadedFunctions(MethodBase method)
    {
        var il = method.GetMethodBody()?.GetILAsByteArray();
        if (il is null) yield break;
        for (int i = 0; i + 5 < il.Length; i++)
        {
            // ldftn = FE 06 <token>; a false match inside an operand fails to resolve and is ignored
            if (il[i] != 0xFE || il[i + 1] != 0x06) continue;
            int token = BitConverter.ToInt32(il, i + 2);
            MethodBase? target = null;
            try
            {
                target = method.Module.ResolveMethod(token,
                    method.DeclaringType?.IsGenericType == true ? method.DeclaringType.GetGenericArguments() : null,
                    method.IsGenericMethod ? method.GetGenericArguments() : null);
            }
            catch (ArgumentException) { }
            if (target is not null) yield return target;
        }
    }

    [SkippableFact]
    public void EveryKernelAssemblesWithPtxas()
    {
        string? ptxas = FindPtxas();
        if (ptxas is null)
        {
            if (InCi) Assert.Fail("ptxas not found (CI=true): install nvidia-cuda-toolkit (Debian non-free) or put CUDA's bin on PATH");
            Skip.If(true, "ptxas not found on PATH or in /usr/local/cuda/bin: the PTX proof is skipped (install nvidia-cuda-toolkit)");
        }

        string? cuobjdump = FindCuobjdump();
        if (cuobjdump is null && InCi) Assert.Fail("cuobjdump not found (CI=true): it comes with ptxas in nvidia-cuda-toolkit; the HMMA check needs it");
        var kernels = GpuKernelCatalog.All();
        var dir = Directory.CreateTempSubdirectory("ftn-ptx-");
        var reports = new List<PtxasReport>();
        var failures = new StringBuilder();
        try
        {
            using var context = Context.Create(b => b.CPU(CPUDevice.Default).Math(MathMode.Default).EnableAlgorithms());
            foreach (var (arch, architecture, isa) in Targets)
            {
                using var backend = new PTXBackend(context, architecture, isa, null!); // no NVVM: ILGPU generates the PTX itself
                foreach (var kernel in kernels)
                {
                    string ptx;
                    try
                    {
                        // tensor-core kernels: exactly the PTX the CUDA path loads (after PtxLocalForwarding)
                        var compiled = !kernel.TensorCore ? (PTXCompiledKernel)backend.Compile(kernel.EntryPoint, new KernelSpecialization())
                            : kernel.Method.DeclaringType == typeof(AttentionTensorCoreKernels) ? AttentionTensorCoreKernels.CompileForwarded(backend, kernel.Method)
                            : MatMulTensorCoreKernels.CompileForwarded(backend, kernel.Method);
                        ptx = compiled.PTXAssembly;
                    }
                    catch (Exception e)
                    {
                        failures.AppendLine($"{kernel.Name} {arch}: ILGPU PTX compile failed: {e.GetBaseException().Message}");
                        continue;
                    }
                    var entry = Regex.Match(ptx, @"\.entry\s+([A-Za-z_$][\w$]*)");
                    Assert.True(entry.Success, $"{kernel.Name}: no .entry in the PTX");
                    string file = Path.Combine(dir.FullName, $"{Sanitize(kernel.Name)}.{arch}");
                    File.WriteAllText(file + ".ptx", ptx);
                    var (code, output) = Run(ptxas, $"-arch={arch} -v \"{file}.ptx\" -o \"{file}.cubin\"");
                    if (code != 0)
                    {
                        failures.AppendLine($"{kernel.Name} {arch}: ptxas exit {code}\n{output}");
                        continue;
                    }
                    var report = Parse(kernel.Name, arch, entry.Groups[1].Value, output);
                    if (report is null)
                    {
                        failures.AppendLine($"{kernel.Name} {arch}: could not read ptxas -v output\n{output}");
                        continue;
                    }
                    report.TensorCore = kernel.TensorCore;
                    if (kernel.TensorCore && report.StackFrame != 0)
                        failures.AppendLine($"{kernel.Name} {arch}: {report.StackFrame} B stack frame (inline-asm operands left in local memory)");
                    if (report.SpillStores != 0 || report.SpillLoads != 0)
                        failures.AppendLine($"{kernel.Name} {arch}: {report.SpillStores} B spill stores, {report.SpillLoads} B spill loads (production kernels must not spill)");
                    if (cuobjdump is not null)
                    {
                        var (sassCode, sass) = Run(cuobjdump, $"-sass \"{file}.cubin\"");
                        if (sassCode != 0) failures.AppendLine($"{kernel.Name} {arch}: cuobjdump exit {sassCode}\n{sass}");
                        report.Hmma = Regex.Matches(sass, @"\bHMMA\.").Count;
                        report.LocalAccesses = Regex.Matches(sass, @"\b(LDL|STL)\b").Count;
                        report.Ldgsts = Regex.Matches(sass, @"\bLDGSTS\b").Count;
                        if (kernel.CpAsync && report.Ldgsts == 0)
                            failures.AppendLine($"{kernel.Name} {arch}: a cp.async kernel without LDGSTS in its SASS (the asynchronous copy was lost)");
                        if (report.Ldgsts < kernel.MinLdgsts)
                            failures.AppendLine($"{kernel.Name} {arch}: {report.Ldgsts} LDGSTS in its SASS, fewer than the {kernel.MinLdgsts} its cp.async paths issue (one was lost)");
                        if (kernel.TensorCore && report.Hmma == 0)
                            failures.AppendLine($"{kernel.Name} {arch}: a tensor-core kernel without HMMA in its SASS (the mma.sync path was lost)");
                        // the m16n8k16 shape and operand type the kernel asks for: HMMA.16816.F32.BF16 (bf16) or HMMA.16816.F32 (f16)
                        string expectedHmma = kernel.Name.Contains("Bf16", StringComparison.Ordinal) ? @"HMMA\.16816\.F32\.BF16\b" : @"HMMA\.16816\.F32 ";
                        if (kernel.TensorCore && !Regex.IsMatch(sass, expectedHmma))
                            failures.AppendLine($"{kernel.Name} {arch}: no {expectedHmma.Replace(@"\", "")} in the SASS");
                        // the decode GEMV's runs of 4 (MatMulGemvKernels.CanVectorize): 16-byte x / f32 W and 8-byte 16-bit W loads
                        // (LD.E.128 / LD.E.64: ILGPU's views are generic pointers, so generic LD rather than LDG)
                        if (kernel.Name.StartsWith("MatMulGemvKernels.", StringComparison.Ordinal) &&
                            (!Regex.IsMatch(sass, @"\bLDG?\.E(\.\w+)*\.128\b") || !Regex.IsMatch(sass, @"\bLDG?\.E(\.\w+)*\.64\b")))
                            failures.AppendLine($"{kernel.Name} {arch}: no 128-bit and 64-bit global loads in the SASS (the GEMV's vector loads were lost); its loads: " + string.Join(" ", Regex.Matches(sass, @"\bLDG?\.[\.\w]*").Select(x => x.Value).Distinct()));
                        if (kernel.TensorCore && report.LocalAccesses != 0)
                            failures.AppendLine($"{kernel.Name} {arch}: {report.LocalAccesses} LDL/STL in the SASS (PtxLocalForwarding no longer removes ILGPU's inline-asm locals)");
                    }
                    reports.Add(report);
                }
            }
        }
        finally
        {
            dir.Delete(recursive: true);
        }
        Assert.True(failures.Length == 0, failures.ToString());
        Assert.Equal(kernels.Count * Targets.Length, reports.Count);
        Assert.Contains(reports, r => r.TensorCore);
        WriteTable(reports, ptxas);
        // visible, not silent: without cuobjdump the HMMA check did not run
        Skip.If(cuobjdump is null, "ptxas passed, but cuobjdump was not found: the SASS HMMA check of the tensor-core kernels was skipped (install nvidia-cuda-toolkit)");
    }

    private static string Sanitize(string s) => Regex.Replace(s, @"[^\w.]+", "_");

    private static (int Code, string Output) Run(string exe, string args)
    {
        var psi = new ProcessStartInfo(exe, args) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        string stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout.Result + stderr);
    }

    /// <summary>Reads the entry function's block of `ptxas -v`: stack/spills line, then "Used N registers, S bytes smem".</summary>
    public static PtxasReport? Parse(string kernel, string arch, string entryName, string output)
    {
        var lines = output.Split('\n');
        int start = Array.FindIndex(lines, l => l.Contains($"Function properties for {entryName}", StringComparison.Ordinal));
        if (start < 0) return null;
        int stack = 0, stores = 0, loads = 0, regs = -1, smem = 0;
        for (int i = start + 1; i < lines.Length; i++)
        {
            var spill = Regex.Match(lines[i], @"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads");
            if (spill.Success)
            {
                stack = int.Parse(spill.Groups[1].Value);
                stores = int.Parse(spill.Groups[2].Value);
                loads = int.Parse(spill.Groups[3].Value);
                continue;
            }
            var used = Regex.Match(lines[i], @"Used (\d+) registers");
            if (used.Success)
            {
                regs = int.Parse(used.Groups[1].Value);
                var sm = Regex.Match(lines[i], @"(\d+) bytes smem");
                if (sm.Success) smem = int.Parse(sm.Groups[1].Value);
                break;
            }
            if (lines[i].Contains("Function properties for", StringComparison.Ordinal)) break;
        }
        return regs < 0 ? null : new PtxasReport(kernel, arch, regs, stores, loads, stack, smem);
    }

    [Fact]
    public void ParsesPtxasVerboseOutput()
    {
        const string sample = "ptxas info    : 0 bytes gmem\n" +
                              "ptxas info    : Compiling entry function 'Kernel_X' for 'sm_90'\n" +
                              "ptxas info    : Function properties for helper_1\n" +
                              "    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n" +
                              "ptxas info    : Function properties for Kernel_X\n" +
                              "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n" +
                              "ptxas info    : Used 40 registers, 33024 bytes smem, 400 bytes cmem[0]\n";
        var r = Parse("X", "sm_90", "Kernel_X", sample);
        Assert.Equal(new PtxasReport("X", "sm_90", 40, 12, 8, 16, 33024), r);
        Assert.Null(Parse("Y", "sm_90", "Kernel_Y", sample));
    }

    [Fact]
    public void OccupancyArithmetic()
    {
        // 194 registers × 256 threads: 8 warps × 6400 registers = 51200 -> one group; 40 KiB smem would allow 5
        Assert.Equal((1, 0.125, "registers"), KernelsDoc.Occupancy(194, 40960, 256));
        // 32 registers, no smem: 8 warps × 1024 = 8192 -> 8 groups = 64 warps (all limits meet; registers reported first)
        Assert.Equal(8, KernelsDoc.Occupancy(32, 0, 256).Groups);
        Assert.Equal(1.0, KernelsDoc.Occupancy(32, 0, 256).Occupancy);
    }

    [Fact]
    public void TensorCoreKernelsAreMarked()
        => Assert.All(GpuKernelCatalog.All().Where(k => k.Name.Contains("TensorCore", StringComparison.Ordinal)), k => Assert.True(k.TensorCore, k.Name));

    private static void WriteTable(List<PtxasReport> reports, string ptxas)
    {
        var root = FindRepoRoot();
        if (root is null) return; // running from a copied test binary: nothing to update
        var version = Run(ptxas, "--version").Output.Split('\n').LastOrDefault(l => l.Contains("release", StringComparison.Ordinal))?.Trim() ?? "unknown";
        var sb = new StringBuilder();
        sb.AppendLine("# ILGPU kernels: ptxas report");
        sb.AppendLine();
        sb.AppendLine("Written by `tests/Kernels/Gpu/PtxasTests.cs` (`dotnet test --filter PtxasTests`); do not edit by hand.");
        sb.AppendLine("Each kernel in `GpuKernelCatalog` (every `[GpuKernel]` method in src/Kernels/Gpu) is compiled to PTX by");
        sb.AppendLine("ILGPU 1.5.3's PTX backend (no GPU needed: sm_80 with PTX ISA 7.0, sm_90 with ISA 7.8) and assembled by");
        sb.AppendLine($"`ptxas -arch=<arch> -v` ({version}). Registers are per thread, shared memory per group (static).");
        sb.AppendLine("This proves the kernels assemble for A100/H100 and shows their resource use; it measures no speed.");
        sb.AppendLine();
        sb.AppendLine("HMMA, LDGSTS (cp.async global -> shared) and LDL+STL count those instructions in `cuobjdump -sass` of the cubin (static count, not executed).");
        sb.AppendLine();
        sb.AppendLine("| kernel | arch | registers | spill stores (B) | spill loads (B) | stack frame (B) | smem (B) | HMMA | LDGSTS | LDL+STL |");
        sb.AppendLine("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        foreach (var r in reports.OrderBy(r => r.Kernel, StringComparer.Ordinal).ThenBy(r => r.Arch, StringComparer.Ordinal))
            sb.AppendLine($"| {r.Kernel} | {r.Arch} | {r.Registers} | {r.SpillStores} | {r.SpillLoads} | {r.StackFrame} | {r.SharedBytes} | {r.Hmma?.ToString() ?? "-"} | {r.Ldgsts?.ToString() ?? "-"} | {r.LocalAccesses?.ToString() ?? "-"} |");
        sb.Append(KernelsDoc.Analysis(reports));
        string path = Path.Combine(root, "docs", "kernels.md");
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        string text = sb.ToString();
        if (!File.Exists(path) || File.ReadAllText(path) != text)
        {
            string tmp = path + ".tmp";
            File.WriteAllText(tmp, text);
            File.Move(tmp, path, overwrite: true);
        }
    }

    private static string? FindRepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "FineTuneNative.sln"))) return d.FullName;
        return null;
    }
}
