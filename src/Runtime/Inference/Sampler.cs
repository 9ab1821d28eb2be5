namespace FineTuneNative.Runtime.Inference;

/// <summary>
/// xoshiro256** (Blackman and Vigna), seeded through splitmix64: a small, fast generator whose stream depends
/// only on the seed, so a seed reproduces a generation on every machine and .NET version.
/// </summary>
public struct Xoshiro256
{
    private ulong _s0, _s1, _s2, _s3;

    public Xoshiro256(ulong seed)
    {
        ulong x = seed;
        _s0 = SplitMix(ref x); _s1 = SplitMix(ref x); _s2 = SplitMix(ref x); _s3 = SplitMix(ref x);
    }

    private static ulong SplitMix(ref ulong x)
    {
        ulong z = x += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    public ulong NextUInt64()
    {
        ulong result = ulong.RotateLeft(_s1 * 5, 7) * 9;
        ulong t = _s1 << 17;
        _s2 ^= _s0; _s3 ^= _s1; _s1 ^= _s2; _s0 ^= _s3;
        _s2 ^= t;
        _s3 = ulong.RotateLeft(_s3, 45);
        return result;
    }

    /// <summary>Uniform in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / (1UL << 53));
}

/// <summary>
/// Picks the next token from logits on the host: greedy when Temperature is 0, otherwise softmax(logits / T)
/// restricted to the top-K tokens and then to the top-P nucleus, sampled with a seeded <see cref="Xoshiro256"/>.
/// Buffers are sized once for the vocabulary; sampling allocates nothing.
/// </summary>
public sealed class Sampler
{
    private readonly GenerationOptions _o;
    private readonly int[] _idx;
    private readonly double[] _p;
    private Xoshiro256 _rng;

    public Sampler(int vocabSize, GenerationOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        if (vocabSize <= 0) throw new ArgumentOutOfRangeException(nameof(vocabSize));
        _o = options;
        _idx = new int[vocabSize];
        _p = new double[vocabSize];
        _rng = new Xoshiro256(options.Seed);
    }

    /// <summary>Index of the largest logit (the lowest index among equal maxima; NaN never wins).</summary>
    public static int Argmax(ReadOnlySpan<float> logits)
    {
        int best = 0;
        float bv = float.NegativeInfinity;
        bool any = false;
        for (int i = 0; i < logits.Length; i++)
        {
            float v = logits[i];
            if (!any && !float.IsNaN(v)) { best = i; bv = v; any = true; }
            else if (v > bv) { best = i; bv = v; }
        }
        return best;
    }

    public int Sample(ReadOnlySpan<float> logits)
    {
        if (logits.Length != _idx.Length) throw new ArgumentException($"{logits.Length} logits for a sampler sized for {_idx.Length}");
        if (_o.Temperature == 0) return Argmax(logits);

        int n = logits.Length;
        var idx = _idx;
        if (_o.TopK > 0 && _o.TopK < n) n = SelectTopK(logits, _o.TopK);
        else for (int i = 0; i < n; i++) idx[i] = i;

        // Softmax of logits / T over the candidates (unnormalized: the walk below scales by the total).
        double max = double.NegativeInfinity;
        for (int j = 0; j < n; j++) max = Math.Max(max, logits[idx[j]]);
        double invT = 1.0 / _o.Temperature, sum = 0;
        for (int j = 0; j < n; j++)
        {
            int id = idx[j];
            float l = logits[id];
            double p = float.IsNaN(l) ? 0 : Math.Exp((l - max) * invT);
            _p[id] = p;
            sum += p;
        }

        if (_o.TopP < 1)
        {
            // A token below (1 - p)/(n - 1) of the mass can never be inside the nucleus (llama2.c's shortcut):
            // drop those before sorting.
            double cutoff = n > 1 ? (1 - _o.TopP) / (n - 1) * sum : 0;
            int m = 0;
            for (int j = 0; j < n; j++) if (_p[idx[j]] >= cutoff) idx[m++] = idx[j];
            if (m == 0) { m = 1; idx[0] = Argmax(logits); }
            SortByProbability(idx.AsSpan(0, m), _p);
            double target = _o.TopP * sum, cum = 0;
            int last = m - 1;
            for (int j = 0; j < m; j++)
            {
                cum += _p[idx[j]];
                if (cum > target) { last = j; break; }
            }
            n = last + 1;
            sum = 0;
            for (int j = 0; j < n; j++) sum += _p[idx[j]];
        }

        double r = _rng.NextDouble() * sum, cdf = 0;
        for (int j = 0; j < n; j++)
        {
            cdf += _p[idx[j]];
            if (r < cdf) return idx[j];
        }
        return idx[n - 1]; // rounding: r landed on the total
    }

    /// <summary>Puts the K best (highest logit, lower id on ties) into _idx[0..K) with a min-heap; returns K.</summary>
    private int SelectTopK(ReadOnlySpan<float> logits, int k)
    {
        var h = _idx;
        // Worse(a, b): a ranks below b.
        bool Worse(ReadOnlySpan<float> lg, int a, int b)
        {
            float la = lg[a], lb = lg[b];
            if (float.IsNaN(la)) return !float.IsNaN(lb) || a > b;
            if (float.IsNaN(lb)) return false;
            return la < lb || (la == lb && a > b);
        }
        void SiftDown(ReadOnlySpan<float> lg, int i)
        {
            while (true)
            {
                int l = 2 * i + 1, r = l + 1, w = i;
                if (l < k && Worse(lg, h[l], h[w])) w = l;
                if (r < k && Worse(lg, h[r], h[w])) w = r;
                if (w == i) return;
                (h[i], h[w]) = (h[w], h[i]);
                i = w;
            }
        }
        for (int i = 0; i < k; i++) h[i] = i;
        for (int i = k / 2 - 1; i >= 0; i--) SiftDown(logits, i);
        for (int i = k; i < logits.Length; i++)
        {
            if (Worse(logits, h[0], i)) { h[0] = i; SiftDown(logits, 0); }
        }
        return k;
    }

    /// <summary>
    /// Sorts ids by probability descending, lower id first on ties: an in-place heap sort, because Span.Sort with a
    /// comparer allocates a delegate per call and a decode step must allocate nothing.
    /// </summary>
    private static void SortByProbability(Span<int> ids, double[] p)
    {
        // "Before(a, b)": a comes earlier in the sorted order. The heap keeps the element that comes LAST on top.
        static bool Before(double[] p, int a, int b) => p[a] > p[b] || (p[a] == p[b] && a < b);
        static void Sift(Span<int> h, double[] p, int i, int n)
        {
            while (true)
            {
                int l = 2 * i + 1, r = l + 1, w = i;
                if (l < n && Before(p, h[w], h[l])) w = l;
                if (r < n && Before(p, h[w], h[r])) w = r;
                if (w == i) return;
                (h[i], h[w]) = (h[w], h[i]);
                i = w;
            }
        }
        int n = ids.Length;
        for (int i = n / 2 - 1; i >= 0; i--) Sift(ids, p, i, n);
        for (int end = n - 1; end > 0; end--)
        {
            (ids[0], ids[end]) = (ids[end], ids[0]);
            Sift(ids, p, 0, end);
        }
    }
}
