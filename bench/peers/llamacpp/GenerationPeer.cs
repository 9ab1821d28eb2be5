using System.Diagnostics;
using System.Text.Json;
using FineTuneNative.Kernels;
using FineTuneNative.Kernels.Quant;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Bench.Peers;

/// <summary>
/// <c>peers generate [SHAPES] [PRECISIONS] [THREADS] [ftn-only]</c>: ftn's InferenceSession against llama.cpp (node-llama-cpp 3.22.1,
/// CPU prebuilt, driven by bench/peers/llamacpp/bench.mjs) on the same random-weight model at the same weight precision:
/// prefill pp128 and decode tg64 (after a 32-token prompt) tokens/s, batch 1, KV cache, THREADS threads (default 2).
/// ftn quantizes the weights itself and writes the GGUF the peer loads (GgufWriter), so both run identical weights.
/// Also prints the issue's native llama-bench -t 2 figures and ftn's ratio to them (Node adds per-token overhead).
/// Run through bench/peers/llamacpp/run.sh (builds, installs the peer with npm, runs everything).
/// </summary>
internal static class GenerationPeer
{
    private sealed record Shape(string Name, LlamaConfig Config, Dictionary<string, (double Tg, double Pp)> Native);

    private static readonly Shape[] Shapes =
    {
        new("stories15M", new LlamaConfig
        {
            HiddenSize = 288, IntermediateSize = 768, NumLayers = 6, NumHeads = 6, NumKvHeads = 6, HeadDim = 48, VocabSize = 32000,
            MaxPositions = 256, RmsNormEps = 1e-5f, RopeTheta = 10000f, TieWordEmbeddings = false, RopeLayout = RopeLayout.Interleaved,
        }, new() { ["f32"] = (372, 4930), ["q8_0"] = (979, 8689), ["q4_0"] = (1137, 11051) }),
        new("smollm2-135M", new LlamaConfig
        {
            HiddenSize = 576, IntermediateSize = 1536, NumLayers = 30, NumHeads = 9, NumKvHeads = 3, HeadDim = 64, VocabSize = 49152,
            MaxPositions = 256, RmsNormEps = 1e-5f, RopeTheta = 100000f, TieWordEmbeddings = true,
        }, new() { ["f32"] = (47.5, 551), ["f16"] = (92.8, 620), ["q8_0"] = (123.6, 568), ["q4_0"] = (198.9, 884) }),
    };

    public static int Run(string[] args)
    {
        var shapes = (args.Length > 2 ? args[2] : "stories15M,smollm2-135M").Split(',');
        var precisions = (args.Length > 3 ? args[3] : "f32,f16,q8_0,q4_0").Split(',');
        int threads = args.Length > 4 ? int.Parse(args[4]) : 2;
        bool ftnOnly = args.Length > 5 && args[5].StartsWith("ftn-only", StringComparison.Ordinal);   // skip llama.cpp (profiling ftn alone)
        bool unpacked = args.Length > 5 && args[5] == "ftn-only-unpacked";   // no repacked weights: the previous prefill (dequantize + f32 GEMM) and Q4_0 row decode, for A/B
        string dir = Path.GetDirectoryName(typeof(GenerationPeer).Assembly.Location)!;
        string script = ftnOnly ? "" : FindScript();
        string outDir = Path.Combine(Path.GetTempPath(), $"ftn-llamacpp-peer-{Environment.ProcessId}");
        Directory.CreateDirectory(outDir);
        Console.WriteLine($"machine: {Environment.ProcessorCount} cpus, {System.Runtime.InteropServices.RuntimeInformation.OSArchitecture}, " +
            $"AVX-512BW {System.Runtime.Intrinsics.X86.Avx512BW.IsSupported}, .NET {Environment.Version}; threads {threads}; load avg {LoadAvg()}");
        Console.WriteLine($"{"shape",-13} {"weights",-5} | {"ftn tg64",9} {"llama tg64",10} {"ratio",6} | {"ftn pp128",9} {"llama pp128",11} {"ratio",6} | {"native tg/pp",13} {"ftn/native tg",13} {"pp",6} | ftn CPU per token: decode, prefill");
        try
        {
            foreach (var s in Shapes.Where(s => shapes.Contains(s.Name, StringComparer.OrdinalIgnoreCase)))
            {
                using var backend = Backends.Create($"cpu:{threads}");
                using var f32 = RandomWeights(s.Config, backend, 7);
                foreach (var p in precisions)
                {
                    var type = WeightQuantizer.Parse(p);
                    using var w = type == DType.F32 ? null : WeightQuantizer.Quantize(f32, type);
                    var model = w ?? f32;
                    var (tg, pp, cpuPerToken, cpuPp) = MeasureFtn(model, backend, !unpacked);
                    (double Tg, double Pp)? peer = null;
                    if (!ftnOnly)
                    {
                        string gguf = Path.Combine(outDir, $"{s.Name}-{p}.gguf");
                        GgufWriter.WriteLlama(f32, type, gguf, $"ftn-random-{s.Name}");
                        peer = RunNode(script, gguf, s.Config.VocabSize, threads);
                        File.Delete(gguf);
                    }
                    string native = s.Native.TryGetValue(p, out var n) ? $"{n.Tg,5:F0}/{n.Pp,-6:F0}" : "   -/-    ";
                    string nr = s.Native.TryGetValue(p, out n) ? $"{tg / n.Tg,13:F2} {pp / n.Pp,6:F2}" : $"{"-",13} {"-",6}";
                    string peerTg = peer is null ? (ftnOnly ? "-" : "failed") : $"{peer.Value.Tg:F1}", peerPp = peer is null ? (ftnOnly ? "-" : "failed") : $"{peer.Value.Pp:F0}";
                    string rtg = peer is null ? "-" : $"{tg / peer.Value.Tg:F2}", rpp = peer is null ? "-" : $"{pp / peer.Value.Pp:F2}";
                    Console.WriteLine($"{s.Name,-13} {p,-5} | {tg,9:F1} {peerTg,10} {rtg,6} | {pp,9:F0} {peerPp,11} {rpp,6} | {native,13} {nr} | {cpuPerToken * 1e3:F2} ms, prefill {cpuPp * 1e3:F3} ms");
                }
            }
        }
        finally { try { Directory.Delete(outDir, true); } catch (IOException) { } }
        return 0;
    }

    /// <summary>
    /// <c>peers generate-check [MODEL] [N]</c>: the real stories260K (llama2.c .bin) quantized by ftn to Q8_0 and Q4_0,
    /// written as GGUF and run greedily from BOS by llama.cpp: its tokens against ftn's on the same quantized
    /// weights (a check of the block layouts, the GGUF writer and the quantized decode against the real peer).
    /// </summary>
    public static int Check(string[] args)
    {
        string model = args.Length > 2 ? args[2] : "../shared/assets/stories260K/stories260K.bin";
        int n = args.Length > 3 ? int.Parse(args[3]) : 64;
        string script = FindScript();
        using var backend = Backends.Create("cpu:2");
        using var loaded = ModelLoader.Load(model, backend);
        var opts = new GenerationOptions { MaxNewTokens = n, IgnoreEos = true };
        foreach (var type in new[] { DType.F32, DType.Q8_0, DType.Q4_0 })
        {
            using var q = type == DType.F32 ? null : WeightQuantizer.Quantize(loaded.Weights, type);
            using var s = new InferenceSession(q ?? loaded.Weights, backend, n + 2);
            var ours = Generator.Generate(s, new[] { 1 }, opts);
            string gguf = Path.Combine(Path.GetTempPath(), $"ftn-check-{Environment.ProcessId}-{type.Name()}.gguf");
            GgufWriter.WriteLlama(loaded.Weights, type, gguf, "stories260K");
            var psi = new ProcessStartInfo("node", $"\"{script}\" \"{gguf}\" {loaded.Weights.Config.VocabSize} 2 1 {n}") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Path.GetDirectoryName(script)! };
            var (stdout, stderr, _) = RunWithTimeout(psi, 300);
            var line = stdout.Split('\n').LastOrDefault(l => l.TrimStart().StartsWith('{'));
            if (line is null) { Console.Error.WriteLine($"llama.cpp failed on {gguf}: {stderr}"); return 1; }
            File.Delete(gguf);
            using var doc = JsonDocument.Parse(line);
            var theirs = doc.RootElement.GetProperty("greedy").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            int same = 0;
            while (same < Math.Min(ours.Length, theirs.Length) && ours[same] == theirs[same]) same++;
            Console.WriteLine($"{type.Name(),-5}: ftn and llama.cpp greedy tokens from BOS agree for {same} of {n}");
            Console.WriteLine($"  ftn   {string.Join(' ', ours.Take(24))} ...");
            Console.WriteLine($"  llama {string.Join(' ', theirs.Take(24))} ...");
        }
        return 0;
    }

    /// <summary>
    /// <c>peers prefill-gemm [THREADS=1] [M=128]</c>: the prefill products of the SmolLM2-135M layer shapes, y(M, N) = x(M, K)·Wᵀ,
    /// timed in process CPU time per thread (best of 5 runs of >= 0.25 CPU-s after a warm-up): the f32 GEMM (CpuBackend.MatMul, packs W per call)
    /// against <see cref="PackedGemm"/> on the same weights stored f32/f16/q8_0/q4_0. GFLOP per core-second = 2·M·N·K / CPU-s.
    /// </summary>
    public static unsafe int PrefillGemm(string[] args)
    {
        int threads = args.Length > 2 ? int.Parse(args[2]) : 1, m = args.Length > 3 ? int.Parse(args[3]) : 128;
        using var be = (FineTuneNative.Kernels.Cpu.CpuBackend)Backends.Create($"cpu:{threads}");
        var proc = Process.GetCurrentProcess();
        double Cpu() { proc.Refresh(); return proc.TotalProcessorTime.TotalSeconds; }
        double Best(Action a)
        {
            a();
            double best = double.MaxValue;
            // process CPU time ticks in 10 ms steps: each measurement runs >= 0.25 CPU-s
            for (int r = 0; r < 5; r++)
            {
                double c0 = Cpu(), c1;
                int n = 0;
                do { a(); n++; } while ((c1 = Cpu()) - c0 < 0.25);
                best = Math.Min(best, (c1 - c0) / n / threads);
            }
            return best;
        }
        Console.WriteLine($"threads {threads}, M {m}, load avg {LoadAvg()}; GFLOP per core-second (process CPU time / threads)");
        Console.WriteLine($"{"N x K",-11} {"f32 GEMM",9} {"f32 packed",11} {"f16 packed",11} {"q8_0 packed",12} {"q4_0 packed",12}");
        foreach (var (n, k) in new[] { (576, 576), (192, 576), (1536, 576), (576, 1536) })
        {
            var rng = new Random(n + k);
            var wf = Enumerable.Range(0, n * k).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
            var xf = Enumerable.Range(0, m * k).Select(_ => (float)(rng.NextDouble() - 0.5)).ToArray();
            using var w = be.Allocate(DType.F32, n, k); be.Upload(w, wf);
            using var x = be.Allocate(DType.F32, m, k); be.Upload(x, xf);
            using var y = be.Allocate(DType.F32, m, n);
            double flop = 2.0 * m * n * k;
            var cells = new List<string> { $"{flop / Best(() => be.MatMul(y, x, w, null, m, n, k, false)) / 1e9,9:F1}" };
            using var ws = new PackedGemm.Workspace(m, k, threads);
            float* px = (float*)be.Ptr(x, "x"), py = (float*)be.Ptr(y, "y");
            foreach (var t in new[] { DType.F32, DType.F16, DType.Q8_0, DType.Q4_0 })
            {
                var bytes = t switch
                {
                    DType.F32 => wf.SelectMany(BitConverter.GetBytes).ToArray(),
                    DType.F16 => wf.SelectMany(v => BitConverter.GetBytes(HalfBits.F32ToF16(v))).ToArray(),
                    _ => Quantized(t, wf),
                };
                fixed (byte* pb = bytes)
                {
                    using var pm = new PackedMatrix(t, pb, n, k, "w");
                    var tt = t;
                    cells.Add($"{flop / Best(() => { if (tt.IsBlockQuantized()) PackedGemm.QuantizeInput(ws, px, k, m, k); PackedGemm.Run(be, pm, ws, m, px, k, py, n, null, false); }) / 1e9,11:F1}");
                }
            }
            Console.WriteLine($"{n + "x" + k,-11} {string.Join(" ", cells)}");
        }
        return 0;
    }

    private static byte[] Quantized(DType t, float[] w)
    {
        var b = new byte[t.StorageBytes(w.Length)];
        FineTuneNative.Kernels.Quant.QuantBlocks.Quantize(t, w, b);
        return b;
    }

    /// <summary>Runs a process, killing it (exit code -1) after <paramref name="seconds"/>.</summary>
    private static (string Stdout, string Stderr, int ExitCode) RunWithTimeout(ProcessStartInfo psi, int seconds)
    {
        using var p = Process.Start(psi)!;
        var o = p.StandardOutput.ReadToEndAsync();
        var e = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(seconds * 1000))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            return (o.Result, e.Result + $" (killed after {seconds} s)", -1);
        }
        return (o.Result, e.Result, p.ExitCode);
    }

    private static string LoadAvg() => File.Exists("/proc/loadavg") ? File.ReadAllText("/proc/loadavg").Split(' ')[0] : "?";

    private static string FindScript()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
        {
            string p = Path.Combine(d.FullName, "bench", "peers", "llamacpp", "bench.mjs");
            if (File.Exists(p)) return p;
        }
        throw new FileNotFoundException("bench/peers/llamacpp/bench.mjs not found above " + AppContext.BaseDirectory);
    }

    /// <summary>Weights ~ U(-a, a) with a = 1/sqrt(fan-in) (so activations stay O(1) through the layers), norms 1.</summary>
    internal static LlamaWeights RandomWeights(LlamaConfig c, IBackend b, ulong seed)
    {
        var w = LlamaWeights.Allocate(c, b);
        ulong state = seed;
        foreach (var (name, t) in w.Named())
        {
            var data = new float[t.Length];
            if (name.EndsWith("norm.weight", StringComparison.Ordinal)) Array.Fill(data, 1f);
            else
            {
                float a = 1f / MathF.Sqrt(t.Cols);
                for (long i = 0; i < data.Length; i++)
                {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    data[i] = a * ((state >> 40) * (2f / (1 << 24)) - 1f);
                }
            }
            b.Upload(t, data);
        }
        return w;
    }

    /// <summary>Best of 3 (after a warm-up): tg64 after a 32-token prompt and pp128 from an empty cache.</summary>
    private static (double Tg, double Pp, double CpuPerToken, double CpuPerPrefillToken) MeasureFtn(LlamaWeights w, IBackend backend, bool packed)
    {
        var c = w.Config;
        using var s = new InferenceSession(w, backend, 200, prefillChunk: 128, packedWeights: packed);
        var rng = new Random(12345);
        var p128 = Enumerable.Range(0, 128).Select(_ => rng.Next(259, c.VocabSize)).ToArray();
        var p32 = p128[..32];
        var proc = Process.GetCurrentProcess();
        double Cpu() { proc.Refresh(); return proc.TotalProcessorTime.TotalSeconds; }
        double bestTg = double.MaxValue, bestPp = double.MaxValue, bestCpu = double.MaxValue, bestCpuPp = double.MaxValue;
        for (int run = 0; run < 4; run++)
        {
            s.Reset();
            s.Prefill(p32.AsSpan(0, 31));
            double c0 = Cpu();
            var sw = Stopwatch.StartNew();
            var logits = s.Decode(p32[31]);
            for (int i = 1; i < 64; i++) logits = s.Decode(Sampler.Argmax(logits));
            double tg = sw.Elapsed.TotalSeconds, cpu = Cpu() - c0;
            s.Reset();
            c0 = Cpu();
            sw.Restart();
            s.Prefill(p128);
            double pp = sw.Elapsed.TotalSeconds, cpuPp = Cpu() - c0;
            if (run == 0) continue;
            bestTg = Math.Min(bestTg, tg); bestPp = Math.Min(bestPp, pp); bestCpu = Math.Min(bestCpu, cpu / 64); bestCpuPp = Math.Min(bestCpuPp, cpuPp / 128);
        }
        return (64 / bestTg, 128 / bestPp, bestCpu, bestCpuPp);
    }

    private static (double Tg, double Pp)? RunNode(string script, string gguf, int vocab, int threads)
    {
        var psi = new ProcessStartInfo("node", $"\"{script}\" \"{gguf}\" {vocab} {threads} 3")
        {
            RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = Path.GetDirectoryName(script)!,
        };
        var (stdout, stderr, code) = RunWithTimeout(psi, 900);
        var line = stdout.Split('\n').LastOrDefault(l => l.TrimStart().StartsWith('{'));
        if (code != 0 || line is null)
        {
            Console.Error.WriteLine($"llama.cpp peer failed on {gguf} (exit {code}): {stderr.Trim()} {stdout.Trim()}");
            return null;
        }
        using var doc = JsonDocument.Parse(line);
        return (doc.RootElement.GetProperty("tg64").GetDouble(), doc.RootElement.GetProperty("pp128").GetDouble());
    }
}
