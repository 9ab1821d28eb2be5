namespace FineTuneNative.Kernels;

/// <summary>
/// Counter-based random numbers for dropout: the keep/drop decision of element i under a given seed is a
/// pure function of (seed, i), so every backend (CPU, ILGPU simulator, CUDA) draws the same mask and the
/// backward pass can regenerate it instead of storing it.
/// </summary>
public static class DropoutHash
{
    /// <summary>A 32-bit mix of (seed, index) (splitmix64 finaliser). Usable inside ILGPU kernels.</summary>
    public static uint Hash(ulong seed, long index)
    {
        ulong z = seed + 0x9E3779B97F4A7C15UL * (ulong)(index + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        z ^= z >> 31;
        return (uint)(z >> 32);
    }

    /// <summary>Uniform in [0, 1) from the top 24 bits of the hash.</summary>
    public static float Uniform(ulong seed, long index) => (Hash(seed, index) >> 8) * (1.0f / 16777216.0f);

    /// <summary>True when element <paramref name="index"/> is kept under drop probability <paramref name="p"/>.</summary>
    public static bool Keep(ulong seed, long index, float p) => Uniform(seed, index) >= p;
}
