using System.Diagnostics;
using FineTuneNative.Kernels;
using FineTuneNative.Runtime.Inference;
using FineTuneNative.Runtime.IO;

namespace FineTuneNative.Bench;

/// <summary>
/// Prefill and decode throughput of a real model through <see cref="InferenceSession"/> (greedy, KV cache):
/// dotnet run -c Release --project bench -- generate MODEL [NEW_TOKENS=200] [DEVICE=cpu] [PROMPT_TOKENS=64]
/// e.g. MODEL = ../shared/assets/stories260K/stories260K.bin. Best of 5 runs after a warm-up, by wall clock and by
/// process CPU time (on a loaded shared machine the CPU time of a 1-thread run, cpu:1, approximates an idle machine).
/// </summary>
internal static class GenerationThroughput
{
    public static void Run(string[] args)
    {
        if (args.Length < 2) { Console.Error.WriteLine("usage: generate MODEL [NEW_TOKENS] [DEVICE] [PROMPT_TOKENS]"); return; }
        string path = args[1];
        int newTokens = args.Length > 2 ? int.Parse(args[2]) : 200;
        string device = args.Length > 3 ? args[3] : "cpu";
        int promptTokens = args.Length > 4 ? int.Parse(args[4]) : 64;
        using var backend = Backends.Create(device);
        using var model = ModelLoader.Load(path, backend);
        var c = model.Weights.Config;
        int maxSeq = Math.Min(c.MaxPositions, promptTokens + newTokens + 1);
        using var session = new InferenceSession(model.Weights, backend, maxSeq);
        Console.WriteLine($"{path}: {c.NumLayers} layers, C={c.HiddenSize}, V={c.VocabSize}, {model.Weights.ParameterCount:N0} parameters, " +
            $"device {backend.Name}, zero-copy tensors {model.ZeroCopyTensors}");

        // The prompt: BOS then the model's own greedy continuation, so the prefill sees a natural sequence.
        var opts = new GenerationOptions { MaxNewTokens = promptTokens - 1, IgnoreEos = true };
        int bos = c.BosTokenId ?? 1;
        var prompt = new[] { bos }.Concat(Generator.Generate(session, new[] { bos }, opts)).ToArray();

        var proc = Process.GetCurrentProcess();
        double CpuSeconds() { proc.Refresh(); return proc.TotalProcessorTime.TotalSeconds; }
        double bestPrefill = double.MaxValue, bestDecode = double.MaxValue, bestPrefillCpu = double.MaxValue, bestDecodeCpu = double.MaxValue;
        int decoded = 0;
        for (int run = 0; run < 6; run++)
        {
            session.Reset();
            double c0 = CpuSeconds();
            var sw = Stopwatch.StartNew();
            var logits = session.Prefill(prompt);
            double tp = sw.Elapsed.TotalSeconds, cp = CpuSeconds() - c0;
            int next = Sampler.Argmax(logits);
            c0 = CpuSeconds();
            sw.Restart();
            int n = 0;
            while (n < newTokens && session.Position < maxSeq)
            {
                logits = session.Decode(next);
                next = Sampler.Argmax(logits);
                n++;
            }
            double td = sw.Elapsed.TotalSeconds, cd = CpuSeconds() - c0;
            if (run == 0) continue; // warm-up (JIT, page faults of the mapping)
            bestPrefill = Math.Min(bestPrefill, tp);
            bestDecode = Math.Min(bestDecode, td);
            bestPrefillCpu = Math.Min(bestPrefillCpu, cp);
            bestDecodeCpu = Math.Min(bestDecodeCpu, cd);
            decoded = n;
        }
        Console.WriteLine($"prefill {prompt.Length} tokens: {prompt.Length / bestPrefill,10:F0} tokens/s wall ({bestPrefill * 1e3:F2} ms), " +
            $"{prompt.Length / bestPrefillCpu,10:F0} tokens/CPU-s");
        Console.WriteLine($"decode  {decoded} tokens: {decoded / bestDecode,10:F0} tokens/s wall ({bestDecode * 1e3 / Math.Max(1, decoded):F3} ms/token), " +
            $"{decoded / bestDecodeCpu,10:F0} tokens/CPU-s");
    }
}
