using System.Runtime.InteropServices;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// The CPU backend: tensors in 64-byte-aligned native memory, ops vectorised with Vector512/Vector256 and spread
/// over a persistent thread pool. Every op validates its tensors (backend, dtype, element count) before touching
/// memory and names the offending tensor.
/// </summary>
/// <remarks>
/// Ops may be called from several threads: each op holds the backend's lock, so they run one at a time (each on
/// all of the pool's threads). Ops are synchronous; <see cref="Synchronize"/> is a no-op.
/// </remarks>
public sealed unsafe partial class CpuBackend : IBackend
{
    private readonly CpuThreadPool _pool;
    // One op at a time per backend: ops share the pool and the per-thread scratch (tests and servers call from many threads).
    private readonly Lock _opLock = new();
    private float* _scratch;
    private long _scratchPerThread; // floats
    private bool _disposed;

    /// <param name="threads">worker threads including the caller; 0 = Environment.ProcessorCount.</param>
    public CpuBackend(int threads = 0)
    {
        if (threads < 0) throw new ArgumentOutOfRangeException(nameof(threads), threads, "threads must be >= 0 (0 = all cores)");
        _pool = new CpuThreadPool(threads == 0 ? Environment.ProcessorCount : threads);
    }

    public string Name => "cpu";

    /// <summary>Threads used by every op (the caller included).</summary>
    public int Threads => _pool.Threads;

    internal CpuThreadPool Pool => _pool;

    // ---------------------------------------------------------------- memory

    public Tensor Allocate(DType dtype, params int[] shape)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long n = 1;
        foreach (int d in shape)
        {
            if (d < 0) throw new ArgumentException($"negative dimension in shape [{string.Join(", ", shape)}]");
            n *= d;
        }
        var storage = new CpuStorage(dtype.StorageBytes(n));
        return new Tensor(this, dtype, shape, storage, 0, storage);
    }

    /// <summary>
    /// A tensor over existing host memory (no copy), e.g. a memory-mapped safetensors payload. The memory must stay
    /// valid until the tensor is disposed; disposing the tensor disposes <paramref name="owner"/> (when given).
    /// Alignment is not required.
    /// </summary>
    public Tensor WrapExternal(DType dtype, int[] shape, IntPtr data, IDisposable? owner)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (data == IntPtr.Zero) throw new ArgumentException("WrapExternal: null data pointer", nameof(data));
        long n = 1;
        foreach (int d in shape) n *= d;
        var storage = new CpuStorage((byte*)data, dtype.StorageBytes(n), owner);
        return new Tensor(this, dtype, shape, storage, 0, storage);
    }

    public void Upload(Tensor dst, ReadOnlySpan<float> src)
    {
        byte* p = Ptr(dst, nameof(dst));
        if (src.Length != dst.Length) throw new ArgumentException($"Upload: {src.Length} floats for {dst.Describe()} ({dst.Length} elements)");
        switch (dst.DType)
        {
            case DType.F32: src.CopyTo(new Span<float>(p, src.Length)); break;
            case DType.BF16: HalfConvert.F32ToBf16(src, new Span<ushort>(p, src.Length)); break;
            case DType.F16: HalfConvert.F32ToF16(src, new Span<ushort>(p, src.Length)); break;
            default: throw new ArgumentException($"Upload: cannot write floats into {dst.Describe()}");
        }
    }

    public void Upload(Tensor dst, ReadOnlySpan<int> src)
    {
        byte* p = Ptr(dst, nameof(dst));
        if (dst.DType != DType.I32) throw new ArgumentException($"Upload: ints need an i32 tensor, got {dst.Describe()}");
        if (src.Length != dst.Length) throw new ArgumentException($"Upload: {src.Length} ints for {dst.Describe()} ({dst.Length} elements)");
        src.CopyTo(new Span<int>(p, src.Length));
    }

    public void UploadRaw(Tensor dst, ReadOnlySpan<byte> src)
    {
        byte* p = Ptr(dst, nameof(dst));
        if (src.Length != dst.Bytes) throw new ArgumentException($"UploadRaw: {src.Length} bytes for {dst.Describe()} ({dst.Bytes} bytes)");
        src.CopyTo(new Span<byte>(p, src.Length));
    }

    public void DownloadRaw(Tensor src, Span<byte> dst)
    {
        byte* p = Ptr(src, nameof(src));
        if (dst.Length != src.Bytes) throw new ArgumentException($"DownloadRaw: {dst.Length} bytes for {src.Describe()} ({src.Bytes} bytes)");
        new ReadOnlySpan<byte>(p, dst.Length).CopyTo(dst);
    }

    public void Download(Tensor src, Span<float> dst)
    {
        byte* p = Ptr(src, nameof(src));
        if (dst.Length != src.Length) throw new ArgumentException($"Download: {dst.Length} floats for {src.Describe()} ({src.Length} elements)");
        switch (src.DType)
        {
            case DType.F32: new ReadOnlySpan<float>(p, dst.Length).CopyTo(dst); break;
            case DType.BF16: HalfConvert.Bf16ToF32(new ReadOnlySpan<ushort>(p, dst.Length), dst); break;
            case DType.F16: HalfConvert.F16ToF32(new ReadOnlySpan<ushort>(p, dst.Length), dst); break;
            default: throw new ArgumentException($"Download: cannot read floats from {src.Describe()}");
        }
    }

    public void Download(Tensor src, Span<int> dst)
    {
        byte* p = Ptr(src, nameof(src));
        if (src.DType != DType.I32) throw new ArgumentException($"Download: ints need an i32 tensor, got {src.Describe()}");
        if (dst.Length != src.Length) throw new ArgumentException($"Download: {dst.Length} ints for {src.Describe()} ({src.Length} elements)");
        new ReadOnlySpan<int>(p, dst.Length).CopyTo(dst);
    }

    public void Synchronize() => ObjectDisposedException.ThrowIf(_disposed, this);

    public void Dispose()
    {
        using var opScope = _opLock.EnterScope();
        if (_disposed) return;
        _disposed = true;
        _pool.Dispose();
        if (_scratch != null) NativeMemory.AlignedFree(_scratch);
        _scratch = null;
        if (_attnD != null) NativeMemory.AlignedFree(_attnD);
        _attnD = null;
        if (_attnWide != null) NativeMemory.AlignedFree(_attnWide);
        _attnWide = null;
        FreeGemmBuffers();
    }

    // ---------------------------------------------------------------- validation and pointers

    /// <summary>The address of element 0 of <paramref name="t"/>, after checking it lives on a CPU backend.</summary>
    internal byte* Ptr(Tensor t, string name)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (t is null) throw new ArgumentNullException(name);
        if (t.Storage is not CpuStorage s)
            throw new ArgumentException($"{name}: {t.Describe()} lives on backend '{t.Backend.Name}', not on the cpu backend", name);
        if (s.IsDisposed) throw new ObjectDisposedException(name, $"{name}: {t.Describe()} was disposed");
        return t.Offset == 0 ? s.Pointer : s.Pointer + t.DType.StorageBytes(t.Offset); // NF4 tensors have no offset (no views)
    }

    private static void CheckLength(Tensor t, long needed, string name, string op)
    {
        if (t.Length < needed)
            throw new ArgumentException($"{op}: {name} {t.Describe()} has {t.Length} elements, needs {needed}", name);
    }

    internal float* F32(Tensor t, long needed, string name, string op)
    {
        byte* p = Ptr(t, name);
        if (t.DType != DType.F32) throw new ArgumentException($"{op}: {name} {t.Describe()} must be f32", name);
        CheckLength(t, needed, name, op);
        return (float*)p;
    }

    internal int* I32(Tensor t, long needed, string name, string op)
    {
        byte* p = Ptr(t, name);
        if (t.DType != DType.I32) throw new ArgumentException($"{op}: {name} {t.Describe()} must be i32", name);
        CheckLength(t, needed, name, op);
        return (int*)p;
    }

    /// <summary>A matmul weight: f32 or bf16 (converted on the fly).</summary>
    internal void* Weight(Tensor t, long needed, string name, string op, out bool bf16)
    {
        byte* p = Ptr(t, name);
        if (t.DType != DType.F32 && t.DType != DType.BF16)
            throw new ArgumentException($"{op}: {name} {t.Describe()} must be f32 or bf16", name);
        CheckLength(t, needed, name, op);
        bf16 = t.DType == DType.BF16;
        return p;
    }

    internal static void Dims(string op, params ReadOnlySpan<(string Name, long Value)> dims)
    {
        foreach (var (n, v) in dims)
            if (v < 0) throw new ArgumentOutOfRangeException(n, v, $"{op}: {n} must be >= 0");
    }

    /// <summary>Per-thread scratch of at least <paramref name="floats"/> floats (grows once, then reused).</summary>
    internal void EnsureScratch(long floats)
    {
        floats = (floats + 15) & ~15L;
        if (floats <= _scratchPerThread) return;
        if (_scratch != null) NativeMemory.AlignedFree(_scratch);
        _scratch = (float*)NativeMemory.AlignedAlloc((nuint)(floats * _pool.Threads * sizeof(float)), 64);
        _scratchPerThread = floats;
    }

    internal float* Scratch(int worker) => _scratch + worker * _scratchPerThread;
    internal float* ScratchBase => _scratch;
    internal long ScratchStride => _scratchPerThread;
}
