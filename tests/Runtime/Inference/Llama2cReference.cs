using System.Text;

namespace FineTuneNative.Tests.Runtime.Inference;

/// <summary>
/// An independent reference of llama2.c's run.c forward pass, written for the tests from the format notes
/// (../shared/assets/stories260K/README.txt): plain scalar loops over the float arrays read straight from the
/// checkpoint, double arithmetic, its own RMSNorm / RoPE / attention / SwiGLU. It shares no code with src/.
/// </summary>
internal sealed class Llama2cReference
{
    public readonly int Dim, Hidden, Layers, Heads, KvHeads, Vocab, SeqLen, HeadSize, KvDim;
    public readonly bool SharedClassifier;
    private readonly float[] _tokEmb, _rmsAtt, _wq, _wk, _wv, _wo, _rmsFfn, _w1, _w2, _w3, _rmsFinal, _wcls;
    private readonly double[][] _keyCache, _valueCache; // per layer (seq_len, kv_dim)

    public Llama2cReference(string path)
    {
        using var br = new BinaryReader(File.OpenRead(path));
        Dim = br.ReadInt32(); Hidden = br.ReadInt32(); Layers = br.ReadInt32(); Heads = br.ReadInt32();
        KvHeads = br.ReadInt32(); int vocab = br.ReadInt32(); SeqLen = br.ReadInt32();
        SharedClassifier = vocab > 0;
        Vocab = Math.Abs(vocab);
        HeadSize = Dim / Heads;
        KvDim = Dim * KvHeads / Heads;
        float[] Read(long n)
        {
            var a = new float[n];
            for (long i = 0; i < n; i++) a[i] = br.ReadSingle();
            return a;
        }
        _tokEmb = Read((long)Vocab * Dim);
        _rmsAtt = Read((long)Layers * Dim);
        _wq = Read((long)Layers * Dim * Dim);
        _wk = Read((long)Layers * KvDim * Dim);
        _wv = Read((long)Layers * KvDim * Dim);
        _wo = Read((long)Layers * Dim * Dim);
        _rmsFfn = Read((long)Layers * Dim);
        _w1 = Read((long)Layers * Hidden * Dim);
        _w2 = Read((long)Layers * Dim * Hidden);
        _w3 = Read((long)Layers * Hidden * Dim);
        _rmsFinal = Read(Dim);
        Read((long)SeqLen * HeadSize / 2); // freq_cis_real (unused)
        Read((long)SeqLen * HeadSize / 2); // freq_cis_imag (unused)
        _wcls = SharedClassifier ? _tokEmb : Read((long)Vocab * Dim);
        if (br.BaseStream.Position != br.BaseStream.Length)
            throw new InvalidDataException($"reference reader: {br.BaseStream.Length - br.BaseStream.Position} bytes left over in {path}");
        _keyCache = new double[Layers][];
        _valueCache = new double[Layers][];
        for (int l = 0; l < Layers; l++)
        {
            _keyCache[l] = new double[SeqLen * KvDim];
            _valueCache[l] = new double[SeqLen * KvDim];
        }
    }

    private static void RmsNorm(double[] o, double[] x, float[] w, int wOff, int n)
    {
        double ss = 0;
        for (int j = 0; j < n; j++) ss += x[j] * x[j];
        ss = 1.0 / Math.Sqrt(ss / n + 1e-5);
        for (int j = 0; j < n; j++) o[j] = w[wOff + j] * (ss * x[j]);
    }

    /// <summary>o(d) = W(d, n) · x(n), W at element offset wOff.</summary>
    private static void MatVec(double[] o, double[] x, float[] w, long wOff, int n, int d)
    {
        for (int i = 0; i < d; i++)
        {
            double s = 0;
            long row = wOff + (long)i * n;
            for (int j = 0; j < n; j++) s += w[row + j] * x[j];
            o[i] = s;
        }
    }

    /// <summary>Logits for <paramref name="token"/> at position <paramref name="pos"/> (keys/values of earlier positions are cached).</summary>
    public double[] Forward(int token, int pos)
    {
        int dim = Dim, hs = HeadSize, kvDim = KvDim, hidden = Hidden, kvMul = Heads / KvHeads;
        var x = new double[dim];
        for (int j = 0; j < dim; j++) x[j] = _tokEmb[(long)token * dim + j];
        var xb = new double[dim];
        var xb2 = new double[dim];
        var q = new double[dim];
        var k = new double[kvDim];
        var v = new double[kvDim];
        var hb = new double[hidden];
        var hb2 = new double[hidden];
        var att = new double[pos + 1];

        for (int l = 0; l < Layers; l++)
        {
            RmsNorm(xb, x, _rmsAtt, l * dim, dim);
            MatVec(q, xb, _wq, (long)l * dim * dim, dim, dim);
            MatVec(k, xb, _wk, (long)l * kvDim * dim, dim, kvDim);
            MatVec(v, xb, _wv, (long)l * kvDim * dim, dim, kvDim);

            // RoPE on adjacent pairs (x[i], x[i+1]); frequency from the channel's index inside its head.
            for (int i = 0; i < dim; i += 2)
            {
                int headDim = i % hs;
                double freq = 1.0 / Math.Pow(10000.0, headDim / (double)hs);
                double val = pos * freq, fcr = Math.Cos(val), fci = Math.Sin(val);
                int rotn = i < kvDim ? 2 : 1;
                for (int r = 0; r < rotn; r++)
                {
                    double[] vec = r == 0 ? q : k;
                    double v0 = vec[i], v1 = vec[i + 1];
                    vec[i] = v0 * fcr - v1 * fci;
                    vec[i + 1] = v0 * fci + v1 * fcr;
                }
            }
            Array.Copy(k, 0, _keyCache[l], pos * kvDim, kvDim);
            Array.Copy(v, 0, _valueCache[l], pos * kvDim, kvDim);

            // Multi-head attention over positions 0..pos; query head h reads kv head h / kvMul.
            for (int h = 0; h < Heads; h++)
            {
                int kvh = h / kvMul;
                for (int t = 0; t <= pos; t++)
                {
                    double score = 0;
                    for (int i = 0; i < hs; i++) score += q[h * hs + i] * _keyCache[l][t * kvDim + kvh * hs + i];
                    att[t] = score / Math.Sqrt(hs);
                }
                double max = double.NegativeInfinity;
                for (int t = 0; t <= pos; t++) max = Math.Max(max, att[t]);
                double sum = 0;
                for (int t = 0; t <= pos; t++) { att[t] = Math.Exp(att[t] - max); sum += att[t]; }
                for (int i = 0; i < hs; i++)
                {
                    double acc = 0;
                    for (int t = 0; t <= pos; t++) acc += att[t] / sum * _valueCache[l][t * kvDim + kvh * hs + i];
                    xb[h * hs + i] = acc;
                }
            }
            MatVec(xb2, xb, _wo, (long)l * dim * dim, dim, dim);
            for (int j = 0; j < dim; j++) x[j] += xb2[j];

            RmsNorm(xb, x, _rmsFfn, l * dim, dim);
            MatVec(hb, xb, _w1, (long)l * hidden * dim, dim, hidden);
            MatVec(hb2, xb, _w3, (long)l * hidden * dim, dim, hidden);
            for (int i = 0; i < hidden; i++)
            {
                double g = hb[i];
                hb[i] = g / (1.0 + Math.Exp(-g)) * hb2[i];
            }
            MatVec(xb, hb, _w2, (long)l * dim * hidden, hidden, dim);
            for (int j = 0; j < dim; j++) x[j] += xb[j];
        }
        RmsNorm(x, x, _rmsFinal, 0, dim);
        var logits = new double[Vocab];
        MatVec(logits, x, _wcls, 0, dim, Vocab);
        return logits;
    }

    /// <summary>run.c's greedy loop from BOS: feeds each argmax back; stops when BOS (1) comes out or after n tokens.</summary>
    public (List<int> Tokens, List<double[]> Logits) Greedy(int n)
    {
        var tokens = new List<int>();
        var logits = new List<double[]>();
        int token = 1;
        for (int pos = 0; pos < n; pos++)
        {
            var lg = Forward(token, pos);
            logits.Add(lg);
            int next = 0;
            for (int i = 1; i < lg.Length; i++) if (lg[i] > lg[next]) next = i;
            if (next == 1) break;
            tokens.Add(next);
            token = next;
        }
        return (tokens, logits);
    }
}

/// <summary>llama2.c tokenizer .bin decoding as run.c does it, for the tests (independent of src/Runtime/Text).</summary>
internal sealed class Llama2cTokenizerReference
{
    private readonly byte[][] _pieces;

    public Llama2cTokenizerReference(string path, int vocabSize)
    {
        using var br = new BinaryReader(File.OpenRead(path));
        br.ReadInt32(); // max_token_length
        _pieces = new byte[vocabSize][];
        for (int i = 0; i < vocabSize; i++)
        {
            br.ReadSingle(); // score
            int len = br.ReadInt32();
            _pieces[i] = br.ReadBytes(len);
        }
    }

    /// <summary>Concatenates pieces; strips the leading space of a piece that follows BOS; "&lt;0xHH&gt;" is a raw byte.</summary>
    public string Decode(IEnumerable<int> tokens, int previous = 1)
    {
        var bytes = new List<byte>();
        int prev = previous;
        foreach (int t in tokens)
        {
            byte[] p = _pieces[t];
            string s = Encoding.UTF8.GetString(p);
            if (prev == 1 && p.Length > 0 && p[0] == (byte)' ') p = p[1..];
            if (s.Length == 6 && s.StartsWith("<0x", StringComparison.Ordinal) && s.EndsWith('>'))
                bytes.Add(Convert.ToByte(s.Substring(3, 2), 16));
            else bytes.AddRange(p);
            prev = t;
        }
        return Encoding.UTF8.GetString(bytes.ToArray());
    }
}
