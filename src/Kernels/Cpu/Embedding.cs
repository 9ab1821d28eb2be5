namespace FineTuneNative.Kernels.Cpu;

// Token embedding; reference: EmbeddingReference.
public sealed unsafe partial class CpuBackend
{
    private struct EmbCtx { public float* Out, DTable, DOut; public void* Table; public bool Bf16; public int* Tokens; public int M, C; }

    private static void CheckTokens(string op, int* tokens, int m, long v)
    {
        for (int i = 0; i < m; i++)
            if ((uint)tokens[i] >= (ulong)v)
                throw new ArgumentException($"{op}: token {tokens[i]} at position {i} is outside the vocabulary [0, {v})");
    }

    /// <summary>out(M,C) = table(V,C)[tokens(M)]; table f32 or bf16. Throws on a token outside [0, V).</summary>
    public void EmbeddingForward(Tensor output, Tensor tokens, Tensor table, int m, int c)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "EmbeddingForward";
        Dims(op, (nameof(m), m), (nameof(c), c));
        float* po = F32(output, (long)m * c, nameof(output), op);
        int* pt = I32(tokens, m, nameof(tokens), op);
        void* tab = Weight(table, c, nameof(table), op, out bool bf16);
        long v = c == 0 ? 0 : table.Length / c;
        CheckTokens(op, pt, m, v);
        var ctx = new EmbCtx { Out = po, Tokens = pt, Table = tab, Bf16 = bf16, M = m, C = c };
        _pool.For(m, &EmbForwardRow, &ctx);
    }

    private static void EmbForwardRow(void* p, int i, int worker)
    {
        var e = (EmbCtx*)p;
        long src = (long)e->Tokens[i] * e->C;
        float* dst = e->Out + (long)i * e->C;
        if (e->Bf16) HalfConvert.Bf16ToF32((ushort*)e->Table + src, dst, e->C);
        else Buffer.MemoryCopy((float*)e->Table + src, dst, e->C * 4L, e->C * 4L);
    }

    /// <summary>dTable(V,C) += scatter of dOut(M,C) at tokens(M) (parameter gradient, accumulated).</summary>
    /// <remarks>Threads split the channels, so a token repeated in the batch never races.</remarks>
    public void EmbeddingBackward(Tensor dTable, Tensor dOut, Tensor tokens, int m, int c)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "EmbeddingBackward";
        Dims(op, (nameof(m), m), (nameof(c), c));
        float* pd = F32(dTable, c, nameof(dTable), op);
        float* pdo = F32(dOut, (long)m * c, nameof(dOut), op);
        int* pt = I32(tokens, m, nameof(tokens), op);
        long v = c == 0 ? 0 : dTable.Length / c;
        CheckTokens(op, pt, m, v);
        var ctx = new EmbCtx { DTable = pd, DOut = pdo, Tokens = pt, M = m, C = c };
        _pool.For((c + ColBlock - 1) / ColBlock, &EmbBackwardBlock, &ctx);
    }

    private static void EmbBackwardBlock(void* p, int block, int worker)
    {
        var e = (EmbCtx*)p;
        int j0 = block * ColBlock, nj = Math.Min(ColBlock, e->C - j0);
        for (int i = 0; i < e->M; i++)
        {
            var src = new ReadOnlySpan<float>(e->DOut + (long)i * e->C + j0, nj);
            var dst = new Span<float>(e->DTable + (long)e->Tokens[i] * e->C + j0, nj);
            System.Numerics.Tensors.TensorPrimitives.Add(dst, src, dst);
        }
    }
}
