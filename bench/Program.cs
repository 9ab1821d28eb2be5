using BenchmarkDotNet.Running;

namespace FineTuneNative.Bench;

public static class Program
{
    public static void Main(string[] args)
    {
        if (args.Length > 0 && args[0] == "quick") { Quick.Run(args); return; }
        if (args.Length > 0 && args[0] == "gpu") { Environment.ExitCode = GpuBench.Run(args); return; }
        if (args.Length > 0 && args[0] == "generate") { GenerationThroughput.Run(args); return; }
        if (args.Length > 0 && args[0] == "quick-gemm") { Variants.GemmVariants.Run(args); return; }
        if (args.Length > 0 && args[0] == "quick-head") { Variants.GemmVariants.RunHead(args); return; }
        if (args.Length > 0 && args[0] == "quick-lora") { Variants.GemmVariants.RunLora(args); return; }
        if (args.Length > 0 && args[0] == "quick-f16gemv") { Variants.MatVecF16Variants.Run(args); return; }
        if (args.Length > 0 && args[0] == "peers") { Environment.ExitCode = Peers.PeersCommand.Run(args); return; }
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
    }
}
