using BenchmarkDotNet.Attributes;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench;

/// <summary>A LoRA linear: M tokens, N outputs, K inputs, rank R.</summary>
public sealed record LoraShape(int M, int N, int K, int R) : IWorkload
{
    /// <summary>Forward: x·Wᵀ plus the two rank-R products.</summary>
    public double Flops => 2.0 * M * ((double)N * K + (double)R * K + (double)N * R);
    public double Bytes => 4.0 * ((double)M * K + (double)N * K + (double)M * N);
    public override string ToString() => $"{M}x{N}x{K}r{R}";
}

/// <summary>The fused LoRA linear forward and backward (base frozen) at SmolLM2-135M's q/up projections.</summary>
[Config(typeof(RateConfig))]
public class LoraLinearBenchmark
{
    public static IEnumerable<LoraShape> Shapes() => new[] { new LoraShape(4096, 576, 576, 8), new LoraShape(4096, 1536, 576, 16), new LoraShape(1000, 333, 517, 8) };

    [ParamsSource(nameof(Shapes))]
    public LoraShape Shape { get; set; } = new(1, 1, 1, 1);

    [Params(0f, 0.05f)]
    public float Dropout { get; set; }

    private CpuBackend _b = null!;
    private Tensor _x = null!, _w = null!, _a = null!, _bb = null!, _y = null!, _u = null!, _xd = null!, _g = null!, _dx = null!, _da = null!, _db = null!;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        var (m, n, k, r) = (Shape.M, Shape.N, Shape.K, Shape.R);
        _x = BenchEnv.Random(_b, DType.F32, 1, m, k); _w = BenchEnv.Random(_b, DType.BF16, 2, n, k);
        _a = BenchEnv.Random(_b, DType.F32, 3, r, k); _bb = BenchEnv.Random(_b, DType.F32, 4, n, r);
        _y = _b.Allocate(DType.F32, m, n); _u = _b.Allocate(DType.F32, m, r); _xd = _b.Allocate(DType.F32, m, k);
        _g = _b.Allocate(DType.F32, m, r); _dx = _b.Allocate(DType.F32, m, k); _da = _b.Allocate(DType.F32, r, k); _db = _b.Allocate(DType.F32, n, r);
        Forward();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var t in new[] { _x, _w, _a, _bb, _y, _u, _xd, _g, _dx, _da, _db }) t.Dispose();
        _b.Dispose();
    }

    private LoraParams P => new(_a, _bb, 2f, Dropout, 7);

    [Benchmark]
    public void Forward() => _b.LoraLinearForward(_y, _x, _w, null, P, _u, _xd, Shape.M, Shape.N, Shape.K, Shape.R);

    [Benchmark]
    public void Backward() => _b.LoraLinearBackward(_dx, _y, _x, _w, P, _u, _xd, _g, _da, _db, null, null, Shape.M, Shape.N, Shape.K, Shape.R, false);
}
