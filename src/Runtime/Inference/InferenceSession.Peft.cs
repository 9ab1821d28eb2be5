using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Runtime.Inference;

// Generation with a prompt-tuning, prefix-tuning or bottleneck adapter: the virtual tokens / prefix become the first
// cache rows (kept across Reset), bottleneck adapters run on the o_proj and down_proj outputs.
public sealed partial class InferenceSession
{
    private int _basePosition;                       // cache rows that belong to the adapter (prompt or prefix), kept by Reset
    private BottleneckSlot?[]? _adapters;            // [layer * 2 + site]
    private Tensor? _adY, _adH, _adA, _adOnes;       // (chunk, C), (chunk, Bn) ×3
    private (int T, Tensor Y, Tensor H, Tensor A, Tensor Ones)? _adViews;

    /// <summary>Cache rows at the start that hold the prompt/prefix adapter (0 without one); <see cref="Reset"/> keeps them.</summary>
    public int AdapterPositions => _basePosition;

    /// <summary>
    /// Prefix tuning: writes the prefix keys/values into cache rows 0..P-1 of every layer (as given: a cache holds
    /// already-rotated keys, which is how transformers uses PEFT's past_key_values) and starts the sequence at P.
    /// Null removes it (the sequence restarts at 0).
    /// </summary>
    public void SetPrefix(PrefixSlot? prefix)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (prefix is null) { _basePosition = 0; Position = 0; return; }
        int p = prefix.Length, kv = _c.KvDim;
        if (prefix.Values.Dim(0) != _c.NumLayers || prefix.KvDim != kv)
            throw new ArgumentException($"prefix {prefix.Values.Describe()} does not fit this model (L = {_c.NumLayers}, NKV·HS = {kv})");
        if (p >= MaxSeqLen) throw new ArgumentException($"prefix of {p} positions leaves no room in this session's maxSeqLen {MaxSeqLen}");
        for (int l = 0; l < _c.NumLayers; l++)
        {
            _b.Copy(_kCache[l].View(0, p, kv), prefix.Block(l, 0));
            _b.Copy(_vCache[l].View(0, p, kv), prefix.Block(l, 1));
        }
        _basePosition = p;
        Position = p;
    }

    /// <summary>
    /// Prompt tuning: runs the P virtual token embeddings (P, C) through the model at positions 0..P-1 (as PEFT
    /// prepends them to inputs_embeds) so the sequence starts at P. Null removes them.
    /// </summary>
    public void SetPrompt(Tensor? embeddings)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        _basePosition = 0;
        Position = 0;
        if (embeddings is null) return;
        if (embeddings.Rank != 2 || embeddings.Dim(1) != _c.HiddenSize)
            throw new ArgumentException($"prompt embeddings {embeddings.Describe()} must be (P, C = {_c.HiddenSize})");
        int p = embeddings.Dim(0);
        if (p >= MaxSeqLen) throw new ArgumentException($"prompt of {p} virtual tokens leaves no room in this session's maxSeqLen {MaxSeqLen}");
        int C = _c.HiddenSize;
        Span<int> dummy = stackalloc int[Math.Min(p, _chunk)];
        for (int done = 0; done < p;)
        {
            int n = Math.Min(_chunk, p - done);
            Forward(dummy[..n], embeddings.View((long)done * C, n, C));
            done += n;
        }
        _basePosition = p;
    }

    /// <summary>Attaches (or removes) a bottleneck adapter at one site of one layer; all share one size.</summary>
    public void SetBottleneck(int layer, BottleneckSite site, BottleneckSlot? slot)
    {
        if ((uint)layer >= (uint)_c.NumLayers) throw new ArgumentOutOfRangeException(nameof(layer));
        _adapters ??= new BottleneckSlot?[_c.NumLayers * 2];
        if (slot is not null)
        {
            if (slot.Down.Dim(1) != _c.HiddenSize) throw new ArgumentException($"bottleneck adapter {slot.Down.Describe()} does not fit hidden size {_c.HiddenSize}");
            if (_adH is not null && _adH.Dim(1) != slot.Size) throw new ArgumentException($"bottleneck size {slot.Size} differs from the attached adapters' {_adH.Dim(1)}");
            if (_adY is null)
            {
                _adY = Own(DType.F32, "adapter_y", _chunk, _c.HiddenSize);
                _adH = Own(DType.F32, "adapter_h", _chunk, slot.Size);
                _adA = Own(DType.F32, "adapter_a", _chunk, slot.Size);
                _adOnes = Own(DType.F32, "adapter_ones", _chunk, slot.Size);
                _b.Fill(_adOnes, 1f);
            }
        }
        _adapters[layer * 2 + (int)site] = slot;
    }

    /// <summary>The first <paramref name="rows"/> cache rows (rows, NKV·HS) of one layer's keys (kind 0) or values (kind 1).</summary>
    public float[] CacheRows(int layer, int kind, int rows)
    {
        var t = (kind == 0 ? _kCache : _vCache)[layer].View(0, rows, _c.KvDim);
        return t.ToArray();
    }

    /// <summary>x(T, C) += proj(T, N→C) [+ bottleneck adapter]: the o_proj / down_proj residual add.</summary>
    private void AddProjection(Tensor x, Tensor input, Tensor w, int t, int n, int layer, BottleneckSite site)
    {
        int C = _c.HiddenSize;
        if (_adapters?[layer * 2 + (int)site] is not { } a)
        {
            Linear(x, input, w, null, t, C, n, accumulate: true);
            return;
        }
        if (_adViews is not { } v || v.T != t)
        {
            int s = _adH!.Dim(1);
            v = (t, _adY!.View(0, t, C), _adH.View(0, t, s), _adA!.View(0, t, s), _adOnes!.View(0, t, s));
            _adViews = v;
        }
        Linear(v.Y, input, w, null, t, C, n, accumulate: false);
        _b.MatMul(v.H, v.Y, a.Down, a.DownBias, t, a.Size, C, accumulate: false);
        _b.SwiGluForward(v.A, v.H, v.Ones, (long)t * a.Size);
        _b.MatMul(v.Y, v.A, a.Up, a.UpBias, t, C, a.Size, accumulate: true);
        _b.Add(x, x, v.Y);
    }
}
