namespace FineTuneNative.Peft.Data;

/// <summary>How a record is laid out in the file, which picks the prompt template.</summary>
public enum RecordFormat
{
    /// <summary>{"instruction", "input"?, "output", "system"?} (Stanford Alpaca).</summary>
    Alpaca,
    /// <summary>{"messages": [{"role", "content"}...]} (OpenAI) or {"conversations": [{"from", "value"}...]} (ShareGPT).</summary>
    Chat,
}

/// <summary>One turn of a conversation. Roles are normalised to system, user, assistant, tool.</summary>
public sealed record ChatMessage(string Role, string Content);

/// <summary>A problem found in a dataset: where (file:line, and the record index for JSON arrays) and what.</summary>
public sealed record DatasetIssue(string Location, string Message)
{
    public override string ToString() => $"{Location}: {Message}";
}

/// <summary>One parsed training example, before tokenization.</summary>
public sealed class DatasetRecord
{
    /// <summary>"path:line" (JSONL) or "path:line (record N)" (JSON array, N 0-based).</summary>
    public required string Location { get; init; }
    public required RecordFormat Format { get; init; }

    // Alpaca fields (Format == Alpaca).
    public string Instruction { get; init; } = "";
    public string Input { get; init; } = "";
    public string Output { get; init; } = "";
    public string System { get; init; } = "";

    /// <summary>The turns (Format == Chat); at least one is an assistant turn.</summary>
    public IReadOnlyList<ChatMessage> Messages { get; init; } = Array.Empty<ChatMessage>();

    public static DatasetRecord Alpaca(string instruction, string input, string output, string system = "", string location = "inline") =>
        new() { Location = location, Format = RecordFormat.Alpaca, Instruction = instruction, Input = input, Output = output, System = system };

    public static DatasetRecord Chat(IReadOnlyList<ChatMessage> messages, string location = "inline") =>
        new() { Location = location, Format = RecordFormat.Chat, Messages = messages };
}
