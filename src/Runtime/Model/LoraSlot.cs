using System.Diagnostics.CodeAnalysis;
using FineTuneNative.Kernels;

namespace FineTuneNative.Runtime.Model;

/// <summary>
/// The LoRA adapter of one linear projection, attached with <see cref="LlamaModel.SetLora"/>:
/// y = x·Wᵀ [+ b] + Scale · dropout(x)·Aᵀ·Bᵀ.
/// </summary>
/// <remarks>
/// The tensors are owned by the caller (the adapter), not by the model. A, B, DA, DB are F32 on the model's
/// backend. DA and DB are accumulated (+=) by <see cref="LlamaModel.ForwardBackward"/>; the caller zeroes them.
/// </remarks>
public sealed class LoraSlot
{
    public LoraSlot() { }

    [SetsRequiredMembers]
    public LoraSlot(Tensor a, Tensor b, Tensor dA, Tensor dB, float scale, float dropout)
    {
        A = a; B = b; DA = dA; DB = dB; Scale = scale; Dropout = dropout;
    }

    /// <summary>(R, K) down projection, PEFT lora_A.weight.</summary>
    public required Tensor A { get; init; }
    /// <summary>(N, R) up projection, PEFT lora_B.weight.</summary>
    public required Tensor B { get; init; }
    /// <summary>(R, K) gradient of A (accumulated).</summary>
    public required Tensor DA { get; init; }
    /// <summary>(N, R) gradient of B (accumulated).</summary>
    public required Tensor DB { get; init; }
    /// <summary>alpha / r (or alpha / sqrt(r) for rsLoRA).</summary>
    public float Scale { get; set; }
    /// <summary>Drop probability on the LoRA input during training (0 disables; never applied by Loss).</summary>
    public float Dropout { get; set; }

    /// <summary>
    /// DoRA (PEFT use_dora) only: the (N) magnitude m, PEFT's lora_magnitude_vector. With it the linear becomes
    /// y = m ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) / ‖W + s·B·A‖_row [+ b] (see <see cref="DoraLinear"/>); null for plain LoRA.
    /// </summary>
    public Tensor? Magnitude { get; init; }
    /// <summary>(N) gradient of <see cref="Magnitude"/> (accumulated).</summary>
    public Tensor? DMagnitude { get; init; }
    /// <summary>(N) ‖W + s·B·A‖ per output row: written by each forward, read (as a constant) by its backward.</summary>
    public Tensor? WeightNorm { get; init; }

    public bool IsDora => Magnitude is not null;

    /// <summary>R.</summary>
    public int Rank => A.Dim(0);
}
