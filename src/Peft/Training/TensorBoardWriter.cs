using System.Buffers.Binary;
using System.Text;

namespace FineTuneNative.Peft.Training;

/// <summary>
/// Writes scalar metrics as a TensorBoard event file (what <c>tensorboard --logdir DIR</c> reads), with no
/// dependency: TFRecord framing around serialized <c>tensorflow.Event</c> protocol buffers.
/// </summary>
/// <remarks>
/// TFRecord: each record is uint64 length (little-endian), uint32 masked CRC-32C of those 8 bytes, the data, uint32
/// masked CRC-32C of the data; mask(c) = ((c &gt;&gt; 15) | (c &lt;&lt; 17)) + 0xA282EAD8 (TensorFlow's crc32c.h).
/// Event (tensorflow/core/util/event.proto): field 1 wall_time (double), 2 step (int64), 3 file_version (string,
/// the first record: "brain.Event:2"), 5 summary (Summary: repeated field 1 Value { 1 tag (string), 2 simple_value
/// (float) }). The file is events.out.tfevents.{unix seconds}.{host}; every record is flushed, so a killed run
/// keeps what it logged.
/// </remarks>
public sealed class TensorBoardWriter : IDisposable
{
    private readonly FileStream _file;

    public TensorBoardWriter(string directory)
    {
        System.IO.Directory.CreateDirectory(directory);
        Directory = directory;
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        string host = new string(Environment.MachineName.Select(c => char.IsLetterOrDigit(c) || c is '-' or '_' ? c : '_').ToArray());
        string path = System.IO.Path.Combine(directory, $"events.out.tfevents.{now}.{host}");
        for (int i = 1; File.Exists(path); i++) path = System.IO.Path.Combine(directory, $"events.out.tfevents.{now}.{host}.{i}");
        Path = path;
        _file = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.Read);
        var e = new ProtoWriter();
        e.Double(1, WallTime());
        e.String(3, "brain.Event:2");
        WriteRecord(e.ToArray());
    }

    public string Directory { get; }
    public string Path { get; }

    /// <summary>
    /// A writer for a run's event directory that holds no other event file afterwards: the scalars of the event files
    /// already there with step ≤ <paramref name="keepThroughStep"/> are copied into the new file (their steps and wall
    /// times kept), then those files are deleted. A resumed run passes its checkpoint's step, so TensorBoard shows each
    /// step once (the steps the killed run logged after the checkpoint are re-run and logged again, not duplicated); a
    /// fresh run passes −1 and starts an empty directory. A file whose CRCs do not check is renamed aside
    /// (unreadable_*, no longer an event file).
    /// </summary>
    public static TensorBoardWriter Open(string directory, long keepThroughStep)
    {
        System.IO.Directory.CreateDirectory(directory);
        var old = System.IO.Directory.GetFiles(directory)
            .Where(f => System.IO.Path.GetFileName(f).Contains("tfevents", StringComparison.Ordinal))
            .OrderBy(f => f, StringComparer.Ordinal).ToList();
        var keep = new List<Scalar>();
        var unreadable = new List<string>();
        foreach (var f in old)
        {
            try { keep.AddRange(Read(f).Scalars.Where(x => x.Step <= keepThroughStep)); }
            catch (InvalidDataException) { unreadable.Add(f); }
        }
        var w = new TensorBoardWriter(directory);
        try
        {
            for (int i = 0; i < keep.Count;)
            {
                int j = i;
                while (j < keep.Count && keep[j].Step == keep[i].Step && keep[j].WallTime == keep[i].WallTime) j++;
                w.Write(keep[i].Step, keep[i].WallTime, keep.Skip(i).Take(j - i).Select(x => (x.Tag, (double)x.Value)).ToArray());
                i = j;
            }
            foreach (var f in old)
            {
                if (unreadable.Contains(f))
                    File.Move(f, System.IO.Path.Combine(directory, "unreadable_" + System.IO.Path.GetFileName(f).Replace("tfevents", "tf_events", StringComparison.Ordinal)), overwrite: true);
                else File.Delete(f);
            }
        }
        catch
        {
            w.Dispose();
            throw;
        }
        return w;
    }

    /// <summary>One event at <paramref name="step"/> holding every (tag, value) as a scalar summary; NaN/Inf are skipped.</summary>
    public void Scalars(long step, params (string Tag, double Value)[] values) => Write(step, WallTime(), values);

    private void Write(long step, double wallTime, (string Tag, double Value)[] values)
    {
        var summary = new ProtoWriter();
        foreach (var (tag, v) in values)
        {
            if (!double.IsFinite(v)) continue;
            var value = new ProtoWriter();
            value.String(1, tag);
            value.Float(2, (float)v);
            summary.Message(1, value.ToArray());
        }
        var e = new ProtoWriter();
        e.Double(1, wallTime);
        e.Int64(2, step);
        e.Message(5, summary.ToArray());
        WriteRecord(e.ToArray());
    }

    private static double WallTime() => DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;

    private void WriteRecord(byte[] data)
    {
        Span<byte> header = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64LittleEndian(header, (ulong)data.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(header[8..], MaskedCrc(header[..8]));
        Span<byte> footer = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(footer, MaskedCrc(data));
        _file.Write(header);
        _file.Write(data);
        _file.Write(footer);
        _file.Flush();
    }

    public void Dispose() => _file.Dispose();

    // ------------------------------------------------------------------------------------------ CRC-32C

    private static readonly uint[] CrcTable = BuildTable();

    private static uint[] BuildTable()
    {
        var t = new uint[256];
        for (uint i = 0; i < 256; i++)
        {
            uint c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) != 0 ? (c >> 1) ^ 0x82F63B78u : c >> 1; // Castagnoli, reflected
            t[i] = c;
        }
        return t;
    }

    /// <summary>CRC-32C (Castagnoli) of <paramref name="data"/>; "123456789" gives 0xE3069283.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint c = 0xFFFFFFFFu;
        foreach (byte b in data) c = CrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }

    public static uint MaskedCrc(ReadOnlySpan<byte> data)
    {
        uint c = Crc32C(data);
        return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
    }

    // ------------------------------------------------------------------------------------------ reading back

    /// <summary>One scalar read back from an event file.</summary>
    public sealed record Scalar(long Step, double WallTime, string Tag, float Value);

    /// <summary>
    /// Reads an event file written by this class (or TensorFlow): checks every CRC, returns the file_version and the
    /// scalar summaries. A truncated last record (a killed writer) ends the read; a bad CRC is an error naming the offset.
    /// </summary>
    public static (string? FileVersion, List<Scalar> Scalars) Read(string path)
    {
        var bytes = File.ReadAllBytes(path);
        var list = new List<Scalar>();
        string? version = null;
        int pos = 0;
        while (pos + 12 <= bytes.Length)
        {
            var header = bytes.AsSpan(pos, 8);
            ulong len = BinaryPrimitives.ReadUInt64LittleEndian(header);
            if (BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(pos + 8)) != MaskedCrc(header))
                throw new InvalidDataException($"{path}: bad length CRC at offset {pos}");
            if ((ulong)pos + 12 + len + 4 > (ulong)bytes.Length) break;
            var data = bytes.AsSpan(pos + 12, (int)len);
            if (BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(pos + 12 + (int)len)) != MaskedCrc(data))
                throw new InvalidDataException($"{path}: bad data CRC in the record at offset {pos}");
            double wall = 0; long step = 0;
            var values = new List<(string, float)>();
            foreach (var (field, wire, v, payload) in ProtoFields(data.ToArray()))
            {
                if (field == 1 && wire == 1) wall = BitConverter.Int64BitsToDouble((long)v);
                else if (field == 2 && wire == 0) step = (long)v;
                else if (field == 3 && wire == 2) version = Encoding.UTF8.GetString(payload!);
                else if (field == 5 && wire == 2)
                    foreach (var (sf, sw, _, sp) in ProtoFields(payload!))
                    {
                        if (sf != 1 || sw != 2) continue;
                        string tag = ""; float value = float.NaN;
                        foreach (var (vf, vw, vv, vp) in ProtoFields(sp!))
                        {
                            if (vf == 1 && vw == 2) tag = Encoding.UTF8.GetString(vp!);
                            else if (vf == 2 && vw == 5) value = BitConverter.Int32BitsToSingle((int)vv);
                        }
                        values.Add((tag, value));
                    }
            }
            foreach (var (tag, value) in values) list.Add(new Scalar(step, wall, tag, value));
            pos += 12 + (int)len + 4;
        }
        return (version, list);
    }

    /// <summary>The fields of a protobuf message: (field, wire type, varint/fixed value, length-delimited payload).</summary>
    private static IEnumerable<(int Field, int Wire, ulong Value, byte[]? Payload)> ProtoFields(byte[] msg)
    {
        int p = 0;
        while (p < msg.Length)
        {
            ulong key = Varint(msg, ref p);
            int field = (int)(key >> 3), wire = (int)(key & 7);
            switch (wire)
            {
                case 0: yield return (field, wire, Varint(msg, ref p), null); break;
                case 1: yield return (field, wire, BinaryPrimitives.ReadUInt64LittleEndian(msg.AsSpan(p)), null); p += 8; break;
                case 5: yield return (field, wire, BinaryPrimitives.ReadUInt32LittleEndian(msg.AsSpan(p)), null); p += 4; break;
                case 2:
                    int n = (int)Varint(msg, ref p);
                    yield return (field, wire, 0, msg.AsSpan(p, n).ToArray());
                    p += n;
                    break;
                default: throw new InvalidDataException($"unsupported protobuf wire type {wire}");
            }
        }
    }

    private static ulong Varint(byte[] b, ref int p)
    {
        ulong v = 0;
        for (int shift = 0; ; shift += 7)
        {
            byte x = b[p++];
            v |= (ulong)(x & 0x7F) << shift;
            if ((x & 0x80) == 0) return v;
        }
    }

    /// <summary>The few protobuf encodings an Event needs.</summary>
    private sealed class ProtoWriter
    {
        private readonly MemoryStream _s = new();

        private void Key(int field, int wire) => Varint((ulong)((field << 3) | wire));

        private void Varint(ulong v)
        {
            while (v >= 0x80) { _s.WriteByte((byte)(v | 0x80)); v >>= 7; }
            _s.WriteByte((byte)v);
        }

        public void Double(int field, double v)
        {
            Key(field, 1);
            Span<byte> b = stackalloc byte[8];
            BinaryPrimitives.WriteDoubleLittleEndian(b, v);
            _s.Write(b);
        }

        public void Float(int field, float v)
        {
            Key(field, 5);
            Span<byte> b = stackalloc byte[4];
            BinaryPrimitives.WriteSingleLittleEndian(b, v);
            _s.Write(b);
        }

        public void Int64(int field, long v) { Key(field, 0); Varint((ulong)v); }

        public void String(int field, string v) => Message(field, Encoding.UTF8.GetBytes(v));

        public void Message(int field, byte[] payload)
        {
            Key(field, 2);
            Varint((ulong)payload.Length);
            _s.Write(payload);
        }

        public byte[] ToArray() => _s.ToArray();
    }
}
