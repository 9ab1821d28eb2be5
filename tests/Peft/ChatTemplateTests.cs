using System.Text.Json;
using FineTuneNative.Peft.Data;
using FineTuneNative.Runtime.Text;
using FineTuneNative.Tests.Runtime.Text;
using Xunit;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// Our Jinja subset against Python jinja2 (tests/Fixtures/chat_templates.json, made by tests/reference/chat_templates.py
/// in transformers' environment): every template × conversation × add_generation_prompt, byte for byte, including
/// the cases where the template raises. Then the prompt/assistant split used for training.
/// </summary>
public class ChatTemplateTests
{
    private static readonly Lazy<JsonDocument> Fixture = new(() =>
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string p = Path.Combine(dir.FullName, "tests", "Fixtures", "chat_templates.json");
            if (File.Exists(p)) return JsonDocument.Parse(File.ReadAllBytes(p));
        }
        throw new FileNotFoundException($"tests/Fixtures/chat_templates.json not found above {AppContext.BaseDirectory}");
    });

    private static JsonElement Root => Fixture.Value.RootElement;

    private static List<ChatMessage> Conversation(int i) =>
        Root.GetProperty("conversations")[i].EnumerateArray().Select(m => new ChatMessage(m.GetProperty("role").GetString()!, m.GetProperty("content").GetString()!)).ToList();

    /// <summary>The instant the fixture's strftime_now formats (transformers uses datetime.now()).</summary>
    private static DateTime FixedNow => DateTime.Parse(Root.GetProperty("fixed_now").GetString()!, System.Globalization.CultureInfo.InvariantCulture);

    private static ChatTemplate Template(string name)
    {
        var t = Root.GetProperty("templates").GetProperty(name);
        var extra = new Dictionary<string, object?> { ["pad_token"] = "<pad>", ["unk_token"] = "<unk>" };
        var now = FixedNow;
        return new ChatTemplate(t.GetProperty("text").GetString()!, name, t.GetProperty("bos").GetString()!, t.GetProperty("eos").GetString()!, extra) { Clock = () => now };
    }

    public static IEnumerable<object[]> TemplateNames() =>
        new[] { "chatml", "llama3", "mistral", "qwen2.5", "smollm2", "gemma", "llama2", "phi3",
                "real-llama3.2", "real-mistral-nemo", "real-qwen2.5", "real-smollm2", "real-gemma2" }.Select(n => new object[] { n });

    [Theory]
    [MemberData(nameof(TemplateNames))]
    public void Renders_like_python_jinja2(string name)
    {
        var tpl = Template(name);
        int n = 0, tools = 0;
        foreach (var c in Root.GetProperty("cases").EnumerateArray().Where(c => c.GetProperty("template").GetString() == name))
        {
            bool gen = c.GetProperty("add_generation_prompt").GetBoolean();
            Func<string> render;
            string what;
            if (c.TryGetProperty("tool_conversation", out var ti))
            {
                // OpenAI tool-calling conversations: tool_calls with dict arguments, tool results, the tools list
                var tc = Root.GetProperty("tool_conversations")[ti.GetInt32()];
                var messages = (List<object?>)JinjaTemplate.FromJson(tc.GetProperty("messages"))!;
                var vars = new Dictionary<string, object?> { ["tools"] = JinjaTemplate.FromJson(tc.GetProperty("tools")) };
                render = () => tpl.Render(messages, gen, vars);
                what = $"{name} tool conversation {ti.GetInt32()} gen={gen}";
                tools++;
            }
            else
            {
                var conv = Conversation(c.GetProperty("conversation").GetInt32());
                render = () => tpl.Render(conv, gen);
                what = $"{name} conversation {c.GetProperty("conversation").GetInt32()} gen={gen}";
            }
            if (c.TryGetProperty("error", out var err))
            {
                var e = Assert.Throws<TemplateException>(render);
                Assert.True(e.Message.Contains(err.GetString()!, StringComparison.Ordinal), $"{what}: expected an error containing '{err.GetString()}', got '{e.Message}'");
            }
            else if (c.TryGetProperty("type_error", out var te))
            {
                // Python raised a TypeError while evaluating (e.g. None + str): we raise a TemplateException saying so
                var e = Assert.Throws<TemplateException>(render);
                Assert.True(e.Message.Contains("None", StringComparison.Ordinal), $"{what}: expected an error about None ({te.GetString()}), got '{e.Message}'");
            }
            else
            {
                string expected = c.GetProperty("expected").GetString()!;
                string got = render();
                Assert.True(expected == got, $"{what}: {FirstDifference(expected, got)}");
            }
            n++;
        }
        Assert.Equal(18, n);
        Assert.Equal(6, tools);
    }

    private static string FirstDifference(string expected, string got)
    {
        int i = 0;
        while (i < expected.Length && i < got.Length && expected[i] == got[i]) i++;
        string Around(string t) => JsonSerializer.Serialize(t.Substring(Math.Max(0, i - 60), Math.Min(t.Length, i + 60) - Math.Max(0, i - 60)));
        return $"first difference at {i} (lengths {expected.Length} / {got.Length}): expected ...{Around(expected)}..., got ...{Around(got)}...";
    }

    /// <summary>Llama 3.1+ print the date: from strftime_now (at the template's clock), from a date_string variable,
    /// or the template's own default when strftime_now is not defined.</summary>
    [Fact]
    public void Llama32_date_from_strftime_now_or_date_string()
    {
        var tpl = Template("real-llama3.2");
        int n = 0;
        foreach (var c in Root.GetProperty("date_cases").EnumerateArray())
        {
            var vars = new Dictionary<string, object?>();
            if (!c.GetProperty("strftime_now").GetBoolean()) vars["strftime_now"] = JinjaUndefined.Instance;
            if (c.TryGetProperty("date_string", out var ds)) vars["date_string"] = ds.GetString();
            var messages = (List<object?>)JinjaTemplate.FromJson(Root.GetProperty("conversations")[1])!;
            Assert.Equal(c.GetProperty("expected").GetString(), tpl.Render(messages, true, vars));
            n++;
        }
        Assert.Equal(3, n);
        Assert.Contains("Today Date: 03 Sep 2024", tpl.Render(Conversation(0), true));
    }

    /// <summary>The built-ins that correspond to a real published template are that template, byte for byte.</summary>
    [Theory]
    [InlineData("qwen2.5", "real-qwen2.5")]
    [InlineData("smollm2", "real-smollm2")]
    [InlineData("gemma", "real-gemma2")]
    public void Builtin_templates_equal_the_real_ones(string builtin, string real) =>
        Assert.Equal(Root.GetProperty("templates").GetProperty(real).GetProperty("text").GetString(), ChatTemplate.BuiltinText(builtin));

    [Fact]
    public void Builtin_templates_are_the_fixture_texts()
    {
        foreach (var name in ChatTemplate.BuiltinNames)
            Assert.Equal(Root.GetProperty("templates").GetProperty(name).GetProperty("text").GetString(), ChatTemplate.BuiltinText(name));
    }

    [SkippableFact]
    public void Real_llama2_and_phi3_templates_are_read_from_the_assets()
    {
        var llama2 = ChatTemplate.FromTokenizerConfig(PeftAssets.Require("llama2-tokenizer", "hf-tokenizer-json-genai", "tokenizer_config.json"))!;
        Assert.Equal(Root.GetProperty("templates").GetProperty("llama2").GetProperty("text").GetString(), llama2.Text);
        Assert.Equal("<s>", llama2.BosToken);
        Assert.Equal("</s>", llama2.EosToken);
        var phi3 = GgufVocab.Read(PeftAssets.Require("llama-cpp-vocab", "ggml-vocab-phi-3.gguf")).ChatTemplate;
        Assert.Equal(Root.GetProperty("templates").GetProperty("phi3").GetProperty("text").GetString(), phi3);
        Assert.Null(ChatTemplate.FromTokenizerConfig(PeftAssets.Require("llama2-tokenizer", "hf-tokenizer-json-ortx", "tokenizer_config.json")));
    }

    [Theory]
    [InlineData("namespace_loop")]
    [InlineData("loop_vars")]
    [InlineData("whitespace")]
    [InlineData("filters")]
    [InlineData("strings")]
    [InlineData("macro_set_block")]
    [InlineData("dict_items")]
    public void Jinja_features_render_like_python_jinja2(string name)
    {
        var f = Root.GetProperty("features").GetProperty(name);
        var tpl = new ChatTemplate(f.GetProperty("text").GetString()!, name, "<s>", "</s>");
        Assert.Equal(f.GetProperty("expected").GetString(), tpl.Render(Conversation(1), true));
    }

    [Theory]
    [InlineData("{% if x %}", "missing {% endif %}")]
    [InlineData("{{ 1 + }}", "unexpected")]
    [InlineData("{% frobnicate %}", "unsupported statement 'frobnicate'")]
    [InlineData("{{ x | nosuchfilter }}", "unsupported filter 'nosuchfilter'")]
    [InlineData("a\n{{ 'unterminated }}", "t:2")]
    public void Template_errors_name_the_line(string text, string expected)
    {
        var e = Assert.ThrowsAny<TemplateException>(() => new ChatTemplate(text, "t", "", "").Render(Conversation(0), false));
        Assert.Contains(expected, e.Message);
    }

    /// <summary>The training split: the trained segments are each assistant turn's text up to its end-of-turn
    /// token, nothing else; the segments concatenate to the full rendering.</summary>
    [Theory]
    [InlineData("chatml", "4<|im_end|>", " 6 \n<|im_end|>")]
    [InlineData("qwen2.5", "4<|im_end|>", " 6 \n<|im_end|>")]
    [InlineData("smollm2", "4<|im_end|>", " 6 \n<|im_end|>")]
    [InlineData("llama3", "4<|eot_id|>", "6<|eot_id|>")]
    [InlineData("llama2", " 4 </s>", " 6 </s>")]
    public void Training_split_trains_assistant_turns_only(string name, string first, string second)
    {
        var tpl = Template(name);
        var conv = Conversation(1);
        var segs = tpl.RenderTraining(conv);
        Assert.Equal(tpl.Render(conv, false), string.Concat(segs.Select(s => s.Text)));
        Assert.Equal(new[] { first, second }, segs.Where(s => s.Trained).Select(s => s.Text));
    }

    [Fact]
    public void Training_split_of_a_template_without_generation_prompt()
    {
        // phi-3 (real GGUF template) writes "<|assistant|>\n" after each user turn itself; mistral has no generation prompt
        var phi = Template("phi3").RenderTraining(Conversation(0));
        Assert.Equal(new[] { "Hi there.<|end|>" }, phi.Where(s => s.Trained).Select(s => s.Text));
        var mistral = Template("mistral").RenderTraining(Conversation(0));
        Assert.Equal(new[] { "<s>[INST] Hello! [/INST]", "Hi there.</s>" }, mistral.Select(s => s.Text));
        Assert.Equal(new[] { false, true }, mistral.Select(s => s.Trained));
        // gemma raises for a system turn: reported as an issue by the encoder, not a crash
        var enc = new SampleEncoder(new ByteTokenizer(), new EncodeOptions { Template = Template("gemma") });
        Assert.Null(enc.Encode(DatasetRecord.Chat(Conversation(1), "f.jsonl:7"), out var issue));
        Assert.Equal("f.jsonl:7", issue!.Location);
        Assert.Contains("System role not supported", issue.Message);
    }

    /// <summary>
    /// Label masks with a real tokenizer and a real template: targets are exactly the assistant tokens and the
    /// end-of-turn token; with --train-on-prompt every next token is a target; decoding the targets gives the
    /// assistant texts.
    /// </summary>
    [SkippableFact]
    public void Label_masks_with_the_real_llama2_tokenizer_and_template()
    {
        string dir = PeftAssets.Require("llama2-tokenizer", "hf-tokenizer-json-genai");
        var tok = TokenizerLoader.Load(dir);
        var tpl = ChatTemplate.Resolve("auto", dir, tok)!;
        var conv = Conversation(1);
        var enc = new SampleEncoder(tok, new EncodeOptions { Template = tpl, MaxLength = 512 });
        var s = enc.Encode(DatasetRecord.Chat(conv, "x"), out var issue)!;
        Assert.Null(issue);
        var whole = tok.Encode(tpl.Render(conv, false));
        Assert.Equal(whole[..^1], s.Tokens);                 // tokenized as one text, specials included
        Assert.Equal(tok.BosId, s.Tokens[0]);                // "<s>" written by the template is the BOS id
        Assert.Equal(2, s.Tokens.Count(t => t == tok.BosId));
        // the targets, in order, decode to the two assistant answers each closed by EOS
        var trained = s.Targets.Where(t => t != TokenizedSample.IgnoreIndex).ToArray();
        Assert.Equal(2, trained.Count(t => t == tok.EosId));
        Assert.Equal("46", string.Concat(tok.Decode(trained, skipSpecialTokens: true).Where(c => !char.IsWhiteSpace(c))));
        var all = new SampleEncoder(tok, new EncodeOptions { Template = tpl, TrainOnPrompt = true }).Encode(DatasetRecord.Chat(conv, "x"), out _)!;
        Assert.Equal(all.Tokens.Length, all.TargetCount);
        Assert.Contains("EOS", SampleEncoder.CheckEosInTargets(new[] { s }, tok));
    }

    /// <summary>Llama 3 (real tiktoken tokenizer, the published template): header tokens are the special ids, the
    /// targets are exactly each answer plus &lt;|eot_id|&gt; (128009, an EOS the model emits), the generation prompt
    /// is the training prefix.</summary>
    [SkippableFact]
    public void Label_masks_with_the_real_llama3_tokenizer_and_template()
    {
        var tok = TokenizerLoader.Load(PeftAssets.Require("llama3-tokenizer", "tokenizer.model"));
        var tpl = ChatTemplate.Builtin("llama3", tok);
        Assert.Equal("<|begin_of_text|>", tpl.BosToken);
        var conv = Conversation(1);
        var enc = new SampleEncoder(tok, new EncodeOptions { Template = tpl, MaxLength = 512 });
        var s = enc.Encode(DatasetRecord.Chat(conv, "x"), out var issue)!;
        Assert.Null(issue);
        Assert.Equal(128000, s.Tokens[0]);
        Assert.Equal(5, s.Tokens.Count(t => t == 128006)); // <|start_header_id|>: system, user, assistant, user, assistant
        var trained = s.Targets.Where(t => t != TokenizedSample.IgnoreIndex).ToArray();
        Assert.Equal(tok.Encode("4").Append(128009).Concat(tok.Encode("6")).Append(128009), trained);
        Assert.Contains("128009", SampleEncoder.CheckEosInTargets(new[] { s }, tok));
        var prompt = enc.EncodePrompt(conv.Take(2).ToList());
        Assert.Equal(prompt, s.Tokens[..prompt.Length]);
        Assert.Equal(tok.Encode("4")[0], s.Targets[prompt.Length - 1]);
    }

    [Fact]
    public void Eos_preflight_fails_when_no_target_has_the_eos()
    {
        var tok = new ByteTokenizer();
        // chatml's <|im_end|> is plain text to this tokenizer, not its EOS (2): the model would never stop
        var enc = new SampleEncoder(tok, new EncodeOptions { Template = ChatTemplate.Builtin("chatml", tok) });
        var s = enc.Encode(DatasetRecord.Chat(Conversation(0), "x"), out _)!;
        var e = Assert.Throws<InvalidDataException>(() => SampleEncoder.CheckEosInTargets(new[] { s }, tok));
        Assert.Contains("never learn to stop", e.Message);
        // the built-in format closes responses with the tokenizer's EOS
        var builtin = new SampleEncoder(tok, new EncodeOptions()).Encode(DatasetRecord.Chat(Conversation(0), "x"), out _)!;
        Assert.Contains("1 of 1", SampleEncoder.CheckEosInTargets(new[] { builtin }, tok));
    }

    [Fact]
    public void Generation_prompt_is_the_training_prefix()
    {
        var tok = new ByteTokenizer();
        var tpl = ChatTemplate.Builtin("llama3", tok);
        var enc = new SampleEncoder(tok, new EncodeOptions { Template = tpl });
        var conv = Conversation(0);
        var prompt = enc.EncodePrompt(conv.Take(1).ToList());
        var s = enc.Encode(DatasetRecord.Chat(conv, "x"), out _)!;
        Assert.Equal(prompt, s.Tokens[..prompt.Length]);
        int firstTarget = Array.FindIndex(s.Targets, t => t != TokenizedSample.IgnoreIndex);
        Assert.Equal(prompt.Length - 1, firstTarget); // the first trained token is the first one generated
    }
}
