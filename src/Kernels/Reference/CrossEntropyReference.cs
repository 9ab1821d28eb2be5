namespace FineTuneNative.Kernels.Reference;

/// <summary>Softmax cross-entropy over rows of logits(M,V) in double; rows whose target == ignoreIndex count 0.</summary>
public static class CrossEntropyReference
{
    /// <summary>losses(M) = logsumexp(row) - row[target] (0 for ignored rows).</summary>
    public static double[] Forward(double[] logits, int[] targets, int m, int v, int ignoreIndex)
    {
        var loss = new double[m];
        for (int i = 0; i < m; i++)
        {
            if (targets[i] == ignoreIndex) continue;
            loss[i] = LogSumExp(logits, (long)i * v, v) - logits[(long)i * v + targets[i]];
        }
        return loss;
    }

    /// <summary>∂(gradScale·Σ losses)/∂logits = gradScale·(softmax(row) - onehot(target)); zeros for ignored rows.</summary>
    public static double[] Gradient(double[] logits, int[] targets, int m, int v, int ignoreIndex, double gradScale)
    {
        var g = new double[(long)m * v];
        for (int i = 0; i < m; i++)
        {
            if (targets[i] == ignoreIndex) continue;
            long o = (long)i * v;
            double lse = LogSumExp(logits, o, v);
            for (int j = 0; j < v; j++) g[o + j] = gradScale * (Math.Exp(logits[o + j] - lse) - (j == targets[i] ? 1 : 0));
        }
        return g;
    }

    private static double LogSumExp(double[] a, long o, int n)
    {
        double max = double.NegativeInfinity;
        for (int j = 0; j < n; j++) max = Math.Max(max, a[o + j]);
        double s = 0;
        for (int j = 0; j < n; j++) s += Math.Exp(a[o + j] - max);
        return max + Math.Log(s);
    }
}
