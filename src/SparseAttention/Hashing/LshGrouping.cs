using static TorchSharp.torch;

namespace SparseAttention.Hashing;

/// <summary>
/// The groups of one multi-round LSH forward, in the layout <see cref="Kernels.GroupedAttention.MergedAttention"/>
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
        var perUnit = new (List<List<int>> Queries, List<List<int>> Keys, List<int> Previous)[units];
        Parallel.For(0, units, u =>
        {
            int b = u / (heads * rounds);
            long offset = (long)u * seqLen;
            var positions = Enumerable.Range(0, seqLen).Where(t => real is null || real[(long)b * seqLen + t]).ToArray();
            perUnit[u] = causal ? CausalChunks(qb, kb, offset, positions, w) : SortedChunks(qb, kb, offset, positions, w, seqLen);
        });

        int groupsPerRound = Math.Max(1, perUnit.Max(p => p.Queries.Count));
        int wq = Math.Max(1, perUnit.Max(p => p.Queries.Count == 0 ? 0 : p.Queries.Max(g => g.Count)));
        int wk = Math.Max(1, perUnit.Max(p => p.Keys.Count == 0 ? 0 : p.Keys.Max(g => g.Count)));
        int groups = rounds * groupsPerRound;
        var qi = new long[(long)batch * heads * groups * wq];
        var ki = new long[(long)batch * heads * groups * wk];
        var prev = new long[(long)batch * heads * groups];
        Array.Fill(qi, -1L); Array.Fill(ki, -1L); Array.Fill(prev, -1L);
        for (int u = 0; u < units; u++)
        {
            int bh = u / rounds, r = u % rounds;
            var (queries, keys, previous) = perUnit[u];
            for (int g = 0; g < queries.Count; g++)
            {
                long group = (long)bh * groups + r * groupsPerRound + g;
                for (int s = 0; s < queries[g].Count; s++) qi[group * wq + s] = queries[g][s];
                for (int s = 0; s < keys[g].Count; s++) ki[group * wk + s] = keys[g][s];
                prev[group] = previous[g] < 0 ? -1 : r * groupsPerRound + previous[g];
            }
        }
        return new LshGroups(
            tensor(qi, new long[] { batch, heads, groups, wq }).to(queryBuckets.device),
            tensor(ki, new long[] { batch, heads, groups, wk }).to(queryBuckets.device),
            tensor(prev, new long[] { batch, heads, groups }).to(queryBuckets.device), rounds);
    }

    private static int[] SortByBucket(long[] buckets, long offset, int[] positions)
    {
        var sorted = (int[])positions.Clone();
        var keys = new (long Bucket, int Position)[sorted.Length];
        for (int i = 0; i < sorted.Length; i++) keys[i] = (buckets[offset + sorted[i]], sorted[i]);
        Array.Sort(keys, sorted);                                                        // by (bucket, position)
        return sorted;
    }

    private static (List<List<int>>, List<List<int>>, List<int>) SortedChunks(long[] qb, long[] kb, long offset, int[] positions, int w, int seqLen)
    {
        var queries = SortByBucket(qb, offset, positions);
        var keys = ReferenceEquals(qb, kb) ? queries : SortByBucket(kb, offset, positions);
        int chunks = (positions.Length + w - 1) / w;
        var q = new List<List<int>>(); var k = new List<List<int>>(); var p = new List<int>();
        for (int c = 0; c < chunks; c++)
        {
            q.Add(new List<int>(new ArraySegment<int>(queries, c * w, Math.Min(w, queries.Length - c * w))));
            k.Add(new List<int>(new ArraySegment<int>(keys, c * w, Math.Min(w, keys.Length - c * w))));
            p.Add(c - 1);
        }
        return (q, k, p);
    }

    private static (List<List<int>>, List<List<int>>, List<int>) CausalChunks(long[] qb, long[] kb, long offset, int[] positions, int w)
    {
        var keys = SortByBucket(kb, offset, positions);                                  // bucket-major, then position
        var q = new List<List<int>>(); var k = new List<List<int>>(); var p = new List<int>();
        var firstGroup = new Dictionary<long, (int Group, int Start, int Count)>();
        for (int s = 0; s < keys.Length;)
        {
            long bucket = kb[offset + keys[s]];
            int start = s;
            while (s < keys.Length && kb[offset + keys[s]] == bucket) s++;
            firstGroup[bucket] = (k.Count, start, s - start);
            for (int c = start; c < s; c += w)
            {
                k.Add(new List<int>(new ArraySegment<int>(keys, c, Math.Min(w, s - c))));
                q.Add(new List<int>());
                p.Add(c == start ? -1 : k.Count - 2);
            }
        }
        foreach (int t in positions)                                                     // positions ascend: slots stay in position order
        {
            if (!firstGroup.TryGetValue(qb[offset + t], out var seg)) continue;            // no key of its bucket at all
            // n = keys of this bucket at positions ≤ t (the segment is sorted by position).
            int lo = 0, hi = seg.Count;
            while (lo < hi) { int mid = (lo + hi) / 2; if (keys[seg.Start + mid] <= t) lo = mid + 1; else hi = mid; }
            if (lo == 0) continue;                                                       // no key of its bucket yet: nothing to attend
            q[seg.Group + (lo - 1) / w].Add(t);
        }
        return (q, k, p);
    }
}
