using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Gpu;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Runtime.Inference;

/// <summary>
/// An InferenceSession with a bf16 KV cache (kvCacheDType: BF16): q, k after RoPE and v rounded to bf16, f32 attention
/// output. The prefill on a warp-32 simulator with the tensor-core attention forced on (the emulated mma path of the
/// kernel CUDA sm_80+ runs) and the simulator's SIMT fallback both match the CPU backend's bf16 session; decode steps read
/// the bf16 cache; the result is close to the f32 cache.
/// </summary>
public class Bf16KvCacheTests
{
    private readonly ITestOutputHelper _out;
    public Bf16KvCacheTests(ITestOutputHelper output) => _out = output;

    private static readonly LlamaConfig Config = new()
    {
        HiddenSize = 32, IntermediateSize = 40, NumLayers = 2, NumHeads = 4, NumKvHeads = 2, HeadDim = 8,
        VocabSize = 40, MaxPositions = 64, RmsNormEps = 1e-5f, BosTokenId = 1, EosTokenIds = new[] { 2 },
    };

    private static readonly int[] Prompt = { 1, 7, 30, 12, 4, 19, 22, 8, 3 };

    private static float[][] Run(IBackend b, DType kv, DType linear = DType.F32)
    {
        using var w = LlamaWeights.Allocate(Config, b, linear);
        var r = new Random(5);
        foreach (var (name, t) in w.Named())
        {
            bool norm = name.EndsWith("norm.weight", StringComparison.Ordinal);
            b.Upload(t, Enumerable.Range(0, (int)t.Length).Select(_ => norm ? 1f + (float)(r.NextDouble() * 0.2 - 0.1) : (float)(r.NextDouble() - 0.5)).ToArray());
        }
        using var s = new InferenceSession(w, b, 16, kvCacheDType: kv);
        Assert.Equal(kv, s.KvCacheDType);
        var outs = new List<float[]> { (float[])s.Prefill(Prompt).Clone(), (float[])s.Decode(5).Clone(), (float[])s.Decode(33).Clone() };
        if (kv == DType.BF16) // the cache holds bf16 values
            Assert.All(s.CacheRows(1, 0, Prompt.Length + 2), x => Assert.Equal(x, HalfBits.Bf16ToF32(HalfBits.F32ToBf16(x))));
        return outs.ToArray();
    }

    private void Close(float[][] expected, float[][] actual, double atol, double rtol, string what)
    {
        for (int i = 0; i < expected.Length; i++)
        {
            double worst = 0;
            for (int j = 0; j < expected[i].Length; j++) worst = Math.Max(worst, Math.Abs(expected[i][j] - actual[i][j]));
            _out.WriteLine($"{what} step {i}: max abs logit difference {worst:G3}");
            NumericAssert.Close(expected[i], actual[i], atol, rtol, $"{what} step {i}");
        }
    }

    [Fact]
    public void Bf16Cache_TensorCorePrefill_And_Fallback_MatchCpu()
    {
        var cpu = Run(TestBackends.Get("cpu"), DType.BF16);
        var cpu32 = Run(TestBackends.Get("cpu"), DType.F32);
        var fallback = Run(TestBackends.Get("ilgpu-sim:32"), DType.BF16); // no tensor cores in the simulator: SIMT kernels widen
        using var sim = IlgpuBackend.CreateSimulator(32);
        sim.Kernels(x => new AttentionKernels(x)).TensorCores = true;
        var tc = Run(sim, DType.BF16);
        // Same rounded q, k, v, f32 kernels: f32 summation order only (logits ~1), unless an f32 value rounds to the
        // other bf16 neighbour on one backend (2^-8 relative on one element).
        Close(cpu, fallback, 1e-4, 1e-3, "cpu vs simulator fallback (bf16 cache)");
        // The tensor-core forward also rounds P to bf16 before P·V: bf16 tolerance.
        Close(cpu, tc, Tolerance.BF16.Atol, Tolerance.BF16.Rtol, "cpu vs tensor-core prefill (bf16 cache)");
        Assert.Contains(Enumerable.Range(0, tc[0].Length), j => tc[0][j] != fallback[0][j]); // the prefill really took the other kernel
        // Against the f32 cache: q, k, v each off by up to 2^-9 relative, carried through two layers into logits of
        // magnitude up to max|logit|: measured 0.027-0.033 abs at max|logit| 3.6; 2e-2·max|logit| (about 5 bf16 ulps of
        // the largest logit) still fails on a wrong rotation or a cache row written in the wrong place (order max|logit|).
        double maxLogit = cpu32.SelectMany(x => x).Max(x => Math.Abs((double)x));
        _out.WriteLine($"max |logit| {maxLogit:G3}");
        Close(cpu32, cpu, 2e-2 * maxLogit, Tolerance.BF16.Rtol, "cpu f32 vs bf16 cache");
        Assert.Contains(Enumerable.Range(0, cpu[0].Length), j => cpu[0][j] != cpu32[0][j]);
    }

    /// <summary>
    /// bf16 weights on tensor cores (CUDA sm_80+, or the simulator that dispatches like it, unless FTN_TEST_TC_SIM=0), what a
    /// GPU's first generation runs: every prefill linear (M = 9) on the tensor-core matmul, every decode linear (M = 1) on the f32
    /// GEMV (MatMulGemvKernels: x not rounded; PlainBackend rounds only above its MaxRows too). With an f32
    /// cache that is exactly the plain backend multiplying bf16 weights by x rounded to bf16 (measured 1.2e-7 apart on
    /// ilgpu-sim-tc, while the unrounded CPU backend is 0.024-0.044 away: the rounding is real and all of the difference).
    /// With the bf16 cache (the CUDA default) the prefill attention also runs on the tensor-core kernel (P rounded) over
    /// bf16 q, k, v: measured 0.027-0.044 from that emulation at max|logit| 3.6, bound 3e-2·max|logit| (a wrong rotation
    /// or cache row is off by order max|logit|).
    /// </summary>
    [SkippableTheory]
    [InlineData("ilgpu-sim-tc")]
    [InlineData("cuda")]
    public void Bf16Weights_OnTensorCores_AreTheRoundedInputEmulation(string device)
    {
        Skip.If(device == "cuda" && !Backends.CudaAvailable(), "no CUDA device");
        Skip.If(device == "ilgpu-sim-tc" && !TestBackends.TensorCoreSimulator, "FTN_TEST_TC_SIM=0 leaves the tensor-core simulator out");
        Skip.IfNot(TestBackends.RoundsOperands(device), $"{device} has no tensor cores (CUDA before sm_80)");
        using var plain = new FineTuneNative.Tests.Runtime.Model.PlainBackend { RoundsBf16MatMulInputs = true };
        var emulated = Run(plain, DType.F32, DType.BF16);
        var tc = Run(TestBackends.Get(device), DType.F32, DType.BF16);
        var cpu = Run(TestBackends.Get("cpu"), DType.F32, DType.BF16);
        double maxLogit = emulated.SelectMany(x => x).Max(x => Math.Abs((double)x));
        _out.WriteLine($"max |logit| {maxLogit:G3}");
        // 1e-3·max|logit|: f32 accumulation order, and room for an activation that rounds to the other bf16 neighbour
        // on one side (2^-8 of one element); the rounding itself is 7x larger and must show against the CPU backend
        Close(emulated, tc, 1e-3 * maxLogit, 0, $"rounded-input emulation vs {device} (f32 cache)");
        for (int i = 0; i < cpu.Length; i++)
            Assert.Contains(Enumerable.Range(0, cpu[i].Length), j => Math.Abs(tc[i][j] - cpu[i][j]) > 2e-3 * maxLogit);
        var tcBf16 = Run(TestBackends.Get(device), DType.BF16, DType.BF16);
        Close(emulated, tcBf16, 3e-2 * maxLogit, 0, $"rounded-input emulation (f32 cache) vs {device} (bf16 cache)");
    }

    [Theory]
    [InlineData("f32", "cuda", DType.F32)]
    [InlineData("BF16", "cpu", DType.BF16)]
    [InlineData("bfloat16", "cpu:2", DType.BF16)]
    [InlineData("float32", "cuda:1", DType.F32)]
    public void Generate_parses_the_kv_cache_types(string text, string device, DType expected) =>
        Assert.Equal(expected, FineTuneNative.Cli.GenerateCommand.ParseKvCache(text, device));

    // the default (auto, or no value): bf16 on every name Backends.Create maps to CUDA, f32 on the cpu and the simulator
    [Theory]
    [InlineData("auto", "cuda", DType.BF16)]
    [InlineData(null, "cuda:0", DType.BF16)]
    [InlineData("Auto", " CUDA:1 ", DType.BF16)]
    [InlineData("auto", "gpu", DType.BF16)]
    [InlineData("auto", "cpu", DType.F32)]
    [InlineData(null, "cpu:4", DType.F32)]
    [InlineData("auto", "ilgpu-sim:4", DType.F32)]
    public void Generate_defaults_the_kv_cache_to_bf16_on_cuda_and_f32_elsewhere(string? text, string device, DType expected) =>
        Assert.Equal(expected, FineTuneNative.Cli.GenerateCommand.ParseKvCache(text, device));

    [Fact]
    public void Generate_option_default_is_auto()
    {
        var parsed = new CommandLine.Parser(s => s.HelpWriter = null).ParseArguments<FineTuneNative.Cli.GenerateOptions>(["--prompt", "x"]);
        var o = Assert.IsType<CommandLine.Parsed<FineTuneNative.Cli.GenerateOptions>>(parsed).Value;
        Assert.Equal("auto", o.KvCache);
        Assert.Equal(DType.F32, FineTuneNative.Cli.GenerateCommand.ParseKvCache(o.KvCache, o.Device)); // --device defaults to cpu
    }

    [Fact]
    public void Generate_refuses_another_kv_cache_type() =>
        Assert.Contains("--kv-cache", Assert.ThrowsAny<Exception>(() => FineTuneNative.Cli.GenerateCommand.ParseKvCache("q8_0", "cuda")).Message);
}
