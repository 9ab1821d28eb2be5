using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>SwiGLU: h = silu(gate) ⊙ up, and its backward. One thread per element.</summary>
/// <remarks>Matches SwiGluReference. The forward saves nothing: the backward re-reads gate and up.</remarks>
internal sealed class SwiGluKernels
{
    private readonly IlgpuBackend _b;
    private readonly Action<Index1D, DeviceFloats, DeviceFloats, DeviceFloats> _forward;
    private readonly Action<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>> _backward;

    public SwiGluKernels(IlgpuBackend b)
    {
        _b = b;
        _forward = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, DeviceFloats, DeviceFloats, DeviceFloats>(ElementwiseKernels.BinaryKernel<SwiGluOp>);
        _backward = b.Accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>>(SwiGluBackwardKernel);
    }

    /// <summary>dGate = dh ⊙ up ⊙ silu'(gate); dUp = dh ⊙ silu(gate) (both overwritten).</summary>
    [GpuKernel(false)]
    public static void SwiGluBackwardKernel(Index1D i, ArrayView<float> dGate, ArrayView<float> dUp, ArrayView<float> dh, ArrayView<float> gate, ArrayView<float> up)
    {
        float g = gate[i], d = dh[i];
        dGate[i] = d * up[i] * SiluOp.Derivative(g);
        dUp[i] = d * SiluOp.Apply(g);
    }

    public void Forward(Tensor h, Tensor gate, Tensor up, long count) // h, gate, up: (M, F)
    {
        IlgpuBackend.Need(h, count, "h", "SwiGluForward");
        IlgpuBackend.Need(gate, count, "gate", "SwiGluForward");
        IlgpuBackend.Need(up, count, "up", "SwiGluForward");
        int n = IlgpuBackend.CheckedCount(count, "SwiGluForward");
        if (n == 0) return;
        _forward(n, _b.Floats(h, "h"), _b.Floats(gate, "gate"), _b.Floats(up, "up"));
    }

    public void Backward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long count) // all (M, F)
    {
        const string op = "SwiGluBackward";
        IlgpuBackend.Need(dGate, count, "dGate", op);
        IlgpuBackend.Need(dUp, count, "dUp", op);
        IlgpuBackend.Need(dh, count, "dh", op);
        IlgpuBackend.Need(gate, count, "gate", op);
        IlgpuBackend.Need(up, count, "up", op);
        int n = IlgpuBackend.CheckedCount(count, op);
        if (n == 0) return;
        _backward(n, _b.F32(dGate, "dGate"), _b.F32(dUp, "dUp"), _b.F32(dh, "dh"), _b.F32(gate, "gate"), _b.F32(up, "up"));
    }
}
