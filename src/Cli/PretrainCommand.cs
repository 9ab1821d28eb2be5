using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using CommandLine;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Cli;

[Verb("pretrain", HelpText = "Train a small Llama-architecture model from scratch (all parameters) on generated tasks; how models/ftn-tiny is made.")]
public sealed class PretrainOptions : DeviceOptions
{
    [Option("corpus", Default = "gen:pretrain", MetaValue = "SPEC",
        HelpText = "Training text: gen:TASKS, the synthetic task generator with TASKS = 'pretrain', 'all' or a comma-separated list (see 'ftn synth --help').")]
    public string Corpus { get; set; } = "gen:pretrain";

    [Option("out", Required = true, MetaValue = "DIR",
        HelpText = "Output model directory (Hugging Face layout: config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json, README.md). Written to a temporary directory and renamed.")]
    public string Out { get; set; } = "";

    [Option("steps", Default = 1000, MetaValue = "N", HelpText = "Optimizer steps.")]
    public int Steps { get; set; } = 1000;

    [Option("seed", Default = 1UL, MetaValue = "S", HelpText = "Seed of the corpus, the tokenizer sample, the initial weights and dropout.")]
    public ulong Seed { get; set; } = 1;

    [Option("vocab-size", Default = 512, MetaValue = "V", HelpText = "BPE vocabulary size of the trained tokenizer (special tokens included).")]
    public int VocabSize { get; set; } = 512;

    [Option("tokenizer-examples", Default = 20000, MetaValue = "N", HelpText = "Corpus examples the BPE tokenizer is trained on.")]
    public int TokenizerExamples { get; set; } = 20000;

    [Option("hidden", Default = 128, MetaValue = "C", HelpText = "Hidden size C.")]
    public int Hidden { get; set; } = 128;

    [Option("layers", Default = 4, MetaValue = "L", HelpText = "Decoder layers L.")]
    public int Layers { get; set; } = 4;

    [Option("heads", Default = 4, MetaValue = "NH", HelpText = "Attention heads NH (head size C/NH).")]
    public int Heads { get; set; } = 4;

    [Option("kv-heads", Default = 2, MetaValue = "NKV", HelpText = "Key/value heads NKV (grouped-query attention; must divide NH).")]
    public int KvHeads { get; set; } = 2;

    [Option("ffn", Default = 384, MetaValue = "F", HelpText = "SwiGLU intermediate size F.")]
    public int Ffn { get; set; } = 384;

    [Option("max-positions", Default = 256, MetaValue = "N", HelpText = "max_position_embeddings written to config.json.")]
    public int MaxPositions { get; set; } = 256;

    [Option("seq-len", Default = 128, MetaValue = "T", HelpText = "Tokens per training row; whole examples are packed into rows, each starting with BOS.")]
    public int SeqLen { get; set; } = 128;

    [Option("batch-size", Default = 16, MetaValue = "B", HelpText = "Rows per optimizer step.")]
    public int BatchSize { get; set; } = 16;

    [Option("lr", Default = 3e-3f, MetaValue = "LR", HelpText = "Peak learning rate (AdamW, beta1 0.9, beta2 0.95).")]
    public float LearningRate { get; set; } = 3e-3f;

    [Option("min-lr-ratio", Default = 0.1f, MetaValue = "R", HelpText = "The cosine decay ends at lr * R.")]
    public float MinLrRatio { get; set; } = 0.1f;

    [Option("warmup", Default = 50, MetaValue = "N", HelpText = "Linear warmup steps.")]
    public int Warmup { get; set; } = 50;

    [Option("weight-decay", Default = 0.1f, MetaValue = "WD", HelpText = "Decoupled weight decay on matrices (not on norm weights).")]
    public float WeightDecay { get; set; } = 0.1f;

    [Option("clip", Default = 1f, MetaValue = "X", HelpText = "Clip the global gradient norm to X (0 = off).")]
    public float Clip { get; set; } = 1f;

    [Option("eval-every", Default = 100, MetaValue = "N", HelpText = "Evaluate the held-out loss every N steps.")]
    public int EvalEvery { get; set; } = 100;

    [Option("eval-examples", Default = 20, MetaValue = "N", HelpText = "Held-out examples per task for the final exact-match table (greedy generation).")]
    public int EvalExamples { get; set; } = 20;

    [Option("log-every", Default = 10, MetaValue = "N", HelpText = "Print a progress line every N steps.")]
    public int LogEvery { get; set; } = 10;
}

/// <summary>
/// <c>ftn pretrain</c>: trains a BPE tokenizer and a Llama model from scratch on the synthetic task generator,
/// then writes a Hugging Face model directory with a README holding the exact command that reproduces it.
/// </summary>
public static class PretrainCommand
{
    /// <summary>The held-out evaluation stream uses a seed derived from the training seed, so it never overlaps
    /// the training stream's indices (content may repeat: the task space is small for some tasks).</summary>
    private const ulong EvalSeedSalt = 0xE7A1_5EED_0000_0001UL;

    public static int Run(PretrainOptions o, TextWriter stdout)
    {
        var tasks = ParseCorpus(o.Corpus);
        Validate(o);
        var total = Stopwatch.StartNew();
        using var backend = CliCommon.CreateBackend(o);
        string tokDir = Path.Combine(Path.GetTempPath(), $"ftn-pretrain-tok-{Environment.ProcessId}");
        Directory.CreateDirectory(tokDir);
        try
        {
            // 1. Tokenizer: byte-level BPE on a sample of the corpus.
            var sw = Stopwatch.StartNew();
            string tokPath = Path.Combine(tokDir, "tokenizer.json");
            var sample = SyntheticTasks.Stream(o.Seed, tasks, 0, o.TokenizerExamples).Select(RenderText);
            BpeTrainer.Train(sample, o.VocabSize, tokDir, new BpeTrainerOptions { PadToken = null, ModelMaxLength = o.MaxPositions });
            var tok = TokenizerLoader.Load(tokPath);
            int bos = tok.BosId ?? throw new InvalidOperationException("the trained tokenizer has no BOS token");
            int eos = tok.EosId ?? throw new InvalidOperationException("the trained tokenizer has no EOS token");
            stdout.WriteLine($"tokenizer: {Program.OneLine(tok.Describe())} ({CliCommon.F(sw.Elapsed.TotalSeconds, "0.0")} s)");

            // 2. Model.
            var config = new LlamaConfig
            {
                HiddenSize = o.Hidden,
                IntermediateSize = o.Ffn,
                NumLayers = o.Layers,
                NumHeads = o.Heads,
                NumKvHeads = o.KvHeads,
                HeadDim = o.Hidden / o.Heads,
                VocabSize = tok.VocabSize,
                MaxPositions = o.MaxPositions,
                RmsNormEps = 1e-5f,
                RopeTheta = 10000f,
                TieWordEmbeddings = false,
                BosTokenId = bos,
                EosTokenIds = new[] { eos },
                TorchDtype = "float32",
            };
            try { config.Validate("pretrain options"); }
            catch (InvalidDataException e) { throw new UserError(e.Message); }
            using var weights = LlamaWeights.Allocate(config, backend, DType.F32);
            Pretrainer.InitializeWeights(weights, backend, o.Seed);
            using var model = new LlamaModel(weights, backend);
            var settings = new PretrainSettings
            {
                Steps = o.Steps, BatchSize = o.BatchSize, SeqLen = o.SeqLen, LearningRate = o.LearningRate, MinLrRatio = o.MinLrRatio,
                WarmupSteps = o.Warmup, WeightDecay = o.WeightDecay, Clip = o.Clip, Seed = o.Seed, EvalEvery = o.EvalEvery,
            };
            using var trainer = new Pretrainer(model, backend, settings);
            stdout.WriteLine($"model: L={o.Layers} C={o.Hidden} F={o.Ffn} NH={o.Heads} NKV={o.KvHeads} V={tok.VocabSize}, " +
                             $"{CliCommon.Count(weights.ParameterCount)} parameters; device {backend.Name}");

            // 3. Data: the task stream, encoded and packed into (B, T) batches.
            var packer = new ExamplePacker(tok, o.SeqLen, o.BatchSize);
            using var train = SyntheticTasks.Stream(o.Seed, tasks).GetEnumerator();
            int nextBatch = 0;
            PretrainBatch BatchAt(int i)
            {
                if (i != nextBatch) throw new InvalidOperationException($"batches are produced in order (asked {i}, next {nextBatch})");
                nextBatch++;
                return packer.Next(train);
            }
            var evalBatches = new List<PretrainBatch>();
            using (var ev = SyntheticTasks.Stream(o.Seed ^ EvalSeedSalt, tasks).GetEnumerator())
            {
                var evalPacker = new ExamplePacker(tok, o.SeqLen, o.BatchSize);
                for (int i = 0; i < 4; i++) evalBatches.Add(evalPacker.Next(ev));
            }
            stdout.WriteLine($"corpus: gen:{string.Join(",", tasks)}, {o.Steps} steps x {o.BatchSize} x {o.SeqLen} tokens");

            // 4. Train.
            void Report(PretrainProgress p)
            {
                if (p.Step % Math.Max(1, o.LogEvery) == 0 || p.Step == p.TotalSteps || p.Step == 1 || p.EvalLoss is not null || p.Skipped)
                {
                    var line = new StringBuilder();
                    line.Append(CultureInfo.InvariantCulture, $"step {p.Step,5}/{p.TotalSteps}  loss {CliCommon.F(p.Loss)}  lr {p.LearningRate:0.000e0}  ");
                    line.Append(CultureInfo.InvariantCulture, $"|g| {CliCommon.F(p.GradNorm, "0.00")}  {p.TokensPerSecond,6:0} tok/s  ");
                    line.Append($"elapsed {CliCommon.Duration(p.Elapsed)}  ETA {CliCommon.Duration(p.Eta)}");
                    if (p.EvalLoss is double e) line.Append($"  eval loss {CliCommon.F(e)}");
                    if (p.Skipped) line.Append("  SKIPPED (NaN/Inf: nothing updated)");
                    stdout.WriteLine(line.ToString());
                }
            }
            PretrainResult result;
            try { result = trainer.Run(BatchAt, evalBatches, Report); }
            catch (TrainingStoppedException e) { throw new UserError(e.Message); }
            stdout.WriteLine($"trained {result.Steps} steps, {CliCommon.Count(result.TrainedTokens)} tokens ({packer.Examples} examples, " +
                             $"{CliCommon.F(packer.ExamplesPerRowEstimate(), "0.0")} per row) in {CliCommon.Duration(result.Elapsed)}; " +
                             $"eval loss {CliCommon.F(result.EvalLossBefore ?? double.NaN)} -> {CliCommon.F(result.EvalLossAfter ?? double.NaN)}" +
                             (result.SkippedSteps > 0 ? $"; {result.SkippedSteps} skipped (NaN/Inf)" : ""));

            // 5. Exact match of greedy generations per task on held-out examples.
            var table = TaskExactMatch(weights, backend, tok, tasks, o.Seed ^ EvalSeedSalt, o.EvalExamples);
            foreach (var (task, correct, n) in table)
                stdout.WriteLine($"  exact match {task,-12} {correct,3}/{n}");

            // 6. Save.
            string command = CanonicalCommand(o);
            CliCommon.WriteDirectoryAtomic(o.Out, dir =>
            {
                ModelSaver.SaveHf(weights, dir);
                File.Copy(tokPath, Path.Combine(dir, "tokenizer.json"));
                File.Copy(Path.Combine(tokDir, "tokenizer_config.json"), Path.Combine(dir, "tokenizer_config.json"));
                File.WriteAllText(Path.Combine(dir, "generation_config.json"), GenerationConfigJson(bos, eos));
                File.WriteAllText(Path.Combine(dir, "README.md"), Readme(o, command, tasks, tok, weights, result, table, total.Elapsed));
            });
            stdout.WriteLine($"wrote {Path.GetFullPath(o.Out)} in {CliCommon.Duration(total.Elapsed)} total");
            return 0;
        }
        finally
        {
            try { Directory.Delete(tokDir, true); } catch (IOException) { }
        }
    }

    /// <summary>The full text of one example, as the tokenizer is trained on it.</summary>
    internal static string RenderText(SyntheticExample e) => PromptTemplate.AlpacaPrompt(e.Instruction, e.Input) + e.Output;

    internal static string[] ParseCorpus(string spec)
    {
        if (!spec.StartsWith("gen:", StringComparison.Ordinal))
            throw new UserError($"--corpus '{spec}': expected gen:TASKS (e.g. gen:pretrain)");
        try { return SyntheticTasks.ParseTasks(spec["gen:".Length..]); }
        catch (ArgumentException e) { throw new UserError($"--corpus: {e.Message}"); }
    }

    private static void Validate(PretrainOptions o)
    {
        void Req(bool ok, string msg) { if (!ok) throw new UserError(msg); }
        Req(o.Steps > 0, $"--steps must be > 0 (got {o.Steps})");
        Req(o.VocabSize >= 260, $"--vocab-size must be >= 260 (256 byte tokens + specials; got {o.VocabSize})");
        Req(o.TokenizerExamples > 0, $"--tokenizer-examples must be > 0 (got {o.TokenizerExamples})");
        Req(o.Hidden > 0 && o.Heads > 0 && o.Hidden % o.Heads == 0, $"--hidden ({o.Hidden}) must be a positive multiple of --heads ({o.Heads})");
        Req(o.KvHeads > 0 && o.Heads % o.KvHeads == 0, $"--kv-heads ({o.KvHeads}) must divide --heads ({o.Heads})");
        Req((o.Hidden / Math.Max(1, o.Heads)) % 2 == 0, $"the head size --hidden/--heads ({o.Hidden / Math.Max(1, o.Heads)}) must be even (RoPE rotates pairs)");
        Req(o.Layers > 0, $"--layers must be > 0 (got {o.Layers})");
        Req(o.Ffn > 0, $"--ffn must be > 0 (got {o.Ffn})");
        Req(o.SeqLen >= 16, $"--seq-len must be >= 16 (got {o.SeqLen})");
        Req(o.MaxPositions >= o.SeqLen, $"--max-positions ({o.MaxPositions}) must be >= --seq-len ({o.SeqLen})");
        Req(o.BatchSize > 0, $"--batch-size must be > 0 (got {o.BatchSize})");
        Req(o.LearningRate > 0, $"--lr must be > 0 (got {o.LearningRate})");
        Req(o.Warmup >= 0, $"--warmup must be >= 0 (got {o.Warmup})");
        Req(o.EvalExamples >= 0, $"--eval-examples must be >= 0 (got {o.EvalExamples})");
    }

    /// <summary>Greedy exact match per task on <paramref name="perTask"/> held-out examples of each task.</summary>
    internal static List<(string Task, int Correct, int Count)> TaskExactMatch(LlamaWeights weights, IBackend backend, ITextTokenizer tok,
        string[] tasks, ulong seed, int perTask)
    {
        var result = new List<(string, int, int)>();
        if (perTask == 0) return result;
        using var session = new InferenceSession(weights, backend, weights.Config.MaxPositions);
        foreach (var task in tasks)
        {
            var examples = SyntheticTasks.Stream(seed, new[] { task }, 0, perTask)
                .Select(e => DatasetRecord.Alpaca(e.Instruction, e.Input, e.Output)).ToList();
            var em = ExactMatch.Evaluate(session, tok, examples, maxNewTokens: 24);
            result.Add((task, em.Correct, em.Count));
        }
        return result;
    }

    /// <summary>The command line that reproduces this run, with every option spelled out.</summary>
    internal static string CanonicalCommand(PretrainOptions o)
    {
        string F(float v) => v.ToString("R", CultureInfo.InvariantCulture);
        return $"ftn pretrain --corpus {o.Corpus} --out {o.Out} --steps {o.Steps} --seed {o.Seed} --vocab-size {o.VocabSize} " +
               $"--tokenizer-examples {o.TokenizerExamples} --hidden {o.Hidden} --layers {o.Layers} --heads {o.Heads} --kv-heads {o.KvHeads} " +
               $"--ffn {o.Ffn} --max-positions {o.MaxPositions} --seq-len {o.SeqLen} --batch-size {o.BatchSize} --lr {F(o.LearningRate)} " +
               $"--min-lr-ratio {F(o.MinLrRatio)} --warmup {o.Warmup} --weight-decay {F(o.WeightDecay)} --clip {F(o.Clip)} " +
               $"--eval-every {o.EvalEvery} --eval-examples {o.EvalExamples}";
    }

    private static string GenerationConfigJson(int bos, int eos)
    {
        var o = new JsonObject { ["bos_token_id"] = bos, ["eos_token_id"] = eos, ["do_sample"] = false, ["max_new_tokens"] = 32 };
        return o.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }) + "\n";
    }

    private static string Readme(PretrainOptions o, string command, string[] tasks, ITextTokenizer tok, LlamaWeights w, PretrainResult r,
        List<(string Task, int Correct, int Count)> table, TimeSpan elapsed)
    {
        var c = w.Config;
        var sb = new StringBuilder();
        sb.Append("# ftn-tiny\n\n");
        sb.Append("A small Llama-architecture model trained from scratch by this project's own code (`ftn pretrain`, ");
        sb.Append("src/Peft/Training/Pretrainer.cs over LlamaModel with TrainBase) on synthetic instruction tasks that the project ");
        sb.Append("generates (src/Peft/Data/SyntheticTasks.cs). It is the model `ftn train` fine-tunes when no --model is given.\n\n");
        sb.Append("## Reproduce\n\n```\n").Append(command).Append("\n```\n\n");
        sb.Append("(add `--device cpu:N` or `--threads N` as you like: the thread count changes the order of float sums, so the weights may differ in the last bits.)\n\n");
        sb.Append("## Model\n\n");
        sb.Append(CultureInfo.InvariantCulture, $"- LlamaForCausalLM, L={c.NumLayers}, C={c.HiddenSize}, F={c.IntermediateSize}, NH={c.NumHeads}, NKV={c.NumKvHeads}, HS={c.HeadDim}, V={c.VocabSize}, untied lm_head, f32\n");
        sb.Append(CultureInfo.InvariantCulture, $"- {w.ParameterCount:N0} parameters\n");
        sb.Append($"- tokenizer: {Program.OneLine(tok.Describe())}, trained on the first {o.TokenizerExamples} examples of the corpus\n");
        sb.Append("- prompt format (alpaca, as `ftn train` renders datasets): `### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}</s>`; ");
        sb.Append("loss on the response and EOS only; whole examples packed into rows, each starting with BOS.\n\n");
        sb.Append("## Training\n\n");
        sb.Append($"- tasks: {string.Join(", ", tasks)} (held out for fine-tuning demos: {string.Join(", ", SyntheticTasks.HeldOutTasks)})\n");
        sb.Append(CultureInfo.InvariantCulture, $"- {r.Steps} steps of {o.BatchSize} x {o.SeqLen} tokens ({r.TrainedTokens:N0} tokens), AdamW (0.9, 0.95), lr {o.LearningRate} with {o.Warmup} warmup steps then cosine to {o.LearningRate * o.MinLrRatio}, weight decay {o.WeightDecay}, clip {o.Clip}\n");
        sb.Append(CultureInfo.InvariantCulture, $"- loss: first step {r.FirstLoss:0.0000}, last step {r.FinalLoss:0.0000}; held-out loss {r.EvalLossBefore ?? double.NaN:0.0000} -> {r.EvalLossAfter ?? double.NaN:0.0000}\n");
        sb.Append(CultureInfo.InvariantCulture, $"- wall time {CliCommon.Duration(elapsed)} on {Environment.ProcessorCount} logical CPU cores ({System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture})\n\n");
        if (table.Count > 0)
        {
            sb.Append("## Held-out exact match (greedy)\n\n| task | correct |\n| --- | --- |\n");
            foreach (var (task, correct, n) in table) sb.Append($"| {task} | {correct}/{n} |\n");
            sb.Append('\n');
        }
        return sb.ToString();
    }
}

/// <summary>
/// Encodes examples exactly as fine-tuning data is encoded (Peft's <see cref="SampleEncoder"/>: BOS + alpaca prompt +
/// response + EOS, loss on the response and EOS only) and packs whole examples into rows of T tokens; the rest of a
/// row is padding with no loss. Each example starts with its own BOS, so the model learns that BOS starts afresh.
/// </summary>
internal sealed class ExamplePacker
{
    private readonly SampleEncoder _enc;
    private readonly int _t, _b;
    private TokenizedSample? _carry;
    private long _examples, _rows;

    public ExamplePacker(ITextTokenizer tok, int seqLen, int batch)
    {
        _enc = new SampleEncoder(tok, new EncodeOptions { MaxLength = 1 << 16 });
        _t = seqLen;
        _b = batch;
    }

    public double ExamplesPerRowEstimate() => _rows == 0 ? 0 : (double)_examples / _rows;
    public long Examples => _examples;

    public TokenizedSample Encode(SyntheticExample e)
    {
        var s = _enc.Encode(DatasetRecord.Alpaca(e.Instruction, e.Input, e.Output), out var issue)
            ?? throw new InvalidOperationException($"cannot encode a {e.Task} example: {issue}");
        if (s.Length > _t) throw new InvalidOperationException($"a {e.Task} example of {s.Length} tokens does not fit --seq-len {_t}");
        return s;
    }

    public PretrainBatch Next(IEnumerator<SyntheticExample> source)
    {
        var tokens = new int[_b * _t];
        var targets = new int[_b * _t];
        Array.Fill(tokens, _enc.PadId);
        Array.Fill(targets, Pretrainer.IgnoreIndex);
        for (int row = 0; row < _b; row++)
        {
            int pos = 0;
            while (true)
            {
                TokenizedSample ex;
                if (_carry is { } c) { ex = c; _carry = null; }
                else
                {
                    if (!source.MoveNext()) throw new InvalidOperationException("the corpus ended");
                    ex = Encode(source.Current);
                }
                if (pos + ex.Length > _t) { _carry = ex; break; }
                ex.Tokens.CopyTo(tokens, row * _t + pos);
                ex.Targets.CopyTo(targets, row * _t + pos);
                pos += ex.Length;
                _examples++;
            }
            _rows++;
        }
        return new PretrainBatch(tokens, targets);
    }
}
