using System.Globalization;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Peft.Training;

/// <summary>
/// The expected peak memory of a training run, by component, computed before anything is trained: what
/// <c>ftn train</c> prints and checks against the memory available.
/// </summary>
/// <remarks>
/// Weights: every base tensor in its dtype. Trainable: the method's own tensors that are not base weights (adapter
/// matrices, f32 masters of bf16 weights). Gradients: f32, one per distinct gradient tensor (the model's base
/// gradients when TrainBase, else the method's). Optimizer: AdamW m and v (8 bytes per trainable value), or SGD's
/// momentum (4) plus one scratch tensor. Activations: the model's training workspace for (MicroBatch, T), the same
/// buffers TrainingWorkspace allocates (saved activations of every layer, or of one with activation
/// checkpointing; gradient scratch; one logits chunk; LoRA buffers; prompt tuning's P extra rows per sequence and the
/// prefix/bottleneck buffers).
/// </remarks>
public sealed record MemoryPlan(long WeightBytes, long TrainableBytes, long GradientBytes, long OptimizerBytes, long ActivationBytes,
    long ActivationBytesCheckpointed, bool ActivationCheckpointing)
{
    public long TotalBytes => WeightBytes + TrainableBytes + GradientBytes + OptimizerBytes + ActivationBytes;

    /// <summary>
    /// What a GPU backend reserves in one pool chunk once the model and the method exist (IBackend.Reserve): the
    /// optimizer state and the training workspace that the trainer and the first step allocate, plus 1/16 and 1 MiB
    /// for the pool's 256-byte alignment of each tensor and the trainer's small tensors.
    /// </summary>
    public long StepReserveBytes => (OptimizerBytes + ActivationBytes) * 17 / 16 + (1L << 20);

    /// <summary>The plan of training <paramref name="method"/> (attached to <paramref name="model"/>) with batches of (MicroBatch, <paramref name="seqLen"/>).</summary>
    public static MemoryPlan Estimate(LlamaModel model, ITrainableMethod method, TrainOptions opt, int seqLen)
    {
        var weights = model.Weights.Named().Select(p => p.Tensor).ToList();
        var weightSet = new HashSet<Tensor>(weights, ReferenceEqualityComparer.Instance);
        long weightBytes = weights.Sum(t => t.Bytes);
        long trainableBytes = method.Trainable.Where(t => !weightSet.Contains(t.Param)).Sum(t => t.Param.Bytes);
        var grads = new HashSet<Tensor>(ReferenceEqualityComparer.Instance);
        if (model.TrainBase) foreach (var (_, _, g) in model.BaseParameters()) grads.Add(g);
        foreach (var t in method.Trainable) grads.Add(t.Grad);
        long gradBytes = grads.Sum(g => g.Bytes);
        long values = method.Trainable.Sum(t => t.Param.Length);
        long optBytes = opt.Optimizer == "adamw" ? 8 * values : 4 * values + 4 * method.Trainable.Max(t => t.Param.Length);
        long act = Activations(model, opt.MicroBatch, seqLen, shared: false);
        long actCkpt = Activations(model, opt.MicroBatch, seqLen, shared: true);
        return new MemoryPlan(weightBytes, trainableBytes, gradBytes, optBytes, model.ActivationCheckpointing ? actCkpt : act, actCkpt, model.ActivationCheckpointing);
    }

    /// <summary>Bytes of the training workspace for (batch, seqLen): mirrors TrainingWorkspace's allocations.</summary>
    public static long Activations(LlamaModel model, int batch, int seqLen, bool shared)
    {
        var c = model.Config;
        seqLen += model.PromptLength;                                 // prompt tuning runs P + T rows per sequence
        long m = (long)batch * seqLen;
        long C = c.HiddenSize, F = c.IntermediateSize, QD = c.QDim, KVD = c.KvDim, NH = c.NumHeads, L = c.NumLayers;
        long perLayer = C + QD + NH + 2 * F;                          // ResidMid, Att, Lse, Gate, Up (+ Q, K, V below)
        long perToken = 4                                             // tokens, targets, positions, losses
            + (L + 1) * C                                             // residual stream
            + (shared ? 1 : L) * perLayer
            + 3 * C + 2 + F                                           // Xn, XnF, Tmp, Rstd, RstdF, H
            + 2 * C + 2 * QD + 2 * KVD + 2 * F;                       // DResid, DXn, DAtt, DQ, DK, DV, DH, DUp
        long rows = model.LogitsChunkRows > 0 ? model.LogitsChunkRows : Math.Max(1, LlamaModel.DefaultLogitsChunkElements / c.VocabSize);
        rows = Math.Clamp(rows, 1, m);
        long floats = m * perToken + rows * c.VocabSize + C;          // + logits chunk + norm-gradient sink
        int maxR = 0;
        long doraScratch = 0;
        foreach (var (_, module, slot) in model.LoraSlots())
        {
            var shape = LoraAdapter.LinearShape(c, module);
            floats += m * slot.Rank;                                  // u
            if (slot.Dropout > 0) floats += m * shape.In;             // dropped input
            if (slot.IsDora) floats += m * shape.Out;                 // DoRA z
            if (slot.IsDora && slot.Dropout > 0) doraScratch = Math.Max(doraScratch, m * Math.Max(shape.In, shape.Out));
            maxR = Math.Max(maxR, slot.Rank);
        }
        floats += m * maxR;                                           // shared g scratch
        floats += doraScratch;                                        // shared DoRA-with-dropout scratch
        floats += model.PeftWorkspaceFloats(batch, seqLen);           // prefix / bottleneck buffers
        long qkv = (shared ? 1 : L) * m * (QD + 2 * KVD);             // saved Q, K, V: f32, or bf16 with bf16 attention
        return 4 * floats + model.AttentionDType.StorageBytes(qkv);
    }

    /// <summary>A multi-line report: one line per component and the total.</summary>
    public string Describe()
    {
        string Line(string what, long bytes, string note = "") => $"  {what,-13}{FormatBytes(bytes),10}{note}";
        var lines = new List<string>
        {
            Line("weights", WeightBytes),
            Line("trainable", TrainableBytes, "  (adapter tensors / f32 masters)"),
            Line("gradients", GradientBytes, "  (f32)"),
            Line("optimizer", OptimizerBytes),
            Line("activations", ActivationBytes, ActivationCheckpointing ? "  (activation checkpointing)" :
                $"  ({FormatBytes(ActivationBytesCheckpointed)} with --activation-checkpointing)"),
            Line("total", TotalBytes, "  expected peak"),
        };
        return string.Join("\n", lines);
    }

    /// <summary>
    /// Null when the plan fits in <paramref name="limitBytes"/>; else a message naming the largest parts and what to
    /// change to make the run fit.
    /// </summary>
    public string? Refusal(long limitBytes, string limitSource)
    {
        if (TotalBytes <= limitBytes) return null;
        var advice = new List<string>();
        if (!ActivationCheckpointing && ActivationBytes - ActivationBytesCheckpointed > 0)
            advice.Add($"--activation-checkpointing (activations {FormatBytes(ActivationBytes)} -> {FormatBytes(ActivationBytesCheckpointed)})");
        advice.Add($"a smaller --batch-size or --max-len (activations {FormatBytes(ActivationBytes)} scale with both)");
        if (GradientBytes + OptimizerBytes > WeightBytes / 2)
            advice.Add($"fewer trainable parameters: LoRA instead of full fine-tuning, or --top-layers N (gradients + optimizer {FormatBytes(GradientBytes + OptimizerBytes)})");
        advice.Add("--optimizer sgd (4 bytes of state per trainable value instead of 8)");
        return $"the run needs about {FormatBytes(TotalBytes)} but {limitSource} allows {FormatBytes(limitBytes)}; try " + string.Join("; or ", advice) +
               " (or raise --max-memory)";
    }

    /// <summary>
    /// Memory available to a run on <paramref name="backend"/> when detectable: on the CPU, MemAvailable of
    /// /proc/meminfo (else the GC's view of total memory) plus what the weights already loaded in this process hold.
    /// Null for devices whose free memory is not known here (pass --max-memory).
    /// </summary>
    public static long? DetectAvailable(IBackend backend, long alreadyResident)
    {
        if (!backend.Name.StartsWith("cpu", StringComparison.Ordinal)) return null;
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
                {
                    var parts = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                    return long.Parse(parts[1], CultureInfo.InvariantCulture) * 1024 + alreadyResident;
                }
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        long gc = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        return gc > 0 ? gc : null;
    }

    /// <summary>"8G", "512M", "1.5GiB", "2000000" (bytes) → bytes.</summary>
    public static long ParseSize(string text)
    {
        string s = text.Trim().ToUpperInvariant().Replace("IB", "", StringComparison.Ordinal).TrimEnd('B');
        double mult = 1;
        if (s.Length > 0 && "KMGT".Contains(s[^1], StringComparison.Ordinal))
        {
            mult = Math.Pow(1024, "KMGT".IndexOf(s[^1], StringComparison.Ordinal) + 1);
            s = s[..^1];
        }
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) || v <= 0 || !double.IsFinite(v))
            throw new ArgumentException($"memory size '{text}': expected a number with an optional K/M/G/T suffix (e.g. 16G)");
        return (long)(v * mult);
    }

    public static string FormatBytes(long b) => b switch
    {
        >= 1L << 30 => (b / (double)(1L << 30)).ToString("0.00", CultureInfo.InvariantCulture) + " GiB",
        >= 1L << 20 => (b / (double)(1L << 20)).ToString("0.0", CultureInfo.InvariantCulture) + " MiB",
        >= 1L << 10 => (b / 1024.0).ToString("0.0", CultureInfo.InvariantCulture) + " KiB",
        _ => b + " B",
    };
}
