using System.Reflection;
using ILGPU.Backends.EntryPoints;

// ILGPU generates its kernel launchers in a dynamic assembly named ILGPURuntime; it must see the internal
// argument structs nested in the (internal) kernel-set classes.
[assembly: System.Runtime.CompilerServices.InternalsVisibleTo("ILGPURuntime")]

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Marks an ILGPU kernel entry point. The PTX/ptxas test compiles every method carrying it (one instantiation
/// per listed type argument for generic kernels), and it also checks that every method a kernel-set class
/// loads carries it, so a new kernel cannot escape the ptxas proof.
/// </summary>
[AttributeUsage(AttributeTargets.Method, AllowMultiple = false)]
public sealed class GpuKernelAttribute : Attribute
{
    /// <param name="explicitlyGrouped">true for kernels launched with a KernelConfig (they use Group/Warp/shared memory).</param>
    /// <param name="instantiations">for a generic kernel with one type parameter, the type arguments it is used with.</param>
    public GpuKernelAttribute(bool explicitlyGrouped, params Type[] instantiations)
    {
        ExplicitlyGrouped = explicitlyGrouped;
        Instantiations = instantiations;
    }

    public bool ExplicitlyGrouped { get; }
    public Type[] Instantiations { get; }

    /// <summary>The kernel multiplies on tensor cores (inline mma.sync): its SASS must contain HMMA (PtxasTests).</summary>
    public bool TensorCore { get; init; }

    /// <summary>The kernel copies global -> shared with inline cp.async (sm_80+): its SASS must contain LDGSTS (PtxasTests).</summary>
    public bool CpAsync { get; init; }

    /// <summary>
    /// The fewest LDGSTS its SASS may hold (PtxasTests): one per cp.async the kernel issues in straight-line code, so
    /// losing one of several cp.async paths fails even while another keeps the count above zero.
    /// </summary>
    public int MinLdgsts { get; init; }
}

/// <summary>One compiled-to-be kernel: a closed method and how it is grouped.</summary>
public sealed record GpuKernelInfo(string Name, MethodInfo Method, bool ExplicitlyGrouped, bool TensorCore = false, bool CpAsync = false, int MinLdgsts = 0)
{
    public EntryPointDescription EntryPoint => ExplicitlyGrouped
        ? EntryPointDescription.FromExplicitlyGroupedKernel(Method)
        : EntryPointDescription.FromImplicitlyGroupedKernel(Method);
}

/// <summary>Every <see cref="GpuKernelAttribute"/> kernel in this assembly.</summary>
public static class GpuKernelCatalog
{
    public static IReadOnlyList<GpuKernelInfo> All()
    {
        var list = new List<GpuKernelInfo>();
        foreach (var type in typeof(GpuKernelCatalog).Assembly.GetTypes())
        {
            foreach (var m in type.GetMethods(BindingFlags.Static | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
            {
                var attr = m.GetCustomAttribute<GpuKernelAttribute>();
                if (attr is null) continue;
                if (m.IsGenericMethodDefinition)
                {
                    if (attr.Instantiations.Length == 0)
                        throw new InvalidOperationException($"generic kernel {type.Name}.{m.Name} lists no instantiations");
                    foreach (var t in attr.Instantiations)
                        list.Add(new GpuKernelInfo($"{type.Name}.{m.Name}<{t.Name}>", m.MakeGenericMethod(t), attr.ExplicitlyGrouped, attr.TensorCore, attr.CpAsync, attr.MinLdgsts));
                }
                else list.Add(new GpuKernelInfo($"{type.Name}.{m.Name}", m, attr.ExplicitlyGrouped, attr.TensorCore, attr.CpAsync, attr.MinLdgsts));
            }
        }
        list.Sort((a, b) => string.CompareOrdinal(a.Name, b.Name));
        return list;
    }
}
