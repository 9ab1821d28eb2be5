namespace FineTuneNative.Kernels;

/// <summary>
/// A pointwise function of one float, written once and used by the CPU loops and the generic ILGPU kernels
/// (static abstract members compile to direct calls, so ILGPU sees plain static code: no boxing, no virtual call).
/// </summary>
public interface IUnaryOp
{
    static abstract float Apply(float x);
}

/// <summary>A pointwise function of two floats (see <see cref="IUnaryOp"/>).</summary>
public interface IBinaryOp
{
    static abstract float Apply(float a, float b);
}

/// <summary>a + b.</summary>
public struct AddOp : IBinaryOp
{
    public static float Apply(float a, float b) => a + b;
}

/// <summary>a · b.</summary>
public struct MulOp : IBinaryOp
{
    public static float Apply(float a, float b) => a * b;
}

/// <summary>σ(x) = 1 / (1 + e^-x).</summary>
public struct SigmoidOp : IUnaryOp
{
    public static float Apply(float x) => 1f / (1f + MathF.Exp(-x));
}

/// <summary>silu(x) = x·σ(x); silu'(x) = σ(x)·(1 + x·(1 - σ(x))).</summary>
public struct SiluOp : IUnaryOp
{
    public static float Apply(float x) => x * SigmoidOp.Apply(x);

    public static float Derivative(float x)
    {
        float s = SigmoidOp.Apply(x);
        return s * (1f + x * (1f - s));
    }
}

/// <summary>swiglu(gate, up) = silu(gate)·up (the Llama MLP activation).</summary>
public struct SwiGluOp : IBinaryOp
{
    public static float Apply(float gate, float up) => SiluOp.Apply(gate) * up;
}
