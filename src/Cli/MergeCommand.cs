using CommandLine;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Methods;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Cli;

[Verb("merge", HelpText = "Merge LoRA/DoRA adapters into the base model and write a Hugging Face model directory (config.json + model.safetensors).")]
public sealed class MergeOptions : DeviceOptions
{
    [Option("model", MetaValue = "PATH",
        HelpText = "The base: Hugging Face model directory or llama2.c .bin checkpoint. Default: the embedded models/ftn-tiny.")]
    public string? Model { get; set; }

    [Option("adapter", Required = true, MetaValue = "DIR", Separator = ',',
        HelpText = "PEFT LoRA/DoRA adapter directory; repeat it (or give DIR,DIR) to merge the sum of several LoRA updates.")]
    public IEnumerable<string> Adapters { get; set; } = Array.Empty<string>();

    [Option("out", Required = true, MetaValue = "DIR", HelpText = "Output model directory (written aside, then renamed into place).")]
    public string Out { get; set; } = "";

    [Option("dtype", MetaValue = "TYPE", HelpText = "Weight dtype of the output: f32, bf16 or f16. Default: the base's float dtype as loaded.")]
    public string? Dtype { get; set; }

    [Option("base-quant", MetaValue = "TYPE",
        HelpText = "nf4: merge into the NF4-dequantized base, the base a QLoRA adapter (--qlora) was trained against, so the output computes what training evaluated; none (default): merge into the base as loaded.")]
    public string? BaseQuant { get; set; }
}

/// <summary>
/// <c>ftn merge</c>: W' = W + Σ s·B·A over the adapters (DoRA alone: PEFT's renormalised merge), written as a Hugging
/// Face model. After QLoRA the base's projections only exist as NF4 during training; <c>--base-quant nf4</c> rebuilds
/// that NF4 base from the loaded one (same quantizer, deterministic) and merges into its dequantized values.
/// </summary>
public static class MergeCommand
{
    public static int Run(MergeOptions o, TextWriter stdout)
    {
        var adapters = o.Adapters.Select(a => CliCommon.RequireDirectory(a, "adapter")).ToArray();
        if (adapters.Length == 0) throw new UserError("--adapter: give at least one adapter directory");
        foreach (var a in adapters)
            if (AdapterFiles.IsSessionAdapter(a))
                throw new UserError($"adapter '{a}': prompt/prefix/bottleneck adapters change the computation, not the weights; only LoRA/DoRA adapters can be merged");
        DType? dtype = o.Dtype?.ToLowerInvariant() switch
        {
            null => null,
            "f32" or "float32" => Kernels.DType.F32,
            "bf16" or "bfloat16" => Kernels.DType.BF16,
            "f16" or "float16" => Kernels.DType.F16,
            _ => throw new UserError($"--dtype '{o.Dtype}': expected f32, bf16 or f16"),
        };
        bool nf4;
        try { nf4 = QLora.ParseBaseQuant(o.BaseQuant) is not null; }
        catch (ArgumentException e) { throw new UserError("--base-quant: " + e.Message); }
        string path = ModelSource.Resolve(o.Model);
        string outDir = Path.GetFullPath(o.Out);

        using var backend = CliCommon.CreateBackend(o);
        using var loaded = ModelSource.Load(path, backend);
        var loadedDType = loaded.Weights.Embedding.DType is var e0 && e0 is Kernels.DType.BF16 or Kernels.DType.F16 ? e0 : Kernels.DType.F32;
        var outDType = dtype ?? loadedDType;
        string baseText;
        LlamaWeights merged;
        if (nf4)
        {
            var q = QLora.QuantizeBase(loaded.Weights); // replaces (and frees) the loaded projections
            merged = QLora.DequantizedCopy(q.Weights);
            baseText = "the NF4-dequantized base (the QLoRA training base: its 7 projections per layer NF4-quantized and dequantized to f32)";
        }
        else
        {
            merged = ModelSource.CloneWritable(loaded.Weights, backend);
            baseText = $"the base as loaded ({loadedDType.Name()})";
        }
        using (merged)
        {
            try { AdapterSet.StackInto(merged, adapters); }
            catch (Exception e) when (e is FileNotFoundException or InvalidDataException or ArgumentException or InvalidOperationException)
            {
                throw new UserError($"adapter '{string.Join(" + ", adapters)}': {Program.OneLine(e.Message)}");
            }
            var meta = new Dictionary<string, string>
            {
                ["ftn.base_model"] = path,
                ["ftn.merged_adapters"] = string.Join(", ", adapters.Select(Path.GetFullPath)),
                ["ftn.merge_base"] = nf4 ? "nf4-dequantized" : "as loaded",
            };
            var copied = new List<string>();
            CliCommon.WriteDirectoryAtomic(outDir, tmp =>
            {
                ModelSaver.SaveHf(merged, tmp, outDType, meta);
                if (Directory.Exists(path))
                    foreach (var f in FullFineTune.CompanionFiles)
                        if (File.Exists(Path.Combine(path, f))) { File.Copy(Path.Combine(path, f), Path.Combine(tmp, f)); copied.Add(f); }
            });
            stdout.WriteLine($"merged   {string.Join(" + ", adapters)} into {baseText}");
            stdout.WriteLine($"saved    {outDir}: model.safetensors (every weight {outDType.Name()}), config.json" +
                             (copied.Count > 0 ? $", {string.Join(", ", copied)}" : "; no tokenizer files next to the base: give ftn generate --tokenizer"));
        }
        return 0;
    }
}
