using System.Buffers.Binary;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Runtime.IO;

/// <summary>
/// Loads a Llama-family model onto a backend from a Hugging Face model directory (config.json +
/// model.safetensors or a sharded index) or a llama2.c checkpoint (.bin). Every tensor is checked against the
/// one name/shape table, <see cref="LlamaWeights.Schema"/>.
/// </summary>
/// <remarks>
/// dtypes: norms, biases and the embedding become f32; linear weights (and an untied lm_head) become
/// <c>linearDType</c>, by default bf16 when the file holds bf16 and f32 otherwise (f16 widens exactly to f32).
/// On the CPU backend a tensor whose file dtype already matches is a zero-copy view of the memory-mapped
/// file; everywhere else it is uploaded (converted) once.
/// </remarks>
public static class ModelLoader
{
    /// <summary>Tensors some exporters add that carry no parameters of ours (recomputed from the config).</summary>
    private static bool IsIgnorable(string name) => name.EndsWith(".rotary_emb.inv_freq", StringComparison.Ordinal);

    /// <param name="path">An HF model directory (or its config.json / a .safetensors / the index file), or a llama2.c .bin.</param>
    /// <param name="backend">Where the weights live.</param>
    /// <param name="linearDType">F32 or BF16 for the linear weights; null keeps bf16 files bf16 and makes everything else f32.</param>
    /// <param name="tokenizerPath">
    /// A tokenizer file or directory for <see cref="TokenizerLoader.Load"/>. When null, the model's own is used if
    /// present: tokenizer.json / tokenizer.model in an HF directory; tokenizer.bin, else the only tok*.bin
    /// (llama2.c's naming, e.g. tok512.bin), next to a llama2.c checkpoint.
    /// </param>
    public static LoadedModel Load(string path, IBackend backend, DType? linearDType = null, string? tokenizerPath = null)
    {
        var m = LoadWeights(path, backend, linearDType);
        try
        {
            m.Tokenizer = LoadTokenizer(m, tokenizerPath);
            return m;
        }
        catch
        {
            m.Dispose();
            throw;
        }
    }

    private static ITextTokenizer? LoadTokenizer(LoadedModel m, string? tokenizerPath)
    {
        string? source = tokenizerPath;
        if (source is null)
        {
            string dir = m.Format == "hf" ? m.Path : System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(m.Path))!;
            string[] names = m.Format == "hf" ? new[] { "tokenizer.json", "tokenizer.model" } : new[] { "tokenizer.bin" };
            source = names.Select(n => System.IO.Path.Combine(dir, n)).FirstOrDefault(File.Exists);
            if (source is null && m.Format == "llama2c")
            {
                var tokBins = Directory.GetFiles(dir, "tok*.bin");
                if (tokBins.Length == 1) source = tokBins[0];
            }
            if (source is null) return null;
        }
        var tok = TokenizerLoader.Load(source);
        int v = m.Weights.Config.VocabSize;
        if (tok.VocabSize > v)
            throw new InvalidDataException($"{source}: tokenizer has {tok.VocabSize} ids but the model at {m.Path} has a vocabulary of {v}");
        return tok;
    }

    private static LoadedModel LoadWeights(string path, IBackend backend, DType? linearDType)
    {
        ArgumentNullException.ThrowIfNull(backend);
        if (linearDType is DType ld && ld is not (DType.F32 or DType.BF16))
            throw new ArgumentException($"linear weights can be f32 or bf16, not {ld.Name()}", nameof(linearDType));
        if (Directory.Exists(path)) return LoadHf(path, backend, linearDType);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no such model file or directory", path);
        string file = System.IO.Path.GetFileName(path);
        if (file.EndsWith(".bin", StringComparison.OrdinalIgnoreCase) && file != "pytorch_model.bin")
            return LoadLlama2c(path, backend, linearDType);
        if (file == "config.json" || file.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) || file.EndsWith(".index.json", StringComparison.OrdinalIgnoreCase))
            return LoadHf(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!, backend, linearDType);
        throw new InvalidDataException($"{path}: not a model: expected a Hugging Face model directory (config.json + *.safetensors) or a llama2.c checkpoint (.bin)" +
            (file == "pytorch_model.bin" ? "; PyTorch pickle checkpoints are not read, convert to safetensors" : ""));
    }

    // ------------------------------------------------------------------------------------------ Hugging Face

    private static LoadedModel LoadHf(string dir, IBackend backend, DType? linearDType)
    {
        string configPath = System.IO.Path.Combine(dir, "config.json");
        if (!File.Exists(configPath)) throw new FileNotFoundException($"{dir}: no config.json (not a Hugging Face model directory)", configPath);
        var cfg = LlamaConfig.FromHfJson(configPath);
        var st = SafeTensors.Open(dir);
        var resources = new List<IDisposable> { st };
        try
        {
            var schema = LlamaWeights.Schema(cfg).ToList();
            var problems = new List<string>();
            var expected = new HashSet<string>(schema.Select(s => s.Name), StringComparer.Ordinal);
            var sources = new Dictionary<string, Source>(StringComparer.Ordinal);
            foreach (var (name, shape) in schema)
            {
                if (!st.Contains(name)) { problems.Add($"missing tensor '{name}' (expected shape [{string.Join(", ", shape)}])"); continue; }
                var info = st.Info(name);
                if (!info.Shape.SequenceEqual(shape))
                    problems.Add($"tensor '{name}' in {System.IO.Path.GetFileName(info.File)} has shape {info.ShapeText}, expected [{string.Join(", ", shape)}]");
                else if (info.DTypeName is not ("F32" or "BF16" or "F16"))
                    problems.Add($"tensor '{name}' in {System.IO.Path.GetFileName(info.File)} has dtype {info.DTypeName}, expected F32, BF16 or F16");
                else sources[name] = new Source(name, info.DTypeName, info.Shape, st);
            }
            foreach (string name in st.Names)
            {
                if (expected.Contains(name) || IsIgnorable(name)) continue;
                // A tied model may still carry a copy of the head; the embedding is what the model uses.
                if (name == "lm_head.weight" && cfg.TieWordEmbeddings) continue;
                problems.Add($"unexpected tensor '{name}' {st.Info(name).ShapeText} in {System.IO.Path.GetFileName(st.Info(name).File)} (not part of a {cfg.Architecture} with this config)");
            }
            if (problems.Count > 0)
                throw new InvalidDataException($"{dir}: checkpoint does not match config.json ({problems.Count} problem{(problems.Count > 1 ? "s" : "")}):\n  " +
                    string.Join("\n  ", problems.Take(20)) + (problems.Count > 20 ? $"\n  ... and {problems.Count - 20} more" : ""));

            var linear = linearDType ?? (sources.Values.Any(s => s.DTypeName == "BF16" && IsLinearName(s.Name)) ? DType.BF16 : DType.F32);
            var (weights, zeroCopy) = Build(cfg, backend, linear, sources, resources);
            var dtypes = sources.ToDictionary(kv => kv.Key, kv => kv.Value.DTypeName, StringComparer.Ordinal);
            return new LoadedModel(weights, dir, "hf", dtypes, zeroCopy, resources);
        }
        catch
        {
            for (int i = resources.Count - 1; i >= 0; i--) resources[i].Dispose();
            throw;
        }
    }

    // ------------------------------------------------------------------------------------------ llama2.c

    /// <summary>
    /// Reads the config of a llama2.c "version 0" checkpoint (what run.c reads): 7 little-endian int32
    /// (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); vocab_size &lt; 0 means the
    /// classifier is stored separately at the end.
    /// </summary>
    public static LlamaConfig ReadLlama2cConfig(string path, out bool sharedClassifier)
    {
        var h = new byte[28];
        using (var fs = File.OpenRead(path))
        {
            if (fs.Length < 28) throw new InvalidDataException($"{path}: {fs.Length} bytes is too short for a llama2.c checkpoint (28-byte header)");
            fs.ReadExactly(h);
        }
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(h);
        if (magic == 0x616b3432)
            throw new InvalidDataException($"{path}: llama2.c export version {BinaryPrimitives.ReadInt32LittleEndian(h.AsSpan(4))} (\"ak42\" header) is not supported; export with --version 0 (the legacy run.c format)");
        int I(int i) => BinaryPrimitives.ReadInt32LittleEndian(h.AsSpan(4 * i));
        int dim = I(0), hidden = I(1), layers = I(2), heads = I(3), kvHeads = I(4), vocab = I(5), seqLen = I(6);
        void Req(bool ok, string what)
        {
            if (!ok) throw new InvalidDataException($"{path}: llama2.c header {what} (header: dim={dim} hidden_dim={hidden} " +
                $"n_layers={layers} n_heads={heads} n_kv_heads={kvHeads} vocab_size={vocab} seq_len={seqLen})");
        }
        Req(dim > 0 && hidden > 0 && layers > 0 && heads > 0 && seqLen > 0, "has a non-positive dimension");
        Req(kvHeads > 0 && heads % kvHeads == 0, "n_kv_heads must divide n_heads");
        Req(dim % heads == 0 && (dim / heads) % 2 == 0, "dim / n_heads must be an even head size");
        Req(vocab != 0 && vocab != int.MinValue, "vocab_size must be non-zero");
        sharedClassifier = vocab > 0;
        var cfg = new LlamaConfig
        {
            ModelType = "llama",
            Architecture = "LlamaForCausalLM",
            HiddenSize = dim,
            IntermediateSize = hidden,
            NumLayers = layers,
            NumHeads = heads,
            NumKvHeads = kvHeads,
            HeadDim = dim / heads,
            VocabSize = Math.Abs(vocab),
            MaxPositions = seqLen,
            RmsNormEps = 1e-5f,        // run.c rmsnorm
            RopeTheta = 10000f,        // run.c RoPE
            TieWordEmbeddings = sharedClassifier,
            RopeLayout = RopeLayout.Interleaved,
            BosTokenId = 1,
            // llama2.c's training data delimits stories with BOS, so run.c stops when the model emits 1; 2 is </s>.
            EosTokenIds = new[] { 2, 1 },
            TorchDtype = "float32",
        };
        cfg.Validate(path);
        return cfg;
    }

    private static LoadedModel LoadLlama2c(string path, IBackend backend, DType? linearDType)
    {
        var cfg = ReadLlama2cConfig(path, out bool shared);
        long C = cfg.HiddenSize, F = cfg.IntermediateSize, L = cfg.NumLayers, V = cfg.VocabSize, Q = cfg.QDim, KV = cfg.KvDim;
        long HS = cfg.HeadDim, S = cfg.MaxPositions;
        long floats = V * C + L * C + L * Q * C + 2 * L * KV * C + L * C * Q + L * C + 3 * L * F * C + C
            + 2 * S * (HS / 2) + (shared ? 0 : V * C);
        long expectedBytes = 28 + 4 * floats;
        long actual = new FileInfo(path).Length;
        if (actual != expectedBytes)
            throw new InvalidDataException($"{path}: llama2.c checkpoint is {actual} bytes but its header (dim={C} hidden_dim={F} n_layers={L} n_heads={cfg.NumHeads} " +
                $"n_kv_heads={cfg.NumKvHeads} vocab_size={(shared ? V : -V)} seq_len={S}) needs {expectedBytes} (truncated, or not the legacy version-0 format)");

        var mf = MappedFile.Open(path);
        var resources = new List<IDisposable> { mf };
        try
        {
            var sources = new Dictionary<string, Source>(StringComparer.Ordinal);
            long offset = 28;
            // Arrays in file order; each stacks the L layers' matrices, every matrix (out, in) row-major like nn.Linear.
            void Stacked(Func<int, string> name, params int[] shape)
            {
                long per = 1;
                foreach (int d in shape) per *= d;
                for (int i = 0; i < L; i++) sources[name(i)] = new Source(name(i), "F32", shape, mf, offset + 4 * per * i);
                offset += 4 * per * L;
            }
            int c = (int)C, f = (int)F, q = (int)Q, kv = (int)KV, v = (int)V;
            sources["model.embed_tokens.weight"] = new Source("model.embed_tokens.weight", "F32", new[] { v, c }, mf, offset);
            offset += 4 * V * C;
            Stacked(i => $"model.layers.{i}.input_layernorm.weight", c);
            Stacked(i => $"model.layers.{i}.self_attn.q_proj.weight", q, c);
            Stacked(i => $"model.layers.{i}.self_attn.k_proj.weight", kv, c);
            Stacked(i => $"model.layers.{i}.self_attn.v_proj.weight", kv, c);
            Stacked(i => $"model.layers.{i}.self_attn.o_proj.weight", c, q);
            Stacked(i => $"model.layers.{i}.post_attention_layernorm.weight", c);
            Stacked(i => $"model.layers.{i}.mlp.gate_proj.weight", f, c);   // w1
            Stacked(i => $"model.layers.{i}.mlp.down_proj.weight", c, f);   // w2
            Stacked(i => $"model.layers.{i}.mlp.up_proj.weight", f, c);     // w3
            sources["model.norm.weight"] = new Source("model.norm.weight", "F32", new[] { c }, mf, offset);
            offset += 4 * C;
            offset += 4 * 2 * S * (HS / 2);  // legacy freq_cis_real and freq_cis_imag, (seq_len, HS/2) each: recomputed by RoPE
            if (!shared)
            {
                sources["lm_head.weight"] = new Source("lm_head.weight", "F32", new[] { v, c }, mf, offset);
                offset += 4 * V * C;
            }
            if (offset != expectedBytes) throw new InvalidOperationException($"{path}: internal layout error ({offset} != {expectedBytes})");

            // The table is the contract: the llama2.c layout must produce exactly the HF schema.
            var schema = LlamaWeights.Schema(cfg).ToList();
            foreach (var (name, shape) in schema)
                if (!sources.TryGetValue(name, out var s) || !s.Shape.SequenceEqual(shape))
                    throw new InvalidOperationException($"{path}: llama2.c layout does not produce '{name}' [{string.Join(", ", shape)}]");
            if (sources.Count != schema.Count) throw new InvalidOperationException($"{path}: llama2.c layout produced {sources.Count} tensors, schema has {schema.Count}");

            var (weights, zeroCopy) = Build(cfg, backend, linearDType ?? DType.F32, sources, resources);
            var dtypes = sources.ToDictionary(kv2 => kv2.Key, _ => "F32", StringComparer.Ordinal);
            return new LoadedModel(weights, path, "llama2c", dtypes, zeroCopy, resources);
        }
        catch
        {
            for (int i = resources.Count - 1; i >= 0; i--) resources[i].Dispose();
            throw;
        }
    }

    // ------------------------------------------------------------------------------------------ building

    /// <summary>Where one parameter's bytes are: a tensor of an opened safetensors checkpoint, or a raw range of a mapped file.</summary>
    private sealed class Source
    {
        public Source(string name, string dtypeName, int[] shape, SafeTensors st)
        {
            Name = name; DTypeName = dtypeName; Shape = shape; SafeTensors = st;
        }

        public Source(string name, string dtypeName, int[] shape, MappedFile file, long offset)
        {
            Name = name; DTypeName = dtypeName; Shape = shape; File = file; Offset = offset;
        }

        public string DTypeName { get; }
        public int[] Shape { get; }
        public SafeTensors? SafeTensors { get; }
        public MappedFile? File { get; }
        public long Offset { get; }
        public string Name { get; }
        public long Count { get { long n = 1; foreach (int d in Shape) n *= d; return n; } }
        public long Bytes => Count * SafeTensors.ElementSize(DTypeName);

        public unsafe IntPtr Pointer(out IDisposable lease)
        {
            if (SafeTensors is not null)
            {
                SafeTensors.TryGetPointer(Name, out var p, out lease);
                return p;
            }
            lease = File!.Lease();
            return (IntPtr)File.Pointer(Offset);
        }

        public unsafe ReadOnlySpan<byte> Raw() =>
            SafeTensors is not null ? SafeTensors.RawBytes(Name) : File!.Span(Offset, Bytes);

        public unsafe void ReadFloats(Span<float> dst)
        {
            if (SafeTensors is not null) { SafeTensors.Read(Name, dst); return; }
            // llama2.c files are f32 only.
            new ReadOnlySpan<float>(File!.Pointer(Offset), (int)Count).CopyTo(dst);
        }
    }

    private static bool IsLinearName(string name) =>
        name == "lm_head.weight" || (name.EndsWith("_proj.weight", StringComparison.Ordinal) && name.StartsWith("model.layers.", StringComparison.Ordinal));

    /// <summary>Creates every parameter on the backend and assembles the weights (disposes what it made on failure).</summary>
    private static (LlamaWeights Weights, int ZeroCopy) Build(LlamaConfig cfg, IBackend backend, DType linearDType,
        Dictionary<string, Source> sources, List<IDisposable> resources)
    {
        var made = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        int zeroCopy = 0;
        try
        {
            foreach (var (name, src) in sources)
            {
                var dtype = IsLinearName(name) ? linearDType : DType.F32;
                var t = Materialize(backend, dtype, src, out bool wrapped);
                t.Name = name;
                made[name] = t;
                if (wrapped) zeroCopy++;
            }
            var layers = new LlamaLayerWeights[cfg.NumLayers];
            Tensor? Opt(string n) => made.TryGetValue(n, out var t) ? t : null;
            for (int i = 0; i < cfg.NumLayers; i++)
            {
                string p = $"model.layers.{i}";
                layers[i] = new LlamaLayerWeights
                {
                    AttnNorm = made[$"{p}.input_layernorm.weight"],
                    Wq = made[$"{p}.self_attn.q_proj.weight"],
                    Wk = made[$"{p}.self_attn.k_proj.weight"],
                    Wv = made[$"{p}.self_attn.v_proj.weight"],
                    Wo = made[$"{p}.self_attn.o_proj.weight"],
                    Bq = Opt($"{p}.self_attn.q_proj.bias"),
                    Bk = Opt($"{p}.self_attn.k_proj.bias"),
                    Bv = Opt($"{p}.self_attn.v_proj.bias"),
                    FfnNorm = made[$"{p}.post_attention_layernorm.weight"],
                    Wgate = made[$"{p}.mlp.gate_proj.weight"],
                    Wup = made[$"{p}.mlp.up_proj.weight"],
                    Wdown = made[$"{p}.mlp.down_proj.weight"],
                };
            }
            var weights = new LlamaWeights
            {
                Config = cfg,
                Embedding = made["model.embed_tokens.weight"],
                Layers = layers,
                FinalNorm = made["model.norm.weight"],
                LmHead = cfg.TieWordEmbeddings ? null : made["lm_head.weight"],
            };
            return (weights, zeroCopy);
        }
        catch
        {
            foreach (var t in made.Values) t.Dispose();
            throw;
        }
    }

    /// <summary>One parameter on the backend: a view of the mapped file when the backend can wrap host memory and the dtype matches, else an upload.</summary>
    private static Tensor Materialize(IBackend backend, DType dtype, Source src, out bool wrapped)
    {
        wrapped = false;
        var srcDType = SafeTensors.ToDType(src.DTypeName);
        if (srcDType == dtype && TryWrap(backend, dtype, src) is Tensor view)
        {
            wrapped = true;
            return view;
        }
        var t = backend.Allocate(dtype, src.Shape);
        try
        {
            if (srcDType == dtype && src.Bytes <= int.MaxValue) backend.UploadRaw(t, src.Raw());
            else
            {
                var tmp = new float[src.Count];
                src.ReadFloats(tmp);
                backend.Upload(t, tmp);
            }
            return t;
        }
        catch
        {
            t.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Zero-copy view over the mapping (CPU backend), holding a lease on it until the tensor is disposed.
    /// Null where the backend keeps its own memory. The mapping is copy-on-write, so a parameter that is later
    /// trained in place gets private pages and the file is never modified.
    /// </summary>
    private static Tensor? TryWrap(IBackend backend, DType dtype, Source src)
    {
        if (backend is not CpuBackend cpu || dtype is not (DType.F32 or DType.BF16)) return null;
        IntPtr p = src.Pointer(out var lease);
        try
        {
            return cpu.WrapExternal(dtype, src.Shape, p, lease);
        }
        catch
        {
            lease.Dispose();
            throw;
        }
    }
}
