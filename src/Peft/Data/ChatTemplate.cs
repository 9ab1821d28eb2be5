using System.Reflection;
using System.Text;
using System.Text.Json;
using FineTuneNative.Runtime.Text;

namespace FineTuneNative.Peft.Data;

/// <summary>
/// A model's chat template (the Jinja <c>chat_template</c> of its tokenizer_config.json, or a built-in one), rendered
/// the way Hugging Face's apply_chat_template renders it, and split into prompt and assistant text for training.
/// The same object builds training samples (<see cref="RenderTraining"/>) and generation prompts
/// (<see cref="Render"/> with addGenerationPrompt), so train and inference see the same format.
/// </summary>
public sealed class ChatTemplate
{
    /// <summary>Names of the built-in templates (Templates/*.jinja, see the README there).</summary>
    public static readonly string[] BuiltinNames = { "chatml", "llama3", "mistral", "qwen2.5", "smollm2", "gemma" };

    private readonly JinjaTemplate _jinja;

    /// <summary>Where the template came from ("model/tokenizer_config.json", "builtin:chatml", a file path).</summary>
    public string Source { get; }
    public string Text { get; }
    public string BosToken { get; }
    public string EosToken { get; }
    /// <summary>Further variables (pad_token, unk_token...) passed to the template.</summary>
    public IReadOnlyDictionary<string, object?> Extra { get; }

    public ChatTemplate(string text, string source, string bosToken, string eosToken, IReadOnlyDictionary<string, object?>? extra = null)
    {
        Text = text;
        Source = source;
        BosToken = bosToken;
        EosToken = eosToken;
        Extra = extra ?? new Dictionary<string, object?>();
        _jinja = JinjaTemplate.Parse(text, source);
    }

    /// <summary>The text of built-in template <paramref name="name"/>.</summary>
    public static string BuiltinText(string name)
    {
        if (!BuiltinNames.Contains(name)) throw new ArgumentException($"unknown built-in chat template '{name}' (expected one of {string.Join(", ", BuiltinNames)})");
        using var s = typeof(ChatTemplate).Assembly.GetManifestResourceStream("ftn.templates." + name)
            ?? throw new InvalidOperationException($"built-in template {name} is missing from the assembly");
        using var r = new StreamReader(s, Encoding.UTF8);
        return r.ReadToEnd();
    }

    /// <summary>A built-in template with the tokenizer's BOS/EOS texts.</summary>
    public static ChatTemplate Builtin(string name, ITextTokenizer? tokenizer = null) =>
        new(BuiltinText(name), "builtin:" + name, TokenText(tokenizer, tokenizer?.BosId), TokenText(tokenizer, tokenizer?.EosId ?? (tokenizer?.EosIds.Count > 0 ? tokenizer.EosIds[0] : null)));

    private static string TokenText(ITextTokenizer? tok, int? id) => tok is not null && id is int i ? tok.IdToToken(i) ?? "" : "";

    /// <summary>
    /// The chat template of a tokenizer_config.json (a string, or a list of {"name", "template"} where "default"
    /// is taken), with its bos/eos/pad/unk token texts; null when the file has none.
    /// </summary>
    public static ChatTemplate? FromTokenizerConfig(string path)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
        var root = doc.RootElement;
        if (!root.TryGetProperty("chat_template", out var ct) || ct.ValueKind == JsonValueKind.Null) return null;
        string text;
        if (ct.ValueKind == JsonValueKind.String) text = ct.GetString()!;
        else if (ct.ValueKind == JsonValueKind.Array)
        {
            string? chosen = null;
            foreach (var e in ct.EnumerateArray())
                if (e.TryGetProperty("name", out var n) && n.GetString() == "default" && e.TryGetProperty("template", out var t)) chosen = t.GetString();
            text = chosen ?? throw new InvalidDataException($"{path}: chat_template is a list without a \"default\" entry");
        }
        else throw new InvalidDataException($"{path}: chat_template must be a string or a list of named templates");
        string Tok(string key) => root.TryGetProperty(key, out var v) ? v.ValueKind switch
        {
            JsonValueKind.String => v.GetString()!,
            JsonValueKind.Object when v.TryGetProperty("content", out var c) => c.GetString() ?? "",
            _ => "",
        } : "";
        var extra = new Dictionary<string, object?> { ["pad_token"] = Tok("pad_token"), ["unk_token"] = Tok("unk_token") };
        return new ChatTemplate(text, path, Tok("bos_token"), Tok("eos_token"), extra);
    }

    /// <summary>
    /// Picks the template for a run. <paramref name="spec"/>: "auto" (the model's own, else null = the built-in
    /// "### Role:" format), "none"/"builtin" (the built-in format), a built-in name, a .jinja file, or a
    /// tokenizer_config.json. Null means: use <see cref="PromptTemplate"/>.
    /// </summary>
    public static ChatTemplate? Resolve(string spec, string? modelPath, ITextTokenizer tokenizer)
    {
        switch (spec)
        {
            case "" or "auto":
            {
                string? dir = modelPath is null ? null : Directory.Exists(modelPath) ? modelPath : Path.GetDirectoryName(Path.GetFullPath(modelPath));
                string? cfg = dir is null ? null : Path.Combine(dir, "tokenizer_config.json");
                return cfg is not null && File.Exists(cfg) ? FromTokenizerConfig(cfg) : null;
            }
            case "none" or "builtin": return null;
        }
        if (BuiltinNames.Contains(spec)) return Builtin(spec, tokenizer);
        if (!File.Exists(spec)) throw new ArgumentException($"chat template '{spec}': not a built-in ({string.Join(", ", BuiltinNames)}, auto, none) nor a file");
        if (spec.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
            return FromTokenizerConfig(spec) ?? throw new ArgumentException($"{spec}: has no chat_template");
        var fromModel = Resolve("auto", modelPath, tokenizer);
        return new ChatTemplate(File.ReadAllText(spec), spec, fromModel?.BosToken ?? TokenText(tokenizer, tokenizer.BosId),
            fromModel?.EosToken ?? TokenText(tokenizer, tokenizer.EosId), fromModel?.Extra);
    }

    /// <summary>The clock behind the templates' strftime_now (transformers: datetime.now()); settable for reproducible output.</summary>
    public Func<DateTime> Clock { get; init; } = () => DateTime.Now;

    /// <summary>The conversation as text, as apply_chat_template(messages, tokenize=False, add_generation_prompt) gives it.</summary>
    public string Render(IReadOnlyList<ChatMessage> messages, bool addGenerationPrompt) =>
        Render(messages.Select(m => (object?)new Dictionary<string, object?> { ["role"] = m.Role, ["content"] = m.Content }).ToList(), addGenerationPrompt);

    /// <summary>
    /// The conversation given as template values (dicts with role, content and e.g. tool_calls / tool_call_id, as
    /// <see cref="JinjaTemplate.FromJson"/> makes them from OpenAI-format JSON), with further template variables
    /// such as <c>tools</c> (a list of tool definitions; None when absent) or <c>date_string</c>.
    /// </summary>
    public string Render(List<object?> messages, bool addGenerationPrompt, IReadOnlyDictionary<string, object?>? variables = null)
    {
        var clock = Clock;
        var vars = new Dictionary<string, object?>(Extra)
        {
            ["messages"] = messages,
            ["bos_token"] = BosToken,
            ["eos_token"] = EosToken,
            ["add_generation_prompt"] = addGenerationPrompt,
            ["tools"] = null,
            ["strftime_now"] = new JinjaFunction((a, _) => Builtins.Strftime(clock(), a.Count > 0 ? Builtins.Str(a[0]) : "")),
        };
        if (variables is not null) foreach (var (k, v) in variables) vars[k] = v;
        return _jinja.Render(vars);
    }

    /// <summary>
    /// The conversation split into prompt and assistant text: for assistant turn i, the text after
    /// Render(messages[..i], addGenerationPrompt: true) up to the end of Render(messages[..i+1]) is trained (its
    /// trailing whitespace is not: generation stops at the end-of-turn token before it). Concatenated, the segments
    /// are exactly Render(messages, false).
    /// </summary>
    /// <exception cref="TemplateException">The template raised, or rendering a prefix of the conversation does not
    /// give a prefix of the whole rendering (the assistant text cannot be located).</exception>
    public IReadOnlyList<PromptSegment> RenderTraining(IReadOnlyList<ChatMessage> messages)
    {
        string full = Render(messages, false);
        var segs = new List<PromptSegment>();
        int pos = 0;
        for (int i = 0; i < messages.Count; i++)
        {
            if (messages[i].Role != "assistant") continue;
            var before = messages.Take(i).ToList();
            string prompt = Render(before, true);
            string upTo = Render(messages.Take(i + 1).ToList(), false);
            if (!upTo.StartsWith(prompt, StringComparison.Ordinal) || !full.StartsWith(upTo, StringComparison.Ordinal) || prompt.Length < pos)
                throw new TemplateException($"{Source}: the rendering of the first {i} messages (with the generation prompt) is not a prefix of the rendering with message {i}; cannot tell the assistant text apart");
            int end = upTo.Length;
            while (end > prompt.Length && char.IsWhiteSpace(upTo[end - 1])) end--;
            if (prompt.Length > pos) segs.Add(new PromptSegment(full[pos..prompt.Length], false));
            if (end > prompt.Length) segs.Add(new PromptSegment(full[prompt.Length..end], messages[i].Trained));
            pos = Math.Max(pos, end);
        }
        if (pos < full.Length) segs.Add(new PromptSegment(full[pos..], false));
        return segs;
    }
}
