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
            default:
                Console.Error.WriteLine($"peers: unknown mode '{what}' (expected gemm, train, train-ftn or all)");
                return 1;
        }
    }
}
