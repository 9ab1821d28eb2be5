using TensorPrimitives = System.Numerics.Tensors.TensorPrimitives;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Runtime.Inference;

/// <summary>
/// One decode step (B = 1, T = 1) of a Llama-family model on the CPU as a single fused pass: every thread of a
/// <see cref="SpinTeam"/> runs the whole layer stack, owning a share of each projection's output rows, with a
/// spin barrier only where a result is needed by all (4 per layer). Linear weights may be f32, bf16, f16, Q8_0 or
/// Q4_0 (per matrix); for the block types the activations are quantized to 8 bits per 32-block like llama.cpp
/// and the dots are integer (<see cref="MatVec"/>). Nothing is allocated per step.
/// </summary>
/// <remarks>
/// Per layer (x shared, xn and its quantized form private to each thread, so the norms need no barrier):
///   xn = rmsnorm(x)·attn_norm  [each thread]            q, K[p], V[p] = xn·W{q,k,v}ᵀ by head, roped  | barrier
///   att[h] = softmax(q_h·K_g[0..p]ᵀ·scale)·V_g[0..p] by head                                          | barrier
///   x += att·Woᵀ by output row                                                                        | barrier
///   xn = rmsnorm(x)·ffn_norm [each thread];  h = silu(xn·Wgateᵀ) ⊙ xn·Wupᵀ by row                    | barrier
///   x += h·Wdownᵀ by output row                                                                       | barrier
/// then logits = rmsnorm(x)·final_norm·Outputᵀ by vocabulary row. Matches InferenceSession's batched forward
/// (the same formulas through the IBackend ops) within f32 rounding, and within the activation quantization
/// error for block-quantized weights.
/// </remarks>
internal sealed unsafe class CpuDecoder : IDisposable
{
    private struct Mat { public void* W; public DType Type; public int N, K; public byte* P; }   // P: packed panels (PackedMatrix) or null

    private struct Layer
    {
        public float* AttnNorm, FfnNorm, Bq, Bk, Bv, KCache, VCache;
        public Mat Wq, Wk, Wv, Wo, Wgate, Wup, Wdown;
    }

    private struct Ctx
    {
        public Layer* Layers;
        public int NLayers, C, F, Q, KV, HS, NH, NKV, V, Threads;
        public float Eps, Scale;
        public float* X, Xhead, Qbuf, Att, G, U, H, Logits, Final, RopeCos, RopeSin;
        public float* Xn, Scores;        // per thread: Xn (XnStride floats), Scores (ScoreStride floats)
        public short* Aq;                // per thread: quantized activations as int16 (AqStride)
        public sbyte* Aq8;               // per thread: the same as int8 (AqStride)
        public float* Ad, As;            // per thread: block scales and d·Σq (AqStride / 32)
        public int* As8;                 // per thread: 8·Σq (AqStride / 32)
        public long XnStride, ScoreStride, AqStride;
        public Mat Out;
        public int Pos;
        public bool HeadOnly;
        public bool Interleaved;
        public nint TeamHandle;          // GCHandle of the SpinTeam (the body is static and reaches it for barriers)
    }

    private readonly CpuBackend _b;
    private readonly SpinTeam _team;
    private readonly LlamaConfig _c;
    private readonly List<nint> _native = new();
    private readonly Layer* _layers;
    private readonly Tensor _embedding;
    private readonly IReadOnlyDictionary<Tensor, PackedMatrix>? _packed;
    private Ctx _ctx;
    private GCHandle _self;
    private bool _disposed;

    /// <param name="w">Weights on <paramref name="backend"/> (linear and LM head f32/bf16/Q8_0/Q4_0, the rest f32).</param>
    /// <param name="kCache">Per layer (maxSeqLen, NKV, HS) f32, shared with the session's batched path.</param>
    /// <param name="packed">Repacked copies of weights (<see cref="PackedMatrix"/>); the ones of a type
    /// <see cref="InferenceSession.PackForDecode"/> names are read packed.</param>
    public CpuDecoder(LlamaWeights w, CpuBackend backend, Tensor[] kCache, Tensor[] vCache, int maxSeqLen,
        IReadOnlyDictionary<Tensor, PackedMatrix>? packed = null)
    {
        _packed = packed;
        _b = backend;
        _c = w.Config;
        var c = _c;
        int C = c.HiddenSize, F = c.IntermediateSize, Q = c.QDim, KV = c.KvDim, HS = c.HeadDim;
        if (HS % 2 != 0) throw new ArgumentException($"head size {HS} must be even for rotary embeddings");
        _embedding = w.Embedding;
        if (w.Embedding.DType is not (DType.F32 or DType.BF16 or DType.Q8_0 or DType.Q4_0))
            throw new ArgumentException($"embedding {w.Embedding.Describe()}: expected f32, bf16, q8_0 or q4_0");

        _layers = (Layer*)Alloc(sizeof(Layer) * (long)c.NumLayers);
        for (int l = 0; l < c.NumLayers; l++)
        {
            var L = w.Layers[l];
            _layers[l] = new Layer
            {
                AttnNorm = F32(L.AttnNorm, C), FfnNorm = F32(L.FfnNorm, C),
                Bq = L.Bq is null ? null : F32(L.Bq, Q), Bk = L.Bk is null ? null : F32(L.Bk, KV), Bv = L.Bv is null ? null : F32(L.Bv, KV),
                KCache = F32(kCache[l], (long)maxSeqLen * KV), VCache = F32(vCache[l], (long)maxSeqLen * KV),
                Wq = Matrix(L.Wq, Q, C), Wk = Matrix(L.Wk, KV, C), Wv = Matrix(L.Wv, KV, C), Wo = Matrix(L.Wo, C, Q),
                Wgate = Matrix(L.Wgate, F, C), Wup = Matrix(L.Wup, F, C), Wdown = Matrix(L.Wdown, C, F),
            };
        }

        int threads = backend.Threads;
        _team = new SpinTeam(threads);
        int maxK = Math.Max(Math.Max(C, Q), F);
        long aq = (maxK + 31) / 32 * 32;
        _ctx = new Ctx
        {
            Layers = _layers, NLayers = c.NumLayers, C = C, F = F, Q = Q, KV = KV, HS = HS, NH = c.NumHeads, NKV = c.NumKvHeads,
            V = c.VocabSize, Threads = threads, Eps = c.RmsNormEps, Scale = 1f / MathF.Sqrt(HS),
            X = AllocF(C), Qbuf = AllocF(Q), Att = AllocF(Q), G = AllocF(F), U = AllocF(F), H = AllocF(F),
            Final = F32(w.FinalNorm, C),
            XnStride = Pad(C), Xn = AllocF(Pad(C) * threads),
            ScoreStride = Pad(maxSeqLen), Scores = AllocF(Pad(maxSeqLen) * threads),
            AqStride = aq, Aq = (short*)Alloc(aq * 2 * threads), Aq8 = (sbyte*)Alloc(aq * threads),
            Ad = AllocF(aq / 32 * threads), As = AllocF(aq / 32 * threads), As8 = (int*)Alloc(aq / 32 * 4 * threads),
            Out = Matrix(w.Output, c.VocabSize, C),
            Interleaved = c.RopeLayout == RopeLayout.Interleaved,
        };
        // cos/sin of every position, formed in double like the batched Rope op.
        int half = HS / 2;
        _ctx.RopeCos = AllocF((long)maxSeqLen * half);
        _ctx.RopeSin = AllocF((long)maxSeqLen * half);
        for (int p = 0; p < maxSeqLen; p++)
            for (int i = 0; i < half; i++)
            {
                (double s, double co) = Math.SinCos(p * Math.Pow(c.RopeTheta, -2.0 * i / HS));
                _ctx.RopeCos[(long)p * half + i] = (float)co;
                _ctx.RopeSin[(long)p * half + i] = (float)s;
            }
        _self = GCHandle.Alloc(_team);
        _ctx.TeamHandle = GCHandle.ToIntPtr(_self);
    }

    private static long Pad(long n) => (n + 15) & ~15L;

    private void* Alloc(long bytes)
    {
        void* p = NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 64), 64);
        NativeMemory.Clear(p, (nuint)Math.Max(bytes, 64));
        _native.Add((nint)p);
        return p;
    }

    private float* AllocF(long n) => (float*)Alloc(n * 4);

    private float* F32(Tensor t, long needed)
    {
        if (t.DType != DType.F32) throw new ArgumentException($"{t.Describe()}: expected f32");
        if (t.Length < needed) throw new ArgumentException($"{t.Describe()}: {t.Length} elements, needs {needed}");
        return (float*)_b.Ptr(t, t.Name ?? "tensor");
    }

    private Mat Matrix(Tensor t, int n, int k)
    {
        if (t.DType is not (DType.F32 or DType.BF16 or DType.F16 or DType.Q8_0 or DType.Q4_0))
            throw new ArgumentException($"{t.Describe()}: decode supports f32, bf16, f16, q8_0 and q4_0 weights");
        if (t.Length != (long)n * k) throw new ArgumentException($"{t.Describe()}: expected ({n}, {k})");
        if (t.DType.IsBlockQuantized() && k % 32 != 0) throw new ArgumentException($"{t.Describe()}: {t.DType.Name()} rows need K % 32 == 0 (K = {k})");
        byte* p = null;
        if (_packed is not null && InferenceSession.PackForDecode(t.DType) && _packed.TryGetValue(t, out var pm))
        {
            if (pm.N != n || pm.K != k || pm.Type != t.DType) throw new ArgumentException($"{t.Describe()}: packed copy is {pm.Type.Name()} ({pm.N}, {pm.K})");
            p = pm.Data;
        }
        return new Mat { W = _b.Ptr(t, t.Name ?? "weight"), Type = t.DType, N = n, K = k, P = p };
    }

    /// <summary>The hidden state x (C) of the current token: written by <see cref="Embed"/>, read by <see cref="Step"/>.</summary>
    public float* X => _ctx.X;

    /// <summary>x = embedding row of <paramref name="token"/> (f32, bf16 or dequantized).</summary>
    public void Embed(int token)
    {
        int C = _c.HiddenSize;
        byte* table = _b.Ptr(_embedding, "embedding");
        switch (_embedding.DType)
        {
            case DType.F32: Buffer.MemoryCopy((float*)table + (long)token * C, _ctx.X, C * 4L, C * 4L); break;
            case DType.BF16:
                for (int i = 0; i < C; i++) _ctx.X[i] = HalfBits.Bf16ToF32(((ushort*)table)[(long)token * C + i]);
                break;
            default:
                QuantBlocks.Dequantize(_embedding.DType, table + _embedding.DType.StorageBytes((long)token * C), _ctx.X, C / 32);
                break;
        }
    }

    /// <summary>Runs x (from <see cref="Embed"/>) at position <paramref name="pos"/> through every layer (K/V appended
    /// to the cache) and writes the V logits.</summary>
    public void Step(int pos, float* logits)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        _ctx.Pos = pos;
        _ctx.HeadOnly = false;
        _ctx.Xhead = _ctx.X;
        _ctx.Logits = logits;
        fixed (Ctx* p = &_ctx) _team.Run(&Body, p);
    }

    /// <summary>logits = rmsnorm(x)·final_norm·Outputᵀ for a hidden state left by the batched path.</summary>
    public void Head(float* x, float* logits)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        _ctx.HeadOnly = true;
        _ctx.Xhead = x;
        _ctx.Logits = logits;
        fixed (Ctx* p = &_ctx) _team.Run(&Body, p);
    }

    private static void Range(int total, int worker, int threads, int align, out int r0, out int r1)
    {
        int units = (total + align - 1) / align;
        int per = units / threads, extra = units % threads;
        int u0 = worker * per + Math.Min(worker, extra);
        int u1 = u0 + per + (worker < extra ? 1 : 0);
        r0 = Math.Min(total, u0 * align);
        r1 = Math.Min(total, u1 * align);
    }

    private static void Body(void* p, int w)
    {
        var c = (Ctx*)p;
        var team = (SpinTeam)GCHandle.FromIntPtr(c->TeamHandle).Target!;
        int n = c->Threads;
        float* xn = c->Xn + w * c->XnStride;
        short* aq = c->Aq + w * c->AqStride;
        float* ad = c->Ad + w * (c->AqStride / 32);
        float* asum = c->As + w * (c->AqStride / 32);
        var act = new Act { Q = aq, Q8 = c->Aq8 + w * c->AqStride, D = ad, S = asum, S8 = c->As8 + w * (c->AqStride / 32) };
        float* scores = c->Scores + w * c->ScoreStride;
        int C = c->C, F = c->F, HS = c->HS, KV = c->KV, NH = c->NH, NKV = c->NKV, pos = c->Pos;
        int half = HS / 2;
        float* cos = c->RopeCos + (long)pos * half, sin = c->RopeSin + (long)pos * half;

        if (!c->HeadOnly)
        {
            for (int l = 0; l < c->NLayers; l++)
            {
                Layer* L = c->Layers + l;
                float* kRow = L->KCache + (long)pos * KV, vRow = L->VCache + (long)pos * KV;

                RmsNorm(c->X, L->AttnNorm, xn, C, c->Eps);
                bool quantIn = L->Wq.Type.IsBlockQuantized() || L->Wk.Type.IsBlockQuantized() || L->Wv.Type.IsBlockQuantized();
                if (quantIn) Quantize(xn, C, act);
                Range(NH + 2 * NKV, w, n, 1, out int u0, out int u1);
                for (int u = u0; u < u1; u++)
                {
                    if (u < NH)
                    {
                        Linear(L->Wq, u * HS, (u + 1) * HS, xn, act, c->Qbuf, L->Bq, false);
                        Rope(c->Qbuf + u * HS, cos, sin, HS, c->Interleaved);
                    }
                    else if (u < NH + NKV)
                    {
                        int j = u - NH;
                        Linear(L->Wk, j * HS, (j + 1) * HS, xn, act, kRow, L->Bk, false);
                        Rope(kRow + j * HS, cos, sin, HS, c->Interleaved);
                    }
                    else
                    {
                        int j = u - NH - NKV;
                        Linear(L->Wv, j * HS, (j + 1) * HS, xn, act, vRow, L->Bv, false);
                    }
                }
                team.Barrier(w);

                Range(NH, w, n, 1, out int h0, out int h1);
                int group = NH / NKV;
                for (int h = h0; h < h1; h++)
                    Attend(c->Qbuf + h * HS, L->KCache + (h / group) * HS, L->VCache + (h / group) * HS, KV, HS, pos + 1, c->Scale, scores, c->Att + h * HS);
                team.Barrier(w);

                if (L->Wo.Type.IsBlockQuantized()) Quantize(c->Att, c->Q, act);
                Range(C, w, n, 16, out int r0, out int r1);
                Linear(L->Wo, r0, r1, c->Att, act, c->X, null, true);
                team.Barrier(w);

                RmsNorm(c->X, L->FfnNorm, xn, C, c->Eps);
                if (L->Wgate.Type.IsBlockQuantized() || L->Wup.Type.IsBlockQuantized()) Quantize(xn, C, act);
                Range(F, w, n, 16, out r0, out r1);
                Linear(L->Wgate, r0, r1, xn, act, c->G, null, false);
                Linear(L->Wup, r0, r1, xn, act, c->U, null, false);
                if (r1 > r0)
                {
                    var g = new Span<float>(c->G + r0, r1 - r0);
                    var hh = new Span<float>(c->H + r0, r1 - r0);
                    TensorPrimitives.Sigmoid(g, hh);
                    TensorPrimitives.Multiply(hh, g, hh);
                    TensorPrimitives.Multiply(hh, new ReadOnlySpan<float>(c->U + r0, r1 - r0), hh);
                }
                team.Barrier(w);

                if (L->Wdown.Type.IsBlockQuantized()) Quantize(c->H, F, act);
                Range(C, w, n, 16, out r0, out r1);
                Linear(L->Wdown, r0, r1, c->H, act, c->X, null, true);
                team.Barrier(w);
            }
        }

        RmsNorm(c->Xhead, c->Final, xn, C, c->Eps);
        if (c->Out.Type.IsBlockQuantized()) Quantize(xn, C, act);
        Range(c->V, w, n, 16, out int v0, out int v1);
        Linear(c->Out, v0, v1, xn, act, c->Logits, null, false);
    }

    /// <summary>One thread's quantized activation row (int16 and int8 forms, block scales d, d·Σq and 8·Σq).</summary>
    private struct Act { public short* Q; public sbyte* Q8; public float* D, S; public int* S8; }

    private static void Quantize(float* x, int k, in Act a)
    {
        PackedGemm.QuantizeActivations(x, k, 1, k, a.Q8, a.Q, a.D, a.S8);
        for (int b = 0; b < k / 32; b++) a.S[b] = a.D[b] * (a.S8[b] / 8);   // d·Σq for the row kernel's Q4_0 offset
    }

    private static void Linear(in Mat m, int r0, int r1, float* x, in Act a, float* y, float* bias, bool accumulate)
    {
        if (r1 <= r0) return;
        short* aq = a.Q; float* ad = a.D, asum = a.S;
        if (m.P != null && m.Type == DType.Q4_0)
        {
            PackedGemm.RowsQ4_0(m.P, m.K, r0, r1, a.Q8, a.D, a.S8, y, bias, accumulate);
            return;
        }
        if (m.P != null && m.Type == DType.Q8_0)
        {
            PackedGemm.RowsQ8_0(m.P, m.K, r0, r1, a.Q, a.D, y, bias, accumulate);
            return;
        }
        if (m.P != null && m.Type == DType.F16)
        {
            PackedGemm.RowsF16(m.P, m.K, r0, r1, x, y, bias, accumulate);
            return;
        }
        switch (m.Type)
        {
            case DType.F32: MatVec.RowsF32((float*)m.W, m.K, r0, r1, x, y, bias, accumulate); break;
            case DType.BF16: MatVec.RowsBf16((ushort*)m.W, m.K, r0, r1, x, y, bias, accumulate); break;
            case DType.F16: MatVec.RowsF16((ushort*)m.W, m.K, r0, r1, x, y, bias, accumulate); break;
            case DType.Q8_0: MatVec.RowsQ8_0((byte*)m.W, m.K, r0, r1, aq, ad, y, bias, accumulate); break;
            default: MatVec.RowsQ4_0((byte*)m.W, m.K, r0, r1, aq, ad, asum, y, bias, accumulate); break;
        }
    }

    private static void RmsNorm(float* x, float* w, float* y, int n, float eps)
    {
        var xs = new ReadOnlySpan<float>(x, n);
        float ss = TensorPrimitives.Dot(xs, xs);
        float rstd = 1f / MathF.Sqrt(ss / n + eps);
        var ys = new Span<float>(y, n);
        TensorPrimitives.Multiply(xs, rstd, ys);
        TensorPrimitives.Multiply(ys, new ReadOnlySpan<float>(w, n), ys);
    }

    private static void Rope(float* x, float* cos, float* sin, int hs, bool interleaved)
    {
        int half = hs / 2;
        if (interleaved)
        {
            for (int i = 0; i < half; i++)
            {
                float a = x[2 * i], b = x[2 * i + 1];
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        else
        {
            for (int i = 0; i < half; i++)
            {
                float a = x[i], b = x[i + half];
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// <summary>out(HS) = softmax(q·K[0..len)ᵀ·scale)·V[0..len) for one head; K/V rows are <paramref name="stride"/> apart.</summary>
    private static void Attend(float* q, float* k, float* v, int stride, int hs, int len, float scale, float* scores, float* output)
    {
        for (int t = 0; t < len; t++)
            scores[t] = TensorPrimitives.Dot(new ReadOnlySpan<float>(q, hs), new ReadOnlySpan<float>(k + (long)t * stride, hs)) * scale;
        var s = new Span<float>(scores, len);
        float max = TensorPrimitives.Max(s);
        TensorPrimitives.Subtract(s, max, s);
        TensorPrimitives.Exp(s, s);
        float inv = 1f / TensorPrimitives.Sum(s);
        var o = new Span<float>(output, hs);
        o.Clear();
        if (Vector512.IsHardwareAccelerated && hs % 16 == 0)
        {
            for (int t = 0; t < len; t++)
            {
                var pt = Vector512.Create(scores[t] * inv);
                float* vr = v + (long)t * stride;
                for (int i = 0; i < hs; i += 16)
                    Vector512.FusedMultiplyAdd(pt, Vector512.Load(vr + i), Vector512.Load(output + i)).Store(output + i);
            }
        }
        else
        {
            for (int t = 0; t < len; t++)
            {
                float pt = scores[t] * inv;
                float* vr = v + (long)t * stride;
                for (int i = 0; i < hs; i++) output[i] += pt * vr[i];
            }
        }
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _team.Dispose();
        if (_self.IsAllocated) _self.Free();
        foreach (var p in _native) NativeMemory.AlignedFree((void*)p);
        _native.Clear();
    }
}
