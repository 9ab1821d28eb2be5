using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Tests.Numerics;
using ILGPU;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>
/// IBackend.NeftuneNoise (NEFTune drawn on the backend): bit for bit the definition written out here independently
/// (splitmix64 counter stream, α/√(L_b·C) over each row's real tokens, padding and virtual tokens untouched) on every
/// backend and thread count; the noise's statistics; and the kernel's double math is IEEE-rounded in its PTX.
/// </summary>
public class NeftuneTests
{
    private static ulong Mix(ulong x)
    {
        ulong z = x + 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>x + noise, the definition: element (b, t, c) of a row's real tokens gets (2u − 1)·α/√(L_b·C).</summary>
    private static float[] Expected(float[] x, int[] lengths, float alpha, int s, int c, int offset, ulong seed)
    {
        var e = (float[])x.Clone();
        ulong s0 = Mix(seed ^ 0x4E454654554E45UL);
        for (int b = 0; b < lengths.Length; b++)
        {
            double mag = alpha / Math.Sqrt((double)lengths[b] * c);
            for (int t = offset; t < offset + lengths[b]; t++)
                for (int j = 0; j < c; j++)
                {
                    long i = ((long)b * s + t) * c + j;
                    double u = (Mix(s0 + (ulong)(i + 1) * 0x9E3779B97F4A7C15UL) >> 11) * (1.0 / (1UL << 53));
                    e[i] += (float)((2 * u - 1) * mag);
                }
        }
        return e;
    }

    private static float[] Apply(IBackend be, float[] x, int[] lengths, float alpha, int s, int c, int offset, ulong seed)
    {
        using var xt = be.Allocate(DType.F32, x.Length);
        using var lt = be.Allocate(DType.I32, lengths.Length);
        be.Upload(xt, x);
        be.Upload(lt, lengths);
        be.NeftuneNoise(xt, lt, alpha, lengths.Length, s, c, offset, seed);
        return xt.ToArray();
    }

    private static int[] Bits(float[] a) => Array.ConvertAll(a, BitConverter.SingleToInt32Bits);

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void NeftuneNoise_is_the_definition_bit_for_bit_over_real_tokens_only(string backend)
    {
        var be = Backend(backend);
        // C = 37: two 16-lane blocks and a tail; row lengths full, partial and empty; with and without 2 virtual tokens in front.
        foreach (var (s, c, offset, lengths) in new[] { (7, 37, 0, new[] { 7, 3, 0 }), (9, 16, 2, new[] { 5, 7, 1 }), (4, 5, 0, new[] { 4 }) })
        {
            var x = Array.ConvertAll(Rand(lengths.Length * s * c, s * c), v => (float)v);
            var got = Apply(be, x, lengths, 5f, s, c, offset, 0xC0FFEE);
            var expected = Expected(x, lengths, 5f, s, c, offset, 0xC0FFEE);
            // also on CUDA: IEEE-rounded double math and no f32 product to contract (the PTX test below)
            Assert.True(Bits(expected).SequenceEqual(Bits(got)), $"{backend} S={s} C={c} offset={offset}: not the definition's bits");
            for (int b = 0; b < lengths.Length; b++)
                for (int t = 0; t < s; t++)
                {
                    bool real = t >= offset && t < offset + lengths[b];
                    var row = Enumerable.Range(0, c).Select(j => ((long)b * s + t) * c + j).ToArray();
                    Assert.Equal(real, row.Any(i => got[i] != x[i])); // padding and virtual tokens untouched
                }
        }
    }

    /// <summary>IBackend's default body (NeftuneHash.AddHost, for backends without their own) draws the same bits.</summary>
    [Fact]
    public void NeftuneNoise_default_host_body_is_the_definition_bit_for_bit()
    {
        using var plain = new FineTuneNative.Tests.Runtime.Model.PlainBackend();
        var x = Array.ConvertAll(Rand(3 * 9 * 37, 4), v => (float)v);
        var lengths = new[] { 6, 0, 3 };
        Assert.Equal(Bits(Expected(x, lengths, 5f, 9, 37, 2, 99)), Bits(Apply(plain, x, lengths, 5f, 9, 37, 2, 99)));
    }

    [Fact]
    public void NeftuneNoise_is_uniform_with_the_unpadded_scale_and_the_same_on_any_thread_count()
    {
        const int s = 64, c = 64;
        const float alpha = 5f;
        var lengths = new[] { 64, 16 };
        var zero = new float[2 * s * c];
        using var one = Backends.Create("cpu:1");
        using var two = Backends.Create("cpu:2");
        var noise = Apply(one, zero, lengths, alpha, s, c, 0, 7);
        Assert.Equal(Bits(noise), Bits(Apply(two, zero, lengths, alpha, s, c, 0, 7)));
        Assert.Equal(Bits(noise), Bits(Apply(Backend("cpu"), zero, lengths, alpha, s, c, 0, 7)));
        Assert.NotEqual(Bits(noise), Bits(Apply(one, zero, lengths, alpha, s, c, 0, 8))); // another seed, other noise
        for (int b = 0; b < 2; b++)
        {
            double mag = alpha / Math.Sqrt(lengths[b] * (double)c); // the row's own length, not T
            var real = noise.Skip(b * s * c).Take(lengths[b] * c).Select(v => (double)v).ToArray();
            Assert.All(real, v => Assert.InRange(v, -mag, mag));
            Assert.InRange(real.Average(), -0.05 * mag, 0.05 * mag);
            double var = real.Average(v => v * v);
            Assert.InRange(var, mag * mag / 3 * 0.9, mag * mag / 3 * 1.1); // U(-m, m) has variance m²/3
            Assert.True(real.Max() > 0.97 * mag && real.Min() < -0.97 * mag, $"row {b}: range [{real.Min()}, {real.Max()}] of ±{mag}");
            Assert.All(noise.Skip(b * s * c + lengths[b] * c).Take((s - lengths[b]) * c), v => Assert.Equal(0f, v)); // padding
        }
    }

    [Fact]
    public void NeftuneNoise_checks_its_arguments()
    {
        var be = Backend("cpu");
        Assert.Throws<ArgumentException>(() => Apply(be, new float[2 * 3 * 4], new[] { 3, 4 }, 5f, 3, 4, 0, 1)); // a length past the row
        Assert.Throws<ArgumentException>(() => Apply(be, new float[2 * 3 * 4], new[] { 3 }, 5f, 3, 4, 0, 1));    // lengths of another batch
        Assert.Throws<ArgumentOutOfRangeException>(() => Apply(be, new float[3 * 4], new[] { 3 }, -1f, 3, 4, 0, 1));
    }

    /// <summary>
    /// The CUDA kernel gives the CPU's bits only if its double math is IEEE-rounded: the PTX has div.rn.f64 and sqrt.rn.f64
    /// (not the approximate forms), and the f32 sum adds a converted value (no product it could be contracted with).
    /// </summary>
    [Fact]
    public void NeftuneNoise_kernel_ptx_rounds_its_double_math_to_nearest()
    {
        using var context = Context.Create(b => b.CPU(CPUDevice.Default).Math(MathMode.Default));
        using var backend = new PTXBackend(context, CudaArchitecture.SM_80, CudaInstructionSet.ISA_70, null!);
        var kernel = GpuKernelCatalog.All().Single(k => k.Name == "NeftuneKernels.NeftuneNoiseKernel");
        string ptx = ((PTXCompiledKernel)backend.Compile(kernel.EntryPoint, new KernelSpecialization())).PTXAssembly;
        Assert.Contains("div.rn.f64", ptx);
        Assert.Contains("sqrt.rn.f64", ptx);
        Assert.Contains("cvt.rn.f32.f64", ptx);
        Assert.DoesNotContain(".approx.f64", ptx);
        Assert.DoesNotContain("mul.f32", ptx);
    }
}
