using FineTuneNative.Kernels;

namespace FineTuneNative.Tests.Runtime.Model;

/// <summary>
/// A deliberately naive <see cref="IBackend"/> for the model tests: host arrays, scalar loops, double
/// accumulators, written straight from the formulas in IBackend's documentation. It lets the model's forward
/// and backward wiring be checked against the torch fixture independently of the optimised cpu and ilgpu
/// kernels (a model test that fails on "plain" is a model bug; one that fails only on another backend is a
/// kernel bug). Far too slow for anything but the tiny test shapes.
/// </summary>
internal sealed class PlainBackend : IBackend
{
    private sealed class NoOwner : IDisposable { public void Dispose() { } }
    private static readonly NoOwner Owner = new();

    public string Name => "plain";

    public Tensor Allocate(DType dtype, params int[] shape)
    {
        long n = 1;
        foreach (int d in shape) n *= d;
        object storage = dtype == DType.I32 ? new int[n] : new float[n];
        return new Tensor(this, dtype, shape, storage, 0, Owner);
    }

    private static Span<float> F(Tensor t) => new((float[])t.Storage, (int)t.Offset, (int)t.Length);
    private static Span<int> I(Tensor t) => new((int[])t.Storage, (int)t.Offset, (int)t.Length);

    public void Upload(Tensor dst, ReadOnlySpan<float> src)
    {
        var d = F(dst);
        for (int i = 0; i < d.Length; i++)
            d[i] = dst.DType == DType.BF16 ? HalfBits.Bf16ToF32(HalfBits.F32ToBf16(src[i])) : src[i];
    }
    public void Upload(Tensor dst, ReadOnlySpan<int> src) => src[..I(dst).Length].CopyTo(I(dst));
    public void UploadRaw(Tensor dst, ReadOnlySpan<byte> src) => throw new NotSupportedException("plain backend: UploadRaw");
    public void DownloadRaw(Tensor src, Span<byte> dst) => throw new NotSupportedException("plain backend: DownloadRaw");
    public void Download(Tensor src, Span<float> dst) => F(src).CopyTo(dst);
    public void Download(Tensor src, Span<int> dst) => I(src).CopyTo(dst);
    public void Synchronize() { }
    public void Fill(Tensor t, float value) => F(t).Fill(value);
    public void Copy(Tensor dst, Tensor src) => F(src).CopyTo(F(dst));
    public void Add(Tensor dst, Tensor a, Tensor b)
    {
        var d = F(dst); var x = F(a); var y = F(b);
        for (int i = 0; i < d.Length; i++) d[i] = x[i] + y[i];
    }
    public void Scale(Tensor t, float s) { var d = F(t); for (int i = 0; i < d.Length; i++) d[i] *= s; }
    public double SumOfSquares(Tensor t) { double s = 0; foreach (float x in F(t)) s += (double)x * x; return s; }

    /// <summary>
    /// Multiply bf16 weights as tensor cores do (x rounded to bf16, exact products, wide accumulation): the emulation
    /// a tensor-core backend's whole-model run is checked against (IlgpuBackend.TensorCores). Forwards of at most
    /// MatMulGemvKernels.MaxRows rows (decode) stay f32 there (the GEMV), so they are not rounded here either.
    /// </summary>
    public bool RoundsBf16MatMulInputs { get; init; }

    public void MatMul(Tensor y, Tensor x, Tensor w, Tensor? bias, int m, int n, int k, bool accumulate)
    {
        var Y = F(y); var W = F(w);
        ReadOnlySpan<float> X = F(x);
        if (RoundsBf16MatMulInputs && w.DType == DType.BF16 && m > FineTuneNative.Kernels.Gpu.MatMulGemvKernels.MaxRows)
        {
            var rounded = new float[X.Length];
            for (int i = 0; i < rounded.Length; i++) rounded[i] = HalfBits.Bf16ToF32(HalfBits.F32ToBf16(X[i]));
            X = rounded;
        }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = bias is null ? 0 : F(bias)[j];
                for (int p = 0; p < k; p++) s += (double)X[i * k + p] * W[j * k + p];
                Y[i * n + j] = (float)(accumulate ? Y[i * n + j] + s : s);
            }
    }

    public void MatMulBackwardInput(Tensor dx, Tensor dy, Tensor w, int m, int n, int k, bool accumulate)
    {
        var DX = F(dx); var DY = F(dy); var W = F(w);
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
            {
                double s = 0;
                for (int j = 0; j < n; j++) s += (double)DY[i * n + j] * W[j * k + p];
                DX[i * k + p] = (float)(accumulate ? DX[i * k + p] + s : s);
            }
    }

    public void MatMulBackwardWeight(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k)
    {
        var DW = F(dw); var DY = F(dy); var X = F(x);
        for (int j = 0; j < n; j++)
        {
            for (int p = 0; p < k; p++)
            {
                double s = 0;
                for (int i = 0; i < m; i++) s += (double)DY[i * n + j] * X[i * k + p];
                DW[j * k + p] += (float)s;
            }
            if (dBias is not null)
            {
                double s = 0;
                for (int i = 0; i < m; i++) s += DY[i * n + j];
                F(dBias)[j] += (float)s;
            }
        }
    }

    private static float DropFactor(LoraParams l, int k, int i, int p) =>
        l.Dropout <= 0 ? 1f : DropoutHash.Keep(l.Seed, (long)i * k + p, l.Dropout) ? 1f / (1f - l.Dropout) : 0f;

    public void LoraLinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r)
    {
        MatMul(y, x, w, bias, m, n, k, false);
        var X = F(x); var A = F(lora.A); var B = F(lora.B); var U = F(u); var Y = F(y);
        var xd = new float[m * k];
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++) xd[i * k + p] = X[i * k + p] * DropFactor(lora, k, i, p);
        if (xDrop is not null) xd.CopyTo(F(xDrop));
        for (int i = 0; i < m; i++)
            for (int q = 0; q < r; q++)
            {
                double s = 0;
                for (int p = 0; p < k; p++) s += (double)xd[i * k + p] * A[q * k + p];
                U[i * r + q] = (float)s;
            }
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
            {
                double s = 0;
                for (int q = 0; q < r; q++) s += (double)U[i * r + q] * B[j * r + q];
                Y[i * n + j] += (float)(lora.Scale * s);
            }
    }

    public void LoraLinearBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, LoraParams lora, Tensor u, Tensor? xDrop, Tensor g,
        Tensor dA, Tensor dB, Tensor? dW, Tensor? dBias, int m, int n, int k, int r, bool accumulate)
    {
        var DY = F(dy); var X = F(x); var A = F(lora.A); var B = F(lora.B); var U = F(u); var G = F(g);
        var DA = F(dA); var DB = F(dB); float s = lora.Scale;
        for (int i = 0; i < m; i++)
            for (int q = 0; q < r; q++)
            {
                double acc = 0;
                for (int j = 0; j < n; j++) acc += (double)DY[i * n + j] * B[j * r + q];
                G[i * r + q] = (float)acc;
            }
        for (int j = 0; j < n; j++)
            for (int q = 0; q < r; q++)
            {
                double acc = 0;
                for (int i = 0; i < m; i++) acc += (double)DY[i * n + j] * U[i * r + q];
                DB[j * r + q] += (float)(s * acc);
            }
        for (int q = 0; q < r; q++)
            for (int p = 0; p < k; p++)
            {
                double acc = 0;
                for (int i = 0; i < m; i++) acc += (double)G[i * r + q] * X[i * k + p] * DropFactor(lora, k, i, p);
                DA[q * k + p] += (float)(s * acc);
            }
        MatMulBackwardInput(dx, dy, w, m, n, k, accumulate);
        var DX = F(dx);
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
            {
                double acc = 0;
                for (int q = 0; q < r; q++) acc += (double)G[i * r + q] * A[q * k + p];
                DX[i * k + p] += (float)(s * acc * DropFactor(lora, k, i, p));
            }
        if (dW is not null) MatMulBackwardWeight(dW, dBias, dy, x, m, n, k);
    }

    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int m, int c, float eps)
    {
        var Y = F(y); var X = F(x); var W = F(w); var R = F(rstd);
        for (int i = 0; i < m; i++)
        {
            double ss = 0;
            for (int j = 0; j < c; j++) ss += (double)X[i * c + j] * X[i * c + j];
            double rs = 1.0 / Math.Sqrt(ss / c + eps);
            R[i] = (float)rs;
            for (int j = 0; j < c; j++) Y[i * c + j] = (float)(X[i * c + j] * rs * W[j]);
        }
    }

    public void RmsNormBackward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor rstd, int m, int c, bool accumulate)
    {
        var DX = F(dx); var DW = F(dw); var DY = F(dy); var X = F(x); var W = F(w); var R = F(rstd);
        for (int i = 0; i < m; i++)
        {
            double rs = R[i], dot = 0;
            for (int j = 0; j < c; j++) dot += (double)DY[i * c + j] * W[j] * X[i * c + j];
            for (int j = 0; j < c; j++)
            {
                double g = rs * DY[i * c + j] * W[j] - rs * rs * rs * X[i * c + j] * dot / c;
                DX[i * c + j] = (float)(accumulate ? DX[i * c + j] + g : g);
                DW[j] += (float)(DY[i * c + j] * X[i * c + j] * rs);
            }
        }
    }

    public void Rope(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse)
    {
        var X = F(x); var P = I(positions);
        int half = headSize / 2;
        for (int i = 0; i < m; i++)
            for (int h = 0; h < nHeads; h++)
                for (int p = 0; p < half; p++)
                {
                    double ang = P[i] * Math.Pow(theta, -2.0 * p / headSize) * (inverse ? -1 : 1);
                    int b = (i * nHeads + h) * headSize;
                    int a0 = layout == RopeLayout.RotateHalf ? b + p : b + 2 * p;
                    int a1 = layout == RopeLayout.RotateHalf ? b + p + half : b + 2 * p + 1;
                    double x0 = X[a0], x1 = X[a1];
                    X[a0] = (float)(x0 * Math.Cos(ang) - x1 * Math.Sin(ang));
                    X[a1] = (float)(x0 * Math.Sin(ang) + x1 * Math.Cos(ang));
                }
    }

    private static double Silu(double g) => g / (1 + Math.Exp(-g));

    public void SwiGluForward(Tensor h, Tensor gate, Tensor up, long count)
    {
        var H = F(h); var G = F(gate); var U = F(up);
        for (int i = 0; i < count; i++) H[i] = (float)(Silu(G[i]) * U[i]);
    }

    public void SwiGluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long count)
    {
        var DG = F(dGate); var DU = F(dUp); var DH = F(dh); var G = F(gate); var U = F(up);
        for (int i = 0; i < count; i++)
        {
            double sg = 1 / (1 + Math.Exp(-(double)G[i]));
            DG[i] = (float)(DH[i] * U[i] * (sg * (1 + G[i] * (1 - sg))));
            DU[i] = (float)(DH[i] * G[i] * sg);
        }
    }

    public void AttentionForward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale)
    {
        var O = F(output); var Q = F(q); var K = F(k); var Vv = F(v);
        int group = nHeads / nKvHeads;
        var sc = new double[kvLen];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < nHeads; h++)
                for (int t = 0; t < tq; t++)
                {
                    int last = kvLen - tq + t, kh = h / group;
                    double mx = double.NegativeInfinity;
                    for (int j = 0; j <= last; j++)
                    {
                        double s = 0;
                        for (int d = 0; d < headSize; d++)
                            s += (double)Q[((b * tq + t) * nHeads + h) * headSize + d] * K[((b * tkv + j) * nKvHeads + kh) * headSize + d];
                        sc[j] = s * scale;
                        mx = Math.Max(mx, sc[j]);
                    }
                    double z = 0;
                    for (int j = 0; j <= last; j++) z += Math.Exp(sc[j] - mx);
                    if (lse is not null) F(lse)[(b * nHeads + h) * tq + t] = (float)(mx + Math.Log(z));
                    for (int d = 0; d < headSize; d++)
                    {
                        double acc = 0;
                        for (int j = 0; j <= last; j++) acc += Math.Exp(sc[j] - mx) / z * Vv[((b * tkv + j) * nKvHeads + kh) * headSize + d];
                        O[((b * tq + t) * nHeads + h) * headSize + d] = (float)acc;
                    }
                }
    }

    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int nHeads, int nKvHeads, int headSize, float scale)
    {
        var DQ = F(dq); var DK = F(dk); var DV = F(dv); var DO = F(dOut); var O = F(output); var L = F(lse);
        var Q = F(q); var K = F(k); var Vv = F(v);
        DQ.Clear(); DK.Clear(); DV.Clear();
        int group = nHeads / nKvHeads, prefix = tkv - tq; // query i sits at position prefix + i
        int Qi(int b, int i, int h, int d) => ((b * tq + i) * nHeads + h) * headSize + d;
        int Ki(int b, int j, int h, int d) => ((b * tkv + j) * nKvHeads + h) * headSize + d;
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < nHeads; h++)
                for (int i = 0; i < tq; i++)
                {
                    int kh = h / group;
                    double D = 0;
                    for (int d = 0; d < headSize; d++) D += (double)DO[Qi(b, i, h, d)] * O[Qi(b, i, h, d)];
                    for (int j = 0; j <= prefix + i; j++)
                    {
                        double s = 0, dp = 0;
                        for (int d = 0; d < headSize; d++)
                        {
                            s += (double)Q[Qi(b, i, h, d)] * K[Ki(b, j, kh, d)];
                            dp += (double)DO[Qi(b, i, h, d)] * Vv[Ki(b, j, kh, d)];
                        }
                        double p = Math.Exp(s * scale - L[(b * nHeads + h) * tq + i]);
                        double ds = p * (dp - D);
                        for (int d = 0; d < headSize; d++)
                        {
                            DQ[Qi(b, i, h, d)] += (float)(ds * scale * K[Ki(b, j, kh, d)]);
                            DK[Ki(b, j, kh, d)] += (float)(ds * scale * Q[Qi(b, i, h, d)]);
                            DV[Ki(b, j, kh, d)] += (float)(p * DO[Qi(b, i, h, d)]);
                        }
                    }
                }
    }

    public void EmbeddingForward(Tensor output, Tensor tokens, Tensor table, int m, int c)
    {
        var O = F(output); var T = I(tokens); var W = F(table);
        int vocab = (int)(table.Length / c);
        for (int i = 0; i < m; i++)
        {
            if ((uint)T[i] >= (uint)vocab) throw new ArgumentOutOfRangeException(nameof(tokens), $"token {T[i]} at {i} outside [0, {vocab})");
            W.Slice(T[i] * c, c).CopyTo(O.Slice(i * c, c));
        }
    }

    public void EmbeddingBackward(Tensor dTable, Tensor dOut, Tensor tokens, int m, int c)
    {
        var DT = F(dTable); var DO = F(dOut); var T = I(tokens);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < c; j++) DT[T[i] * c + j] += DO[i * c + j];
    }

    public void CrossEntropy(Tensor logits, Tensor targets, Tensor losses, int m, int v, int ignoreIndex, float gradScale, bool computeGrad)
    {
        var Lg = F(logits); var T = I(targets); var Ls = F(losses);
        for (int i = 0; i < m; i++)
        {
            var row = Lg.Slice(i * v, v);
            if (T[i] == ignoreIndex)
            {
                Ls[i] = 0;
                if (computeGrad) row.Clear();
                continue;
            }
            double mx = double.NegativeInfinity;
            foreach (float x in row) mx = Math.Max(mx, x);
            double z = 0;
            foreach (float x in row) z += Math.Exp(x - mx);
            double lse = mx + Math.Log(z);
            Ls[i] = (float)(lse - row[T[i]]);
            if (!computeGrad) continue;
            for (int j = 0; j < v; j++)
                row[j] = (float)(gradScale * (Math.Exp(row[j] - lse) - (j == T[i] ? 1 : 0)));
        }
    }

    public void AdamW(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale)
    {
        var P = F(param); var G = F(grad); var M = F(m); var V = F(v);
        for (int i = 0; i < P.Length; i++)
        {
            double g = gradScale * G[i];
            M[i] = (float)(beta1 * M[i] + (1 - beta1) * g);
            V[i] = (float)(beta2 * V[i] + (1 - beta2) * g * g);
            double mh = M[i] / (1 - Math.Pow(beta1, step)), vh = V[i] / (1 - Math.Pow(beta2, step));
            P[i] = (float)(P[i] - lr * (mh / (Math.Sqrt(vh) + eps) + weightDecay * P[i]));
        }
    }

    public void Dispose() { }
}
