namespace FineTuneNative.Kernels.Reference;

/// <summary>
/// Causal grouped-query attention in double, forming the full score matrix (it is a reference).
/// q(B, Tq, NH, HS); k, v(B, Tkv, NKV, HS) of which the first kvLen rows are used; query t sits at position
/// kvLen - Tq + t and sees keys 0..that position; head h reads kv head h / (NH / NKV).
/// </summary>
public static class AttentionReference
{
    /// <summary>out(B, Tq, NH, HS) and lse(B, NH, Tq) = log Σ_j exp(score_j).</summary>
    public static (double[] Out, double[] Lse) Forward(double[] q, double[] k, double[] v,
        int batch, int tq, int tkv, int kvLen, int nHeads, int nKvHeads, int headSize, double scale)
    {
        Validate(tq, tkv, kvLen, nHeads, nKvHeads);
        int group = nHeads / nKvHeads;
        var o = new double[(long)batch * tq * nHeads * headSize];
        var lse = new double[(long)batch * nHeads * tq];
        var s = new double[kvLen];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < nHeads; h++)
            {
                int kh = h / group;
                for (int t = 0; t < tq; t++)
                {
                    int pos = kvLen - tq + t;
                    long qo = (((long)b * tq + t) * nHeads + h) * headSize;
                    double max = double.NegativeInfinity;
                    for (int j = 0; j <= pos; j++)
                    {
                        long ko = (((long)b * tkv + j) * nKvHeads + kh) * headSize;
                        double d = 0;
                        for (int c = 0; c < headSize; c++) d += q[qo + c] * k[ko + c];
                        s[j] = d * scale;
                        max = Math.Max(max, s[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j <= pos; j++) sum += Math.Exp(s[j] - max);
                    for (int j = 0; j <= pos; j++)
                    {
                        double p = Math.Exp(s[j] - max) / sum;
                        long vo = (((long)b * tkv + j) * nKvHeads + kh) * headSize;
                        for (int c = 0; c < headSize; c++) o[qo + c] += p * v[vo + c];
                    }
                    lse[((long)b * nHeads + h) * tq + t] = max + Math.Log(sum);
                }
            }
        return (o, lse);
    }

    /// <summary>
    /// Gradients of Σ dOut ⊙ out with every key row used (kvLen == Tkv, Tq &lt;= Tkv): query i sits at position
    /// P + i with P = Tkv - Tq, so it sees the P prefix keys and the causal keys P..P+i. Tq == Tkv is plain causal
    /// training; Tq &lt; Tkv is prefix tuning (P learned key/value rows before the sequence). dq, dk, dv are fresh.
    /// </summary>
    public static (double[] DQ, double[] DK, double[] DV) Backward(double[] dOut, double[] q, double[] k, double[] v,
        int batch, int tq, int tkv, int nHeads, int nKvHeads, int headSize, double scale)
    {
        Validate(tq, tkv, tkv, nHeads, nKvHeads);
        int group = nHeads / nKvHeads, prefix = tkv - tq;
        var dq = new double[q.LongLength];
        var dk = new double[k.LongLength];
        var dv = new double[v.LongLength];
        var p = new double[tkv];
        var dp = new double[tkv];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < nHeads; h++)
            {
                int kh = h / group;
                for (int i = 0; i < tq; i++)
                {
                    int pos = prefix + i;
                    long qo = (((long)b * tq + i) * nHeads + h) * headSize;
                    double max = double.NegativeInfinity;
                    for (int j = 0; j <= pos; j++)
                    {
                        long ko = (((long)b * tkv + j) * nKvHeads + kh) * headSize;
                        double d = 0;
                        for (int c = 0; c < headSize; c++) d += q[qo + c] * k[ko + c];
                        p[j] = d * scale;
                        max = Math.Max(max, p[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j <= pos; j++) { p[j] = Math.Exp(p[j] - max); sum += p[j]; }
                    for (int j = 0; j <= pos; j++) p[j] /= sum;
                    // out_i = Σ_j p_j v_j  →  dv_j += p_j dOut_i;  dp_j = dOut_i·v_j
                    double dsum = 0;
                    for (int j = 0; j <= pos; j++)
                    {
                        long vo = (((long)b * tkv + j) * nKvHeads + kh) * headSize;
                        double d = 0;
                        for (int c = 0; c < headSize; c++) { d += dOut[qo + c] * v[vo + c]; dv[vo + c] += p[j] * dOut[qo + c]; }
                        dp[j] = d;
                        dsum += p[j] * d;
                    }
                    // softmax backward: ds_j = p_j (dp_j - Σ p dp); score = scale·q·k
                    for (int j = 0; j <= pos; j++)
                    {
                        double ds = p[j] * (dp[j] - dsum) * scale;
                        long ko = (((long)b * tkv + j) * nKvHeads + kh) * headSize;
                        for (int c = 0; c < headSize; c++) { dq[qo + c] += ds * k[ko + c]; dk[ko + c] += ds * q[qo + c]; }
                    }
                }
            }
        return (dq, dk, dv);
    }

    private static void Validate(int tq, int tkv, int kvLen, int nHeads, int nKvHeads)
    {
        if (nKvHeads <= 0 || nHeads % nKvHeads != 0) throw new ArgumentException($"NH={nHeads} is not a multiple of NKV={nKvHeads}");
        if (kvLen > tkv || tq > kvLen) throw new ArgumentException($"need Tq={tq} <= kvLen={kvLen} <= Tkv={tkv}");
    }
}
