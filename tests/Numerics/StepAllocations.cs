using FineTuneNative.Kernels.Cpu;

namespace FineTuneNative.Tests.Numerics;

/// <summary>
/// Allocation counts of a step on the cpu backend, taken on the threads that run it: the calling thread plus the
/// backend's pool workers (each records its own counter at the end of every job). The whole-process counter is
/// returned alongside for the report only: on a loaded machine the runtime's own threads allocate a few hundred
/// bytes now and then, which says nothing about the step.
/// </summary>
internal static class StepAllocations
{
    /// <summary>Bytes allocated by the step's threads in each of <paramref name="windows"/> windows of <paramref name="steps"/> calls of <paramref name="step"/>.</summary>
    public static (long[] StepThreads, long[] Process) Count(CpuBackend cpu, int windows, int steps, Action<int> step)
    {
        var pool = cpu.Pool;
        var mine = new long[windows];
        var process = new long[windows];
        for (int wi = 0; wi < windows; wi++)
        {
            long beforeAll = GC.GetTotalAllocatedBytes(precise: true);
            long before = GC.GetAllocatedBytesForCurrentThread() + pool.WorkerAllocatedBytes();
            for (int s = 0; s < steps; s++) step(s);
            mine[wi] = GC.GetAllocatedBytesForCurrentThread() + pool.WorkerAllocatedBytes() - before;
            process[wi] = GC.GetTotalAllocatedBytes(precise: true) - beforeAll;
        }
        return (mine, process);
    }
}
