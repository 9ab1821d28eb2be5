using System.Text;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Runtime.IO;

/// <summary>ggml tensor types used in GGUF files (the subset ftn writes and reads).</summary>
public enum GgmlType : uint
{
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    BF16 = 30,
}

/// <summary>One tensor of a GGUF file: name, dims innermost first (ne[0] = columns), type and data offset.</summary>
public sealed record GgufTensorInfo(string Name, long[] Ne, GgmlType Type, long Offset)
{
    public long Elements => Ne.Aggregate(1L, (a, b) => a * b);

    public long Bytes => Type switch
    {
        GgmlType.F32 => Elements * 4,
        GgmlType.F16 or GgmlType.BF16 => Elements * 2,
        GgmlType.Q8_0 => Elements / 32 * 34,
        GgmlType.Q4_0 => Elements / 32 * 18,
        _ => throw new InvalidDataException($"tensor {Name}: unsupported ggml type {(uint)Type}"),
    };
}

/// <summary>
/// Writes GGUF v3 files (github.com/ggml-org/ggml docs/gguf.md): header, typed metadata, tensor infos, then the
/// tensor data, each tensor aligned to general.alignment (32). Written to a temporary name and renamed into place.
/// </summary>
public sealed class GgufWriter
{
    private const uint Magic = 0x46554747; // "GGUF"
    private const int Alignment = 32;
    private readonly List<(string Key, object Value)> _kv = new();
    private readonly List<(string Name, long[] Ne, GgmlType Type, byte[] Data)> _tensors = new();

    /// <summary>Adds a metadata value: string, bool, int (i32), uint (u32), float (f32), or arrays string[], float[], int[].</summary>
    public GgufWriter Add(string key, object value)
    {
        if (value is not (string or bool or int or uint or float or string[] or float[] or int[]))
            throw new ArgumentException($"GGUF metadata '{key}': unsupported value type {value.GetType().Name}");
        _kv.Add((key, value));
        return this;
    }

    /// <summary>Adds a tensor; <paramref name="ne"/> lists dims innermost first; <paramref name="data"/> is its exact payload.</summary>
    public GgufWriter AddTensor(string name, long[] ne, GgmlType type, byte[] data)
    {
        var info = new GgufTensorInfo(name, ne, type, 0);
        if (data.LongLength != info.Bytes) throw new ArgumentException($"GGUF tensor {name}: {data.LongLength} bytes, {type} [{string.Join(", ", ne)}] needs {info.Bytes}");
        if (type is GgmlType.Q8_0 or GgmlType.Q4_0 && ne[0] % 32 != 0) throw new ArgumentException($"GGUF tensor {name}: {type} rows need ne[0] % 32 == 0");
        _tensors.Add((name, ne, type, data));
        return this;
    }

    public void Write(string path)
    {
        string tmp = path + ".tmp";
        using (var f = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
        using (var w = new BinaryWriter(f, Encoding.UTF8, leaveOpen: true))
        {
            w.Write(Magic);
            w.Write(3u);
            w.Write((ulong)_tensors.Count);
            w.Write((ulong)_kv.Count);
            foreach (var (key, value) in _kv)
            {
                Str(w, key);
                switch (value)
                {
                    case uint u: w.Write(4u); w.Write(u); break;
                    case int i: w.Write(5u); w.Write(i); break;
                    case float x: w.Write(6u); w.Write(x); break;
                    case bool b: w.Write(7u); w.Write(b ? (byte)1 : (byte)0); break;
                    case string s: w.Write(8u); Str(w, s); break;
                    case string[] a: w.Write(9u); w.Write(8u); w.Write((ulong)a.Length); foreach (var s in a) Str(w, s); break;
                    case float[] a: w.Write(9u); w.Write(6u); w.Write((ulong)a.Length); foreach (var x in a) w.Write(x); break;
                    case int[] a: w.Write(9u); w.Write(5u); w.Write((ulong)a.Length); foreach (var x in a) w.Write(x); break;
                }
            }
            long offset = 0;
            foreach (var (name, ne, type, data) in _tensors)
            {
                Str(w, name);
                w.Write((uint)ne.Length);
                foreach (long d in ne) w.Write((ulong)d);
                w.Write((uint)type);
                w.Write((ulong)offset);
                offset = Align(offset + data.LongLength);
            }
            w.Flush();
            Pad(f);
            foreach (var t in _tensors)
            {
                f.Write(t.Data);
                Pad(f);
            }
        }
        File.Move(tmp, path, overwrite: true);
    }

    private static long Align(long x) => (x + Alignment - 1) / Alignment * Alignment;

    private static void Pad(Stream f)
    {
        long pad = Align(f.Position) - f.Position;
        for (long i = 0; i < pad; i++) f.WriteByte(0);
    }

    private static void Str(BinaryWriter w, string s)
    {
        var b = Encoding.UTF8.GetBytes(s);
        w.Write((ulong)b.Length);
        w.Write(b);
    }

    /// <summary>
    /// A llama-architecture GGUF of <paramref name="w"/> with its linear weights, embedding and LM head stored as
    /// <paramref name="type"/> (F32, BF16, Q8_0 or Q4_0; a matrix whose rows are not whole 32-blocks stays F32), norms
    /// F32, and a synthetic SentencePiece-style vocabulary (&lt;unk&gt;, &lt;s&gt;, &lt;/s&gt;, the 256 byte tokens, then
    /// placeholders) of the model's size, enough for llama.cpp to load and run it.
    /// </summary>
    /// <remarks>
    /// llama.cpp's llama rotates interleaved pairs (2i, 2i+1); a model with Hugging Face "rotate half" rope gets its
    /// q/k rows permuted per head like llama.cpp's convert_hf_to_gguf (row i and i+HS/2 become 2i and 2i+1).
    /// A tied model writes no output.weight (llama.cpp then uses token_embd).
    /// </remarks>
    public static void WriteLlama(LlamaWeights w, DType type, string path, string name = "ftn")
    {
        var c = w.Config;
        var b = w.Embedding.Backend;
        var g = new GgufWriter();
        uint fileType = type switch { DType.F32 => 0u, DType.F16 => 1u, DType.BF16 => 32u, DType.Q8_0 => 7u, DType.Q4_0 => 2u, _ => throw new ArgumentException($"cannot write {type.Name()} GGUF") };
        g.Add("general.architecture", "llama").Add("general.name", name).Add("general.alignment", (uint)Alignment)
            .Add("llama.context_length", (uint)c.MaxPositions).Add("llama.embedding_length", (uint)c.HiddenSize)
            .Add("llama.block_count", (uint)c.NumLayers).Add("llama.feed_forward_length", (uint)c.IntermediateSize)
            .Add("llama.rope.dimension_count", (uint)c.HeadDim).Add("llama.attention.head_count", (uint)c.NumHeads)
            .Add("llama.attention.head_count_kv", (uint)c.NumKvHeads).Add("llama.attention.key_length", (uint)c.HeadDim)
            .Add("llama.attention.value_length", (uint)c.HeadDim)
            .Add("llama.attention.layer_norm_rms_epsilon", c.RmsNormEps).Add("llama.rope.freq_base", c.RopeTheta)
            .Add("llama.vocab_size", (uint)c.VocabSize).Add("general.file_type", fileType);
        var (tokens, scores, types) = SyntheticVocab(c.VocabSize);
        g.Add("tokenizer.ggml.model", "llama").Add("tokenizer.ggml.tokens", tokens).Add("tokenizer.ggml.scores", scores)
            .Add("tokenizer.ggml.token_type", types).Add("tokenizer.ggml.bos_token_id", 1u).Add("tokenizer.ggml.eos_token_id", 2u)
            .Add("tokenizer.ggml.unknown_token_id", 0u).Add("tokenizer.ggml.add_bos_token", false);

        void Put(string n, Tensor t, DType d, int rows, int cols, bool permuteHeads = false)
        {
            var host = new float[t.Length];
            if (t.DType.IsBlockQuantized()) throw new ArgumentException($"{t.Describe()}: write GGUF from an f32/bf16 model");
            b.Download(t, host);
            if (permuteHeads && c.RopeLayout == RopeLayout.RotateHalf) host = InterleaveHeads(host, rows / c.HeadDim, c.HeadDim, cols);
            if (d.IsBlockQuantized() && cols % 32 != 0) d = DType.F32;
            byte[] data;
            GgmlType gt;
            switch (d)
            {
                case DType.F32:
                    data = new byte[host.Length * 4L];
                    Buffer.BlockCopy(host, 0, data, 0, data.Length);
                    gt = GgmlType.F32;
                    break;
                case DType.BF16:
                    data = new byte[host.Length * 2L];
                    for (long i = 0; i < host.Length; i++) { ushort h = HalfBits.F32ToBf16(host[i]); data[2 * i] = (byte)h; data[2 * i + 1] = (byte)(h >> 8); }
                    gt = GgmlType.BF16;
                    break;
                case DType.F16:
                    data = new byte[host.Length * 2L];
                    for (long i = 0; i < host.Length; i++) { ushort h = HalfBits.F32ToF16(host[i]); data[2 * i] = (byte)h; data[2 * i + 1] = (byte)(h >> 8); }
                    gt = GgmlType.F16;
                    break;
                default:
                    data = new byte[d.StorageBytes(host.Length)];
                    int rb = (int)d.StorageBytes(cols);
                    Parallel.For(0, rows, r => QuantBlocks.Quantize(d, host.AsSpan(r * cols, cols), data.AsSpan(r * rb, rb)));
                    gt = d == DType.Q8_0 ? GgmlType.Q8_0 : GgmlType.Q4_0;
                    break;
            }
            g.AddTensor(n, rows == 1 ? new long[] { cols } : new long[] { cols, rows }, gt, data);
        }

        int C = c.HiddenSize, F = c.IntermediateSize, Q = c.QDim, KV = c.KvDim;
        Put("token_embd.weight", w.Embedding, type, c.VocabSize, C);
        for (int i = 0; i < c.NumLayers; i++)
        {
            var L = w.Layers[i];
            if (L.Bq is not null) throw new NotSupportedException("GGUF llama export: attention biases are not written (llama arch has none)");
            string p = $"blk.{i}.";
            Put(p + "attn_norm.weight", L.AttnNorm, DType.F32, 1, C);
            Put(p + "attn_q.weight", L.Wq, type, Q, C, permuteHeads: true);
            Put(p + "attn_k.weight", L.Wk, type, KV, C, permuteHeads: true);
            Put(p + "attn_v.weight", L.Wv, type, KV, C);
            Put(p + "attn_output.weight", L.Wo, type, C, Q);
            Put(p + "ffn_norm.weight", L.FfnNorm, DType.F32, 1, C);
            Put(p + "ffn_gate.weight", L.Wgate, type, F, C);
            Put(p + "ffn_up.weight", L.Wup, type, F, C);
            Put(p + "ffn_down.weight", L.Wdown, type, C, F);
        }
        Put("output_norm.weight", w.FinalNorm, DType.F32, 1, C);
        if (w.LmHead is not null) Put("output.weight", w.LmHead, type, c.VocabSize, C);
        g.Write(path);
    }

    /// <summary>Per head of <paramref name="hs"/> rows: row i (i &lt; hs/2) goes to 2i, row i + hs/2 to 2i + 1.</summary>
    internal static float[] InterleaveHeads(float[] w, int heads, int hs, int cols)
    {
        var o = new float[w.Length];
        int half = hs / 2;
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < hs; i++)
            {
                int dst = i < half ? 2 * i : 2 * (i - half) + 1;
                Array.Copy(w, ((long)h * hs + i) * cols, o, ((long)h * hs + dst) * cols, cols);
            }
        return o;
    }

    private static (string[] Tokens, float[] Scores, int[] Types) SyntheticVocab(int v)
    {
        var tokens = new string[v];
        var scores = new float[v];
        var types = new int[v];
        for (int i = 0; i < v; i++)
        {
            if (i == 0) { tokens[i] = "<unk>"; types[i] = 2; }
            else if (i == 1) { tokens[i] = "<s>"; types[i] = 3; }
            else if (i == 2) { tokens[i] = "</s>"; types[i] = 3; }
            else if (i < 3 + 256) { tokens[i] = $"<0x{i - 3:X2}>"; types[i] = 6; }
            else { tokens[i] = $"▁t{i}"; types[i] = 1; scores[i] = -i; }
        }
        return (tokens, scores, types);
    }
}

/// <summary>Reads a GGUF v2/v3 header: metadata values and tensor infos (data offsets absolute in the file).</summary>
public sealed class GgufReader
{
    public uint Version { get; private init; }
    public Dictionary<string, object> Metadata { get; } = new();
    public List<GgufTensorInfo> Tensors { get; } = new();
    public long DataStart { get; private set; }
    public string Path { get; private init; } = "";

    public static GgufReader Open(string path)
    {
        using var f = File.OpenRead(path);
        using var r = new BinaryReader(f, Encoding.UTF8);
        if (f.Length < 24 || r.ReadUInt32() != 0x46554747) throw new InvalidDataException($"{path}: not a GGUF file (bad magic)");
        uint version = r.ReadUInt32();
        if (version is not (2 or 3)) throw new InvalidDataException($"{path}: GGUF version {version} (expected 2 or 3)");
        var g = new GgufReader { Version = version, Path = path };
        ulong nt = r.ReadUInt64(), nkv = r.ReadUInt64();
        if (nt > 1_000_000 || nkv > 1_000_000) throw new InvalidDataException($"{path}: implausible counts ({nt} tensors, {nkv} metadata keys)");
        for (ulong i = 0; i < nkv; i++)
        {
            string key = Str(r, path);
            g.Metadata[key] = Value(r, r.ReadUInt32(), path, key);
        }
        var raw = new List<(string, long[], GgmlType, long)>();
        for (ulong i = 0; i < nt; i++)
        {
            string name = Str(r, path);
            uint nd = r.ReadUInt32();
            if (nd > 4) throw new InvalidDataException($"{path}: tensor {name} has {nd} dimensions");
            var ne = new long[nd];
            for (int d = 0; d < nd; d++) ne[d] = (long)r.ReadUInt64();
            raw.Add((name, ne, (GgmlType)r.ReadUInt32(), (long)r.ReadUInt64()));
        }
        long align = g.Metadata.TryGetValue("general.alignment", out var a) ? Convert.ToInt64(a) : 32;
        g.DataStart = (f.Position + align - 1) / align * align;
        foreach (var (name, ne, type, off) in raw)
        {
            var info = new GgufTensorInfo(name, ne, type, g.DataStart + off);
            if (info.Offset + info.Bytes > f.Length) throw new InvalidDataException($"{path}: tensor {name} runs past the end of the file");
            g.Tensors.Add(info);
        }
        return g;
    }

    /// <summary>The raw payload of one tensor.</summary>
    public byte[] ReadTensor(GgufTensorInfo t)
    {
        using var f = File.OpenRead(Path);
        f.Position = t.Offset;
        var data = new byte[t.Bytes];
        f.ReadExactly(data);
        return data;
    }

    private static string Str(BinaryReader r, string path)
    {
        ulong n = r.ReadUInt64();
        if (n > 1 << 24) throw new InvalidDataException($"{path}: string of {n} bytes");
        return Encoding.UTF8.GetString(r.ReadBytes((int)n));
    }

    private static object Value(BinaryReader r, uint type, string path, string key) => type switch
    {
        0 => r.ReadByte(), 1 => r.ReadSByte(), 2 => r.ReadUInt16(), 3 => r.ReadInt16(),
        4 => r.ReadUInt32(), 5 => r.ReadInt32(), 6 => r.ReadSingle(), 7 => r.ReadByte() != 0,
        8 => Str(r, path),
        9 => Array(r, path, key),
        10 => r.ReadUInt64(), 11 => r.ReadInt64(), 12 => r.ReadDouble(),
        _ => throw new InvalidDataException($"{path}: metadata '{key}' has unknown type {type}"),
    };

    private static object Array(BinaryReader r, string path, string key)
    {
        uint et = r.ReadUInt32();
        ulong n = r.ReadUInt64();
        if (n > 1 << 26) throw new InvalidDataException($"{path}: metadata array '{key}' of {n} elements");
        var a = new object[n];
        for (ulong i = 0; i < n; i++) a[i] = Value(r, et, path, key);
        return a;
    }
}
