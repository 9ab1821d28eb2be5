using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Reference;
using FineTuneNative.Tests.Numerics;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// "ilgpu-sim-tc": the simulator dispatching like CUDA sm_80+ (IlgpuBackend.TensorCores), the device op tests also run on
/// (unless FTN_TEST_TC_SIM=0) to see what a GPU's first run computes. Its name, its flag, and that a 16-bit-weight matmul through
/// it really takes the tensor-core kernel: x rounded to the weight's type, where the plain simulator's SIMT kernel is f32.
/// </summary>
public class TensorCoreSimulatorBackendTests
{
    [Fact]
    public void Names_parse_to_the_tensor_core_dispatch_and_only_there()
    {
        var tc = Assert.IsType<IlgpuBackend>(TestBackends.Get("ilgpu-sim-tc")); // shared: the op tests' instance when enabled
        Assert.True(tc.TensorCores);
        Assert.Equal(32, tc.WarpSize);
        Assert.Equal("ilgpu-sim-tc:32", tc.Name);
        Assert.True(TestBackends.RoundsOperands("ilgpu-sim-tc"));
        Assert.True(TestBackends.IsSimulator("ilgpu-sim-tc"));
        using (var named = (IlgpuBackend)Backends.Create("ILGPU-SIM-TC:32"))
            Assert.True(named.TensorCores);
        Assert.Contains("32-lane", Assert.Throws<ArgumentOutOfRangeException>(() => Backends.Create("ilgpu-sim-tc:4")).Message); // no GPU has those
        Assert.False(((IlgpuBackend)TestBackends.Get("ilgpu-sim:32")).TensorCores);
        Assert.False(TestBackends.RoundsOperands("ilgpu-sim:32"));
        Assert.False(TestBackends.RoundsOperands("cpu"));
        Assert.Contains("ilgpu-sim-tc", Assert.Throws<ArgumentException>(() => Backends.Create("ilgpu-sim-tc:x")).Message);
        Assert.Contains("ilgpu-sim-tc", Assert.Throws<ArgumentException>(() => Backends.Create("tensorcores")).Message);
    }

    [Fact]
    public void Kernel_sets_read_the_flag_at_creation()
    {
        var tc = (IlgpuBackend)TestBackends.Get("ilgpu-sim-tc");
        Assert.True(tc.Kernels(x => new MatMulKernels(x)).WeightGradTensorCores);
        Assert.NotNull(tc.Kernels(x => new MatMulKernels(x)).TensorCoreFor(DType.BF16));
        Assert.Null(tc.Kernels(x => new MatMulKernels(x)).TensorCoreFor(DType.F32));
        Assert.Null(((IlgpuBackend)TestBackends.Get("ilgpu-sim:32")).Kernels(x => new MatMulKernels(x)).TensorCoreFor(DType.BF16));
    }

    /// <summary>
    /// y = x·Wᵀ with a bf16 (f16) W: on "ilgpu-sim-tc" the reference on x rounded to bf16 (f16) to f32 tolerance, and
    /// visibly not the f32 product; on "ilgpu-sim:32" (SIMT) the f32 product.
    /// </summary>
    [Theory]
    [InlineData(DType.BF16)]
    [InlineData(DType.F16)]
    public void A_16_bit_weight_matmul_takes_the_tensor_core_kernel(DType wType)
    {
        const int m = MatMulGemvKernels.MaxRows + 1, n = 5, k = 19; // fewer rows take the f32 GEMV (MatMulGemvTests)
        var xd = Rand(m * k, 1);
        var wd = wType == DType.BF16 ? RoundBf16(Rand(n * k, 2)) : RoundF16(Rand(n * k, 2));
        var rx = wType == DType.BF16 ? RoundBf16(xd) : RoundF16(xd);
        Assert.Contains(true, xd.Select((v, i) => v != rx[i])); // the rounding is visible in the data
        var exact = MatMulReference.Forward(xd, wd, null, m, n, k);
        var rounded = MatMulReference.Forward(rx, wd, null, m, n, k);

        float[] Run(string name)
        {
            var b = TestBackends.Get(name);
            using var x = Up(b, xd, m, k);
            using var w = b.Allocate(wType, n, k);
            b.Upload(w, GradCheck.ToFloat(wd));
            using var y = b.Allocate(DType.F32, m, n);
            b.MatMul(y, x, w, null, m, n, k, accumulate: false);
            return y.ToArray();
        }

        var tc = Run("ilgpu-sim-tc");
        NumericAssert.Close(rounded, tc, Tolerance.F32.Atol, Tolerance.F32.Rtol, "tensor cores vs rounded-x reference");
        double off = exact.Select((e, i) => Math.Abs(e - tc[i])).Max();
        Assert.True(off > 20 * Tolerance.F32.Atol, $"tensor-core result within {off:G3} of the f32 product: x was not rounded");
        var simt = Run("ilgpu-sim:32");
        NumericAssert.Close(exact, simt, Tolerance.F32.Atol, Tolerance.F32.Rtol, "SIMT vs f32 reference");
    }
}
