using System.Runtime.InteropServices;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using ILGPU.Runtime;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Kernels.Gpu;

/// <summary>
/// The stream machinery of the ILGPU backend without a GPU: the CUDA event entry points resolved (and called) from the
/// installed driver library, the staging ring's reuse rules against a fake event source, the host-side id summaries,
/// and staged uploads on the simulator keeping the order of the ops around them.
/// </summary>
public class CudaStreamsTests(ITestOutputHelper output)
{
    // ------------------------------------------------------------------ the CUDA driver's exports

    [SkippableFact]
    public unsafe void Every_cuda_event_export_resolves_from_the_installed_driver_and_answers_a_documented_cuResult()
    {
        Skip.IfNot(NativeLibrary.TryLoad(CudaDriverEvents.LibraryName, out var lib),
            $"{CudaDriverEvents.LibraryName} is not installed (no NVIDIA driver): the export check is skipped");
        try
        {
            foreach (var name in CudaDriverEvents.Exports)
                Assert.True(NativeLibrary.TryGetExport(lib, name, out var p) && p != IntPtr.Zero, $"{name} is not exported");
            var api = CudaDriverEvents.Resolve(lib);
            // Without a device (here: cuInit fails) every call returns an error code instead of doing anything; a call
            // that returns one proves the entry point takes and returns what cuda.h declares (a wrong signature would
            // crash or return garbage). With a device and no current context the codes differ, but are never success.
            IntPtr e = IntPtr.Zero;
            var codes = new[]
            {
                ("cuEventCreate", api.EventCreate(&e, CudaDriverEvents.DisableTiming)),
                ("cuEventRecord", api.EventRecord(IntPtr.Zero, IntPtr.Zero)),
                ("cuStreamWaitEvent", api.StreamWaitEvent(IntPtr.Zero, IntPtr.Zero, 0)),
                ("cuEventQuery", api.EventQuery(IntPtr.Zero)),
                ("cuEventSynchronize", api.EventSynchronize(IntPtr.Zero)),
                ("cuEventDestroy_v2", api.EventDestroy(IntPtr.Zero)),
            };
            output.WriteLine(string.Join(", ", codes.Select(c => $"{c.Item1} -> {c.Item2}")));
            // CUresult values from cuda.h: 1 INVALID_VALUE, 3 NOT_INITIALIZED, 4 DEINITIALIZED, 100 NO_DEVICE,
            // 201 INVALID_CONTEXT, 400 INVALID_HANDLE, 709 CONTEXT_IS_DESTROYED
            int[] documented = [1, 3, 4, 100, 201, 400, 709];
            foreach (var (name, code) in codes) Assert.True(documented.Contains(code), $"{name} returned {code}, not a documented 'no context' error");
            Assert.Equal(IntPtr.Zero, e);
        }
        finally
        {
            NativeLibrary.Free(lib);
        }
    }

    [Fact]
    public void A_missing_export_is_named()
    {
        // the process's own runtime library has none of the CUDA exports
        var self = NativeLibrary.Load(OperatingSystem.IsWindows() ? "kernel32.dll" : "libc.so.6");
        var e = Assert.Throws<EntryPointNotFoundException>(() => CudaDriverEvents.Resolve(self));
        Assert.Contains("cuEventCreate", e.Message);
    }

    // ------------------------------------------------------------------ the staging ring against fake events

    private sealed class FakeEvent : IDeviceEvent
    {
        public bool Done = true;
        public int Waits;
        public void Record(AcceleratorStream stream) => Done = false; // a copy is now pending
        public void MakeWait(AcceleratorStream stream) { }
        public bool IsComplete => Done;
        public void HostWait() { Waits++; Done = true; }
        public void Dispose() { }
    }

    private sealed class FakeBuffer(long length) : IPinnedBuffer
    {
        private readonly byte[] _bytes = new byte[length];
        public long Length => _bytes.Length;
        public Span<byte> Span => _bytes;
        public bool Disposed;
        public void Dispose() => Disposed = true;
    }

    private static (StagingRing Ring, List<FakeEvent> Events) FakeRing(int min = 2, int max = 3)
    {
        var events = new List<FakeEvent>();
        var ring = new StagingRing(n => new FakeBuffer(n), () => { var e = new FakeEvent(); events.Add(e); return e; }, min, max, minBytes: 16);
        return (ring, events);
    }

    /// <summary>What the backend does per staged upload: take a slot, "copy" (record its event), submit.</summary>
    private static StagingRing.Slot Copy(StagingRing ring, long bytes)
    {
        var s = ring.Acquire(bytes);
        s.Copied.Record(null!);
        ring.Submitted(s);
        return s;
    }

    [Fact]
    public void Staging_ring_reuses_a_buffer_only_after_its_copy_completed()
    {
        var (ring, events) = FakeRing(min: 2, max: 3);
        var a = Copy(ring, 10);
        var b = Copy(ring, 10);
        Assert.Equal(2, ring.Count);
        Assert.NotSame(a, b);
        ((FakeEvent)a.Copied).Done = true; // a's copy finished, b's not: a is next in line and free
        var c = Copy(ring, 10);
        Assert.Same(a, c);
        Assert.Equal(2, ring.Allocations);
        // both in flight: the ring grows (one more buffer, before the oldest) instead of waiting
        var d = Copy(ring, 10);
        Assert.Equal(3, ring.Count);
        Assert.NotSame(b, d);
        Assert.NotSame(c, d);
        Assert.Equal(0, ring.HostWaits);
        // all three in flight at the limit: the host waits for the oldest copy (b), then reuses its buffer
        var e = Copy(ring, 10);
        Assert.Same(b, e);
        Assert.Equal(1, ring.HostWaits);
        Assert.Equal(1, ((FakeEvent)b.Copied).Waits);
        Assert.Equal(3, events.Count);
        Assert.Equal(3, ring.Allocations);
    }

    [Fact]
    public void Staging_ring_in_a_steady_state_allocates_nothing_and_never_waits()
    {
        var (ring, events) = FakeRing(min: 2, max: 16);
        // k = 5 copies in flight at a time: the oldest completes whenever a sixth is submitted
        var inFlight = new Queue<StagingRing.Slot>();
        long allocationsAfterWarmup = -1;
        for (int i = 0; i < 200; i++)
        {
            if (inFlight.Count == 5) ((FakeEvent)inFlight.Dequeue().Copied).Done = true;
            inFlight.Enqueue(Copy(ring, 100 + i % 7));
            if (i == 20) allocationsAfterWarmup = ring.Allocations;
        }
        Assert.Equal(allocationsAfterWarmup, ring.Allocations);
        Assert.Equal(0, ring.HostWaits);
        Assert.InRange(ring.Count, 5, 6);
        Assert.Equal(ring.Count, events.Count);
    }

    [Fact]
    public void Staging_ring_regrows_a_buffer_for_a_larger_copy_and_disposes_the_old_one()
    {
        var (ring, _) = FakeRing();
        var a = ring.Acquire(10);
        var small = (FakeBuffer)a.Buffer;
        Assert.Equal(16, small.Length); // minBytes
        ring.Submitted(a); // its event was never recorded: complete
        ring.Acquire(10);
        var again = ring.Acquire(1000);
        Assert.Same(a, again);
        Assert.True(small.Disposed);
        Assert.Equal(1024, again.Buffer.Length); // the next power of two from minBytes
        Assert.Equal(3, ring.Allocations);
        Assert.Throws<ArgumentOutOfRangeException>(() => new StagingRing(n => new FakeBuffer(n), () => new FakeEvent(), minSlots: 1));
    }

    // ------------------------------------------------------------------ id summaries

    [Fact]
    public void Int_summary_vouches_only_for_ids_it_has_seen()
    {
        var s = IntSummary.Of([3, -100, 0, 7, -100]);
        Assert.True(s.AllIn(8, ignore: -100));
        Assert.False(s.AllIn(7, ignore: -100));   // 7 is out of [0, 7)
        Assert.False(s.AllIn(8, ignore: null));   // -100 is not a token id
        Assert.False(IntSummary.Of([-1, -100]).AllIn(8, ignore: -100)); // two different negatives
        Assert.True(IntSummary.Zeros.AllIn(1, ignore: null));
        Assert.False(IntSummary.Zeros.Union(IntSummary.Of([5])).AllIn(5, null));
        Assert.True(IntSummary.Of([]).AllIn(1, null));
    }

    // ------------------------------------------------------------------ staged uploads on the simulator

    [Fact]
    public void Staged_uploads_on_the_simulator_keep_the_order_of_the_ops_around_them_and_never_wait()
    {
        using var b = IlgpuBackend.CreateSimulator(4);
        const int n = 37;
        using var x = b.Allocate(DType.F32, n);
        using var acc = b.Allocate(DType.F32, n);
        using var ids = b.Allocate(DType.I32, n);
        var expected = new float[n];
        long syncs = b.BlockingSyncs;
        // more uploads than the ring starts with, each overwriting x while the previous value is still to be added
        for (int r = 0; r < 9; r++)
        {
            var v = new float[n];
            for (int i = 0; i < n; i++) { v[i] = r * 100 + i; expected[i] += 2 * v[i]; }
            b.Upload(x, v);
            b.Scale(x, 2f);
            b.Add(acc, acc, x);
            b.Upload(ids, Enumerable.Range(r, n).ToArray());
        }
        Assert.Equal(syncs, b.BlockingSyncs); // no upload waited for the device
        var got = new float[n];
        b.Download(acc, got);
        Assert.Equal(syncs + 1, b.BlockingSyncs);
        Assert.Equal(expected, got);
        var k = new int[n];
        b.Download(ids, k);
        Assert.Equal(Enumerable.Range(8, n), k);
        // a large upload (above the staging limit) waits once, after its copy
        int big = (int)(IlgpuBackend.StagedMaxBytes / 4) + 1;
        using var large = b.Allocate(DType.F32, big);
        var data = Enumerable.Range(0, big).Select(i => (float)(i % 1000)).ToArray();
        long before = b.BlockingSyncs;
        b.Upload(large, data);
        Assert.Equal(before + 1, b.BlockingSyncs);
        Assert.Equal(data, large.ToArray());
        Assert.False(CudaDriverEvents.IsLoaded, "the simulator path resolved the CUDA driver");
        output.WriteLine($"blocking syncs: {b.BlockingSyncs}; device allocations (pool chunks, scratch, pinned staging): {b.DeviceAllocations}");
    }

    /// <summary>Logs what the backend asks of its events, naming the stream (compute or copy).</summary>
    private sealed class LoggingEvent(int id, List<string> log, Func<AcceleratorStream, string> streamName) : IDeviceEvent
    {
        public bool Done = true;
        public void Record(AcceleratorStream stream) { log.Add($"e{id}.record({streamName(stream)})"); Done = false; }
        public void MakeWait(AcceleratorStream stream) => log.Add($"{streamName(stream)}.wait(e{id})");
        public bool IsComplete => Done;
        public void HostWait() { log.Add($"host.wait(e{id})"); Done = true; }
        public void Dispose() { }
    }

    [Fact]
    public void A_staged_upload_orders_its_copy_between_the_compute_streams_past_and_future_with_events()
    {
        using var b = IlgpuBackend.CreateSimulator(4);
        var log = new List<string>();
        var events = new List<LoggingEvent>();
        string Name(AcceleratorStream s) => ReferenceEquals(s, b.Stream) ? "compute" : ReferenceEquals(s, b.CopyStream) ? "copy" : "other";
        b.EventsForTest = () => { var e = new LoggingEvent(events.Count, log, Name); events.Add(e); return e; };
        using var x = b.Allocate(DType.F32, 5);
        b.Upload(x, [1f, 2, 3, 4, 5]);
        // e0 is the compute stream's mark, e1 and e2 the ring's first two slots: the copy stream waits for the compute
        // stream's work so far (earlier kernels may read x), the compute stream for the copy (later kernels read x)
        Assert.Equal(["e0.record(compute)", "copy.wait(e0)", "e1.record(copy)", "compute.wait(e1)"], log);
        Assert.Equal([1f, 2, 3, 4, 5], x.ToArray());
        // the fake copies never complete: the ring grows to its limit, then the host waits for the oldest copy
        long syncs = b.BlockingSyncs, allocations = b.DeviceAllocations;
        log.Clear();
        for (int i = 0; i < 15; i++) b.Upload(x, [(float)i, 0, 0, 0, 0]); // 16 copies in flight with the first
        Assert.Equal(17, events.Count); // the mark + 16 slots
        Assert.Equal(allocations + 14, b.DeviceAllocations); // two slots came with the first upload
        Assert.DoesNotContain(log, l => l.StartsWith("host.", StringComparison.Ordinal));
        b.Upload(x, [7f, 0, 0, 0, 0]);
        Assert.Contains("host.wait(e1)", log); // the oldest slot, reused
        Assert.Equal(syncs + 1, b.BlockingSyncs);
        Assert.Equal(7f, x.ToArray()[0]);
    }

    [Fact]
    public void Ids_written_by_something_other_than_an_int_upload_are_read_back_and_checked()
    {
        using var b = IlgpuBackend.CreateSimulator(4);
        using var ids = b.Allocate(DType.I32, 4);
        using var table = b.Allocate(DType.F32, 3, 2);
        using var output = b.Allocate(DType.F32, 4, 2);
        b.Upload(ids, [0, 1, 2, 1]);
        long syncs = b.BlockingSyncs;
        b.EmbeddingForward(output, ids, table, 4, 2);
        Assert.Equal(syncs, b.BlockingSyncs); // checked from the upload, not read back
        b.UploadRaw(ids, MemoryMarshal.AsBytes(new int[] { 0, 1, 7, 1 }.AsSpan()));
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => b.EmbeddingForward(output, ids, table, 4, 2));
        Assert.Contains("token id 7 at position 2", e.Message);
        Assert.Equal(syncs + 1, b.BlockingSyncs);
        // a partial upload into a known tensor keeps it known, merged with what was there
        b.Upload(ids, [0, 0, 0, 0]);
        b.Upload(ids.View(2, 2), [2, 2]);
        syncs = b.BlockingSyncs;
        b.EmbeddingForward(output, ids, table, 4, 2);
        Assert.Equal(syncs, b.BlockingSyncs);
    }
}

/// <summary>Nf4Kernels' scratch: a panel regrown for the SIMT path must not leave the tensor-core path a freed table.</summary>
public class Nf4ScratchTests
{
    [Fact]
    public void The_fused_nf4_table_survives_a_panel_regrowth()
    {
        using var b = IlgpuBackend.CreateSimulator(4);
        const int n = 8, k = 64, m = 2;
        var values = Enumerable.Range(0, n * k).Select(i => MathF.Sin(i * 0.37f)).ToArray();
        using var w = b.Allocate(DType.NF4, n, k);
        b.UploadRaw(w, global::FineTuneNative.Kernels.Nf4.Quantize(values));
        using var x = b.Allocate(DType.F32, m, k);
        using var y = b.Allocate(DType.F32, m, n);
        var nf4 = b.Kernels(s => new Nf4Kernels(s));
        nf4.Fused(w); // the tensor-core path's table
        nf4.Forward(w, b.F32(x, "x"), b.F32(y, "y"), null, m, n, k, 1f, false, "test"); // the SIMT path: first panel
        var table = new float[global::FineTuneNative.Kernels.Nf4.Levels.Length];
        var fused = nf4.Fused(w);
        Assert.False(fused.F32.Length == 0);
        fused.F32.SubView(0, table.Length).CopyToCPU(table); // before the fix: a view of the buffer the panel regrowth freed
        Assert.Equal(global::FineTuneNative.Kernels.Nf4.Levels, table);
    }
}
