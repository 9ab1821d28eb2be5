using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Kernels.Quant;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// Host&lt;-&gt;device copies of the ILGPU backend while the garbage collector moves objects. ILGPU 1.5.3's
/// <c>CopyFromCPU(ref T, long)</c>/<c>CopyToCPU(ref T, long)</c> turn the reference into a raw pointer
/// (<c>CPUMemoryBuffer.Create(accelerator, ref T, long)</c> calls <c>Unsafe.AsPointer</c>) and expect it pinned;
/// a compacting GC between that and the memcpy moves a young host array, so the copy lands in (or reads) the old
/// address and the caller's array keeps its zeros. That was the "simulator read back all zeros" flake of parallel
/// test runs: other test classes allocate and collect while one class downloads. Here a second thread forces
/// compacting collections back to back; before the fix (IlgpuBackend.CopyIn/CopyOut pin the host span) this test
/// failed 4 runs out of 4 within 2 s (12-71 bad round trips per run; one run crashed the test host), after it
/// 0 bad round trips in 3 runs of 10 s.
/// </summary>
[Collection(Name)]
public class IlgpuHostCopyTests(ITestOutputHelper output)
{
    /// <summary>
    /// Runs alone, after the parallel classes: back-to-back forced collections stall every thread of the process (the
    /// simulator backends of other classes hold hundreds), and other classes' load would starve the copy loop.
    /// </summary>
    public const string Name = "GC stress (alone)";

    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(3);
    private const int MinIterations = 5_000; // 30 000 copies even on a loaded machine; before the fix ~1 in 8 000 copies went bad
    private const int N = 61; // not a multiple of any vector width; small so each array lives in the movable gen-0 heap

    [Fact]
    public void UploadAndDownloadSurviveConcurrentCompactingCollections()
    {
        using var b = IlgpuBackend.CreateSimulator(4); // own instance: copies only, no kernel threads are started
        using var f32 = b.Allocate(DType.F32, N);
        using var bf16 = b.Allocate(DType.BF16, N);
        using var i32 = b.Allocate(DType.I32, N);
        int copies = 0;
        var failures = new List<string>();
        using var stop = new CancellationTokenSource();
        var collector = new Thread(() =>
        {
            // gen 1: arrays promoted by one collection can move again (a gen-0-only loop failed less often here)
            while (!stop.IsCancellationRequested) GC.Collect(1, GCCollectionMode.Forced, blocking: true, compacting: true);
        }) { IsBackground = true, Name = "compacting-collector" };
        collector.Start();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        try
        {
            for (int it = 1; (it <= MinIterations || clock.Elapsed < Budget) && failures.Count < 5; it++)
            {
                // fresh arrays every time: the GC moves only young objects
                var x = new float[N];
                var k = new int[N];
                for (int i = 0; i < N; i++)
                {
                    x[i] = it + i; // exact in f32 and, for it + i < 256, in bf16
                    k[i] = -it * N - i - 1;
                }
                b.Upload(f32, x);
                b.Upload(i32, k);
                var xb = x.Select(v => v % 256).ToArray();
                b.Upload(bf16, xb);
                var y = new float[N];
                b.Download(f32, y);
                var yb = new float[N];
                b.Download(bf16, yb);
                var ki = new int[N];
                b.Download(i32, ki);
                copies += 6;
                if (!y.AsSpan().SequenceEqual(x)) failures.Add($"f32 round trip {it}: got [{string.Join(", ", y.Take(4))}, ...], sent [{string.Join(", ", x.Take(4))}, ...]");
                if (!yb.AsSpan().SequenceEqual(xb)) failures.Add($"bf16 round trip {it}: got [{string.Join(", ", yb.Take(4))}, ...], sent [{string.Join(", ", xb.Take(4))}, ...]");
                if (!ki.AsSpan().SequenceEqual(k)) failures.Add($"i32 round trip {it}: got [{string.Join(", ", ki.Take(4))}, ...], sent [{string.Join(", ", k.Take(4))}, ...]");
            }
        }
        finally
        {
            stop.Cancel();
            collector.Join();
        }
        output.WriteLine($"{copies} copies in {clock.Elapsed.TotalSeconds:F1} s while another thread collected");
        Assert.True(failures.Count == 0, $"{failures.Count} bad round trips in {copies} copies:\n{string.Join("\n", failures)}");
    }

    [Theory]
    [InlineData("ilgpu-sim:4")]
    [InlineData("cpu")]
    public void DownloadRaw_returns_the_storage_so_quantized_tensors_read_back_on_any_backend(string name)
    {
        var b = FineTuneNative.Tests.Numerics.TestBackends.Get(name);
        var x = Enumerable.Range(0, 320).Select(i => MathF.Sin(i * 0.37f) * (1 + i % 7)).ToArray(); // 5 NF4 blocks, 10 Q8_0 blocks
        var nf4 = Nf4.Quantize(x);
        using var t = b.Allocate(DType.NF4, 10, 32);
        b.UploadRaw(t, nf4);
        var raw = new byte[t.Bytes];
        b.DownloadRaw(t, raw);
        Assert.Equal(nf4, raw);
        Assert.Equal(Nf4.Dequantize(nf4, x.Length), Nf4.ToFloats(t));
        var q8 = new byte[x.Length / 32 * Q8_0.BlockBytes];
        Q8_0.Quantize(x, q8);
        using var t8 = b.Allocate(DType.Q8_0, 10, 32);
        b.UploadRaw(t8, q8);
        var expect = new float[x.Length];
        Q8_0.Dequantize(q8, expect);
        Assert.Equal(expect, QuantBlocks.ToFloats(t8));
        Assert.Throws<ArgumentException>(() => b.DownloadRaw(t, new byte[raw.Length - 1]));
    }
}

[CollectionDefinition(IlgpuHostCopyTests.Name, DisableParallelization = true)]
public sealed class GcStressCollection;
