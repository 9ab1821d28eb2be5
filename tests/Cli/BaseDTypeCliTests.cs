using FineTuneNative.Cli;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Tests.Peft;

namespace FineTuneNative.Tests.Cli;

/// <summary>
/// <c>ftn train --base-dtype bf16</c>: the model's linear weights are loaded as bf16 (on CUDA sm_80+ the matmuls then
/// run on tensor cores), parsed and refused like every other option, and a run on the ILGPU simulator trains.
/// </summary>
public class BaseDTypeCliTests
{
    [Theory]
    [InlineData(null, null)]
    [InlineData("bf16", DType.BF16)]
    [InlineData("BF16", DType.BF16)]
    [InlineData("bfloat16", DType.BF16)]
    [InlineData("f32", DType.F32)]
    public void Parses_the_storage_types(string? text, DType? expected) => Assert.Equal(expected, TrainCommand.ParseBaseDType(text));

    [Theory]
    [InlineData("f8")]
    [InlineData("nf4")]
    public void Refuses_anything_else_with_one_line(string text)
    {
        var r = CliHarness.Run("train", "--base-dtype", text, "--max-steps", "1", "--out", CliHarness.TempDir("base-dtype-bad"));
        Assert.NotEqual(0, r.ExitCode);
        Assert.Single(r.StderrLines);
        Assert.Contains("--base-dtype", r.Stderr);
        Assert.Contains(text, r.Stderr);
    }

    [Theory]
    [InlineData(null, null)]
    [InlineData("bf16", DType.BF16)]
    [InlineData("BFloat16", DType.BF16)]
    [InlineData("f32", DType.F32)]
    public void Parses_the_attention_dtypes(string? text, DType? expected) => Assert.Equal(expected, TrainCommand.ParseAttentionDType(text));

    [Fact]
    public void Refuses_an_unknown_attention_dtype_with_one_line()
    {
        var r = CliHarness.Run("train", "--attention-dtype", "f8", "--max-steps", "1", "--out", CliHarness.TempDir("attention-dtype-bad"));
        Assert.NotEqual(0, r.ExitCode);
        Assert.Single(r.StderrLines);
        Assert.Contains("--attention-dtype", r.Stderr);
        Assert.Contains("f8", r.Stderr);
    }

    [Fact]
    public void Refuses_base_dtype_with_an_nf4_base()
    {
        var r = CliHarness.Run("train", "--base-dtype", "bf16", "--qlora", "--max-steps", "1", "--out", CliHarness.TempDir("base-dtype-nf4"));
        Assert.NotEqual(0, r.ExitCode);
        Assert.Single(r.StderrLines);
        Assert.Contains("--base-dtype and --qlora/--base-quant", r.Stderr);
    }

    [Fact]
    public void Trains_with_bf16_linear_weights_on_the_ilgpu_simulator()
    {
        // A tiny f32 model (C=16, 2 layers) with the embedded model's tokenizer, so the simulator run stays small.
        string dir = CliHarness.TempDir("base-dtype-sim");
        try
        {
            string model = Path.Combine(dir, "model"), data = Path.Combine(dir, "data.jsonl"), output = Path.Combine(dir, "out");
            string tiny = Path.Combine(CliHarness.RepoRoot(), "models", "ftn-tiny");
            using (var cpu = Backends.Create("cpu:1"))
            using (var w = TinyModel.Weights(cpu, seed: 3, TinyModel.Config(vocab: 828)))
                ModelSaver.SaveHf(w, model);
            foreach (var f in new[] { "tokenizer.json", "tokenizer_config.json", "generation_config.json" })
                File.Copy(Path.Combine(tiny, f), Path.Combine(model, f));
            File.WriteAllLines(data, Enumerable.Range(1, 6).Select(i => $"{{\"instruction\": \"{i} {i + 1}\", \"input\": \"\", \"output\": \"{i + 2}\"}}"));

            var r = CliHarness.Run("train", "--model", model, "--data", data, "--device", "ilgpu-sim:4", "--base-dtype", "bf16",
                "--max-steps", "2", "--batch-size", "2", "--max-len", "16", "--exact-match", "0", "--rank", "2", "--targets", "q,v",
                "--eval-fraction", "0.2", "--out", output);
            Assert.True(r.ExitCode == 0, r.ToString());
            Assert.Contains("linear weights bf16, attention bf16; device ilgpu-sim:4", r.Stdout);
            Assert.True(File.Exists(Path.Combine(output, "adapter_model.safetensors")), r.Stdout);

            // Without the option the same f32 file loads as f32.
            var f32 = CliHarness.Run("train", "--model", model, "--data", data, "--max-steps", "1", "--batch-size", "2", "--max-len", "16",
                "--exact-match", "0", "--rank", "2", "--targets", "q,v", "--eval-fraction", "0.2", "--out", Path.Combine(dir, "out32"));
            Assert.True(f32.ExitCode == 0, f32.ToString());
            Assert.Contains("linear weights f32, attention f32; device cpu", f32.Stdout);
            // bf16 attention is selectable on its own (f32 weights, cpu: the q, k, v are widened on the fly)
            var attn = CliHarness.Run("train", "--model", model, "--data", data, "--max-steps", "1", "--batch-size", "2", "--max-len", "16",
                "--attention-dtype", "bf16", "--exact-match", "0", "--rank", "2", "--targets", "q,v", "--eval-fraction", "0.2", "--out", Path.Combine(dir, "outattn"));
            Assert.True(attn.ExitCode == 0, attn.ToString());
            Assert.Contains("linear weights f32, attention bf16; device cpu", attn.Stdout);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
