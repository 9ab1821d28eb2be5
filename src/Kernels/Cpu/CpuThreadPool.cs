using System.Runtime.ExceptionServices;

namespace FineTuneNative.Kernels.Cpu;

/// <summary>
/// A persistent, allocation-free parallel-for: <c>For(count, body, ctx)</c> runs body(ctx, i, worker) for every
/// i in [0, count) on the calling thread plus (threads - 1) parked workers, handing out indices through one
/// atomic counter (dynamic balance, no per-call allocation: the body is a function pointer and its context a
/// pointer to a struct on the caller's stack, which stays alive because the caller waits).
/// </summary>
/// <remarks>
/// <c>worker</c> is in [0, Threads) and names the thread, so bodies can use per-thread scratch without locks.
/// Not re-entrant: a body must not call <see cref="For"/> again. Calls from several threads are serialized.
/// </remarks>
internal sealed unsafe class CpuThreadPool : IDisposable
{
    private readonly Thread[] _workers;
    private readonly object _gate = new();
    private readonly object _submit = new();
    private readonly ManualResetEventSlim _done = new(false, 64);
    private long _generation;
    private bool _stop;

    // the current job
    private delegate*<void*, int, int, void> _body;
    private void* _ctx;
    private int _count;
    private int _next;
    private int _active;
    private Exception? _error;
    // per worker: GC.GetAllocatedBytesForCurrentThread() as of the end of its last job (allocation tests)
    private readonly long[] _workerAllocated;

    public CpuThreadPool(int threads)
    {
        Threads = Math.Max(1, threads);
        _workers = new Thread[Threads - 1];
        _workerAllocated = new long[Threads];
        // ManualResetEventSlim creates its lock object (24 B) the first time a Wait actually blocks: on a loaded machine
        // that could be inside a training step long after warm-up (seen once as "24 B in one window" by the step
        // allocation tests). A timed wait on the unset event creates it now, once.
        _done.Wait(1);
        for (int w = 0; w < _workers.Length; w++)
        {
            int id = w + 1;
            _workers[w] = new Thread(() => WorkerLoop(id)) { IsBackground = true, Name = $"ftn-cpu-{id}" };
            _workers[w].Start();
        }
    }

    public int Threads { get; }

    /// <summary>Runs body(ctx, i, worker) for i in [0, count); returns when all are done.</summary>
    public void For(int count, delegate*<void*, int, int, void> body, void* ctx)
    {
        if (count <= 0) return;
        if (count == 1 || _workers.Length == 0)
        {
            for (int i = 0; i < count; i++) body(ctx, i, 0);
            return;
        }
        lock (_submit)
        {
            _body = body; _ctx = ctx; _count = count; _next = 0; _error = null;
            _active = _workers.Length;
            _done.Reset();
            lock (_gate)
            {
                _generation++;
                Monitor.PulseAll(_gate);
            }
            RunChunks(0);
            _done.Wait();
            _body = null; _ctx = null;
            if (_error != null) ExceptionDispatchInfo.Capture(_error).Throw();
        }
    }

    private void RunChunks(int worker)
    {
        try
        {
            int i;
            while ((i = Interlocked.Increment(ref _next) - 1) < _count) _body(_ctx, i, worker);
        }
        catch (Exception e)
        {
            Interlocked.CompareExchange(ref _error, e, null);
            Volatile.Write(ref _next, int.MaxValue / 2); // stop handing out work
        }
    }

    private void WorkerLoop(int id)
    {
        long seen = 0;
        while (true)
        {
            lock (_gate)
            {
                while (_generation == seen && !_stop) Monitor.Wait(_gate);
                if (_stop) return;
                seen = _generation;
            }
            RunChunks(id);
            Volatile.Write(ref _workerAllocated[id], GC.GetAllocatedBytesForCurrentThread());
            if (Interlocked.Decrement(ref _active) == 0) _done.Set();
        }
    }

    /// <summary>
    /// Bytes allocated so far by the pool's worker threads (not the calling thread), as of the end of the last job
    /// each took part in. With the caller's <see cref="GC.GetAllocatedBytesForCurrentThread"/> it counts exactly the
    /// threads that run a step, which the process-wide counter cannot (runtime threads allocate there too).
    /// </summary>
    public long WorkerAllocatedBytes()
    {
        long sum = 0;
        for (int w = 1; w < _workerAllocated.Length; w++) sum += Volatile.Read(ref _workerAllocated[w]);
        return sum;
    }

    public void Dispose()
    {
        lock (_gate) { _stop = true; Monitor.PulseAll(_gate); }
        foreach (var t in _workers) t.Join();
        _done.Dispose();
    }
}
