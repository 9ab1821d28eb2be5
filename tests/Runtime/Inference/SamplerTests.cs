using FineTuneNative.Runtime.Inference;

namespace FineTuneNative.Tests.Runtime.Inference;

public class SamplerTests
{
    private static float[] LogProbs(params double[] p) => p.Select(x => (float)Math.Log(x)).ToArray();

    private static double[] Frequencies(GenerationOptions o, float[] logits, int draws)
    {
        var s = new Sampler(logits.Length, o);
        var f = new double[logits.Length];
        for (int i = 0; i < draws; i++) f[s.Sample(logits)] += 1.0 / draws;
        return f;
    }

    /// <summary>20000 draws: a frequency's standard deviation is at most 0.0036; 0.015 is over 4 sigma.</summary>
    private static void AssertFrequencies(double[] expected, double[] actual)
    {
        for (int i = 0; i < expected.Length; i++)
        {
            if (expected[i] == 0) Assert.True(actual[i] == 0, $"token {i} drawn with frequency {actual[i]} but should be excluded");
            else Assert.True(Math.Abs(expected[i] - actual[i]) < 0.015, $"token {i}: frequency {actual[i]:F4}, expected {expected[i]:F4}");
        }
    }

    [Fact]
    public void Greedy_Is_First_Argmax_And_Ignores_NaN()
    {
        var s = new Sampler(5, new GenerationOptions());
        Assert.Equal(1, s.Sample(new[] { 0f, 3f, 1f, 3f, -1f }));
        Assert.Equal(2, s.Sample(new[] { float.NaN, 1f, 2f, float.NaN, 0f }));
        Assert.Equal(0, Sampler.Argmax(new[] { float.NegativeInfinity, float.NegativeInfinity }));
    }

    [Fact]
    public void Temperature_Sampling_Follows_Softmax()
    {
        var logits = new[] { 1f, 2f, 0f, 1.5f };
        foreach (float t in new[] { 1f, 2f, 0.5f })
        {
            var e = logits.Select(l => Math.Exp(l / t)).ToArray();
            double z = e.Sum();
            AssertFrequencies(e.Select(x => x / z).ToArray(), Frequencies(new GenerationOptions { Temperature = t, Seed = 1 }, logits, 20000));
        }
    }

    [Fact]
    public void TopK_Keeps_The_K_Most_Likely_Renormalized()
    {
        var logits = LogProbs(0.1, 0.4, 0.05, 0.2, 0.25);
        AssertFrequencies(new[] { 0, 0.4 / 0.85, 0, 0.2 / 0.85, 0.25 / 0.85 },
            Frequencies(new GenerationOptions { Temperature = 1, TopK = 3, Seed = 3 }, logits, 20000));
        // Ties at the cut go to the lower id (the greedy rule).
        var tied = new[] { 0f, 5f, 5f, 5f, 1f };
        var s = new Sampler(5, new GenerationOptions { Temperature = 1, TopK = 1, Seed = 4 });
        for (int i = 0; i < 50; i++) Assert.Equal(1, s.Sample(tied));
    }

    [Fact]
    public void TopP_Keeps_The_Smallest_Nucleus()
    {
        var logits = LogProbs(0.15, 0.5, 0.05, 0.3);
        // 0.5 + 0.3 = 0.8 reaches 0.7 first: {1, 3}.
        AssertFrequencies(new[] { 0, 0.5 / 0.8, 0, 0.3 / 0.8 },
            Frequencies(new GenerationOptions { Temperature = 1, TopP = 0.7f, Seed = 5 }, logits, 20000));
        // p = 0.9 needs {1, 3, 0} (0.95).
        AssertFrequencies(new[] { 0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95 },
            Frequencies(new GenerationOptions { Temperature = 1, TopP = 0.9f, Seed = 6 }, logits, 20000));
        // TopK then TopP: top-2 {1, 3} renormalized to 0.625 / 0.375; p = 0.6 keeps only token 1.
        AssertFrequencies(new[] { 0, 1.0, 0, 0 },
            Frequencies(new GenerationOptions { Temperature = 1, TopK = 2, TopP = 0.6f, Seed = 7 }, logits, 2000));
    }

    [Fact]
    public void Same_Seed_Same_Stream_Different_Seed_Different_Stream()
    {
        var logits = Enumerable.Range(0, 100).Select(i => (float)Math.Sin(i)).ToArray();
        int[] Draw(ulong seed)
        {
            var s = new Sampler(logits.Length, new GenerationOptions { Temperature = 1.2f, TopP = 0.9f, TopK = 50, Seed = seed });
            return Enumerable.Range(0, 200).Select(_ => s.Sample(logits)).ToArray();
        }
        Assert.Equal(Draw(11), Draw(11));
        Assert.NotEqual(Draw(11), Draw(12));
    }

    [Fact]
    public void Invalid_Options_Are_Rejected()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new Sampler(4, new GenerationOptions { Temperature = -1 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new Sampler(4, new GenerationOptions { TopP = 0 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new Sampler(4, new GenerationOptions { TopP = 1.5f }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new Sampler(4, new GenerationOptions { TopK = -2 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new Sampler(4, new GenerationOptions { Temperature = float.NaN }));
    }

    [Fact]
    public void Xoshiro_Is_Uniform_And_Seeded()
    {
        var a = new Xoshiro256(0);
        var b = new Xoshiro256(0);
        var c = new Xoshiro256(1);
        Assert.Equal(a.NextUInt64(), b.NextUInt64());
        Assert.NotEqual(a.NextUInt64(), c.NextUInt64());
        var r = new Xoshiro256(123);
        var bins = new int[10];
        for (int i = 0; i < 100000; i++)
        {
            double u = r.NextDouble();
            Assert.InRange(u, 0.0, 0.9999999999999999);
            bins[(int)(u * 10)]++;
        }
        foreach (int n in bins) Assert.InRange(n, 9500, 10500);
    }
}
