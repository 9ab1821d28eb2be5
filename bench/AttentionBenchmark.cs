using BenchmarkDotNet.Attributes;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Bench;

/// <summary>Causal GQA over a batch: B sequences of T tokens, NH query heads on NKV kv heads of size HS.</summary>
public sealed record AttentionShape(int B, int T, int NH, int NKV, int HS) : IWorkload
{
    /// <summary>Causal: T(T+1)/2 score dot products and as many weighted value sums per head, 2 flops each per channel.</summary>
    public double Flops => 4.0 * B * NH * HS * (T * (T + 1.0) / 2);
    public double Bytes => 4.0 * B * T * HS * (2.0 * NH + 2.0 * NKV);
    public override string ToString() => $"B{B}T{T}h{NH}kv{NKV}d{HS}";
}

/// <summary>Attention forward and backward at SmolLM2-135M's heads (9 on 3, size 64) and a ragged one.</summary>
[Config(typeof(RateConfig))]
public class AttentionBenchmark
{
    public static IEnumerable<AttentionShape> Shapes() => new[]
    {
        new AttentionShape(8, 512, 9, 3, 64),
        new AttentionShape(1, 2048, 9, 3, 64),
        new AttentionShape(3, 333, 6, 2, 40), // ragged
    };

    [ParamsSource(nameof(Shapes))]
    public AttentionShape Shape { get; set; } = new(1, 1, 1, 1, 1);

    private CpuBackend _b = null!;
    private Tensor _q = null!, _k = null!, _v = null!, _o = null!, _lse = null!, _dq = null!, _dk = null!, _dv = null!, _do = null!;
    private float _scale;

    [GlobalSetup]
    public void Setup()
    {
        _b = new CpuBackend(BenchEnv.Threads);
        var s = Shape;
        _q = BenchEnv.Random(_b, DType.F32, 1, s.B, s.T, s.NH, s.HS);
        _k = BenchEnv.Random(_b, DType.F32, 2, s.B, s.T, s.NKV, s.HS);
        _v = BenchEnv.Random(_b, DType.F32, 3, s.B, s.T, s.NKV, s.HS);
        _do = BenchEnv.Random(_b, DType.F32, 4, s.B, s.T, s.NH, s.HS);
        _o = _b.Allocate(DType.F32, s.B, s.T, s.NH, s.HS);
        _lse = _b.Allocate(DType.F32, s.B, s.NH, s.T);
        _dq = _b.Allocate(DType.F32, s.B, s.T, s.NH, s.HS);
        _dk = _b.Allocate(DType.F32, s.B, s.T, s.NKV, s.HS);
        _dv = _b.Allocate(DType.F32, s.B, s.T, s.NKV, s.HS);
        _scale = 1f / MathF.Sqrt(s.HS);
        Forward();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        foreach (var t in new[] { _q, _k, _v, _o, _lse, _dq, _dk, _dv, _do }) t.Dispose();
        _b.Dispose();
    }

    [Benchmark]
    public void Forward() => _b.AttentionForward(_o, _lse, _q, _k, _v, Shape.B, Shape.T, Shape.T, Shape.T, Shape.NH, Shape.NKV, Shape.HS, _scale);

    /// <summary>The backward does about 2.5x the forward's flops (recomputed scores, dP, dQ, dK, dV); the column counts forward flops.</summary>
    [Benchmark]
    public void Backward() => _b.AttentionBackward(_dq, _dk, _dv, _do, _o, _lse, _q, _k, _v, Shape.B, Shape.T, Shape.T, Shape.NH, Shape.NKV, Shape.HS, _scale);
}
