namespace FineTuneNative.Kernels.Reference;

/// <summary>SwiGLU h = silu(gate) ⊙ up, silu(g) = g·σ(g), in double.</summary>
public static class SwiGluReference
{
    private static double Sigmoid(double g) => 1.0 / (1.0 + Math.Exp(-g));

    public static double[] Forward(double[] gate, double[] up)
    {
        var h = new double[gate.LongLength];
        for (long i = 0; i < h.LongLength; i++) h[i] = gate[i] * Sigmoid(gate[i]) * up[i];
        return h;
    }

    /// <summary>dGate = dh ⊙ up ⊙ σ(g)(1 + g(1 - σ(g))); dUp = dh ⊙ silu(g).</summary>
    public static (double[] DGate, double[] DUp) Backward(double[] dh, double[] gate, double[] up)
    {
        var dg = new double[gate.LongLength];
        var du = new double[gate.LongLength];
        for (long i = 0; i < dg.LongLength; i++)
        {
            double g = gate[i], s = Sigmoid(g);
            dg[i] = dh[i] * up[i] * s * (1 + g * (1 - s));
            du[i] = dh[i] * g * s;
        }
        return (dg, du);
    }
}
