using System.Diagnostics;
using System.Text.Json.Nodes;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using Xunit.Abstractions;

namespace FineTuneNative.Tests.Cli;

/// <summary>
/// ftn train's run options end to end on the embedded model: YAML configuration, full fine-tuning, the memory check,
/// and killing a real child <c>ftn train</c> process at a random moment, then resuming it.
/// </summary>
public class TrainRunCliTests(ITestOutputHelper output)
{
    private static readonly string[] Quick = { "--exact-match", "0", "--batch-size", "4", "--max-len", "48", "--eval-every", "4", "--log-every", "1" };

    private static List<(int Step, double Loss)> Losses(string dir) =>
        File.ReadLines(Path.Combine(dir, Trainer.MetricsFile)).Select(l => JsonNode.Parse(l)!.AsObject())
            .Where(o => o.ContainsKey("loss")).Select(o => ((int)o["step"]!, (double)o["loss"]!)).ToList();

    private static List<(int Step, double Loss)> EvalLosses(string dir) =>
        File.ReadLines(Path.Combine(dir, Trainer.MetricsFile)).Select(l => JsonNode.Parse(l)!.AsObject())
            .Where(o => o.ContainsKey("eval_loss")).Select(o => ((int)o["step"]!, (double)o["eval_loss"]!)).ToList();

    [Fact]
    public void Yaml_config_gives_the_same_run_as_flags_and_the_saved_config_repeats_it()
    {
        string dir = CliHarness.TempDir("yaml");
        try
        {
            string yaml = Path.Combine(dir, "run.yaml");
            File.WriteAllText(yaml, "# a run\nmax-steps: 4\nlr: 3e-3\nbatch-size: 4\nmax-len: 48\nexact-match: 0\neval-every: 2\nlr-scheduler: linear\n" +
                                    "targets: [q_proj, v_proj]\nkeep-best: true\n");
            var a = CliHarness.Run("train", "--config", yaml, "--out", Path.Combine(dir, "a"));
            Assert.True(a.ExitCode == 0, a.ToString());
            var b = CliHarness.Run("train", "--max-steps", "4", "--lr", "3e-3", "--batch-size", "4", "--max-len", "48", "--exact-match", "0",
                "--eval-every", "2", "--lr-scheduler", "linear", "--targets", "q_proj,v_proj", "--keep-best", "--out", Path.Combine(dir, "b"));
            Assert.True(b.ExitCode == 0, b.ToString());
            Assert.Equal(Losses(Path.Combine(dir, "b")), Losses(Path.Combine(dir, "a")));
            Assert.Equal(4, Losses(Path.Combine(dir, "a")).Count);

            // The resolved configuration is saved with the output; as --config it repeats the run (another --out).
            string saved = Path.Combine(dir, "a", Trainer.ConfigFile);
            string text = File.ReadAllText(saved);
            foreach (var line in new[] { "lr: 0.003", "max-steps: 4", "lr-scheduler: linear", "targets: q_proj,v_proj", "keep-best: true", "rank: 8", "optimizer: adamw" })
                Assert.Contains(line + "\n", text);
            var c = CliHarness.Run("train", "--config", saved, "--out", Path.Combine(dir, "c"));
            Assert.True(c.ExitCode == 0, c.ToString());
            Assert.Equal(Losses(Path.Combine(dir, "a")), Losses(Path.Combine(dir, "c")));

            // Flags win over the file.
            var d = CliHarness.Run("train", "--config", yaml, "--max-steps", "2", "--out", Path.Combine(dir, "d"));
            Assert.True(d.ExitCode == 0, d.ToString());
            Assert.Equal(Losses(Path.Combine(dir, "a")).Take(2).Select(x => x.Step), Losses(Path.Combine(dir, "d")).Select(x => x.Step));

            // An unknown key names the file, the line and the nearest flag.
            File.WriteAllText(yaml, "lr: 1e-3\nbatchsize: 4\n");
            var e = CliHarness.Run("train", "--config", yaml);
            Assert.Equal(2, e.ExitCode);
            Assert.Contains("run.yaml:2: unknown option 'batchsize' (did you mean 'batch-size'?", e.Stderr);
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Full_fine_tuning_lowers_held_out_loss_and_the_memory_check_refuses_what_does_not_fit()
    {
        string dir = CliHarness.TempDir("full");
        try
        {
            string outDir = Path.Combine(dir, "full");
            var r = CliHarness.Run(new[] { "train", "--method", "full", "--max-steps", "8", "--lr", "1e-3", "--out", outDir, "--top-layers", "2",
                "--trainable-layers", "lm_head,model.norm" }.Concat(Quick).ToArray());
            Assert.True(r.ExitCode == 0, r.ToString());
            Assert.Contains("memory   plan (expected peak):", r.Stdout);
            Assert.Contains("frozen", r.Stdout);
            Assert.Contains("summary", r.Stdout);
            var evals = EvalLosses(outDir);
            Assert.True(evals[^1].Loss < evals[0].Loss - 0.5, string.Join(", ", evals));
            using (var st = SafeTensors.Open(outDir)) Assert.Contains("model.layers.0.self_attn.q_proj.weight", st.Names);
            Assert.True(File.Exists(Path.Combine(outDir, "config.json")));

            // generate reads the full fine-tune's output as a model.
            var g = CliHarness.Run("generate", "--model", outDir, "--raw", "--prompt", "1 2 3", "--max-new-tokens", "4");
            Assert.True(g.ExitCode == 0, g.ToString());

            var refused = CliHarness.Run(new[] { "train", "--method", "full", "--max-steps", "2", "--max-memory", "4M", "--out", Path.Combine(dir, "no") }.Concat(Quick).ToArray());
            Assert.Equal(1, refused.ExitCode);
            Assert.Contains("allows 4.0 MiB", refused.Stderr);
            Assert.Contains("--activation-checkpointing", refused.Stderr);
            Assert.False(Directory.Exists(Path.Combine(dir, "no")));

            var lora = CliHarness.Run("train", "--top-layers", "1");
            Assert.Equal(1, lora.ExitCode);
            Assert.Contains("--method full", lora.Stderr);
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>The built CLI (ftn.dll beside the test assembly) run as a child process.</summary>
    private static Process StartChild(params string[] args)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "ftn.dll");
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(dll);
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi)!;
    }

    [Fact]
    public void Killing_a_child_ftn_train_at_a_random_moment_and_resuming_gives_the_uninterrupted_losses()
    {
        string dir = CliHarness.TempDir("kill");
        try
        {
            string[] run = new[] { "train", "--method", "full", "--max-steps", "14", "--lr", "1e-3", "--save-every", "2", "--save-total-limit", "3" }
                .Concat(Quick).ToArray();
            string reference = Path.Combine(dir, "reference");
            var r = CliHarness.Run(run.Concat(new[] { "--out", reference }).ToArray());
            Assert.True(r.ExitCode == 0, r.ToString());

            string killed = Path.Combine(dir, "killed");
            int seed = Environment.TickCount;
            var rng = new Random(seed);
            using (var child = StartChild(run.Concat(new[] { "--out", killed }).ToArray()))
            {
                _ = child.StandardOutput.ReadToEndAsync(); // keep the pipes drained
                _ = child.StandardError.ReadToEndAsync();
                var clock = Stopwatch.StartNew();
                while (!Directory.Exists(Path.Combine(killed, "checkpoint-2")) && !child.HasExited && clock.Elapsed < TimeSpan.FromSeconds(120)) Thread.Sleep(5);
                int delay = rng.Next(0, 2500);
                Thread.Sleep(delay);
                bool exited = child.HasExited;
                if (!exited) child.Kill(entireProcessTree: true);
                child.WaitForExit();
                output.WriteLine($"seed {seed}: killed {delay} ms after checkpoint-2 appeared{(exited ? " (the child had already finished)" : "")}; " +
                                 $"checkpoints: {string.Join(", ", Trainer.Checkpoints(killed).Select(c => c.Step))}");
            }

            // Every checkpoint directory that exists is complete and readable (partial ones only ever live under a hidden temporary name).
            var ckpts = Trainer.Checkpoints(killed);
            Assert.NotEmpty(ckpts);
            foreach (var (_, c) in ckpts)
            {
                var state = JsonNode.Parse(File.ReadAllText(Path.Combine(c, Trainer.StateFile)))!;
                Assert.True((int)state["step"]! > 0);
                using (var opt = SafeTensors.Open(Path.Combine(c, Trainer.OptimizerFile))) Assert.NotEmpty(opt.Names);
                using (var model = SafeTensors.Open(Path.Combine(c, "model.safetensors"))) Assert.NotEmpty(model.Names);
                Assert.True(File.Exists(Path.Combine(c, "config.json")) && File.Exists(Path.Combine(c, Trainer.ConfigFile)));
            }

            // Without --resume the run refuses to mix with the old checkpoints; with it, it finishes like the reference.
            var again = CliHarness.Run(run.Concat(new[] { "--out", killed }).ToArray());
            Assert.Equal(1, again.ExitCode);
            Assert.Contains("--resume latest", again.Stderr);
            var resumed = CliHarness.Run(run.Concat(new[] { "--out", killed, "--resume", "latest" }).ToArray());
            Assert.True(resumed.ExitCode == 0, resumed.ToString());
            Assert.Equal(Losses(reference), Losses(killed));
            Assert.Equal(EvalLosses(reference).Where(e => e.Step > 0), EvalLosses(killed).Where(e => e.Step > 0));
            using var a = SafeTensors.Open(reference);
            using var b = SafeTensors.Open(killed);
            foreach (var name in a.Names) Assert.Equal(a.ReadF32(name), b.ReadF32(name));
        }
        finally { Directory.Delete(dir, true); }
    }
}
