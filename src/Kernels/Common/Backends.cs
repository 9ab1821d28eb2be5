using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Gpu;

namespace FineTuneNative.Kernels;

/// <summary>Creates backends by their command-line name.</summary>
public static class Backends
{
    /// <summary>
    /// "cpu" or "cpu:THREADS"; "cuda" or "cuda:N" (ILGPU CUDA accelerator N); "ilgpu-sim" or "ilgpu-sim:WARP"
    /// (ILGPU's CPU simulator shaped like an NVIDIA GPU with the given warp size, default 32; tests only).
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
            _ => throw new ArgumentException($"unknown device '{name}': expected cpu, cpu:THREADS, cuda, cuda:N or ilgpu-sim[:WARP]"),
        };
    }

    /// <summary>True when ILGPU finds a CUDA device.</summary>
    public static bool CudaAvailable() => IlgpuBackend.CudaDeviceCount() > 0;
}
