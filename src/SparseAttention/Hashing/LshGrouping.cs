using static TorchSharp.torch;

namespace SparseAttention.Hashing;

/// <summary>
/// The groups of one multi-round LSH forward, in the layout <see cref="Kernels.GroupedAttention.MergedAttention(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, bool, bool, Tensor?, Tensor?, Tensor?, bool, double?, Kernels.AttentionKernel)"/>
/// takes: G = Rounds · GroupsPerRound groups, round r owning groups [r·GroupsPerRound, (r + 1)·GroupsPerRound).
/// </summary>
/// <param name="QueryIndices">(B, H, G, Wq) int64 query positions of each group, −1 = empty slot.</param>
/// <param name="KeyIndices">(B, H, G, Wk) int64 key positions of each group, −1 = empty slot.</param>
/// <param name="PreviousGroup">(B, H, G) int64: the group whose keys each group also attends (same round), −1 = none.</param>
/// <param name="Rounds">Hash rounds R.</param>
public sealed record LshGroups(Tensor QueryIndices, Tensor KeyIndices, Tensor PreviousGroup, int Rounds)
{
    /// <summary>Groups per round.</summary>
    public long GroupsPerRound => QueryIndices.shape[2] / Rounds;
}

/// <summary>
/// Turns per-round buckets into chunks (Reformer, Kitaev et al. 2020, arXiv 2001.04451 §2–3). Built on the CPU with
/// plain loops (it is a sort and a walk), then handed to the kernels as index tensors.
/// </summary>
/// <remarks>
/// <para>Padding (keyMask false) is in no group: it is never attended and its output is zero.</para>
/// <para><b>Bidirectional</b> (the paper's): per round, queries are sorted by (query bucket, position) and keys by
/// (key bucket, position) — the same order when queries and keys share their buckets — and both lists are cut into
/// ⌈T / W⌉ chunks of W; chunk c's queries attend chunk c's keys and chunk c − 1's (no wrap-around). A chunk may span
/// several buckets.</para>
/// <para><b>Causal</b>: chunking the globally sorted list would leak the future — how many LATER tokens fell into
/// lower buckets decides where the chunk boundaries fall, i.e. which earlier tokens share a chunk. So each bucket is
/// chunked on its own: a key's chunk is ⌊rank / W⌋ with rank = number of earlier real keys in its bucket, and a query
/// at position i joins the chunk holding the latest key at a position ≤ i in the query's bucket (with shared QK: the
/// chunk of its own key), attending that chunk and the bucket's previous chunk — at least the W most recent keys of
/// its bucket. All of it depends only on tokens ≤ i. Chunks never span buckets in this mode.</para>
/// </remarks>
public static class LshGrouping
{
    /// <param name="queryBuckets">(B, H, R, T) int64 bucket of each query per round.</param>
    /// <param name="keyBuckets">(B, H, R, T) int64 bucket of each key per round (the same tensor with shared QK).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token.</param>
    /// <param name="chunkSize">W, the chunk length (<c>bucket_size</c>); capped at T.</param>
    /// <param name="causal">Causal chunking (see remarks).</param>
    public static LshGroups Build(Tensor queryBuckets, Tensor keyBuckets, Tensor? keyMask, int chunkSize, bool causal)
    {
        Check.Shape(queryBuckets, nameof(queryBuckets), "(B, H, R, T)", -1, -1, -1, -1);
        Check.Shape(keyBuckets, nameof(keyBuckets), "(B, H, R, T)", queryBuckets.shape[0], queryBuckets.shape[1], queryBuckets.shape[2], queryBuckets.shape[3]);
        Check.That(queryBuckets.dtype == ScalarType.Int64 && keyBuckets.dtype == ScalarType.Int64, nameof(queryBuckets), "buckets must be int64 tensors.");
        Check.Positive(chunkSize, nameof(chunkSize));
        int batch = (int)queryBuckets.shape[0], heads = (int)queryBuckets.shape[1], rounds = (int)queryBuckets.shape[2], seqLen = (int)queryBuckets.shape[3];
        Check.KeyMask(keyMask, batch, seqLen);
        Check.Positive(rounds, "rounds");
        Check.Positive(seqLen, "T");
        int w = Math.Min(chunkSize, seqLen);
        long[] qb = queryBuckets.cpu().contiguous().data<long>().ToArray();
        long[] kb = ReferenceEquals(queryBuckets, keyBuckets) ? qb : keyBuckets.cpu().contiguous().data<long>().ToArray();
        bool[]? real = keyMask?.cpu().contiguous().data<bool>().ToArray();

        int units = batch * heads * rounds;
        var perUnit = new Chunks[units];
        Parallel.For(0, units, u =>
        {
            int b = u / (heads * rounds);
            long offset = (long)u * seqLen;
            var positions = RealPositions(real, b, seqLen);
            perUnit[u] = causal ? CausalChunks(qb, kb, offset, positions, w) : SortedChunks(qb, kb, offset, positions, w);
        });

        int groupsPerRound = Math.Max(1, perUnit.Max(p => p.Count));
        int wq = Math.Max(1, perUnit.Max(p => MaxLength(p.QueryStart)));
        int wk = Math.Max(1, perUnit.Max(p => MaxLength(p.KeyStart)));
        int groups = rounds * groupsPerRound;
        // Filled in place in libtorch's memory: no managed copies (large arrays would be fresh, page-faulting memory each call).
        var qi = full(new long[] { batch, heads, groups, wq }, -1L, dtype: ScalarType.Int64);   // (B, H, G, Wq)
        var ki = full(new long[] { batch, heads, groups, wk }, -1L, dtype: ScalarType.Int64);   // (B, H, G, Wk)
        var prev = full(new long[] { batch, heads, groups }, -1L, dtype: ScalarType.Int64);     // (B, H, G)
        unsafe
        {
            long* qiData = (long*)Kernels.FusedBlockSparseAttention.Pointer(qi);
            long* kiData = (long*)Kernels.FusedBlockSparseAttention.Pointer(ki);
            long* prevData = (long*)Kernels.FusedBlockSparseAttention.Pointer(prev);
            for (int u = 0; u < units; u++)
            {
                int bh = u / rounds, r = u % rounds;
                var c = perUnit[u];
                for (int g = 0; g < c.Count; g++)
                {
                    long group = (long)bh * groups + r * groupsPerRound + g;
                    for (int s = c.QueryStart[g]; s < c.QueryStart[g + 1]; s++) qiData[group * wq + s - c.QueryStart[g]] = c.QueryPos[s];
                    for (int s = c.KeyStart[g]; s < c.KeyStart[g + 1]; s++) kiData[group * wk + s - c.KeyStart[g]] = c.KeyPos[s];
                    prevData[group] = c.Previous[g] < 0 ? -1 : r * groupsPerRound + c.Previous[g];
                }
            }
        }
        return new LshGroups(qi.to(queryBuckets.device), ki.to(queryBuckets.device), prev.to(queryBuckets.device), rounds);
    }

    /// <summary>The chunks of one (batch, head, round): chunk c holds queries QueryPos[QueryStart[c] .. QueryStart[c + 1])
    /// and keys KeyPos[KeyStart[c] .. KeyStart[c + 1]) (positions), and also attends the keys of chunk Previous[c] (−1 = none).</summary>
    private sealed record Chunks(int[] QueryPos, int[] QueryStart, int[] KeyPos, int[] KeyStart, int[] Previous)
    {
        public int Count => Previous.Length;
    }

    private static int MaxLength(int[] starts)
    {
        int max = 0;
        for (int c = 0; c + 1 < starts.Length; c++) max = Math.Max(max, starts[c + 1] - starts[c]);
        return max;
    }

    private static int[] RealPositions(bool[]? real, int b, int seqLen)
    {
        if (real is null) return Enumerable.Range(0, seqLen).ToArray();
        var positions = new List<int>(seqLen);
        for (int t = 0; t < seqLen; t++) if (real[(long)b * seqLen + t]) positions.Add(t);
        return [.. positions];
    }

    /// <summary>Positions (ascending) ordered by (bucket, position): a stable counting sort by bucket when the buckets
    /// span a small range (hash buckets do), else a sort of (bucket, position) packed into one integer.</summary>
    private static int[] SortByBucket(long[] buckets, long offset, int[] positions, int seqLen)
    {
        var sorted = new int[positions.Length];
        if (positions.Length == 0) return sorted;
        long min = long.MaxValue, max = long.MinValue;
        foreach (int t in positions) { long b = buckets[offset + t]; min = Math.Min(min, b); max = Math.Max(max, b); }
        if (max - min <= 2L * positions.Length + 64)
        {
            var start = new int[max - min + 2];
            foreach (int t in positions) start[buckets[offset + t] - min + 1]++;
            for (long b = 1; b < start.Length; b++) start[b] += start[b - 1];
            foreach (int t in positions) sorted[start[buckets[offset + t] - min]++] = t;   // positions ascend: stable
            return sorted;
        }
        // Wide bucket range (e.g. many sign-hash bits): rank the distinct buckets, then sort packed (rank, position) keys.
        var packed = new long[positions.Length];
        for (int i = 0; i < positions.Length; i++) packed[i] = buckets[offset + positions[i]];
        var distinct = packed.Distinct().Order().ToArray();
        for (int i = 0; i < positions.Length; i++) packed[i] = (long)Array.BinarySearch(distinct, packed[i]) * seqLen + positions[i];
        Array.Sort(packed);
        for (int i = 0; i < positions.Length; i++) sorted[i] = (int)(packed[i] % seqLen);
        return sorted;
    }

    private static Chunks SortedChunks(long[] qb, long[] kb, long offset, int[] positions, int w)
    {
        int seqLen = positions.Length == 0 ? 1 : positions[^1] + 1;
        var queries = SortByBucket(qb, offset, positions, seqLen);
        var keys = ReferenceEquals(qb, kb) ? queries : SortByBucket(kb, offset, positions, seqLen);
        int chunks = (positions.Length + w - 1) / w;
        var starts = new int[chunks + 1];
        var previous = new int[chunks];
        for (int c = 0; c < chunks; c++) { starts[c + 1] = Math.Min(positions.Length, (c + 1) * w); previous[c] = c - 1; }
        return new Chunks(queries, starts, keys, starts, previous);
    }

    private static Chunks CausalChunks(long[] qb, long[] kb, long offset, int[] positions, int w)
    {
        int seqLen = positions.Length == 0 ? 1 : positions[^1] + 1;
        var keys = SortByBucket(kb, offset, positions, seqLen);                          // bucket-major, then position
        var keyStart = new List<int> { 0 };
        var previous = new List<int>();
        var segments = new Dictionary<long, (int Chunk, int Start, int Count)>();
        for (int s = 0; s < keys.Length;)
        {
            long bucket = kb[offset + keys[s]];
            int start = s;
            while (s < keys.Length && kb[offset + keys[s]] == bucket) s++;
            segments[bucket] = (previous.Count, start, s - start);
            for (int c = start; c < s; c += w)
            {
                keyStart.Add(Math.Min(s, c + w));
                previous.Add(c == start ? -1 : previous.Count - 1);
            }
        }
        // Each query joins the chunk holding the latest key of its bucket at a position ≤ its own (none: no chunk).
        var chunkOf = new int[positions.Length];
        var queryCount = new int[previous.Count + 1];
        for (int i = 0; i < positions.Length; i++)
        {
            int t = positions[i];
            chunkOf[i] = -1;
            if (!segments.TryGetValue(qb[offset + t], out var seg)) continue;              // no key of its bucket at all
            // n = keys of this bucket at positions ≤ t (the segment is sorted by position).
            int lo = 0, hi = seg.Count;
            while (lo < hi) { int mid = (lo + hi) / 2; if (keys[seg.Start + mid] <= t) lo = mid + 1; else hi = mid; }
            if (lo == 0) continue;                                                       // no key of its bucket yet: nothing to attend
            chunkOf[i] = seg.Chunk + (lo - 1) / w;
            queryCount[chunkOf[i] + 1]++;
        }
        for (int c = 1; c < queryCount.Length; c++) queryCount[c] += queryCount[c - 1];
        var queryStart = (int[])queryCount.Clone();
        var queryPos = new int[queryCount[^1]];
        for (int i = 0; i < positions.Length; i++)                                      // positions ascend: slots stay in position order
            if (chunkOf[i] >= 0) queryPos[queryCount[chunkOf[i]]++] = positions[i];
        return new Chunks(queryPos, queryStart, keys, [.. keyStart], [.. previous]);
    }
}
