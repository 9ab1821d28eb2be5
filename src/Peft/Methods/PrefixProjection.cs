using System.Numerics.Tensors;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;

namespace FineTuneNative.Peft.Methods;

/// <summary>
/// PEFT's prefix reparametrisation (PrefixEncoder with prefix_projection = true): the prefix keys/values are the output
/// of an MLP over P learned embeddings, <c>prefix = W2·tanh(W1·E + b1) + b2</c>, so the optimizer trains E, W1, b1, W2, b2
/// instead of the prefix itself (Li &amp; Liang 2021 found this more stable).
/// </summary>
/// <remarks>
/// Shapes and names as PEFT's PrefixEncoder state dict (torch Linear: weight (out, in)):
/// <c>embedding.weight</c> E (P, D), <c>transform.0.weight</c> W1 (H, D), <c>transform.0.bias</c> b1 (H),
/// <c>transform.2.weight</c> W2 (O, H), <c>transform.2.bias</c> b2 (O), with D = token_dim = NKV·HS, H = encoder_hidden_size,
/// O = L·2·D; the output row p is PEFT's prompt_embeddings row p, (P, L·2·D). The MLP is a function of the parameters
/// only (not of the batch), so it runs once per optimizer step: <see cref="Forward"/> after every update (and at
/// creation/load) writes the prefix the model reads; the model's backward accumulates dPrefix over the whole
/// accumulation window, and <see cref="Backward"/> then takes it through the MLP once (the chain rule is linear in
/// dPrefix, so this equals back-propagating every micro-batch). Computed on the host in f32 with
/// <see cref="TensorPrimitives"/> dot products and axpys; P·H·O multiply-adds per pass (P = 16, H = 512, O = 65,536 for
/// an 8B model: 0.5 G, a fraction of one training step).
/// </remarks>
internal sealed class PrefixProjection : IDisposable
{
    public const string EmbeddingName = "embedding.weight";
    public const string W1Name = "transform.0.weight";
    public const string B1Name = "transform.0.bias";
    public const string W2Name = "transform.2.weight";
    public const string B2Name = "transform.2.bias";

    public int P { get; }
    public int D { get; }
    public int H { get; }
    public int O { get; }

    /// <summary>The trainable tensors in PEFT's order (weights decayed, biases not).</summary>
    public TrainableTensor[] Trainable { get; }

    private readonly IBackend _b;
    private float[] _hidden = [];   // tanh(W1·E + b1), (P, H): saved by Forward for Backward

    public PrefixProjection(IBackend backend, int p, int d, int h, int o)
    {
        _b = backend;
        P = p; D = d; H = h; O = o;
        var list = new List<TrainableTensor>();
        try
        {
            list.Add(Make(EmbeddingName, true, p, d));
            list.Add(Make(W1Name, true, h, d));
            list.Add(Make(B1Name, false, h));
            list.Add(Make(W2Name, true, o, h));
            list.Add(Make(B2Name, false, o));
        }
        catch
        {
            foreach (var t in list) { t.Param.Dispose(); t.Grad.Dispose(); }
            throw;
        }
        Trainable = list.ToArray();
    }

    private TrainableTensor Make(string name, bool decay, params int[] shape)
    {
        var v = _b.Allocate(DType.F32, shape);
        var g = _b.Allocate(DType.F32, shape);
        v.Name = name;
        g.Name = name + ".grad";
        _b.Fill(g, 0f);
        return new TrainableTensor(name, v, g, decay);
    }

    /// <summary>PEFT's initialisation: E ~ N(0, 1) (torch.nn.Embedding), Linear weights and biases ~ U(−1/√fan_in, 1/√fan_in) (torch.nn.Linear).</summary>
    public void InitRandom(ulong seed)
    {
        ulong state = seed ^ 0x9E6C63D0676A9A99UL;
        double Uniform() => (Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53));
        var e = new float[P * D];
        for (int i = 0; i < e.Length; i += 2)
        {
            double u1 = Math.Max(Uniform(), 1e-300), u2 = Uniform(), r = Math.Sqrt(-2 * Math.Log(u1));
            e[i] = (float)(r * Math.Cos(2 * Math.PI * u2));
            if (i + 1 < e.Length) e[i + 1] = (float)(r * Math.Sin(2 * Math.PI * u2));
        }
        float[] U(int n, int fanIn)
        {
            double bound = 1 / Math.Sqrt(fanIn);
            var a = new float[n];
            for (int i = 0; i < n; i++) a[i] = (float)((Uniform() * 2 - 1) * bound);
            return a;
        }
        Set(EmbeddingName, e);
        Set(W1Name, U(H * D, D));
        Set(B1Name, U(H, D));
        Set(W2Name, U(O * H, H));
        Set(B2Name, U(O, H));
    }

    public TrainableTensor Get(string name) => Trainable.First(t => t.Name == name);

    public void Set(string name, float[] values) => _b.Upload(Get(name).Param, values);

    /// <summary>The prefix in PEFT's layout (P, O): out = W2·tanh(W1·E + b1) + b2; saves the hidden activations for <see cref="Backward"/>.</summary>
    public float[] Forward()
    {
        var e = Get(EmbeddingName).Param.ToArray();
        var w1 = Get(W1Name).Param.ToArray();
        var b1 = Get(B1Name).Param.ToArray();
        var w2 = Get(W2Name).Param.ToArray();
        var b2 = Get(B2Name).Param.ToArray();
        var hid = new float[P * H];
        for (int p = 0; p < P; p++)
            for (int j = 0; j < H; j++)
                hid[p * H + j] = MathF.Tanh(TensorPrimitives.Dot<float>(e.AsSpan(p * D, D), w1.AsSpan(j * D, D)) + b1[j]);
        var output = new float[P * O];
        for (int p = 0; p < P; p++)
        {
            var hp = hid.AsSpan(p * H, H);
            for (int o = 0; o < O; o++) output[(long)p * O + o] = TensorPrimitives.Dot<float>(hp, w2.AsSpan(o * H, H)) + b2[o];
        }
        _hidden = hid;
        return output;
    }

    /// <summary>
    /// Accumulates (+=) into the five parameter gradients the gradient of the prefix <paramref name="dOut"/> (P, O, PEFT
    /// layout) through the MLP of the last <see cref="Forward"/>: dW2 += dOutᵀ·h, db2 += Σ_p dOut, dZ = (dOut·W2) ⊙ (1 − h²),
    /// dW1 += dZᵀ·E, db1 += Σ_p dZ, dE += dZ·W1.
    /// </summary>
    public void Backward(float[] dOut)
    {
        if (_hidden.Length != P * H) throw new InvalidOperationException("prefix projection: Backward before Forward");
        var e = Get(EmbeddingName).Param.ToArray();
        var w1 = Get(W1Name).Param.ToArray();
        var w2 = Get(W2Name).Param.ToArray();
        var gE = Get(EmbeddingName).Grad.ToArray();
        var gW1 = Get(W1Name).Grad.ToArray();
        var gB1 = Get(B1Name).Grad.ToArray();
        var gW2 = Get(W2Name).Grad.ToArray();
        var gB2 = Get(B2Name).Grad.ToArray();
        var dz = new float[P * H];
        for (int p = 0; p < P; p++)
        {
            var hp = _hidden.AsSpan(p * H, H);
            var dh = dz.AsSpan(p * H, H);
            for (int o = 0; o < O; o++)
            {
                float g = dOut[(long)p * O + o];
                if (g == 0f) continue;
                gB2[o] += g;
                var w2row = w2.AsSpan(o * H, H);
                var gw2row = gW2.AsSpan(o * H, H);
                TensorPrimitives.MultiplyAdd(hp, g, gw2row, gw2row);   // dW2[o, :] += g·h[p, :]
                TensorPrimitives.MultiplyAdd(w2row, g, dh, dh);        // dh[p, :] += g·W2[o, :]
            }
            for (int j = 0; j < H; j++) dh[j] *= 1 - hp[j] * hp[j];   // through tanh
            var ep = e.AsSpan(p * D, D);
            var gep = gE.AsSpan(p * D, D);
            for (int j = 0; j < H; j++)
            {
                float g = dh[j];
                gB1[j] += g;
                var gw1row = gW1.AsSpan(j * D, D);
                TensorPrimitives.MultiplyAdd(ep, g, gw1row, gw1row);          // dW1[j, :] += dz·E[p, :]
                TensorPrimitives.MultiplyAdd(w1.AsSpan(j * D, D), g, gep, gep); // dE[p, :] += dz·W1[j, :]
            }
        }
        _b.Upload(Get(EmbeddingName).Grad, gE);
        _b.Upload(Get(W1Name).Grad, gW1);
        _b.Upload(Get(B1Name).Grad, gB1);
        _b.Upload(Get(W2Name).Grad, gW2);
        _b.Upload(Get(B2Name).Grad, gB2);
    }

    public void ZeroGrad()
    {
        foreach (var t in Trainable) _b.Fill(t.Grad, 0f);
    }

    public void Dispose()
    {
        foreach (var t in Trainable) { t.Param.Dispose(); t.Grad.Dispose(); }
    }
}
