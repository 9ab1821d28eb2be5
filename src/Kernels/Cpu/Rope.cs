namespace FineTuneNative.Kernels.Cpu;

// Rotary position embedding; reference: RopeReference.
public sealed unsafe partial class CpuBackend
{
    private struct RopeCtx { public float* X; public int* Pos; public int NH, HS; public double Theta; public bool Interleaved, Inverse; }

    /// <summary>
    /// Rotates x(M, NH, HS) in place: pair i turns by pos(m)·θ^(-2i/HS) (negated when inverse, the backward).
    /// Angles are formed in double so long positions keep their precision.
    /// </summary>
    public void Rope(Tensor x, Tensor positions, int m, int nHeads, int headSize, float theta, RopeLayout layout, bool inverse)
    {
        using var opScope = _opLock.EnterScope();
        const string op = "Rope";
        Dims(op, (nameof(m), m), (nameof(nHeads), nHeads), (nameof(headSize), headSize));
        if (headSize % 2 != 0) throw new ArgumentException($"{op}: head size {headSize} must be even");
        var ctx = new RopeCtx
        {
            X = F32(x, (long)m * nHeads * headSize, nameof(x), op), Pos = I32(positions, m, nameof(positions), op),
            NH = nHeads, HS = headSize, Theta = theta, Interleaved = layout == RopeLayout.Interleaved, Inverse = inverse,
        };
        _pool.For(m, &RopeRow, &ctx);
    }

    private static void RopeRow(void* p, int t, int worker)
    {
        var r = (RopeCtx*)p;
        int hs = r->HS, half = hs / 2;
        float* cs = stackalloc float[half];
        float* sn = stackalloc float[half];
        double pos = r->Pos[t];
        for (int i = 0; i < half; i++)
        {
            double angle = pos * Math.Pow(r->Theta, -2.0 * i / hs);
            (double s, double c) = Math.SinCos(angle);
            cs[i] = (float)c;
            sn[i] = r->Inverse ? (float)-s : (float)s;
        }
        float* row = r->X + (long)t * r->NH * hs;
        for (int h = 0; h < r->NH; h++)
        {
            float* x = row + h * hs;
            if (r->Interleaved)
            {
                for (int i = 0; i < half; i++)
                {
                    float a = x[2 * i], b = x[2 * i + 1];
                    x[2 * i] = a * cs[i] - b * sn[i];
                    x[2 * i + 1] = a * sn[i] + b * cs[i];
                }
            }
            else
            {
                for (int i = 0; i < half; i++)
                {
                    float a = x[i], b = x[i + half];
                    x[i] = a * cs[i] - b * sn[i];
                    x[i + half] = a * sn[i] + b * cs[i];
                }
            }
        }
    }
}
