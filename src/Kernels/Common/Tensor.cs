namespace FineTuneNative.Kernels;

/// <summary>
/// A dense, row-major, contiguous block of elements that lives on one <see cref="IBackend"/>.
/// A tensor is either the owner of its storage or a view (<see cref="Slice"/>, <see cref="Reshape"/>) into
/// another tensor's storage; views never own memory and must not outlive their root.
/// </summary>
/// <remarks>
/// Backends keep their own storage object (<see cref="Storage"/>): a native pointer block on the CPU, an ILGPU
/// memory buffer on a GPU. <see cref="Offset"/> counts elements of <see cref="DType"/> from the start of that
/// storage. Model code never touches storage; it passes tensors to backend ops.
/// </remarks>
public sealed class Tensor : IDisposable
{
    private readonly IDisposable? _owner;
    private bool _disposed;

    public Tensor(IBackend backend, DType dtype, int[] shape, object storage, long offset, IDisposable? owner, string? name = null)
    {
        Backend = backend;
        DType = dtype;
        Shape = (int[])shape.Clone();
        Storage = storage;
        Offset = offset;
        _owner = owner;
        Name = name;
        long n = 1;
        foreach (int d in shape)
        {
            if (d < 0) throw new ArgumentException($"negative dimension in shape [{string.Join(", ", shape)}]");
            n *= d;
        }
        Length = n;
    }

    public IBackend Backend { get; }
    public DType DType { get; }
    public int[] Shape { get; }
    public long Length { get; }
    /// <summary>Backend-specific storage root (shared by all views of it).</summary>
    public object Storage { get; }
    /// <summary>Offset in elements from the start of <see cref="Storage"/>.</summary>
    public long Offset { get; }
    public string? Name { get; set; }
    public int Rank => Shape.Length;
    public long Bytes => DType.StorageBytes(Length);
    public bool IsView => _owner is null;

    public int Dim(int i) => Shape[i < 0 ? Shape.Length + i : i];

    /// <summary>Number of rows when viewed as a matrix whose columns are the last dimension.</summary>
    public long Rows => Shape.Length == 0 ? 1 : Length / Math.Max(1, Shape[^1]);

    /// <summary>Size of the last dimension.</summary>
    public int Cols => Shape.Length == 0 ? 1 : Shape[^1];

    /// <summary>A view of <paramref name="count"/> entries of the first dimension starting at <paramref name="start"/>.</summary>
    public Tensor Slice(int start, int count)
    {
        if (Shape.Length == 0) throw new InvalidOperationException("cannot slice a scalar");
        if (DType.IsWholeTensorFormat()) throw new InvalidOperationException($"cannot slice {Describe()}: an {DType.Name()} tensor has no views");
        if (start < 0 || count < 0 || start + count > Shape[0])
            throw new ArgumentOutOfRangeException(nameof(start), $"slice [{start}, {start + count}) of dimension {Shape[0]} ({Describe()})");
        long inner = Shape[0] == 0 ? 0 : Length / Shape[0];
        var shape = (int[])Shape.Clone();
        shape[0] = count;
        return new Tensor(Backend, DType, shape, Storage, Offset + start * inner, null, Name);
    }

    /// <summary>A view with the same elements and a new shape (one dimension may be -1).</summary>
    public Tensor Reshape(params int[] shape)
    {
        var s = (int[])shape.Clone();
        int infer = Array.IndexOf(s, -1);
        long known = 1;
        for (int i = 0; i < s.Length; i++) if (i != infer) known *= s[i];
        if (infer >= 0) s[infer] = known == 0 ? 0 : (int)(Length / known);
        long n = 1;
        foreach (int d in s) n *= d;
        if (n != Length) throw new ArgumentException($"cannot reshape {Describe()} to [{string.Join(", ", shape)}]");
        return new Tensor(Backend, DType, s, Storage, Offset, null, Name);
    }

    /// <summary>A view of a flat element range [start, start+count) with the given shape.</summary>
    public Tensor View(long start, params int[] shape)
    {
        if (DType.IsWholeTensorFormat()) throw new InvalidOperationException($"cannot view {Describe()}: an {DType.Name()} tensor has no views");
        long n = 1;
        foreach (int d in shape) n *= d;
        if (start < 0 || start + n > Length) throw new ArgumentOutOfRangeException(nameof(start), $"view [{start}, {start + n}) of {Describe()}");
        return new Tensor(Backend, DType, shape, Storage, Offset + start, null, Name);
    }

    public string Describe() => $"{Name ?? "tensor"} {DType.Name()}[{string.Join(", ", Shape)}]";

    public override string ToString() => Describe();

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _owner?.Dispose();
    }

    // Convenience for tests and host code.
    public float[] ToArray()
    {
        var a = new float[Length];
        Backend.Download(this, a);
        return a;
    }

    public int[] ToIntArray()
    {
        var a = new int[Length];
        Backend.Download(this, a);
        return a;
    }
}
