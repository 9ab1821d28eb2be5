using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// One tensor of a multi-tensor launch, as element offsets from the launch's base views (one pool chunk per operand
/// role): P, G, M, V in floats, R (the rounded copy) in 16-bit elements.
/// </summary>
public struct MultiTensorEntry
{
    public long P, G, M, V, R;
    /// <summary>1 when weight decay applies to this tensor, else 0 (the table does not depend on the hyper-parameters).</summary>
    public float Decay;
    /// <summary>0: no rounded copy; else <see cref="DeviceFloats.KindBF16"/> or <see cref="DeviceFloats.KindF16"/>.</summary>
    public int RoundKind;
}

/// <summary>A slice of one tensor that one group processes: elements [Start, Start + Count) of entry <see cref="Entry"/>.</summary>
public struct MultiTensorChunk
{
    public long Start;
    public int Entry;
    public int Count;
}

/// <summary>
/// The device-side table of a multi-tensor launch (apex's multi_tensor_apply, without its fixed-size argument blocks):
/// the tensors of a list grouped by the pool chunks their operands live in, one launch per group (one group once the
/// pool is reserved: everything trainable then shares one chunk), each with its entries and the work chunks that
/// split every tensor into slices of <see cref="SliceElements"/>. Built on the first call with a given list and reused
/// while the list holds the same tensors (compared element by element, no allocation), so a training step uploads
/// nothing and allocates nothing.
/// </summary>
internal sealed class MultiTensorTable : IDisposable
{
    /// <summary>Elements per work chunk: 16K floats = 64 KiB of each operand per group visit.</summary>
    public const int SliceElements = 1 << 14;

    public sealed class Launch
    {
        public required PoolChunk?[] Bases;               // P, G, M, V, R chunks (R may be null); for a norm only G
        public required MemoryBuffer1D<MultiTensorEntry, Stride1D.Dense> Entries;
        public required MemoryBuffer1D<MultiTensorChunk, Stride1D.Dense> Chunks;
        public int ChunkCount => (int)Chunks.Length;
    }

    public List<Launch> Launches { get; } = new();

    /// <summary>
    /// Groups of one launch: every work chunk its own group up to 8 per multiprocessor (a 256-thread group, 2048
    /// threads per SM on sm_80/sm_90); the simulator runs groups one after another, so a few suffice there.
    /// </summary>
    public static int Groups(IlgpuBackend b, int chunks) =>
        Math.Max(1, Math.Min(chunks, b.Accelerator.AcceleratorType == AcceleratorType.CPU ? 4 : 8 * b.Accelerator.NumMultiprocessors));

    /// <summary>
    /// Groups <paramref name="count"/> tensors by the chunks of their operands and uploads their tables.
    /// <paramref name="operands"/>(i) gives tensor i's (P, G, M, V, R) tensors (null where a role is unused),
    /// <paramref name="decay"/>(i) its weight decay.
    /// </summary>
    public static MultiTensorTable Build(IlgpuBackend b, int count, Func<int, Tensor?[]> operands, Func<int, float> decay, string op)
    {
        var table = new MultiTensorTable();
        var groups = new List<(PoolChunk?[] Key, List<MultiTensorEntry> Entries, List<MultiTensorChunk> Chunks)>();
        for (int i = 0; i < count; i++)
        {
            var ops = operands(i);
            var key = new PoolChunk?[ops.Length];
            var offsets = new long[ops.Length];
            long length = -1;
            int roundKind = 0;
            for (int r = 0; r < ops.Length; r++)
            {
                if (ops[r] is not { } t) continue;
                var (chunk, byteOffset) = b.Placement(t, $"{op} tensor {i}");
                long size = t.DType.SizeOf();
                if (byteOffset % size != 0) throw new ArgumentException($"{op}: {t.Describe()} is not aligned to its element size");
                key[r] = chunk;
                offsets[r] = byteOffset / size;
                if (length < 0) length = t.Length;
                if (r == 4) roundKind = t.DType == DType.BF16 ? DeviceFloats.KindBF16 : DeviceFloats.KindF16;
            }
            if (length < 0) throw new ArgumentException($"{op}: tensor {i} has no operand");
            int g = groups.FindIndex(x => SameKey(x.Key, key));
            if (g < 0)
            {
                groups.Add((key, new List<MultiTensorEntry>(), new List<MultiTensorChunk>()));
                g = groups.Count - 1;
            }
            var (gKey, entries, chunks) = groups[g];
            for (int r = 0; r < key.Length; r++) gKey[r] ??= key[r];
            entries.Add(new MultiTensorEntry
            {
                P = offsets.Length > 0 ? offsets[0] : 0, G = offsets.Length > 1 ? offsets[1] : 0,
                M = offsets.Length > 2 ? offsets[2] : 0, V = offsets.Length > 3 ? offsets[3] : 0, R = offsets.Length > 4 ? offsets[4] : 0,
                Decay = decay(i), RoundKind = roundKind,
            });
            for (long s = 0; s < length; s += SliceElements)
                chunks.Add(new MultiTensorChunk { Entry = entries.Count - 1, Start = s, Count = (int)Math.Min(SliceElements, length - s) });
        }
        try
        {
            foreach (var (key, entries, chunks) in groups)
            {
                if (chunks.Count == 0) continue; // only empty tensors
                var e = b.AllocateScratch<MultiTensorEntry>(entries.Count);
                e.CopyFromCPU(entries.ToArray());
                var c = b.AllocateScratch<MultiTensorChunk>(chunks.Count);
                c.CopyFromCPU(chunks.ToArray());
                table.Launches.Add(new Launch { Bases = key, Entries = e, Chunks = c });
            }
        }
        catch
        {
            table.Dispose();
            throw;
        }
        return table;
    }

    /// <summary>Two tensors may share a launch when every role they both use lies in the same chunk.</summary>
    private static bool SameKey(PoolChunk?[] a, PoolChunk?[] b)
    {
        for (int r = 0; r < a.Length; r++)
            if (a[r] is not null && b[r] is not null && !ReferenceEquals(a[r], b[r])) return false;
        return true;
    }

    /// <summary>The base view of role <paramref name="role"/> of a launch (empty when no tensor of it has that role).</summary>
    public static ArrayView<byte> Base(Launch l, int role) =>
        role < l.Bases.Length && l.Bases[role] is { } c ? c.Buffer.View.AsContiguous() : ArrayView<byte>.Empty;

    public void Dispose()
    {
        foreach (var l in Launches) { l.Entries.Dispose(); l.Chunks.Dispose(); }
        Launches.Clear();
    }
}
