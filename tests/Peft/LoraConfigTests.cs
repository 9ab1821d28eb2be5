using System.Text.Json.Nodes;
using FineTuneNative.Peft.Lora;

namespace FineTuneNative.Tests.Peft;

public class LoraConfigTests
{
    [Fact]
    public void Adapter_config_has_peft_fields_and_round_trips()
    {
        using var tmp = new TempDir();
        var cfg = new LoraConfig { Rank = 4, Alpha = 8, Dropout = 0.05f, TargetModules = new[] { "q_proj", "v_proj" }, UseRsLora = true };
        string json = cfg.ToPeftJson("org/base-model");
        var o = JsonNode.Parse(json)!.AsObject();

        Assert.Equal("LORA", (string)o["peft_type"]!);
        Assert.Equal("CAUSAL_LM", (string)o["task_type"]!);
        Assert.Equal(4, (int)o["r"]!);
        Assert.Equal(8, (int)o["lora_alpha"]!);
        Assert.Equal(0.05, (double)o["lora_dropout"]!);
        Assert.Equal("none", (string)o["bias"]!);
        Assert.False((bool)o["fan_in_fan_out"]!);
        Assert.True((bool)o["inference_mode"]!);
        Assert.True((bool)o["use_rslora"]!);
        Assert.False((bool)o["use_dora"]!);
        Assert.Equal("org/base-model", (string)o["base_model_name_or_path"]!);
        Assert.Equal(new[] { "q_proj", "v_proj" }, o["target_modules"]!.AsArray().Select(x => (string)x!));

        var back = LoraConfig.FromPeftJson(tmp.File("adapter_config.json", json));
        Assert.Equal((4, 8f, 0.05f, true), (back.Rank, back.Alpha, back.Dropout, back.UseRsLora));
        Assert.Equal(cfg.TargetModules, back.TargetModules);
        Assert.Equal(8 / MathF.Sqrt(4), back.Scale);
        Assert.Equal(2f, new LoraConfig { Rank = 8, Alpha = 16 }.Scale);
        Assert.Equal(7, new LoraConfig().TargetModules.Length);
    }

    [Fact]
    public void Reads_a_config_written_by_peft_itself()
    {
        using var tmp = new TempDir();
        // Fields and layout of a PEFT 0.13 adapter_config.json (TinyLlama, LoRA on q and v).
        string path = tmp.File("adapter_config.json", """
            {
              "alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": null, "bias": "none",
              "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "layer_replication": null,
              "layers_pattern": null, "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 32,
              "lora_dropout": 0.05, "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
              "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": null, "target_modules": ["v_proj", "q_proj"],
              "task_type": "CAUSAL_LM", "use_dora": false, "use_rslora": false
            }
            """);
        var c = LoraConfig.FromPeftJson(path);
        Assert.Equal((8, 32f, 4f), (c.Rank, c.Alpha, c.Scale));
        Assert.Equal(new[] { "v_proj", "q_proj" }, c.TargetModules);
    }

    [Theory]
    [InlineData("\"bias\": \"all\"", "bias")]
    [InlineData("\"target_modules\": [\"q_proj\", \"c_attn\"]", "c_attn")]
    [InlineData("\"rank_pattern\": {\"q_proj\": 4}", "rank_pattern")]
    [InlineData("\"r\": \"eight\"", "\"r\"")]
    public void Refuses_what_it_cannot_apply_naming_the_field(string field, string named)
    {
        using var tmp = new TempDir();
        var o = JsonNode.Parse(new LoraConfig().ToPeftJson(null))!.AsObject();
        var patch = JsonNode.Parse("{" + field + "}")!.AsObject();
        foreach (var kv in patch.ToList()) { patch.Remove(kv.Key); o[kv.Key] = kv.Value; }
        string path = tmp.File("adapter_config.json", o.ToJsonString());
        var e = Assert.ThrowsAny<Exception>(() => LoraConfig.FromPeftJson(path));
        Assert.Contains(named, e.Message);
        Assert.Contains(path, e.Message);
    }

    /// <summary>DoRA with LoRA dropout (PEFT's use_dora + lora_dropout) is read and applied, not refused.</summary>
    [Fact]
    public void Reads_dora_with_dropout()
    {
        using var tmp = new TempDir();
        var o = JsonNode.Parse(new LoraConfig().ToPeftJson(null))!.AsObject();
        o["use_dora"] = true;
        o["lora_dropout"] = 0.1;
        var c = LoraConfig.FromPeftJson(tmp.File("adapter_config.json", o.ToJsonString()));
        Assert.True(c.UseDora);
        Assert.Equal(0.1f, c.Dropout);
        c.Validate();
    }

    [Fact]
    public void Validation_rejects_bad_values()
    {
        Assert.Throws<ArgumentException>(() => new LoraConfig { Rank = 0 }.Validate());
        Assert.Throws<ArgumentException>(() => new LoraConfig { Dropout = 1 }.Validate());
        Assert.Throws<ArgumentException>(() => new LoraConfig { TargetModules = new[] { "q_proj", "q_proj" } }.Validate());
        Assert.Throws<ArgumentException>(() => new LoraConfig { TargetModules = new[] { "lm_head" } }.Validate());
    }
}
