namespace FineTuneNative.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        Console.Error.WriteLine("ftn: not built yet");
        return 1;
    }
}
