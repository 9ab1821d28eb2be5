using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using ILGPU;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// IBackend.DropoutBackward (DoRA's dropout backward, the mask regenerated on the backend): bit for bit the host
/// definition dInput[i] + dOut[i]·(1f/(1f − p)) where DropoutHash.Keep(seed, i, p), on every backend, at lengths that
/// reach the 16-lane vector body, its scalar tail and (CPU) several pool chunks; and the mask is the one the LoRA
/// forward draws for xDrop.
/// </summary>
public class DropoutBackwardTests
{
    private static float[] Expected(float[] dInput, float[] dOut, float p, ulong seed)
    {
        var e = (float[])dInput.Clone();
        float keepScale = 1f / (1f - p);
        for (int i = 0; i < e.Length; i++)
            if (DropoutHash.Keep(seed, i, p)) e[i] = e[i] + dOut[i] * keepScale;
        return e;
    }

    private static int[] Bits(float[] a) => Array.ConvertAll(a, BitConverter.SingleToInt32Bits);

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void DropoutBackward_is_the_host_definition_bit_for_bit(string backend)
    {
        var be = Backend(backend);
        // 1 and 15: tail only; 16, 47: one and two vector blocks plus a tail; 70001: three CPU pool chunks (32768 each).
        int[] counts = TestBackends.IsSimulator(backend) ? new[] { 1, 15, 16, 47, 333 } : new[] { 1, 15, 16, 47, 333, 70_001 };
        int seed = 7;
        foreach (int count in counts)
            foreach (float p in new[] { 0.1f, 0.5f, 0.9f })
            {
                var dInput = Array.ConvertAll(Rand(count, seed++), v => (float)v);
                var dOut = Array.ConvertAll(Rand(count, seed++, 3), v => (float)v);
                ulong s = 0xD0E5UL * (ulong)seed;
                using var di = be.Allocate(DType.F32, count);
                using var dO = be.Allocate(DType.F32, count);
                be.Upload(di, dInput); // pre-filled: the op accumulates
                be.Upload(dO, dOut);
                be.DropoutBackward(di, dO, p, s, count);
                var expected = Expected(dInput, dOut, p, s);
                // also on CUDA: the kernel keeps its product out of an FFMA (DoraKernels.DropoutBackwardKernel; PTX/SASS checked below)
                Assert.True(Bits(expected).SequenceEqual(Bits(di.ToArray())), $"{backend} count={count} p={p}: not bit-identical to the host definition");
                Assert.Equal(dOut, dO.ToArray()); // dOut is read only
                if (count >= 333)
                {
                    double dropped = Enumerable.Range(0, count).Count(i => !DropoutHash.Keep(s, i, p)) / (double)count;
                    Assert.InRange(dropped, p - 0.1, p + 0.1);
                }
            }
    }

    /// <summary>IBackend's default body (DoraHost.DropoutBackward, for backends without their own) gives the same bits.</summary>
    [Fact]
    public void DropoutBackward_default_host_body_is_the_definition_bit_for_bit()
    {
        using IBackend plain = new FineTuneNative.Tests.Runtime.Model.PlainBackend(); // the interface's default body
        var dInput = Array.ConvertAll(Rand(333, 1), v => (float)v);
        var dOut = Array.ConvertAll(Rand(333, 2, 3), v => (float)v);
        var di = plain.Allocate(DType.F32, 333);
        var dO = plain.Allocate(DType.F32, 333);
        plain.Upload(di, dInput);
        plain.Upload(dO, dOut);
        plain.DropoutBackward(di, dO, 0.3f, 42, 333);
        Assert.Equal(Bits(Expected(dInput, dOut, 0.3f, 42)), Bits(di.ToArray()));
    }

    [Fact]
    public void DropoutBackward_applies_the_mask_the_lora_forward_draws()
    {
        var be = Backend("cpu");
        const int m = 5, n = 3, k = 37, r = 2;
        const float p = 0.4f;
        const ulong seed = 0xABCDEF;
        var x = Array.ConvertAll(Rand(m * k, 1), v => (float)(v >= 0 ? v + 0.5 : v - 0.5)); // no zero: xDrop is 0 only where dropped
        using var xT = be.Allocate(DType.F32, m, k);
        using var w = be.Allocate(DType.F32, n, k);
        using var a = be.Allocate(DType.F32, r, k);
        using var bm = be.Allocate(DType.F32, n, r);
        using var y = be.Allocate(DType.F32, m, n);
        using var u = be.Allocate(DType.F32, m, r);
        using var xDrop = be.Allocate(DType.F32, m, k);
        be.Upload(xT, x);
        be.LoraLinearForward(y, xT, w, null, new LoraParams(a, bm, 1f, p, seed), u, xDrop, m, n, k, r);
        using var di = be.Allocate(DType.F32, m * k);
        using var ones = be.Allocate(DType.F32, m * k);
        be.Fill(ones, 1f);
        be.DropoutBackward(di, ones, p, seed, m * k);
        var kept = xDrop.ToArray().Select(v => v != 0f).ToArray();
        var got = di.ToArray();
        Assert.Contains(false, kept);
        Assert.Contains(true, kept);
        for (int i = 0; i < m * k; i++) Assert.Equal(kept[i] ? 1f / (1f - p) : 0f, got[i]);
    }

    /// <summary>DoRA with dropout, forward and backward, on the simulator: the same outputs and gradients as the CPU backend.</summary>
    [Theory]
    [InlineData("ilgpu-sim:4")]
    [InlineData("ilgpu-sim:32")]
    public void DoraLinear_with_dropout_on_the_simulator_matches_the_cpu_backend(string device)
    {
        const int m = 3, n = 4, k = 21, r = 2;
        const float p = 0.3f;
        float[] Run(IBackend b, out float[] grads)
        {
            var owned = new List<Tensor>();
            Tensor T(double[] v, params int[] shape) { var t = b.Allocate(DType.F32, shape); owned.Add(t); b.Upload(t, Array.ConvertAll(v, x => (float)x)); return t; }
            Tensor Z(params int[] shape) { var t = b.Allocate(DType.F32, shape); owned.Add(t); return t; }
            try
            {
                var slot = new LoraSlot
                {
                    A = T(Rand(r * k, 1), r, k), B = T(Rand(n * r, 2), n, r), DA = Z(r, k), DB = Z(n, r), Scale = 1.5f, Dropout = p,
                    Magnitude = T(Rand(n, 3, 2), n), DMagnitude = Z(n), WeightNorm = Z(n),
                };
                var x = T(Rand(m * k, 4), m, k); var w = T(Rand(n * k, 5), n, k); var dy = T(Rand(m * n, 6), m, n);
                var y = Z(m, n); var u = Z(m, r); var z = Z(m, n); var xd = Z(m, k); var scratch = Z(m * Math.Max(n, k)); var g = Z(m, r); var dx = Z(m, k);
                var lp = new LoraParams(slot.A, slot.B, slot.Scale, p, 0x77);
                DoraLinear.Forward(b, y, x, w, null, slot, lp, u, z, xd, scratch, m, n, k);
                var yh = y.ToArray();
                DoraLinear.Backward(b, dx, dy, x, w, slot, lp, u, z, g, xd, scratch, m, n, k, accumulate: false);
                grads = dx.ToArray().Concat(slot.DA.ToArray()).Concat(slot.DB.ToArray()).Concat(slot.DMagnitude!.ToArray()).ToArray();
                return yh;
            }
            finally { owned.ForEach(t => t.Dispose()); }
        }
        var yCpu = Run(Backend("cpu"), out var gCpu);
        var ySim = Run(Backend(device), out var gSim);
        NumericAssert.Close(yCpu, ySim, 1e-5, 1e-4, "y");
        NumericAssert.Close(gCpu, gSim, 1e-5, 1e-4, "dx, dA, dB, dMagnitude");
        Assert.Contains(gCpu, v => Math.Abs(v) > 1e-2);
    }

    [Fact]
    public void DropoutBackward_checks_its_arguments()
    {
        var be = Backend("cpu");
        using var a = be.Allocate(DType.F32, 8);
        using var b = be.Allocate(DType.F32, 7);
        Assert.Throws<ArgumentException>(() => be.DropoutBackward(a, b, 0.5f, 1, 8));
        Assert.Throws<ArgumentOutOfRangeException>(() => be.DropoutBackward(a, a, 1f, 1, 8));
    }

    /// <summary>
    /// The CUDA kernel gives the same bits only if ptxas cannot contract its product and sum into one FMA: ptxas' SASS for
    /// sm_80 and sm_90 has FMUL and FADD and no FFMA (the product reaches the sum through an integer xor with a launch
    /// argument; a plain mul.f32 + add.f32 from ILGPU is contracted).
    /// </summary>
    [SkippableFact]
    public void DropoutBackward_kernel_sass_has_no_fused_multiply_add()
    {
        using var context = Context.Create(b => b.CPU(CPUDevice.Default).Math(MathMode.Default));
        var kernel = GpuKernelCatalog.All().Single(k => k.Name == "DoraKernels.DropoutBackwardKernel");
        string? ptxas = new[] { "/usr/bin/ptxas", "/usr/local/cuda/bin/ptxas" }.FirstOrDefault(File.Exists);
        string? cuobjdump = new[] { "/usr/bin/cuobjdump", "/usr/local/cuda/bin/cuobjdump" }.FirstOrDefault(File.Exists);
        var dir = Directory.CreateTempSubdirectory("ftn-dropout-ptx-");
        try
        {
            foreach (var (arch, architecture, isa) in new[] { ("sm_80", CudaArchitecture.SM_80, CudaInstructionSet.ISA_70), ("sm_90", CudaArchitecture.SM_90, CudaInstructionSet.ISA_78) })
            {
                using var backend = new PTXBackend(context, architecture, isa, null!);
                string ptx = ((PTXCompiledKernel)backend.Compile(kernel.EntryPoint, new KernelSpecialization())).PTXAssembly;
                Assert.Contains(ptx.Split('\n'), l => l.TrimStart().StartsWith("xor.b32"));
                if (ptxas is null || cuobjdump is null) continue;
                string file = Path.Combine(dir.FullName, "k." + arch);
                File.WriteAllText(file + ".ptx", ptx);
                var (code, output) = Run(ptxas, $"-arch={arch} \"{file}.ptx\" -o \"{file}.cubin\"");
                Assert.True(code == 0, output);
                var (sassCode, sass) = Run(cuobjdump, $"-sass \"{file}.cubin\"");
                Assert.True(sassCode == 0, sass);
                Assert.Contains("FADD", sass);
                Assert.Contains("FMUL", sass);
                Assert.DoesNotContain("FFMA", sass);
            }
        }
        finally
        {
            dir.Delete(recursive: true);
        }
        Skip.If(ptxas is null || cuobjdump is null, "ptxas/cuobjdump not found: only the PTX was checked (install nvidia-cuda-toolkit)");
    }

    private static (int Code, string Output) Run(string exe, string args)
    {
        var psi = new System.Diagnostics.ProcessStartInfo(exe, args) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        using var p = System.Diagnostics.Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        string stderr = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout.Result + stderr);
    }
}
