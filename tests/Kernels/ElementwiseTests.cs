using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

public class ElementwiseTests
{
    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void UploadDownload_RoundTrips_EveryDType(string backend)
    {
        var b = Backend(backend);
        var f = new float[] { 0, 1, -2.5f, 3.14159f, 65504, 1e-3f, -7 };
        using var t32 = Up(b, f, f.Length);
        Assert.Equal(f, t32.ToArray());
        using var tb = UpBf16(b, f, f.Length);
        Assert.Equal(f.Select(x => HalfBits.Bf16ToF32(HalfBits.F32ToBf16(x))).ToArray(), tb.ToArray());
        using var th = b.Allocate(DType.F16, f.Length);
        b.Upload(th, f);
        Assert.Equal(f.Select(x => HalfBits.F16ToF32(HalfBits.F32ToF16(x))).ToArray(), th.ToArray());
        using var ti = UpInt(b, new[] { 1, -2, int.MaxValue });
        Assert.Equal(new[] { 1, -2, int.MaxValue }, ti.ToIntArray());
        using var raw = b.Allocate(DType.F32, 2);
        b.UploadRaw(raw, BitConverter.GetBytes(1.5f).Concat(BitConverter.GetBytes(-2f)).ToArray());
        Assert.Equal(new[] { 1.5f, -2f }, raw.ToArray());
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void Allocate_IsZero_AndFillCopyConvert(string backend)
    {
        var b = Backend(backend);
        foreach (int n in new[] { 1, 33, 5000 })
        {
            using var a = b.Allocate(DType.F32, n);
            Assert.All(a.ToArray(), x => Assert.Equal(0f, x));
            b.Fill(a, 1.25f);
            Assert.All(a.ToArray(), x => Assert.Equal(1.25f, x));
            var src = Rand(n, n);
            using var s = Up(b, src, n);
            using var bf = b.Allocate(DType.BF16, n);
            b.Copy(bf, s); // f32 → bf16 rounds to nearest even
            Close(RoundBf16(src), bf, $"bf16 n={n}", (0, 0));
            using var back = b.Allocate(DType.F32, n);
            b.Copy(back, bf);
            Close(RoundBf16(src), back, $"bf16→f32 n={n}", (0, 0));
            using var h = b.Allocate(DType.F16, n);
            b.Copy(h, s);
            Close(src.Select(x => (double)HalfBits.F16ToF32(HalfBits.F32ToF16((float)x))).ToArray(), h, $"f16 n={n}", (0, 0));
        }
    }

    [SkippableTheory]
    [MemberData(nameof(TestBackends.All), MemberType = typeof(TestBackends))]
    public void AddScaleSumOfSquares_MatchReference(string backend)
    {
        var b = Backend(backend);
        foreach (int n in new[] { 1, 7, 1000, 70001 })
        {
            if (n > 1000 && TestBackends.IsSimulator(backend)) continue; // simulator time; 1000 already has a ragged tail
            var ad = Rand(n, 1); var bd = Rand(n, 2);
            using var a = Up(b, ad, n); using var bt = Up(b, bd, n); using var y = b.Allocate(DType.F32, n);
            b.Add(y, a, bt);
            Close(ElementwiseReference.Add(ad, bd), y, $"add n={n}");
            b.Add(a, a, bt); // aliasing dst and a
            Close(ElementwiseReference.Add(ad, bd), a, $"add in place n={n}");
            b.Scale(bt, -3f);
            Close(ElementwiseReference.Scale(bd, -3), bt, $"scale n={n}");
            double ss = b.SumOfSquares(y);
            double e = ElementwiseReference.SumOfSquares(ElementwiseReference.Add(ad, bd));
            Assert.True(Math.Abs(ss - e) <= 1e-6 * e + 1e-9, $"sum of squares n={n}: {ss} vs {e}");
        }
    }
}
