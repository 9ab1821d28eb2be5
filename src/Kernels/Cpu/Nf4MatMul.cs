namespace FineTuneNative.Kernels.Cpu;

// The nn.Linear products over an NF4 weight: the weight is dequantized one block of rows at a time into an f32
// panel (threads over rows), and each panel goes through the packed GEMM (Gemm.cs). The full f32 weight never
// exists: the panel holds at most Nf4PanelFloats floats. Reference: Nf4Reference + MatMulReference.
public sealed unsafe partial class CpuBackend
{
    /// <summary>Floats of the dequantized row panel (1 MiB: stays in L2 next to the GEMM's own packing).</summary>
    private const int Nf4PanelFloats = 1 << 18;
    /// <summary>Tests set this (per calling thread) to force several panels at small shapes; results do not depend on it.</summary>
    [ThreadStatic] internal static int Nf4PanelFloatsOverride;
    private float[]? _nf4Panel;

    /// <summary>Rows of W dequantized at once: a multiple of the GEMM's column block where K allows.</summary>
    private static int Nf4PanelRows(int n, int k) =>
        Math.Clamp((Nf4PanelFloatsOverride > 0 ? Nf4PanelFloatsOverride : Nf4PanelFloats) / Math.Max(k, 1), 1, Math.Max(1, n));

    /// <summary>The storage of an NF4 weight of n·k elements, after checking it.</summary>
    internal byte* Nf4Weight(Tensor w, long needed, string name, string op)
    {
        byte* p = Ptr(w, name);
        if (w.DType != DType.NF4) throw new ArgumentException($"{op}: {name} {w.Describe()} must be nf4", name);
        if (w.Length != needed) throw new ArgumentException($"{op}: {name} {w.Describe()} has {w.Length} elements, needs {needed}", name);
        return p;
    }

    private struct Nf4RowsCtx { public byte* S; public long N; public int K; public long Row0; public float* Dst; }

    private static void Nf4RowBody(void* p, int i, int worker)
    {
        var c = (Nf4RowsCtx*)p;
        Nf4.Dequantize(c->S, c->N, (c->Row0 + i) * c->K, c->K, c->Dst + (long)i * c->K);
    }

    /// <summary>panel(rows, K) = dequantized rows [row0, row0 + rows) of the (N, K) NF4 weight.</summary>
    private void Nf4DequantRows(byte* s, long total, int k, long row0, int rows, float* panel)
    {
        var ctx = new Nf4RowsCtx { S = s, N = total, K = k, Row0 = row0, Dst = panel };
        _pool.For(rows, &Nf4RowBody, &ctx);
    }

    private float[] Nf4Panel(int rows, int k)
    {
        long need = (long)rows * k;
        if (_nf4Panel is null || _nf4Panel.Length < need) _nf4Panel = GC.AllocateUninitializedArray<float>((int)need, pinned: true);
        return _nf4Panel;
    }

    /// <summary>y(M,N) (+)= alpha·x(M,K)·Wᵀ [+ bias(N)] for an NF4 W(N,K), one dequantized row panel at a time.</summary>
    internal void Nf4Forward(Tensor w, string op, int m, int n, int k, float* x, float* y, float alpha, bool accumulate, float* bias)
    {
        byte* s = Nf4Weight(w, (long)n * k, "w", op);
        if (m == 0 || n == 0) return;
        int rows = Nf4PanelRows(n, k);
        fixed (float* panel = Nf4Panel(rows, k))
        {
            for (int j0 = 0; j0 < n; j0 += rows)
            {
                int nb = Math.Min(rows, n - j0);
                Nf4DequantRows(s, (long)n * k, k, j0, nb, panel);
                Gemm.Run(this, m, nb, k, x, k, false, panel, false, k, true, y + j0, n, alpha, accumulate, bias != null ? bias + j0 : null);
            }
        }
    }

    /// <summary>dx(M,K) (+)= dy(M,N)·W for an NF4 W(N,K): Σ over row panels of dy[:, panel]·W[panel, :].</summary>
    internal void Nf4BackwardInput(Tensor w, string op, int m, int n, int k, float* dy, float* dx, bool accumulate)
    {
        byte* s = Nf4Weight(w, (long)n * k, "w", op);
        if (m == 0 || k == 0) return;
        if (n == 0)
        {
            if (!accumulate) new Span<float>(dx, checked(m * k)).Clear();
            return;
        }
        int rows = Nf4PanelRows(n, k);
        fixed (float* panel = Nf4Panel(rows, k))
        {
            for (int j0 = 0; j0 < n; j0 += rows)
            {
                int nb = Math.Min(rows, n - j0);
                Nf4DequantRows(s, (long)n * k, k, j0, nb, panel);
                Gemm.Run(this, m, k, nb, dy + j0, n, false, panel, false, k, false, dx, k, 1f, accumulate || j0 > 0, null);
            }
        }
    }
}
