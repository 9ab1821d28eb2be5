namespace FineTuneNative.Runtime.Text;

/// <summary>
/// The merge loop every BPE here shares: start from a sequence of symbol ids, repeatedly merge the adjacent pair
/// with the best (lowest) priority, leftmost first on ties, until no adjacent pair can merge.
/// </summary>
/// <remarks>
/// Priority is the merge rank for Hugging Face BPE (merges listed first win) and the negated piece score for
/// SentencePiece / llama2.c BPE (highest score wins). Uses a linked list and a heap with lazy invalidation, so a
/// long word costs O(n log n) rather than llama2.c's O(n²) rescans; the order of merges is the same.
/// </remarks>
internal static class BpeMerger
{
    /// <summary>Decides whether (left, right) merges: its priority (lower first) and the merged symbol id.</summary>
    public delegate bool TryMergeFn(int left, int right, out float priority, out int merged);

    public static void Merge(List<int> symbols, int start, TryMergeFn tryMerge)
    {
        int n = symbols.Count - start;
        if (n < 2) return;
        var ids = new int[n];
        var next = new int[n];
        var prev = new int[n];
        var alive = new bool[n];
        for (int i = 0; i < n; i++) { ids[i] = symbols[start + i]; next[i] = i + 1; prev[i] = i - 1; alive[i] = true; }
        next[n - 1] = -1;

        // Heap entries: (left index, right index, left id, right id); the priority ties break on left index
        // (positions keep their order because a merged symbol keeps the left index).
        var heap = new PriorityQueue<(int L, int R, int LId, int RId, int Merged), (float Priority, int L)>();
        void Push(int l, int r)
        {
            if (l < 0 || r < 0) return;
            if (tryMerge(ids[l], ids[r], out float p, out int m)) heap.Enqueue((l, r, ids[l], ids[r], m), (p, l));
        }
        for (int i = 0; i + 1 < n; i++) Push(i, i + 1);

        while (heap.TryDequeue(out var e, out _))
        {
            if (!alive[e.L] || !alive[e.R] || next[e.L] != e.R || ids[e.L] != e.LId || ids[e.R] != e.RId) continue;
            ids[e.L] = e.Merged;
            alive[e.R] = false;
            next[e.L] = next[e.R];
            if (next[e.R] >= 0) prev[next[e.R]] = e.L;
            Push(prev[e.L], e.L);
            Push(e.L, next[e.L]);
        }
        symbols.RemoveRange(start, n);
        for (int i = 0; i >= 0; i = next[i]) symbols.Add(ids[i]);
    }
}
