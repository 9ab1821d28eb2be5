using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Algorithms;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>The storage root of a tensor allocated by an <see cref="IlgpuBackend"/>: a byte range of one pool chunk.</summary>
internal sealed class GpuStorage : IDisposable
{
    private bool _disposed;

    public GpuStorage(IlgpuBackend owner, PoolChunk chunk, long offset, long bytes)
    {
        Owner = owner;
        Chunk = chunk;
        Offset = offset;
        Bytes = bytes;
    }

    public IlgpuBackend Owner { get; }
    /// <summary>The pool chunk (device buffer) the range lies in; tensors of one chunk share one base view.</summary>
    public PoolChunk Chunk { get; }
    /// <summary>Byte offset of the range in the chunk (a multiple of <see cref="DevicePool.Alignment"/>).</summary>
    public long Offset { get; }
    public long Bytes { get; }
    /// <summary>What the host uploaded into an i32 storage (null: unknown, written by something else); see <see cref="IntSummary"/>.</summary>
    public IntSummary? Ints { get; set; } = IntSummary.Zeros;
    public ArrayView<byte> View => Chunk.Buffer.View.AsContiguous().SubView(Offset, Bytes);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Owner.Release(this);
    }
}

/// <summary>
/// The ILGPU backend: CUDA on an NVIDIA GPU (<see cref="CreateCuda"/>) or ILGPU's CPU simulator shaped like a
/// GPU (<see cref="CreateSimulator"/>, tests only). Each op family lives in its own file (MatMul.cs, Attention.cs
/// ...) with its kernels and a kernel-set class that loads them once per accelerator; this class owns the
/// context, memory and dispatch.
/// </summary>
/// <remarks>
/// Ops are enqueued on the accelerator's default stream (the compute stream). Uploads up to
/// <see cref="StagedMaxBytes"/> do not wait for the device: the host copies the data into a pinned staging buffer
/// (<see cref="StagingRing"/>) and the device copies it on a second stream, which waits (on the device) for the
/// compute stream's earlier work, while the compute stream's later work waits for the copy (CUDA events,
/// <see cref="CudaDriverEvents"/>); ILGPU's CPU accelerator runs the same path with every operation complete on return.
/// Downloads and reductions returning a value wait for the device once each (<see cref="BlockingSyncs"/>).
/// Calls are serialized by a lock, so one backend may be shared by threads (tests do).
/// </remarks>
public sealed class IlgpuBackend : IBackend
{
    /// <summary>The largest group any kernel here launches; the simulator is built to allow it.</summary>
    internal const int MaxGroupSize = 256;

    private readonly Context _context;
    private readonly object _gate = new();
    private readonly Dictionary<Type, object> _kernelSets = new();
    private readonly DevicePool _pool;
    private long _scratchAllocations;
    private long _hostWaits;
    private AcceleratorStream? _copyStream; // staged host-to-device copies (CUDA: a non-blocking stream)
    private IDeviceEvent? _computeMark;     // recorded on the compute stream before each staged copy
    private StagingRing? _staging;
    private bool _disposed;

    /// <summary>
    /// FTN_ILGPU_BLOCKING_COPIES=1: every upload waits for the device before and after its copy, as before the staging
    /// ring (the A of bench/gpu.sh's A/B of host/device overlap). Measurement only.
    /// </summary>
    internal static readonly bool BlockingCopies = Environment.GetEnvironmentVariable("FTN_ILGPU_BLOCKING_COPIES") == "1";

    /// <summary>Largest upload that goes through the pinned staging ring (token ids, targets, positions, small tables); larger ones (weights) wait for the device.</summary>
    internal const long StagedMaxBytes = 4L << 20;

    private IlgpuBackend(Context context, Accelerator accelerator, string name, long poolChunkBytes = 0, bool tensorCores = false)
    {
        _context = context;
        Accelerator = accelerator;
        Name = name;
        TensorCores = tensorCores || accelerator is CudaAccelerator cuda && cuda.Architecture is { Major: >= 8 };
        // A shared chunk holds the small tensors (norms, adapters, their gradients and moments) of a model together.
        _pool = new DevicePool(accelerator, poolChunkBytes > 0 ? poolChunkBytes : accelerator.AcceleratorType == AcceleratorType.CPU ? 4L << 20 : 256L << 20);
        if (accelerator.MaxNumThreadsPerGroup < MaxGroupSize)
            throw new NotSupportedException($"{name}: the accelerator allows {accelerator.MaxNumThreadsPerGroup} threads per group, kernels need {MaxGroupSize}");
        if (MaxGroupSize / accelerator.WarpSize > GroupReduce.MaxWarps)
            throw new NotSupportedException($"{name}: warp size {accelerator.WarpSize} gives more than {GroupReduce.MaxWarps} warps per group");
    }

    /// <summary>ILGPU's CUDA accelerator on device <paramref name="device"/>.</summary>
    public static IlgpuBackend CreateCuda(int device)
    {
        int count = CudaDeviceCount();
        if (count == 0)
            throw new InvalidOperationException("device 'cuda': no CUDA device found (no NVIDIA GPU or no CUDA driver); use --device cpu");
        if (device < 0 || device >= count)
            throw new ArgumentOutOfRangeException(nameof(device), $"device 'cuda:{device}': there are {count} CUDA device(s) (0..{count - 1})");
        var context = Context.Create(b => b.Cuda().Math(MathMode.Default).EnableAlgorithms().Profiling()); // profiling: device-event timing (bench gpu)
        try
        {
            var accelerator = context.GetCudaDevice(device).CreateCudaAccelerator(context);
            return new IlgpuBackend(context, accelerator, $"cuda:{device}");
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    /// <summary>
    /// ILGPU's CPU simulator shaped like an NVIDIA GPU with the given warp size: groups of up to
    /// <see cref="MaxGroupSize"/> threads on one multiprocessor (each simulated thread is an OS thread; the build
    /// machine is shared, so fewer is kinder).
    /// A debugger, not a compute path: keep shapes tiny.
    /// </summary>
    public static IlgpuBackend CreateSimulator(int warpSize) => CreateSimulator(warpSize, 0);

    /// <summary>
    /// <see cref="CreateSimulator(int)"/> with shared pool chunks of <paramref name="poolChunkBytes"/> (0: the default 4 MiB):
    /// tests make tiny models' tensors larger than half a chunk, as a big model's are on a GPU (each its own chunk unless reserved).
    /// </summary>
    internal static IlgpuBackend CreateSimulator(int warpSize, long poolChunkBytes) => CreateSimulator(warpSize, poolChunkBytes, false);

    /// <summary>
    /// <see cref="CreateSimulator(int)"/> that dispatches like CUDA sm_80+ (<paramref name="tensorCores"/>: <see cref="TensorCores"/>
    /// true, so bf16/f16 matmuls, NF4 and bf16 attention take the tensor-core kernels, here their scalar paths with the same
    /// operand rounding): device "ilgpu-sim-tc", a test and diagnostic device that shows what a GPU's first run will compute.
    /// </summary>
    public static IlgpuBackend CreateSimulator(int warpSize, bool tensorCores)
    {
        if (tensorCores && warpSize != MmaLayout.WarpThreads) // as on every GPU with tensor cores; the kernels' lane maps need it
            throw new ArgumentOutOfRangeException(nameof(warpSize), $"device 'ilgpu-sim-tc:{warpSize}': the tensor-core kernels need {MmaLayout.WarpThreads}-lane warps");
        return CreateSimulator(warpSize, 0, tensorCores);
    }

    private static IlgpuBackend CreateSimulator(int warpSize, long poolChunkBytes, bool tensorCores)
    {
        if (warpSize < 1 || warpSize > MaxGroupSize || (warpSize & (warpSize - 1)) != 0)
            throw new ArgumentOutOfRangeException(nameof(warpSize), $"device 'ilgpu-sim:{warpSize}': the warp size must be a power of two in [1, {MaxGroupSize}]");
        var device = new CPUDevice(warpSize, MaxGroupSize / warpSize, 1); // (threads per warp, warps per multiprocessor, multiprocessors)
        var context = Context.Create(b => b.CPU(device).Math(MathMode.Default).EnableAlgorithms());
        try
        {
            var accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
            return new IlgpuBackend(context, accelerator, tensorCores ? $"ilgpu-sim-tc:{warpSize}" : $"ilgpu-sim:{warpSize}", poolChunkBytes, tensorCores);
        }
        catch
        {
            context.Dispose();
            throw;
        }
    }

    private static readonly Lazy<int> CudaCount = new(() =>
    {
        try
        {
            using var context = Context.Create(b => b.Cuda());
            return context.GetCudaDevices().Count;
        }
        catch
        {
            return 0; // no driver, no libcuda: no CUDA device
        }
    });

    /// <summary>Number of CUDA devices ILGPU sees; 0 without a GPU or driver. Never throws.</summary>
    public static int CudaDeviceCount() => CudaCount.Value;

    public string Name { get; }
    internal Accelerator Accelerator { get; }
    internal AcceleratorStream Stream => Accelerator.DefaultStream;
    public int WarpSize => Accelerator.WarpSize;

    /// <summary>
    /// Whether matmuls against bf16/f16 weights run on tensor cores (<see cref="MatMulTensorCoreKernels"/>): CUDA on
    /// compute capability 8.0+ (A100, H100), or the simulator created as "ilgpu-sim-tc" (the kernels' scalar paths, same
    /// operand rounding). Elsewhere they stay f32 SIMT.
    /// </summary>
    internal bool TensorCores { get; }

    /// <summary>The accelerator's device name.</summary>
    public string DeviceName => Accelerator.Name;

    /// <summary>A device event on the stream (CUDA: cuEventRecord), for timing kernels without host synchronization.</summary>
    internal ProfilingMarker Marker()
    {
        lock (_gate) return Stream.AddProfilingMarker();
    }

    /// <summary>Threads per group for one-group-per-row kernels: a multiple of the warp size.</summary>
    internal int RowGroupSize => Accelerator.AcceleratorType == AcceleratorType.CPU
        // The simulator pays per thread at every barrier (64 instead of 256 threads made RmsNorm ~4x faster here);
        // 64 is still two warps at warp 32 and sixteen at warp 4, so the cross-warp reductions stay exercised.
        ? Math.Min(MaxGroupSize, Math.Max(64 / WarpSize, 2) * WarpSize)
        : MaxGroupSize / WarpSize * WarpSize;

    /// <summary>The kernel set of one op family, created (and its kernels loaded) on first use only.</summary>
    internal T Kernels<T>(Func<IlgpuBackend, T> create) where T : class
    {
        lock (_gate) // re-entered from the ops (which hold it already); taken for tests that reach a kernel set directly
        {
            if (!_kernelSets.TryGetValue(typeof(T), out var set)) _kernelSets[typeof(T)] = set = create(this);
            return (T)set;
        }
    }

    /// <summary>
    /// Runs <paramref name="work"/> holding the lock every op takes, for tests that launch a kernel set's methods
    /// directly on a backend other tests share (so no other thread's launch interleaves with theirs).
    /// </summary>
    internal void Exclusive(Action work)
    {
        lock (_gate) work();
    }

    // ------------------------------------------------------------------ tensor -> view
    private GpuStorage StorageOf(Tensor t, string name)
    {
        if (t.Storage is not GpuStorage s || !ReferenceEquals(s.Owner, this))
            throw new ArgumentException($"{name} ({t.Describe()}) does not live on backend {Name}");
        return s;
    }

    internal ArrayView<byte> RawView(Tensor t, string name)
    {
        var s = StorageOf(t, name);
        if (t.DType.IsQuantized()) return s.View.SubView(t.Offset == 0 ? 0 : t.DType.StorageBytes(t.Offset), t.Bytes);
        long size = t.DType.SizeOf();
        return s.View.SubView(t.Offset * size, t.Length * size);
    }

    /// <summary>The pool chunk of <paramref name="t"/> and its byte offset in it (multi-tensor ops address tensors this way).</summary>
    internal (PoolChunk Chunk, long ByteOffset) Placement(Tensor t, string name)
    {
        var s = StorageOf(t, name);
        if (t.DType.IsQuantized()) throw new ArgumentException($"{name} ({t.Describe()}): multi-tensor ops take float tensors");
        return (s.Chunk, s.Offset + t.Offset * t.DType.SizeOf());
    }

    internal ArrayView<float> F32(Tensor t, string name)
    {
        if (t.DType != DType.F32) throw new ArgumentException($"{name} ({t.Describe()}) must be f32");
        return RawView(t, name).Cast<float>();
    }

    internal ArrayView<int> I32(Tensor t, string name)
    {
        if (t.DType != DType.I32) throw new ArgumentException($"{name} ({t.Describe()}) must be i32");
        return RawView(t, name).Cast<int>();
    }

    /// <summary>A float tensor of any float dtype (f32, bf16, f16).</summary>
    internal DeviceFloats Floats(Tensor t, string name) => t.DType switch
    {
        DType.F32 => new DeviceFloats(RawView(t, name).Cast<float>(), ArrayView<ushort>.Empty, DeviceFloats.KindF32),
        DType.BF16 => new DeviceFloats(ArrayView<float>.Empty, RawView(t, name).Cast<ushort>(), DeviceFloats.KindBF16),
        DType.F16 => new DeviceFloats(ArrayView<float>.Empty, RawView(t, name).Cast<ushort>(), DeviceFloats.KindF16),
        _ => throw new ArgumentException($"{name} ({t.Describe()}) must be a float tensor (f32, bf16 or f16)"),
    };

    /// <summary>A GGUF Q8_0/Q4_0 weight as the tensor-core matmul reads it (whole blocks, no partial-block views).</summary>
    internal DeviceFloats QuantWeight(Tensor t, string name)
    {
        if (!t.DType.IsBlockQuantized()) throw new ArgumentException($"{name} ({t.Describe()}) must be q8_0 or q4_0");
        if (t.Offset % 32 != 0) throw new ArgumentException($"{name} ({t.Describe()}) starts inside a block");
        return new DeviceFloats(ArrayView<float>.Empty, RawView(t, name).Cast<ushort>(), t.DType == DType.Q8_0 ? DeviceFloats.KindQ8_0 : DeviceFloats.KindQ4_0);
    }

    /// <summary>A weight: f32 or bf16 (f16 also accepted).</summary>
    internal DeviceFloats Weight(Tensor t, string name) => Floats(t, name);

    internal static void Need(Tensor t, long count, string name, string op)
    {
        if (t.Length != count)
            throw new ArgumentException($"{op}: {name} ({t.Describe()}) has {t.Length} elements, expected {count}");
    }

    internal static void Positive(string op, params ReadOnlySpan<(string Name, long Value)> sizes)
    {
        foreach (var (n, v) in sizes)
            if (v < 0) throw new ArgumentOutOfRangeException(n, $"{op}: {n} = {v} must not be negative");
    }

    internal static int CheckedCount(long n, string op)
    {
        if (n > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(n), $"{op}: {n} elements exceed one launch ({int.MaxValue})");
        return (int)n;
    }

    private ElementwiseKernels Ew => Kernels(b => new ElementwiseKernels(b));

    // ------------------------------------------------------------------ memory
    public Tensor Allocate(DType dtype, params int[] shape)
    {
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            long n = 1;
            foreach (int d in shape)
            {
                if (d < 0) throw new ArgumentException($"negative dimension in shape [{string.Join(", ", shape)}]");
                n *= d;
            }
            long bytes = Math.Max(4, (dtype.StorageBytes(n) + 3) / 4 * 4);
            var (chunk, offset) = _pool.Rent(bytes);
            var storage = new GpuStorage(this, chunk, offset, bytes);
            storage.View.MemSetToZero(Stream);
            return new Tensor(this, dtype, shape, storage, 0, storage);
        }
    }

    internal void Release(GpuStorage s)
    {
        lock (_gate)
        {
            if (!_disposed) _pool.Return(s.Chunk, s.Offset, s.Bytes);
        }
    }

    /// <summary>
    /// Reserves <paramref name="bytes"/> of device memory in one pool chunk now, so that the tensors allocated after
    /// this (optimizer state, training workspace) need no device allocation later: `ftn train` reserves what its memory
    /// plan says is still to come.
    /// </summary>
    public void Reserve(long bytes)
    {
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (bytes > 0) _pool.Reserve(bytes);
        }
    }

    /// <summary>Calls of the device allocator so far: pool chunks, the kernel sets' own scratch buffers and the pinned staging buffers.</summary>
    public long DeviceAllocations
    {
        get { lock (_gate) return _pool.DeviceAllocations + _scratchAllocations + (_staging?.Allocations ?? 0); }
    }

    /// <summary>
    /// Times the host blocked until the device had finished its queued work: every download, value-returning reduction
    /// and <see cref="Synchronize"/>, plus staging-ring waits when every staging buffer was still being copied. (The
    /// one-time table uploads of a kernel set's first launch, which ILGPU's synchronous copy does, are not counted.)
    /// </summary>
    public long BlockingSyncs
    {
        get { lock (_gate) return _hostWaits + (_staging?.HostWaits ?? 0); }
    }

    /// <summary>Blocks until the compute stream (and every staged copy it waits for) has drained; counted in <see cref="BlockingSyncs"/>.</summary>
    internal void WaitForDevice()
    {
        _hostWaits++;
        Stream.Synchronize();
    }

    /// <summary>Bytes the pool holds from the device, and bytes of it in live tensors.</summary>
    public (long Reserved, long Used) PoolBytes
    {
        get { lock (_gate) return (_pool.ReservedBytes, _pool.UsedBytes); }
    }

    /// <summary>A device buffer outside the pool for a kernel set's own scratch (tables, partial sums); counted.</summary>
    internal MemoryBuffer1D<T, Stride1D.Dense> AllocateScratch<T>(long length) where T : unmanaged
    {
        _scratchAllocations++;
        return Accelerator.Allocate1D<T>(length);
    }

    public void Upload(Tensor dst, ReadOnlySpan<float> src)
    {
        lock (_gate)
        {
            Need(dst, src.Length, "dst", "Upload");
            switch (dst.DType)
            {
                case DType.F32:
                    CopyIn(RawView(dst, "dst"), MemoryMarshal.AsBytes(src));
                    break;
                case DType.BF16:
                case DType.F16:
                    var h = new ushort[src.Length];
                    bool bf = dst.DType == DType.BF16;
                    for (int i = 0; i < h.Length; i++) h[i] = bf ? HalfBits.F32ToBf16(src[i]) : HalfBits.F32ToF16(src[i]);
                    CopyIn(RawView(dst, "dst"), MemoryMarshal.AsBytes(h.AsSpan()));
                    break;
                default:
                    throw new ArgumentException($"Upload: floats cannot go into {dst.Describe()}; use the int overload");
            }
        }
    }

    public void Upload(Tensor dst, ReadOnlySpan<int> src)
    {
        lock (_gate)
        {
            Need(dst, src.Length, "dst", "Upload");
            if (dst.DType != DType.I32) throw new ArgumentException($"Upload: ints need an i32 tensor, got {dst.Describe()}");
            CopyIn(RawView(dst, "dst"), MemoryMarshal.AsBytes(src));
            var s = StorageOf(dst, "dst");
            var summary = IntSummary.Of(src);
            s.Ints = dst.Offset == 0 && dst.Bytes >= s.Bytes ? summary : s.Ints?.Union(summary);
        }
    }

    public void UploadRaw(Tensor dst, ReadOnlySpan<byte> src)
    {
        lock (_gate)
        {
            if (src.Length != dst.Bytes) throw new ArgumentException($"UploadRaw: {src.Length} bytes for {dst.Describe()} ({dst.Bytes} bytes)");
            CopyIn(RawView(dst, "dst"), src);
            StorageOf(dst, "dst").Ints = null;
        }
    }

    // The host side of every copy is pinned for the copy's duration. ILGPU 1.5.3's CopyFromCPU/CopyToCPU(ref T, long)
    // overloads take a "pinned CPU buffer" (their doc comment): they wrap the reference with
    // CPUMemoryBuffer.Create(accelerator, ref T, long), which calls Unsafe.AsPointer, then allocate and lock before
    // the memcpy. An unpinned managed array that a GC (any thread's) compacts inside that window is copied to/from
    // its old address: the caller's array keeps its zeros (the parallel-test "read back all zeros" flake) or the
    // copy scribbles over a reused heap region (test host crashes). ILGPU's own Span overloads pin with `fixed`
    // before calling the same ref overload. Reproduced by IlgpuHostCopyTests (a thread forcing compacting GCs).
    // Copies are ordered on the streams like kernels, so none needs the device idle before it starts: a small upload
    // is staged (no wait at all), a large one or a download waits once, after its copy.
    private unsafe void CopyIn(ArrayView<byte> dst, ReadOnlySpan<byte> src)
    {
        if (src.Length == 0) return;
        if (BlockingCopies) WaitForDevice();
        if (src.Length <= StagedMaxBytes)
        {
            var slot = Staging().Acquire(src.Length);
            src.CopyTo(slot.Buffer.Span);
            StagedCopy(slot, dst);
            if (BlockingCopies) WaitForDevice();
            return;
        }
        fixed (byte* p = src)
        {
            dst.CopyFromCPUUnsafeAsync(Stream, ref *p, src.Length);
            WaitForDevice(); // the source is pageable and pinned only inside this block
        }
    }

    private unsafe void CopyOut(ArrayView<byte> src, Span<byte> dst)
    {
        if (dst.Length == 0)
        {
            WaitForDevice();
            return;
        }
        fixed (byte* p = dst)
        {
            src.CopyToCPUUnsafeAsync(Stream, ref *p, dst.Length);
            WaitForDevice();
        }
    }

    /// <summary>The staging ring, its copy stream and events, made on the first staged upload.</summary>
    private StagingRing Staging()
    {
        if (_staging is not null) return _staging;
        Func<IDeviceEvent> newEvent = EventsForTest ?? (Accelerator is CudaAccelerator ? () => new CudaDeviceEvent(Accelerator) : () => new CompletedEvent());
        _copyStream = Accelerator is CudaAccelerator cuda ? cuda.CreateStream(StreamFlags.CU_STREAM_NON_BLOCKING) : Accelerator.CreateStream();
        _computeMark = newEvent();
        return _staging = new StagingRing(bytes => new PageLockedBuffer(Accelerator, bytes), newEvent);
    }

    /// <summary>Tests: the events staged copies use instead of the accelerator's (set before the first upload).</summary>
    internal Func<IDeviceEvent>? EventsForTest { get; set; }

    /// <summary>The stream staged copies run on (null before the first staged upload).</summary>
    internal AcceleratorStream? CopyStream => _copyStream;

    /// <summary>
    /// Copies the first dst.Length bytes of a filled staging slot into <paramref name="dst"/> on the copy stream, ordered
    /// after every op enqueued so far (the copy stream waits for the compute stream's mark: earlier kernels may still read
    /// dst) and before every op enqueued later (the compute stream waits for the slot's copy event). The host does not wait.
    /// </summary>
    private void StagedCopy(StagingRing.Slot slot, ArrayView<byte> dst)
    {
        var copy = _copyStream!;
        _computeMark!.Record(Stream);
        _computeMark.MakeWait(copy);
        dst.CopyFromCPUUnsafeAsync(copy, ref MemoryMarshal.GetReference(slot.Buffer.Span), dst.Length);
        slot.Copied.Record(copy);
        slot.Copied.MakeWait(Stream);
        _staging!.Submitted(slot);
    }

    /// <summary>
    /// The first id of the i32 tensor <paramref name="ids"/> outside [0, <paramref name="bound"/>) that is not
    /// <paramref name="ignore"/>, or null when all are valid. Decided from what the host uploaded into the tensor when
    /// that is known (no device round trip: token ids and targets are checked before every launch that reads them);
    /// otherwise the ids are read back.
    /// </summary>
    internal (int Index, int Id)? FindBadId(Tensor ids, string name, long bound, int? ignore)
    {
        if (StorageOf(ids, name).Ints is { } known && known.AllIn(bound, ignore)) return null;
        var a = DownloadInts(ids, name);
        for (int i = 0; i < a.Length; i++)
            if (a[i] != ignore && (a[i] < 0 || a[i] >= bound)) return (i, a[i]);
        return null;
    }

    public void DownloadRaw(Tensor src, Span<byte> dst)
    {
        lock (_gate)
        {
            if (dst.Length != src.Bytes) throw new ArgumentException($"DownloadRaw: {dst.Length} bytes for {src.Describe()} ({src.Bytes} bytes)");
            CopyOut(RawView(src, "src"), dst);
        }
    }

    public void Download(Tensor src, Span<float> dst)
    {
        lock (_gate)
        {
            if (dst.Length != src.Length) throw new ArgumentException($"Download: {dst.Length} floats for {src.Describe()}");
            switch (src.DType)
            {
                case DType.F32:
                    CopyOut(RawView(src, "src"), MemoryMarshal.AsBytes(dst));
                    break;
                case DType.BF16:
                case DType.F16:
                    var h = new ushort[src.Length];
                    CopyOut(RawView(src, "src"), MemoryMarshal.AsBytes(h.AsSpan()));
                    bool bf = src.DType == DType.BF16;
                    for (int i = 0; i < h.Length; i++) dst[i] = bf ? HalfBits.Bf16ToF32(h[i]) : HalfBits.F16ToF32(h[i]);
                    break;
                default:
                    throw new ArgumentException($"Download: {src.Describe()} holds ints; use the int overload");
            }
        }
    }

    public void Download(Tensor src, Span<int> dst)
    {
        lock (_gate)
        {
            if (dst.Length != src.Length) throw new ArgumentException($"Download: {dst.Length} ints for {src.Describe()}");
            if (src.DType != DType.I32) throw new ArgumentException($"Download: ints need an i32 tensor, got {src.Describe()}");
            CopyOut(RawView(src, "src"), MemoryMarshal.AsBytes(dst));
        }
    }

    /// <summary>Host copy of an I32 tensor (synchronizing), for validating token ids before a launch.</summary>
    internal int[] DownloadInts(Tensor t, string name)
    {
        var a = new int[t.Length];
        CopyOut(I32(t, name).Cast<byte>(), MemoryMarshal.AsBytes(a.AsSpan()));
        return a;
    }

    public void Synchronize()
    {
        lock (_gate) WaitForDevice();
    }

    // ------------------------------------------------------------------ elementwise
    public void Fill(Tensor t, float value)
    {
        lock (_gate)
        {
            Ew.Fill(t, value);
            if (t.DType == DType.I32) StorageOf(t, "t").Ints = null;
        }
    }

    public void Copy(Tensor dst, Tensor src)
    {
        lock (_gate)
        {
            Ew.Copy(dst, src);
            if (dst.DType == DType.I32) StorageOf(dst, "dst").Ints = null;
        }
    }

    public void Add(Tensor dst, Tensor a, Tensor b)
    {
        lock (_gate) Ew.Add(dst, a, b);
    }

    public void Scale(Tensor t, float s)
    {
        lock (_gate) Ew.Scale(t, s);
    }

    public double SumOfSquares(Tensor t)
    {
        lock (_gate) return Kernels(b => new ReduceKernels(b)).SumOfSquares(t);
    }

    // ------------------------------------------------------------------ matmul
    private MatMulKernels Mm => Kernels(b => new MatMulKernels(b));

    public void MatMul(Tensor y, Tensor x, Tensor w, Tensor? bias, int m, int n, int k, bool accumulate)
    {
        lock (_gate) Mm.Forward(y, x, w, bias, m, n, k, accumulate);
    }

    /// <summary>y = residual + x·wᵀ [+ bias] with the add in the matmul's epilogue (<see cref="IBackend.MatMulResidual"/>).</summary>
    public void MatMulResidual(Tensor y, Tensor residual, Tensor x, Tensor w, Tensor? bias, int m, int n, int k)
    {
        lock (_gate) Mm.Forward(y, x, w, bias, m, n, k, accumulate: false, residual);
    }

    public void MatMulBackwardInput(Tensor dx, Tensor dy, Tensor w, int m, int n, int k, bool accumulate)
    {
        lock (_gate) Mm.BackwardInput(dx, dy, w, m, n, k, accumulate);
    }

    public void MatMulBackwardWeight(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k)
    {
        lock (_gate) Mm.BackwardWeight(dw, dBias, dy, x, m, n, k);
    }

    public void MatMulBackwardWeightBf16(Tensor dw, Tensor? dBias, Tensor dy, Tensor x, int m, int n, int k)
    {
        lock (_gate) Mm.BackwardWeight(dw, dBias, dy, x, m, n, k, bf16: true);
    }

    // ------------------------------------------------------------------ LoRA
    private LoraLinearKernels Lora => Kernels(b => new LoraLinearKernels(b));

    public void LoraLinearForward(Tensor y, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r)
    {
        lock (_gate) Lora.Forward(y, x, w, bias, lora, u, xDrop, m, n, k, r);
    }

    /// <summary>y = residual + the LoRA linear, the add in a matmul epilogue (<see cref="IBackend.LoraLinearForwardResidual"/>).</summary>
    public void LoraLinearForwardResidual(Tensor y, Tensor residual, Tensor x, Tensor w, Tensor? bias, LoraParams lora, Tensor u, Tensor? xDrop, int m, int n, int k, int r)
    {
        lock (_gate) Lora.Forward(y, x, w, bias, lora, u, xDrop, m, n, k, r, residual);
    }

    public void LoraLinearBackward(Tensor dx, Tensor dy, Tensor x, Tensor w, LoraParams lora, Tensor u, Tensor? xDrop, Tensor g,
        Tensor dA, Tensor dB, Tensor? dW, Tensor? dBias, int m, int n, int k, int r, bool accumulate)
    {
        lock (_gate) Lora.Backward(dx, dy, x, w, lora, u, xDrop, g, dA, dB, dW, dBias, m, n, k, r, accumulate);
    }

    // ------------------------------------------------------------------ DoRA (Dora.cs)
    private DoraKernels Dora => Kernels(b => new DoraKernels(b));

    public void DoraWeightNorm(Tensor norm, Tensor w, Tensor a, Tensor b, float scale, int n, int k, int r)
    {
        lock (_gate) Dora.WeightNorm(norm, w, a, b, scale, n, k, r);
    }

    public void DoraScale(Tensor y, Tensor z, Tensor magnitude, Tensor norm, Tensor? bias, int m, int n)
    {
        lock (_gate) Dora.Scale(y, z, magnitude, norm, bias, m, n);
    }

    public void DoraScaleBackward(Tensor dz, Tensor dMagnitude, Tensor dy, Tensor z, Tensor magnitude, Tensor norm, int m, int n)
    {
        lock (_gate) Dora.ScaleBackward(dz, dMagnitude, dy, z, magnitude, norm, m, n);
    }

    public void DropoutBackward(Tensor dInput, Tensor dOut, float dropout, ulong seed, long count)
    {
        lock (_gate) Dora.DropoutBackward(dInput, dOut, dropout, seed, count);
    }

    public void NeftuneNoise(Tensor x, Tensor lengths, float alpha, int batch, int seqLen, int hidden, int offset, ulong seed)
    {
        lock (_gate) Kernels(b => new NeftuneKernels(b)).Add(x, lengths, alpha, batch, seqLen, hidden, offset, seed);
    }

    // ------------------------------------------------------------------ norm, rope, activation
    private RmsNormKernels Norm => Kernels(b => new RmsNormKernels(b));

    public void RmsNormForward(Tensor y, Tensor rstd, Tensor x, Tensor w, int m, int c, float eps)
    {
        lock (_gate) Norm.Forward(y, rstd, x, w, m, c, eps);
    }

    public void RmsNormBackward(Tensor dx, Tensor dw, Tensor dy, Tensor x, Tensor w, Tensor rstd, int m, int c, bool accumulate)
    {
        lock (_gate) Norm.Backward(dx, dw, dy, x, w, rstd, m, c, accumulate);
    }

    public void Rope(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse)
    {
        lock (_gate) Kernels(b => new RopeKernels(b)).Apply(x, positions, m, nHeads, headSize, theta, layout, inverse);
    }

    public void RopeInto(Tensor dst, Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout)
    {
        lock (_gate) Kernels(b => new RopeKernels(b)).ApplyInto(dst, x, positions, m, nHeads, headSize, theta, layout);
    }

    private SwiGluKernels Glu => Kernels(b => new SwiGluKernels(b));

    public void SwiGluForward(Tensor h, Tensor gate, Tensor up, long count)
    {
        lock (_gate) Glu.Forward(h, gate, up, count);
    }

    public void SwiGluBackward(Tensor dGate, Tensor dUp, Tensor dh, Tensor gate, Tensor up, long count)
    {
        lock (_gate) Glu.Backward(dGate, dUp, dh, gate, up, count);
    }

    // ------------------------------------------------------------------ attention
    private AttentionKernels Attn => Kernels(b => new AttentionKernels(b));

    public void AttentionForward(Tensor output, Tensor? lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, float scale)
    {
        lock (_gate) Attn.Forward(output, lse, q, k, v, batch, tq, tkv, kvLen, nHeads, nKvHeads, headSize, scale);
    }

    public void AttentionBackward(Tensor dq, Tensor dk, Tensor dv, Tensor dOut, Tensor output, Tensor lse, Tensor q, Tensor k, Tensor v,
        int batch, int tq, int tkv, int nHeads, int nKvHeads, int headSize, float scale)
    {
        lock (_gate) Attn.Backward(dq, dk, dv, dOut, output, lse, q, k, v, batch, tq, tkv, nHeads, nKvHeads, headSize, scale);
    }

    // ------------------------------------------------------------------ embedding, loss, optimizer
    private EmbeddingKernels Emb => Kernels(b => new EmbeddingKernels(b));

    public void EmbeddingForward(Tensor output, Tensor tokens, Tensor table, int m, int c)
    {
        lock (_gate) Emb.Forward(output, tokens, table, m, c);
    }

    public void EmbeddingBackward(Tensor dTable, Tensor dOut, Tensor tokens, int m, int c)
    {
        lock (_gate) Emb.Backward(dTable, dOut, tokens, m, c);
    }

    public void CrossEntropy(Tensor logits, Tensor targets, Tensor losses, int m, int v, int ignoreIndex, float gradScale, bool computeGrad)
    {
        lock (_gate) Kernels(b => new CrossEntropyKernels(b)).Run(logits, targets, losses, m, v, ignoreIndex, gradScale, computeGrad);
    }

    public void AdamW(Tensor param, Tensor grad, Tensor m, Tensor v, float lr, float beta1, float beta2, float eps, float weightDecay, int step, float gradScale)
    {
        lock (_gate) Kernels(b => new AdamWKernels(b)).Step(param, grad, m, v, lr, beta1, beta2, eps, weightDecay, step, gradScale);
    }

    public void GradNormClip(IReadOnlyList<Tensor> grads, Tensor clip, float maxNorm)
    {
        lock (_gate) Kernels(b => new ReduceKernels(b)).GradNormClip(grads, clip, maxNorm);
    }

    public void AdamWMultiTensor(IReadOnlyList<AdamWTensor> tensors, AdamWHyper hyper, Tensor clip)
    {
        lock (_gate) Kernels(b => new AdamWKernels(b)).MultiTensorStep(tensors, hyper, clip);
    }

    /// <summary>Launches of the last multi-tensor AdamW and gradient-norm partial-sum calls (tests: 1 each once pooled).</summary>
    internal (int AdamW, int Norm) LastMultiTensorLaunches
    {
        get { lock (_gate) return (Kernels(b => new AdamWKernels(b)).LastLaunches, Kernels(b => new ReduceKernels(b)).LastNormLaunches); }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            if (_disposed) return;
            _disposed = true;
            if (_staging is not null)
            {
                Stream.Synchronize(); // no copy may still read a staging buffer
                _staging.Dispose();
                _computeMark?.Dispose();
                _copyStream?.Dispose();
            }
            foreach (var set in _kernelSets.Values) (set as IDisposable)?.Dispose();
            _kernelSets.Clear();
            _pool.Dispose();
            Accelerator.Dispose();
            _context.Dispose();
        }
    }
}
