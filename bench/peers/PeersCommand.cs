namespace FineTuneNative.Bench.Peers;

/// <summary>
/// <c>peers gemm|train|train-ftn|all</c>: ftn against its CPU peers in one run (see docs/PERFORMANCE.md and bench/peers/run.sh).
/// </summary>
internal static class PeersCommand
{
    public static int Run(string[] args)
    {
        string what = args.Length > 1 ? args[1] : "all";
        switch (what)
        {
            case "gemm": return GemmPeer.Run(args);
            case "gemm-bf16": return GemmBf16Peer.Run(args);
            case "train": return TrainPeer.RunAll(args);
            case "train-ftn": return TrainPeer.RunFtn(args);
            case "all":
                string threads = args.Length > 2 ? args[2] : "2";
                int g = GemmPeer.Run(new[] { "peers", "gemm", threads });
                Console.WriteLine();
                int t = TrainPeer.RunAll(new[] { "peers", "train", threads });
                return Math.Max(g == 2 ? 0 : g, t);
            case "generate": return GenerationPeer.Run(args);
            case "generate-check": return GenerationPeer.Check(args);
            case "prefill-gemm": return GenerationPeer.PrefillGemm(args);
            default:
                Console.Error.WriteLine($"peers: unknown mode '{what}' (expected gemm, gemm-bf16, train, train-ftn, all, generate or generate-check)");
                return 1;
        }
    }
}
