using FineTuneNative.Kernels;

namespace FineTuneNative.Peft.Training;

/// <summary>
/// What a training step reads back from the device, in one f32 tensor so that the step waits for the device once:
/// [‖g‖, clipping scale, every micro-batch's per-token losses in order]. Shared by <see cref="Trainer"/> and
/// <see cref="Pretrainer"/>: the step's forward/backward passes write their losses into <see cref="Layout"/>'s views
/// (LlamaModel.ForwardBackwardInto), IBackend.GradNormClip writes <see cref="Clip"/>, <see cref="FlagNonFiniteLoss()"/>
/// turns a non-finite loss into a NaN scale (so the fused AdamW writes nothing), and <see cref="Read"/> downloads it all.
/// </summary>
/// <remarks>
/// Buffers are reallocated only when a step has more loss rows than any before, and the views are rebuilt only when the
/// micro-batch layout changes, so a steady step allocates nothing on the host or the device.
/// </remarks>
internal sealed class StepReadback : IDisposable
{
    private readonly IBackend _backend;
    private Tensor? _all;              // f32 (2 + rows)
    private Tensor? _clip;             // view (2) of _all
    private Tensor? _zeros;            // f32 zeros as long as the loss rows (the loss's finiteness probe)
    private float[] _host = new float[2];
    private int[] _viewRows = Array.Empty<int>();     // the layout _lossViews and _probe were made for
    private Tensor[] _lossViews = Array.Empty<Tensor>();
    private (Tensor Scale, Tensor Losses, Tensor Zeros, Tensor All) _probe;

    public StepReadback(IBackend backend)
    {
        _backend = backend;
        Ensure(0);
    }

    /// <summary>(2): ‖g‖ and the clipping scale, the output of IBackend.GradNormClip and the scale AdamWMultiTensor reads.</summary>
    public Tensor Clip => _clip!;

    /// <summary>
    /// Lays the readback out for micro-batches of <paramref name="rows"/> per-token losses each (LlamaModel.LossRows)
    /// and returns each micro-batch's view. <paramref name="rows"/> is copied when the layout changes; the returned array
    /// is reused until it does.
    /// </summary>
    public Tensor[] Layout(ReadOnlySpan<int> rows)
    {
        if (_viewRows.AsSpan().SequenceEqual(rows)) return _lossViews;
        int total = 0;
        foreach (int r in rows) total += r;
        Ensure(total);
        _lossViews = new Tensor[rows.Length];
        long offset = 2;
        for (int i = 0; i < rows.Length; i++)
        {
            _lossViews[i] = _all!.View(offset, rows[i]);
            offset += rows[i];
        }
        _probe = (_clip!.View(1, 1), _all!.View(2, 1, total), _zeros!.View(0, 1, total), _all.View(0, 2 + total));
        _viewRows = rows.ToArray();
        return _lossViews;
    }

    /// <summary>Makes the clipping scale NaN on the device when a per-token loss of the current layout is not finite (<see cref="FlagNonFiniteLoss(IBackend, Tensor, Tensor, Tensor, int)"/>).</summary>
    public void FlagNonFiniteLoss() => FlagNonFiniteLoss(_backend, _probe.Scale, _probe.Losses, _probe.Zeros, (int)_probe.Losses.Length);

    /// <summary>
    /// A non-finite loss skips the step like a non-finite gradient norm, decided on the device (the host learns the loss
    /// only after the update is queued): <paramref name="scale"/> (1) += Σ losses·0, which adds +0 when every per-token
    /// loss is finite and NaN otherwise (0·±Inf and 0·NaN are NaN), so a finite scale is unchanged bit for bit and the
    /// fused AdamW skips on a NaN one. One small matmul: <paramref name="losses"/> and <paramref name="zeros"/> are (1, rows).
    /// </summary>
    internal static void FlagNonFiniteLoss(IBackend backend, Tensor scale, Tensor losses, Tensor zeros, int rows) =>
        backend.MatMul(scale, losses, zeros, null, 1, 1, rows, accumulate: true);

    /// <summary>
    /// The step's one wait: downloads norm, scale and losses together. The loss sum adds each micro-batch's losses in
    /// double in token order, then the micro-batches (as when each was read back alone).
    /// </summary>
    public (double LossSum, double Norm, float Scale) Read()
    {
        var host = _host.AsSpan(0, (int)_probe.All.Length);
        _backend.Download(_probe.All, host);
        return (AddPerBatch(0, host[2..], _viewRows), host[0], host[1]);
    }

    /// <summary>
    /// <paramref name="sum"/> plus consecutive batches' per-token losses (<paramref name="rows"/> each): each batch summed
    /// in double in token order, then added, as when each batch was read back alone (the step's readback and evaluation).
    /// </summary>
    internal static double AddPerBatch(double sum, ReadOnlySpan<float> losses, ReadOnlySpan<int> rows)
    {
        int at = 0;
        foreach (int r in rows)
        {
            double ls = 0;
            foreach (float x in losses.Slice(at, r)) ls += x;
            sum += ls;
            at += r;
        }
        return sum;
    }

    /// <summary>Makes the readback hold the clip pair and <paramref name="rows"/> losses (reallocated only when a step needs more).</summary>
    private void Ensure(int rows)
    {
        if (_all is not null && _all.Length >= 2L + rows) return;
        _all?.Dispose();
        _zeros?.Dispose();
        _all = _backend.Allocate(DType.F32, 2 + rows);
        _all.Name = "step_readback";
        _clip = _all.View(0, 2);
        _clip.Name = "grad_norm_clip";
        _zeros = _backend.Allocate(DType.F32, Math.Max(1, rows));
        _zeros.Name = "loss_probe_zeros";
        _host = new float[2 + rows];
        _viewRows = Array.Empty<int>();
    }

    public void Dispose()
    {
        _all?.Dispose();
        _zeros?.Dispose();
        _all = _zeros = _clip = null;
    }
}
