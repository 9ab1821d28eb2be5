using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.IO;

namespace FineTuneNative.Tests.Runtime.IO;

public class SafeTensorsTests
{
    private static float[] Values(int n, int seed)
    {
        var r = new Random(seed);
        var a = new float[n];
        for (int i = 0; i < n; i++) a[i] = (float)((r.NextDouble() * 2 - 1) * Math.Pow(10, r.Next(-3, 4)));
        return a;
    }

    /// <summary>Round to nearest even at 8 (bf16) mantissa bits, computed in double: independent of HalfBits.</summary>
    private static float RoundMantissa(float x, int bits)
    {
        if (x == 0 || float.IsNaN(x) || float.IsInfinity(x)) return x;
        int e = Math.ILogB((double)x);
        double ulp = Math.Pow(2, e - bits + 1);
        return (float)(Math.Round(x / ulp, MidpointRounding.ToEven) * ulp);
    }

    [Fact]
    public void RoundTrip_EveryDType_Metadata_Alignment()
    {
        using var dir = new TempDir();
        string path = dir.File("t.safetensors");
        var f32 = Values(7 * 5, 1);
        var bf16 = Values(3 * 11, 2);
        var f16 = Values(13, 3).Select(v => Math.Clamp(v, -60000f, 60000f)).ToArray();
        var scalar = new[] { 3.25f };
        var meta = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcödé \"quoted\"" };
        SafeTensors.Write(path, new (string, DType, int[], float[])[]
        {
            ("a.f32", DType.F32, new[] { 7, 5 }, f32),
            ("b.bf16", DType.BF16, new[] { 3, 11 }, bf16),
            ("c.f16", DType.F16, new[] { 13 }, f16),
            ("d.scalar", DType.F32, Array.Empty<int>(), scalar),
            ("e.empty", DType.BF16, new[] { 0, 4 }, Array.Empty<float>()),
        }, meta);

        // The raw layout, read without our reader: u64 header length, JSON, 8-byte aligned data.
        byte[] raw = File.ReadAllBytes(path);
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(raw);
        Assert.Equal(0UL, (8 + n) % 8);
        using (var doc = JsonDocument.Parse(raw.AsMemory(8, (int)n)))
        {
            var root = doc.RootElement;
            Assert.Equal("pt", root.GetProperty("__metadata__").GetProperty("format").GetString());
            Assert.Equal("BF16", root.GetProperty("b.bf16").GetProperty("dtype").GetString());
            var off = root.GetProperty("c.f16").GetProperty("data_offsets");
            Assert.Equal(13 * 2, off[1].GetInt64() - off[0].GetInt64());
            long dataLen = raw.Length - 8 - (long)n;
            long maxEnd = root.EnumerateObject().Where(p => p.Name != "__metadata__").Max(p => p.Value.GetProperty("data_offsets")[1].GetInt64());
            Assert.Equal(dataLen, maxEnd);
            // The f32 tensor's bytes are the little-endian floats.
            long a0 = root.GetProperty("a.f32").GetProperty("data_offsets")[0].GetInt64();
            Assert.Equal(f32[4], BinaryPrimitives.ReadSingleLittleEndian(raw.AsSpan((int)(8 + (long)n + a0 + 16))));
        }

        using var st = SafeTensors.Open(path);
        Assert.Equal(new[] { "a.f32", "b.bf16", "c.f16", "d.scalar", "e.empty" }, st.Names);
        Assert.Equal(meta, st.Metadata);
        Assert.Equal(f32, st.ReadF32("a.f32"));
        Assert.Equal(new[] { 7, 5 }, st.Info("a.f32").Shape);
        Assert.Equal(bf16.Select(v => RoundMantissa(v, 8)).ToArray(), st.ReadF32("b.bf16"));
        Assert.Equal(DType.BF16, st.Info("b.bf16").DType);
        Assert.Equal(f16.Select(v => (float)(Half)v).ToArray(), st.ReadF32("c.f16"));
        Assert.Equal(scalar, st.ReadF32("d.scalar"));
        Assert.Empty(st.Info("d.scalar").Shape);
        Assert.Empty(st.ReadF32("e.empty"));
        Assert.Equal(new[] { 0, 4 }, st.Info("e.empty").Shape);
        // Data offsets are absolute and aligned for the f32 tensor.
        Assert.Equal(0, st.Info("a.f32").DataOffset % 8);
        Assert.Equal(f32.Length * 4, st.RawBytes("a.f32").Length);
    }

    [Fact]
    public void Bf16_Rounds_To_Nearest_Even()
    {
        using var dir = new TempDir();
        string path = dir.File("r.safetensors");
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1); 1 + 3·2^-8 goes up to 1 + 2^-6.
        var v = new[] { 1f + 1f / 256, 1f + 3f / 256, -2.5f, float.MaxValue };
        SafeTensors.Write(path, new[] { ("x", DType.BF16, new[] { 4 }, v) });
        using var st = SafeTensors.Open(path);
        var r = st.ReadF32("x");
        Assert.Equal(1f, r[0]);
        Assert.Equal(1f + 1f / 64, r[1]);
        Assert.Equal(-2.5f, r[2]);
        Assert.Equal(float.PositiveInfinity, r[3]); // rounds past the largest finite bf16
    }

    [Fact]
    public void Write_Is_Atomic_And_Validates()
    {
        using var dir = new TempDir();
        string path = dir.File("m.safetensors");
        SafeTensors.Write(path, new[] { ("keep", DType.F32, new[] { 2 }, new[] { 1f, 2f }) });
        byte[] before = File.ReadAllBytes(path);

        // A data source that fails half-way: the old file stays intact and no temporary file is left.
        var failing = new List<SafeTensorSource>
        {
            new("x", DType.F32, new[] { 2 }, () => new[] { 5f, 6f }),
            new("y", DType.F32, new[] { 2 }, () => throw new IOException("disk on fire")),
        };
        Assert.Throws<IOException>(() => SafeTensors.Write(path, failing));
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(dir.Path));

        var e = Assert.Throws<ArgumentException>(() => SafeTensors.Write(path, new[] { ("bad", DType.F32, new[] { 3 }, new[] { 1f, 2f }) }));
        Assert.Contains("'bad'", e.Message);
        e = Assert.Throws<ArgumentException>(() => SafeTensors.Write(path, new[] { ("d", DType.F32, new[] { 1 }, new[] { 1f }), ("d", DType.F32, new[] { 1 }, new[] { 1f }) }));
        Assert.Contains("'d' given twice", e.Message);
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(dir.Path));
    }

    /// <summary>Writes a file from a literal header and data length, bypassing the writer.</summary>
    private static string Craft(TempDir dir, string header, int dataBytes, ulong? headerLen = null)
    {
        string path = dir.File($"bad-{Guid.NewGuid():N}.safetensors");
        byte[] h = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + h.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, headerLen ?? (ulong)h.Length);
        h.CopyTo(bytes, 8);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    public static IEnumerable<object[]> CorruptCases() => new[]
    {
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "'w'" },          // truncated data
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "'w'" },          // shape/bytes mismatch
        new object[] { "{\"w\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype" },
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "'w'" },
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "'w'" },
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "data_offsets" },
        new object[] { "{\"w\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "dtype" },
        new object[] { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlaps" },
        new object[] { "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "gap" },
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 12, "trailing" },
        new object[] { "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "twice" },
        new object[] { "{\"w\": [1, 2", 0, "not valid JSON" },
        new object[] { "[1, 2, 3]", 0, "start with '{'" },
        new object[] { "{\"__metadata__\":{\"k\":1}}", 0, "__metadata__" },
    };

    [Theory]
    [MemberData(nameof(CorruptCases))]
    public void Corrupt_Header_Gives_Error_Naming_File_And_Tensor(string header, int dataBytes, string expected)
    {
        using var dir = new TempDir();
        string path = Craft(dir, header, dataBytes);
        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(path).Dispose());
        Assert.Contains(path, e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Bad_Header_Length_And_Short_File()
    {
        using var dir = new TempDir();
        string p1 = Craft(dir, "{}", 0, headerLen: 1000);
        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(p1).Dispose());
        Assert.Contains(p1, e.Message);
        Assert.Contains("past the end", e.Message);

        string p2 = dir.File("short.safetensors");
        File.WriteAllBytes(p2, new byte[] { 1, 2, 3 });
        e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(p2).Dispose());
        Assert.Contains("too short", e.Message);

        string p3 = Craft(dir, "{}", 0, headerLen: ulong.MaxValue);
        e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(p3).Dispose());
        Assert.Contains("exceeds", e.Message);
    }

    [Fact]
    public void Header_Padded_With_Spaces_Is_Accepted()
    {
        using var dir = new TempDir();
        string path = Craft(dir, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}     ", 4);
        using var st = SafeTensors.Open(path);
        Assert.Equal(new[] { 0f }, st.ReadF32("w"));
    }

    [Fact]
    public void Reading_An_Integer_Tensor_As_Floats_Names_It()
    {
        using var dir = new TempDir();
        string path = Craft(dir, "{\"ids\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[0,8]}}", 8);
        using var st = SafeTensors.Open(path);
        Assert.Null(st.Info("ids").DType);
        var e = Assert.Throws<InvalidDataException>(() => st.ReadF32("ids"));
        Assert.Contains("'ids'", e.Message);
        Assert.Contains("I64", e.Message);
    }

    private static void WriteIndex(string dir, Dictionary<string, string> weightMap, string? extraMeta = null)
    {
        var o = new Dictionary<string, object> { ["metadata"] = new Dictionary<string, object> { ["total_size"] = 123 }, ["weight_map"] = weightMap };
        if (extraMeta is not null) ((Dictionary<string, object>)o["metadata"])["note"] = extraMeta;
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), JsonSerializer.Serialize(o));
    }

    [Fact]
    public void Sharded_Index_Opens_All_Shards()
    {
        using var dir = new TempDir();
        var a = Values(6, 4);
        var b = Values(10, 5);
        var c = Values(3, 6);
        SafeTensors.Write(dir.File("model-00001-of-00002.safetensors"), new[] { ("x.a", DType.F32, new[] { 2, 3 }, a), ("x.b", DType.BF16, new[] { 10 }, b) });
        SafeTensors.Write(dir.File("model-00002-of-00002.safetensors"), new[] { ("y.c", DType.F32, new[] { 3 }, c) });
        WriteIndex(dir.Path, new()
        {
            ["x.a"] = "model-00001-of-00002.safetensors",
            ["x.b"] = "model-00001-of-00002.safetensors",
            ["y.c"] = "model-00002-of-00002.safetensors",
        }, "sharded");

        using var st = SafeTensors.Open(dir.Path); // the directory: finds the index
        Assert.Equal(2, st.Files.Count);
        Assert.Equal(new[] { "x.a", "x.b", "y.c" }, st.Names);
        Assert.Equal(a, st.ReadF32("x.a"));
        Assert.Equal(c, st.ReadF32("y.c"));
        Assert.EndsWith("model-00002-of-00002.safetensors", st.Info("y.c").File);
        Assert.Equal("123", st.Metadata["total_size"]);
        Assert.Equal("sharded", st.Metadata["note"]);
    }

    [Fact]
    public void Sharded_Index_Errors_Name_Tensor_And_File()
    {
        using var dir = new TempDir();
        SafeTensors.Write(dir.File("s1.safetensors"), new[] { ("x.a", DType.F32, new[] { 1 }, new[] { 1f }) });

        WriteIndex(dir.Path, new() { ["x.a"] = "s1.safetensors", ["x.missing"] = "s1.safetensors" });
        var e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(dir.Path).Dispose());
        Assert.Contains("'x.missing'", e.Message);
        Assert.Contains("s1.safetensors", e.Message);

        WriteIndex(dir.Path, new() { ["x.a"] = "s1.safetensors", ["y"] = "s2.safetensors" });
        var f = Assert.Throws<FileNotFoundException>(() => SafeTensors.Open(dir.Path).Dispose());
        Assert.Contains("s2.safetensors", f.Message);

        // A tensor in a shard that the index does not list.
        SafeTensors.Write(dir.File("s1.safetensors"), new[] { ("x.a", DType.F32, new[] { 1 }, new[] { 1f }), ("x.extra", DType.F32, new[] { 1 }, new[] { 1f }) });
        WriteIndex(dir.Path, new() { ["x.a"] = "s1.safetensors" });
        e = Assert.Throws<InvalidDataException>(() => SafeTensors.Open(dir.Path).Dispose());
        Assert.Contains("'x.extra'", e.Message);
    }

    [Fact]
    public void Mapping_Outlives_Opener_While_Leased()
    {
        using var dir = new TempDir();
        string path = dir.File("l.safetensors");
        SafeTensors.Write(path, new[] { ("w", DType.F32, new[] { 3 }, new[] { 1f, 2f, 3f }) });
        var st = SafeTensors.Open(path);
        Assert.True(st.TryGetPointer("w", out var p, out var lease));
        st.Dispose();
        unsafe
        {
            var span = new ReadOnlySpan<float>((void*)p, 3);
            Assert.Equal(new[] { 1f, 2f, 3f }, span.ToArray());
        }
        lease.Dispose();
        Assert.False(st.Contains("nope"));
    }
}
