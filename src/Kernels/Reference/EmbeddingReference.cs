namespace FineTuneNative.Kernels.Reference;

/// <summary>Token embedding lookup and its scatter-add gradient.</summary>
public static class EmbeddingReference
{
    /// <summary>out(M,C) = table(V,C)[tokens(M)].</summary>
    public static double[] Forward(int[] tokens, double[] table, int m, int c)
    {
        long v = table.LongLength / c;
        var o = new double[(long)m * c];
        for (int i = 0; i < m; i++)
        {
            if (tokens[i] < 0 || tokens[i] >= v) throw new ArgumentException($"token {tokens[i]} at {i} outside [0, {v})");
            Array.Copy(table, (long)tokens[i] * c, o, (long)i * c, c);
        }
        return o;
    }

    /// <summary>dTable(V,C) = Σ_m onehot(tokens(m)) ⊗ dOut(m,:) (fresh).</summary>
    public static double[] Backward(double[] dOut, int[] tokens, int m, int v, int c)
    {
        var d = new double[(long)v * c];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < c; j++) d[(long)tokens[i] * c + j] += dOut[(long)i * c + j];
        return d;
    }
}
