using System.Buffers.Binary;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.IO;

/// <summary>Where one tensor of a safetensors checkpoint lives and what it holds.</summary>
/// <param name="Name">Tensor name as written in the header.</param>
/// <param name="DTypeName">The header's dtype string ("F32", "BF16", "F16", "I64" ...).</param>
/// <param name="Shape">Dimensions (may be empty for a scalar).</param>
/// <param name="File">The .safetensors file that holds it.</param>
/// <param name="DataOffset">Absolute byte offset of its first element in <paramref name="File"/>.</param>
/// <param name="ByteLength">Number of bytes (element count · element size).</param>
public sealed record SafeTensorInfo(string Name, string DTypeName, int[] Shape, string File, long DataOffset, long ByteLength)
{
    /// <summary>The matching kernel dtype, or null for a dtype the runtime does not compute in (I64, U8, F64 ...).</summary>
    public DType? DType => SafeTensors.ToDType(DTypeName);

    public long ElementCount
    {
        get { long n = 1; foreach (int d in Shape) n *= d; return n; }
    }

    public string ShapeText => $"[{string.Join(", ", Shape)}]";
}

/// <summary>A tensor to write whose data is produced only when the writer reaches it (one tensor in memory at a time).</summary>
public readonly record struct SafeTensorSource(string Name, DType DType, int[] Shape, Func<float[]> Data);

/// <summary>
/// The Hugging Face safetensors format: an 8-byte little-endian header length N, N bytes of JSON
/// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {string: string}}), then the
/// tensor bytes back to back (little-endian, row-major), offsets relative to the end of the header.
/// </summary>
/// <remarks>
/// Reading maps the files into memory (no copy at open); <see cref="Read(string, Span{float})"/> converts
/// F32/F16/BF16/F64 to f32 on the way out, and <see cref="TryGetPointer"/> exposes the mapped bytes for
/// zero-copy tensors. A sharded checkpoint is opened through its model.safetensors.index.json
/// ({"metadata": {...}, "weight_map": {"name": "model-00001-of-00002.safetensors"}}).
/// Every header is validated like the reference implementation does: known dtype, non-negative shape,
/// byte length = elements · element size, offsets inside the data area, tensors contiguous without gaps or
/// overlaps; each error names the file and the tensor.
/// </remarks>
public sealed class SafeTensors : IDisposable
{
    /// <summary>Upper bound on the JSON header, as in the reference implementation (100 MB).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private readonly List<MappedFile> _files = new();
    private readonly Dictionary<string, (SafeTensorInfo Info, MappedFile File)> _tensors = new(StringComparer.Ordinal);
    private readonly List<string> _order = new();

    private SafeTensors(string path) => Path = path;

    /// <summary>The file, index or directory this checkpoint was opened from.</summary>
    public string Path { get; }

    /// <summary>"__metadata__" of a single file, or "metadata" of a sharded index (string values only).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; private set; } = new Dictionary<string, string>();

    /// <summary>The shard files (one for an unsharded checkpoint).</summary>
    public IReadOnlyList<string> Files => _files.Select(f => f.Path).ToList();

    /// <summary>Tensor names in file order (shard by shard).</summary>
    public IReadOnlyList<string> Names => _order;

    public IEnumerable<SafeTensorInfo> Tensors => _order.Select(n => _tensors[n].Info);

    public bool Contains(string name) => _tensors.ContainsKey(name);

    public SafeTensorInfo Info(string name) =>
        _tensors.TryGetValue(name, out var t) ? t.Info : throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");

    // ------------------------------------------------------------------------------------------ opening

    /// <summary>
    /// Opens a .safetensors file, a model.safetensors.index.json, or a directory holding either
    /// (model.safetensors is preferred; else model.safetensors.index.json; else the only *.safetensors file).
    /// </summary>
    public static SafeTensors Open(string path)
    {
        if (Directory.Exists(path))
        {
            string single = System.IO.Path.Combine(path, "model.safetensors");
            string index = System.IO.Path.Combine(path, "model.safetensors.index.json");
            if (File.Exists(single)) path = single;
            else if (File.Exists(index)) path = index;
            else
            {
                var any = Directory.GetFiles(path, "*.safetensors");
                if (any.Length != 1)
                    throw new FileNotFoundException($"{path}: no model.safetensors or model.safetensors.index.json" +
                        (any.Length > 1 ? $" (and {any.Length} other .safetensors files; open one directly)" : ""));
                path = any[0];
            }
        }
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: file not found", path);
        var st = new SafeTensors(path);
        try
        {
            if (path.EndsWith(".json", StringComparison.OrdinalIgnoreCase)) st.OpenIndex(path);
            else
            {
                var meta = st.AddFile(path, null);
                st.Metadata = meta;
            }
            return st;
        }
        catch
        {
            st.Dispose();
            throw;
        }
    }

    private void OpenIndex(string indexPath)
    {
        JsonDocument doc;
        try { doc = JsonDocument.Parse(File.ReadAllBytes(indexPath)); }
        catch (JsonException e) { throw new InvalidDataException($"{indexPath}: invalid JSON at line {e.LineNumber + 1}: {e.Message}"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{indexPath}: expected a JSON object");
            if (!doc.RootElement.TryGetProperty("weight_map", out var wm) || wm.ValueKind != JsonValueKind.Object)
                throw new InvalidDataException($"{indexPath}: missing \"weight_map\" object");
            var meta = new Dictionary<string, string>();
            if (doc.RootElement.TryGetProperty("metadata", out var m) && m.ValueKind == JsonValueKind.Object)
                foreach (var p in m.EnumerateObject())
                    meta[p.Name] = p.Value.ValueKind == JsonValueKind.String ? p.Value.GetString()! : p.Value.GetRawText();
            Metadata = meta;

            string dir = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(indexPath))!;
            var byShard = new Dictionary<string, HashSet<string>>(StringComparer.Ordinal);
            var shardOrder = new List<string>();
            foreach (var p in wm.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String)
                    throw new InvalidDataException($"{indexPath}: weight_map entry '{p.Name}' must be a file name string");
                string shard = p.Value.GetString()!;
                if (shard.Contains('/') || shard.Contains('\\') || shard == ".." || shard.Length == 0)
                    throw new InvalidDataException($"{indexPath}: weight_map entry '{p.Name}' names '{shard}', expected a file in the same directory");
                if (!byShard.TryGetValue(shard, out var set)) { byShard[shard] = set = new HashSet<string>(StringComparer.Ordinal); shardOrder.Add(shard); }
                if (!set.Add(p.Name)) throw new InvalidDataException($"{indexPath}: tensor '{p.Name}' listed twice in weight_map");
            }
            if (shardOrder.Count == 0) throw new InvalidDataException($"{indexPath}: weight_map is empty");
            foreach (string shard in shardOrder)
            {
                string file = System.IO.Path.Combine(dir, shard);
                if (!File.Exists(file)) throw new FileNotFoundException($"{indexPath}: shard '{shard}' (holding e.g. '{byShard[shard].First()}') not found", file);
                AddFile(file, byShard[shard]);
                foreach (string name in byShard[shard])
                    if (!_tensors.TryGetValue(name, out var t) || t.Info.File != file)
                        throw new InvalidDataException($"{indexPath}: weight_map puts tensor '{name}' in {shard}, but {file} has no such tensor");
            }
        }
    }

    /// <summary>Maps one file, validates its header, registers its tensors; returns its __metadata__.</summary>
    private Dictionary<string, string> AddFile(string path, HashSet<string>? expected)
    {
        var mf = MappedFile.Open(path);
        _files.Add(mf);
        if (mf.Length < 8) throw new InvalidDataException($"{path}: {mf.Length} bytes is too short for a safetensors file (8-byte header length missing)");
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(mf.Span(0, 8));
        if (n > (ulong)MaxHeaderBytes) throw new InvalidDataException($"{path}: header length {n} exceeds the {MaxHeaderBytes}-byte limit (not a safetensors file?)");
        if ((long)n > mf.Length - 8) throw new InvalidDataException($"{path}: header length {n} runs past the end of the file ({mf.Length} bytes)");
        long headerLen = (long)n;
        long dataStart = 8 + headerLen;
        long dataLen = mf.Length - dataStart;
        var header = ParseHeader(path, mf.Span(8, headerLen));

        // Offsets must tile the data area exactly: sort by begin, then each starts where the previous ended.
        var list = header.Tensors;
        list.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
        long cursor = 0;
        foreach (var t in list)
        {
            if (t.Begin != cursor)
                throw new InvalidDataException(t.Begin > cursor
                    ? $"{path}: tensor '{t.Name}' starts at data offset {t.Begin}, leaving a gap after offset {cursor}"
                    : $"{path}: tensor '{t.Name}' at data offsets [{t.Begin}, {t.End}) overlaps the previous tensor (which ends at {cursor})");
            if (t.End > dataLen)
                throw new InvalidDataException($"{path}: tensor '{t.Name}' data offsets [{t.Begin}, {t.End}) run past the end of the data ({dataLen} bytes)");
            cursor = t.End;
        }
        if (cursor != dataLen)
            throw new InvalidDataException($"{path}: tensors cover {cursor} bytes of data but the file holds {dataLen} after the header (truncated or trailing bytes)");

        // Register in header order (the order the writer chose), not in offset order.
        header.Tensors.Sort((a, b) => a.Ordinal.CompareTo(b.Ordinal));
        foreach (var t in header.Tensors)
        {
            if (expected is not null && !expected.Contains(t.Name))
                throw new InvalidDataException($"{path}: tensor '{t.Name}' is not listed for this shard in the index's weight_map");
            if (_tensors.TryGetValue(t.Name, out var prev))
                throw new InvalidDataException($"{path}: tensor '{t.Name}' also appears in {prev.Info.File}");
            var info = new SafeTensorInfo(t.Name, t.DType, t.Shape, path, dataStart + t.Begin, t.End - t.Begin);
            _tensors[t.Name] = (info, mf);
            _order.Add(t.Name);
        }
        return header.Metadata;
    }

    private sealed record HeaderTensor(string Name, string DType, int[] Shape, long Begin, long End, int Ordinal);
    private sealed record Header(List<HeaderTensor> Tensors, Dictionary<string, string> Metadata);

    private static Header ParseHeader(string path, ReadOnlySpan<byte> json)
    {
        // The spec allows trailing spaces as padding; the first byte must open the object.
        if (json.Length == 0 || json[0] != (byte)'{')
            throw new InvalidDataException($"{path}: header does not start with '{{' (not a safetensors file?)");
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json.ToArray()); }
        catch (JsonException e) { throw new InvalidDataException($"{path}: header is not valid JSON (line {e.LineNumber + 1}, byte {e.BytePositionInLine}): {e.Message}"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{path}: header must be a JSON object");
            var tensors = new List<HeaderTensor>();
            var meta = new Dictionary<string, string>();
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                if (!seen.Add(p.Name)) throw new InvalidDataException($"{path}: tensor '{p.Name}' appears twice in the header");
                if (p.Name == "__metadata__")
                {
                    if (p.Value.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{path}: __metadata__ must be an object of strings");
                    foreach (var m in p.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String)
                            throw new InvalidDataException($"{path}: __metadata__ value '{m.Name}' must be a string");
                        meta[m.Name] = m.Value.GetString()!;
                    }
                    continue;
                }
                tensors.Add(ParseEntry(path, p.Name, p.Value, tensors.Count));
            }
            return new Header(tensors, meta);
        }
    }

    private static HeaderTensor ParseEntry(string path, string name, JsonElement e, int ordinal)
    {
        string Where() => $"{path}: tensor '{name}'";
        if (e.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{Where()}: entry must be an object with dtype, shape and data_offsets");
        if (!e.TryGetProperty("dtype", out var dt) || dt.ValueKind != JsonValueKind.String)
            throw new InvalidDataException($"{Where()}: missing \"dtype\" string");
        string dtype = dt.GetString()!;
        int size = ElementSize(dtype);
        if (size == 0) throw new InvalidDataException($"{Where()}: unknown dtype \"{dtype}\"");
        if (!e.TryGetProperty("shape", out var sh) || sh.ValueKind != JsonValueKind.Array)
            throw new InvalidDataException($"{Where()}: missing \"shape\" array");
        var shape = new int[sh.GetArrayLength()];
        int i = 0;
        long count = 1;
        foreach (var d in sh.EnumerateArray())
        {
            if (d.ValueKind != JsonValueKind.Number || !d.TryGetInt32(out int v) || v < 0)
                throw new InvalidDataException($"{Where()}: shape entry {i} ({d.GetRawText()}) must be a non-negative 32-bit integer");
            shape[i++] = v;
            count = checked(count * v);
        }
        if (!e.TryGetProperty("data_offsets", out var off) || off.ValueKind != JsonValueKind.Array || off.GetArrayLength() != 2)
            throw new InvalidDataException($"{Where()}: missing \"data_offsets\" [begin, end]");
        long begin = ReadOffset(off[0]), end = ReadOffset(off[1]);
        if (begin < 0 || end < 0) throw new InvalidDataException($"{Where()}: data_offsets must be non-negative integers");
        if (end < begin) throw new InvalidDataException($"{Where()}: data_offsets [{begin}, {end}) end before they begin");
        long bytes = checked(count * size);
        if (end - begin != bytes)
            throw new InvalidDataException($"{Where()}: data_offsets [{begin}, {end}) hold {end - begin} bytes but {dtype}[{string.Join(", ", shape)}] needs {bytes}");
        return new HeaderTensor(name, dtype, shape, begin, end, ordinal);
    }

    private static long ReadOffset(JsonElement e) => e.ValueKind == JsonValueKind.Number && e.TryGetInt64(out long v) ? v : -1;

    /// <summary>Element size in bytes of a safetensors dtype string, 0 when unknown.</summary>
    public static int ElementSize(string dtype) => dtype switch
    {
        "F64" or "I64" or "U64" => 8,
        "F32" or "I32" or "U32" => 4,
        "F16" or "BF16" or "I16" or "U16" => 2,
        "I8" or "U8" or "BOOL" or "F8_E4M3" or "F8_E5M2" => 1,
        _ => 0,
    };

    public static DType? ToDType(string dtype) => dtype switch
    {
        "F32" => DType.F32,
        "BF16" => DType.BF16,
        "F16" => DType.F16,
        "I32" => DType.I32,
        _ => null,
    };

    public static string FromDType(DType d) => d switch
    {
        DType.F32 => "F32",
        DType.BF16 => "BF16",
        DType.F16 => "F16",
        DType.I32 => "I32",
        _ => throw new ArgumentOutOfRangeException(nameof(d)),
    };

    // ------------------------------------------------------------------------------------------ reading

    /// <summary>Converts tensor <paramref name="name"/> (F32, F16, BF16 or F64) to f32 into <paramref name="dst"/>.</summary>
    public unsafe void Read(string name, Span<float> dst)
    {
        if (!_tensors.TryGetValue(name, out var t)) throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");
        var info = t.Info;
        long n = info.ElementCount;
        if (dst.Length != n) throw new ArgumentException($"{info.File}: tensor '{name}' has {n} elements, destination {dst.Length}");
        int size = ElementSize(info.DTypeName);
        byte* src = t.File.Pointer(info.DataOffset);
        // Chunks keep every span under 2^31 bytes (an f32 embedding of a large vocabulary exceeds it).
        const int Chunk = 1 << 26;
        for (long start = 0; start < n; start += Chunk)
        {
            int len = (int)Math.Min(Chunk, n - start);
            byte* s = src + start * size;
            var d = dst.Slice((int)start, len);
            switch (info.DTypeName)
            {
                case "F32":
                    new ReadOnlySpan<float>(s, len).CopyTo(d);
                    break;
                case "BF16":
                    ConvertBf16(new ReadOnlySpan<ushort>(s, len), d);
                    break;
                case "F16":
                    TensorPrimitives.ConvertToSingle(new ReadOnlySpan<Half>(s, len), d);
                    break;
                case "F64":
                    var dd = new ReadOnlySpan<double>(s, len);
                    for (int i = 0; i < len; i++) d[i] = (float)dd[i];
                    break;
                default:
                    throw new InvalidDataException($"{info.File}: tensor '{name}' has dtype {info.DTypeName}; only F32, F16, BF16 and F64 convert to floats");
            }
        }
    }

    /// <summary>Tensor <paramref name="name"/> as a new f32 array.</summary>
    public float[] ReadF32(string name)
    {
        var info = Info(name);
        var a = new float[info.ElementCount];
        Read(name, a);
        return a;
    }

    /// <summary>The raw little-endian bytes of a tensor (under 2 GiB), straight from the mapping.</summary>
    public ReadOnlySpan<byte> RawBytes(string name)
    {
        if (!_tensors.TryGetValue(name, out var t)) throw new KeyNotFoundException($"{Path}: no tensor named '{name}'");
        return t.File.Span(t.Info.DataOffset, t.Info.ByteLength);
    }

    /// <summary>
    /// The mapped address of a tensor's first element and a lease that keeps the mapping alive (dispose it
    /// when the memory is no longer used). Used for zero-copy weights.
    /// </summary>
    public unsafe bool TryGetPointer(string name, out IntPtr data, out IDisposable lease)
    {
        data = IntPtr.Zero;
        lease = null!;
        if (!_tensors.TryGetValue(name, out var t)) return false;
        data = (IntPtr)t.File.Pointer(t.Info.DataOffset);
        lease = t.File.Lease();
        return true;
    }

    private static void ConvertBf16(ReadOnlySpan<ushort> src, Span<float> dst)
    {
        var bits = MemoryMarshal.Cast<float, uint>(dst);
        for (int i = 0; i < src.Length; i++) bits[i] = (uint)src[i] << 16;
    }

    public void Dispose()
    {
        foreach (var f in _files) f.Dispose();
        _files.Clear();
    }

    // ------------------------------------------------------------------------------------------ writing

    /// <summary>
    /// Writes a safetensors file: tensors in the given order, converted from f32 to their dtype (F32, BF16 or
    /// F16, round to nearest even), header padded with spaces so the data starts 8-byte aligned. The file is
    /// written under a temporary name and renamed into place, so a failure never leaves a partial
    /// <paramref name="path"/>.
    /// </summary>
    public static void Write(string path, IEnumerable<(string Name, DType DType, int[] Shape, float[] Data)> tensors,
        IDictionary<string, string>? metadata = null)
    {
        var list = new List<SafeTensorSource>();
        foreach (var (name, dtype, shape, data) in tensors)
        {
            var d = data;
            list.Add(new SafeTensorSource(name, dtype, shape, () => d));
        }
        Write(path, list, metadata);
    }

    /// <summary>As <see cref="Write(string, IEnumerable{ValueTuple{string, DType, int[], float[]}}, IDictionary{string, string}?)"/>, producing each tensor's data only when it is written.</summary>
    public static void Write(string path, IReadOnlyList<SafeTensorSource> tensors, IDictionary<string, string>? metadata = null)
    {
        byte[] header = BuildHeader(path, tensors, metadata);
        string full = System.IO.Path.GetFullPath(path);
        string dir = System.IO.Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        string tmp = System.IO.Path.Combine(dir, $".{System.IO.Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> len = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)header.Length);
                fs.Write(len);
                fs.Write(header);
                byte[] buf = new byte[1 << 20];
                foreach (var t in tensors)
                {
                    float[] data = t.Data() ?? throw new ArgumentException($"{path}: tensor '{t.Name}' produced no data");
                    long expected = Count(t.Shape);
                    if (data.LongLength != expected)
                        throw new ArgumentException($"{path}: tensor '{t.Name}' has {data.LongLength} values but shape [{string.Join(", ", t.Shape)}] needs {expected}");
                    WriteData(fs, t.DType, data, buf);
                }
                fs.Flush(true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }

    private static long Count(int[] shape)
    {
        long n = 1;
        foreach (int d in shape) n = checked(n * d);
        return n;
    }

    private static byte[] BuildHeader(string path, IReadOnlyList<SafeTensorSource> tensors, IDictionary<string, string>? metadata)
    {
        var ms = new MemoryStream();
        using (var w = new Utf8JsonWriter(ms))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject("__metadata__");
                foreach (var kv in metadata) w.WriteString(kv.Key, kv.Value);
                w.WriteEndObject();
            }
            var names = new HashSet<string>(StringComparer.Ordinal);
            long offset = 0;
            foreach (var t in tensors)
            {
                if (string.IsNullOrEmpty(t.Name)) throw new ArgumentException($"{path}: a tensor has an empty name");
                if (t.Name == "__metadata__") throw new ArgumentException($"{path}: '__metadata__' is reserved and cannot name a tensor");
                if (!names.Add(t.Name)) throw new ArgumentException($"{path}: tensor '{t.Name}' given twice");
                if (t.DType is not (DType.F32 or DType.BF16 or DType.F16))
                    throw new ArgumentException($"{path}: tensor '{t.Name}': dtype {t.DType.Name()} cannot be written from floats (F32, BF16, F16)");
                if (t.Shape is null || t.Shape.Any(d => d < 0)) throw new ArgumentException($"{path}: tensor '{t.Name}' has an invalid shape");
                long bytes = Count(t.Shape) * t.DType.SizeOf();
                w.WriteStartObject(t.Name);
                w.WriteString("dtype", FromDType(t.DType));
                w.WriteStartArray("shape");
                foreach (int d in t.Shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + bytes);
                w.WriteEndArray();
                w.WriteEndObject();
                offset += bytes;
            }
            w.WriteEndObject();
        }
        // Pad with spaces so that 8 + header length is a multiple of 8: the data then starts 8-byte aligned.
        int len = (int)ms.Length;
        int padded = (len + 7) / 8 * 8;
        var header = new byte[padded];
        ms.GetBuffer().AsSpan(0, len).CopyTo(header);
        header.AsSpan(len).Fill((byte)' ');
        return header;
    }

    private static void WriteData(Stream s, DType dtype, float[] data, byte[] buf)
    {
        int per = dtype.SizeOf();
        int chunk = buf.Length / per;
        for (int start = 0; start < data.Length; start += chunk)
        {
            int len = Math.Min(chunk, data.Length - start);
            var src = data.AsSpan(start, len);
            var dst = buf.AsSpan(0, len * per);
            switch (dtype)
            {
                case DType.F32:
                    if (BitConverter.IsLittleEndian) MemoryMarshal.AsBytes(src).CopyTo(dst);
                    else for (int i = 0; i < len; i++) BinaryPrimitives.WriteSingleLittleEndian(dst[(4 * i)..], src[i]);
                    break;
                case DType.BF16:
                    for (int i = 0; i < len; i++) BinaryPrimitives.WriteUInt16LittleEndian(dst[(2 * i)..], HalfBits.F32ToBf16(src[i]));
                    break;
                case DType.F16:
                    for (int i = 0; i < len; i++) BinaryPrimitives.WriteUInt16LittleEndian(dst[(2 * i)..], HalfBits.F32ToF16(src[i]));
                    break;
            }
            s.Write(dst);
        }
    }

    /// <summary>Writes text to <paramref name="path"/> through a temporary file and a rename.</summary>
    internal static void WriteAllTextAtomic(string path, string text)
    {
        string full = System.IO.Path.GetFullPath(path);
        string dir = System.IO.Path.GetDirectoryName(full)!;
        Directory.CreateDirectory(dir);
        string tmp = System.IO.Path.Combine(dir, $".{System.IO.Path.GetFileName(full)}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp");
        try
        {
            File.WriteAllText(tmp, text, new UTF8Encoding(false));
            File.Move(tmp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }
}
