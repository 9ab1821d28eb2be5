namespace FineTuneNative.Runtime.Text;

/// <summary>
/// Text to token ids and back, whatever the file format behind it (tokenizer.json, SentencePiece or tiktoken
/// tokenizer.model, llama2.c tokenizer.bin). Obtain one with <see cref="TokenizerLoader.Load"/>.
/// </summary>
/// <remarks>
/// Encode follows Hugging Face's <c>tokenizer.encode(text, add_special_tokens=False)</c> (plus BOS when asked):
/// special/added tokens written literally in the text (e.g. "&lt;|eot_id|&gt;") become their ids.
/// Decode renders special tokens as their text unless <c>skipSpecialTokens</c> is set, turns byte-fallback pieces
/// (&lt;0xHH&gt;) and byte-level symbols back into UTF-8 (invalid sequences become U+FFFD), and drops the one
/// leading space that a SentencePiece-style dummy prefix put at the start of the text.
/// </remarks>
public interface ITextTokenizer
{
    /// <summary>Number of ids (largest id + 1), added tokens included.</summary>
    int VocabSize { get; }
    int? BosId { get; }
    /// <summary>The end-of-sequence id a model is trained to emit at the end of a document or answer.</summary>
    int? EosId { get; }
    /// <summary>Every id that ends generation (EOS, end-of-turn ids such as Llama 3's &lt;|eot_id|&gt;...).</summary>
    IReadOnlyList<int> EosIds { get; }

    int[] Encode(string text, bool addBos = false);
    /// <summary>
    /// Encodes text that continues text encoded before (a response after its prompt): no SentencePiece dummy
    /// prefix, so "Hi" stays "Hi" rather than becoming "▁Hi". Identical to <see cref="Encode"/> for byte-level
    /// and tiktoken tokenizers (the default here, for implementations without a dummy prefix).
    /// </summary>
    int[] EncodeContinuation(string text) => Encode(text);
    string Decode(ReadOnlySpan<int> ids);
    /// <summary>One line: format, file, vocabulary size, BOS/EOS, and any defects that loading worked around.</summary>
    string Describe();

    /// <summary>Like <see cref="Decode(ReadOnlySpan{int})"/>, optionally leaving special tokens out.</summary>
    string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens);
    /// <summary>The id of a token written as in the vocabulary file (e.g. "&lt;|user|&gt;", "&lt;s&gt;"), or null.</summary>
    int? TokenToId(string token);
    /// <summary>The vocabulary entry of an id as written in the file, or null when the id is out of range.</summary>
    string? IdToToken(int id);
    /// <summary>True for control/special/added-special tokens (BOS, EOS, chat markers...).</summary>
    bool IsSpecial(int id);
}
