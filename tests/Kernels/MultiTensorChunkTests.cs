using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// The multi-tensor ops on ILGPU when the tensors live in several pool chunks (allocated before and after reservations,
/// operand roles mixed across chunks): one launch each up to MultiTensorBases.Count chunks, as few as the slots allow
/// beyond, and the same results as the CPU backend.
/// </summary>
public class MultiTensorChunkTests
{
    private sealed record Set(Tensor[] P, Tensor[] G, Tensor[] M, Tensor[] V) : IDisposable
    {
        public void Dispose() { foreach (var t in P.Concat(G).Concat(M).Concat(V)) t.Dispose(); }
    }

    private static readonly int[] Sizes = { 5, 300, 7, MultiTensorTable.SliceElements + 3, 1 };

    /// <summary>
    /// Tensor i's P and G are allocated after i reservations (so in chunk i on the simulator), its M and V after all of
    /// them (the last chunk): every tensor mixes chunks across its roles. <paramref name="reserve"/>: 0 on the CPU.
    /// </summary>
    private static Set Allocate(IBackend b, int tensors, bool reserve)
    {
        var p = new Tensor[tensors];
        var g = new Tensor[tensors];
        for (int i = 0; i < tensors; i++)
        {
            // A new chunk: larger than any free range of the ones before (the simulator's chunks are 4 MiB).
            if (reserve && i > 0) b.Reserve((5L << 20) + i);
            int n = Sizes[i % Sizes.Length];
            p[i] = b.Allocate(DType.F32, n);
            b.Upload(p[i], GradCheck.ToFloat(Rand(n, 10 + i)));
            g[i] = b.Allocate(DType.F32, n);
            b.Upload(g[i], GradCheck.ToFloat(Rand(n, 50 + i)));
        }
        var m = p.Select((t, i) => { var x = b.Allocate(DType.F32, (int)t.Length); b.Upload(x, GradCheck.ToFloat(Rand(t.Length, 90 + i, 0.1))); return x; }).ToArray();
        var v = p.Select((t, i) => { var x = b.Allocate(DType.F32, (int)t.Length); b.Upload(x, GradCheck.ToFloat(Rand(t.Length, 130 + i, 0.1).Select(Math.Abs).ToArray())); return x; }).ToArray();
        return new Set(p, g, m, v);
    }

    private static (float[] Clip, float[][] P, float[][] M, float[][] V) Step(IBackend b, Set s, int steps)
    {
        using var clip = b.Allocate(DType.F32, 2);
        var list = s.P.Select((p, i) => new AdamWTensor(p, s.G[i], s.M[i], s.V[i], i % 2 == 0)).ToArray();
        for (int step = 1; step <= steps; step++)
        {
            b.GradNormClip(s.G, clip, 1f);
            b.AdamWMultiTensor(list, new AdamWHyper(1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f, step), clip);
        }
        return (clip.ToArray(), s.P.Select(t => t.ToArray()).ToArray(), s.M.Select(t => t.ToArray()).ToArray(), s.V.Select(t => t.ToArray()).ToArray());
    }

    [Theory]
    [InlineData(3, 1)]   // three chunks: one launch
    [InlineData(10, 2)]  // ten chunks (eleven with the moments' last one) exceed the 8 base slots: two launches
    public void Tensors_in_several_pool_chunks_take_the_fewest_launches_and_match_the_cpu(int tensors, int launches)
    {
        using var sim = (IlgpuBackend)Backends.Create("ilgpu-sim:4");
        using var simSet = Allocate(sim, tensors, reserve: true);
        var chunks = simSet.P.Concat(simSet.G).Concat(simSet.M).Concat(simSet.V).Select(t => sim.Placement(t, "t").Chunk).Distinct().Count();
        Assert.Equal(tensors, chunks); // the moments share the last reservation's chunk
        var got = Step(sim, simSet, 2);
        Assert.Equal((launches, launches), sim.LastMultiTensorLaunches);

        var cpu = Backend("cpu");
        using var cpuSet = Allocate(cpu, tensors, reserve: false);
        var expected = Step(cpu, cpuSet, 2);
        NumericAssert.Close(expected.Clip, got.Clip, 1e-6, 1e-5, "norm, clip scale");
        Assert.True(expected.Clip[1] < 1f, $"the clip is exercised: scale {expected.Clip[1]}");
        for (int i = 0; i < tensors; i++)
        {
            NumericAssert.Close(expected.P[i], got.P[i], 1e-6, 1e-5, $"param {i}");
            NumericAssert.Close(expected.M[i], got.M[i], 1e-7, 1e-5, $"m {i}");
            NumericAssert.Close(expected.V[i], got.V[i], 1e-8, 1e-5, $"v {i}");
        }
    }
}
