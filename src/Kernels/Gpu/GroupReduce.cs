using ILGPU;

namespace FineTuneNative.Kernels.Gpu;

/// <summary>
/// Warp and group reductions for explicitly grouped kernels with a 1-D group whose size is a multiple of the
/// warp size. The warp size is read from the hardware (32 on NVIDIA, 4 in one of the test simulators).
/// Every thread of the group must call the group reductions (they contain barriers).
/// </summary>
public static class GroupReduce
{
    /// <summary>Largest number of warps in a group these helpers support (shared scratch length).</summary>
    public const int MaxWarps = 64;

    /// <summary>Sum over the warp, returned to every lane.</summary>
    public static float WarpSum(float v)
    {
        for (int o = Warp.WarpSize / 2; o > 0; o /= 2) v += Warp.ShuffleDown(v, o);
        return Warp.Shuffle(v, 0);
    }

    public static double WarpSum(double v)
    {
        for (int o = Warp.WarpSize / 2; o > 0; o /= 2) v += Warp.ShuffleDown(v, o);
        return Warp.Shuffle(v, 0);
    }

    /// <summary>Max over the warp, returned to every lane.</summary>
    public static float WarpMax(float v)
    {
        for (int o = Warp.WarpSize / 2; o > 0; o /= 2) v = MathF.Max(v, Warp.ShuffleDown(v, o));
        return Warp.Shuffle(v, 0);
    }

    /// <summary>Sum over the group, returned to every thread. <paramref name="scratch"/>: shared, ≥ warps per group.</summary>
    public static float Sum(float v, ArrayView<float> scratch)
    {
        v = WarpSum(v);
        if (Warp.IsFirstLane) scratch[Warp.WarpIdx] = v;
        Group.Barrier();
        int warps = Group.DimX / Warp.WarpSize;
        float t = 0;
        for (int w = 0; w < warps; w++) t += scratch[w];
        Group.Barrier(); // scratch may be reused right after
        return t;
    }

    public static double Sum(double v, ArrayView<double> scratch)
    {
        v = WarpSum(v);
        if (Warp.IsFirstLane) scratch[Warp.WarpIdx] = v;
        Group.Barrier();
        int warps = Group.DimX / Warp.WarpSize;
        double t = 0;
        for (int w = 0; w < warps; w++) t += scratch[w];
        Group.Barrier();
        return t;
    }

    /// <summary>Max over the group, returned to every thread.</summary>
    public static float Max(float v, ArrayView<float> scratch)
    {
        v = WarpMax(v);
        if (Warp.IsFirstLane) scratch[Warp.WarpIdx] = v;
        Group.Barrier();
        int warps = Group.DimX / Warp.WarpSize;
        float t = float.NegativeInfinity;
        for (int w = 0; w < warps; w++) t = MathF.Max(t, scratch[w]);
        Group.Barrier();
        return t;
    }
}
