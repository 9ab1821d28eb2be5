using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Shapes of one attention launch (see <see cref="IBackend.AttentionForward"/>).</summary>
public struct AttentionArgs
{
    public int Batch, Tq, Tkv, KvLen, NHeads, NKvHeads, HeadSize, HasLse;
    public float Scale;
}

/// <summary>
/// Causal grouped-query attention, flash style: no T×T matrix exists anywhere. Forward: each warp owns one
/// query row; a group of <see cref="Warps"/> warps streams tiles of <see cref="BK"/> keys/values through shared
/// memory and keeps an online softmax (running max m, running sum l, rescaled accumulator). Backward recomputes
/// the probabilities from the saved lse: one kernel for dq (warp per query, streaming keys), one for dk/dv
/// (warp per key, streaming the queries of every head that shares that kv head), so no atomics are needed.
/// </summary>
/// <remarks>
/// Forward saves lse(B, NH, Tq) = m + log l. The backward needs D_i = Σ dO_i·O_i, recomputed per query tile.
/// Lanes of a warp split the keys of a tile for the scores and the channels for the accumulator, so any warp
/// size works. Matches AttentionReference. Head size up to <see cref="MaxHeadSize"/>.
/// Forward dispatch: Tq == 1 (a decode step) goes to <see cref="AttentionDecodeKernels"/> (split-K over the cache);
/// bf16/f16 q, k, v on sm_80+ to <see cref="AttentionTensorCoreKernels"/> (the backward too);
/// everything else runs here: f32 q, k, v, and bf16/f16 (or mixed) ones widened to f32 as they are loaded
/// (<see cref="DeviceFloats.Load"/>), so a bf16 attention runs unchanged on a pre-sm_80 GPU and in the simulator;
/// the output, lse, dOut and the gradients stay f32.
/// </remarks>
internal sealed class AttentionKernels
{
    public const int Warps = 4, BK = 32, MaxHeadSize = 128;
    /// <summary>Row stride of K/V/Q tiles in shared memory: padded so lanes reading different rows hit different banks.</summary>
    private const int KS = MaxHeadSize + 1;

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs> _forward;
    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs> _backwardQuery;
    private readonly Action<KernelConfig, DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs> _backwardKeyValue;

    /// <summary>
    /// Whether bf16/f16 q, k, v go to the tensor-core kernels: CUDA sm_80+ (<see cref="IlgpuBackend.TensorCores"/>).
    /// False sends them to the SIMT kernels here, widened on load (a pre-sm_80 GPU). Tests set it on a warp-32
    /// simulator to run the tensor-core kernels' emulated path inside whole model steps.
    /// </summary>
    internal bool TensorCores { get; set; }

    public AttentionKernels(IlgpuBackend b)
    {
        _b = b;
        TensorCores = b.TensorCores;
        var acc = b.Accelerator;
        _forward = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionForwardKernel);
        _backwardQuery = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionBackwardQueryKernel);
        _backwardKeyValue = acc.LoadStreamKernel<DeviceFloats, DeviceFloats, DeviceFloats, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AttentionArgs>(AttentionBackwardKeyValueKernel);
    }

    /// <summary>Group = (b, h, tile of <see cref="Warps"/> queries); warp = one query row.</summary>
    [GpuKernel(true)]
    public static void AttentionForwardKernel(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> output, ArrayView<float> lse, AttentionArgs a)
    {
        var sk = SharedMemory.Allocate<float>(BK * KS);
        var sv = SharedMemory.Allocate<float>(BK * KS);
        var sq = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sacc = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sp = SharedMemory.Allocate<float>(Warps * BK);
        int lanes = Warp.WarpSize, warp = Warp.WarpIdx, lane = Warp.LaneIdx;
        int hs = a.HeadSize;
        int tilesQ = (a.Tq + Warps - 1) / Warps;
        int tile = Grid.IdxX % tilesQ;
        int bh = Grid.IdxX / tilesQ;
        int h = bh % a.NHeads, b = bh / a.NHeads;
        int kvh = h / (a.NHeads / a.NKvHeads);
        int t = tile * Warps + warp;
        bool active = t < a.Tq;
        int offset = a.KvLen - a.Tq;
        int pos = offset + t;
        int maxKey = offset + IntrinsicMath.Min(a.Tq - 1, tile * Warps + Warps - 1);
        long qBase = (((long)b * a.Tq + t) * a.NHeads + h) * hs;
        int qs = warp * MaxHeadSize, ps = warp * BK;

        for (int d = lane; d < hs; d += lanes)
        {
            sq[qs + d] = active ? q.Load(qBase + d) * a.Scale : 0f;
            sacc[qs + d] = 0f;
        }
        float mRun = float.NegativeInfinity, lRun = 0f;
        int tileElems = BK * hs;
        for (int kb = 0; kb <= maxKey; kb += BK)
        {
            Group.Barrier();
            for (int e = Group.IdxX; e < tileElems; e += Group.DimX)
            {
                int j = e / hs, d = e % hs;
                int key = kb + j;
                float kk = 0f, vv = 0f;
                if (key <= maxKey)
                {
                    long idx = (((long)b * a.Tkv + key) * a.NKvHeads + kvh) * hs + d;
                    kk = k.Load(idx);
                    vv = v.Load(idx);
                }
                sk[j * KS + d] = kk;
                sv[j * KS + d] = vv;
            }
            Group.Barrier();
            if (active && kb <= pos)
            {
                float tileMax = float.NegativeInfinity;
                for (int j = lane; j < BK; j += lanes)
                {
                    float s = float.NegativeInfinity;
                    if (kb + j <= pos)
                    {
                        s = 0f;
                        for (int d = 0; d < hs; d++) s += sq[qs + d] * sk[j * KS + d];
                    }
                    sp[ps + j] = s;
                    tileMax = MathF.Max(tileMax, s);
                }
                tileMax = GroupReduce.WarpMax(tileMax);
                float mNew = MathF.Max(mRun, tileMax); // finite: key kb <= pos is in this tile
                float corr = MathF.Exp(mRun - mNew);    // 0 on the first tile (mRun = -inf)
                float psum = 0f;
                for (int j = lane; j < BK; j += lanes)
                {
                    float pj = MathF.Exp(sp[ps + j] - mNew);
                    sp[ps + j] = pj;
                    psum += pj;
                }
                psum = GroupReduce.WarpSum(psum);
                lRun = lRun * corr + psum;
                mRun = mNew;
                Warp.Barrier();
                for (int d = lane; d < hs; d += lanes)
                {
                    float acc = sacc[qs + d] * corr;
                    for (int j = 0; j < BK; j++) acc += sp[ps + j] * sv[j * KS + d];
                    sacc[qs + d] = acc;
                }
                Warp.Barrier();
            }
        }
        if (active)
        {
            float inv = 1f / lRun;
            for (int d = lane; d < hs; d += lanes) output[qBase + d] = sacc[qs + d] * inv;
            if (lane == 0 && a.HasLse != 0) lse[((long)b * a.NHeads + h) * a.Tq + t] = mRun + MathF.Log(lRun);
        }
    }

    /// <summary>
    /// Group = (b, h, tile of queries); warp = query i: dq_i = scale·Σ_j ds_ij·k_j with
    /// p_ij = exp(scale·q_i·k_j − lse_i), ds_ij = p_ij·(dO_i·v_j − D_i), D_i = dO_i·O_i.
    /// </summary>
    [GpuKernel(true)]
    public static void AttentionBackwardQueryKernel(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> o,
        ArrayView<float> dOut, ArrayView<float> lse, ArrayView<float> dq, AttentionArgs a)
    {
        var sk = SharedMemory.Allocate<float>(BK * KS);
        var sv = SharedMemory.Allocate<float>(BK * KS);
        var sq = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sdo = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sacc = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sp = SharedMemory.Allocate<float>(Warps * BK);
        int lanes = Warp.WarpSize, warp = Warp.WarpIdx, lane = Warp.LaneIdx;
        int hs = a.HeadSize, tLen = a.Tq;
        int tilesQ = (tLen + Warps - 1) / Warps;
        int tile = Grid.IdxX % tilesQ;
        int bh = Grid.IdxX / tilesQ;
        int h = bh % a.NHeads, b = bh / a.NHeads;
        int kvh = h / (a.NHeads / a.NKvHeads);
        int t = tile * Warps + warp;
        bool active = t < tLen;
        int prefix = a.Tkv - a.Tq; // query t sits at position prefix + t
        int pos = prefix + t;
        int maxKey = prefix + IntrinsicMath.Min(tLen - 1, tile * Warps + Warps - 1);
        long qBase = (((long)b * tLen + t) * a.NHeads + h) * hs;
        int qs = warp * MaxHeadSize, ps = warp * BK;

        float dPart = 0f;
        for (int d = lane; d < hs; d += lanes)
        {
            float dod = active ? dOut[qBase + d] : 0f;
            sq[qs + d] = active ? q.Load(qBase + d) * a.Scale : 0f;
            sdo[qs + d] = dod;
            sacc[qs + d] = 0f;
            if (active) dPart += dod * o[qBase + d];
        }
        float dRow = GroupReduce.WarpSum(dPart);
        float lseRow = active ? lse[((long)b * a.NHeads + h) * tLen + t] : 0f;
        int tileElems = BK * hs;
        for (int kb = 0; kb <= maxKey; kb += BK)
        {
            Group.Barrier();
            for (int e = Group.IdxX; e < tileElems; e += Group.DimX)
            {
                int j = e / hs, d = e % hs;
                int key = kb + j;
                float kk = 0f, vv = 0f;
                if (key <= maxKey)
                {
                    long idx = (((long)b * a.Tkv + key) * a.NKvHeads + kvh) * hs + d;
                    kk = k.Load(idx);
                    vv = v.Load(idx);
                }
                sk[j * KS + d] = kk;
                sv[j * KS + d] = vv;
            }
            Group.Barrier();
            if (active && kb <= pos)
            {
                for (int j = lane; j < BK; j += lanes)
                {
                    float ds = 0f;
                    if (kb + j <= pos)
                    {
                        float s = 0f, dp = 0f;
                        for (int d = 0; d < hs; d++)
                        {
                            s += sq[qs + d] * sk[j * KS + d];
                            dp += sdo[qs + d] * sv[j * KS + d];
                        }
                        float p = MathF.Exp(s - lseRow);
                        ds = p * (dp - dRow);
                    }
                    sp[ps + j] = ds;
                }
                Warp.Barrier();
                for (int d = lane; d < hs; d += lanes)
                {
                    float acc = sacc[qs + d];
                    for (int j = 0; j < BK; j++) acc += sp[ps + j] * sk[j * KS + d];
                    sacc[qs + d] = acc;
                }
                Warp.Barrier();
            }
        }
        if (active)
            for (int d = lane; d < hs; d += lanes) dq[qBase + d] = a.Scale * sacc[qs + d];
    }

    /// <summary>
    /// Group = (b, kv head g, tile of keys); warp = key j: over every query head h sharing g and every query
    /// i ≥ j, dv_j = Σ p_ij·dO_i and dk_j = scale·Σ ds_ij·q_i.
    /// </summary>
    [GpuKernel(true)]
    public static void AttentionBackwardKeyValueKernel(DeviceFloats q, DeviceFloats k, DeviceFloats v, ArrayView<float> o,
        ArrayView<float> dOut, ArrayView<float> lse, ArrayView<float> dk, ArrayView<float> dv, AttentionArgs a)
    {
        var sq = SharedMemory.Allocate<float>(BK * KS);
        var sdo = SharedMemory.Allocate<float>(BK * KS);
        var sl = SharedMemory.Allocate<float>(BK);
        var sd = SharedMemory.Allocate<float>(BK);
        var skr = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var svr = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sdk = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sdv = SharedMemory.Allocate<float>(Warps * MaxHeadSize);
        var sp = SharedMemory.Allocate<float>(Warps * BK);
        var sds = SharedMemory.Allocate<float>(Warps * BK);
        int lanes = Warp.WarpSize, warp = Warp.WarpIdx, lane = Warp.LaneIdx;
        int hs = a.HeadSize, tLen = a.Tq, kLen = a.Tkv;
        int prefix = kLen - tLen; // query i sits at position prefix + i and sees key j iff j <= prefix + i
        int tilesK = (kLen + Warps - 1) / Warps;
        int tile = Grid.IdxX % tilesK;
        int bg = Grid.IdxX / tilesK;
        int g = bg % a.NKvHeads, b = bg / a.NKvHeads;
        int heads = a.NHeads / a.NKvHeads;
        int jMin = tile * Warps;
        int j = jMin + warp;
        bool active = j < kLen;
        long kBase = (((long)b * kLen + j) * a.NKvHeads + g) * hs;
        int rs = warp * MaxHeadSize, ps = warp * BK;

        for (int d = lane; d < hs; d += lanes)
        {
            skr[rs + d] = active ? k.Load(kBase + d) * a.Scale : 0f;
            svr[rs + d] = active ? v.Load(kBase + d) : 0f;
            sdk[rs + d] = 0f;
            sdv[rs + d] = 0f;
        }
        int tileElems = BK * hs;
        for (int hh = 0; hh < heads; hh++)
        {
            int h = g * heads + hh;
            for (int i0 = IntrinsicMath.Max(0, jMin - prefix); i0 < tLen; i0 += BK)
            {
                Group.Barrier();
                for (int e = Group.IdxX; e < tileElems; e += Group.DimX)
                {
                    int ii = e / hs, d = e % hs;
                    int i = i0 + ii;
                    float qq = 0f, gg = 0f;
                    if (i < tLen)
                    {
                        long idx = (((long)b * tLen + i) * a.NHeads + h) * hs + d;
                        qq = q.Load(idx);
                        gg = dOut[idx];
                    }
                    sq[ii * KS + d] = qq;
                    sdo[ii * KS + d] = gg;
                }
                for (int ii = Group.IdxX; ii < BK; ii += Group.DimX)
                {
                    int i = i0 + ii;
                    float l = 0f, dRow = 0f;
                    if (i < tLen)
                    {
                        long idx = (((long)b * tLen + i) * a.NHeads + h) * hs;
                        for (int d = 0; d < hs; d++) dRow += dOut[idx + d] * o[idx + d];
                        l = lse[((long)b * a.NHeads + h) * tLen + i];
                    }
                    sl[ii] = l;
                    sd[ii] = dRow;
                }
                Group.Barrier();
                if (active)
                {
                    for (int ii = lane; ii < BK; ii += lanes)
                    {
                        int i = i0 + ii;
                        float p = 0f, ds = 0f;
                        if (i < tLen && prefix + i >= j)
                        {
                            float s = 0f, dp = 0f;
                            for (int d = 0; d < hs; d++)
                            {
                                s += sq[ii * KS + d] * skr[rs + d];
                                dp += sdo[ii * KS + d] * svr[rs + d];
                            }
                            p = MathF.Exp(s - sl[ii]);
                            ds = p * (dp - sd[ii]);
                        }
                        sp[ps + ii] = p;
                        sds[ps + ii] = ds;
                    }
                    Warp.Barrier();
                    for (int d = lane; d < hs; d += lanes)
                    {
                        float accK = sdk[rs + d], accV = sdv[rs + d];
                        for (int ii = 0; ii < BK; ii++)
                        {
                            accV += sp[ps + ii] * sdo[ii * KS + d];
                            accK += sds[ps + ii] * sq[ii * KS + d];
                        }
                        sdk[rs + d] = accK;
                        sdv[rs + d] = accV;
                    }
                    Warp.Barrier();
                }
            }
        }
        if (active)
        {
            for (int d = lane; d < hs; d += lanes)
            {
                dk[kBase + d] = a.Scale * sdk[rs + d];
                dv[kBase + d] = sdv[rs + d];
            }
        }
    }

    private static void CheckHeads(string op, int nHeads, int nKvHeads, int headSize)
    {
        if (nHeads <= 0 || nKvHeads <= 0 || nHeads % nKvHeads != 0)
            throw new ArgumentException($"{op}: {nHeads} query heads must be a positive multiple of {nKvHeads} kv heads");
        if (headSize <= 0 || headSize > MaxHeadSize)
            throw new ArgumentException($"{op}: head size {headSize} must be in [1, {MaxHeadSize}] for the ILGPU kernels");
    }

    private int GroupSize => Warps * _b.WarpSize;

    public void Forward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale)
    {
        const string op = "AttentionForward";
        IlgpuBackend.Positive(op, ("batch", batch), ("tq", tq), ("tkv", tkv), ("kvLen", kvLen));
        CheckHeads(op, nHeads, nKvHeads, headSize);
        if (kvLen < tq || kvLen > tkv)
            throw new ArgumentException($"{op}: kvLen {kvLen} must be in [tq = {tq}, tkv = {tkv}]");
        long qCount = (long)batch * tq * nHeads * headSize, kvCount = (long)batch * tkv * nKvHeads * headSize;
        IlgpuBackend.Need(q, qCount, "q", op);           // (B, Tq, NH, HS)
        IlgpuBackend.Need(output, qCount, "output", op); // (B, Tq, NH, HS)
        IlgpuBackend.Need(k, kvCount, "k", op);          // (B, Tkv, NKV, HS)
        IlgpuBackend.Need(v, kvCount, "v", op);          // (B, Tkv, NKV, HS)
        if (lse is not null) IlgpuBackend.Need(lse, (long)batch * nHeads * tq, "lse", op); // (B, NH, Tq)
        if (batch == 0 || tq == 0) return;
        if (tq == 1)
        {
            // decode: one query per sequence over the cache, split-K (AttentionDecode.cs)
            _b.Kernels(x => new AttentionDecodeKernels(x)).Forward(output, lse, q, k, v, null, batch, tkv, kvLen, nHeads, nKvHeads, headSize, scale);
            return;
        }
        var args = new AttentionArgs
        {
            Batch = batch, Tq = tq, Tkv = tkv, KvLen = kvLen, NHeads = nHeads, NKvHeads = nKvHeads, HeadSize = headSize,
            HasLse = lse is null ? 0 : 1, Scale = scale,
        };
        if (AttentionTensorCoreKernels.Takes(TensorCores, q, k, v, headSize))
        {
            // bf16/f16 q, k, v on sm_80+: the tensor-core kernel (AttentionTensorCore.cs)
            _b.Kernels(x => new AttentionTensorCoreKernels(x)).Forward(q.DType == DType.F16, _b.Floats(q, "q"), _b.Floats(k, "k"), _b.Floats(v, "v"),
                _b.F32(output, "output"), lse is null ? ArrayView<float>.Empty : _b.F32(lse, "lse"), args);
            return;
        }
        long groups = (long)batch * nHeads * ((tq + Warps - 1) / Warps);
        _forward(new KernelConfig(IlgpuBackend.CheckedCount(groups, op), GroupSize), _b.Floats(q, "q"), _b.Floats(k, "k"), _b.Floats(v, "v"),
            _b.F32(output, "output"), lse is null ? ArrayView<float>.Empty : _b.F32(lse, "lse"), args);
    }

    public void Backward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int nHeads, int nKvHeads, int headSize, float scale)
    {
        const string op = "AttentionBackward";
        IlgpuBackend.Positive(op, ("batch", batch), ("tq", tq), ("tkv", tkv));
        CheckHeads(op, nHeads, nKvHeads, headSize);
        if (tq > tkv) throw new ArgumentException($"{op}: tq {tq} must be <= tkv {tkv} (the keys before the queries are a prefix every query sees)");
        int t = tq;
        long qCount = (long)batch * tq * nHeads * headSize, kvCount = (long)batch * tkv * nKvHeads * headSize;
        IlgpuBackend.Need(q, qCount, "q", op);           // (B, Tq, NH, HS)
        IlgpuBackend.Need(dq, qCount, "dq", op);
        IlgpuBackend.Need(dOut, qCount, "dOut", op);
        IlgpuBackend.Need(output, qCount, "output", op);
        IlgpuBackend.Need(k, kvCount, "k", op);          // (B, Tkv, NKV, HS)
        IlgpuBackend.Need(v, kvCount, "v", op);
        IlgpuBackend.Need(dk, kvCount, "dk", op);
        IlgpuBackend.Need(dv, kvCount, "dv", op);
        IlgpuBackend.Need(lse, (long)batch * nHeads * t, "lse", op); // (B, NH, T)
        if (batch == 0 || t == 0) return;
        var args = new AttentionArgs
        {
            Batch = batch, Tq = tq, Tkv = tkv, KvLen = tkv, NHeads = nHeads, NKvHeads = nKvHeads, HeadSize = headSize, HasLse = 1, Scale = scale,
        };
        if (AttentionTensorCoreKernels.TakesBackward(TensorCores, q, k, v, headSize))
        {
            // bf16/f16 q, k, v on sm_80+: the tensor-core kernels (AttentionTensorCoreBackward*.cs)
            _b.Kernels(x => new AttentionTensorCoreKernels(x)).Backward(q.DType == DType.F16, _b.Floats(q, "q"), _b.Floats(k, "k"), _b.Floats(v, "v"),
                _b.F32(output, "output"), _b.F32(dOut, "dOut"), _b.F32(lse, "lse"), _b.F32(dq, "dq"), _b.F32(dk, "dk"), _b.F32(dv, "dv"), args);
            return;
        }
        var qv = _b.Floats(q, "q");
        var kv = _b.Floats(k, "k");
        var vv = _b.Floats(v, "v");
        var ov = _b.F32(output, "output");
        var gv = _b.F32(dOut, "dOut");
        var lv = _b.F32(lse, "lse");
        int tiles = (t + Warps - 1) / Warps, keyTiles = (tkv + Warps - 1) / Warps;
        _backwardQuery(new KernelConfig(IlgpuBackend.CheckedCount((long)batch * nHeads * tiles, op), GroupSize), qv, kv, vv, ov, gv, lv, _b.F32(dq, "dq"), args);
        _backwardKeyValue(new KernelConfig(IlgpuBackend.CheckedCount((long)batch * nKvHeads * keyTiles, op), GroupSize), qv, kv, vv, ov, gv, lv,
            _b.F32(dk, "dk"), _b.F32(dv, "dv"), args);
    }
}
