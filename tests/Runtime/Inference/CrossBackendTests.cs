using System.Diagnostics;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using FineTuneNative.Tests.Runtime.IO;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Runtime.Inference;

/// <summary>The same session code on the ILGPU simulator as on the CPU: model code is written once against IBackend.</summary>
public class CrossBackendTests
{
    private readonly ITestOutputHelper _out;
    public CrossBackendTests(ITestOutputHelper output) => _out = output;

    private static LlamaConfig Tiny() => new()
    {
        HiddenSize = 16, IntermediateSize = 24, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 4,
        VocabSize = 40, MaxPositions = 64, RmsNormEps = 1e-5f, AttentionBias = true, BosTokenId = 1, EosTokenIds = new[] { 2 },
    };

    [Theory]
    [InlineData("ilgpu-sim:4")]
    [InlineData("ilgpu-sim:32")]
    public void Tiny_Model_Prefill_And_Decode_Match_Cpu(string device)
    {
        using var dir = new TempDir();
        var cfg = Tiny();
        var r = new Random(21);
        var tensors = LlamaWeights.Schema(cfg).Select(s =>
        {
            int n = s.Shape.Aggregate(1, (a, b) => a * b);
            bool norm = s.Name.EndsWith("norm.weight", StringComparison.Ordinal);
            var d = Enumerable.Range(0, n).Select(_ => norm ? 1f + (float)(r.NextDouble() * 0.2 - 0.1) : (float)(r.NextDouble() - 0.5)).ToArray();
            return (s.Name, DType.F32, s.Shape, d);
        }).ToList();
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), cfg.ToHfJson());
        SafeTensors.Write(Path.Combine(dir.Path, "model.safetensors"), tensors);

        var prompt = new[] { 1, 7, 30, 12 };
        float[][] Run(IBackend b)
        {
            using var m = ModelLoader.Load(dir.Path, b);
            using var s = new InferenceSession(m.Weights, b, 8);
            var sw = Stopwatch.StartNew();
            var outs = new List<float[]> { (float[])s.Prefill(prompt).Clone() };
            outs.Add((float[])s.Decode(5).Clone());
            outs.Add((float[])s.Decode(33).Clone());
            _out.WriteLine($"{b.Name}: {sw.Elapsed.TotalSeconds:F2} s");
            return outs.ToArray();
        }
        var cpu = Run(TestBackends.Get("cpu"));
        var sim = Run(TestBackends.Get(device));
        for (int i = 0; i < cpu.Length; i++)
            NumericAssert.Close(cpu[i], sim[i], Tolerance.F32.Atol, Tolerance.F32.Rtol, $"{device} step {i}");
    }
}
