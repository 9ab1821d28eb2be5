using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// The multi-tensor optimizer ops: the global gradient norm in one reduction (GradNormClip) and AdamW over all
/// tensors in one pass (AdamWMultiTensor) reading the clipping scale on the device, against AdamWReference run tensor
/// by tensor with the scale computed in double on the host.
/// </summary>
public class AdamWMultiTensorTests
{
    // Sizes: a scalar, a ragged tail, and one that crosses the 16K-element work slice of the ILGPU table.
    private static readonly int[] Sizes = { 1, 17, MultiTensorTable.SliceElements + 5 };

    private static double Norm(IEnumerable<double[]> grads) => Math.Sqrt(grads.Sum(g => g.Sum(x => x * x)));

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void GradNormClip_IsTheNormOfAllTensors_AndTheClipScale(string backend)
    {
        var b = Backend(backend);
        var gd = Sizes.Select((n, i) => Rand(n, 40 + i)).ToArray();
        var g = gd.Select((d, i) => Up(b, d, Sizes[i])).ToArray();
        using var clip = b.Allocate(DType.F32, 2);
        try
        {
            double norm = Norm(gd);
            foreach (float maxNorm in new[] { 0f, (float)(norm / 3), (float)(norm * 2) })
            {
                b.Fill(clip, -7); // overwritten, not accumulated
                b.GradNormClip(g, clip, maxNorm);
                double scale = maxNorm > 0 && norm > maxNorm ? maxNorm / (norm + 1e-6) : 1;
                Close(new[] { norm, scale }, clip, $"norm, scale at maxNorm {maxNorm}", (1e-9, 1e-6));
            }
            Assert.True(norm / 3 < norm && Math.Abs(clip.ToArray()[1] - 1) < 1e-7, "a clip above the norm leaves scale 1");

            // One non-finite element anywhere: the scale is NaN (the step will be skipped).
            var bad = (double[])gd[2].Clone();
            bad[MultiTensorTable.SliceElements + 1] = double.PositiveInfinity;
            b.Upload(g[2], GradCheck.ToFloat(bad));
            b.GradNormClip(g, clip, 1f);
            var c = clip.ToArray();
            Assert.True(float.IsPositiveInfinity(c[0]), $"norm {c[0]}");
            Assert.True(float.IsNaN(c[1]), $"scale {c[1]}");
        }
        finally
        {
            foreach (var t in g) t.Dispose();
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void AdamWMultiTensor_MatchesReferencePerTensor_WithDeviceClipping_AndRoundedCopies(string backend)
    {
        var b = Backend(backend);
        int k = Sizes.Length;
        var pd = Sizes.Select((n, i) => Rand(n, 1 + i)).ToArray();
        var md = Sizes.Select(n => new double[n]).ToArray();
        var vd = Sizes.Select(n => new double[n]).ToArray();
        bool[] decay = { false, true, true };
        var p = pd.Select((d, i) => Up(b, d, Sizes[i])).ToArray();
        var g = Sizes.Select(n => b.Allocate(DType.F32, n)).ToArray();
        var m = Sizes.Select(n => b.Allocate(DType.F32, n)).ToArray();
        var v = Sizes.Select(n => b.Allocate(DType.F32, n)).ToArray();
        // Tensor 1 is an f32 master over a bf16 weight, tensor 2 over an f16 one.
        using var r1 = b.Allocate(DType.BF16, Sizes[1]);
        using var r2 = b.Allocate(DType.F16, Sizes[2]);
        using var clip = b.Allocate(DType.F32, 2);
        var list = Enumerable.Range(0, k).Select(i => new AdamWTensor(p[i], g[i], m[i], v[i], decay[i], i == 1 ? r1 : i == 2 ? r2 : null)).ToArray();
        try
        {
            for (int step = 1; step <= 3; step++)
            {
                var gd = Sizes.Select((n, i) => Rand(n, 100 * step + i, 2.0)).ToArray();
                for (int i = 0; i < k; i++) b.Upload(g[i], GradCheck.ToFloat(gd[i]));
                double norm = Norm(gd);
                float maxNorm = (float)(norm * (step == 2 ? 2.0 : 0.25)); // clipped on steps 1 and 3
                b.GradNormClip(g, clip, maxNorm);
                var h = new AdamWHyper(1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
                b.AdamWMultiTensor(list, h, clip);
                double scale = norm > maxNorm ? maxNorm / (norm + 1e-6) : 1;
                for (int i = 0; i < k; i++)
                {
                    AdamWReference.Step(pd[i], gd[i], md[i], vd[i], 1e-2, 0.9, 0.95, 1e-8, decay[i] ? 0.1 : 0, step, scale);
                    Close(pd[i], p[i], $"param {i} step {step}");
                    Close(md[i], m[i], $"m {i} step {step}");
                    Close(vd[i], v[i], $"v {i} step {step}");
                }
                // The rounded copies are the updated parameters in bf16 / f16, bit for bit (any device: the kernel rounds the
                // f32 value it stores with HalfMath's integer round-to-nearest-even, HalfBits' bits).
                var p1 = p[1].ToArray(); var p2 = p[2].ToArray();
                Assert.Equal(p1.Select(x => HalfBits.Bf16ToF32(HalfBits.F32ToBf16(x))), r1.ToArray());
                Assert.Equal(p2.Select(x => HalfBits.F16ToF32(HalfBits.F32ToF16(x))), r2.ToArray());
            }

            // A non-finite gradient: the norm's scale is NaN and nothing is written.
            var before = p.Select(t => t.ToArray()).Concat(m.Select(t => t.ToArray())).Concat(v.Select(t => t.ToArray())).ToArray();
            b.Upload(g[0], new[] { float.NaN });
            b.GradNormClip(g, clip, 1f);
            b.AdamWMultiTensor(list, new AdamWHyper(1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 4), clip);
            var after = p.Select(t => t.ToArray()).Concat(m.Select(t => t.ToArray())).Concat(v.Select(t => t.ToArray())).ToArray();
            for (int i = 0; i < before.Length; i++) Assert.Equal(before[i], after[i]);
        }
        finally
        {
            foreach (var t in p.Concat(g).Concat(m).Concat(v)) t.Dispose();
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Fused_ops_equal_the_host_composition_of_single_tensor_ops(string backend)
    {
        // MultiTensorHost (SumOfSquares per tensor, one AdamW per tensor, Copy for the rounded weight) is the definition.
        var b = Backend(backend);
        var sizes = new[] { 3, 64, 1000 };
        Tensor[] Make(int seed, bool square = false) =>
            sizes.Select((n, i) => Up(b, Rand(n, seed + i).Select(x => square ? x * x : x).ToArray(), n)).ToArray();
        var (p1, p2, g) = (Make(1), Make(1), Make(20));
        var (m1, m2, v1, v2) = (Make(30), Make(30), Make(40, square: true), Make(40, square: true)); // mid-run moments (v >= 0)
        using var c1 = b.Allocate(DType.F32, 2);
        using var c2 = b.Allocate(DType.F32, 2);
        using var r1 = b.Allocate(DType.BF16, sizes[2]);
        using var r2 = b.Allocate(DType.BF16, sizes[2]);
        try
        {
            var h = new AdamWHyper(3e-3f, 0.8f, 0.99f, 1e-6f, 0.01f, 5);
            var l1 = sizes.Select((_, i) => new AdamWTensor(p1[i], g[i], m1[i], v1[i], i != 0, i == 2 ? r1 : null)).ToArray();
            var l2 = sizes.Select((_, i) => new AdamWTensor(p2[i], g[i], m2[i], v2[i], i != 0, i == 2 ? r2 : null)).ToArray();
            b.GradNormClip(g, c1, 5f);
            MultiTensorHost.GradNormClip(b, g, c2, 5f);
            NumericAssert.Close(GradCheck.ToDouble(c2.ToArray()), c1.ToArray(), 1e-9, 1e-6, "norm, scale");
            b.AdamWMultiTensor(l1, h, c1);
            MultiTensorHost.AdamWMultiTensor(b, l2, h, c1);
            for (int i = 0; i < sizes.Length; i++)
            {
                NumericAssert.Close(GradCheck.ToDouble(p2[i].ToArray()), p1[i].ToArray(), 1e-7, 1e-6, $"param {i}");
                NumericAssert.Close(GradCheck.ToDouble(m2[i].ToArray()), m1[i].ToArray(), 1e-7, 1e-6, $"m {i}");
                NumericAssert.Close(GradCheck.ToDouble(v2[i].ToArray()), v1[i].ToArray(), 1e-7, 1e-6, $"v {i}");
            }
            NumericAssert.Close(GradCheck.ToDouble(r2.ToArray()), r1.ToArray(), 0, 1e-2, "rounded");
        }
        finally
        {
            foreach (var t in p1.Concat(p2).Concat(g).Concat(m1).Concat(m2).Concat(v1).Concat(v2)) t.Dispose();
        }
    }

    [Fact]
    public void Ilgpu_runs_one_launch_each_when_the_tensors_share_a_pool_chunk()
    {
        using var b = (IlgpuBackend)Backends.Create("ilgpu-sim:4");
        b.Reserve(1 << 20);
        var sizes = new[] { 5, 300, 7 };
        var t = sizes.Select(n => (P: Up(b, Rand(n, n), n), G: Up(b, Rand(n, n + 1), n), M: b.Allocate(DType.F32, n), V: b.Allocate(DType.F32, n))).ToArray();
        using var clip = b.Allocate(DType.F32, 2);
        var list = t.Select(x => new AdamWTensor(x.P, x.G, x.M, x.V, true)).ToArray();
        b.GradNormClip(t.Select(x => x.G).ToArray(), clip, 1f);
        b.AdamWMultiTensor(list, new AdamWHyper(1e-3f, 0.9f, 0.999f, 1e-8f, 0, 1), clip);
        Assert.Equal((1, 1), b.LastMultiTensorLaunches);
        // The device tables are built once: the same list again allocates nothing on the device.
        long allocations = b.DeviceAllocations;
        b.GradNormClip(t.Select(x => x.G).ToArray(), clip, 1f);
        b.AdamWMultiTensor(list, new AdamWHyper(1e-3f, 0.9f, 0.999f, 1e-8f, 0, 2), clip);
        Assert.Equal(allocations, b.DeviceAllocations);
        foreach (var x in t) { x.P.Dispose(); x.G.Dispose(); x.M.Dispose(); x.V.Dispose(); }
    }
}
