using System.Runtime.InteropServices;

namespace FineTuneNative.Bench.Peers;

/// <summary>
/// OpenBLAS's cblas_sgemm, loaded at run time from Debian's libopenblas (never a dependency of ftn): the peer of the
/// CPU GEMM, called in the same process on the same buffers. <see cref="TryLoad"/> prefers the OpenMP build
/// (libopenblas0-openmp), as the issue asks, then the pthread build, then whatever libopenblas.so.0 resolves to.
/// </summary>
public sealed unsafe class OpenBlas
{
    public const int RowMajor = 101, NoTrans = 111, Trans = 112;

    /// <summary>Where Debian puts the two builds (multiarch path of x86-64).</summary>
    public static readonly string[] Candidates =
    {
        "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "libopenblas.so.0",
    };

    private readonly delegate* unmanaged<int, int, int, int, int, int, float, float*, int, float*, int, float, float*, int, void> _sgemm;
    private readonly delegate* unmanaged<int, void> _setThreads;
    private readonly delegate* unmanaged<byte*> _config;

    private OpenBlas(string path, nint handle)
    {
        Path = path;
        _sgemm = (delegate* unmanaged<int, int, int, int, int, int, float, float*, int, float*, int, float, float*, int, void>)NativeLibrary.GetExport(handle, "cblas_sgemm");
        _setThreads = NativeLibrary.TryGetExport(handle, "openblas_set_num_threads", out nint st) ? (delegate* unmanaged<int, void>)st : null;
        _config = NativeLibrary.TryGetExport(handle, "openblas_get_config", out nint cf) ? (delegate* unmanaged<byte*>)cf : null;
    }

    /// <summary>The file that was loaded.</summary>
    public string Path { get; }

    /// <summary>openblas_get_config(): version, build options and the core it dispatched to.</summary>
    public string Config => _config != null ? Marshal.PtrToStringAnsi((nint)_config()) ?? "?" : "?";

    private static OpenBlas? _loaded;
    private static string? _why;

    /// <summary>Loads OpenBLAS once; null with <paramref name="why"/> set when no candidate loads.</summary>
    public static OpenBlas? TryLoad(out string why)
    {
        if (_loaded is not null || _why is not null) { why = _why ?? ""; return _loaded; }
        var tried = new List<string>();
        foreach (var path in Candidates)
        {
            if (NativeLibrary.TryLoad(path, out nint h))
            {
                if (NativeLibrary.TryGetExport(h, "cblas_sgemm", out _)) { _loaded = new OpenBlas(path, h); _why = ""; break; }
                tried.Add(path + " (no cblas_sgemm)");
            }
            else tried.Add(path);
        }
        _why = _loaded is null
            ? "OpenBLAS not found (tried " + string.Join(", ", tried) + "); install it with: apt-get install -y libopenblas0-openmp"
            : "";
        why = _why;
        return _loaded;
    }

    /// <summary>openblas_set_num_threads(n) (for the OpenMP build this sets its OpenMP team size).</summary>
    public void SetThreads(int n)
    {
        if (_setThreads != null) _setThreads(n);
    }

    /// <summary>Row-major C(M,N) = alpha·op(A)·op(B) + beta·C.</summary>
    public void Sgemm(bool transA, bool transB, int m, int n, int k, float alpha, float* a, int lda, float* b, int ldb, float beta, float* c, int ldc) =>
        _sgemm(RowMajor, transA ? Trans : NoTrans, transB ? Trans : NoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
