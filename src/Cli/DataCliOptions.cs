using System.Globalization;
using CommandLine;
using FineTuneNative.Peft.Data;

namespace FineTuneNative.Cli;

/// <summary>The data options of <c>ftn train</c> (chat template, cleaning, mixture, splits, augmentation, packing, NEFTune).</summary>
public abstract class DataCliOptions : DeviceOptions
{
    [Option("chat-template", Default = "auto", MetaValue = "T",
        HelpText = "Prompt format: auto (the model's tokenizer_config.json chat_template, else the built-in ### format), none, a built-in (chatml, llama3, mistral, qwen2.5, smollm2, gemma), a .jinja file or a tokenizer_config.json. Generation uses the same.")]
    public string ChatTemplate { get; set; } = "auto";

    [Option("dataset-weights", MetaValue = "W[,W]",
        HelpText = "Relative weight of each --data file in the mixture (same order); a file is over- or under-sampled to its share.")]
    public string? DatasetWeights { get; set; }

    [Option("pack", Default = false, HelpText = "Pack short samples into full --max-len rows (attention stays within each sample; positions restart).")]
    public bool Pack { get; set; }

    [Option("neftune-alpha", MetaValue = "A", HelpText = "NEFTune: uniform noise of magnitude A/sqrt(L*C) on the input embeddings of the real tokens during training (L a row's unpadded length; typical 5). Default 0 (off).")]
    public float NeftuneAlpha { get; set; }

    [Option("normalize-whitespace", Default = false, HelpText = "Clean text: NFC, collapse runs of spaces, strip line ends, at most one blank line, trim.")]
    public bool NormalizeWhitespace { get; set; }

    [Option("keep-duplicates", Default = false, HelpText = "Keep exact duplicate records (dropped and reported by default).")]
    public bool KeepDuplicates { get; set; }

    [Option("keep-empty", Default = false, HelpText = "Keep records with an empty response (dropped and reported by default).")]
    public bool KeepEmpty { get; set; }

    [Option("test-fraction", MetaValue = "F", HelpText = "Share of the records held out as a test split (never trained or evaluated on during the run). Default 0.")]
    public double TestFraction { get; set; }

    [Option("augment-ratio", MetaValue = "R", HelpText = "Text augmentation of training prompts: per-word probability of a synonym substitution and of a noise-word insertion. Default 0 (off).")]
    public double AugmentRatio { get; set; }

    [Option("synonyms", MetaValue = "FILE", HelpText = "Synonym table for --augment-ratio: one group of interchangeable words per line, comma- or tab-separated.")]
    public string? Synonyms { get; set; }

    [Option("noise-words", MetaValue = "W[,W]", HelpText = "Words inserted as noise by --augment-ratio (default: words of the training prompts).")]
    public string? NoiseWords { get; set; }

    [Option("augment-seed", Default = 1234UL, MetaValue = "S", HelpText = "Seed of the text augmentation.")]
    public ulong AugmentSeed { get; set; } = 1234;

    /// <summary>The Peft data options these flags describe (validated; a bad value is a <see cref="UserError"/>).</summary>
    public DataOptions BuildDataOptions()
    {
        double[] weights;
        try
        {
            weights = string.IsNullOrWhiteSpace(DatasetWeights) ? Array.Empty<double>()
                : DatasetWeights.Split(',', StringSplitOptions.TrimEntries).Select(w => double.Parse(w, NumberStyles.Float, CultureInfo.InvariantCulture)).ToArray();
        }
        catch (FormatException) { throw new UserError($"--dataset-weights must be comma-separated numbers (got '{DatasetWeights}')"); }
        var d = new DataOptions
        {
            ChatTemplate = ChatTemplate,
            DatasetWeights = weights,
            Pack = Pack,
            NeftuneAlpha = NeftuneAlpha,
            NormalizeWhitespace = NormalizeWhitespace,
            Dedupe = !KeepDuplicates,
            DropEmpty = !KeepEmpty,
            TestFraction = TestFraction,
            AugmentRatio = AugmentRatio,
            SynonymsPath = Synonyms,
            NoiseWords = NoiseWords is null ? Array.Empty<string>() : NoiseWords.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries),
            AugmentSeed = AugmentSeed,
        };
        try { d.Validate(); }
        catch (ArgumentException e) { throw new UserError(e.Message); }
        return d;
    }
}
