using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>One device buffer of a <see cref="DevicePool"/> that tensors are carved out of.</summary>
internal sealed class PoolChunk
{
    public PoolChunk(MemoryBuffer1D<byte, Stride1D.Dense> buffer, bool dedicated)
    {
        Buffer = buffer;
        Dedicated = dedicated;
        Free.Add((0, buffer.Length));
    }

    public MemoryBuffer1D<byte, Stride1D.Dense> Buffer { get; }
    public long Size => Buffer.Length;
    /// <summary>Holds one large tensor only and is released when that tensor is.</summary>
    public bool Dedicated { get; }
    /// <summary>Free ranges (byte offset, bytes), sorted by offset, never adjacent (coalesced).</summary>
    public List<(long Offset, long Bytes)> Free { get; } = new();
    public long Live { get; set; }
}

/// <summary>
/// The device memory of one <see cref="IlgpuBackend"/>: a few large buffers (chunks) that tensors are sub-allocated
/// from, so that the device allocator is called only when a chunk is added and never inside a training step once the
/// pool has been reserved (<see cref="Reserve"/>, sized from the memory plan). A kernel addresses a tensor as its
/// chunk's view plus an offset: the multi-tensor ops (AdamW, gradient norm) take up to 8 chunk views per launch
/// (MultiTensorBases), so the few chunks a trainer's tensors span cost no extra launch. Large tensors would each get a
/// chunk of their own, so whoever allocates many of them for one launch reserves their total first: the full fine-tune's
/// writable weights (FullFineTune.CloneWritable), its gradients and f32 masters (FullFineTune), the optimizer moments
/// (Trainer, Pretrainer), each as one range (LlamaWeights.AllocationBytes).
/// </summary>
/// <remarks>
/// First fit over each chunk's sorted free list, ranges aligned to <see cref="Alignment"/> bytes (a CUDA allocation's
/// own alignment, so 16-byte vector loads and cp.async stay legal inside any tensor); freed ranges coalesce with their
/// neighbours. A request larger than half a default chunk gets a dedicated chunk (model weights), released with its
/// tensor. Not thread-safe: the backend's lock serializes every call.
/// Reuse of a freed range is ordered on the device by the backend's single compute stream (the zero fill of the new
/// tensor is enqueued after every kernel that read the old one).
/// </remarks>
internal sealed class DevicePool : IDisposable
{
    public const long Alignment = 256;

    private readonly Accelerator _accelerator;
    private readonly List<PoolChunk> _chunks = new();

    public DevicePool(Accelerator accelerator, long chunkBytes)
    {
        _accelerator = accelerator;
        ChunkBytes = Align(chunkBytes);
    }

    /// <summary>Size of a shared chunk added when no chunk has room.</summary>
    public long ChunkBytes { get; }

    /// <summary>Calls of the device allocator so far (a chunk each): a training step must not add any.</summary>
    public long DeviceAllocations { get; private set; }

    /// <summary>Bytes held from the device (all chunks).</summary>
    public long ReservedBytes => _chunks.Sum(c => c.Size);

    /// <summary>Bytes handed out to live tensors.</summary>
    public long UsedBytes => _chunks.Sum(c => c.Live);

    private static long Align(long bytes) => (Math.Max(bytes, 1) + Alignment - 1) / Alignment * Alignment;

    /// <summary>A range of <paramref name="bytes"/> bytes (contents undefined): the chunk and the byte offset in it.</summary>
    public (PoolChunk Chunk, long Offset) Rent(long bytes)
    {
        long size = Align(bytes);
        foreach (var c in _chunks)
            if (!c.Dedicated && TryTake(c, size) is long off) return (c, off);
        bool dedicated = size > ChunkBytes / 2;
        var chunk = AddChunk(dedicated ? size : ChunkBytes, dedicated);
        return (chunk, TryTake(chunk, size)!.Value);
    }

    /// <summary>Gives a range back; a dedicated chunk is released to the device.</summary>
    public void Return(PoolChunk chunk, long offset, long bytes)
    {
        long size = Align(bytes);
        chunk.Live -= size;
        if (chunk.Dedicated)
        {
            _chunks.Remove(chunk);
            chunk.Buffer.Dispose();
            return;
        }
        var free = chunk.Free;
        int i = 0;
        while (i < free.Count && free[i].Offset < offset) i++;
        free.Insert(i, (offset, size));
        if (i + 1 < free.Count && free[i].Offset + free[i].Bytes == free[i + 1].Offset)
        {
            free[i] = (free[i].Offset, free[i].Bytes + free[i + 1].Bytes);
            free.RemoveAt(i + 1);
        }
        if (i > 0 && free[i - 1].Offset + free[i - 1].Bytes == free[i].Offset)
        {
            free[i - 1] = (free[i - 1].Offset, free[i - 1].Bytes + free[i].Bytes);
            free.RemoveAt(i);
        }
    }

    /// <summary>
    /// Makes sure at least <paramref name="bytes"/> more can be rented from one shared chunk without calling the device
    /// allocator: adds one chunk of that size when no chunk has such a free range. Returns whether a chunk was added.
    /// </summary>
    public bool Reserve(long bytes)
    {
        long size = Align(bytes);
        foreach (var c in _chunks)
            if (!c.Dedicated && c.Free.Any(f => f.Bytes >= size)) return false;
        // The reservation becomes the first chunk searched, so everything rented from now on lands in it.
        var chunk = AddChunk(Math.Max(size, ChunkBytes), dedicated: false);
        _chunks.Remove(chunk);
        _chunks.Insert(0, chunk);
        return true;
    }

    private PoolChunk AddChunk(long size, bool dedicated)
    {
        var chunk = new PoolChunk(_accelerator.Allocate1D<byte>(size), dedicated);
        DeviceAllocations++;
        _chunks.Add(chunk);
        return chunk;
    }

    private static long? TryTake(PoolChunk c, long size)
    {
        var free = c.Free;
        for (int i = 0; i < free.Count; i++)
        {
            var (off, len) = free[i];
            if (len < size) continue;
            if (len == size) free.RemoveAt(i);
            else free[i] = (off + size, len - size);
            c.Live += size;
            return off;
        }
        return null;
    }

    public void Dispose()
    {
        foreach (var c in _chunks) c.Buffer.Dispose();
        _chunks.Clear();
    }
}
