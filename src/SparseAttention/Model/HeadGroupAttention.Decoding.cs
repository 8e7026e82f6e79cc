using SparseAttention.Kernels;
using SparseAttention.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// The decoding state of one head group in one layer: what later queries of this group can still see (cached keys
/// and values, and for content-based groups the open chunks of each cluster or bucket). Filled from a prompt by
/// <see cref="Prefill"/> (the group's ordinary forward, so the prompt's outputs are exactly the full forward's) and
/// advanced one token per row by <see cref="Step"/>, whose output equals the last row of a full forward over the
/// sequence so far. Rows are independent and may be at different positions.
/// </summary>
public abstract class HeadGroupDecoder : IDisposable
{
    /// <param name="q">Prompt queries (B, Hg, T, D), rows right-padded.</param>
    /// <param name="k">Prompt keys (B, Hg, T, D).</param>
    /// <param name="v">Prompt values (B, Hg, T, D).</param>
    /// <param name="keyMask">Null, or (B, T) bool true for the first lengths[b] positions of row b.</param>
    /// <param name="lengths">Real tokens per row, ≥ 1.</param>
    /// <returns>(B, Hg, T, D), the group's forward output.</returns>
    public abstract Tensor Prefill(Tensor q, Tensor k, Tensor v, Tensor? keyMask, int[] lengths);

    /// <param name="q">New queries (B, Hg, 1, D), row b at position positions[b].</param>
    /// <param name="k">New keys (B, Hg, 1, D).</param>
    /// <param name="v">New values (B, Hg, 1, D).</param>
    /// <param name="positions">Position of the new token in each row (= tokens before it).</param>
    /// <returns>(B, Hg, 1, D).</returns>
    public abstract Tensor Step(Tensor q, Tensor k, Tensor v, int[] positions);

    public abstract void Dispose();

    /// <summary>Key position − query position per listed slot, in the layout of <see cref="Flatten"/> (0 where a row has
    /// fewer keys than <paramref name="width"/>); <paramref name="queryPosition"/> gives the query position of row·head i.</summary>
    internal static long[] Distances(List<int>[] perRowHead, int width, Func<int, int> queryPosition)
    {
        var distance = new long[(long)perRowHead.Length * width];
        for (int i = 0; i < perRowHead.Length; i++)
            for (int j = 0; j < perRowHead[i].Count; j++) distance[(long)i * width + j] = perRowHead[i][j] - queryPosition(i);
        return distance;
    }

    /// <summary>The flat slot list (B·H·L, −1 padded) <see cref="DecodeAttention"/> takes, from per-(b, h) lists.</summary>
    internal static (long[] Slots, int Width) Flatten(List<int>[] perRowHead, Func<int, int> slotOf)
    {
        int width = Math.Max(1, perRowHead.Max(l => l.Count));
        var slots = new long[perRowHead.Length * width];
        Array.Fill(slots, -1L);
        for (int i = 0; i < perRowHead.Length; i++)
            for (int j = 0; j < perRowHead[i].Count; j++) slots[(long)i * width + j] = slotOf(perRowHead[i][j]);
        return (slots, width);
    }
}

public abstract partial class HeadGroupAttention
{
    /// <summary>
    /// A decoder for this group for <paramref name="batch"/> rows of a causal model of context
    /// <paramref name="maxSeqLen"/>, or null when this group cannot decode incrementally (then the model re-encodes).
    /// </summary>
    public virtual HeadGroupDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device) => null;

    /// <summary>Whether <see cref="CreateDecoder"/> returns a decoder (without allocating one).</summary>
    public virtual bool SupportsDecoding => false;
}

public sealed partial class StaticPatternAttention
{
    /// <summary>Causal, prefix-stable patterns decode from a cache of the last CausalReach + 1 keys (the whole context
    /// when the reach is unbounded, e.g. strided).</summary>
    public override bool SupportsDecoding => pattern.IsCausal && pattern.IsPrefixStable;

    public override HeadGroupDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device)
    {
        if (!SupportsDecoding) return null;
        int capacity = pattern.CausalReach is int reach ? Math.Min(maxSeqLen, reach + 1) : maxSeqLen;
        return new Decoder(this, new KeyValueCache(batch, Heads, capacity, dimHead, dimHead, dtype, device));
    }

    private sealed class Decoder(StaticPatternAttention group, KeyValueCache cache) : HeadGroupDecoder
    {
        public override Tensor Prefill(Tensor q, Tensor k, Tensor v, Tensor? keyMask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            var output = group.Forward(q, k, v, keyMask).Output;                       // (B, Hg, T, D)
            cache.WritePrompt(k, v, lengths);
            return output.MoveToOuterDisposeScope();
        }

        public override Tensor Step(Tensor q, Tensor k, Tensor v, int[] positions)
        {
            using var scope = NewDisposeScope();
            cache.Write(k, v, positions);
            var pattern = group.pattern;
            int heads = group.Heads, rows = positions.Length;
            var lists = new List<int>[rows * heads];
            for (int b = 0; b < rows; b++)
            {
                int t = positions[b];
                for (int h = 0; h < heads; h++)
                    lists[b * heads + h] = h > 0 && pattern.SameForAllHeads ? lists[b * heads] : AllowedKeys(pattern, h, t, cache.Capacity, group.blockSize);
            }
            var (slots, width) = Flatten(lists, cache.Slot);
            var terms = group.Relative;
            var relative = terms is null ? null : new DecodeAttention.Relative(Distances(lists, width, i => positions[i / heads]), terms);
            var output = DecodeAttention.Attend(q.squeeze(2), cache.Keys, cache.Values, slots, width, relative: relative);   // (B, Hg, D)
            return output.unsqueeze(2).MoveToOuterDisposeScope();                       // (B, Hg, 1, D)
        }

        public override void Dispose() => cache.Dispose();
    }

    /// <summary>Keys j ≤ t that query t of head <paramref name="head"/> may attend (as in a sequence of t + 1 tokens),
    /// ascending. Visits only the candidate key blocks (and only the last <paramref name="capacity"/> positions, which
    /// is all a bounded reach can see).</summary>
    internal static List<int> AllowedKeys(Patterns.AttentionPattern pattern, int head, int t, int capacity, int blockSize)
    {
        var keys = new List<int>();
        int first = Math.Max(0, t - capacity + 1);
        int block = Math.Max(1, Math.Min(blockSize, t + 1));
        foreach (int kb in pattern.CandidateKeyBlocks(head, t / block, block, t + 1))
            for (int j = Math.Max(first, kb * block); j <= Math.Min(t, kb * block + block - 1); j++)
                if (pattern.Allows(head, t, j, t + 1)) keys.Add(j);
        return keys;
    }
}

public sealed partial class RoutingHeadGroup
{
    /// <summary>Causal routing decodes: every cluster keeps its open chunk (and the one before it, for look-back).</summary>
    public override bool SupportsDecoding => routing.Causal;

    public override HeadGroupDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device)
    {
        if (!routing.Causal) return null;
        return new RoutingDecoder(this, batch, device, dtype);
    }
}

/// <summary>
/// Decoding state of causal <see cref="RoutingAttention"/> heads. For each (row, head, cluster): how many members it has
/// had (query entries and key-only entries, as in <see cref="RoutingAttention.CausalGroups"/>), the key positions of
/// its open chunk and of the chunk before it. A new token's query and key clusters come from the centroids the
/// decoding started with (the module's k-means is not updated in eval mode); its entries are appended to those
/// clusters (a new chunk starts every WindowSize members), and its query attends the key members of its chunk
/// (self last-resort with shared QK), the previous chunk with look-back, and its cluster's memory key/values —
/// exactly what a full forward gives the last position.
/// </summary>
internal sealed class RoutingDecoder : HeadGroupDecoder
{
    private readonly RoutingHeadGroup group;
    private readonly RoutingAttention routing;
    private readonly KeyValueCache cache;
    private readonly Tensor centroids;              // (H, C, D) the snapshot every step routes with
    private readonly long batch;
    private readonly int heads, clusters, window;
    private readonly int[] members;                 // (B·H·C) entries so far
    private List<int>[] open;                       // (B·H·C) key positions of the open chunk
    private List<int>[] previous;                   // (B·H·C) key positions of the chunk before it

    public RoutingDecoder(RoutingHeadGroup group, long batch, Device device, ScalarType dtype)
    {
        this.group = group;
        routing = group.Routing;
        this.batch = batch;
        heads = routing.Heads;
        clusters = routing.Clusters;
        window = routing.WindowSize;
        cache = new KeyValueCache(batch, heads, routing.MaxSeqLen, routing.DimHead, routing.DimHead, dtype, device);
        using (NewDisposeScope()) centroids = routing.KMeans.Means.to(dtype, device).clone().DetachFromDisposeScope();
        long n = batch * heads * clusters;
        members = new int[n];
        open = Enumerable.Range(0, (int)n).Select(_ => new List<int>()).ToArray();
        previous = Enumerable.Range(0, (int)n).Select(_ => new List<int>()).ToArray();
    }

    public override Tensor Prefill(Tensor q, Tensor k, Tensor v, Tensor? keyMask, int[] lengths)
    {
        using var scope = NewDisposeScope();
        (q, k) = (routing.AttendInput(q), routing.AttendInput(k));                     // as the group's forward does
        var result = routing.forward(q, routing.SharedQk ? null : k, v, keyMask, group.Relative);
        var keys = routing.SharedQk ? routing.KMeans.Normalize(q) : k;                  // what the keys were in that forward
        cache.WritePrompt(keys, v, lengths);
        // Rebuild the chunks from the forward's groups: a cluster's groups are its chunks in order (CausalGroups), and
        // every non-empty slot is one member entry.
        var qi = result.QueryIndices.cpu().contiguous().data<long>().ToArray();          // (B, H, G, W)
        var ki = result.KeyIndices.cpu().contiguous().data<long>().ToArray();
        var gc = result.GroupClusters.cpu().contiguous().data<long>().ToArray();        // (B, H, G)
        long groups = result.GroupClusters.shape[2], w = result.QueryIndices.shape[3];
        for (long bh = 0; bh < batch * heads; bh++)
            for (long g = 0; g < groups; g++)
            {
                long c = gc[bh * groups + g];
                if (c < 0) continue;
                long at = bh * clusters + c;
                (previous[at], open[at]) = (open[at], previous[at]);
                open[at].Clear();
                for (long s = 0; s < w; s++)
                {
                    long slot = (bh * groups + g) * w + s;
                    if (qi[slot] >= 0 || ki[slot] >= 0) members[at]++;
                    if (ki[slot] >= 0) open[at].Add((int)ki[slot]);
                }
            }
        return result.Output.MoveToOuterDisposeScope();
    }

    public override Tensor Step(Tensor q, Tensor k, Tensor v, int[] positions)
    {
        using var scope = NewDisposeScope();
        (q, k) = (routing.AttendInput(q), routing.AttendInput(k));                     // (B, H, 1, D) each
        bool shared = routing.SharedQk;
        var kmeans = routing.KMeans;
        var keys = shared ? kmeans.Normalize(q) : k;                                     // (B, H, 1, D), as in the forward
        cache.Write(keys, v, positions);
        var queryCluster = routing.NearestOf(q, centroids).cpu().contiguous().data<long>().ToArray();   // (B, H, 1)
        var keyCluster = shared ? queryCluster : routing.NearestOf(k, centroids).cpu().contiguous().data<long>().ToArray();

        bool memory = routing.NumMemKv > 0;
        var lists = new List<int>[batch * heads];
        for (int bh = 0; bh < batch * heads; bh++)
        {
            int t = positions[bh / heads];
            int cq = (int)queryCluster[bh], ck = (int)keyCluster[bh];
            Join(bh, cq, t, isKey: ck == cq);
            if (ck != cq) Join(bh, ck, t, isKey: true);
            var list = new List<int>(open[bh * clusters + cq].Count + (routing.LookBackward ? previous[bh * clusters + cq].Count : 0));
            if (routing.LookBackward) list.AddRange(previous[bh * clusters + cq]);
            foreach (int j in open[bh * clusters + cq])
                if (!shared || j != t) list.Add(j);
            if (shared && list.Count == 0 && !memory && ck == cq) list.Add(t);           // itself only when nothing else
            lists[bh] = list;
        }
        var (slots, width) = Flatten(lists, cache.Slot);
        Tensor? memKeys = null, memValues = null;
        if (memory)
        {
            var clusterIndex = tensor(queryCluster, device: q.device).view(batch, heads);  // (B, H)
            memKeys = routing.MemoryOf(clusterIndex, values: false).to(q.dtype);            // (B, H, M, D)
            memValues = routing.MemoryOf(clusterIndex, values: true).to(q.dtype);
        }
        var terms = group.Relative;
        var relative = terms is null ? null : new DecodeAttention.Relative(Distances(lists, width, i => positions[i / heads]), terms);
        var output = DecodeAttention.Attend(q.squeeze(2), cache.Keys, cache.Values, slots, width, memKeys, memValues, relative);  // (B, H, D)
        return output.unsqueeze(2).MoveToOuterDisposeScope();
    }

    /// <summary>Appends one member entry of the token at <paramref name="position"/> to cluster <paramref name="c"/>.</summary>
    private void Join(int bh, int c, int position, bool isKey)
    {
        int at = bh * clusters + c;
        if (members[at] > 0 && members[at] % window == 0)                                 // the open chunk is full: a new one starts
        {
            (previous[at], open[at]) = (open[at], previous[at]);
            open[at].Clear();
        }
        members[at]++;
        if (isKey) open[at].Add(position);
    }

    public override void Dispose()
    {
        cache.Dispose();
        centroids.Dispose();
    }
}
