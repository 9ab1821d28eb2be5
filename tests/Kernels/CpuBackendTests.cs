using System.Runtime.InteropServices;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Kernels.Reference;
using static FineTuneNative.Tests.Kernels.KernelTest;

namespace FineTuneNative.Tests.Kernels;

/// <summary>What only the CPU backend has: external memory, thread counts, calls from many threads.</summary>
public class CpuBackendTests
{
    private sealed class Owner : IDisposable
    {
        public bool Disposed;
        public void Dispose() => Disposed = true;
    }

    [Fact]
    public unsafe void WrapExternal_ReadsHostMemoryWithoutCopy_AndDisposesOwner()
    {
        using var b = new CpuBackend(2);
        var host = Marshal.AllocHGlobal(4 * 6 + 2);
        try
        {
            // deliberately misaligned by 2 bytes: bf16 data inside a file need not be aligned
            var p = (ushort*)(host + 2);
            float[] values = { 1, -2, 3.5f, 0.25f, 8, -0.125f };
            for (int i = 0; i < 6; i++) p[i] = HalfBits.F32ToBf16(values[i]);
            var owner = new Owner();
            var w = b.WrapExternal(DType.BF16, new[] { 2, 3 }, (IntPtr)p, owner);
            Assert.Equal(values, w.ToArray());
            p[0] = HalfBits.F32ToBf16(4f); // no copy: the tensor sees the change
            Assert.Equal(4f, w.ToArray()[0]);
            using var x = Up(b, new float[] { 1, 1, 1 }, 1, 3);
            using var y = b.Allocate(DType.F32, 1, 2);
            b.MatMul(y, x, w, null, 1, 2, 3, false);
            Assert.Equal(new[] { 4 - 2 + 3.5f, 0.25f + 8 - 0.125f }, y.ToArray());
            w.Dispose();
            Assert.True(owner.Disposed);
        }
        finally { Marshal.FreeHGlobal(host); }
    }

    [Fact]
    public void ThreadCounts_GiveIdenticalBits()
    {
        const int m = 45, n = 77, k = 150;
        var xd = Rand(m * k, 1); var wd = Rand(n * k, 2);
        float[]? first = null;
        foreach (int threads in new[] { 1, 2, 3, 7 })
        {
            using var b = new CpuBackend(threads);
            Assert.Equal(threads, b.Threads);
            using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var y = b.Allocate(DType.F32, m, n);
            b.MatMul(y, x, w, null, m, n, k, false);
            var got = y.ToArray();
            Close(MatMulReference.Forward(xd, wd, null, m, n, k), y, $"threads={threads}");
            if (first == null) first = got; else Assert.Equal(first, got);
        }
    }

    [Fact]
    public void ConcurrentCallers_GetCorrectResults()
    {
        using var b = new CpuBackend(2);
        const int m = 30, n = 50, k = 70;
        var xd = Rand(m * k, 1); var wd = Rand(n * k, 2);
        var expected = MatMulReference.Forward(xd, wd, null, m, n, k);
        Parallel.For(0, 8, _ =>
        {
            using var x = Up(b, xd, m, k); using var w = Up(b, wd, n, k); using var y = b.Allocate(DType.F32, m, n);
            for (int rep = 0; rep < 20; rep++)
            {
                b.MatMul(y, x, w, null, m, n, k, false);
                Close(expected, y, "y");
            }
        });
    }

    [Fact]
    public void TensorFromAnotherBackend_IsRejected()
    {
        using var b1 = new CpuBackend(1);
        var foreign = new Tensor(b1, DType.F32, new[] { 4 }, new object(), 0, null, "foreign");
        using var ok = b1.Allocate(DType.F32, 4);
        ThrowsNaming("foreign", () => b1.Add(ok, ok, foreign));
    }
}
