using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Gpu;

namespace FineTuneNative.Kernels;

/// <summary>Creates backends by their command-line name.</summary>
public static class Backends
{
    /// <summary>
    /// "cpu" or "cpu:THREADS"; "cuda" or "cuda:N" (ILGPU CUDA accelerator N); "ilgpu-sim" or "ilgpu-sim:WARP"
    /// (ILGPU's CPU simulator shaped like an NVIDIA GPU with the given warp size, default 32; tests only);
    /// "ilgpu-sim-tc" (warp 32, as on any GPU with tensor cores): the same simulator dispatching like CUDA sm_80+, so bf16/f16 matmuls, NF4 and
    /// bf16 attention take the tensor-core kernels (their scalar paths, which round operands to bf16/f16 as the tensor cores
    /// do). A test and diagnostic device only (what a GPU's first run computes, without a GPU): never chosen implicitly.
    /// </summary>
    public static IBackend Create(string name)
    {
        string kind = name, arg = "";
        int colon = name.IndexOf(':');
        if (colon >= 0) { kind = name[..colon]; arg = name[(colon + 1)..]; }
        int ParseArg(int dflt) => arg.Length == 0 ? dflt : int.TryParse(arg, out int v) && v >= 0 ? v
            : throw new ArgumentException($"device '{name}': '{arg}' is not a number");
        return kind.ToLowerInvariant() switch
        {
            "cpu" => new CpuBackend(ParseArg(0)),
            "cuda" or "gpu" => IlgpuBackend.CreateCuda(ParseArg(0)),
            "ilgpu-sim" => IlgpuBackend.CreateSimulator(ParseArg(32)),
            "ilgpu-sim-tc" => IlgpuBackend.CreateSimulator(ParseArg(32), tensorCores: true),
            _ => throw new ArgumentException($"unknown device '{name}': expected cpu, cpu:THREADS, cuda, cuda:N, ilgpu-sim[:WARP] or ilgpu-sim-tc"),
        };
    }

    /// <summary>True when ILGPU finds a CUDA device.</summary>
    public static bool CudaAvailable() => IlgpuBackend.CudaDeviceCount() > 0;
}
