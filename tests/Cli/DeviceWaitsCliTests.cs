using System.Text.RegularExpressions;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Tests.Peft;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Cli;

/// <summary>`ftn train` on an ILGPU device reports how often the host waited for the device (bench/gpu.sh compares it across its A/B).</summary>
public class DeviceWaitsCliTests(ITestOutputHelper output)
{
    [Fact]
    public void Train_on_the_simulator_reports_the_host_waits_for_the_device()
    {
        string dir = CliHarness.TempDir("device-waits");
        try
        {
            // a tiny f32 model (C=16, 2 layers) with the embedded model's tokenizer, as BaseDTypeCliTests
            string model = Path.Combine(dir, "model"), data = Path.Combine(dir, "data.jsonl");
            string tiny = Path.Combine(CliHarness.RepoRoot(), "models", "ftn-tiny");
            using (var cpu = Backends.Create("cpu:1"))
            using (var w = TinyModel.Weights(cpu, seed: 3, TinyModel.Config(vocab: 828)))
                ModelSaver.SaveHf(w, model);
            foreach (var f in new[] { "tokenizer.json", "tokenizer_config.json", "generation_config.json" })
                File.Copy(Path.Combine(tiny, f), Path.Combine(model, f));
            File.WriteAllLines(data, Enumerable.Range(1, 10).Select(i => $"{{\"instruction\": \"{i} {i + 1}\", \"input\": \"\", \"output\": \"{i + 2}\"}}"));
            var r = CliHarness.Run("train", "--model", model, "--data", data, "--device", "ilgpu-sim:4", "--max-steps", "2", "--batch-size", "1",
                "--grad-accum", "4", "--max-len", "16", "--exact-match", "0", "--rank", "2", "--targets", "q,v", "--eval-fraction", "0.2",
                "--out", Path.Combine(dir, "out"));
            Assert.True(r.ExitCode == 0, r.ToString());
            var m = Regex.Match(r.Stdout, @"device   the host waited for the device (\d+) times in training");
            Assert.True(m.Success, r.Stdout);
            int waits = int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            output.WriteLine(m.Value);
            // 2 steps (one wait each), 2 evaluations of 2 batches (one each), saving the 8 adapter tensors (one each):
            // 12. Reading every micro-batch back, as before, would have been at least 8 for the steps alone, and the
            // old uploads and id checks 10 per micro-batch.
            Assert.InRange(waits, 1, 14);
        }
        finally
        {
            try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
        }
    }
}
