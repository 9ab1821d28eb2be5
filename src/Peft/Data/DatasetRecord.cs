namespace FineTuneNative.Peft.Data;

/// <summary>How a record is laid out in the file, which picks the prompt template.</summary>
public enum RecordFormat
{
    /// <summary>{"instruction", "input"?, "output", "system"?} (Stanford Alpaca).</summary>
    Alpaca,
    /// <summary>{"messages": [{"role", "content"}...]} (OpenAI) or {"conversations": [{"from", "value"}...]} (ShareGPT).</summary>
    Chat,
    /// <summary>{"text"} (JSON/JSONL/CSV/Parquet) or a line of a .txt file: raw text for continued pretraining, every token trained.</summary>
    Text,
}

/// <summary>One turn of a conversation. Roles are normalised to system, user, assistant, tool.</summary>
public sealed record ChatMessage(string Role, string Content)
{
    /// <summary>False for an assistant turn given "loss_weight": 0 (LLaMA-Factory's v1 format): kept as context, not trained.</summary>
    public bool Trained { get; init; } = true;
}

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

    /// <summary>The raw text (Format == Text).</summary>
    public string Text { get; init; } = "";

    /// <summary>The turns (Format == Chat); at least one is an assistant turn.</summary>
    public IReadOnlyList<ChatMessage> Messages { get; init; } = Array.Empty<ChatMessage>();

    public static DatasetRecord Alpaca(string instruction, string input, string output, string system = "", string location = "inline") =>
        new() { Location = location, Format = RecordFormat.Alpaca, Instruction = instruction, Input = input, Output = output, System = system };

    public static DatasetRecord Raw(string text, string location = "inline") =>
        new() { Location = location, Format = RecordFormat.Text, Text = text };

    /// <summary>The conversation of a chat or alpaca record (alpaca: system?, user = instruction + "\n" + input, assistant = output).</summary>
    public IReadOnlyList<ChatMessage> AsMessages()
    {
        if (Format == RecordFormat.Chat) return Messages;
        if (Format != RecordFormat.Alpaca) throw new InvalidOperationException($"{Location}: a text record has no messages");
        var list = new List<ChatMessage>();
        if (System.Length > 0) list.Add(new ChatMessage("system", System));
        list.Add(new ChatMessage("user", Input.Length > 0 ? Instruction + "\n" + Input : Instruction));
        list.Add(new ChatMessage("assistant", Output));
        return list;
    }

    public static DatasetRecord Chat(IReadOnlyList<ChatMessage> messages, string location = "inline") =>
        new() { Location = location, Format = RecordFormat.Chat, Messages = messages };
}
