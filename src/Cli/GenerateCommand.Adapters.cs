using FineTuneNative.Kernels;

namespace FineTuneNative.Cli;

// `ftn generate --adapter DIR` with a prompt-tuning, prefix-tuning or bottleneck adapter (applied by the session).
public static partial class GenerateCommand
{
    /// <summary>Runs an adapter file operation, turning a bad file into a one-line user error naming the directory.</summary>
    private static T Wrap<T>(string adapter, Func<T> f)
    {
        try { return f(); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException or InvalidDataException or ArgumentException)
        {
            throw new UserError($"adapter '{adapter}': {Program.OneLine(e.Message)}");
        }
    }

    /// <summary>Disposes the adapter tensors uploaded for the session once generation is over.</summary>
    private sealed class DisposeAll(List<Tensor>? tensors) : IDisposable
    {
        public void Dispose() => tensors?.ForEach(t => t.Dispose());
    }
}
