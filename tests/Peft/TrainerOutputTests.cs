using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using System.Text.Json.Nodes;
using FineTuneNative.Kernels;
using FineTuneNative.Peft.Data;
using FineTuneNative.Peft.Lora;
using FineTuneNative.Peft.Training;
using FineTuneNative.Runtime.IO;
using FineTuneNative.Runtime.Model;
using FineTuneNative.Tests.Numerics;

namespace FineTuneNative.Tests.Peft;

/// <summary>What a run writes for the user (TensorBoard events, the loss PNG) and full fine-tuning's files.</summary>
[Collection("PeftModel")]
public class TrainerOutputTests
{
    private static IBackend Cpu => PeftBackend.Cpu;

    [Fact]
    public void Checksums_match_their_standard_check_values()
    {
        var check = Encoding.ASCII.GetBytes("123456789");
        Assert.Equal(0xE3069283u, TensorBoardWriter.Crc32C(check)); // CRC-32C check value (RFC 3720 / Castagnoli)
        Assert.Equal(0xCBF43926u, LossPlot.Crc32(check));           // CRC-32 check value (PNG, zlib)
        Assert.Equal(0u, TensorBoardWriter.Crc32C(ReadOnlySpan<byte>.Empty));
    }

    /// <summary>
    /// Resuming into the run's own directory leaves one event file in which every step appears once: the events up to the
    /// checkpoint are carried over (same wall times), the steps after it that the first run had logged are replaced by
    /// the resumed run's (the same values: resume is bit-exact). A fresh run into the directory starts it anew.
    /// </summary>
    [Fact]
    public void Resume_keeps_one_event_file_with_each_step_once()
    {
        var samples = TinyModel.Samples(16, 4, 10, seed: 9);
        var eval = TinyModel.Samples(4, 4, 10, seed: 10);
        using var w = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();
        var opts = new TrainOptions { MicroBatch = 4, MaxSteps = 6, EvalEvery = 3, SaveEvery = 3, LearningRate = 1e-2, Seed = 3 };
        TrainResult full;
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3))
        using (var trainer = new Trainer(model, adapter, opts))
            full = trainer.Train(samples, eval, 0, tmp.Path);
        string tbDir = Path.Combine(tmp.Path, Trainer.TensorBoardDirName);
        var first = TensorBoardWriter.Read(Assert.Single(Directory.GetFiles(tbDir, "*tfevents*"))).Scalars;
        Thread.Sleep(1100);   // the resumed file gets another name (its name holds the unix second)
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3))
        using (var trainer = new Trainer(model, adapter, opts))
        {
            var resumed = trainer.Train(samples, eval, 0, tmp.Path, resumeFrom: Path.Combine(tmp.Path, "checkpoint-3"));
            Assert.Equal(full.StepLosses.Skip(3), resumed.StepLosses);
        }
        var file = Assert.Single(Directory.GetFiles(tbDir, "*tfevents*"));
        var (version, scalars) = TensorBoardWriter.Read(file);
        Assert.Equal("brain.Event:2", version);
        foreach (var g in scalars.GroupBy(x => (x.Tag, x.Step))) Assert.True(g.Count() == 1, $"{g.Key.Tag} at step {g.Key.Step} appears {g.Count()} times");
        var train = scalars.Where(x => x.Tag == "train/loss").ToList();
        Assert.Equal(Enumerable.Range(1, 6).Select(i => (long)i), train.Select(x => x.Step));
        for (int i = 0; i < 6; i++) Assert.Equal((float)full.StepLosses[i], train[i].Value);
        Assert.Equal(new long[] { 0, 3, 6 }, scalars.Where(x => x.Tag == "eval/loss").Select(x => x.Step));
        // steps up to the checkpoint are the first run's events (same wall times); later ones are new
        foreach (var x in scalars.Where(x => x.Step <= 3))
            Assert.Contains(first, f => f.Tag == x.Tag && f.Step == x.Step && f.WallTime == x.WallTime && f.Value == x.Value);
        var lateOld = first.Where(f => f.Tag == "train/loss" && f.Step == 5).Single().WallTime;
        Assert.True(train[4].WallTime > lateOld, "step 5 should be the resumed run's event");

        // a fresh run into the same directory: only its own events
        using (var model = new LlamaModel(w, Cpu))
        using (var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3))
        using (var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 4, MaxSteps = 2, EvalEvery = 3, LearningRate = 1e-2, Seed = 3 }))
            trainer.Train(samples, eval, 0, tmp.Path);
        var fresh = TensorBoardWriter.Read(Assert.Single(Directory.GetFiles(tbDir, "*tfevents*"))).Scalars;
        Assert.Equal(new long[] { 1, 2 }, fresh.Where(x => x.Tag == "train/loss").Select(x => x.Step));
    }

    [Fact]
    public void A_run_writes_tensorboard_events_that_parse_back_to_the_metrics_and_a_png()
    {
        var samples = TinyModel.Samples(16, 4, 10, seed: 9);
        var eval = TinyModel.Samples(4, 4, 10, seed: 10);
        using var w = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();
        using var model = new LlamaModel(w, Cpu);
        using var adapter = LoraAdapter.Create(model, new LoraConfig { Rank = 2, Dropout = 0 }, 3);
        using var trainer = new Trainer(model, adapter, new TrainOptions { MicroBatch = 4, MaxSteps = 6, EvalEvery = 3, LearningRate = 1e-2, Seed = 3 });
        var r = trainer.Train(samples, eval, 0, tmp.Path);

        var files = Directory.GetFiles(r.TensorBoardDir!, "events.out.tfevents.*");
        Assert.Single(files);
        var (version, scalars) = TensorBoardWriter.Read(files[0]);
        Assert.Equal("brain.Event:2", version);
        var trainLoss = scalars.Where(s => s.Tag == "train/loss").ToList();
        Assert.Equal(Enumerable.Range(1, 6).Select(i => (long)i), trainLoss.Select(s => s.Step));
        for (int i = 0; i < 6; i++) Assert.Equal((float)r.StepLosses[i], trainLoss[i].Value);
        var evalLoss = scalars.Where(s => s.Tag == "eval/loss").ToList();
        Assert.Equal(new long[] { 0, 3, 6 }, evalLoss.Select(s => s.Step));
        Assert.Equal((float)r.EvalLossAfter, evalLoss[^1].Value);
        Assert.Contains(scalars, s => s.Tag == "train/learning_rate" && s.Step == 1);
        Assert.All(scalars, s => Assert.True(s.WallTime > 1.7e9));

        // A corrupted byte is caught by the CRC.
        var bytes = File.ReadAllBytes(files[0]);
        bytes[^6] ^= 0x40;
        string bad = Path.Combine(tmp.Path, "bad.tfevents");
        File.WriteAllBytes(bad, bytes);
        Assert.Contains("CRC", Assert.Throws<InvalidDataException>(() => TensorBoardWriter.Read(bad)).Message);

        // The PNG: valid chunks (CRC-32 over type + data), 800x480 RGB, and blue (train) and orange (eval) pixels.
        var png = File.ReadAllBytes(r.PlotPath!);
        Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }, png[..8]);
        int pos = 8, width = 0, height = 0;
        var idat = new MemoryStream();
        while (pos < png.Length)
        {
            int len = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(pos));
            string type = Encoding.ASCII.GetString(png, pos + 4, 4);
            Assert.Equal(BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(pos + 8 + len)), LossPlot.Crc32(png.AsSpan(pos + 4, 4 + len)));
            if (type == "IHDR") { width = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(pos + 8)); height = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(pos + 12)); }
            if (type == "IDAT") idat.Write(png, pos + 8, len);
            pos += 12 + len;
        }
        Assert.Equal((800, 480), (width, height));
        idat.Position = 0;
        using var z = new ZLibStream(idat, CompressionMode.Decompress);
        var raw = new MemoryStream();
        z.CopyTo(raw);
        Assert.Equal(height * (1 + width * 3), raw.Length);
        var px = raw.ToArray();
        bool Has(byte r0, byte g0, byte b0)
        {
            for (int y = 0; y < height; y++)
                for (int x = 0; x < width; x++)
                {
                    int o = y * (1 + width * 3) + 1 + x * 3;
                    if (px[o] == r0 && px[o + 1] == g0 && px[o + 2] == b0) return true;
                }
            return false;
        }
        Assert.True(Has(31, 119, 180) && Has(255, 127, 14));
    }

    [Fact]
    public void Full_fine_tuning_with_bf16_weights_keeps_f32_masters_saves_hf_and_resumes_bit_for_bit()
    {
        var samples = TinyModel.Samples(12, 4, 10, seed: 21);
        var eval = TinyModel.Samples(4, 4, 10, seed: 22);
        using var src = TinyModel.Weights(Cpu);
        using var tmp = new TempDir();
        var opts = new TrainOptions { MicroBatch = 3, MaxSteps = 6, SaveEvery = 3, LearningRate = 1e-2, WarmupSteps = 1, Seed = 5, WeightDecay = 0.1 };

        TrainResult full;
        float[] masterQ, weightQ;
        using (var w = FullFineTune.CloneWritable(src, Cpu, DType.BF16))
        using (var model = new LlamaModel(w, Cpu))
        using (var method = new FullFineTune(model))
        using (var trainer = new Trainer(model, method, opts))
        {
            Assert.Equal(w.ParameterCount, method.ParameterCount);
            Assert.True(method.MasterBytes > 0);
            full = trainer.Train(samples, eval, 0, Path.Combine(tmp.Path, "run"));
            var q = method.Trainable.Single(t => t.Name == "model.layers.0.self_attn.q_proj.weight");
            masterQ = q.Param.ToArray();
            weightQ = w.Layers[0].Wq.ToArray();
            Assert.True(full.EvalLossAfter < full.EvalLossBefore);
        }
        // The bf16 weight is the rounded master, and the master holds more than bf16 can.
        for (int i = 0; i < masterQ.Length; i++) Assert.Equal(BitConverter.UInt32BitsToSingle(Bf16Round(masterQ[i])), weightQ[i]);
        Assert.Contains(masterQ, x => BitConverter.SingleToUInt32Bits(x) % 65536 != 0);

        // The output is a Hugging Face directory that loads and evaluates to the final eval loss.
        string outDir = Path.Combine(tmp.Path, "run");
        using (var loaded = ModelLoader.Load(outDir, Cpu))
        using (var model = new LlamaModel(loaded.Weights, Cpu))
        using (var lora = LoraAdapter.Create(model, new LoraConfig { Rank = 1, Dropout = 0 }, 1)) // B = 0: the loaded model alone
        using (var t = new Trainer(model, lora, opts))
            Assert.Equal(full.EvalLossAfter, t.Evaluate(eval, t.SeqLenFor(samples, eval), 0).Loss);

        // Resume from checkpoint-3: the same losses bit for bit (the f32 masters come back from the checkpoint).
        using (var w = FullFineTune.CloneWritable(src, Cpu, DType.BF16))
        using (var model = new LlamaModel(w, Cpu))
        using (var method = new FullFineTune(model))
        using (var trainer = new Trainer(model, method, opts))
        {
            var resumed = trainer.Train(samples, eval, 0, Path.Combine(tmp.Path, "resumed"), resumeFrom: Path.Combine(outDir, "checkpoint-3"));
            Assert.Equal(full.StepLosses.Skip(3), resumed.StepLosses);
            Assert.Equal(full.EvalLossAfter, resumed.EvalLossAfter);
        }
    }

    private static uint Bf16Round(float x)
    {
        uint u = BitConverter.SingleToUInt32Bits(x);
        return (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    }

    [Theory]
    [InlineData(1, null)]
    [InlineData(0, "0,lm_head")]
    [InlineData(0, "mlp")]
    public void Frozen_parameters_get_no_gradient_and_trained_ones_are_unchanged(int topLayers, string? trainable)
    {
        using var src = TinyModel.Weights(Cpu);
        const int B = 2, T = 9;
        var tokens = new int[B * T];
        var targets = new int[B * T];
        for (int i = 0; i < tokens.Length; i++) { tokens[i] = (i * 5 + 3) % 40; targets[i] = i % 4 == 0 ? -100 : (i * 13) % 40; }

        using var wAll = FullFineTune.CloneWritable(src, Cpu);
        using var all = new LlamaModel(wAll, Cpu) { TrainBase = true };
        all.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, 1);
        var reference = all.BaseParameters().ToDictionary(p => p.Name, p => p.Grad.ToArray());

        using var w = FullFineTune.CloneWritable(src, Cpu);
        using var model = new LlamaModel(w, Cpu);
        var cfg = trainable is null ? new FullFineTuneConfig { TopLayers = topLayers } : new FullFineTuneConfig { Trainable = trainable.Split(',') };
        using var method = new FullFineTune(model, cfg);
        method.ZeroGrad();
        model.ForwardBackward(tokens, targets, B, T, 1f / tokens.Length, 1);
        int frozen = 0;
        foreach (var (name, _, grad) in model.BaseParameters())
        {
            var g = grad.ToArray();
            if (method.Trainable.Any(x => x.Name == name))
                Assert.True(reference[name].SequenceEqual(g), $"{name}: trained gradient differs from the unfrozen model's");
            else
            {
                frozen++;
                Assert.True(reference[name].Any(v => v != 0), $"{name}: the unfrozen gradient is zero, the check would prove nothing");
                Assert.True(g.All(v => v == 0), $"{name}: a frozen parameter's gradient was computed");
            }
        }
        Assert.True(frozen > 0);
    }

    [Fact]
    public void Layer_freezing_trains_only_the_selected_layers()
    {
        var samples = TinyModel.Samples(8, 4, 10, seed: 2);
        using var src = TinyModel.Weights(Cpu);
        void Check(FullFineTuneConfig cfg, Func<string, bool> expectTrained)
        {
            using var w = FullFineTune.CloneWritable(src, Cpu);
            var before = w.Named().ToDictionary(p => p.Name, p => p.Tensor.ToArray());
            using var model = new LlamaModel(w, Cpu);
            using var method = new FullFineTune(model, cfg);
            using var trainer = new Trainer(model, method, new TrainOptions { MicroBatch = 4, MaxSteps = 2, LearningRate = 1e-2 });
            trainer.Train(samples, Array.Empty<TokenizedSample>(), 0);
            foreach (var (name, t) in w.Named())
            {
                bool changed = !before[name].SequenceEqual(t.ToArray());
                Assert.True(changed == expectTrained(name), $"{name}: changed={changed}");
                Assert.Equal(expectTrained(name), method.Trainable.Any(x => x.Name == name));
            }
            Assert.Equal(w.ParameterCount, method.ParameterCount + method.FrozenCount);
        }
        Check(new FullFineTuneConfig { TopLayers = 1 }, n => n.StartsWith("model.layers.1.", StringComparison.Ordinal));
        Check(new FullFineTuneConfig { Trainable = new[] { "0", "lm_head" } }, n => n.StartsWith("model.layers.0.", StringComparison.Ordinal) || n == "lm_head.weight");
        Check(new FullFineTuneConfig { Trainable = new[] { "mlp" } }, n => n.Contains(".mlp.", StringComparison.Ordinal));
        Assert.Throws<ArgumentException>(() => new FullFineTuneConfig { TopLayers = 3 }.Validate(2));
        Assert.Throws<ArgumentException>(() => new FullFineTuneConfig { Trainable = new[] { "7" } }.Validate(2));
    }
}
