using System.Text.Json.Nodes;
using FineTuneNative.Kernels.Cpu;
using Xunit;

namespace FineTuneNative.Tests.Cli;

/// <summary><c>ftn train --compute bf16</c>: the flag reaches the backend (losses move by bf16 rounding, not more).</summary>
[Collection(FineTuneNative.Tests.Kernels.ForceFallbackCollection.Name)]
public class ComputeCliTests
{
    [SkippableFact]
    public void Train_Compute_Bf16_Changes_The_Losses_Slightly()
    {
        Skip.IfNot(CpuBackend.Bf16ComputeAvailable, "no AVX512_BF16 kernel here: --compute bf16 runs the f32 products (GemmBf16Tests.Fallback_*)");
        string dir = CliHarness.TempDir("compute");
        try
        {
            double[] Losses(string compute)
            {
                string outDir = Path.Combine(dir, compute);
                var t = CliHarness.Run("train", "--max-steps", "3", "--exact-match", "0", "--batch-size", "4", "--log-every", "1",
                    "--dropout", "0", "--threads", "2", "--compute", compute, "--out", outDir);
                Assert.True(t.ExitCode == 0, t.ToString());
                return File.ReadLines(Path.Combine(outDir, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!.AsObject())
                    .Where(o => o["loss"] is not null && o["step"] is not null).Select(o => o["loss"]!.GetValue<double>()).ToArray();
            }
            var f32 = Losses("f32");
            var bf16 = Losses("bf16");
            Assert.Equal(3, f32.Length);
            Assert.Equal(3, bf16.Length);
            Assert.NotEqual(f32, bf16);
            for (int i = 0; i < 3; i++) Assert.True(Math.Abs(f32[i] - bf16[i]) < 0.02 * f32[i], $"step {i + 1}: f32 {f32[i]} vs bf16 {bf16[i]}");
        }
        finally { Directory.Delete(dir, true); }
    }
}
