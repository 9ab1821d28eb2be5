using FineTuneNative.Peft.Data;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Cli;

/// <summary>One greedy generation compared with the reference answer.</summary>
public sealed record ExactMatchSample(string Prompt, string Expected, string Generated, bool Correct);

public sealed record ExactMatchResult(int Correct, int Count, IReadOnlyList<ExactMatchSample> Samples)
{
    public double Rate => Count == 0 ? double.NaN : (double)Correct / Count;
}

/// <summary>
/// The task metric of <c>ftn train</c> and <c>ftn pretrain</c>: the share of held-out alpaca examples whose greedy
/// generation (stopped at EOS), trimmed of surrounding white space, equals the reference output exactly.
/// </summary>
public static class ExactMatch
{
    /// <summary>Token ids of the prompt the model is asked to continue: BOS + the alpaca prompt up to "### Response:\n",
    /// or, with the chat template training used, the conversation without its answer plus the generation prompt.</summary>
    public static int[] PromptIds(ITextTokenizer tok, DatasetRecord r, ChatTemplate? template = null) => template is null
        ? new SampleEncoder(tok, new EncodeOptions()).EncodeAlpacaPrompt(r.Instruction, r.Input, r.System)
        : new SampleEncoder(tok, new EncodeOptions { Template = template }).EncodePrompt(r.AsMessages().Where(m => m.Role != "assistant").ToList());

    public static ExactMatchResult Evaluate(InferenceSession session, ITextTokenizer tok, IReadOnlyList<DatasetRecord> examples, int maxNewTokens,
        ChatTemplate? template = null)
    {
        var samples = new List<ExactMatchSample>(examples.Count);
        int correct = 0;
        foreach (var r in examples)
        {
            if (r.Format != RecordFormat.Alpaca) throw new ArgumentException($"{r.Location}: exact match needs alpaca records");
            var prompt = PromptIds(tok, r, template);
            int room = session.MaxSeqLen - prompt.Length;
            if (room <= 0) throw new ArgumentException($"{r.Location}: the prompt has {prompt.Length} tokens, the session holds {session.MaxSeqLen}");
            var options = new GenerationOptions { MaxNewTokens = Math.Min(maxNewTokens, room), Temperature = 0, StopTokenIds = tok.EosIds.ToArray() };
            session.Reset();
            var ids = Generator.Generate(session, prompt, options);
            string generated = tok.Decode(ids).Trim();
            bool ok = string.Equals(generated, r.Output.Trim(), StringComparison.Ordinal);
            if (ok) correct++;
            string shown = template is null ? PromptTemplate.AlpacaPrompt(r.Instruction, r.Input, r.System)
                : template.Render(r.AsMessages().Where(m => m.Role != "assistant").ToList(), addGenerationPrompt: true);
            samples.Add(new ExactMatchSample(shown, r.Output.Trim(), generated, ok));
        }
        return new ExactMatchResult(correct, examples.Count, samples);
    }
}
