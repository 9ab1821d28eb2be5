using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit;

namespace FineTuneNative.Tests.Peft;

public class PackingTests
{
    [Fact]
    public void Pack_FirstFitDecreasing_PositionsRestartAndNothingIsLost()
    {
        var samples = TinyModel.Samples(9, 2, 11, seed: 5);
        var packed = Packing.Pack(samples, 16, out var stats);
        Assert.Equal(samples.Sum(s => s.Length), packed.Sum(p => p.Length));
        Assert.Equal(samples.Sum(s => s.TargetCount), packed.Sum(p => p.TargetCount));
        Assert.All(packed, p => Assert.True(p.Length <= 16));
        Assert.True(packed.Count < samples.Count);
        Assert.Equal(packed.Count, stats.Rows);
        // every sample appears exactly once as a contiguous segment starting at position 0
        var segs = new List<(int[] Tok, int[] Tgt)>();
        foreach (var p in packed)
        {
            Assert.NotNull(p.Positions);
            int start = 0;
            for (int t = 1; t <= p.Length; t++)
            {
                if (t < p.Length && p.Positions![t] != 0) { Assert.Equal(p.Positions[t - 1] + 1, p.Positions[t]); continue; }
                segs.Add((p.Tokens[start..t], p.Targets[start..t]));
                start = t;
            }
        }
        Assert.Equal(samples.Count, segs.Count);
        foreach (var s in samples)
            Assert.Contains(segs, g => g.Tok.SequenceEqual(s.Tokens) && g.Tgt.SequenceEqual(s.Targets));
        Assert.Throws<ArgumentException>(() => Packing.Pack(samples, 5, out _));
    }

    [Fact]
    public void Pad_PackedRows_PaddingIsItsOwnSegment()
    {
        var a = new TokenizedSample("a", new[] { 1, 2, 3 }, new[] { 2, 3, -100 }) { Positions = new[] { 0, 1, 0 } };
        var b = new TokenizedSample("b", new[] { 4, 5 }, new[] { 5, 6 });
        var batch = Batching.Pad(new[] { a, b }, 3, 4, 0);
        Assert.Equal(new[] { 0, 1, 0, 0, /**/ 0, 1, 0, 1, /**/ 0, 1, 2, 3 }, batch.Positions);
        Assert.Null(Batching.Pad(new[] { b }, 2, 4, 0).Positions);
    }

    public static IEnumerable<object[]> Backends() => new[] { new object[] { "cpu" }, new object[] { "ilgpu-sim:4" } };

    /// <summary>
    /// Packed rows (positions restarting, block-diagonal attention) give the same summed loss and the same gradient
    /// of every base parameter as the samples run one by one, each alone in its own batch of one.
    /// Unpacked, the same rows would let tokens attend across samples and the loss would differ (checked too).
    /// </summary>
    [Theory]
    [MemberData(nameof(Backends))]
    public void PackedLossAndGradients_EqualUnpacked(string backendName)
    {
        var backend = TestBackends.Get(backendName);
        bool sim = TestBackends.IsSimulator(backendName);
        var samples = TinyModel.Samples(sim ? 3 : 7, 2, 9, seed: 11);
        int rowLen = sim ? 12 : 20;
        var packed = Packing.Pack(samples, rowLen, out _);
        Assert.Contains(packed, p => p.Positions!.Count(x => x == 0) > 1); // at least one row really holds several samples

        using var weights = TinyModel.Weights(backend, seed: 3);
        using var model = new LlamaModel(weights, backend) { TrainBase = true };

        // unpacked: each sample alone
        model.ZeroGrad();
        double lossAlone = 0;
        int countAlone = 0;
        foreach (var s in samples)
        {
            var (l, c) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 0);
            lossAlone += l;
            countAlone += c;
        }
        var gradAlone = model.BaseParameters().Select(p => Download(backend, p.Grad)).ToList();

        // packed: all rows in one batch, padded
        model.ZeroGrad();
        var batch = Batching.Pad(packed, packed.Count, rowLen, 0);
        var (lossPacked, countPacked) = model.ForwardBackward(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen, 1f, 0, batch.Positions);
        var gradPacked = model.BaseParameters().Select(p => Download(backend, p.Grad)).ToList();

        Assert.Equal(countAlone, countPacked);
        Assert.True(Math.Abs(lossAlone - lossPacked) <= 1e-4 * Math.Abs(lossAlone), $"packed loss {lossPacked} vs one by one {lossAlone}");
        for (int i = 0; i < gradAlone.Count; i++) NumericAssert.Close(gradAlone[i], gradPacked[i], 2e-5, 2e-4);

        var (evalPacked, _) = model.Loss(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen, batch.Positions);
        Assert.True(Math.Abs(lossAlone - evalPacked) <= 1e-4 * Math.Abs(lossAlone));
        // without the positions the same rows attend across samples: a different loss (the test can fail)
        var (evalCross, _) = model.Loss(batch.Tokens, batch.Targets, batch.BatchSize, batch.SeqLen);
        Assert.True(Math.Abs(evalCross - lossAlone) > 1e-3 * Math.Abs(lossAlone), $"cross-sample attention changed nothing ({evalCross})");
    }

    [Fact]
    public void Positions_Malformed_Rejected()
    {
        var backend = TestBackends.Get("cpu");
        using var weights = TinyModel.Weights(backend);
        using var model = new LlamaModel(weights, backend);
        var tok = new int[8];
        var tgt = Enumerable.Repeat(1, 8).ToArray();
        var e = Assert.Throws<ArgumentException>(() => model.Loss(tok, tgt, 2, 4, new[] { 0, 1, 2, 3, 0, 2, 3, 4 }));
        Assert.Contains("positions[5]", e.Message);
        Assert.Throws<ArgumentException>(() => model.Loss(tok, tgt, 2, 4, new[] { 1, 2, 3, 4, 0, 1, 2, 3 }));
        Assert.Throws<ArgumentException>(() => model.Loss(tok, tgt, 2, 4, new[] { 0, 1, 2 }));
    }

    [Fact]
    public void Neftune_NoiseOnlyInTraining_BoundedAndSeeded()
    {
        var noise = new float[64 * 16];
        LlamaModel.NeftuneNoise(noise, 5f, 64, 16, 7);
        float mag = 5f / MathF.Sqrt(64 * 16);
        Assert.All(noise, x => Assert.InRange(x, -mag, mag));
        double mean = noise.Average(x => (double)x), var = noise.Average(x => (double)x * x);
        Assert.InRange(mean, -0.1 * mag, 0.1 * mag);
        Assert.InRange(var, mag * mag / 3 * 0.85, mag * mag / 3 * 1.15); // U(-m, m) has variance m²/3
        Assert.True(noise.Max() > 0.95 * mag && noise.Min() < -0.95 * mag);

        var backend = TestBackends.Get("cpu");
        using var weights = TinyModel.Weights(backend);
        using var model = new LlamaModel(weights, backend);
        var s = TinyModel.Samples(1, 12, 12, seed: 2)[0];
        var (plain, _) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 9);
        var (evalPlain, _) = model.Loss(s.Tokens, s.Targets, 1, s.Length);
        model.NeftuneAlpha = 5f;
        var (noisy, _) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 9);
        var (noisyAgain, _) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 9);
        var (noisyOther, _) = model.ForwardBackward(s.Tokens, s.Targets, 1, s.Length, 1f, 10);
        var (evalNoisy, _) = model.Loss(s.Tokens, s.Targets, 1, s.Length);
        Assert.NotEqual(plain, noisy);
        Assert.Equal(noisy, noisyAgain);
        Assert.NotEqual(noisy, noisyOther);
        Assert.Equal(evalPlain, evalNoisy); // evaluation never sees the noise
        Assert.Throws<ArgumentOutOfRangeException>(() => model.NeftuneAlpha = -1);
    }

    /// <summary>The noise of a buffer large enough to be drawn in parallel chunks (300,000 floats, ragged last chunk) equals one
    /// sequential pass of the generator (splitmix64 of s0 + (i+1)·φ), written out here independently.</summary>
    [Fact]
    public void Neftune_ParallelNoise_EqualsTheSequentialStream()
    {
        static ulong Mix(ulong x)
        {
            ulong z = x + 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }
        const int n = 300_000;
        var noise = new float[n];
        LlamaModel.NeftuneNoise(noise, 5f, 600, 500, 42);
        double mag = 5 / Math.Sqrt(600.0 * 500);
        ulong state = Mix(42UL ^ 0x4E454654554E45UL);
        for (int i = 0; i < n; i++)
        {
            state += 0x9E3779B97F4A7C15UL;
            double u = (Mix(state) >> 11) * (1.0 / (1UL << 53));
            Assert.True((float)((2 * u - 1) * mag) == noise[i], $"element {i}");
        }
    }

    private static float[] Download(IBackend b, Tensor t)
    {
        var h = new float[t.Length];
        b.Download(t, h);
        return h;
    }
}
