using System.IO.MemoryMappedFiles;

namespace FineTuneNative.Runtime.IO;

/// <summary>
/// A whole file mapped into memory copy-on-write (the file is opened read-only and never modified; a page
/// written through the mapping becomes private), with a reference count: the mapping stays alive while the
/// opener or any tensor wrapping its bytes (zero-copy weights) still holds a reference.
/// </summary>
public sealed unsafe class MappedFile : IDisposable
{
    private readonly MemoryMappedFile _map;
    private readonly MemoryMappedViewAccessor _view;
    private readonly byte* _base;
    private int _refs = 1;
    private bool _openerReleased;

    private MappedFile(string path, long length, MemoryMappedFile map, MemoryMappedViewAccessor view, byte* basePtr)
    {
        Path = path;
        Length = length;
        _map = map;
        _view = view;
        _base = basePtr;
    }

    public string Path { get; }
    public long Length { get; }

    /// <summary>Maps <paramref name="path"/>. Throws <see cref="InvalidDataException"/> for an empty file.</summary>
    public static MappedFile Open(string path)
    {
        var info = new FileInfo(path);
        if (!info.Exists) throw new FileNotFoundException($"{path}: file not found", path);
        long length = info.Length;
        if (length == 0) throw new InvalidDataException($"{path}: file is empty");
        var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        MemoryMappedFile map;
        try { map = MemoryMappedFile.CreateFromFile(fs, null, 0, MemoryMappedFileAccess.CopyOnWrite, HandleInheritability.None, leaveOpen: false); }
        catch { fs.Dispose(); throw; }
        MemoryMappedViewAccessor? view = null;
        try
        {
            view = map.CreateViewAccessor(0, 0, MemoryMappedFileAccess.CopyOnWrite);
            byte* p = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            p += view.PointerOffset;
            return new MappedFile(path, length, map, view, p);
        }
        catch
        {
            view?.Dispose();
            map.Dispose();
            throw;
        }
    }

    /// <summary>Pointer to byte <paramref name="offset"/> of the file.</summary>
    public byte* Pointer(long offset)
    {
        if (offset < 0 || offset > Length) throw new ArgumentOutOfRangeException(nameof(offset), $"{Path}: offset {offset} outside the file ({Length} bytes)");
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _refs) <= 0, this);
        return _base + offset;
    }

    /// <summary>A span over [offset, offset + length) (length must fit an int).</summary>
    public ReadOnlySpan<byte> Span(long offset, long length)
    {
        if (length < 0 || offset < 0 || offset + length > Length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"{Path}: range [{offset}, {offset + length}) outside the file ({Length} bytes)");
        if (length > int.MaxValue) throw new ArgumentOutOfRangeException(nameof(length), $"{Path}: range of {length} bytes is too large for one span");
        return new ReadOnlySpan<byte>(Pointer(offset), (int)length);
    }

    /// <summary>Takes a reference that keeps the mapping alive until the returned lease is disposed.</summary>
    public IDisposable Lease()
    {
        while (true)
        {
            int r = Volatile.Read(ref _refs);
            ObjectDisposedException.ThrowIf(r <= 0, this);
            if (Interlocked.CompareExchange(ref _refs, r + 1, r) == r) return new LeaseHandle(this);
        }
    }

    private void Release()
    {
        if (Interlocked.Decrement(ref _refs) == 0)
        {
            _view.SafeMemoryMappedViewHandle.ReleasePointer();
            _view.Dispose();
            _map.Dispose();
        }
    }

    /// <summary>Releases the opener's reference (the mapping closes when no lease remains).</summary>
    public void Dispose()
    {
        if (_openerReleased) return;
        _openerReleased = true;
        Release();
    }

    private sealed class LeaseHandle : IDisposable
    {
        private MappedFile? _file;
        public LeaseHandle(MappedFile file) => _file = file;
        public void Dispose() => Interlocked.Exchange(ref _file, null)?.Release();
    }
}
