using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;

namespace FineTuneNative.Bench;

/// <summary>A benchmark parameter that knows the work it stands for (the op's own FLOP and byte counts).</summary>
public interface IWorkload
{
    /// <summary>Floating-point operations of one invocation (a multiply-add counts 2).</summary>
    double Flops { get; }
    /// <summary>Bytes one invocation must move at least (inputs read + outputs written once).</summary>
    double Bytes { get; }
}

/// <summary>GFLOP/s or GB/s from the mean time and the <see cref="IWorkload"/> parameter of the case.</summary>
public sealed class RateColumn : IColumn
{
    private readonly bool _flops;
    public RateColumn(bool flops) { _flops = flops; }
    public string Id => _flops ? "GFLOPs" : "GBs";
    public string ColumnName => _flops ? "GFLOP/s" : "GB/s";
    public bool AlwaysShow => true;
    public ColumnCategory Category => ColumnCategory.Custom;
    public int PriorityInCategory => 0;
    public bool IsNumeric => true;
    public UnitType UnitType => UnitType.Dimensionless;
    public string Legend => _flops ? "10^9 floating-point operations per second (2·M·N·K for a matmul)" : "10^9 bytes moved per second";
    public bool IsDefault(Summary summary, BenchmarkCase benchmarkCase) => false;
    public bool IsAvailable(Summary summary) => true;
    public string GetValue(Summary summary, BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

    public string GetValue(Summary summary, BenchmarkCase benchmarkCase, SummaryStyle style)
    {
        var report = summary[benchmarkCase];
        var w = benchmarkCase.Parameters.Items.Select(p => p.Value).OfType<IWorkload>().FirstOrDefault();
        if (w is null || report?.ResultStatistics is null) return "-";
        double seconds = report.ResultStatistics.Mean * 1e-9;
        double work = _flops ? w.Flops : w.Bytes;
        return work <= 0 ? "-" : (work / seconds / 1e9).ToString("F1");
    }
}

/// <summary>Adds the GFLOP/s and GB/s columns.</summary>
public sealed class RateConfig : ManualConfig
{
    public RateConfig()
    {
        AddColumn(new RateColumn(true), new RateColumn(false));
    }
}
