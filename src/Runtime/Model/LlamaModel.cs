using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// The training-time Llama-family model: forward with saved activations and a hand-written backward, written
/// only against <see cref="IBackend"/>. LoRA adapters attach per (layer, linear); with <see cref="TrainBase"/>
/// every base parameter gets an f32 gradient too (full training, used to pretrain from scratch).
/// </summary>
/// <remarks>
/// Per layer: x → RMSNorm → q, k, v (+bias) → RoPE(q, k) → causal GQA attention → o_proj → +x →
/// RMSNorm → gate, up → SwiGLU → down_proj → +; then a final RMSNorm and the LM head (tied or not) fused with the
/// cross-entropy in chunks of rows, so the (B·T, V) logits never exist at once.
/// Each of the seven linears is a plain MatMul, or the fused LoRA linear when a <see cref="LoraSlot"/> is set.
/// The loss is a sum over the tokens whose target is not <see cref="IgnoreIndex"/>; the backward accumulates
/// (+=) the gradients of lossScale·Σloss into LoRA DA/DB and, when <see cref="TrainBase"/>, into the base
/// gradients, so micro-batches add up (pass lossScale = 1 / total tokens of the whole batch).
/// </remarks>
public sealed partial class LlamaModel : IDisposable
{
    /// <summary>Targets equal to this are ignored by the loss (PyTorch's default).</summary>
    public const int IgnoreIndex = -100;

    /// <summary>Default floats in one chunk of logits (128 MiB): rows per chunk = this / V.</summary>
    /// <remarks>The head weight is packed again for every chunk: at 16 MiB (85 rows of a 49152 vocab) that cost the
    /// CPU LoRA step 5-9% tokens per CPU-second at the SmolLM2-135M and stories15M shapes (bench peers train-ftn); at
    /// 64 MiB (341 rows) the head's forward and dX products still ran 9% and 5% slower per row than one 512-row
    /// product (bench quick-head 1 cpu). 128 MiB holds both issue shapes' batches (512 × 49152, 1024 × 32000) in one
    /// chunk, for 33-64 MB more peak memory.</remarks>
    public const int DefaultLogitsChunkElements = 1 << 25;

    private const int NumModules = 7;
    private const int ModQ = 0, ModK = 1, ModV = 2, ModO = 3, ModGate = 4, ModUp = 5, ModDown = 6;

    private readonly IBackend _b;
    private readonly LoraSlot?[] _lora;      // [layer * 7 + module]
    private readonly List<TrainingWorkspace> _workspaces = new(); // most recently used first, at most 2
    private LlamaWeights? _grads;            // f32 gradients of every base parameter when TrainBase
    private int _logitsChunkRows;
    private Tensor? _neftuneLengths;        // (B) i32: real tokens per row of the current micro-batch (NEFTune)
    private int[]? _neftuneLengthsHost;
    private bool _disposed;

    public LlamaModel(LlamaWeights weights, IBackend backend)
    {
        Weights = weights ?? throw new ArgumentNullException(nameof(weights));
        _b = backend ?? throw new ArgumentNullException(nameof(backend));
        Validate(weights, backend);
        _lora = new LoraSlot?[Config.NumLayers * NumModules];
    }

    public LlamaWeights Weights { get; }
    public LlamaConfig Config => Weights.Config;
    public IBackend Backend => _b;

    /// <summary>
    /// Rows of logits computed at once by the LM head + cross-entropy (0 = automatic:
    /// <see cref="DefaultLogitsChunkElements"/> / V, at least 1).
    /// </summary>
    public int LogitsChunkRows
    {
        get => _logitsChunkRows;
        set
        {
            if (value < 0) throw new ArgumentOutOfRangeException(nameof(value), "LogitsChunkRows must be >= 0");
            if (value != _logitsChunkRows) { _logitsChunkRows = value; ReleaseWorkspaces(); }
        }
    }

    /// <summary>
    /// NEFTune (Jain et al. 2023): in training steps only, the input embeddings of each row's real tokens get uniform noise
    /// in [-α/√(L·C), α/√(L·C)] (L the row's unpadded length, given to ForwardBackward as rowLengths, else the batch's
    /// sequence length T; C the hidden size), as the paper's code does with the attention mask; padding gets none. 0 = off.
    /// Drawn on the backend by IBackend.NeftuneNoise from the step's dropout seed (a counter hash, <see cref="NeftuneHash"/>),
    /// so a resumed run draws the same noise. The embedding gradient is unchanged by an additive constant.
    /// </summary>
    public float NeftuneAlpha
    {
        get => _neftuneAlpha;
        set
        {
            if (!(value >= 0 && float.IsFinite(value))) throw new ArgumentOutOfRangeException(nameof(value), $"NEFTune alpha must be a finite value >= 0 (got {value})");
            _neftuneAlpha = value;
        }
    }
    private float _neftuneAlpha;

    /// <summary>
    /// Fills <paramref name="noise"/> (T·C per sequence, every token real) with NEFTune's noise of magnitude α/√(T·C) on the
    /// host: element i is NeftuneHash.Noise(stream(seed), i, ·), what IBackend.NeftuneNoise adds for full-length rows.
    /// </summary>
    public static void NeftuneNoise(Span<float> noise, float alpha, int seqLen, int hidden, ulong seed)
    {
        double mag = NeftuneHash.Magnitude(alpha, seqLen, hidden);
        ulong s0 = NeftuneHash.Stream(seed);
        for (int i = 0; i < noise.Length; i++) noise[i] = NeftuneHash.Noise(s0, i, mag);
    }

    /// <summary>Uploads the real tokens per row for the next training forward (all T when none are given).</summary>
    private void SetNeftuneLengths(ReadOnlySpan<int> rowLengths, int batch, int seqLen)
    {
        if (_neftuneAlpha <= 0 || batch <= 0 || seqLen <= 0) return; // Prepare reports bad shapes
        if (!rowLengths.IsEmpty && rowLengths.Length != batch) throw new ArgumentException($"rowLengths has {rowLengths.Length} entries, expected batch = {batch}");
        if (_neftuneLengthsHost is null || _neftuneLengthsHost.Length != batch)
        {
            _neftuneLengths?.Dispose();
            _neftuneLengths = _b.Allocate(DType.I32, batch);
            _neftuneLengths.Name = "neftune_lengths";
            _neftuneLengthsHost = new int[batch];
        }
        if (rowLengths.IsEmpty) Array.Fill(_neftuneLengthsHost, seqLen);
        else rowLengths.CopyTo(_neftuneLengthsHost);
        NeftuneHash.CheckLengths(_neftuneLengthsHost, seqLen, 0, "rowLengths");
        _b.Upload(_neftuneLengths!, _neftuneLengthsHost);
    }

    // ------------------------------------------------------------------------------------------ LoRA

    /// <summary>Attaches (or with null detaches) the LoRA adapter of one linear ("q_proj" ... "down_proj").</summary>
    public void SetLora(int layer, string module, LoraSlot? slot)
    {
        int key = SlotKey(layer, module);
        if (slot is not null)
        {
            var w = Weights.Layers[layer].Linear(module);
            int n = w.Dim(0), k = w.Dim(1);
            string where = $"LoRA {LlamaWeights.LinearPath(layer, module)}";
            if (slot.A.Rank != 2 || slot.A.Dim(1) != k || slot.A.Dim(0) <= 0)
                throw new ArgumentException($"{where}: A is {slot.A.Describe()}, expected (R, {k})");
            int r = slot.A.Dim(0);
            if (slot.B.Rank != 2 || slot.B.Dim(0) != n || slot.B.Dim(1) != r)
                throw new ArgumentException($"{where}: B is {slot.B.Describe()}, expected ({n}, {r})");
            if (slot.DA.Length != slot.A.Length || slot.DB.Length != slot.B.Length)
                throw new ArgumentException($"{where}: DA {slot.DA.Describe()} / DB {slot.DB.Describe()} must match A and B");
            foreach (var t in new[] { slot.A, slot.B, slot.DA, slot.DB })
            {
                if (t.DType != DType.F32) throw new ArgumentException($"{where}: {t.Describe()} must be f32");
                if (t.Backend.Name != _b.Name) throw new ArgumentException($"{where}: {t.Describe()} lives on backend {t.Backend.Name}, the model on {_b.Name}");
            }
            if (!(slot.Dropout >= 0 && slot.Dropout < 1)) throw new ArgumentException($"{where}: dropout {slot.Dropout} must be in [0, 1)");
            if (slot.IsDora) DoraLinear.Validate(slot, n, where, _b.Name);
        }
        _lora[key] = slot;
        foreach (var ws in _workspaces) ws.ForgetLora(key);
    }

    public LoraSlot? GetLora(int layer, string module) => _lora[SlotKey(layer, module)];

    /// <summary>Every attached slot, in layer then module order.</summary>
    public IEnumerable<(int Layer, string Module, LoraSlot Slot)> LoraSlots()
    {
        for (int i = 0; i < _lora.Length; i++)
            if (_lora[i] is { } s) yield return (i / NumModules, LlamaWeights.LinearModules[i % NumModules], s);
    }

    /// <summary>
    /// The dropout seed of slot (layer, module) in a step with seed <paramref name="seed"/>: every slot draws an
    /// independent mask, and the same (seed, layer, module) always draws the same mask on every backend.
    /// </summary>
    public static ulong DropoutSeedFor(ulong seed, int layer, int moduleIndex) =>
        Mix64(seed ^ Mix64((ulong)(layer * 8 + moduleIndex + 1)));

    /// <summary>splitmix64's finaliser on x + golden ratio (Steele, Lea, Flood 2014).</summary>
    private static ulong Mix64(ulong x)
    {
        ulong z = x + 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    private int SlotKey(int layer, string module)
    {
        if ((uint)layer >= (uint)Config.NumLayers)
            throw new ArgumentOutOfRangeException(nameof(layer), $"layer {layer} outside [0, {Config.NumLayers})");
        int m = Array.IndexOf(LlamaWeights.LinearModules, module);
        if (m < 0) throw new ArgumentException($"unknown linear module '{module}' (expected one of {string.Join(", ", LlamaWeights.LinearModules)})");
        return layer * NumModules + m;
    }

    // ------------------------------------------------------------------------------------------ base gradients

    /// <summary>When true, f32 gradients of every base parameter are allocated (zeroed) and accumulated.</summary>
    public bool TrainBase
    {
        get => _grads is not null;
        set
        {
            if (value == TrainBase) return;
            if (value)
            {
                foreach (var (name, t) in Weights.Named())
                    if (t.DType.IsQuantized()) throw new InvalidOperationException($"TrainBase: {name} is {t.DType.Name()} (a frozen quantized base cannot be trained)");
                var g = LlamaWeights.Allocate(Config, _b, DType.F32);
                foreach (var (name, t) in g.Named()) t.Name = "grad " + name;
                _grads = g;
            }
            else
            {
                _grads!.Dispose();
                _grads = null;
                _frozenGrads = null;
            }
        }
    }

    private HashSet<Tensor>? _frozenGrads;    // base gradients the backward skips (parameters kept frozen)

    /// <summary>
    /// Base gradients (tensors from <see cref="BaseParameters"/>) whose parameters stay frozen: the backward does not
    /// compute them (no weight-gradient product for a frozen linear, no norm/embedding/head gradient), and they stay
    /// as they are. Null or empty: every base gradient is computed. Activation gradients still flow through frozen
    /// layers to the trained ones below.
    /// </summary>
    public void SetFrozenBaseGradients(IEnumerable<Tensor>? grads)
    {
        _frozenGrads = grads is null ? null : new HashSet<Tensor>(grads, ReferenceEqualityComparer.Instance);
        if (_frozenGrads is { Count: 0 }) _frozenGrads = null;
    }

    private bool IsFrozen(Tensor? grad) => grad is not null && _frozenGrads is not null && _frozenGrads.Contains(grad);

    /// <summary>The gradient to accumulate into, or null when there is none or its parameter is frozen.</summary>
    private Tensor? Trained(Tensor? grad) => IsFrozen(grad) ? null : grad;

    /// <summary>Every base parameter with its HF name and its f32 gradient (the tied embedding once).</summary>
    public IEnumerable<(string Name, Tensor Param, Tensor Grad)> BaseParameters()
    {
        var g = _grads ?? throw new InvalidOperationException("BaseParameters needs TrainBase = true");
        using var pe = Weights.Named().GetEnumerator();
        using var ge = g.Named().GetEnumerator();
        while (pe.MoveNext())
        {
            if (!ge.MoveNext() || ge.Current.Name != pe.Current.Name)
                throw new InvalidOperationException($"gradient table out of step with the weights at {pe.Current.Name}");
            yield return (pe.Current.Name, pe.Current.Tensor, ge.Current.Tensor);
        }
    }

    /// <summary>Zeroes the LoRA gradients of every attached slot and, when <see cref="TrainBase"/>, every base gradient.</summary>
    public void ZeroGrad()
    {
        foreach (var (_, _, s) in LoraSlots()) { _b.Fill(s.DA, 0); _b.Fill(s.DB, 0); if (s.DMagnitude is not null) _b.Fill(s.DMagnitude, 0); }
        ZeroPeftGrads();
        if (_grads is not null) foreach (var (_, t) in _grads.Named()) _b.Fill(t, 0);
    }

    // ------------------------------------------------------------------------------------------ steps

    /// <summary>
    /// One forward and backward over <paramref name="batch"/> sequences of <paramref name="seqLen"/> tokens.
    /// <paramref name="targets"/> are the next-token ids aligned with <paramref name="tokens"/> (-100 = ignored).
    /// Accumulates (+=) the gradients of lossScale·Σloss into every attached LoRA slot's DA/DB and, when
    /// <see cref="TrainBase"/>, into the base gradients. LoRA dropout masks derive from
    /// <paramref name="dropoutSeed"/> (see <see cref="DropoutSeedFor"/>).
    /// Returns the unscaled sum of the per-token losses and the number of tokens that count.
    /// <paramref name="positions"/> (optional, (B, T)) packs several samples per row: a row is cut into segments
    /// where the position restarts at 0 (it must otherwise grow by 1); RoPE uses these positions and attention
    /// stays inside each segment (block-diagonal), so a packed row computes exactly what its samples would alone.
    /// <paramref name="rowLengths"/> (optional, (B)): the real (unpadded) tokens of each row, for NEFTune's noise and scale.
    /// </summary>
    public (double LossSum, int Count) ForwardBackward(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int batch, int seqLen, float lossScale, ulong dropoutSeed,
        ReadOnlySpan<int> positions = default, ReadOnlySpan<int> rowLengths = default)
    {
        SetNeftuneLengths(rowLengths, batch, seqLen);
        ExpandForPrompt(ref tokens, ref targets, ref seqLen, batch, positions);
        var ws = Prepare(tokens, targets, batch, seqLen, out int count, train: true, positions);
        Forward(ws, train: true, dropoutSeed);
        double loss = HeadAndLoss(ws, computeGrad: true, lossScale);
        Backward(ws, dropoutSeed);
        return (loss, count);
    }

    /// <summary>
    /// <see cref="ForwardBackward"/> without reading the loss back: the per-token losses (0 where the target is ignored)
    /// are copied on the device into <paramref name="losses"/> (f32, <see cref="LossRows"/>(batch, seqLen) elements), so
    /// that a step of several micro-batches waits for the device once, when its caller reads them all together.
    /// Returns the number of tokens that count. The host sum of those floats in order, in double, is what
    /// <see cref="ForwardBackward"/> returns.
    /// </summary>
    public int ForwardBackwardInto(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int batch, int seqLen, float lossScale, ulong dropoutSeed,
        ReadOnlySpan<int> positions, Tensor losses, ReadOnlySpan<int> rowLengths = default)
    {
        SetNeftuneLengths(rowLengths, batch, seqLen);
        ExpandForPrompt(ref tokens, ref targets, ref seqLen, batch, positions);
        var ws = Prepare(tokens, targets, batch, seqLen, out int count, train: true, positions);
        if (losses.DType != DType.F32 || losses.Length != ws.M)
            throw new ArgumentException($"losses ({losses.Describe()}) must be f32 with {ws.M} elements (LossRows of batch {batch})");
        Forward(ws, train: true, dropoutSeed);
        HeadAndLoss(ws, computeGrad: true, lossScale, losses);
        Backward(ws, dropoutSeed);
        return count;
    }

    /// <summary>
    /// <see cref="Loss"/> without reading the loss back: the per-token losses are copied on the device into
    /// <paramref name="losses"/> (f32, <see cref="LossRows"/>(batch, seqLen) elements). Returns the number of tokens that count.
    /// </summary>
    public int LossInto(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int batch, int seqLen, ReadOnlySpan<int> positions, Tensor losses)
    {
        ExpandForPrompt(ref tokens, ref targets, ref seqLen, batch, positions);
        var ws = Prepare(tokens, targets, batch, seqLen, out int count, train: false, positions);
        if (losses.DType != DType.F32 || losses.Length != ws.M)
            throw new ArgumentException($"losses ({losses.Describe()}) must be f32 with {ws.M} elements (LossRows of batch {batch})");
        Forward(ws, train: false, 0);
        HeadAndLoss(ws, computeGrad: false, 0f, losses);
        return count;
    }

    /// <summary>Per-token losses of a (batch, seqLen) micro-batch: B·T, plus B·P with P prompt-tuning virtual tokens per row.</summary>
    public int LossRows(int batch, int seqLen) => checked(batch * (seqLen + PromptLength));

    /// <summary>Evaluation loss (no dropout, no gradients): Σ per-token loss and the token count.</summary>
    public (double LossSum, int Count) Loss(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int batch, int seqLen, ReadOnlySpan<int> positions = default)
    {
        ExpandForPrompt(ref tokens, ref targets, ref seqLen, batch, positions);
        var ws = Prepare(tokens, targets, batch, seqLen, out int count, train: false, positions);
        Forward(ws, train: false, 0);
        return (HeadAndLoss(ws, computeGrad: false, 0f), count);
    }

    private bool _activationCheckpointing;

    /// <summary>
    /// Activation checkpointing: the forward keeps only each layer's input (Resid[l]) and one shared set of layer
    /// activations; the backward recomputes layer l's forward just before its backward. Saves (L − 1) layers of
    /// activations (C + 2·QD + 2·KVD + NH + 2·F floats per token each) for about one more forward per step.
    /// Gradients and losses are identical. Changing it frees the cached workspaces.
    /// </summary>
    public bool ActivationCheckpointing
    {
        get => _activationCheckpointing;
        set { if (value != _activationCheckpointing) { _activationCheckpointing = value; ReleaseWorkspaces(); } }
    }

    /// <summary>Bytes held by the cached activation workspaces (what a step of the last shapes allocated).</summary>
    public long WorkspaceBytes => _workspaces.Sum(w => w.Bytes);

    /// <summary>Frees the cached activation workspaces (they are rebuilt on the next step).</summary>
    public void ReleaseWorkspaces()
    {
        foreach (var ws in _workspaces) ws.Dispose();
        _workspaces.Clear();
    }

    private TrainingWorkspace Prepare(ReadOnlySpan<int> tokens, ReadOnlySpan<int> targets, int batch, int seqLen, out int count, bool train, ReadOnlySpan<int> positions)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (batch <= 0 || seqLen <= 0) throw new ArgumentException($"batch ({batch}) and seqLen ({seqLen}) must be > 0");
        long m = (long)batch * seqLen;
        if (tokens.Length != m) throw new ArgumentException($"tokens has {tokens.Length} ids, expected batch·seqLen = {batch}·{seqLen} = {m}");
        if (targets.Length != m) throw new ArgumentException($"targets has {targets.Length} ids, expected batch·seqLen = {batch}·{seqLen} = {m}");
        int vocab = Config.VocabSize;
        count = 0;
        for (int i = 0; i < tokens.Length; i++)
        {
            if ((uint)tokens[i] >= (uint)vocab)
                throw new ArgumentException($"tokens[{i}] (sequence {i / seqLen}, position {i % seqLen}) = {tokens[i]} is outside the vocabulary [0, {vocab})");
            int t = targets[i];
            if (t == IgnoreIndex) continue;
            if ((uint)t >= (uint)vocab)
                throw new ArgumentException($"targets[{i}] (sequence {i / seqLen}, position {i % seqLen}) = {t} is outside the vocabulary [0, {vocab}) and is not the ignore index {IgnoreIndex}");
            count++;
        }

        var segments = PackedSegments(positions, batch, seqLen);
        var ws = Workspace(batch, seqLen);
        _b.Upload(ws.Tokens, tokens);
        _b.Upload(ws.Targets, targets);
        ws.SetSegments(segments, positions);
        PreparePeft(ws);
        for (int key = 0; key < _lora.Length; key++)
        {
            if (_lora[key] is not { } s) continue;
            var w = LinearWeight(key / NumModules, key % NumModules);
            ws.Lora(key, s.Rank, w.Dim(1), needXDrop: train && s.Dropout > 0, doraN: s.IsDora ? w.Dim(0) : 0);
        }
        return ws;
    }

    /// <summary>
    /// The (start row, length) segments of packed rows, or null when every row is one sequence from position 0
    /// (no positions given, or positions 0..T-1 in every row).
    /// </summary>
    private static (int Start, int Length)[]? PackedSegments(ReadOnlySpan<int> positions, int batch, int seqLen)
    {
        if (positions.IsEmpty) return null;
        if (positions.Length != batch * seqLen) throw new ArgumentException($"positions has {positions.Length} entries, expected batch·seqLen = {batch}·{seqLen}");
        var segs = new List<(int, int)>();
        for (int r = 0; r < batch; r++)
        {
            int start = r * seqLen;
            if (positions[start] != 0) throw new ArgumentException($"positions[{start}] (sequence {r}, position 0) = {positions[start]}: a row must start a segment at 0");
            for (int t = 1; t <= seqLen; t++)
            {
                int i = r * seqLen + t;
                if (t < seqLen && positions[i] == positions[i - 1] + 1) continue;
                if (t < seqLen && positions[i] != 0)
                    throw new ArgumentException($"positions[{i}] (sequence {r}, position {t}) = {positions[i]}: expected {positions[i - 1] + 1} (same segment) or 0 (a new one)");
                segs.Add((start, i - start));
                start = i;
            }
        }
        return segs.Count == batch ? null : segs.ToArray();
    }

    private TrainingWorkspace Workspace(int batch, int seqLen)
    {
        for (int i = 0; i < _workspaces.Count; i++)
        {
            var w = _workspaces[i];
            if (w.Batch != batch || w.SeqLen != seqLen) continue;
            if (i > 0) { _workspaces.RemoveAt(i); _workspaces.Insert(0, w); }
            return w;
        }
        // Keep the training shape and one evaluation shape; a third shape evicts the least recently used.
        if (_workspaces.Count >= 2) { _workspaces[^1].Dispose(); _workspaces.RemoveAt(_workspaces.Count - 1); }
        int rows = _logitsChunkRows > 0 ? _logitsChunkRows : Math.Max(1, DefaultLogitsChunkElements / Config.VocabSize);
        var ws = new TrainingWorkspace(_b, Config, batch, seqLen, rows, _activationCheckpointing, _attentionDType);
        _workspaces.Insert(0, ws);
        return ws;
    }

    // ------------------------------------------------------------------------------------------ forward

    private void Forward(TrainingWorkspace ws, bool train, ulong seed)
    {
        var c = Config;
        int m = ws.M, C = c.HiddenSize, F = c.IntermediateSize;
        float attnScale = 1f / MathF.Sqrt(c.HeadDim);
        _b.EmbeddingForward(ws.Resid[0], ws.Tokens, Weights.Embedding, m, C);
        if (train && _neftuneAlpha > 0) // the real tokens follow the prompt-tuning virtual ones (whose rows PromptForward overwrites)
            _b.NeftuneNoise(ws.Resid[0], _neftuneLengths!, _neftuneAlpha, ws.Batch, ws.SeqLen, C, PromptLength, seed);
        PromptForward(ws);
        var ropePos = RopePositions(ws);
        for (int l = 0; l < c.NumLayers; l++) ForwardLayer(ws, l, train, seed, ropePos, attnScale);
        _b.RmsNormForward(ws.XnF, ws.RstdF, ws.Resid[c.NumLayers], Weights.FinalNorm, m, C, c.RmsNormEps);
    }

    /// <summary>
    /// Layer l: Resid[l] → (saved activations of ws.Layers[l]) → Resid[l + 1]. Deterministic, so the backward can
    /// run it again with <see cref="ActivationCheckpointing"/> and get the same activations bit for bit (dropout
    /// masks derive from the seed, layer and module).
    /// </summary>
    private void ForwardLayer(TrainingWorkspace ws, int l, bool train, ulong seed, Tensor ropePos, float attnScale)
    {
        var c = Config;
        int m = ws.M, C = c.HiddenSize, F = c.IntermediateSize;
        {
            var lw = Weights.Layers[l];
            var s = ws.Layers[l];
            // attention block
            _b.RmsNormForward(ws.Xn, ws.Rstd, ws.Resid[l], lw.AttnNorm, m, C, c.RmsNormEps);
            var (q, k, v) = ProjectionTargets(ws, s); // f32; rounded into s.Q/K/V with bf16 attention (LlamaModel.Attention.cs)
            LinearForward(ws, l, ModQ, q, ws.Xn, train, seed);
            LinearForward(ws, l, ModK, k, ws.Xn, train, seed);
            LinearForward(ws, l, ModV, v, ws.Xn, train, seed);
            RopeAndStoreAttentionInputs(s, q, k, v, ropePos, m);
            if (_prefix is not null)
                PrefixAttentionForward(ws, l, attnScale);
            else if (ws.Segments is null)
                _b.AttentionForward(s.Att, s.Lse, s.Q, s.K, s.V, ws.Batch, ws.SeqLen, ws.SeqLen, ws.SeqLen,
                    c.NumHeads, c.NumKvHeads, c.HeadDim, attnScale);
            else
                // packed rows: one causal attention per segment, on views (B = 1, T = segment length); the segment's
                // lse is stored contiguously at row offset·NH (a private layout read only by the backward below)
                foreach (var (o, n) in ws.Segments)
                    _b.AttentionForward(s.Att.View((long)o * c.QDim, 1, n, c.NumHeads, c.HeadDim), s.Lse.View((long)o * c.NumHeads, 1, c.NumHeads, n),
                        s.Q.View((long)o * c.QDim, 1, n, c.NumHeads, c.HeadDim), s.K.View((long)o * c.KvDim, 1, n, c.NumKvHeads, c.HeadDim),
                        s.V.View((long)o * c.KvDim, 1, n, c.NumKvHeads, c.HeadDim), 1, n, n, n, c.NumHeads, c.NumKvHeads, c.HeadDim, attnScale);
            LinearResidualForward(ws, l, ModO, BottleneckSite.Attention, s.ResidMid, ws.Resid[l], s.Att, train, seed);
            // MLP block
            _b.RmsNormForward(ws.Xn, ws.Rstd, s.ResidMid, lw.FfnNorm, m, C, c.RmsNormEps);
            LinearForward(ws, l, ModGate, s.Gate, ws.Xn, train, seed);
            LinearForward(ws, l, ModUp, s.Up, ws.Xn, train, seed);
            _b.SwiGluForward(ws.H, s.Gate, s.Up, (long)m * F);
            LinearResidualForward(ws, l, ModDown, BottleneckSite.Mlp, ws.Resid[l + 1], s.ResidMid, ws.H, train, seed);
        }
    }

    /// <summary>
    /// LM head + cross-entropy, chunk by chunk of rows. With <paramref name="computeGrad"/>: each chunk's logits
    /// are overwritten by lossScale·dlogits, dXnF rows (ws.DXn) are written (=), and when TrainBase the head's
    /// gradient is accumulated (+=). Returns Σ per-token loss (unscaled); with <paramref name="lossesOut"/> the per-token
    /// losses are copied there on the device instead (no host synchronization) and NaN is returned.
    /// </summary>
    private double HeadAndLoss(TrainingWorkspace ws, bool computeGrad, float lossScale, Tensor? lossesOut = null)
    {
        int C = Config.HiddenSize, V = Config.VocabSize;
        var head = Weights.Output;
        var dHead = Trained(_grads?.Output);
        foreach (var ch in ws.Chunks)
        {
            _b.MatMul(ch.Logits, ch.X, head, null, ch.Rows, V, C, accumulate: false);
            _b.CrossEntropy(ch.Logits, ch.Targets, ch.Losses, ch.Rows, V, IgnoreIndex, lossScale, computeGrad);
            if (!computeGrad) continue;
            _b.MatMulBackwardInput(ch.DX, ch.Logits, head, ch.Rows, V, C, accumulate: false);
            if (dHead is not null) _b.MatMulBackwardWeight(dHead, null, ch.Logits, ch.X, ch.Rows, V, C);
        }
        if (lossesOut is not null)
        {
            _b.Copy(lossesOut, ws.Losses);
            return double.NaN;
        }
        _b.Download(ws.Losses, ws.LossHost);
        double sum = 0;
        foreach (float x in ws.LossHost) sum += x;
        return sum;
    }

    // ------------------------------------------------------------------------------------------ backward

    private void Backward(TrainingWorkspace ws, ulong seed)
    {
        var c = Config;
        int m = ws.M, C = c.HiddenSize, F = c.IntermediateSize;
        float attnScale = 1f / MathF.Sqrt(c.HeadDim);
        var g = _grads;
        if (g is null || _frozenGrads is not null) _b.Fill(ws.NormGradSink, 0); // keeps the never-read sink bounded
        Tensor NormGrad(Tensor? t) => Trained(t) ?? ws.NormGradSink;
        var ropePos = RopePositions(ws);

        // final norm: DXn holds d(final norm output) from the head
        _b.RmsNormBackward(ws.DResid, NormGrad(g?.FinalNorm), ws.DXn, ws.Resid[c.NumLayers], Weights.FinalNorm, ws.RstdF, m, C, accumulate: false);

        for (int l = c.NumLayers - 1; l >= 0; l--)
        {
            var lw = Weights.Layers[l];
            var lg = g?.Layers[l];
            var s = ws.Layers[l];
            // activation checkpointing: every layer shares one set of activation buffers; rebuild layer l's from Resid[l]
            if (ws.SharedLayers) ForwardLayer(ws, l, train: true, seed, ropePos, attnScale);

            // MLP block: Resid[l+1] = ResidMid + down(silu(gate(xn)) ⊙ up(xn)), xn = RMSNorm(ResidMid)
            _b.RmsNormForward(ws.Xn, ws.Rstd, s.ResidMid, lw.FfnNorm, m, C, c.RmsNormEps); // recompute
            _b.SwiGluForward(ws.H, s.Gate, s.Up, (long)m * F);                             // recompute
            LinearBackward(ws, l, ModDown, ws.DH, BottleneckBackward(ws, l, BottleneckSite.Mlp, ws.DResid), ws.H, seed, accumulate: false);
            var dGate = ws.H; // H is no longer read: reuse it for dGate
            _b.SwiGluBackward(dGate, ws.DUp, ws.DH, s.Gate, s.Up, (long)m * F);
            LinearBackward(ws, l, ModGate, ws.DXn, dGate, ws.Xn, seed, accumulate: false);
            LinearBackward(ws, l, ModUp, ws.DXn, ws.DUp, ws.Xn, seed, accumulate: true);
            _b.RmsNormBackward(ws.DResid, NormGrad(lg?.FfnNorm), ws.DXn, s.ResidMid, lw.FfnNorm, ws.Rstd, m, C, accumulate: true);

            // attention block: ResidMid = Resid[l] + o(attn(rope(q(xn)), rope(k(xn)), v(xn))), xn = RMSNorm(Resid[l])
            LinearBackward(ws, l, ModO, ws.DAtt, BottleneckBackward(ws, l, BottleneckSite.Attention, ws.DResid), s.Att, seed, accumulate: false);
            if (_prefix is not null)
                PrefixAttentionBackward(ws, l, attnScale);
            else if (ws.Segments is null)
                _b.AttentionBackward(ws.DQ, ws.DK, ws.DV, ws.DAtt, s.Att, s.Lse, s.Q, s.K, s.V,
                    ws.Batch, ws.SeqLen, ws.SeqLen, c.NumHeads, c.NumKvHeads, c.HeadDim, attnScale);
            else
                foreach (var (o, n) in ws.Segments)
                {
                    long qo = (long)o * c.QDim, ko = (long)o * c.KvDim;
                    _b.AttentionBackward(ws.DQ.View(qo, 1, n, c.NumHeads, c.HeadDim), ws.DK.View(ko, 1, n, c.NumKvHeads, c.HeadDim),
                        ws.DV.View(ko, 1, n, c.NumKvHeads, c.HeadDim), ws.DAtt.View(qo, 1, n, c.NumHeads, c.HeadDim),
                        s.Att.View(qo, 1, n, c.NumHeads, c.HeadDim), s.Lse.View((long)o * c.NumHeads, 1, c.NumHeads, n),
                        s.Q.View(qo, 1, n, c.NumHeads, c.HeadDim), s.K.View(ko, 1, n, c.NumKvHeads, c.HeadDim), s.V.View(ko, 1, n, c.NumKvHeads, c.HeadDim),
                        1, n, n, c.NumHeads, c.NumKvHeads, c.HeadDim, attnScale);
                }
            // RoPE is a rotation: its backward is the inverse rotation of the gradient
            _b.Rope(ws.DQ, ropePos, m, c.NumHeads, c.HeadDim, c.RopeTheta, c.RopeLayout, inverse: true);
            _b.Rope(ws.DK, ropePos, m, c.NumKvHeads, c.HeadDim, c.RopeTheta, c.RopeLayout, inverse: true);
            _b.RmsNormForward(ws.Xn, ws.Rstd, ws.Resid[l], lw.AttnNorm, m, C, c.RmsNormEps); // recompute
            LinearBackward(ws, l, ModQ, ws.DXn, ws.DQ, ws.Xn, seed, accumulate: false);
            LinearBackward(ws, l, ModK, ws.DXn, ws.DK, ws.Xn, seed, accumulate: true);
            LinearBackward(ws, l, ModV, ws.DXn, ws.DV, ws.Xn, seed, accumulate: true);
            // Below layer 0 only the (frozen) embedding waits: skip the last norm backward unless training the base
            // or the prompt's virtual tokens.
            if (l > 0 || g is not null || _prompt is not null)
                _b.RmsNormBackward(ws.DResid, NormGrad(lg?.AttnNorm), ws.DXn, ws.Resid[l], lw.AttnNorm, ws.Rstd, m, C, accumulate: true);
        }
        PromptBackward(ws);
        if (Trained(g?.Embedding) is { } dEmbedding) _b.EmbeddingBackward(dEmbedding, ws.DResid, ws.Tokens, m, C);
    }

    // ------------------------------------------------------------------------------------------ linears

    private Tensor LinearWeight(int layer, int module) => Weights.Layers[layer].Linear(LlamaWeights.LinearModules[module]);

    private LoraParams Params(LoraSlot s, bool train, ulong seed, int layer, int module) =>
        new(s.A, s.B, s.Scale, train ? s.Dropout : 0f, DropoutSeedFor(seed, layer, module));

    /// <summary>
    /// output = residual + linear(x) for o_proj/down_proj. Without a bottleneck adapter at the site the add is part of
    /// the linear (IBackend.MatMulResidual / LoraLinearForwardResidual: in the matmul epilogue on ILGPU, no pass over
    /// ws.Tmp); with one: linear -> ws.Tmp -> adapter -> add.
    /// </summary>
    private void LinearResidualForward(TrainingWorkspace ws, int layer, int module, BottleneckSite site, Tensor output, Tensor residual, Tensor x, bool train, ulong seed)
    {
        if (_bottleneck?[layer * 2 + (int)site] is null)
        {
            LinearForward(ws, layer, module, output, x, train, seed, residual);
            return;
        }
        LinearForward(ws, layer, module, ws.Tmp, x, train, seed);
        BottleneckForward(ws, layer, site, ws.Tmp);
        _b.Add(output, residual, ws.Tmp);
    }

    /// <summary>y(M, N) = [residual +] x(M, K)·Wᵀ [+ bias] [+ LoRA]; residual must not overlap y.</summary>
    private void LinearForward(TrainingWorkspace ws, int layer, int module, Tensor y, Tensor x, bool train, ulong seed, Tensor? residual = null)
    {
        string name = LlamaWeights.LinearModules[module];
        var lw = Weights.Layers[layer];
        var w = lw.Linear(name);
        var bias = lw.LinearBias(name);
        int n = w.Dim(0), k = w.Dim(1);
        int key = layer * NumModules + module;
        if (_lora[key] is not { } s)
        {
            if (residual is null) _b.MatMul(y, x, w, bias, ws.M, n, k, accumulate: false);
            else _b.MatMulResidual(y, residual, x, w, bias, ws.M, n, k);
            return;
        }
        if (s.IsDora)
        {
            var dp = Params(s, train, seed, layer, module);
            var db = ws.Lora(key, s.Rank, k, needXDrop: dp.Dropout > 0, doraN: n);
            DoraLinear.Forward(_b, y, x, w, bias, s, dp, db.U, db.Z!, db.XDrop, dp.Dropout > 0 ? ws.DoraScratchView(ws.M, n) : null, ws.M, n, k);
            if (residual is not null) _b.Add(y, y, residual);
            return;
        }
        var p = Params(s, train, seed, layer, module);
        var buf = ws.Lora(key, s.Rank, k, needXDrop: p.Dropout > 0);
        if (residual is null) _b.LoraLinearForward(y, x, w, bias, p, buf.U, p.Dropout > 0 ? buf.XDrop : null, ws.M, n, k, s.Rank);
        else _b.LoraLinearForwardResidual(y, residual, x, w, bias, p, buf.U, p.Dropout > 0 ? buf.XDrop : null, ws.M, n, k, s.Rank);
    }

    /// <summary>
    /// dx(M, K) (+)= dy·W [+ LoRA path]; accumulates (+=) DA/DB of the slot and, when TrainBase, dW and dBias.
    /// </summary>
    private void LinearBackward(TrainingWorkspace ws, int layer, int module, Tensor dx, Tensor dy, Tensor x, ulong seed, bool accumulate)
    {
        string name = LlamaWeights.LinearModules[module];
        var w = Weights.Layers[layer].Linear(name);
        var lg = _grads?.Layers[layer];
        var dBias = Trained(lg?.LinearBias(name));
        var dW = lg?.Linear(name);
        if (IsFrozen(dW) && dBias is null) dW = null; // a trained bias of a frozen weight still needs the product
        int n = w.Dim(0), k = w.Dim(1);
        int key = layer * NumModules + module;
        if (_lora[key] is not { } s)
        {
            _b.MatMulBackwardInput(dx, dy, w, ws.M, n, k, accumulate);
            if (dW is null) return;
            // a bf16 weight trains in autocast semantics: its gradient product on tensor cores where the backend has them
            if (w.DType == DType.BF16) _b.MatMulBackwardWeightBf16(dW, dBias, dy, x, ws.M, n, k);
            else _b.MatMulBackwardWeight(dW, dBias, dy, x, ws.M, n, k);
            return;
        }
        if (s.IsDora)
        {
            if (dW is not null) throw new InvalidOperationException($"layer {layer} {name}: DoRA with a trained base (TrainBase) is not supported");
            var dp = Params(s, train: true, seed, layer, module);
            var db = ws.Lora(key, s.Rank, k, needXDrop: dp.Dropout > 0, doraN: n);
            DoraLinear.Backward(_b, dx, dy, x, w, s, dp, db.U, db.Z!, db.G, db.XDrop, dp.Dropout > 0 ? ws.DoraScratchView(ws.M, k) : null, ws.M, n, k, accumulate);
            return;
        }
        var p = Params(s, train: true, seed, layer, module);
        var buf = ws.Lora(key, s.Rank, k, needXDrop: p.Dropout > 0);
        _b.LoraLinearBackward(dx, dy, x, w, p, buf.U, p.Dropout > 0 ? buf.XDrop : null, buf.G, s.DA, s.DB, dW, dBias, ws.M, n, k, s.Rank, accumulate);
    }

    // ------------------------------------------------------------------------------------------ checks

    private static void Validate(LlamaWeights w, IBackend b)
    {
        var c = w.Config;
        c.Validate("LlamaModel config");
        var expected = LlamaWeights.Schema(c).ToList();
        var actual = w.Named().ToList();
        for (int i = 0; i < Math.Max(expected.Count, actual.Count); i++)
        {
            if (i >= actual.Count) throw new ArgumentException($"weights lack {expected[i].Name} (config: {DescribeConfig(c)})");
            if (i >= expected.Count) throw new ArgumentException($"weights have an unexpected tensor {actual[i].Name} (config: {DescribeConfig(c)})");
            var (name, shape) = expected[i];
            var t = actual[i].Tensor;
            if (actual[i].Name != name) throw new ArgumentException($"weights: found {actual[i].Name} where {name} was expected (config: {DescribeConfig(c)})");
            if (!t.Shape.SequenceEqual(shape)) throw new ArgumentException($"weights: {name} has shape [{string.Join(", ", t.Shape)}], expected [{string.Join(", ", shape)}]");
            if (t.Backend.Name != b.Name) throw new ArgumentException($"weights: {name} lives on backend {t.Backend.Name}, the model on {b.Name}");
            bool quantizable = t.Rank == 2 && name != "model.embed_tokens.weight";
            if (!(t.DType is DType.F32 or DType.BF16 || (quantizable && t.DType == DType.NF4)))
                throw new ArgumentException($"weights: {name} is {t.DType.Name()}, expected f32 or bf16{(quantizable ? " (or nf4)" : "")}");
        }
    }

    private static string DescribeConfig(LlamaConfig c) =>
        $"L={c.NumLayers} C={c.HiddenSize} tied={c.TieWordEmbeddings} attention_bias={c.AttentionBias}";

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        ReleaseWorkspaces();
        _grads?.Dispose();
        _grads = null;
        _neftuneLengths?.Dispose();
        _neftuneLengths = null;
    }
}
