using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Methods;

/// <summary>
/// The previous stage's importance for elastic weight consolidation (Kirkpatrick et al. 2017): for every trainable
/// tensor, the diagonal Fisher information F and the values θ* it had at the end of that stage.
/// </summary>
/// <remarks>
/// F is the empirical Fisher: the mean over previous-stage samples of the squared gradient of each sample's mean
/// token loss, one sample per forward/backward (a minibatch gradient squared would average the per-sample gradients
/// first and underestimate F by about the batch size). Saved as ewc_state.safetensors: "{name}.fisher" and
/// "{name}.anchor" per trainable tensor, f32, metadata {"format": "ftn-ewc", "samples": N, "stages": S}.
/// <para>Several stages (<see cref="Then"/>): a stage trained with EWC writes, next to its adapter, the state the
/// following stage needs: F = F_earlier + F_this (this stage's Fisher at its final values) anchored at the final
/// values. This is the recursive Laplace approximation of Huszár (2018, "Note on the quadratic penalties in elastic
/// weight consolidation", PNAS): the posterior after stages 1..k is one Gaussian with precision Σ F_i around the
/// latest θ*, not one penalty per stage around each stage's own θ*.</para>
/// </remarks>
public sealed class EwcState
{
    public const string FileName = "ewc_state.safetensors";

    public required Dictionary<string, float[]> Fisher { get; init; }
    public required Dictionary<string, float[]> Anchor { get; init; }
    /// <summary>Samples the Fisher was estimated on, all stages together.</summary>
    public int Samples { get; init; }
    /// <summary>Training stages whose Fisher is summed in (1 for a state estimated on one stage's data).</summary>
    public int Stages { get; init; } = 1;

    /// <summary>
    /// Estimates F on <paramref name="samples"/> (at most <paramref name="maxSamples"/>, 0 = all) with the method as it
    /// is now (θ* = its current values). Leaves the method's gradients zeroed.
    /// </summary>
    public static EwcState Estimate(LlamaModel model, ITrainableMethod method, IReadOnlyList<TokenizedSample> samples, int seqLen, int padId,
        int maxSamples = 0, ulong seed = 0)
    {
        if (samples.Count == 0) throw new ArgumentException("EWC: the previous stage's data is empty");
        int n = maxSamples > 0 ? Math.Min(maxSamples, samples.Count) : samples.Count;
        var fisher = method.Trainable.ToDictionary(t => t.Name, t => new double[t.Param.Length]);
        int used = 0;
        for (int i = 0; i < n; i++)
        {
            var batch = Batching.Pad(new[] { samples[i] }, 1, Math.Min(seqLen, Math.Max(1, samples[i].Length)), padId);
            if (batch.TargetCount == 0) continue;
            method.ZeroGrad();
            model.ForwardBackward(batch.Tokens, batch.Targets, 1, batch.SeqLen, 1f / batch.TargetCount, seed + (ulong)i, batch.Positions);
            foreach (var t in method.Trainable)
            {
                var g = t.Grad.ToArray();
                var f = fisher[t.Name];
                for (int j = 0; j < g.Length; j++) f[j] += (double)g[j] * g[j];
            }
            used++;
        }
        method.ZeroGrad();
        if (used == 0) throw new ArgumentException("EWC: no previous-stage sample has a target token");
        return new EwcState
        {
            Fisher = fisher.ToDictionary(kv => kv.Key, kv => Array.ConvertAll(kv.Value, x => (float)(x / used))),
            Anchor = method.Trainable.ToDictionary(t => t.Name, t => t.Param.ToArray()),
            Samples = used,
        };
    }

    /// <summary>
    /// The state after one more stage: F = this F + <paramref name="next"/>'s F, anchored at <paramref name="next"/>'s
    /// anchor (the values at the end of that stage); see the remarks. Both must cover the same tensors.
    /// </summary>
    public EwcState Then(EwcState next)
    {
        var fisher = new Dictionary<string, float[]>();
        foreach (var (name, f) in next.Fisher)
        {
            if (!Fisher.TryGetValue(name, out var mine) || mine.Length != f.Length)
                throw new ArgumentException($"EWC: the earlier state has no Fisher of {f.Length} values for '{name}'");
            var sum = new float[f.Length];
            for (int j = 0; j < sum.Length; j++) sum[j] = mine[j] + f[j];
            fisher[name] = sum;
        }
        if (Fisher.Count != next.Fisher.Count) throw new ArgumentException($"EWC: the earlier state covers {Fisher.Count} tensors, this stage {next.Fisher.Count}");
        return new EwcState { Fisher = fisher, Anchor = next.Anchor, Samples = Samples + next.Samples, Stages = Stages + next.Stages };
    }

    public void Save(string dir)
    {
        var tensors = new List<(string, DType, int[], float[])>();
        foreach (var (name, f) in Fisher.OrderBy(kv => kv.Key, StringComparer.Ordinal))
        {
            tensors.Add(($"{name}.fisher", DType.F32, new[] { f.Length }, f));
            tensors.Add(($"{name}.anchor", DType.F32, new[] { f.Length }, Anchor[name]));
        }
        Directory.CreateDirectory(dir);
        SafeTensors.Write(Path.Combine(dir, FileName), tensors, new Dictionary<string, string>
        {
            ["format"] = "ftn-ewc",
            ["samples"] = Samples.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["stages"] = Stages.ToString(System.Globalization.CultureInfo.InvariantCulture),
        });
    }

    /// <summary>Reads ewc_state.safetensors of <paramref name="dir"/> for the tensors of <paramref name="method"/> (names and sizes must match).</summary>
    public static EwcState Load(string dir, ITrainableMethod method)
    {
        string path = Path.Combine(dir, FileName);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: not found (no EWC state saved with this adapter)", path);
        using var st = SafeTensors.Open(path);
        var fisher = new Dictionary<string, float[]>();
        var anchor = new Dictionary<string, float[]>();
        foreach (var t in method.Trainable)
        {
            foreach (var (suffix, into) in new[] { ("fisher", fisher), ("anchor", anchor) })
            {
                string name = $"{t.Name}.{suffix}";
                if (!st.Contains(name)) throw new InvalidDataException($"{path}: missing tensor '{name}' (the EWC state belongs to another adapter)");
                var v = st.ReadF32(name);
                if (v.Length != t.Param.Length) throw new InvalidDataException($"{path}: '{name}' has {v.Length} values, the adapter tensor {t.Param.Length}");
                into[t.Name] = v;
            }
        }
        int Meta(string key, int fallback) =>
            st.Metadata.TryGetValue(key, out var v) && int.TryParse(v, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int n) ? n : fallback;
        return new EwcState { Fisher = fisher, Anchor = anchor, Samples = Meta("samples", 0), Stages = Meta("stages", 1) };
    }
}

/// <summary>
/// A trainable method with the EWC penalty λ/2·Σ F·(θ - θ*)² added: its gradient λ·F·(θ - θ*) is added (+=) to each
/// tensor's gradient in <see cref="AddPenalty"/>, which the trainer calls after the backward of every step and before
/// clipping. Everything else is the wrapped method's.
/// </summary>
public sealed class EwcMethod : ITrainableMethod
{
    private readonly ITrainableMethod _inner;
    private readonly EwcState _state;
    private readonly float[][] _theta, _grad;

    public EwcMethod(ITrainableMethod inner, EwcState state, double lambda)
    {
        if (!(lambda >= 0) || double.IsInfinity(lambda)) throw new ArgumentException($"EWC lambda must be >= 0 (got {lambda})");
        _inner = inner;
        _state = state;
        Lambda = lambda;
        foreach (var t in inner.Trainable)
            if (!state.Fisher.TryGetValue(t.Name, out var f) || f.Length != t.Param.Length || state.Anchor[t.Name].Length != t.Param.Length)
                throw new ArgumentException($"EWC: no Fisher/anchor of {t.Param.Length} values for '{t.Name}'");
        _theta = inner.Trainable.Select(t => new float[t.Param.Length]).ToArray();
        _grad = inner.Trainable.Select(t => new float[t.Param.Length]).ToArray();
    }

    public ITrainableMethod Inner => _inner;
    public double Lambda { get; }
    /// <summary>The earlier stages' state this penalty uses.</summary>
    public EwcState State => _state;

    /// <summary>
    /// Writes <see cref="EwcState.FileName"/> into <paramref name="dir"/> (next to this stage's saved adapter) for the
    /// next stage: the earlier stages' Fisher plus this stage's, estimated on <paramref name="samples"/> (this stage's
    /// data) at the current values, which become the anchor (<see cref="EwcState.Then"/>). Leaves the gradients zeroed.
    /// </summary>
    public EwcState SaveForNextStage(string dir, LlamaModel model, IReadOnlyList<TokenizedSample> samples, int seqLen, int padId,
        int maxSamples = 0, ulong seed = 0)
    {
        var next = _state.Then(EwcState.Estimate(model, _inner, samples, seqLen, padId, maxSamples, seed));
        next.Save(dir);
        return next;
    }
    public string Kind => _inner.Kind;
    public IReadOnlyList<TrainableTensor> Trainable => _inner.Trainable;
    public bool IsAttached => _inner.IsAttached;

    /// <summary>λ/2·Σ F·(θ - θ*)² at the current values.</summary>
    public double Penalty()
    {
        double p = 0;
        for (int i = 0; i < Trainable.Count; i++)
        {
            var t = Trainable[i];
            t.Param.Backend.Download(t.Param, _theta[i]);
            float[] f = _state.Fisher[t.Name], a = _state.Anchor[t.Name];
            for (int j = 0; j < f.Length; j++) { double d = _theta[i][j] - a[j]; p += f[j] * d * d; }
        }
        return 0.5 * Lambda * p;
    }

    public double AddPenalty()
    {
        double inner = _inner.AddPenalty();
        if (Lambda == 0) return inner;
        double p = 0;
        for (int i = 0; i < Trainable.Count; i++)
        {
            var t = Trainable[i];
            var b = t.Param.Backend;
            b.Download(t.Param, _theta[i]);
            b.Download(t.Grad, _grad[i]);
            float[] f = _state.Fisher[t.Name], a = _state.Anchor[t.Name], th = _theta[i], g = _grad[i];
            for (int j = 0; j < f.Length; j++)
            {
                double d = th[j] - a[j];
                p += f[j] * d * d;
                g[j] += (float)(Lambda * f[j] * d);
            }
            b.Upload(t.Grad, g);
        }
        return inner + 0.5 * Lambda * p;
    }

    public void ZeroGrad() => _inner.ZeroGrad();
    public void AfterStep() => _inner.AfterStep();
    public void Save(string dir, string? baseModelNameOrPath = null) => _inner.Save(dir, baseModelNameOrPath);
    public void LoadValues(string dir) => _inner.LoadValues(dir);
    public void Attach() => _inner.Attach();
    public void Detach() => _inner.Detach();

    public JsonObject DescribeConfig()
    {
        var o = _inner.DescribeConfig();
        o["ewc_lambda"] = Lambda;
        o["ewc_samples"] = _state.Samples;
        return o;
    }

    /// <summary>Disposes the wrapped method.</summary>
    public void Dispose() => _inner.Dispose();
}
