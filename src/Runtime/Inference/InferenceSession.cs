using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Runtime.Inference;

/// <summary>
/// Runs a Llama-family model forward for generation with a KV cache: <see cref="Prefill"/> pushes a prompt
/// through in one batched pass, <see cref="Decode"/> one token at a time. Every buffer (the per-layer K/V cache
/// for <c>maxSeqLen</c> positions and the activations of one prefill chunk) is allocated once, at
/// construction; a decode step allocates nothing.
/// </summary>
/// <remarks>
/// Per layer, for the T new tokens at positions p..p+T-1 (B = 1):
///   xn = rmsnorm(x) · attn_norm;  q = xn·Wqᵀ (+bq);  K[p..p+T) = xn·Wkᵀ (+bk);  V[p..p+T) = xn·Wvᵀ (+bv)
///   rope(q), rope(K[p..p+T)) at their absolute positions;  a = attention(q, K[0..p+T), V[0..p+T)) causal
///   x += a·Woᵀ;  xn = rmsnorm(x) · ffn_norm;  x += (silu(xn·Wgateᵀ) ⊙ xn·Wupᵀ)·Wdownᵀ
/// then logits = rmsnorm(x_last) · final_norm · Outputᵀ for the last position only.
/// On the cpu backend a decode step (and a one-token prefill) runs as one fused pass (<see cref="CpuDecoder"/>),
/// and linear weights may be block-quantized (Q8_0/Q4_0, see <see cref="WeightQuantizer"/>): decode uses integer
/// dot products on 8-bit activations, a batched prefill dequantizes each weight matrix to f32 once per chunk and
/// uses the f32 GEMM.
/// </remarks>
public sealed unsafe partial class InferenceSession : IDisposable
{
    private readonly LlamaWeights _w;
    private readonly IBackend _b;
    private readonly LlamaConfig _c;
    private readonly int _chunk;
    private readonly Tensor[] _kCache, _vCache;   // per layer (maxSeqLen, NKV, HS)
    private readonly Tensor _x, _xn, _q, _att, _gate, _up, _h, _rstd, _tokens, _positions; // (chunk, ·)
    private readonly Tensor _xLast, _logits;       // (1, C), (1, V)
    private readonly Tensor _xnRow, _rstdRow;      // views of row 0 of _xn and _rstd for the final norm
    private readonly Tensor? _q16, _kNew, _vNew;   // bf16 cache: q rounded (chunk, NH·HS); f32 k, v of the new rows (chunk, NKV·HS)
    private readonly int[] _hostInts;
    private readonly float[] _hostLogits;
    private readonly List<Tensor> _owned = new();
    private readonly CpuDecoder? _fused;
    private Tensor? _wScratch;                     // f32 dequantized weight for a batched prefill with quantized weights
    private readonly Dictionary<Tensor, PackedMatrix> _packed = new(ReferenceEqualityComparer.Instance);
    private readonly PackedGemm.Workspace? _packedWs; // quantized activations of one prefill chunk for the packed GEMM
    private bool _disposed;

    /// <param name="w">The model (on <paramref name="backend"/>).</param>
    /// <param name="backend">The backend the weights live on.</param>
    /// <param name="maxSeqLen">Most positions a sequence may reach (prompt + generated); sizes the KV cache.</param>
    /// <param name="prefillChunk">Most prompt tokens processed in one pass (longer prompts go in several); default min(maxSeqLen, 512).</param>
    /// <param name="fusedCpuDecode">On the cpu backend, decode with the fused single-pass <see cref="CpuDecoder"/> (default);
    /// false runs every step through the batched IBackend ops (f32/bf16 weights only), e.g. to compare the two.</param>
    /// <param name="packedWeights">On the cpu backend (AVX-512BW), repack the weights once for the packed kernels
    /// (<see cref="PackedGemm"/>): the prefill GEMM of Q8_0/Q4_0/F16 linear weights and the Q4_0 decode matvec (layers
    /// and LM head). Costs a second copy of those weights. False dequantizes per prefill chunk and runs the f32 GEMM,
    /// and decodes Q4_0 with the row kernel (kept to compare the two).</param>
    /// <param name="kvCacheDType">Storage of the KV cache: f32 (default) or bf16 (half the memory; bf16 attention as in
    /// training with LlamaModel.AttentionDType: q, k after RoPE and v rounded to bf16, f32 softmax and output). With a bf16
    /// cache a prefill on CUDA sm_80+ runs the tensor-core flash attention and a decode step reads the bf16 cache; other
    /// backends widen on the fly. The cpu backend's fused decoder reads an f32 cache only, so a bf16 cache runs the
    /// batched ops there.</param>
    public InferenceSession(LlamaWeights w, IBackend backend, int maxSeqLen, int prefillChunk = 0, bool fusedCpuDecode = true, bool packedWeights = true,
        DType kvCacheDType = DType.F32)
    {
        ArgumentNullException.ThrowIfNull(w);
        ArgumentNullException.ThrowIfNull(backend);
        if (maxSeqLen <= 0) throw new ArgumentOutOfRangeException(nameof(maxSeqLen), "maxSeqLen must be > 0");
        if (kvCacheDType is not (DType.F32 or DType.BF16))
            throw new ArgumentException($"KV cache dtype {kvCacheDType.Name()}: expected f32 or bf16", nameof(kvCacheDType));
        if (!ReferenceEquals(w.Embedding.Backend, backend))
            throw new ArgumentException($"the weights live on backend '{w.Embedding.Backend.Name}', not '{backend.Name}'", nameof(backend));
        _w = w;
        _b = backend;
        _c = w.Config;
        MaxSeqLen = maxSeqLen;
        _chunk = prefillChunk > 0 ? Math.Min(prefillChunk, maxSeqLen) : Math.Min(maxSeqLen, 512);
        KvCacheDType = kvCacheDType;
        int C = _c.HiddenSize, F = _c.IntermediateSize, Q = _c.QDim, T = _chunk;
        try
        {
            _kCache = new Tensor[_c.NumLayers];
            _vCache = new Tensor[_c.NumLayers];
            for (int l = 0; l < _c.NumLayers; l++)
            {
                _kCache[l] = Own(kvCacheDType, $"k_cache.{l}", maxSeqLen, _c.NumKvHeads, _c.HeadDim);
                _vCache[l] = Own(kvCacheDType, $"v_cache.{l}", maxSeqLen, _c.NumKvHeads, _c.HeadDim);
            }
            if (kvCacheDType != DType.F32)
            {
                _q16 = Own(kvCacheDType, "q_bf16", T, Q);
                _kNew = Own(DType.F32, "k_new", T, _c.KvDim);
                _vNew = Own(DType.F32, "v_new", T, _c.KvDim);
                fusedCpuDecode = false; // CpuDecoder reads f32 cache rows
            }
            _x = Own(DType.F32, "x", T, C);
            _xn = Own(DType.F32, "xn", T, C);
            _q = Own(DType.F32, "q", T, Q);
            _att = Own(DType.F32, "att", T, Q);
            _gate = Own(DType.F32, "gate", T, F);
            _up = Own(DType.F32, "up", T, F);
            _h = Own(DType.F32, "h", T, F);
            _rstd = Own(DType.F32, "rstd", T);
            _tokens = Own(DType.I32, "tokens", T);
            _positions = Own(DType.I32, "positions", T);
            _xLast = Own(DType.F32, "x_last", 1, C);
            _logits = Own(DType.F32, "logits", 1, _c.VocabSize);
            _xnRow = _xn.View(0, 1, C);
            _rstdRow = _rstd.View(0, 1);
            if (backend is CpuBackend cpu && fusedCpuDecode)
            {
                if (packedWeights && PackedGemm.IsSupported)
                {
                    PackWeights(cpu, prefill: T > 1);
                    if (T > 1 && _packed.Keys.Any(k => PackForPrefill(k.DType)))
                        _packedWs = new PackedGemm.Workspace(T, Math.Max(Math.Max(C, Q), F), cpu.Threads);
                }
                _fused = new CpuDecoder(w, cpu, _kCache, _vCache, maxSeqLen, _packed);
            }
            else if (w.Named().Any(p => p.Tensor.DType.IsBlockQuantized()))
                throw new ArgumentException($"block-quantized weights need the cpu backend's fused decoder (backend '{backend.Name}')");
        }
        catch
        {
            foreach (var t in _owned) t.Dispose();
            foreach (var p in _packed.Values) p.Dispose();
            _packedWs?.Dispose();
            throw;
        }
        _hostInts = new int[T];
        // Pinned: the fused decoder writes the logits straight into it.
        _hostLogits = GC.AllocateArray<float>(_c.VocabSize, pinned: true);
    }

    /// <summary>Which weight types the prefill runs through <see cref="PackedGemm"/> (repacked once, here).</summary>
    internal static bool PackForPrefill(DType t) => t is DType.F32 or DType.F16 or DType.Q8_0 or DType.Q4_0;

    /// <summary>Which weight types the fused decoder reads packed (<see cref="PackedGemm.RowsQ4_0"/>: ~4x fewer
    /// instructions per block than the row kernel, 20 instead of 18 bytes per block; F16 where its VCVTPH2PS panel kernel
    /// runs, <see cref="PackedGemm.RowsF16"/>: one stream per 16 rows instead of four).</summary>
    internal static bool PackForDecode(DType t) => t is DType.Q4_0 or DType.Q8_0 || (t == DType.F16 && PackedGemm.F16DecodeAvailable);

    private void PackWeights(CpuBackend cpu, bool prefill)
    {
        void Pack(Tensor m)
        {
            if (!PackedMatrix.Supports(m.DType, m.Cols) || _packed.ContainsKey(m)) return;
            _packed[m] = new PackedMatrix(m.DType, cpu.Ptr(m, m.Name ?? "weight"), (int)m.Rows, m.Cols, m.Name ?? "weight");
        }
        foreach (var L in _w.Layers)
            foreach (var m in new[] { L.Wq, L.Wk, L.Wv, L.Wo, L.Wgate, L.Wup, L.Wdown })
                if ((prefill && PackForPrefill(m.DType)) || PackForDecode(m.DType)) Pack(m);
        if (PackForDecode(_w.Output.DType)) Pack(_w.Output);
    }

    /// <summary>The fused decoder knows no bottleneck adapters: with one attached, decode runs the batched ops.</summary>
    private bool UseFused => _fused is not null && (_adapters is null || Array.TrueForAll(_adapters, a => a is null));

    private float* LogitsPtr => (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_hostLogits));

    private Tensor Own(DType d, string name, params int[] shape)
    {
        var t = _b.Allocate(d, shape);
        t.Name = name;
        _owned.Add(t);
        return t;
    }

    public LlamaConfig Config => _c;
    public IBackend Backend => _b;
    public int MaxSeqLen { get; }
    /// <summary>Storage of the KV cache (f32 or bf16, see the constructor).</summary>
    public DType KvCacheDType { get; }
    /// <summary>Number of positions already in the KV cache (the position of the next token).</summary>
    public int Position { get; private set; }
    public int VocabSize => _c.VocabSize;

    /// <summary>Forgets the sequence (the cache is overwritten from position 0 on, or after a prompt/prefix adapter's rows).</summary>
    public void Reset() => Position = _basePosition;

    /// <summary>
    /// Appends <paramref name="tokens"/> at the current position and returns the logits (V) of the last one.
    /// The returned array is reused by the next call.
    /// </summary>
    public float[] Prefill(ReadOnlySpan<int> tokens)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (tokens.Length == 0) throw new ArgumentException("prefill needs at least one token (e.g. BOS)", nameof(tokens));
        if (tokens.Length == 1 && UseFused) return Decode(tokens[0]);
        if (Position + tokens.Length > MaxSeqLen)
            throw new InvalidOperationException($"sequence of {Position + tokens.Length} positions exceeds this session's maxSeqLen {MaxSeqLen}");
        for (int i = 0; i < tokens.Length; i++)
            if ((uint)tokens[i] >= (uint)_c.VocabSize)
                throw new ArgumentOutOfRangeException(nameof(tokens), $"token {tokens[i]} at index {i} is outside the vocabulary [0, {_c.VocabSize})");
        int done = 0;
        while (done < tokens.Length)
        {
            int n = Math.Min(_chunk, tokens.Length - done);
            Forward(tokens.Slice(done, n));
            done += n;
        }
        if (_fused is not null)
        {
            _fused.Head((float*)((CpuBackend)_b).Ptr(_xLast, "x_last"), LogitsPtr);
            return _hostLogits;
        }
        return Logits();
    }

    /// <summary>Appends one token and returns the logits (V) of the next position (the array is reused).</summary>
    public float[] Decode(int token)
    {
        if (!UseFused)
        {
            ReadOnlySpan<int> one = stackalloc int[1] { token };
            return Prefill(one);
        }
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (Position + 1 > MaxSeqLen)
            throw new InvalidOperationException($"sequence of {Position + 1} positions exceeds this session's maxSeqLen {MaxSeqLen}");
        if ((uint)token >= (uint)_c.VocabSize)
            throw new ArgumentOutOfRangeException(nameof(token), $"token {token} is outside the vocabulary [0, {_c.VocabSize})");
        _fused!.Embed(token);
        _fused.Step(Position, LogitsPtr);
        Position++;
        return _hostLogits;
    }

    /// <summary>Runs the T = tokens.Length new tokens through every layer, leaving the last row's hidden state in _xLast.</summary>
    private void Forward(ReadOnlySpan<int> tokens, Tensor? embeddings = null)
    {
        var b = _b;
        var c = _c;
        int T = tokens.Length, p = Position;
        int C = c.HiddenSize, F = c.IntermediateSize, Q = c.QDim, KV = c.KvDim, HS = c.HeadDim;
        int kvLen = p + T;
        float scale = 1f / MathF.Sqrt(HS);

        var v = Views(T);
        tokens.CopyTo(_hostInts);
        b.Upload(v.Tokens, _hostInts.AsSpan(0, T));
        for (int i = 0; i < T; i++) _hostInts[i] = p + i;
        b.Upload(v.Positions, _hostInts.AsSpan(0, T));
        var (tok, pos, x, xn, q, att, gate, up, h, rstd) = (v.Tokens, v.Positions, v.X, v.Xn, v.Q, v.Att, v.Gate, v.Up, v.H, v.Rstd);


        if (embeddings is not null) b.Copy(x, embeddings); // prompt tuning's virtual tokens (SetPrompt)
        else if (_w.Embedding.DType.IsBlockQuantized())
        {
            var cpu = (CpuBackend)b;
            byte* table = cpu.Ptr(_w.Embedding, "embedding");
            float* px = (float*)cpu.Ptr(x, "x");
            for (int i = 0; i < T; i++)
                QuantBlocks.Dequantize(_w.Embedding.DType, table + _w.Embedding.DType.StorageBytes((long)tokens[i] * C), px + (long)i * C, C / 32);
        }
        else b.EmbeddingForward(x, tok, _w.Embedding, T, C);
        for (int l = 0; l < c.NumLayers; l++)
        {
            var L = _w.Layers[l];
            var kRows = _kCache[l].View((long)p * KV, T, KV);
            var vRows = _vCache[l].View((long)p * KV, T, KV);
            // f32 cache: the projections write the cache rows; bf16: f32 scratch rows, rounded into the cache after RoPE
            var kNew = v.KNew ?? kRows;
            var vNew = v.VNew ?? vRows;
            b.RmsNormForward(xn, rstd, x, L.AttnNorm, T, C, c.RmsNormEps);
            Linear(q, xn, L.Wq, L.Bq, T, Q, C, accumulate: false);
            Linear(kNew, xn, L.Wk, L.Bk, T, KV, C, accumulate: false, sameInput: L.Wk.DType == L.Wq.DType);
            Linear(vNew, xn, L.Wv, L.Bv, T, KV, C, accumulate: false, sameInput: L.Wv.DType == L.Wq.DType);
            b.Rope(q, pos, T, c.NumHeads, HS, c.RopeTheta, c.RopeLayout, inverse: false);
            b.Rope(kNew, pos, T, c.NumKvHeads, HS, c.RopeTheta, c.RopeLayout, inverse: false);
            var qAtt = q;
            if (v.Q16 is { } q16)
            {
                b.Copy(kRows, kNew);
                b.Copy(vRows, vNew);
                b.Copy(q16, q);
                qAtt = q16; // bf16 q, k, v: the tensor-core forward on sm_80+ (prefill), the decode kernel reads them as they are
            }
            b.AttentionForward(att, null, qAtt, _kCache[l], _vCache[l], 1, T, MaxSeqLen, kvLen, c.NumHeads, c.NumKvHeads, HS, scale);
            AddProjection(x, att, L.Wo, T, Q, l, BottleneckSite.Attention);

            b.RmsNormForward(xn, rstd, x, L.FfnNorm, T, C, c.RmsNormEps);
            Linear(gate, xn, L.Wgate, null, T, F, C, accumulate: false);
            Linear(up, xn, L.Wup, null, T, F, C, accumulate: false, sameInput: L.Wup.DType == L.Wgate.DType);
            b.SwiGluForward(h, gate, up, (long)T * F);
            AddProjection(x, h, L.Wdown, T, F, l, BottleneckSite.Mlp);
        }
        b.Copy(_xLast, v.XLastRow);
        Position = kvLen;
    }

    /// <summary>
    /// y(T,N) (+)= x·wᵀ (+bias). A repacked w runs the packed small-M GEMM (integer for Q8_0/Q4_0, on x quantized once
    /// per input: <paramref name="sameInput"/> reuses the quantization of the previous call's x); otherwise a
    /// block-quantized w is dequantized to f32 first (once per prefill chunk).
    /// </summary>
    private void Linear(Tensor y, Tensor x, Tensor w, Tensor? bias, int t, int n, int k, bool accumulate, bool sameInput = false)
    {
        if (_packed.TryGetValue(w, out var pm))
        {
            var c = (CpuBackend)_b;
            float* px = (float*)c.Ptr(x, "x");
            if (w.DType.IsBlockQuantized() && !sameInput) PackedGemm.QuantizeInput(_packedWs!, px, k, t, k);
            PackedGemm.Run(c, pm, _packedWs!, t, px, k, (float*)c.Ptr(y, "y"), n, bias is null ? null : (float*)c.Ptr(bias, "bias"), accumulate);
            return;
        }
        if (!w.DType.IsBlockQuantized() && w.DType != DType.F16)
        {
            _b.MatMul(y, x, w, bias, t, n, k, accumulate);
            return;
        }
        var cpu = (CpuBackend)_b;
        long need = (long)n * k;
        if (_wScratch is null || _wScratch.Length < need)
        {
            long most = _w.Layers.SelectMany(l => new[] { l.Wq, l.Wk, l.Wv, l.Wo, l.Wgate, l.Wup, l.Wdown }).Max(m => m.Length);
            _wScratch?.Dispose();
            _wScratch = _b.Allocate(DType.F32, (int)Math.Max(most, need));
            _wScratch.Name = "dequantized_weight";
        }
        // Split over the cores (a single thread spent a large share of a 128-token Q4_0 prefill here).
        nint src = (nint)cpu.Ptr(w, w.Name ?? "w"), dst = (nint)cpu.Ptr(_wScratch, "dequantized_weight");
        var type = w.DType;
        if (type == DType.F16)
        {
            HalfConvert.F16ToF32((ushort*)src, (float*)dst, need);   // only without AVX-512BW (else F16 is packed)
            _b.MatMul(y, x, _wScratch.View(0, n, k), bias, t, n, k, accumulate);
            return;
        }
        long blocks = need / 32, per = Math.Max(1024, (blocks + 15) / 16);
        Parallel.For(0, (int)((blocks + per - 1) / per), i =>
        {
            long b0 = i * per, nb = Math.Min(per, blocks - b0);
            QuantBlocks.Dequantize(type, (byte*)src + type.StorageBytes(b0 * 32), (float*)dst + b0 * 32, nb);
        });
        _b.MatMul(y, x, _wScratch.View(0, n, k), bias, t, n, k, accumulate);
    }

    /// <summary>Views of the activation buffers for T rows: cached for the last T used, so decode (T = 1) reuses them.</summary>
    private sealed record RowViews(Tensor Tokens, Tensor Positions, Tensor X, Tensor Xn, Tensor Q, Tensor Att,
        Tensor Gate, Tensor Up, Tensor H, Tensor Rstd, Tensor XLastRow, Tensor? Q16 = null, Tensor? KNew = null, Tensor? VNew = null);

    private RowViews? _views;

    private RowViews Views(int T)
    {
        if (_views is { } cached && cached.X.Shape[0] == T) return cached;
        int C = _c.HiddenSize, F = _c.IntermediateSize, Q = _c.QDim;
        return _views = new RowViews(_tokens.View(0, T), _positions.View(0, T), _x.View(0, T, C), _xn.View(0, T, C),
            _q.View(0, T, Q), _att.View(0, T, Q), _gate.View(0, T, F), _up.View(0, T, F), _h.View(0, T, F), _rstd.View(0, T),
            _x.View((long)(T - 1) * C, 1, C), _q16?.View(0, T, Q), _kNew?.View(0, T, _c.KvDim), _vNew?.View(0, T, _c.KvDim));
    }

    private float[] Logits()
    {
        int C = _c.HiddenSize, V = _c.VocabSize;
        _b.RmsNormForward(_xnRow, _rstdRow, _xLast, _w.FinalNorm, 1, C, _c.RmsNormEps);
        _b.MatMul(_logits, _xnRow, _w.Output, null, 1, V, C, accumulate: false);
        _b.Download(_logits, _hostLogits);
        return _hostLogits;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _fused?.Dispose();
        _wScratch?.Dispose();
        foreach (var p in _packed.Values) p.Dispose();
        _packed.Clear();
        _packedWs?.Dispose();
        foreach (var t in _owned) t.Dispose();
        _owned.Clear();
    }
}
