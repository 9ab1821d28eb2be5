using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Cross-entropy over the vocabulary, one group per row: loss = logsumexp(row) − row[target], and in place
/// the gradient gradScale·(softmax − onehot). Rows whose target is the ignore index give 0 and a zero gradient.
/// </summary>
/// <remarks>
/// Three passes over the row (max, Σexp, write) with group reductions; the row is read from global memory each
/// time (a V-wide row does not fit in shared memory). The caller chunks rows so the full (B·T, V) logits never
/// exist at once. Matches CrossEntropyReference.
/// </remarks>
internal sealed class CrossEntropyKernels
{
    public struct CrossEntropyArgs
    {
        public int V, IgnoreIndex, ComputeGrad;
        public float GradScale;
    }

    private readonly IlgpuBackend _b;
    private readonly Action<KernelConfig, ArrayView<float>, ArrayView<int>, ArrayView<float>, CrossEntropyArgs> _kernel;

    public CrossEntropyKernels(IlgpuBackend b)
    {
        _b = b;
        _kernel = b.Accelerator.LoadStreamKernel<ArrayView<float>, ArrayView<int>, ArrayView<float>, CrossEntropyArgs>(CrossEntropyKernel);
    }

    [GpuKernel(true)]
    public static void CrossEntropyKernel(ArrayView<float> logits, ArrayView<int> targets, ArrayView<float> losses, CrossEntropyArgs a)
    {
        var scratch = SharedMemory.Allocate<float>(GroupReduce.MaxWarps);
        long row = Grid.IdxX;
        long baseIdx = row * a.V;
        int target = targets[row];
        if (target == a.IgnoreIndex)
        {
            // uniform over the group: every thread leaves here, no barrier is skipped by only some
            if (Group.IdxX == 0) losses[row] = 0f;
            if (a.ComputeGrad != 0)
                for (int i = Group.IdxX; i < a.V; i += Group.DimX) logits[baseIdx + i] = 0f;
            return;
        }
        float mx = float.NegativeInfinity;
        for (int i = Group.IdxX; i < a.V; i += Group.DimX) mx = MathF.Max(mx, logits[baseIdx + i]);
        mx = GroupReduce.Max(mx, scratch);
        float xt = logits[baseIdx + target]; // read before the barrier inside Sum; the grad pass writes after it
        float sum = 0f;
        for (int i = Group.IdxX; i < a.V; i += Group.DimX) sum += MathF.Exp(logits[baseIdx + i] - mx);
        sum = GroupReduce.Sum(sum, scratch);
        float lse = mx + MathF.Log(sum);
        if (Group.IdxX == 0) losses[row] = lse - xt;
        if (a.ComputeGrad != 0)
        {
            for (int i = Group.IdxX; i < a.V; i += Group.DimX)
            {
                float p = MathF.Exp(logits[baseIdx + i] - lse);
                logits[baseIdx + i] = a.GradScale * (i == target ? p - 1f : p);
            }
        }
    }

    public void Run(Tensor logits, Tensor targets, Tensor losses, int m, int v, int ignoreIndex, float gradScale, bool computeGrad)
    {
        const string op = "CrossEntropy";
        IlgpuBackend.Positive(op, ("m", m), ("v", v));
        IlgpuBackend.Need(logits, (long)m * v, "logits", op); // (M, V)
        IlgpuBackend.Need(targets, m, "targets", op);         // (M)
        IlgpuBackend.Need(losses, m, "losses", op);           // (M)
        if (m == 0) return;
        if (_b.FindBadId(targets, "targets", v, ignoreIndex) is (int i, int id))
            throw new ArgumentOutOfRangeException(nameof(targets), $"{op}: target {id} at row {i} is outside [0, {v}) and is not the ignore index {ignoreIndex}");
        var args = new CrossEntropyArgs { V = v, IgnoreIndex = ignoreIndex, ComputeGrad = computeGrad ? 1 : 0, GradScale = gradScale };
        _kernel(new KernelConfig(m, _b.RowGroupSize), _b.F32(logits, "logits"), _b.I32(targets, "targets"), _b.F32(losses, "losses"), args);
    }
}
