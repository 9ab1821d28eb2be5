using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// The CUDA driver's event entry points, which ILGPU 1.5.3 does not wrap (it has streams, but no way to make one
/// stream wait for another on the device): resolved from libcuda by name on first use, CUDA only. Nothing on the CPU
/// or simulator path touches this class, so it never loads libcuda there.
/// </summary>
/// <remarks>
/// Signatures as declared in the CUDA driver API header (cuda.h, CUDA 11.8), all returning CUresult (0 = CUDA_SUCCESS):
/// <code>
/// CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags);
/// CUresult cuEventRecord(CUevent hEvent, CUstream hStream);
/// CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags);   // Flags must be 0
/// CUresult cuEventQuery(CUevent hEvent);          // CUDA_ERROR_NOT_READY (600) while work is pending
/// CUresult cuEventSynchronize(CUevent hEvent);
/// CUresult cuEventDestroy(CUevent hEvent);        // a macro for the exported cuEventDestroy_v2
/// </code>
/// CUevent and CUstream are opaque pointers. The calls need the accelerator's context current on the calling thread
/// (<see cref="Accelerator.Bind"/>).
/// </remarks>
internal static unsafe class CudaDriverEvents
{
    public const int Success = 0;
    public const int ErrorNotReady = 600;
    /// <summary>CU_EVENT_DISABLE_TIMING: an event used only for ordering is cheaper without a timestamp.</summary>
    public const uint DisableTiming = 0x2;

    /// <summary>The exported symbols this class calls, in the order of <see cref="Api"/>'s fields.</summary>
    public static readonly string[] Exports =
        ["cuEventCreate", "cuEventRecord", "cuStreamWaitEvent", "cuEventQuery", "cuEventSynchronize", "cuEventDestroy_v2"];

    /// <summary>The driver library's file name on this OS (what ILGPU loads too).</summary>
    public static string LibraryName => OperatingSystem.IsWindows() ? "nvcuda.dll" : "libcuda.so.1";

    /// <summary>Entry points resolved from one loaded driver library.</summary>
    public sealed class Api
    {
        public required delegate* unmanaged<IntPtr*, uint, int> EventCreate { get; init; }
        public required delegate* unmanaged<IntPtr, IntPtr, int> EventRecord { get; init; }
        public required delegate* unmanaged<IntPtr, IntPtr, uint, int> StreamWaitEvent { get; init; }
        public required delegate* unmanaged<IntPtr, int> EventQuery { get; init; }
        public required delegate* unmanaged<IntPtr, int> EventSynchronize { get; init; }
        public required delegate* unmanaged<IntPtr, int> EventDestroy { get; init; }
    }

    private static readonly Lazy<Api> Driver = new(() => Resolve(NativeLibrary.Load(LibraryName)));

    /// <summary>The process's driver (loaded on first use: only a CUDA backend calls this).</summary>
    public static Api Current => Driver.Value;

    /// <summary>Whether <see cref="Current"/> was ever resolved in this process (tests: never on the CPU or simulator path).</summary>
    public static bool IsLoaded => Driver.IsValueCreated;

    /// <summary>Resolves every export of <see cref="Exports"/> from <paramref name="library"/> (throws naming a missing one).</summary>
    public static Api Resolve(IntPtr library)
    {
        IntPtr Get(string name) => NativeLibrary.TryGetExport(library, name, out var p) && p != IntPtr.Zero
            ? p
            : throw new EntryPointNotFoundException($"{LibraryName}: no export '{name}' (a CUDA driver older than the 11.x API?)");
        return new Api
        {
            EventCreate = (delegate* unmanaged<IntPtr*, uint, int>)Get(Exports[0]),
            EventRecord = (delegate* unmanaged<IntPtr, IntPtr, int>)Get(Exports[1]),
            StreamWaitEvent = (delegate* unmanaged<IntPtr, IntPtr, uint, int>)Get(Exports[2]),
            EventQuery = (delegate* unmanaged<IntPtr, int>)Get(Exports[3]),
            EventSynchronize = (delegate* unmanaged<IntPtr, int>)Get(Exports[4]),
            EventDestroy = (delegate* unmanaged<IntPtr, int>)Get(Exports[5]),
        };
    }

    public static void Check(int result, string call)
    {
        if (result != Success) throw new InvalidOperationException($"CUDA driver: {call} failed with CUresult {result}");
    }
}

/// <summary>
/// A point in a device stream's work: recorded after some work is enqueued, it can make another stream wait for that
/// work on the device, and the host can poll or wait for it.
/// </summary>
internal interface IDeviceEvent : IDisposable
{
    /// <summary>Captures the work enqueued on <paramref name="stream"/> so far.</summary>
    void Record(AcceleratorStream stream);
    /// <summary>Work enqueued on <paramref name="stream"/> after this call waits (on the device) for the last recorded work.</summary>
    void MakeWait(AcceleratorStream stream);
    /// <summary>Whether the recorded work has finished (never blocks).</summary>
    bool IsComplete { get; }
    /// <summary>Blocks the host until the recorded work has finished.</summary>
    void HostWait();
}

/// <summary>A CUDA event (cuEventCreate with timing disabled) on the streams of one <see cref="CudaAccelerator"/>.</summary>
internal sealed unsafe class CudaDeviceEvent : IDeviceEvent
{
    private readonly Accelerator _accelerator;
    private readonly CudaDriverEvents.Api _api;
    private IntPtr _event;

    public CudaDeviceEvent(Accelerator accelerator)
    {
        _accelerator = accelerator;
        _api = CudaDriverEvents.Current;
        accelerator.Bind();
        IntPtr e;
        CudaDriverEvents.Check(_api.EventCreate(&e, CudaDriverEvents.DisableTiming), "cuEventCreate");
        _event = e;
    }

    private static IntPtr Handle(AcceleratorStream stream) =>
        stream is CudaStream cs ? cs.StreamPtr : throw new ArgumentException($"a CUDA event needs a CUDA stream, got {stream.GetType().Name}");

    public void Record(AcceleratorStream stream)
    {
        _accelerator.Bind();
        CudaDriverEvents.Check(_api.EventRecord(_event, Handle(stream)), "cuEventRecord");
    }

    public void MakeWait(AcceleratorStream stream)
    {
        _accelerator.Bind();
        CudaDriverEvents.Check(_api.StreamWaitEvent(Handle(stream), _event, 0), "cuStreamWaitEvent");
    }

    public bool IsComplete
    {
        get
        {
            _accelerator.Bind();
            int r = _api.EventQuery(_event);
            if (r == CudaDriverEvents.ErrorNotReady) return false;
            CudaDriverEvents.Check(r, "cuEventQuery");
            return true;
        }
    }

    public void HostWait()
    {
        _accelerator.Bind();
        CudaDriverEvents.Check(_api.EventSynchronize(_event), "cuEventSynchronize");
    }

    public void Dispose()
    {
        if (_event == IntPtr.Zero) return;
        _accelerator.Bind();
        _api.EventDestroy(_event); // nothing to do about a failure while disposing
        _event = IntPtr.Zero;
    }
}

/// <summary>
/// The event of an accelerator whose streams complete every operation before the call that enqueued it returns
/// (ILGPU's CPU accelerator, which runs the simulator): recorded work is always complete, waits are no-ops.
/// </summary>
internal sealed class CompletedEvent : IDeviceEvent
{
    public void Record(AcceleratorStream stream) { }
    public void MakeWait(AcceleratorStream stream) { }
    public bool IsComplete => true;
    public void HostWait() { }
    public void Dispose() { }
}

/// <summary>Host memory a copy engine can read directly (page-locked), of a fixed size.</summary>
internal interface IPinnedBuffer : IDisposable
{
    long Length { get; }
    /// <summary>The bytes; stable in memory for the buffer's lifetime.</summary>
    Span<byte> Span { get; }
}

/// <summary>Page-locked host memory from the accelerator (CUDA: registered with the driver, so copies from it are DMA and asynchronous).</summary>
internal sealed class PageLockedBuffer(Accelerator accelerator, long length) : IPinnedBuffer
{
    private readonly PageLockedArray1D<byte> _array = accelerator.AllocatePageLocked1D<byte>(length, uninitialized: true);
    public long Length => _array.Length;
    public Span<byte> Span => _array.Span;
    public void Dispose() => _array.Dispose();
}

/// <summary>
/// A ring of pinned host staging buffers for host-to-device copies, each with the event recorded after its copy. A
/// buffer is handed out again only once that event completed; when the oldest buffer is still being copied the ring
/// grows (up to <see cref="MaxSlots"/>, so a steady state that keeps k copies in flight ends with k buffers and
/// allocates nothing more), and only at the limit does the host wait for the oldest copy (counted in
/// <see cref="HostWaits"/>).
/// </summary>
internal sealed class StagingRing : IDisposable
{
    /// <summary>One staging buffer and the event of the last copy that read it.</summary>
    public sealed class Slot(IPinnedBuffer buffer, IDeviceEvent copied)
    {
        public IPinnedBuffer Buffer { get; internal set; } = buffer;
        public IDeviceEvent Copied { get; } = copied;
        /// <summary>True from <see cref="Submitted"/> until the ring has seen <see cref="Copied"/> complete.</summary>
        public bool InFlight { get; internal set; }
    }

    private readonly Func<long, IPinnedBuffer> _allocate;
    private readonly Func<IDeviceEvent> _createEvent;
    private readonly List<Slot> _slots = new();
    private int _next;
    private bool _disposed;

    /// <param name="allocate">pinned host memory of at least the given bytes (counted in <see cref="Allocations"/>)</param>
    /// <param name="createEvent">a new device event</param>
    /// <param name="minSlots">buffers made on first use (at least 2: one filling while the other is copied)</param>
    /// <param name="maxSlots">most buffers the ring grows to before the host waits instead</param>
    /// <param name="minBytes">smallest buffer made (buffers grow to the largest copy seen)</param>
    public StagingRing(Func<long, IPinnedBuffer> allocate, Func<IDeviceEvent> createEvent, int minSlots = 2, int maxSlots = 16, long minBytes = 64 << 10)
    {
        if (minSlots < 2 || maxSlots < minSlots) throw new ArgumentOutOfRangeException(nameof(minSlots), $"need 2 <= minSlots ({minSlots}) <= maxSlots ({maxSlots})");
        _allocate = allocate;
        _createEvent = createEvent;
        MinSlots = minSlots;
        MaxSlots = maxSlots;
        MinBytes = minBytes;
    }

    public int MinSlots { get; }
    public int MaxSlots { get; }
    public long MinBytes { get; }
    /// <summary>Buffers in the ring now.</summary>
    public int Count => _slots.Count;
    /// <summary>Pinned buffers allocated so far (new slots and buffers regrown for a larger copy).</summary>
    public long Allocations { get; private set; }
    /// <summary>Times the host blocked on a copy event because every buffer was still being copied.</summary>
    public long HostWaits { get; private set; }

    /// <summary>
    /// A free buffer of at least <paramref name="bytes"/> bytes, in ring order: the caller fills it, enqueues the copy
    /// that reads it, records <see cref="Slot.Copied"/> after that copy and calls <see cref="Submitted"/>.
    /// </summary>
    public Slot Acquire(long bytes)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (bytes < 0) throw new ArgumentOutOfRangeException(nameof(bytes));
        while (_slots.Count < MinSlots) _slots.Add(NewSlot(bytes));
        var slot = _slots[_next];
        if (slot.InFlight && !slot.Copied.IsComplete)
        {
            if (_slots.Count < MaxSlots)
            {
                // Every buffer is still being read by a copy: add one before the oldest, which stays next in line.
                slot = NewSlot(bytes);
                _slots.Insert(_next, slot);
            }
            else
            {
                slot.Copied.HostWait();
                HostWaits++;
            }
        }
        slot.InFlight = false;
        _next = (_next + 1) % _slots.Count;
        if (slot.Buffer.Length < bytes)
        {
            slot.Buffer.Dispose();
            slot.Buffer = Allocate(bytes);
        }
        return slot;
    }

    /// <summary>Marks <paramref name="slot"/> as read by a copy whose completion its event now records.</summary>
    public void Submitted(Slot slot) => slot.InFlight = true;

    private Slot NewSlot(long bytes) => new(Allocate(bytes), _createEvent());

    private IPinnedBuffer Allocate(long bytes)
    {
        Allocations++;
        long size = MinBytes;
        while (size < bytes) size *= 2;
        return _allocate(size);
    }

    /// <summary>Disposes the buffers; the caller has made sure no copy still reads them (a stream synchronize).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var s in _slots) { s.Copied.Dispose(); s.Buffer.Dispose(); }
        _slots.Clear();
    }
}

/// <summary>
/// What the host knows of the values in an i32 storage, kept from the int uploads that wrote it (a freshly allocated
/// storage is all zeros): the largest value and the range of the negative ones. Token and target ids are checked
/// against it before a launch instead of reading the ids back from the device (a blocking round trip per launch).
/// </summary>
internal readonly record struct IntSummary(int Max, int NegMin, int NegMax)
{
    /// <summary>A storage of zeros.</summary>
    public static readonly IntSummary Zeros = new(0, int.MaxValue, int.MinValue);

    public bool HasNegatives => NegMin <= NegMax;

    public static IntSummary Of(ReadOnlySpan<int> values)
    {
        int max = int.MinValue, negMin = int.MaxValue, negMax = int.MinValue;
        foreach (int v in values)
        {
            if (v > max) max = v;
            if (v < 0)
            {
                if (v < negMin) negMin = v;
                if (v > negMax) negMax = v;
            }
        }
        return new IntSummary(max, negMin, negMax);
    }

    /// <summary>A summary that holds for values from either (a partial upload over older contents).</summary>
    public IntSummary Union(IntSummary o) => new(Math.Max(Max, o.Max), Math.Min(NegMin, o.NegMin), Math.Max(NegMax, o.NegMax));

    /// <summary>True when every value is in [0, <paramref name="bound"/>) or equals <paramref name="ignore"/> (null: none ignored).</summary>
    public bool AllIn(long bound, int? ignore) =>
        Max < bound && (!HasNegatives || (ignore is int i && NegMin == i && NegMax == i));
}
