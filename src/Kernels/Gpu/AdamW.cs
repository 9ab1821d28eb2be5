using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>Hyper-parameters of one AdamW step, with the bias corrections computed on the host.</summary>
public struct AdamWArgs
{
    public float Lr, Beta1, Beta2, Eps, WeightDecay, GradScale;
    /// <summary>1 - β1^step and 1 - β2^step.</summary>
    public float Correction1, Correction2;
}

/// <summary>Decoupled AdamW over one f32 parameter, one thread per element.</summary>
/// <remarks>Matches AdamWReference: m, v and param updated in place; the gradient is read as gradScale·grad.</remarks>
internal sealed class AdamWKernels : IDisposable
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamWArgs> _step;
    private readonly Action<KernelConfig, MultiTensorBases, ArrayView<MultiTensorEntry>, ArrayView<MultiTensorChunk>, ArrayView<float>, AdamWArgs> _multi;
    private AdamWTensor[] _tableOf = Array.Empty<AdamWTensor>();
    private MultiTensorTable? _table;

    public AdamWKernels(IlgpuBackend b)
    {
        _b = b;
        _step = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, AdamWArgs>(AdamWKernel);
        _multi = b.Accelerator.LoadStreamKernel<MultiTensorBases, ArrayView<MultiTensorEntry>, ArrayView<MultiTensorChunk>, ArrayView<float>, AdamWArgs>(AdamWMultiTensorKernel);
    }

    /// <summary>Launches of the last <see cref="MultiTensorStep"/> (1 while the tensors span at most MultiTensorBases.Count pool chunks).</summary>
    public int LastLaunches { get; private set; }

    /// <summary>
    /// AdamW over every tensor of the table: group g takes work chunks g, g + grid, ...; the clipping scale is read from
    /// clip[1] (written by the gradient-norm finish kernel) and a non-finite scale leaves everything unchanged.
    /// The rounded copy, when an entry has one, receives the updated parameter in bf16/f16 in the same pass.
    /// </summary>
    [GpuKernel(true)]
    public static void AdamWMultiTensorKernel(MultiTensorBases x, ArrayView<MultiTensorEntry> entries, ArrayView<MultiTensorChunk> chunks,
        ArrayView<float> clip, AdamWArgs a)
    {
        float scale = clip[1];
        if (!(scale - scale == 0f)) return; // NaN or ±Inf: the norm was not finite, the step is skipped
        for (int c = Grid.IdxX; c < chunks.IntLength; c += Grid.DimX)
        {
            var w = chunks[c];
            var e = entries[w.Entry];
            // this tensor's operands: its slots' chunks, picked once per work chunk
            var pv = x.Get(e.PSlot).Cast<float>().SubView(e.P + w.Start);
            var gv = x.Get(e.GSlot).Cast<float>().SubView(e.G + w.Start);
            var mv = x.Get(e.MSlot).Cast<float>().SubView(e.M + w.Start);
            var vv = x.Get(e.VSlot).Cast<float>().SubView(e.V + w.Start);
            for (int j = Group.IdxX; j < w.Count; j += Group.DimX)
            {
                float g = gv[j] * scale;
                float mi = a.Beta1 * mv[j] + (1f - a.Beta1) * g;
                float vi = a.Beta2 * vv[j] + (1f - a.Beta2) * g * g;
                mv[j] = mi;
                vv[j] = vi;
                float p = pv[j];
                p -= a.Lr * (mi / a.Correction1 / (MathF.Sqrt(vi / a.Correction2) + a.Eps) + e.Decay * a.WeightDecay * p);
                pv[j] = p;
                if (e.RoundKind != 0) // the rounded copy's view is picked per element: keeping it live costs registers in every tensor
                    x.Get(e.RSlot).Cast<ushort>()[e.R + w.Start + j] = e.RoundKind == DeviceFloats.KindBF16 ? HalfMath.F32ToBf16(p) : HalfMath.F32ToF16(p);
            }
        }
    }

    public void MultiTensorStep(IReadOnlyList<AdamWTensor> tensors, AdamWHyper h, Tensor clip)
    {
        const string op = "AdamWMultiTensor";
        if (h.Step < 1) throw new ArgumentOutOfRangeException(nameof(h), $"{op}: step is 1-based, got {h.Step}");
        IlgpuBackend.Need(clip, 2, "clip", op);
        var clipView = _b.F32(clip, "clip");
        if (!SameList(tensors))
        {
            for (int i = 0; i < tensors.Count; i++)
            {
                var t = tensors[i];
                long n = t.Param.Length;
                _b.F32(t.Param, "param"); _b.F32(t.Grad, "grad"); _b.F32(t.M, "m"); _b.F32(t.V, "v");
                if (t.Grad.Length != n || t.M.Length != n || t.V.Length != n)
                    throw new ArgumentException($"{op}: {t.Param.Describe()} needs grad, m and v of {n} elements ({t.Grad.Describe()}, {t.M.Describe()}, {t.V.Describe()})");
                if (t.Rounded is { } r && (r.Length != n || (r.DType != DType.BF16 && r.DType != DType.F16)))
                    throw new ArgumentException($"{op}: rounded copy {r.Describe()} of {t.Param.Describe()} must be bf16 or f16 with {n} elements");
            }
            _table?.Dispose();
            _table = null;
            var list = tensors.ToArray();
            _table = MultiTensorTable.Build(_b, list.Length, i => new[] { list[i].Param, list[i].Grad, list[i].M, list[i].V, list[i].Rounded },
                i => list[i].Decay ? 1f : 0f, op);
            _tableOf = list;
        }
        var args = new AdamWArgs
        {
            Lr = h.Lr, Beta1 = h.Beta1, Beta2 = h.Beta2, Eps = h.Eps, WeightDecay = h.WeightDecay, GradScale = 1f,
            Correction1 = (float)(1.0 - Math.Pow(h.Beta1, h.Step)),
            Correction2 = (float)(1.0 - Math.Pow(h.Beta2, h.Step)),
        };
        int group = _b.RowGroupSize;
        LastLaunches = 0;
        foreach (var l in _table!.Launches)
        {
            _multi(new KernelConfig(MultiTensorTable.Groups(_b, l.ChunkCount), group), l.Views(), l.Entries.View, l.Chunks.View, clipView, args);
            LastLaunches++;
        }
    }

    private bool SameList(IReadOnlyList<AdamWTensor> tensors)
    {
        if (_table is null || tensors.Count != _tableOf.Length) return false;
        for (int i = 0; i < _tableOf.Length; i++)
            if (tensors[i] != _tableOf[i]) return false;
        return true;
    }

    public void Dispose() => _table?.Dispose();

    /// <summary>m = β1·m + (1-β1)·g; v = β2·v + (1-β2)·g²; p -= lr·(m̂/(sqrt(v̂)+eps) + wd·p).</summary>
    [GpuKernel(false)]
    public static void AdamWKernel(Index1D i, ArrayView<float> param, ArrayView<float> grad, ArrayView<float> m, ArrayView<float> v, AdamWArgs a)
    {
        float g = grad[i] * a.GradScale;
        float mi = a.Beta1 * m[i] + (1f - a.Beta1) * g;
        float vi = a.Beta2 * v[i] + (1f - a.Beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float mHat = mi / a.Correction1;
        float vHat = vi / a.Correction2;
        float p = param[i];
        param[i] = p - a.Lr * (mHat / (MathF.Sqrt(vHat) + a.Eps) + a.WeightDecay * p);
    }

    public void Step(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale)
    {
        const string op = "AdamW";
        if (step < 1) throw new ArgumentOutOfRangeException(nameof(step), $"{op}: step is 1-based, got {step}");
        IlgpuBackend.Need(grad, param.Length, "grad", op);
        IlgpuBackend.Need(m, param.Length, "m", op);
        IlgpuBackend.Need(v, param.Length, "v", op);
        int n = IlgpuBackend.CheckedCount(param.Length, op);
        if (n == 0) return;
        var args = new AdamWArgs
        {
            Lr = lr, Beta1 = beta1, Beta2 = beta2, Eps = eps, WeightDecay = weightDecay, GradScale = gradScale,
            Correction1 = (float)(1.0 - Math.Pow(beta1, step)),
            Correction2 = (float)(1.0 - Math.Pow(beta2, step)),
        };
        _step(n, _b.F32(param, "param"), _b.F32(grad, "grad"), _b.F32(m, "m"), _b.F32(v, "v"), args);
    }
}
