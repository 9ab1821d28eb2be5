using ILGPU;
using ILGPU.Runtime;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// One tensor of a multi-tensor launch: per operand role (P, G, M, V in floats, R, the rounded copy, in 16-bit elements)
/// the slot of the launch's <see cref="MultiTensorBases"/> (the pool chunk it lives in) and its element offset there.
/// </summary>
public struct MultiTensorEntry
{
    public long P, G, M, V, R;
    /// <summary>1 when weight decay applies to this tensor, else 0 (the table does not depend on the hyper-parameters).</summary>
    public float Decay;
    /// <summary>0: no rounded copy; else <see cref="DeviceFloats.KindBF16"/> or <see cref="DeviceFloats.KindF16"/>.</summary>
    public int RoundKind;
    /// <summary>Base slot of each role (0 for an unused role, never read).</summary>
    public int PSlot, GSlot, MSlot, VSlot, RSlot;
}

/// <summary>
/// The pool chunks one multi-tensor launch reads and writes, up to <see cref="Count"/> of them, whatever operand roles
/// live in them: a kernel picks an entry's views once per work chunk (<see cref="Get"/>), so tensors allocated before and
/// after a reservation, or spread over several chunks, still go in one launch. 8 views are 128 bytes of kernel parameters.
/// </summary>
public struct MultiTensorBases
{
    public const int Count = 8;
    public ArrayView<byte> B0, B1, B2, B3, B4, B5, B6, B7;

    /// <summary>The view of slot <paramref name="slot"/> (0..7).</summary>
    public readonly ArrayView<byte> Get(int slot) => slot switch
    {
        0 => B0, 1 => B1, 2 => B2, 3 => B3, 4 => B4, 5 => B5, 6 => B6, _ => B7,
    };
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
/// the entries of a list's tensors, each naming the base slot and offset of every operand, and the work chunks that split
/// every tensor into slices of <see cref="SliceElements"/>. One launch covers every tensor while the list touches at
/// most <see cref="MultiTensorBases.Count"/> distinct pool chunks (LoRA adapters allocated before the pool reservation
/// and their moments after it touch two); beyond that the list is cut, in order, into as few launches as that allows.
/// Built on the first call with a given list and reused while the list holds the same tensors (compared element by
/// element, no allocation), so a training step uploads nothing and allocates nothing.
/// </summary>
internal sealed class MultiTensorTable : IDisposable
{
    /// <summary>Elements per work chunk: 16K floats = 64 KiB of each operand per group visit.</summary>
    public const int SliceElements = 1 << 14;

    public sealed class Launch
    {
        public required PoolChunk[] Bases;                // the chunk of each base slot
        public required MemoryBuffer1D<MultiTensorEntry, Stride1D.Dense> Entries;
        public required MemoryBuffer1D<MultiTensorChunk, Stride1D.Dense> Chunks;
        public int ChunkCount => (int)Chunks.Length;

        /// <summary>The kernel argument: slot i views chunk i (empty past the last).</summary>
        public MultiTensorBases Views()
        {
            ArrayView<byte> V(int i) => i < Bases.Length ? Bases[i].Buffer.View.AsContiguous() : ArrayView<byte>.Empty;
            return new MultiTensorBases { B0 = V(0), B1 = V(1), B2 = V(2), B3 = V(3), B4 = V(4), B5 = V(5), B6 = V(6), B7 = V(7) };
        }
    }

    public List<Launch> Launches { get; } = new();

    /// <summary>
    /// Groups of one launch: every work chunk its own group up to 8 per multiprocessor (a 256-thread group, 2048
    /// threads per SM on sm_80/sm_90); the simulator runs groups one after another, so a few suffice there.
    /// </summary>
    public static int Groups(IlgpuBackend b, int chunks) =>
        Math.Max(1, Math.Min(chunks, b.Accelerator.AcceleratorType == AcceleratorType.CPU ? 4 : 8 * b.Accelerator.NumMultiprocessors));

    /// <summary>
    /// Builds and uploads the tables of <paramref name="count"/> tensors. <paramref name="operands"/>(i) gives tensor i's
    /// (P, G, M, V, R) tensors (null where a role is unused), <paramref name="decay"/>(i) its weight decay.
    /// </summary>
    public static MultiTensorTable Build(IlgpuBackend b, int count, Func<int, Tensor?[]> operands, Func<int, float> decay, string op)
    {
        var table = new MultiTensorTable();
        var groups = new List<(List<PoolChunk> Bases, List<MultiTensorEntry> Entries, List<MultiTensorChunk> Chunks)>();
        var placed = new (PoolChunk Chunk, long Offset)?[5];
        for (int i = 0; i < count; i++)
        {
            var ops = operands(i);
            if (ops.Length > placed.Length) throw new ArgumentException($"{op}: at most {placed.Length} operand roles");
            long length = -1;
            int roundKind = 0;
            Array.Clear(placed);
            for (int r = 0; r < ops.Length; r++)
            {
                if (ops[r] is not { } t) continue;
                var (chunk, byteOffset) = b.Placement(t, $"{op} tensor {i}");
                long size = t.DType.SizeOf();
                if (byteOffset % size != 0) throw new ArgumentException($"{op}: {t.Describe()} is not aligned to its element size");
                placed[r] = (chunk, byteOffset / size);
                if (length < 0) length = t.Length;
                if (r == 4) roundKind = t.DType == DType.BF16 ? DeviceFloats.KindBF16 : DeviceFloats.KindF16;
            }
            if (length < 0) throw new ArgumentException($"{op}: tensor {i} has no operand");
            // The current launch takes the tensor while its chunks and the launch's fit in the base slots.
            if (groups.Count == 0 || groups[^1].Bases.Union(Chunks(placed)).Count() > MultiTensorBases.Count)
                groups.Add((new List<PoolChunk>(), new List<MultiTensorEntry>(), new List<MultiTensorChunk>()));
            var (bases, entries, chunks) = groups[^1];
            int Slot(int r)
            {
                if (placed[r] is not { } p) return 0;
                int s = bases.IndexOf(p.Chunk);
                if (s < 0) { bases.Add(p.Chunk); s = bases.Count - 1; }
                return s;
            }
            long Off(int r) => placed[r]?.Offset ?? 0;
            entries.Add(new MultiTensorEntry
            {
                P = Off(0), G = Off(1), M = Off(2), V = Off(3), R = Off(4),
                PSlot = Slot(0), GSlot = Slot(1), MSlot = Slot(2), VSlot = Slot(3), RSlot = Slot(4),
                Decay = decay(i), RoundKind = roundKind,
            });
            for (long s = 0; s < length; s += SliceElements)
                chunks.Add(new MultiTensorChunk { Entry = entries.Count - 1, Start = s, Count = (int)Math.Min(SliceElements, length - s) });
        }
        try
        {
            foreach (var (bases, entries, chunks) in groups)
            {
                if (chunks.Count == 0) continue; // only empty tensors
                var e = b.AllocateScratch<MultiTensorEntry>(entries.Count);
                e.CopyFromCPU(entries.ToArray());
                var c = b.AllocateScratch<MultiTensorChunk>(chunks.Count);
                c.CopyFromCPU(chunks.ToArray());
                table.Launches.Add(new Launch { Bases = bases.ToArray(), Entries = e, Chunks = c });
            }
        }
        catch
        {
            table.Dispose();
            throw;
        }
        return table;
    }

    private static IEnumerable<PoolChunk> Chunks((PoolChunk Chunk, long Offset)?[] placed)
    {
        foreach (var p in placed)
            if (p is { } x) yield return x.Chunk;
    }

    public void Dispose()
    {
        foreach (var l in Launches) { l.Entries.Dispose(); l.Chunks.Dispose(); }
        Launches.Clear();
    }
}
