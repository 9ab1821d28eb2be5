using System.Runtime.InteropServices;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// The storage root of CPU tensors: a block of native memory, 64-byte aligned when allocated here (one cache line,
/// one Vector512), or an external block (a memory-mapped file) kept alive by its owner.
/// </summary>
internal sealed unsafe class CpuStorage : IDisposable
{
    private IDisposable? _externalOwner;
    private readonly bool _owns;

    public CpuStorage(long bytes)
    {
        Bytes = bytes;
        Pointer = (byte*)NativeMemory.AlignedAlloc((nuint)Math.Max(bytes, 64), 64);
        NativeMemory.Clear(Pointer, (nuint)Math.Max(bytes, 64));
        _owns = true;
    }

    public CpuStorage(byte* pointer, long bytes, IDisposable? owner)
    {
        Pointer = pointer;
        Bytes = bytes;
        _externalOwner = owner;
        _owns = false;
        GC.SuppressFinalize(this);
    }

    public byte* Pointer { get; private set; }
    public long Bytes { get; }
    public bool IsDisposed => Pointer == null;

    public void Dispose()
    {
        Release();
        GC.SuppressFinalize(this);
    }

    private void Release()
    {
        if (Pointer == null) return;
        if (_owns) NativeMemory.AlignedFree(Pointer);
        Pointer = null;
        _externalOwner?.Dispose();
        _externalOwner = null;
    }

    // Views keep the storage object reachable, so the finalizer runs only once no tensor can reach the memory.
    ~CpuStorage() { if (_owns) Release(); }
}
