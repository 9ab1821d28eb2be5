using BenchmarkDotNet.Attributes;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench;

/// <summary>Rows × channels for the row-wise and elementwise ops; bytes per element moved given per op.</summary>
public sealed record RowsShape(int Rows, int Cols, double BytesPerElement) : IWorkload
{
    public double Flops => 0;
    public double Bytes => BytesPerElement * Rows * (double)Cols;
    public override string ToString() => $"{Rows}x{Cols}";
}

/// <summary>RMSNorm forward (read x, write y: 8 B/element) and backward (read x, dy; write dx: 12 B/element).</summary>
[Config(typeof(RateConfig))]
public class RmsNormBenchmark
{
    public static IEnumerable<RowsShape> Shapes() => new[] { new RowsShape(4096, 576, 8), new RowsShape(4096, 2048, 8), new RowsShape(1000, 333, 8) };

    [ParamsSource(nameof(Shapes))]
    public RowsShape Shape { get; set; } = new(1, 1, 8);

    private CpuBackend _b = null!;
    private Tensor _x = null!, _w = null!, _y = null!, _rstd = null!, _dx = null!, _dw = null!;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        _x = BenchEnv.Random(_b, DType.F32, 1, Shape.Rows, Shape.Cols); _w = BenchEnv.Random(_b, DType.F32, 2, Shape.Cols);
        _y = _b.Allocate(DType.F32, Shape.Rows, Shape.Cols); _rstd = _b.Allocate(DType.F32, Shape.Rows);
        _dx = _b.Allocate(DType.F32, Shape.Rows, Shape.Cols); _dw = _b.Allocate(DType.F32, Shape.Cols);
        Forward();
    }

    [GlobalCleanup]
    public void Cleanup() { foreach (var t in new[] { _x, _w, _y, _rstd, _dx, _dw }) t.Dispose(); _b.Dispose(); }

    [Benchmark] public void Forward() => _b.RmsNormForward(_y, _rstd, _x, _w, Shape.Rows, Shape.Cols, 1e-5f);
    [Benchmark] public void Backward() => _b.RmsNormBackward(_dx, _dw, _y, _x, _w, _rstd, Shape.Rows, Shape.Cols, false);
}

/// <summary>SwiGLU forward (read gate, up; write h: 12 B/element) and backward (read 3, write 2: 20 B/element).</summary>
[Config(typeof(RateConfig))]
public class SwiGluBenchmark
{
    public static IEnumerable<RowsShape> Shapes() => new[] { new RowsShape(4096, 1536, 12), new RowsShape(1000, 333, 12) };

    [ParamsSource(nameof(Shapes))]
    public RowsShape Shape { get; set; } = new(1, 1, 12);

    private CpuBackend _b = null!;
    private Tensor _g = null!, _u = null!, _h = null!, _dg = null!, _du = null!;
    private long N => (long)Shape.Rows * Shape.Cols;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        _g = BenchEnv.Random(_b, DType.F32, 1, Shape.Rows, Shape.Cols); _u = BenchEnv.Random(_b, DType.F32, 2, Shape.Rows, Shape.Cols);
        _h = _b.Allocate(DType.F32, Shape.Rows, Shape.Cols); _dg = _b.Allocate(DType.F32, Shape.Rows, Shape.Cols); _du = _b.Allocate(DType.F32, Shape.Rows, Shape.Cols);
    }

    [GlobalCleanup]
    public void Cleanup() { foreach (var t in new[] { _g, _u, _h, _dg, _du }) t.Dispose(); _b.Dispose(); }

    [Benchmark] public void Forward() => _b.SwiGluForward(_h, _g, _u, N);
    [Benchmark] public void Backward() => _b.SwiGluBackward(_dg, _du, _h, _g, _u, N);
}

/// <summary>Cross-entropy over a chunk of rows of a 49152-entry vocabulary, with the gradient in place (read + write: 8 B/element).</summary>
[Config(typeof(RateConfig))]
public class CrossEntropyBenchmark
{
    public static IEnumerable<RowsShape> Shapes() => new[] { new RowsShape(256, 49152, 8), new RowsShape(100, 32001, 8) };

    [ParamsSource(nameof(Shapes))]
    public RowsShape Shape { get; set; } = new(1, 1, 8);

    private CpuBackend _b = null!;
    private Tensor _logits = null!, _targets = null!, _losses = null!;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        _logits = BenchEnv.Random(_b, DType.F32, 1, Shape.Rows, Shape.Cols);
        _targets = _b.Allocate(DType.I32, Shape.Rows);
        _b.Upload(_targets, Enumerable.Range(0, Shape.Rows).Select(i => i * 37 % Shape.Cols).ToArray());
        _losses = _b.Allocate(DType.F32, Shape.Rows);
    }

    [GlobalCleanup]
    public void Cleanup() { _logits.Dispose(); _targets.Dispose(); _losses.Dispose(); _b.Dispose(); }

    // the gradient overwrites the logits; values stay bounded (softmax - onehot), so repeated runs do the same work
    [Benchmark] public void LossAndGradient() => _b.CrossEntropy(_logits, _targets, _losses, Shape.Rows, Shape.Cols, -100, 1f, true);
}

/// <summary>AdamW over a parameter block (read p, g, m, v; write p, m, v: 28 B/element).</summary>
[Config(typeof(RateConfig))]
public class AdamWBenchmark
{
    public static IEnumerable<RowsShape> Shapes() => new[] { new RowsShape(1, 4_718_592, 28), new RowsShape(1, 333_333, 28) };

    [ParamsSource(nameof(Shapes))]
    public RowsShape Shape { get; set; } = new(1, 1, 28);

    private CpuBackend _b = null!;
    private Tensor _p = null!, _g = null!, _m = null!, _v = null!;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        _p = BenchEnv.Random(_b, DType.F32, 1, Shape.Cols); _g = BenchEnv.Random(_b, DType.F32, 2, Shape.Cols);
        _m = _b.Allocate(DType.F32, Shape.Cols); _v = _b.Allocate(DType.F32, Shape.Cols);
    }

    [GlobalCleanup]
    public void Cleanup() { foreach (var t in new[] { _p, _g, _m, _v }) t.Dispose(); _b.Dispose(); }

    [Benchmark] public void Step() => _b.AdamW(_p, _g, _m, _v, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f, 10, 1f);
}
