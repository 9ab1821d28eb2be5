using System.Text.Json.Nodes;
using FineTuneNative.Kernels;

namespace FineTuneNative.Peft.Training;

/// <summary>
/// One tensor the optimizer updates: its stable name (the key of its optimizer state in checkpoints), the f32
/// parameter the optimizer writes, its f32 gradient (accumulated by the model's backward), and whether decoupled
/// weight decay applies to it.
/// </summary>
/// <param name="Name">Unique within the method and stable across runs (checkpoints key Adam m/v by it).</param>
/// <param name="Param">F32, on the model's backend. For a bf16 model weight this is the f32 master copy.</param>
/// <param name="Grad">F32, same shape as <paramref name="Param"/>, on the model's backend.</param>
/// <param name="WeightDecay">False for norms, biases and other 1-D tensors (decaying them toward 0 hurts).</param>
/// <param name="Rounded">For an f32 master: the bf16/f16 weight the model reads, which the trainer rewrites from the
/// master after every update (in the same pass as AdamW on GPU backends); null when the model reads Param itself.</param>
public sealed record TrainableTensor(string Name, Tensor Param, Tensor Grad, bool WeightDecay, Tensor? Rounded = null);

/// <summary>
/// A set of trainable parameters attached to a <see cref="Runtime.Model.LlamaModel"/>: what <see cref="Trainer"/>
/// trains. LoRA (<see cref="Lora.LoraAdapter"/>), full fine-tuning (<c>FullFineTune</c>), and the other
/// methods (DoRA, QLoRA, prefix/prompt tuning, bottleneck adapters...) implement it; the trainer knows nothing
/// else about them.
/// </summary>
/// <remarks>
/// <para>Contract, in the order the trainer uses it in one optimizer step:</para>
/// <list type="number">
/// <item><see cref="ZeroGrad"/> sets every <see cref="TrainableTensor.Grad"/> to 0.</item>
/// <item>The model's ForwardBackward runs once per micro-batch with lossScale = 1/N (N = target tokens of the
/// whole accumulation window); the method's gradients must be accumulated (+=) by the model's backward (the
/// method arranges that when it is attached: LoRA slots, TrainBase gradients, prefix slots...).</item>
/// <item><see cref="AddPenalty"/> adds the gradient of any extra penalty term (EWC, ...) to the gradients (+=) and
/// returns its value; the default is no penalty.</item>
/// <item>The trainer measures the global gradient norm over <see cref="Trainable"/>, clips, and updates every
/// <see cref="TrainableTensor.Param"/> in place (AdamW or SGD, f32 state keyed by <see cref="TrainableTensor.Name"/>).</item>
/// <item><see cref="AfterStep"/> lets the method propagate the new values where the model reads them (e.g. round
/// f32 master weights into bf16 model weights; recompute a DoRA norm).</item>
/// </list>
/// <para>Files: <see cref="Save"/> writes the method's own format (PEFT's adapter format for adapters, Hugging Face
/// safetensors for full fine-tuning) into a directory, each file atomically (temporary name, then rename).
/// <see cref="LoadValues"/> reads such a directory back into this instance (same shapes) so that a checkpoint can
/// be resumed and the best evaluation restored; creating a method from a directory is each method's own static
/// Load.</para>
/// <para>Attachment: a method is attached to the model it was created for when created. <see cref="Detach"/> removes
/// its effect from the model (the base model alone computes the loss) and <see cref="Attach"/> puts it back, so
/// several methods can be switched on one base model. <see cref="IDisposable.Dispose"/> detaches and frees the
/// method's tensors.</para>
/// <para><see cref="Trainable"/> has the same names, order and shapes for the whole life of the instance.</para>
/// </remarks>
public interface ITrainableMethod : IDisposable
{
    /// <summary>Short name of the method for logs and summaries: "lora", "full", "prefix", ...</summary>
    string Kind { get; }

    /// <summary>The tensors to optimise, in a fixed order.</summary>
    IReadOnlyList<TrainableTensor> Trainable { get; }

    /// <summary>Number of trainable scalars (Σ Param.Length over <see cref="Trainable"/>).</summary>
    long ParameterCount => Trainable.Sum(t => t.Param.Length);

    /// <summary>Sets every gradient of <see cref="Trainable"/> to 0.</summary>
    void ZeroGrad();

    /// <summary>Adds (+=) the gradient of an extra penalty to the gradients and returns the penalty's value (default: none, 0).</summary>
    double AddPenalty() => 0;

    /// <summary>Called after every optimizer update of the <see cref="Trainable"/> tensors (default: nothing).</summary>
    void AfterStep() { }

    /// <summary>Writes the method's files into <paramref name="dir"/> (created if needed), each written atomically.</summary>
    void Save(string dir, string? baseModelNameOrPath = null);

    /// <summary>Reads the values saved by <see cref="Save"/> in <paramref name="dir"/> into this instance; shapes must match.</summary>
    void LoadValues(string dir);

    /// <summary>True while the method is applied by the model.</summary>
    bool IsAttached { get; }

    /// <summary>Applies the method to its model again after <see cref="Detach"/> (no-op when attached).</summary>
    void Attach();

    /// <summary>Removes the method's effect from its model, keeping its tensors (no-op when detached).</summary>
    void Detach();

    /// <summary>The method's settings, recorded in train_results.json and the resolved configuration.</summary>
    JsonObject DescribeConfig();
}
