using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.Model;

namespace FineTuneNative.Tests.Peft;

/// <summary>
/// The TensorBoard event file of a training run, read by an independent reader (tests/reference/tfevents/read_tfevents.mjs:
/// protobufjs decoding TensorFlow's Event/Summary messages, TFRecord framing with masked CRC-32C from @node-rs/crc32),
/// against the run's metrics.jsonl. Skips, saying why, where node/npm or the npm packages are not available.
/// </summary>
[Collection("PeftModel")]
public class TensorBoardReferenceTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    [SkippableFact]
    public void An_independent_protobuf_reader_sees_the_metrics_and_checks_every_crc()
    {
        var (node, script, modules) = ReferenceReader();

        var samples = TinyModel.Samples(16, 4, 10, seed: 9);
        var eval = TinyModel.Samples(4, 4, 10, seed: 10);
        using var w = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3);
        using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 4, MaxSteps = 6, EvalEvery = 3, LearningRate = 1e-2, Seed = 3 });
        var r = trainer.Train(samples, eval, 0, tmp.Path);
        string file = Assert.Single(Directory.GetFiles(r.TensorBoardDir!, "events.out.tfevents.*"));

        // What metrics.jsonl says TensorBoard should show, in the order the run logged it.
        var expected = new List<(string Tag, long Step, double Value, double Tolerance)>();
        int events = 0;
        foreach (var line in File.ReadAllLines(r.MetricsPath!))
        {
            var o = JsonNode.Parse(line)!.AsObject();
            long step = o["step"]!.GetValue<long>();
            if (o["eval_loss"] is { } el)
            {
                expected.Add(("eval/loss", step, el.GetValue<double>(), 0));
                expected.Add(("eval/perplexity", step, o["eval_ppl"]!.GetValue<double>(), 0));
                events++;
            }
            else if (o["loss"] is { } l)
            {
                expected.Add(("train/loss", step, l.GetValue<double>(), 0));
                expected.Add(("train/learning_rate", step, o["lr"]!.GetValue<double>(), 0));
                expected.Add(("train/grad_norm", step, o["grad_norm"]!.GetValue<double>(), 0));
                // metrics.jsonl rounds tokens/s to 0.1; the event holds the unrounded float
                expected.Add(("train/tokens_per_s", step, o["tokens_per_s"]!.GetValue<double>(), 0.05 + 1e-6 * o["tokens_per_s"]!.GetValue<double>()));
                events++;
            }
        }
        Assert.Equal(6 * 4 + 3 * 2, expected.Count); // 6 steps x 4 train scalars, evals at steps 0, 3, 6

        var (rc, stdout, stderr) = Node(node, script, modules, file);
        Assert.True(rc == 0, $"read_tfevents.mjs failed (exit {rc}): {stderr}");
        var got = JsonNode.Parse(stdout)!.AsObject();
        Assert.Equal("brain.Event:2", got["file_version"]!.GetValue<string>());
        Assert.Equal(1 + events, got["records"]!.GetValue<int>()); // the file_version record + one per logged line
        var rows = got["rows"]!.AsArray();
        Assert.Equal(expected.Count, rows.Count);
        double lastWall = 0;
        for (int i = 0; i < rows.Count; i++)
        {
            var row = rows[i]!;
            var (tag, step, value, tol) = expected[i];
            Assert.Equal(tag, row["tag"]!.GetValue<string>());
            Assert.Equal(step, row["step"]!.GetValue<long>());
            double v = row["value"]!.GetValue<double>();
            Assert.Equal(v, (double)(float)v); // a float32 simple_value, decoded exactly
            if (tol == 0) Assert.True((float)value == (float)v, $"{tag} at step {step}: metrics.jsonl {value}, event file {v}");
            else Assert.True(Math.Abs(value - v) <= tol, $"{tag} at step {step}: metrics.jsonl {value}, event file {v}");
            double wall = row["wall_time"]!.GetValue<double>();
            Assert.True(wall > 1.7e9 && wall >= lastWall, $"wall_time {wall} after {lastWall}");
            lastWall = wall;
        }

        // A flipped bit in a record's data, and one in the first record's length, are both reported by the CRC checks.
        var bytes = File.ReadAllBytes(file);
        var badData = (byte[])bytes.Clone();
        badData[^6] ^= 0x40;
        string badDataPath = Path.Combine(tmp.Path, "bad_data.tfevents");
        File.WriteAllBytes(badDataPath, badData);
        var (rc1, out1, err1) = Node(node, script, modules, badDataPath);
        Assert.Equal(2, rc1);
        Assert.Equal("", out1.Trim());
        Assert.Contains("bad data CRC", err1);

        var badLength = (byte[])bytes.Clone();
        badLength[0] ^= 0x01;
        string badLengthPath = Path.Combine(tmp.Path, "bad_length.tfevents");
        File.WriteAllBytes(badLengthPath, badLength);
        var (rc2, _, err2) = Node(node, script, modules, badLengthPath);
        Assert.Equal(2, rc2);
        Assert.Contains("bad length CRC at offset 0", err2);
    }

    /// <summary>The reader script and a node_modules holding its pinned packages (npm ci once into a temp cache).</summary>
    private static (string Node, string Script, string Modules) ReferenceReader()
    {
        string? dir = null;
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null && dir is null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "tests", "reference", "tfevents", "read_tfevents.mjs")))
                dir = Path.Combine(d.FullName, "tests", "reference", "tfevents");
        Skip.If(dir is null, "tests/reference/tfevents/read_tfevents.mjs not found above the test binary: the independent TensorBoard check is skipped");
        string? node = OnPath("node"), npm = OnPath("npm");
        Skip.If(node is null || npm is null, "node or npm not found on PATH: the independent TensorBoard reader (protobufjs) is skipped (install Node.js)");

        string lockFile = Path.Combine(dir!, "package-lock.json");
        string hash = Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(lockFile)))[..16].ToLowerInvariant();
        string cache = Path.Combine(Path.GetTempPath(), $"ftn-tfevents-npm-{hash}");
        string modules = Path.Combine(cache, "node_modules");
        if (!File.Exists(Path.Combine(cache, ".installed")))
        {
            string staging = cache + $".tmp{Environment.ProcessId}";
            if (Directory.Exists(staging)) Directory.Delete(staging, true);
            Directory.CreateDirectory(staging);
            File.Copy(Path.Combine(dir!, "package.json"), Path.Combine(staging, "package.json"));
            File.Copy(lockFile, Path.Combine(staging, "package-lock.json"));
            var (rc, _, err) = Run(npm!, staging, null, 180_000, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error");
            if (rc != 0) Directory.Delete(staging, true);
            Skip.If(rc != 0, $"`npm ci` of tests/reference/tfevents failed (exit {rc}; no registry access?): the independent TensorBoard reader is skipped. {Tail(err)}");
            File.WriteAllText(Path.Combine(staging, ".installed"), hash);
            try
            {
                if (Directory.Exists(cache)) Directory.Delete(cache, true);
                Directory.Move(staging, cache);
            }
            catch (IOException) when (File.Exists(Path.Combine(cache, ".installed"))) { Directory.Delete(staging, true); } // a parallel run won
        }
        return (node!, Path.Combine(dir!, "read_tfevents.mjs"), modules);
    }

    private static (int Rc, string Out, string Err) Node(string node, string script, string modules, string file)
        => Run(node, Path.GetDirectoryName(script)!, modules, 30_000, script, file);

    private static (int Rc, string Out, string Err) Run(string exe, string cwd, string? modules, int timeoutMs, params string[] args)
    {
        var psi = new ProcessStartInfo(exe) { WorkingDirectory = cwd, RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        if (modules is not null) psi.Environment["FTN_TFEVENTS_NODE_MODULES"] = modules;
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeoutMs))
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{exe} {string.Join(' ', args)} did not finish in {timeoutMs / 1000} s");
        }
        return (p.ExitCode, stdout.Result, stderr.Result);
    }

    private static string? OnPath(string name)
    {
        foreach (var d in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            string f = Path.Combine(d, name);
            if (File.Exists(f)) return f;
        }
        return null;
    }

    /// <summary>The last few lines of npm's error output.</summary>
    private static string Tail(string s) => string.Join(" | ", s.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).TakeLast(4));
}
