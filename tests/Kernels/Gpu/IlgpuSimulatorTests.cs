using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// GPU-specific checks of the ILGPU kernels on both simulator shapes (warp 32 and warp 4), against plain double
/// loops written here: multi-group edges (tiles that do not divide the shape, several groups per row/head),
/// storage views with offsets, dtype conversions. The op tests in tests/Kernels run the same ops on every backend
/// against src/Kernels/Reference.
/// </summary>
public class IlgpuSimulatorTests
{
    public static IEnumerable<object[]> Sims() => new[] { new object[] { "ilgpu-sim:32" }, new object[] { "ilgpu-sim:4" } };

    private static readonly (double Atol, double Rtol) F32 = Tolerance.F32;

    private static float[] Rand(int n, int seed, double scale = 1.0) => GradCheck.ToFloat(GradCheck.Random(n, seed, scale));

    private static Tensor Up(IBackend b, float[] data, params int[] shape)
    {
        var t = b.Allocate(DType.F32, shape);
        b.Upload(t, data);
        return t;
    }

    private static Tensor UpInt(IBackend b, int[] data)
    {
        var t = b.Allocate(DType.I32, data.Length);
        b.Upload(t, data);
        return t;
    }

    [Theory, MemberData(nameof(Sims))]
    public void NameAndWarpSize(string name)
    {
        var b = (IlgpuBackend)TestBackends.Get(name);
        Assert.Equal(name, b.Name);
        Assert.Equal(int.Parse(name.Split(':')[1]), b.WarpSize);
    }

    [Fact]
    public void CudaDeviceCountNeverThrows() => Assert.True(IlgpuBackend.CudaDeviceCount() >= 0);

    [SkippableFact]
    public void CudaWithoutDeviceGivesAClearError()
    {
        Skip.If(IlgpuBackend.CudaDeviceCount() > 0, "a CUDA device is present");
        var e = Assert.Throws<InvalidOperationException>(() => IlgpuBackend.CreateCuda(0));
        Assert.Contains("no CUDA device", e.Message);
    }

    [Theory, MemberData(nameof(Sims))]
    public void BadInputsGiveClearErrors(string name)
    {
        var b = TestBackends.Get(name);
        using var q = b.Allocate(DType.F32, 1, 1, 1, 130);
        using var kv = b.Allocate(DType.F32, 1, 1, 1, 130);
        using var o = b.Allocate(DType.F32, 1, 1, 1, 130);
        var e = Assert.Throws<ArgumentException>(() => b.AttentionForward(o, null, q, kv, kv, 1, 1, 1, 1, 1, 1, 130, 1f));
        Assert.Contains("head size 130", e.Message);
        using var foreign = TestBackends.Get("cpu").Allocate(DType.F32, 4);
        e = Assert.Throws<ArgumentException>(() => b.Scale(foreign, 2f));
        Assert.Contains("does not live on backend " + name, e.Message);
        using var ints = b.Allocate(DType.I32, 4);
        using var f = b.Allocate(DType.F32, 4);
        e = Assert.Throws<ArgumentException>(() => b.Copy(f, ints));
        Assert.Contains("cannot convert", e.Message);
    }

    [Theory, MemberData(nameof(Sims))]
    public void UploadDownloadConvertAndViews(string name)
    {
        var b = TestBackends.Get(name);
        float[] x = { 1f, -2.5f, 3.140625f, 65504f, 1e-6f, -0f, 0.1f, 1e-8f };
        using var f = Up(b, x, 8);
        Assert.Equal(x, f.ToArray());
        foreach (var dt in new[] { DType.BF16, DType.F16 })
        {
            using var h = b.Allocate(dt, 8);
            b.Copy(h, f); // device conversion
            var viaDevice = h.ToArray();
            b.Upload(h, x); // host conversion
            var viaHost = h.ToArray();
            Assert.Equal(viaHost, viaDevice);
            for (int i = 0; i < x.Length; i++)
            {
                float expect = dt == DType.BF16 ? HalfBits.Bf16ToF32(HalfBits.F32ToBf16(x[i])) : HalfBits.F16ToF32(HalfBits.F32ToF16(x[i]));
                Assert.Equal(expect, viaHost[i]);
            }
            using var back = b.Allocate(DType.F32, 8);
            b.Copy(back, h);
            Assert.Equal(viaHost, back.ToArray());
        }
        // a view with an element offset reads and writes only its range
        using var big = Up(b, Enumerable.Range(0, 12).Select(i => (float)i).ToArray(), 4, 3);
        var mid = big.Slice(1, 2);
        Assert.Equal(new float[] { 3, 4, 5, 6, 7, 8 }, mid.ToArray());
        b.Scale(mid, 10f);
        Assert.Equal(new float[] { 0, 1, 2, 30, 40, 50, 60, 70, 80, 9, 10, 11 }, big.ToArray());
        using var ints = UpInt(b, new[] { 5, -7, int.MaxValue });
        Assert.Equal(new[] { 5, -7, int.MaxValue }, ints.ToIntArray());
        using var raw = b.Allocate(DType.BF16, 2);
        b.UploadRaw(raw, new byte[] { 0x80, 0x3F, 0x00, 0xC0 });
        Assert.Equal(new[] { 1f, -2f }, raw.ToArray());
    }

    [Theory, MemberData(nameof(Sims))]
    public void FillAddScaleSumOfSquares(string name)
    {
        var b = TestBackends.Get(name);
        int n = 1000;
        var x = Rand(n, 1);
        var y = Rand(n, 2);
        using var tx = Up(b, x, n);
        using var ty = Up(b, y, n);
        using var s = b.Allocate(DType.F32, n);
        b.Add(s, tx, ty);
        b.Scale(s, -0.5f);
        var expect = new double[n];
        for (int i = 0; i < n; i++) expect[i] = ((double)x[i] + y[i]) * -0.5;
        NumericAssert.Close(expect, s.ToArray(), F32.Atol, F32.Rtol, "add+scale");
        double ss = 0;
        foreach (var v in x) ss += (double)v * v;
        Assert.Equal(ss, b.SumOfSquares(tx), 9);
        using var big = b.Allocate(DType.BF16, 5_003);
        b.Fill(big, 0.5f);
        Assert.Equal(5_003 * 0.25, b.SumOfSquares(big), 6);
        Assert.Equal(0.0, b.SumOfSquares(s.View(0, 0)));
    }

    // ---------------------------------------------------------------- matmul
    private static double[] NaiveMatMulNT(float[] x, float[] w, float[]? bias, int m, int n, int k)
    {
        var y = new double[m * n];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = bias?[j] ?? 0;
                for (int r = 0; r < k; r++) s += (double)x[i * k + r] * w[j * k + r];
                y[i * n + j] = s;
            }
        return y;
    }

    [Theory, MemberData(nameof(Sims))]
    public void MatMulThreeLayoutsRaggedTiles(string name)
    {
        var b = TestBackends.Get(name);
        int m = 67, n = 70, k = 19; // none divides the 64×64×16 tile
        var x = Rand(m * k, 3);
        var w = Rand(n * k, 4);
        var bias = Rand(n, 5);
        var dy = Rand(m * n, 6);
        using var tx = Up(b, x, m, k);
        using var tw = Up(b, w, n, k);
        using var tb = Up(b, bias, n);
        using var ty = b.Allocate(DType.F32, m, n);
        b.MatMul(ty, tx, tw, tb, m, n, k, accumulate: false);
        NumericAssert.Close(NaiveMatMulNT(x, w, bias, m, n, k), ty.ToArray(), F32.Atol, F32.Rtol, "y = x·wᵀ + b");
        b.MatMul(ty, tx, tw, null, m, n, k, accumulate: true);
        var twice = NaiveMatMulNT(x, w, null, m, n, k);
        var once = NaiveMatMulNT(x, w, bias, m, n, k);
        for (int i = 0; i < twice.Length; i++) twice[i] += once[i];
        NumericAssert.Close(twice, ty.ToArray(), F32.Atol, F32.Rtol, "y += x·wᵀ");

        // dx = dy·w, pre-filled to prove overwrite / accumulate
        using var tdy = Up(b, dy, m, n);
        using var tdx = Up(b, Rand(m * k, 7), m, k);
        b.MatMulBackwardInput(tdx, tdy, tw, m, n, k, accumulate: false);
        var dx = new double[m * k];
        for (int i = 0; i < m; i++)
            for (int r = 0; r < k; r++)
            {
                double s = 0;
                for (int j = 0; j < n; j++) s += (double)dy[i * n + j] * w[j * k + r];
                dx[i * k + r] = s;
            }
        NumericAssert.Close(dx, tdx.ToArray(), F32.Atol, F32.Rtol, "dx = dy·w");

        // dw += dyᵀ·x ; dBias += Σ dy
        var dw0 = Rand(n * k, 8);
        var db0 = Rand(n, 9);
        using var tdw = Up(b, dw0, n, k);
        using var tdb = Up(b, db0, n);
        b.MatMulBackwardWeight(tdw, tdb, tdy, tx, m, n, k);
        var dw = new double[n * k];
        var db = new double[n];
        for (int j = 0; j < n; j++)
        {
            db[j] = db0[j];
            for (int i = 0; i < m; i++) db[j] += dy[i * n + j];
            for (int r = 0; r < k; r++)
            {
                double s = dw0[j * k + r];
                for (int i = 0; i < m; i++) s += (double)dy[i * n + j] * x[i * k + r];
                dw[j * k + r] = s;
            }
        }
        NumericAssert.Close(dw, tdw.ToArray(), F32.Atol, F32.Rtol, "dw += dyᵀ·x");
        NumericAssert.Close(db, tdb.ToArray(), F32.Atol, F32.Rtol, "dBias += Σdy");
    }

    [Theory, MemberData(nameof(Sims))]
    public void MatMulBf16WeightsAccumulateInF32(string name)
    {
        var b = TestBackends.Get(name);
        int m = 5, n = 9, k = 130;
        var x = Rand(m * k, 10);
        var w = Rand(n * k, 11);
        var wRounded = Array.ConvertAll(w, v => HalfBits.Bf16ToF32(HalfBits.F32ToBf16(v)));
        using var tx = Up(b, x, m, k);
        using var tw = b.Allocate(DType.BF16, n, k);
        b.Upload(tw, w);
        using var ty = b.Allocate(DType.F32, m, n);
        b.MatMul(ty, tx, tw, null, m, n, k, false);
        // exact against the rounded weights: the only bf16 error is in the stored weights
        NumericAssert.Close(NaiveMatMulNT(x, wRounded, null, m, n, k), ty.ToArray(), F32.Atol, F32.Rtol, "bf16 w");
    }

    // ---------------------------------------------------------------- LoRA
    [Theory, MemberData(nameof(Sims))]
    public void LoraLinearWithDropoutMatchesNaive(string name)
    {
        var b = TestBackends.Get(name);
        int m = 6, n = 10, k = 12, r = 3;
        float s = 2f, p = 0.25f;
        ulong seed = 1234;
        var x = Rand(m * k, 20);
        var w = Rand(n * k, 21);
        var a = Rand(r * k, 22);
        var bb = Rand(n * r, 23);
        var dy = Rand(m * n, 24);
        using var tx = Up(b, x, m, k);
        using var tw = Up(b, w, n, k);
        using var ta = Up(b, a, r, k);
        using var tB = Up(b, bb, n, r);
        using var tu = b.Allocate(DType.F32, m, r);
        using var txd = b.Allocate(DType.F32, m, k);
        using var ty = b.Allocate(DType.F32, m, n);
        var lora = new LoraParams(ta, tB, s, p, seed);
        b.LoraLinearForward(ty, tx, tw, null, lora, tu, txd, m, n, k, r);

        var xd = new double[m * k];
        for (int i = 0; i < xd.Length; i++) xd[i] = DropoutHash.Keep(seed, i, p) ? x[i] / (1.0 - p) : 0;
        var u = new double[m * r];
        for (int i = 0; i < m; i++)
            for (int q = 0; q < r; q++)
                for (int c = 0; c < k; c++) u[i * r + q] += xd[i * k + c] * a[q * k + c];
        var y = NaiveMatMulNT(x, w, null, m, n, k);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                for (int q = 0; q < r; q++) y[i * n + j] += s * u[i * r + q] * bb[j * r + q];
        NumericAssert.Close(xd, txd.ToArray(), F32.Atol, F32.Rtol, "xDrop");
        NumericAssert.Close(u, tu.ToArray(), F32.Atol, F32.Rtol, "u");
        NumericAssert.Close(y, ty.ToArray(), F32.Atol, F32.Rtol, "y");

        using var tdy = Up(b, dy, m, n);
        using var tg = b.Allocate(DType.F32, m, r);
        using var tdx = Up(b, Rand(m * k, 25), m, k);
        var dA0 = Rand(r * k, 26);
        var dB0 = Rand(n * r, 27);
        using var tdA = Up(b, dA0, r, k);
        using var tdB = Up(b, dB0, n, r);
        b.LoraLinearBackward(tdx, tdy, tx, tw, lora, tu, txd, tg, tdA, tdB, null, null, m, n, k, r, accumulate: false);
        var g = new double[m * r];
        for (int i = 0; i < m; i++)
            for (int q = 0; q < r; q++)
                for (int j = 0; j < n; j++) g[i * r + q] += dy[i * n + j] * bb[j * r + q];
        var dB = Array.ConvertAll(dB0, v => (double)v);
        for (int j = 0; j < n; j++)
            for (int q = 0; q < r; q++)
                for (int i = 0; i < m; i++) dB[j * r + q] += s * dy[i * n + j] * u[i * r + q];
        var dA = Array.ConvertAll(dA0, v => (double)v);
        for (int q = 0; q < r; q++)
            for (int c = 0; c < k; c++)
                for (int i = 0; i < m; i++) dA[q * k + c] += s * g[i * r + q] * xd[i * k + c];
        var dx = new double[m * k];
        for (int i = 0; i < m; i++)
            for (int c = 0; c < k; c++)
            {
                double v = 0, l = 0;
                for (int j = 0; j < n; j++) v += dy[i * n + j] * w[j * k + c];
                for (int q = 0; q < r; q++) l += g[i * r + q] * a[q * k + c];
                dx[i * k + c] = v + (DropoutHash.Keep(seed, i * k + c, p) ? s * l / (1 - p) : 0);
            }
        NumericAssert.Close(g, tg.ToArray(), F32.Atol, F32.Rtol, "g");
        NumericAssert.Close(dB, tdB.ToArray(), F32.Atol, F32.Rtol, "dB");
        NumericAssert.Close(dA, tdA.ToArray(), F32.Atol, F32.Rtol, "dA");
        NumericAssert.Close(dx, tdx.ToArray(), F32.Atol, F32.Rtol, "dx");
    }

    // ---------------------------------------------------------------- norm, rope, swiglu
    [Theory, MemberData(nameof(Sims))]
    public void RmsNormForwardBackward(string name)
    {
        var b = TestBackends.Get(name);
        int m = 3, c = 300; // c > group size: several strides per thread
        float eps = 1e-5f;
        var x = Rand(m * c, 30);
        var w = Rand(c, 31);
        var dy = Rand(m * c, 32);
        using var tx = Up(b, x, m, c);
        using var tw = Up(b, w, c);
        using var ty = b.Allocate(DType.F32, m, c);
        using var trs = b.Allocate(DType.F32, m);
        b.RmsNormForward(ty, trs, tx, tw, m, c, eps);
        var y = new double[m * c];
        var rs = new double[m];
        for (int i = 0; i < m; i++)
        {
            double ss = 0;
            for (int j = 0; j < c; j++) ss += (double)x[i * c + j] * x[i * c + j];
            rs[i] = 1 / Math.Sqrt(ss / c + eps);
            for (int j = 0; j < c; j++) y[i * c + j] = x[i * c + j] * rs[i] * w[j];
        }
        NumericAssert.Close(y, ty.ToArray(), F32.Atol, F32.Rtol, "y");
        NumericAssert.Close(rs, trs.ToArray(), F32.Atol, F32.Rtol, "rstd");

        var dx0 = Rand(m * c, 33);
        var dw0 = Rand(c, 34);
        using var tdy = Up(b, dy, m, c);
        using var tdx = Up(b, dx0, m, c);
        using var tdw = Up(b, dw0, c);
        b.RmsNormBackward(tdx, tdw, tdy, tx, tw, trs, m, c, accumulate: true);
        var dx = new double[m * c];
        var dw = Array.ConvertAll(dw0, v => (double)v);
        for (int i = 0; i < m; i++)
        {
            double dot = 0;
            for (int j = 0; j < c; j++) dot += (double)w[j] * dy[i * c + j] * x[i * c + j];
            for (int j = 0; j < c; j++)
            {
                dx[i * c + j] = dx0[i * c + j] + rs[i] * w[j] * dy[i * c + j] - rs[i] * rs[i] * rs[i] * x[i * c + j] * dot / c;
                dw[j] += dy[i * c + j] * x[i * c + j] * rs[i];
            }
        }
        NumericAssert.Close(dx, tdx.ToArray(), F32.Atol, F32.Rtol, "dx");
        NumericAssert.Close(dw, tdw.ToArray(), F32.Atol, F32.Rtol, "dw");
    }

    [Theory, MemberData(nameof(Sims))]
    public void RopeBothLayoutsAndInverse(string name)
    {
        var b = TestBackends.Get(name);
        int m = 3, nh = 2, hs = 8;
        float theta = 10000f;
        var x = Rand(m * nh * hs, 40);
        int[] pos = { 0, 7, 5000 };
        using var tp = UpInt(b, pos);
        foreach (var layout in new[] { RopeLayout.RotateHalf, RopeLayout.Interleaved })
        {
            using var tx = Up(b, x, m, nh, hs);
            b.Rope(tx, tp, m, nh, hs, theta, layout, inverse: false);
            var e = new double[x.Length];
            for (int i = 0; i < m; i++)
                for (int h = 0; h < nh; h++)
                    for (int q = 0; q < hs / 2; q++)
                    {
                        int bse = (i * nh + h) * hs;
                        int ia = layout == RopeLayout.Interleaved ? bse + 2 * q : bse + q;
                        int ib = layout == RopeLayout.Interleaved ? ia + 1 : ia + hs / 2;
                        double ang = pos[i] * Math.Pow(theta, -2.0 * q / hs);
                        e[ia] = x[ia] * Math.Cos(ang) - x[ib] * Math.Sin(ang);
                        e[ib] = x[ia] * Math.Sin(ang) + x[ib] * Math.Cos(ang);
                    }
            NumericAssert.Close(e, tx.ToArray(), F32.Atol, F32.Rtol, $"rope {layout}");
            b.Rope(tx, tp, m, nh, hs, theta, layout, inverse: true);
            NumericAssert.Close(Array.ConvertAll(x, v => (double)v), tx.ToArray(), F32.Atol, F32.Rtol, $"rope {layout} inverse");
        }
    }

    [Theory, MemberData(nameof(Sims))]
    public void SwiGluForwardBackward(string name)
    {
        var b = TestBackends.Get(name);
        int n = 77;
        var g = Rand(n, 50, 4);
        var u = Rand(n, 51);
        var dh = Rand(n, 52);
        using var tg = Up(b, g, n);
        using var tu = Up(b, u, n);
        using var th = b.Allocate(DType.F32, n);
        b.SwiGluForward(th, tg, tu, n);
        using var tdh = Up(b, dh, n);
        using var tdg = b.Allocate(DType.F32, n);
        using var tdu = b.Allocate(DType.F32, n);
        b.SwiGluBackward(tdg, tdu, tdh, tg, tu, n);
        var h = new double[n];
        var dg = new double[n];
        var du = new double[n];
        for (int i = 0; i < n; i++)
        {
            double sg = 1 / (1 + Math.Exp(-g[i]));
            h[i] = g[i] * sg * u[i];
            du[i] = dh[i] * g[i] * sg;
            dg[i] = dh[i] * u[i] * sg * (1 + g[i] * (1 - sg));
        }
        NumericAssert.Close(h, th.ToArray(), F32.Atol, F32.Rtol, "h");
        NumericAssert.Close(dg, tdg.ToArray(), F32.Atol, F32.Rtol, "dGate");
        NumericAssert.Close(du, tdu.ToArray(), F32.Atol, F32.Rtol, "dUp");
    }

    // ---------------------------------------------------------------- attention
    /// <summary>Naive causal GQA with the full score matrix, in double; returns out, lse and (given dOut) dq, dk, dv.</summary>
    private static (double[] O, double[] Lse, double[] Dq, double[] Dk, double[] Dv) NaiveAttention(
        float[] q, float[] k, float[] v, float[]? dO, int bsz, int tq, int tkv, int kvLen, int nh, int nkv, int hs, double scale)
    {
        var o = new double[bsz * tq * nh * hs];
        var lse = new double[bsz * nh * tq];
        var dq = new double[q.Length];
        var dk = new double[k.Length];
        var dv = new double[v.Length];
        int group = nh / nkv;
        for (int b = 0; b < bsz; b++)
            for (int h = 0; h < nh; h++)
                for (int t = 0; t < tq; t++)
                {
                    int pos = kvLen - tq + t, g = h / group;
                    int qb = ((b * tq + t) * nh + h) * hs;
                    var s = new double[pos + 1];
                    double mx = double.NegativeInfinity;
                    for (int j = 0; j <= pos; j++)
                    {
                        int kb = ((b * tkv + j) * nkv + g) * hs;
                        double d = 0;
                        for (int c = 0; c < hs; c++) d += (double)q[qb + c] * k[kb + c];
                        s[j] = d * scale;
                        mx = Math.Max(mx, s[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j <= pos; j++) sum += Math.Exp(s[j] - mx);
                    double l = mx + Math.Log(sum);
                    lse[(b * nh + h) * tq + t] = l;
                    var p = new double[pos + 1];
                    for (int j = 0; j <= pos; j++)
                    {
                        p[j] = Math.Exp(s[j] - l);
                        int vb = ((b * tkv + j) * nkv + g) * hs;
                        for (int c = 0; c < hs; c++) o[qb + c] += p[j] * v[vb + c];
                    }
                    if (dO is null) continue;
                    double dsum = 0;
                    var dp = new double[pos + 1];
                    for (int j = 0; j <= pos; j++)
                    {
                        int vb = ((b * tkv + j) * nkv + g) * hs;
                        for (int c = 0; c < hs; c++) dp[j] += dO[qb + c] * (double)v[vb + c];
                        dsum += p[j] * dp[j];
                    }
                    for (int j = 0; j <= pos; j++)
                    {
                        double ds = p[j] * (dp[j] - dsum) * scale;
                        int kb = ((b * tkv + j) * nkv + g) * hs;
                        for (int c = 0; c < hs; c++)
                        {
                            dq[qb + c] += ds * k[kb + c];
                            dk[kb + c] += ds * q[qb + c];
                            dv[kb + c] += p[j] * dO[qb + c];
                        }
                    }
                }
        return (o, lse, dq, dk, dv);
    }

    [Theory, MemberData(nameof(Sims))]
    public void AttentionForwardWithCacheOffset(string name)
    {
        var b = TestBackends.Get(name);
        int bsz = 2, tq = 3, tkv = 40, kvLen = 37, nh = 4, nkv = 2, hs = 6; // kvLen spans two key tiles
        double scale = 1 / Math.Sqrt(hs);
        var q = Rand(bsz * tq * nh * hs, 60);
        var k = Rand(bsz * tkv * nkv * hs, 61);
        var v = Rand(bsz * tkv * nkv * hs, 62);
        using var tq_ = Up(b, q, bsz, tq, nh, hs);
        using var tk = Up(b, k, bsz, tkv, nkv, hs);
        using var tv = Up(b, v, bsz, tkv, nkv, hs);
        using var to = b.Allocate(DType.F32, bsz, tq, nh, hs);
        using var tl = b.Allocate(DType.F32, bsz, nh, tq);
        b.AttentionForward(to, tl, tq_, tk, tv, bsz, tq, tkv, kvLen, nh, nkv, hs, (float)scale);
        var e = NaiveAttention(q, k, v, null, bsz, tq, tkv, kvLen, nh, nkv, hs, scale);
        NumericAssert.Close(e.O, to.ToArray(), F32.Atol, F32.Rtol, "out");
        NumericAssert.Close(e.Lse, tl.ToArray(), F32.Atol, F32.Rtol, "lse");
        // decode step without lse
        b.AttentionForward(to.View(0, bsz, 1, nh, hs), null, tq_.View(0, bsz, 1, nh, hs), tk, tv, bsz, 1, tkv, kvLen, nh, nkv, hs, (float)scale);
    }

    [Theory, MemberData(nameof(Sims))]
    public void AttentionTrainingForwardBackward(string name)
    {
        var b = TestBackends.Get(name);
        int bsz = 1, t = 35, nh = 4, nkv = 1, hs = 5; // t spans two tiles of keys and of queries
        double scale = 1 / Math.Sqrt(hs);
        var q = Rand(bsz * t * nh * hs, 70);
        var k = Rand(bsz * t * nkv * hs, 71);
        var v = Rand(bsz * t * nkv * hs, 72);
        var dO = Rand(bsz * t * nh * hs, 73);
        using var tq_ = Up(b, q, bsz, t, nh, hs);
        using var tk = Up(b, k, bsz, t, nkv, hs);
        using var tv = Up(b, v, bsz, t, nkv, hs);
        using var to = b.Allocate(DType.F32, bsz, t, nh, hs);
        using var tl = b.Allocate(DType.F32, bsz, nh, t);
        b.AttentionForward(to, tl, tq_, tk, tv, bsz, t, t, t, nh, nkv, hs, (float)scale);
        var e = NaiveAttention(q, k, v, dO, bsz, t, t, t, nh, nkv, hs, scale);
        NumericAssert.Close(e.O, to.ToArray(), F32.Atol, F32.Rtol, "out");
        NumericAssert.Close(e.Lse, tl.ToArray(), F32.Atol, F32.Rtol, "lse");
        using var tdo = Up(b, dO, bsz, t, nh, hs);
        using var tdq = Up(b, Rand(q.Length, 74), bsz, t, nh, hs); // pre-filled: must be overwritten
        using var tdk = Up(b, Rand(k.Length, 75), bsz, t, nkv, hs);
        using var tdv = Up(b, Rand(v.Length, 76), bsz, t, nkv, hs);
        b.AttentionBackward(tdq, tdk, tdv, tdo, to, tl, tq_, tk, tv, bsz, t, t, nh, nkv, hs, (float)scale);
        NumericAssert.Close(e.Dq, tdq.ToArray(), F32.Atol, F32.Rtol, "dq");
        NumericAssert.Close(e.Dk, tdk.ToArray(), F32.Atol, F32.Rtol, "dk");
        NumericAssert.Close(e.Dv, tdv.ToArray(), F32.Atol, F32.Rtol, "dv");
    }

    // ---------------------------------------------------------------- embedding, loss, optimizer
    [Theory, MemberData(nameof(Sims))]
    public void EmbeddingForwardBackwardWithRepeatedTokens(string name)
    {
        var b = TestBackends.Get(name);
        int vocab = 7, c = 5;
        int[] tokens = { 3, 0, 3, 6, 3, 1 };
        int m = tokens.Length;
        var table = Rand(vocab * c, 80);
        var dOut = Rand(m * c, 81);
        using var tt = Up(b, table, vocab, c);
        using var tok = UpInt(b, tokens);
        using var to = b.Allocate(DType.F32, m, c);
        b.EmbeddingForward(to, tok, tt, m, c);
        var o = new double[m * c];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < c; j++) o[i * c + j] = table[tokens[i] * c + j];
        NumericAssert.Close(o, to.ToArray(), 0, 0, "out");
        using var tdo = Up(b, dOut, m, c);
        using var tdt = Up(b, table, vocab, c); // accumulates onto existing values
        b.EmbeddingBackward(tdt, tdo, tok, m, c);
        var dt = Array.ConvertAll(table, v => (double)v);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < c; j++) dt[tokens[i] * c + j] += dOut[i * c + j];
        NumericAssert.Close(dt, tdt.ToArray(), F32.Atol, F32.Rtol, "dTable");
        using var bad = UpInt(b, new[] { 1, 7 });
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => b.EmbeddingForward(to.View(0, 2, c), bad, tt, 2, c));
        Assert.Contains("token id 7 at position 1", ex.Message);
    }

    [Theory, MemberData(nameof(Sims))]
    public void CrossEntropyWithIgnoredRows(string name)
    {
        var b = TestBackends.Get(name);
        int m = 4, v = 301; // v > group size and odd
        var logits = Rand(m * v, 90, 5);
        int[] targets = { 3, -100, 300, 0 };
        float gs = 0.25f;
        using var tl = Up(b, logits, m, v);
        using var tt = UpInt(b, targets);
        using var loss = b.Allocate(DType.F32, m);
        b.CrossEntropy(tl, tt, loss, m, v, -100, gs, computeGrad: true);
        var el = new double[m];
        var eg = new double[m * v];
        for (int i = 0; i < m; i++)
        {
            if (targets[i] == -100) continue;
            double mx = double.NegativeInfinity;
            for (int j = 0; j < v; j++) mx = Math.Max(mx, logits[i * v + j]);
            double s = 0;
            for (int j = 0; j < v; j++) s += Math.Exp(logits[i * v + j] - mx);
            double lse = mx + Math.Log(s);
            el[i] = lse - logits[i * v + targets[i]];
            for (int j = 0; j < v; j++) eg[i * v + j] = gs * (Math.Exp(logits[i * v + j] - lse) - (j == targets[i] ? 1 : 0));
        }
        NumericAssert.Close(el, loss.ToArray(), F32.Atol, F32.Rtol, "loss");
        NumericAssert.Close(eg, tl.ToArray(), F32.Atol, F32.Rtol, "grad");
        using var badT = UpInt(b, new[] { 0, v, 0, 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => b.CrossEntropy(tl, badT, loss, m, v, -100, 1f, false));
    }

    [Theory, MemberData(nameof(Sims))]
    public void AdamWTwoSteps(string name)
    {
        var b = TestBackends.Get(name);
        int n = 50;
        var p = Rand(n, 100);
        var g = Rand(n, 101);
        using var tp = Up(b, p, n);
        using var tg = Up(b, g, n);
        using var tm = b.Allocate(DType.F32, n);
        using var tv = b.Allocate(DType.F32, n);
        double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1, gs = 0.5;
        var ep = Array.ConvertAll(p, x => (double)x);
        var em = new double[n];
        var ev = new double[n];
        for (int step = 1; step <= 2; step++)
        {
            b.AdamW(tp, tg, tm, tv, (float)lr, (float)b1, (float)b2, (float)eps, (float)wd, step, (float)gs);
            for (int i = 0; i < n; i++)
            {
                double gi = g[i] * gs;
                em[i] = b1 * em[i] + (1 - b1) * gi;
                ev[i] = b2 * ev[i] + (1 - b2) * gi * gi;
                double mh = em[i] / (1 - Math.Pow(b1, step)), vh = ev[i] / (1 - Math.Pow(b2, step));
                ep[i] -= lr * (mh / (Math.Sqrt(vh) + eps) + wd * ep[i]);
            }
        }
        NumericAssert.Close(ep, tp.ToArray(), F32.Atol, F32.Rtol, "param");
        NumericAssert.Close(em, tm.ToArray(), F32.Atol, F32.Rtol, "m");
        NumericAssert.Close(ev, tv.ToArray(), 1e-9, F32.Rtol, "v");
    }
}
