using System.Diagnostics;

namespace FineTuneNative.Runtime.Inference;

/// <summary>
/// A fixed team of threads that run one body together in lockstep (the calling thread is worker 0), meeting at
/// spin barriers between dependent phases, the way ggml's graph executor does. A decode step has ~4 phases per
/// layer and each is only microseconds of work, so waking parked threads per phase (what a general pool does)
/// would cost more than the work; spinning with yields keeps the hand-off under a microsecond on an idle core
/// and gives the core away when the machine is oversubscribed.
/// </summary>
/// <remarks>
/// Allocation-free per run: the body is a function pointer and its context a pointer the caller keeps alive.
/// Between runs the workers spin for <see cref="IdleSpinTicks"/> and then park on a monitor. A body must not
/// throw (validate before <see cref="Run"/>): a worker that left the lockstep would hang the others.
/// </remarks>
internal sealed unsafe class SpinTeam : IDisposable
{
    private readonly Thread[] _workers;
    private readonly object _gate = new();
    private readonly long[] _phase;          // per worker, 128 bytes apart (no false sharing)
    private long _generation;
    private int _sleepers;
    private volatile bool _stop;
    private delegate*<void*, int, void> _body;
    private void* _ctx;

    // barrier state
    private int _arrived;
    private long _barrierPhase;

    /// <summary>About 2 ms of spinning before a worker parks between runs (sampling between decode steps is shorter).</summary>
    private static readonly long IdleSpinTicks = Stopwatch.Frequency / 500;

    public SpinTeam(int threads)
    {
        Threads = Math.Max(1, threads);
        _phase = new long[Threads * 16];
        _workers = new Thread[Threads - 1];
        for (int i = 0; i < _workers.Length; i++)
        {
            int id = i + 1;
            _workers[i] = new Thread(() => WorkerLoop(id)) { IsBackground = true, Name = $"ftn-decode-{id}" };
            _workers[i].Start();
        }
    }

    public int Threads { get; }

    /// <summary>Runs body(ctx, worker) on every worker and returns when all have finished.</summary>
    public void Run(delegate*<void*, int, void> body, void* ctx)
    {
        if (Threads == 1) { body(ctx, 0); return; }
        _body = body;
        _ctx = ctx;
        Interlocked.Increment(ref _generation);
        if (Volatile.Read(ref _sleepers) > 0)
            lock (_gate) Monitor.PulseAll(_gate);
        body(ctx, 0);
        Barrier(0);
    }

    /// <summary>Waits until every worker has reached this barrier.</summary>
    public void Barrier(int worker)
    {
        if (Threads == 1) return;
        long target = _phase[worker * 16] + 1;
        _phase[worker * 16] = target;
        if (Interlocked.Increment(ref _arrived) == Threads)
        {
            _arrived = 0;
            Volatile.Write(ref _barrierPhase, target);
            return;
        }
        var spin = new SpinWait();
        while (Volatile.Read(ref _barrierPhase) != target) spin.SpinOnce(sleep1Threshold: -1);
    }

    private void WorkerLoop(int id)
    {
        long seen = 0;
        while (true)
        {
            long start = Stopwatch.GetTimestamp();
            var spin = new SpinWait();
            while (Volatile.Read(ref _generation) == seen && !_stop)
            {
                if (Stopwatch.GetTimestamp() - start < IdleSpinTicks) { spin.SpinOnce(sleep1Threshold: -1); continue; }
                lock (_gate)
                {
                    Interlocked.Increment(ref _sleepers);
                    while (Volatile.Read(ref _generation) == seen && !_stop) Monitor.Wait(_gate);
                    Interlocked.Decrement(ref _sleepers);
                }
            }
            if (_stop) return;
            seen = Volatile.Read(ref _generation);
            _body(_ctx, id);
            Barrier(id);
        }
    }

    public void Dispose()
    {
        _stop = true;
        lock (_gate) Monitor.PulseAll(_gate);
        foreach (var t in _workers) t.Join();
    }
}
