using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Shapes of one decode-attention launch (see <see cref="AttentionDecodeKernels"/>).</summary>
public struct DecodeArgs
{
    public int Batch, Tkv, KvLen, NHeads, NKvHeads, HeadSize, HasLse, HasLengths;
    /// <summary>The cache is cut into Splits ranges of SplitKeys keys; Splits = 1 writes the output directly.</summary>
    public int Splits, SplitKeys;
    public float Scale;
}

/// <summary>
/// Single-query attention over a KV cache (decode): every sequence of the batch has one new query, at position
/// len − 1, attending to cache rows 0..len − 1 (len = kvLen for all, or per sequence from an i32 lengths(B) tensor).
/// out(B, 1, NH, HS) = softmax(scale·q·Kᵀ)·V; lse(B, NH, 1) when asked.
/// </summary>
/// <remarks>
/// Split-K (flash-decoding): the cache length is cut into ranges; one group per (sequence, head, range) computes
/// the scores of its keys (a warp per key, lanes across channels: each key row is read as contiguous 128-byte
/// runs), their max m and sum l, and the unnormalised Σ exp(s − m)·v (channels across threads, keys across
/// slots). With one range it writes out = acc / l directly; with several it writes (acc, m, l) per range and
/// <see cref="AttentionDecodeCombineKernel"/> merges them: M = max m_r, out = Σ acc_r·e^(m_r − M) / Σ l_r·e^(m_r − M).
/// The number of ranges gives about two groups per multiprocessor when the batch × heads alone would not, with
/// at least 64 and at most <see cref="MaxSplitKeys"/> keys per range. K and V may be f32, bf16 or f16 (read and
/// converted per element). Works for any warp size. Matches AttentionReference with Tq = 1.
/// </remarks>
internal sealed class AttentionDecodeKernels : IDisposable
{
    public const int MaxSplitKeys = 512, MaxHeadSize = 128, MaxSlots = 8, MinSplitKeys = 64;

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<float>, DecodeArgs> _split;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, DecodeArgs> _combine;
    private MemoryBuffer1D<float, Stride1D.Dense>? _partial;

    public AttentionDecodeKernels(IlgpuBackend b)
    {
        _b = b;
        _split = b.Accelerator.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<int>, ArrayView<float>, ArrayView<float>, ArrayView<float>, DecodeArgs>(AttentionDecodeSplitKernel);
        _combine = b.Accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<float>, ArrayView<float>, DecodeArgs>(AttentionDecodeCombineKernel);
    }

    private static int PartialStride(int hs) => hs + 2;

    /// <summary>Group = (b, h, range of keys).</summary>
    [GpuKernel(true)]
    public static void AttentionDecodeSplitKernel(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<int> lengths,
        ArrayView<float> output, ArrayView<float> lse, ArrayView<float> partial, DecodeArgs a)
    {
        var sq = SharedMemory.Allocate<float>(MaxHeadSize);
        var ss = SharedMemory.Allocate<float>(MaxSplitKeys);
        var sacc = SharedMemory.Allocate<float>(MaxSlots * MaxHeadSize);
        var scratch = SharedMemory.Allocate<float>(GroupReduce.MaxWarps);
        int tid = Group.IdxX, threads = Group.DimX, lanes = Warp.WarpSize;
        int warp = tid / lanes, lane = tid % lanes, warps = threads / lanes;
        int hs = a.HeadSize;
        int split = Grid.IdxX % a.Splits;
        int bh = Grid.IdxX / a.Splits;
        int h = bh % a.NHeads, b = bh / a.NHeads;
        int kvh = h / (a.NHeads / a.NKvHeads);
        int len = a.HasLengths != 0 ? lengths[b] : a.KvLen;
        int k0 = split * a.SplitKeys;
        int k1 = IntrinsicMath.Min(len, k0 + a.SplitKeys);
        long qBase = (long)bh * hs; // q and out (B, 1, NH, HS)
        long kvBase = ((long)b * a.Tkv * a.NKvHeads + kvh) * hs, kvStride = (long)a.NKvHeads * hs;

        for (int d = tid; d < hs; d += threads) sq[d] = q.Load(qBase + d) * a.Scale;
        Group.Barrier();
        // scores: warp per key, lanes across channels
        for (int j = k0 + warp; j < k1; j += warps)
        {
            long row = kvBase + j * kvStride;
            float dot = 0f;
            for (int d = lane; d < hs; d += lanes) dot += sq[d] * k.Load(row + d);
            dot = GroupReduce.WarpSum(dot);
            if (lane == 0) ss[j - k0] = dot;
        }
        Group.Barrier();
        float mx = float.NegativeInfinity;
        for (int j = tid; j < k1 - k0; j += threads) mx = MathF.Max(mx, ss[j]);
        float m = GroupReduce.Max(mx, scratch); // -inf for a range past the end of this sequence
        float part = 0f;
        for (int j = tid; j < k1 - k0; j += threads)
        {
            float p = MathF.Exp(ss[j] - m);
            ss[j] = p;
            part += p;
        }
        float l = GroupReduce.Sum(part, scratch); // its barriers also publish ss
        // Σ p_j·v_j: channels across threads, keys across up to MaxSlots slots
        int cols = IntrinsicMath.Min(hs, threads);
        int slots = IntrinsicMath.Min(MaxSlots, threads / cols);
        int slot = tid / cols, c = tid % cols;
        if (slot < slots)
        {
            for (int d = c; d < hs; d += cols)
            {
                float acc = 0f;
                for (int j = k0 + slot; j < k1; j += slots) acc += ss[j - k0] * v.Load(kvBase + j * kvStride + d);
                sacc[slot * MaxHeadSize + d] = acc;
            }
        }
        Group.Barrier();
        long pBase = ((long)bh * a.Splits + split) * PartialStride(hs);
        for (int d = tid; d < hs; d += threads)
        {
            float acc = 0f;
            for (int s = 0; s < slots; s++) acc += sacc[s * MaxHeadSize + d];
            if (a.Splits == 1) output[qBase + d] = acc / l;
            else partial[pBase + d] = acc;
        }
        if (tid == 0)
        {
            if (a.Splits == 1)
            {
                if (a.HasLse != 0) lse[bh] = m + MathF.Log(l);
            }
            else
            {
                partial[pBase + hs] = m;
                partial[pBase + hs + 1] = l;
            }
        }
    }

    /// <summary>Group = (b, h): merges the ranges' (acc, m, l) into out and lse.</summary>
    [GpuKernel(true)]
    public static void AttentionDecodeCombineKernel(ArrayView<float> partial, ArrayView<float> output, ArrayView<float> lse, DecodeArgs a)
    {
        int tid = Group.IdxX, threads = Group.DimX, bh = Grid.IdxX, hs = a.HeadSize, stride = PartialStride(hs);
        long base_ = (long)bh * a.Splits * stride;
        float mMax = float.NegativeInfinity;
        for (int s = 0; s < a.Splits; s++) mMax = MathF.Max(mMax, partial[base_ + s * stride + hs]); // finite: range 0 holds key 0
        float l = 0f;
        for (int s = 0; s < a.Splits; s++) l += partial[base_ + s * stride + hs + 1] * MathF.Exp(partial[base_ + s * stride + hs] - mMax);
        float inv = 1f / l;
        for (int d = tid; d < hs; d += threads)
        {
            float acc = 0f;
            for (int s = 0; s < a.Splits; s++) acc += partial[base_ + s * stride + d] * MathF.Exp(partial[base_ + s * stride + hs] - mMax);
            output[(long)bh * hs + d] = acc * inv;
        }
        if (tid == 0 && a.HasLse != 0) lse[bh] = mMax + MathF.Log(l);
    }

    /// <summary>Ranges for a cache of up to <paramref name="kvMax"/> keys: about two groups per multiprocessor, 64..512 keys each.</summary>
    internal static (int Splits, int SplitKeys) Plan(long batchHeads, int kvMax, int multiprocessors, int splitKeys = 0)
    {
        if (splitKeys <= 0)
        {
            long want = (2L * multiprocessors + batchHeads - 1) / batchHeads;
            int most = Math.Max(1, (kvMax + MinSplitKeys - 1) / MinSplitKeys);
            int splits = (int)Math.Clamp(want, 1, most);
            splits = Math.Max(splits, (kvMax + MaxSplitKeys - 1) / MaxSplitKeys);
            splitKeys = (kvMax + splits - 1) / splits;
        }
        if (splitKeys > MaxSplitKeys) throw new ArgumentOutOfRangeException(nameof(splitKeys), $"{splitKeys} keys per range exceed {MaxSplitKeys}");
        return ((kvMax + splitKeys - 1) / splitKeys, splitKeys);
    }

    /// <summary>
    /// out(B, 1, NH, HS) for one query per sequence; <paramref name="lengths"/> (i32 (B), each in [1, Tkv]) or, when null,
    /// <paramref name="kvLen"/> keys for every sequence. <paramref name="splitKeys"/> &gt; 0 fixes the range size (tests).
    /// </summary>
    public void Forward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v, Tensor? lengths,
        int batch, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale, int splitKeys = 0)
    {
        const string op = "AttentionDecode";
        IlgpuBackend.Positive(op, ("batch", batch), ("tkv", tkv), ("kvLen", kvLen));
        if (nHeads <= 0 || nKvHeads <= 0 || nHeads % nKvHeads != 0)
            throw new ArgumentException($"{op}: {nHeads} query heads must be a positive multiple of {nKvHeads} kv heads");
        if (headSize <= 0 || headSize > MaxHeadSize) throw new ArgumentException($"{op}: head size {headSize} must be in [1, {MaxHeadSize}]");
        if (lengths is null && (kvLen < 1 || kvLen > tkv)) throw new ArgumentException($"{op}: kvLen {kvLen} must be in [1, tkv = {tkv}]");
        long qCount = (long)batch * nHeads * headSize, kvCount = (long)batch * tkv * nKvHeads * headSize;
        IlgpuBackend.Need(q, qCount, "q", op);           // (B, 1, NH, HS)
        IlgpuBackend.Need(output, qCount, "output", op); // (B, 1, NH, HS)
        IlgpuBackend.Need(k, kvCount, "k", op);          // (B, Tkv, NKV, HS)
        IlgpuBackend.Need(v, kvCount, "v", op);          // (B, Tkv, NKV, HS)
        if (lse is not null) IlgpuBackend.Need(lse, (long)batch * nHeads, "lse", op); // (B, NH, 1)
        if (lengths is not null) IlgpuBackend.Need(lengths, batch, "lengths", op);   // (B)
        if (batch == 0) return;
        long heads = (long)batch * nHeads;
        var (splits, keys) = Plan(heads, lengths is null ? kvLen : tkv, _b.Accelerator.NumMultiprocessors, splitKeys);
        var a = new DecodeArgs
        {
            Batch = batch, Tkv = tkv, KvLen = kvLen, NHeads = nHeads, NKvHeads = nKvHeads, HeadSize = headSize, HasLse = lse is null ? 0 : 1,
            HasLengths = lengths is null ? 0 : 1, Splits = splits, SplitKeys = keys, Scale = scale,
        };
        long partialFloats = splits == 1 ? 1 : heads * splits * PartialStride(headSize);
        if (_partial is null || _partial.Length < partialFloats)
        {
            _partial?.Dispose();
            _partial = _b.Accelerator.Allocate1D<float>(Math.Max(partialFloats, 1)); // grows with the cache, then stays
        }
        var outView = _b.F32(output, "output");
        var lseView = lse is null ? ArrayView<float>.Empty : _b.F32(lse, "lse");
        int group = _b.RowGroupSize;
        _split(new KernelConfig(IlgpuBackend.CheckedCount(heads * splits, op), group), _b.Floats(q, "q"), _b.Floats(k, "k"), _b.Floats(v, "v"),
            lengths is null ? ArrayView<int>.Empty : _b.I32(lengths, "lengths"), outView, lseView, _partial.View, a);
        if (splits > 1)
            _combine(new KernelConfig(IlgpuBackend.CheckedCount(heads, op), group), _partial.View, outView, lseView, a);
    }

    public void Dispose() => _partial?.Dispose();
}
