using System.Text;

namespace FineTuneNative.Peft.Data;

/// <summary>A piece of rendered text; <see cref="Trained"/> pieces are response text the loss is computed on
/// (an EOS after a piece is trained with it: a context-only assistant turn keeps its EOS as untrained input),
/// and <see cref="EosAfter"/> closes a response with the tokenizer's end-of-sequence token (also trained).</summary>
public readonly record struct PromptSegment(string Text, bool Trained, bool EosAfter = false);

/// <summary>
/// The built-in text formats (used until a model's own chat template is supported).
/// Alpaca: <c>"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"</c> then the output
/// and EOS (the Input block is left out when the input is empty; a system text goes first, then a blank line).
/// Chat: every turn is <c>"### {Role}:\n{content}"</c>; a non-assistant turn ends with "\n\n", an assistant
/// turn with EOS. Only assistant contents and their EOS are response text.
/// </summary>
public static class PromptTemplate
{
    public const string ResponseHeader = "### Response:\n";
    public const string AssistantHeader = "### Assistant:\n";

    public static IReadOnlyList<PromptSegment> Render(DatasetRecord r) =>
        r.Format == RecordFormat.Alpaca ? RenderAlpaca(r.Instruction, r.Input, r.Output, r.System) : RenderChat(r.Messages);

    /// <summary>The alpaca prompt up to and including the response header.</summary>
    public static string AlpacaPrompt(string instruction, string input, string system = "")
    {
        var sb = new StringBuilder();
        if (system.Length > 0) sb.Append(system).Append("\n\n");
        sb.Append("### Instruction:\n").Append(instruction).Append("\n\n");
        if (input.Length > 0) sb.Append("### Input:\n").Append(input).Append("\n\n");
        sb.Append(ResponseHeader);
        return sb.ToString();
    }

    public static IReadOnlyList<PromptSegment> RenderAlpaca(string instruction, string input, string output, string system = "") =>
        new[] { new PromptSegment(AlpacaPrompt(instruction, input, system), false), new PromptSegment(output, true, EosAfter: true) };

    public static string RoleHeader(string role) => role switch
    {
        "system" => "### System:\n",
        "user" => "### User:\n",
        "assistant" => AssistantHeader,
        "tool" => "### Tool:\n",
        _ => throw new ArgumentException($"unknown role '{role}'"),
    };

    public static IReadOnlyList<PromptSegment> RenderChat(IReadOnlyList<ChatMessage> messages)
    {
        var segs = new List<PromptSegment>();
        var prompt = new StringBuilder();
        foreach (var m in messages)
        {
            prompt.Append(RoleHeader(m.Role));
            if (m.Role == "assistant")
            {
                segs.Add(new PromptSegment(prompt.ToString(), false));
                prompt.Clear();
                segs.Add(new PromptSegment(m.Content, m.Trained, EosAfter: true));
            }
            else prompt.Append(m.Content).Append("\n\n");
        }
        if (prompt.Length > 0) segs.Add(new PromptSegment(prompt.ToString(), false));
        return segs;
    }

    /// <summary>The chat prompt for generation: the turns so far, then the assistant header.
    /// Earlier assistant turns are closed by EOS in the token stream (see <see cref="SampleEncoder.EncodeChatPrompt"/>).</summary>
    public static IReadOnlyList<PromptSegment> RenderChatPrompt(IReadOnlyList<ChatMessage> messages)
    {
        var segs = new List<PromptSegment>(RenderChat(messages));
        segs.Add(new PromptSegment(AssistantHeader, false));
        return MergePrompts(segs);
    }

    private static List<PromptSegment> MergePrompts(List<PromptSegment> segs)
    {
        var merged = new List<PromptSegment>();
        foreach (var s in segs)
        {
            if (merged.Count > 0 && !s.Trained && !merged[^1].Trained && !merged[^1].EosAfter)
                merged[^1] = merged[^1] with { Text = merged[^1].Text + s.Text };
            else merged.Add(s);
        }
        return merged;
    }
}
