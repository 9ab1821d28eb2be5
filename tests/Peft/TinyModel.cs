using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Tests.Peft;

/// <summary>A tiny random Llama (2 layers, GQA, untied head) and random token data for trainer and adapter tests.</summary>
internal static class TinyModel
{
    public static LlamaConfig Config(int vocab = 40) => new()
    {
        HiddenSize = 16, IntermediateSize = 24, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 4,
        VocabSize = vocab, MaxPositions = 64, RmsNormEps = 1e-5f, RopeTheta = 10000f, TieWordEmbeddings = false,
    };

    /// <summary>Weights ~ U(-0.3, 0.3) (norms 1 ± 0.1), reproducible from <paramref name="seed"/>.</summary>
    public static LlamaWeights Weights(IBackend backend, ulong seed = 1, LlamaConfig? config = null)
    {
        var w = LlamaWeights.Allocate(config ?? Config(), backend);
        ulong state = seed;
        foreach (var (name, t) in w.Named())
        {
            var data = new float[t.Length];
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            for (int i = 0; i < data.Length; i++)
            {
                float u = (float)((Batching.SplitMix64(ref state) >> 11) * (1.0 / (1UL << 53)) * 2 - 1);
                data[i] = norm ? 1 + 0.1f * u : 0.3f * u;
            }
            backend.Upload(t, data);
        }
        return w;
    }

    /// <summary>Samples of random tokens with random lengths in [minLen, maxLen]; the first third of each is prompt (ignored).</summary>
    public static List<TokenizedSample> Samples(int count, int minLen, int maxLen, ulong seed, int vocab = 40)
    {
        var list = new List<TokenizedSample>();
        ulong state = seed;
        for (int s = 0; s < count; s++)
        {
            int len = minLen + (int)(Batching.SplitMix64(ref state) % (ulong)(maxLen - minLen + 1));
            var ids = new int[len + 1];
            for (int i = 0; i <= len; i++) ids[i] = (int)(Batching.SplitMix64(ref state) % (ulong)vocab);
            var targets = new int[len];
            for (int i = 0; i < len; i++) targets[i] = i + 1 > len / 3 ? ids[i + 1] : TokenizedSample.IgnoreIndex;
            list.Add(new TokenizedSample($"random:{s}", ids[..len], targets));
        }
        return list;
    }
}
