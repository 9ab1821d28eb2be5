using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Cpu;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Bench.Peers;

/// <summary>
/// LoRA training throughput, ftn against PyTorch (bench/peers/torch/torch_train.py), same configuration: random
/// frozen weights, LoRA r=16 α=32 without dropout on q,k,v,o,gate,up,down, AdamW on the adapters, clipping at 1.0.
/// </summary>
/// <remarks>
/// <c>peers train-ftn SHAPE [f32|bf16|bf16c] [threads] [steps]</c> (bf16 = bf16 weights, bf16c = bf16 weights + bf16 compute) runs ftn's Trainer.Step in this process and prints one
/// JSON line (tokens/s, peak RSS from /proc/self/status VmHWM). <c>peers train</c> runs every case, each in its own
/// process so peak RSS is per case, PyTorch with Debian's OpenMP OpenBLAS first in LD_LIBRARY_PATH, and prints the
/// table with ftn/torch ratios against the issue's targets (≥ 1.5× fp32, ≥ 1.0× bf16 autocast, RSS ≤ ½ of fp32's).
/// </remarks>
internal static class TrainPeer
{
    public sealed record Shape(string Name, LlamaConfig Config, int Batch, int Seq);

    public static readonly Shape[] Shapes =
    {
        new("stories15m", new LlamaConfig
        {
            HiddenSize = 288, IntermediateSize = 768, NumLayers = 6, NumHeads = 6, NumKvHeads = 6, HeadDim = 48,
            VocabSize = 32000, TieWordEmbeddings = true, RopeTheta = 10000f,
        }, 4, 256),
        new("smollm2-135m", new LlamaConfig
        {
            HiddenSize = 576, IntermediateSize = 1536, NumLayers = 30, NumHeads = 9, NumKvHeads = 3, HeadDim = 64,
            VocabSize = 49152, TieWordEmbeddings = true, RopeTheta = 100000f,
        }, 2, 256),
    };

    public const string TorchPython = "/usr/bin/python3";
    public const string OpenMpBlasDir = "/usr/lib/x86_64-linux-gnu/openblas-openmp";

    /// <summary>One ftn case in this process; prints one JSON line.</summary>
    public static int RunFtn(string[] args)
    {
        string name = args.Length > 2 ? args[2] : "stories15m";
        var shape = Shapes.FirstOrDefault(s => s.Name == name)
            ?? throw new ArgumentException($"unknown shape '{name}' (expected {string.Join(", ", Shapes.Select(s => s.Name))})");
        string mode = args.Length > 3 ? args[3] : "f32";
        if (mode is not ("f32" or "bf16" or "bf16c")) throw new ArgumentException($"unknown mode '{mode}' (expected f32, bf16 = bf16 weights, bf16c = bf16 weights and bf16 compute)");
        var dtype = mode is "bf16" or "bf16c" ? DType.BF16 : DType.F32;
        int threads = args.Length > 4 ? int.Parse(args[4], CultureInfo.InvariantCulture) : 2;
        int steps = args.Length > 5 ? int.Parse(args[5], CultureInfo.InvariantCulture) : 4;

        using var be = new CpuBackend(threads) { MatMulCompute = mode == "bf16c" ? DType.BF16 : DType.F32 };
        var c = shape.Config;
        using var weights = LlamaWeights.Allocate(c, be, dtype);
        var rng = new Random(0);
        foreach (var (pname, t) in weights.Named())
        {
            var data = new float[t.Length];
            if (pname.EndsWith("norm.weight", StringComparison.Ordinal)) Array.Fill(data, 1f);
            else
            {
                float sd = pname.Contains("embed", StringComparison.Ordinal) ? 0.02f : 1f / MathF.Sqrt(t.Dim(t.Rank - 1));
                for (int i = 0; i < data.Length; i++) data[i] = (float)(rng.NextDouble() * 2 - 1) * sd * 1.732f;
            }
            be.Upload(t, data);
        }
        using var model = new LlamaModel(weights, be);
        if (int.TryParse(Environment.GetEnvironmentVariable("FTN_LOGITS_ROWS"), out int headRows)) model.LogitsChunkRows = headRows;
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 16, Alpha = 32, Dropout = 0 }, 1);
        var opt = new TrainOptions { MicroBatch = shape.Batch, MaxLength = shape.Seq, ClipNorm = 1.0, LearningRate = 2e-4 };
        using var trainer = new Trainer(model, adapter, opt);
        int m = shape.Batch * shape.Seq;
        var tokens = new int[m + 1];
        var trng = new Random(1);
        for (int i = 0; i < tokens.Length; i++) tokens[i] = trng.Next(c.VocabSize);
        var batch = new Batch(tokens[..m], tokens[1..], shape.Batch, shape.Seq, shape.Batch, m, m);
        var window = new[] { batch };
        trainer.Step(window, 2e-4); // warm-up: JIT, workspaces, scratch
        var proc = Process.GetCurrentProcess();
        proc.Refresh();
        var cpu0 = proc.TotalProcessorTime;
        var sw = Stopwatch.StartNew();
        double loss = 0;
        for (int s = 0; s < steps; s++) loss = trainer.Step(window, 2e-4).Loss;
        double dt = sw.Elapsed.TotalSeconds;
        proc.Refresh();
        double cpuS = (proc.TotalProcessorTime - cpu0).TotalSeconds;
        var line = new Dictionary<string, object>
        {
            ["peer"] = "ftn", ["shape"] = shape.Name, ["mode"] = mode == "bf16c" ? (CpuBackend.Bf16ComputeAvailable ? "bf16-compute" : "bf16-compute (f32 fallback)") : dtype == DType.BF16 ? "bf16-weights" : "fp32", ["threads"] = threads,
            ["batch"] = shape.Batch, ["seq"] = shape.Seq, ["steps"] = steps, ["tokens_per_s"] = (double)m * steps / dt,
            ["tokens_per_cpu_s"] = (double)m * steps / cpuS, ["logits_chunk_rows"] = model.LogitsChunkRows,
            ["peak_rss_mb"] = PeakRssMb(), ["loss"] = loss, ["lora_params"] = adapter.ParameterCount,
        };
        Console.WriteLine(JsonSerializer.Serialize(line));
        return 0;
    }

    /// <summary>VmHWM of this process in MiB (Linux), NaN elsewhere.</summary>
    public static double PeakRssMb()
    {
        try
        {
            foreach (var l in File.ReadLines("/proc/self/status"))
                if (l.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return double.Parse(l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) / 1024.0;
        }
        catch (IOException) { }
        return double.NaN;
    }

    /// <summary>Every case, each in its own process; prints the ratio table.</summary>
    public static int RunAll(string[] args)
    {
        int threads = args.Length > 2 ? int.Parse(args[2], CultureInfo.InvariantCulture) : 2;
        string self = Environment.ProcessPath ?? "dotnet";
        string dll = typeof(TrainPeer).Assembly.Location;
        string script = FindScript();
        bool haveTorch = File.Exists(TorchPython) && RunJson(TorchPython, "-c \"import torch, json; print(json.dumps({'v': torch.__version__}))\"", null) is not null;
        if (!haveTorch) Console.WriteLine("peers train: PyTorch SKIPPED - /usr/bin/python3 cannot import torch; install it with: apt-get install -y python3-torch libopenblas0-openmp");
        Console.WriteLine($"peers train: threads={threads}, LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, AdamW, clip 1.0, random frozen weights; torch with LD_LIBRARY_PATH={OpenMpBlasDir}");
        var rows = new List<(string Shape, string Who, double Tps, double Rss, double Cps)>();
        foreach (var shape in Shapes)
        {
            int steps = shape.Name == "stories15m" ? 6 : 3;
            if (haveTorch)
                foreach (var mode in new[] { "fp32", "bf16" })
                {
                    var j = RunJson(TorchPython, $"\"{script}\" --shape {shape.Name} --dtype {mode} --threads {threads} --steps {steps}", OpenMpBlasDir);
                    if (j is not null) rows.Add((shape.Name, "torch " + mode, j.Value.GetProperty("tokens_per_s").GetDouble(), j.Value.GetProperty("peak_rss_mb").GetDouble(), j.Value.GetProperty("tokens_per_cpu_s").GetDouble()));
                }
            foreach (var mode in new[] { "f32", "bf16", "bf16c" })
            {
                string argsFtn = (self.EndsWith("dotnet", StringComparison.Ordinal) ? $"\"{dll}\" " : "") + $"peers train-ftn {shape.Name} {mode} {threads} {steps}";
                var j = RunJson(self, argsFtn, null);
                if (j is not null) rows.Add((shape.Name, mode == "f32" ? "ftn fp32" : mode == "bf16" ? "ftn bf16-weights" : "ftn bf16-compute", j.Value.GetProperty("tokens_per_s").GetDouble(), j.Value.GetProperty("peak_rss_mb").GetDouble(), j.Value.GetProperty("tokens_per_cpu_s").GetDouble()));
            }
        }
        Console.WriteLine();
        Console.WriteLine($"{"shape",-14} {"run",-18} {"tokens/s",9} {"peak RSS MB",12} {"vs torch fp32",14} {"vs torch bf16",14} {"RSS/torch fp32",15} {"tok/CPU-s",10} {"CPU vs fp32",12} {"CPU vs bf16",12}");
        foreach (var r in rows)
        {
            var tf = rows.FirstOrDefault(x => x.Shape == r.Shape && x.Who == "torch fp32");
            var tb = rows.FirstOrDefault(x => x.Shape == r.Shape && x.Who == "torch bf16");
            string R(double a, double b) => b > 0 ? (a / b).ToString("F2", CultureInfo.InvariantCulture) + "x" : "-";
            Console.WriteLine($"{r.Shape,-14} {r.Who,-18} {r.Tps,9:F1} {r.Rss,12:F0} {R(r.Tps, tf.Tps),14} {R(r.Tps, tb.Tps),14} {(tf.Rss > 0 ? (r.Rss / tf.Rss).ToString("F2", CultureInfo.InvariantCulture) : "-"),15} {r.Cps,10:F1} {R(r.Cps, tf.Cps),12} {R(r.Cps, tb.Cps),12}");
        }
        Console.WriteLine("targets: ftn >= 1.5x torch fp32 and >= 1.0x torch bf16 tokens/s; ftn peak RSS <= 0.5x torch fp32");
        Console.WriteLine("tok/CPU-s: tokens per second of process CPU time (all threads): the per-core rate, robust when the machine is shared");
        return 0;
    }

    private static string FindScript()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            string p = Path.Combine(d.FullName, "bench", "peers", "torch", "torch_train.py");
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException("bench/peers/torch/torch_train.py not found above " + AppContext.BaseDirectory);
    }

    /// <summary>Runs a process, echoes its output, returns its last JSON line (null on failure, with the reason printed).</summary>
    private static JsonElement? RunJson(string file, string arguments, string? ldPath)
    {
        var psi = new ProcessStartInfo(file, arguments) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (ldPath is not null) psi.Environment["LD_LIBRARY_PATH"] = ldPath + (psi.Environment.TryGetValue("LD_LIBRARY_PATH", out var old) && !string.IsNullOrEmpty(old) ? ":" + old : "");
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("cannot start " + file);
        var errTask = p.StandardError.ReadToEndAsync();
        string outText = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        string err = errTask.Result;
        string? last = outText.Split('\n', StringSplitOptions.RemoveEmptyEntries).LastOrDefault(l => l.TrimStart().StartsWith('{'));
        if (p.ExitCode != 0 || last is null)
        {
            Console.WriteLine($"  FAILED ({p.ExitCode}): {file} {arguments}\n{outText}{err}");
            return null;
        }
        foreach (var l in outText.Split('\n', StringSplitOptions.RemoveEmptyEntries)) Console.WriteLine("  " + l);
        return JsonDocument.Parse(last).RootElement.Clone();
    }
}
