using FineTuneNative.Runtime.Text;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Runtime.Text;

/// <summary>
/// llama.cpp's tokenizer test vectors (46 strings; expected ids from Hugging Face AutoTokenizer,
/// add_special_tokens=False) against every tokenizer file we have for that vocabulary.
/// </summary>
public class LlamaCppVocabTests
{
    private readonly ITestOutputHelper _out;
    public LlamaCppVocabTests(ITestOutputHelper output) { _out = output; }

    /// <summary>Runs all cases, prints "name: passed/total" and every mismatch, and asserts all pass.</summary>
    internal static void RunAll(ITestOutputHelper output, string label, ITextTokenizer tok, List<(string Text, int[] Ids)> cases)
    {
        int pass = 0;
        var fails = new List<string>();
        for (int i = 0; i < cases.Count; i++)
        {
            var (text, expected) = cases[i];
            var got = tok.Encode(text);
            if (got.SequenceEqual(expected)) pass++;
            else fails.Add($"  case {i} {TextAssets.Show(text)}\n    expected [{string.Join(" ", expected)}]\n    got      [{string.Join(" ", got)}]");
        }
        output.WriteLine($"{label}: {pass}/{cases.Count} llama.cpp vectors pass  ({tok.Describe()})");
        foreach (var f in fails) output.WriteLine(f);
        Assert.True(fails.Count == 0, $"{label}: {pass}/{cases.Count} pass; failures:\n{string.Join("\n", fails)}");
    }

    [SkippableFact]
    public void LlamaSpm_SentencePieceModel_AllPass() =>
        RunAll(_out, "llama-spm via llama2-tokenizer/tokenizer.model", TokenizerLoader.Load(TextAssets.Require("llama2-tokenizer/tokenizer.model")),
            TextAssets.LlamaCppCases("llama-spm"));

    [SkippableFact]
    public void LlamaSpm_HfTokenizerJsonOrtx_AllPass() =>
        RunAll(_out, "llama-spm via hf-tokenizer-json-ortx/tokenizer.json",
            TokenizerLoader.Load(TextAssets.Require("llama2-tokenizer/hf-tokenizer-json-ortx/tokenizer.json")), TextAssets.LlamaCppCases("llama-spm"));

    [SkippableFact]
    public void LlamaSpm_HfTokenizerJsonGenai_AllPass() =>
        RunAll(_out, "llama-spm via hf-tokenizer-json-genai/tokenizer.json",
            TokenizerLoader.Load(TextAssets.Require("llama2-tokenizer/hf-tokenizer-json-genai/tokenizer.json")), TextAssets.LlamaCppCases("llama-spm"));

    [SkippableFact]
    public void LlamaSpm_Llama2cTokenizerBin_AllPass() =>
        RunAll(_out, "llama-spm via llama2-tokenizer/tokenizer.bin (llama2.c)", TokenizerLoader.Load(TextAssets.Require("llama2-tokenizer/tokenizer.bin")),
            TextAssets.LlamaCppCases("llama-spm"));

    [SkippableFact]
    public void LlamaBpe_TiktokenModel_AllPass() =>
        RunAll(_out, "llama-bpe via llama3-tokenizer/tokenizer.model (tiktoken)", TokenizerLoader.Load(TextAssets.Require("llama3-tokenizer/tokenizer.model")),
            TextAssets.LlamaCppCases("llama-bpe"));
}
