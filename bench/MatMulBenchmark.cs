using BenchmarkDotNet.Attributes;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench;

/// <summary>One nn.Linear shape: y(M,N) = x(M,K)·W(N,K)ᵀ.</summary>
public sealed record MatMulShape(int M, int N, int K) : IWorkload
{
    public double Flops => 2.0 * M * N * K;
    public double Bytes => 4.0 * ((double)M * K + (double)N * K + (double)M * N);
    public override string ToString() => $"{M}x{N}x{K}";
}

/// <summary>
/// The three matmul layouts of training on the CPU backend at LLM shapes: SmolLM2-135M's projections
/// (C = 576, FFN 1536) over a 4096-token batch, its 49152-entry LM head over 512 tokens, a square 1024³, and a ragged shape.
/// </summary>
/// <remarks>Run: dotnet run -c Release --project bench -- --filter '*MatMul*' (threads: FTN_THREADS, default all cores).</remarks>
[Config(typeof(RateConfig))]
public class MatMulBenchmark
{
    public static IEnumerable<MatMulShape> Shapes() => new[]
    {
        new MatMulShape(1024, 1024, 1024),
        new MatMulShape(4096, 576, 576),
        new MatMulShape(4096, 1536, 576),
        new MatMulShape(512, 49152, 576),
        new MatMulShape(1000, 333, 517), // ragged: no dimension a multiple of the tiles
        new MatMulShape(1, 49152, 576),  // decode: one token through the LM head
    };

    [ParamsSource(nameof(Shapes))]
    public MatMulShape Shape { get; set; } = new(1, 1, 1);

    [Params(DType.F32, DType.BF16)]
    public DType WeightType { get; set; }

    private CpuBackend _b = null!;
    private Tensor _x = null!, _w = null!, _y = null!, _dw = null!;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        var (m, n, k) = (Shape.M, Shape.N, Shape.K);
        _x = BenchEnv.Random(_b, DType.F32, 1, m, k);
        _w = BenchEnv.Random(_b, WeightType, 2, n, k);
        _y = _b.Allocate(DType.F32, m, n);
        _dw = _b.Allocate(DType.F32, n, k);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var t in new[] { _x, _w, _y, _dw }) t.Dispose();
        _b.Dispose();
    }

    [Benchmark(Description = "y = x·Wᵀ")]
    public void Forward() => _b.MatMul(_y, _x, _w, null, Shape.M, Shape.N, Shape.K, false);

    [Benchmark(Description = "dx = dy·W")]
    public void BackwardInput() => _b.MatMulBackwardInput(_x, _y, _w, Shape.M, Shape.N, Shape.K, false);

    [Benchmark(Description = "dW += dyᵀ·x")]
    public void BackwardWeight()
    {
        if (WeightType != DType.F32) return; // weight gradients are f32 only; one row per shape is enough
        _b.MatMulBackwardWeight(_dw, null, _y, _x, Shape.M, Shape.N, Shape.K);
    }
}
