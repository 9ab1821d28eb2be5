using System.Globalization;
using CommandLine;
using FineTuneNative.Kernels;

namespace FineTuneNative.Cli;

/// <summary>Options every compute command shares: where to run.</summary>
public abstract class DeviceOptions
{
    [Option("device", Default = "cpu", MetaValue = "DEV",
        HelpText = "Where to compute: cpu, cpu:THREADS, cuda or cuda:N (ILGPU's CUDA accelerator N).")]
    public string Device { get; set; } = "cpu";

    [Option("threads", MetaValue = "N",
        HelpText = "CPU worker threads (default: all cores). Same as --device cpu:N.")]
    public int? Threads { get; set; }

    [Option("compute", Default = "f32", MetaValue = "PREC",
        HelpText = "Precision of the matmul products on the cpu device: f32 (default) or bf16 (activations and weights rounded to bf16, f32 accumulation, as PyTorch bf16 autocast; forward and input-gradient products on AVX512_BF16 CPUs, weight gradients stay f32).")]
    public string Compute { get; set; } = "f32";
}

internal static class CliCommon
{
    /// <summary>Creates the backend named by --device / --threads; a bad name is a one-line user error.</summary>
    public static IBackend CreateBackend(DeviceOptions o)
    {
        string device = o.Device.Trim();
        if (o.Threads is int n)
        {
            if (n <= 0) throw new UserError($"--threads must be > 0 (got {n})");
            if (!device.Equals("cpu", StringComparison.OrdinalIgnoreCase))
                throw new UserError($"--threads applies to the cpu device only (got --device {device})");
            device = $"cpu:{n}";
        }
        if (device.StartsWith("cuda", StringComparison.OrdinalIgnoreCase) && !Backends.CudaAvailable())
            throw new UserError($"--device {device}: no CUDA device found (ILGPU sees none); use --device cpu");
        string compute = o.Compute.Trim().ToLowerInvariant();
        if (compute is not ("f32" or "bf16")) throw new UserError($"--compute must be f32 or bf16 (got '{o.Compute}')");
        IBackend backend;
        try { backend = Backends.Create(device); }
        catch (ArgumentException e) { throw new UserError($"--device: {e.Message}"); }
        if (compute == "bf16")
        {
            if (backend is not Kernels.Cpu.CpuBackend cpu)
            {
                backend.Dispose();
                throw new UserError($"--compute bf16 applies to the cpu device only (got --device {device})");
            }
            cpu.MatMulCompute = DType.BF16;
            if (!Kernels.Cpu.CpuBackend.Bf16ComputeAvailable)
                Console.Error.WriteLine($"ftn: note: --compute bf16 runs the f32 products here ({Kernels.Cpu.CpuBackend.Bf16ComputeUnavailableReason})");
        }
        return backend;
    }

    /// <summary>"1.2M", "834.5K", "12"</summary>
    public static string Count(long n) => n switch
    {
        >= 1_000_000_000 => (n / 1e9).ToString("0.##", CultureInfo.InvariantCulture) + "B",
        >= 1_000_000 => (n / 1e6).ToString("0.##", CultureInfo.InvariantCulture) + "M",
        >= 10_000 => (n / 1e3).ToString("0.#", CultureInfo.InvariantCulture) + "K",
        _ => n.ToString(CultureInfo.InvariantCulture),
    };

    public static string Bytes(long n) => n switch
    {
        >= 1L << 30 => (n / (double)(1L << 30)).ToString("0.##", CultureInfo.InvariantCulture) + " GiB",
        >= 1L << 20 => (n / (double)(1L << 20)).ToString("0.##", CultureInfo.InvariantCulture) + " MiB",
        >= 1L << 10 => (n / (double)(1L << 10)).ToString("0.#", CultureInfo.InvariantCulture) + " KiB",
        _ => n.ToString(CultureInfo.InvariantCulture) + " B",
    };

    /// <summary>"1:02:03", "4:05", "0:07"</summary>
    public static string Duration(TimeSpan t)
    {
        if (t < TimeSpan.Zero || t.TotalDays > 99) return "--:--";
        return t.TotalHours >= 1 ? $"{(int)t.TotalHours}:{t.Minutes:00}:{t.Seconds:00}" : $"{t.Minutes}:{t.Seconds:00}";
    }

    public static string F(double v, string fmt = "0.0000") => v.ToString(fmt, CultureInfo.InvariantCulture);

    /// <summary>A file the user named that must exist; a missing one is a one-line error naming it.</summary>
    public static string RequireFile(string path, string what)
    {
        if (!File.Exists(path))
            throw new UserError(Directory.Exists(path) ? $"{what} '{path}' is a directory, expected a file" : $"{what} '{path}' not found");
        return Path.GetFullPath(path);
    }

    /// <summary>A model path the user named: a directory or a file that must exist.</summary>
    public static string RequireModelPath(string path)
    {
        if (!File.Exists(path) && !Directory.Exists(path)) throw new UserError($"model '{path}' not found (expected a Hugging Face model directory or a checkpoint file)");
        return Path.GetFullPath(path);
    }

    public static string RequireDirectory(string path, string what)
    {
        if (!Directory.Exists(path)) throw new UserError(File.Exists(path) ? $"{what} '{path}' is a file, expected a directory" : $"{what} '{path}' not found");
        return Path.GetFullPath(path);
    }

    /// <summary>
    /// Writes a whole output directory atomically: <paramref name="write"/> fills a fresh temporary sibling
    /// directory, which then replaces <paramref name="dir"/> (an existing one is moved aside first and deleted
    /// after the rename). A failure leaves the previous contents of <paramref name="dir"/> untouched.
    /// </summary>
    public static void WriteDirectoryAtomic(string dir, Action<string> write)
    {
        dir = Path.GetFullPath(dir.TrimEnd('/', '\\'));
        if (File.Exists(dir)) throw new UserError($"output '{dir}' is a file, expected a directory");
        string parent = Path.GetDirectoryName(dir) ?? ".";
        Directory.CreateDirectory(parent);
        string name = Path.GetFileName(dir);
        string tmp = Path.Combine(parent, $".{name}.tmp-{Environment.ProcessId}");
        string old = Path.Combine(parent, $".{name}.old-{Environment.ProcessId}");
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        try
        {
            write(tmp);
            if (Directory.Exists(dir)) Directory.Move(dir, old);
            Directory.Move(tmp, dir);
            if (Directory.Exists(old)) Directory.Delete(old, true);
        }
        catch
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
            if (!Directory.Exists(dir) && Directory.Exists(old)) Directory.Move(old, dir);
            throw;
        }
    }

    /// <summary>Writes a text file through a temporary name and a rename.</summary>
    public static void WriteFileAtomic(string path, Action<TextWriter> write)
    {
        path = Path.GetFullPath(path);
        if (Directory.Exists(path)) throw new UserError($"output '{path}' is a directory, expected a file");
        string? parent = Path.GetDirectoryName(path);
        if (!string.IsNullOrEmpty(parent)) Directory.CreateDirectory(parent);
        string tmp = path + $".tmp-{Environment.ProcessId}";
        try
        {
            using (var w = new StreamWriter(tmp, false, new System.Text.UTF8Encoding(false)) { NewLine = "\n" })
                write(w);
            File.Move(tmp, path, overwrite: true);
        }
        catch
        {
            if (File.Exists(tmp)) File.Delete(tmp);
            throw;
        }
    }
}

/// <summary>
/// Finds what ships in the repository: the embedded model (models/ftn-tiny) and the sample dataset (data/).
/// Looked up from the current directory and from the ftn binary's directory, walking up to the repo root.
/// </summary>
internal static class EmbeddedDefault
{
    public const string ModelRelative = "models/ftn-tiny";
    public const string DataRelative = "data/count-plus-one.jsonl";

    public static string? TryFindRoot()
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (var d = new DirectoryInfo(start); d is not null; d = d.Parent)
                if (File.Exists(Path.Combine(d.FullName, ModelRelative, "config.json"))) return d.FullName;
        }
        return null;
    }

    public static string Root => TryFindRoot() ?? throw new UserError(
        $"the embedded model ({ModelRelative}) was not found above the current directory or the ftn binary; run from the repository or pass --model");

    public static string ModelPath => Path.Combine(Root, ModelRelative);
    public static string DataPath => Path.Combine(Root, DataRelative);
}
