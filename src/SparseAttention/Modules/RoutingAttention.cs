using SparseAttention.Clustering;
using SparseAttention.Kernels;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Modules;

/// <summary>Result of a <see cref="RoutingAttention"/> forward.</summary>
/// <param name="Output">(B, H, T, D) attention output; zeros for tokens that joined no group (padding always).</param>
/// <param name="QueryIndices">(B, H, G, W) int64 positions of each group's queries, −1 = empty slot.</param>
/// <param name="KeyIndices">(B, H, G, W) int64 positions of each group's keys, −1 = empty slot.</param>
/// <param name="GroupClusters">(B, H, G) int64 centroid of each group (selects its memory key/values), −1 = unused group.</param>
/// <param name="AuxLoss">Scalar commitment loss of the k-means; add it to the training loss.</param>
public sealed record RoutingAttentionOutput(Tensor Output, Tensor QueryIndices, Tensor KeyIndices, Tensor GroupClusters, Tensor AuxLoss);

/// <summary>
/// Routing attention heads: queries and keys are clustered by an <see cref="OnlineKMeans"/> and each token attends
/// only inside its clusters. Takes q, k, v already split per head, (B, H, T, D), like the PyTorch library's
/// <c>KmeansAttention</c>; local heads and projections live in the enclosing multi-head module.
/// </summary>
/// <remarks>
/// <para>Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing Transformers",
/// TACL 2021, arXiv 2003.05997.</para>
/// <para><b>Clusters.</b> C = ⌈maxSeqLen / windowSize⌉ centroids per head, fixed at construction (they are
/// learned state). Every sequence length T ≤ maxSeqLen uses all C centroids; nothing is padded — short sequences
/// simply use groups of min(windowSize, T) slots.</para>
/// <para><b>Non-causal: balanced routing</b> (the paper's). Each centroid takes the min(windowSize, T) real tokens
/// most similar to it (top-k along the sequence), so all C groups have the same size and a token may join several
/// groups (its output is the mean) or none (its output is zero). Without shared QK, queries and keys choose
/// separately with the same centroids (the k-means clusters the union of normalised queries and keys). Padding is
/// never chosen; where a cluster cannot be filled with real tokens its slots are empty (−1).</para>
/// <para><b>Causal: position-ordered nearest-centroid groups.</b> Balanced top-k cannot be causal: whether token j
/// is among a centroid's top-k depends on every other token, including later ones (the PyTorch library has this
/// leak and the authors only blank future positions at decode time). Here instead each token's query goes to the
/// cluster of its nearest centroid and its key to the nearest centroid of its (normalised) key — the same cluster
/// with shared QK. A cluster's members (tokens whose query or key chose it) are ordered by position and cut into
/// consecutive chunks of W = min(windowSize, T) members; every chunk is one group.</para>
/// <para><i>Why the output at position i cannot depend on tokens after i:</i> (1) the centroids used by a forward are
/// those from before it started (<see cref="OnlineKMeans"/> snapshots them; initialisation and EMA steps triggered by
/// this batch only affect later forwards), so a token's clusters depend on that token alone; (2) the chunk of a
/// member of cluster c is ⌊r / W⌋ where r counts the members of c at EARLIER positions — a function of tokens &lt; i
/// and token i; (3) query i attends keys j ≤ i of its own group (causal rule on original positions), whose
/// membership is by (2) a function of tokens ≤ j ≤ i, plus the memory key/values of its cluster; (4) each query is in
/// exactly one group, so the mean is over one group. Later tokens only change where groups sit in the G order and
/// how many groups there are, which the kernel's result does not depend on; with <c>lookBackward</c> a chunk also
/// attends the previous chunk of its own cluster, whose members are all earlier tokens (decided by (2) as well). Tested by
/// perturbing the future in training and eval mode, including the initialising forward.</para>
/// <para>The trade-off: causal groups are not balanced (a popular cluster yields several chunks, a token near the
/// start of a chunk sees few keys); every real token is in exactly one group and each query sees at most W keys.
/// G ≤ ⌈2T / W⌉ + C.</para>
/// <para><b>Shared QK</b>: the keys are the normalised queries (in the k-means normalisation) and a token attends to
/// itself only when nothing else is allowed. <b>Memory</b>: <c>numMemKv</c> learned key/value pairs per cluster
/// (parameters <c>mem_key</c>, <c>mem_value</c>, (H, C, M, D)) that every query of the cluster's groups may attend.</para>
/// <para><b>k-means updates</b> are explicit: call <see cref="OnlineKMeans.Update"/> (or
/// <see cref="OnlineKMeans.UpdateAll"/>) once per optimizer step; see <see cref="OnlineKMeans"/>.</para>
/// </remarks>
public sealed partial class RoutingAttention : nn.Module<Tensor, Tensor?, Tensor, Tensor?, RelativePositionTerms?, RoutingAttentionOutput>
{
    private readonly OnlineKMeans kmeans;
    private Parameter? mem_key;    // (H, C, M, D)
    private Parameter? mem_value;  // (H, C, M, D)
    private readonly int heads, dimHead, maxSeqLen, windowSize, clusters, numMemKv;
    private readonly long seed;
    private readonly bool causal, sharedQk, lookBackward;

    /// <param name="heads">Routing heads H.</param>
    /// <param name="dimHead">Width D of one head (q, k and v).</param>
    /// <param name="maxSeqLen">Longest sequence accepted.</param>
    /// <param name="windowSize">Tokens per cluster (<c>window_size</c>); clusters = ⌈maxSeqLen / windowSize⌉.</param>
    /// <param name="causal">Autoregressive: query i attends keys j ≤ i, routing never looks ahead (see remarks).</param>
    /// <param name="sharedQk">Keys are the normalised queries (then pass <c>k = null</c>); the PyTorch library turns
    /// this on for causal models.</param>
    /// <param name="numMemKv">Learned memory key/values per cluster (<c>num_mem_kv</c>), ≥ 0.</param>
    /// <param name="kmeansEmaDecay">EMA decay of the centroids (<c>kmeans_ema_decay</c>).</param>
    /// <param name="commitmentFactor">Weight of the commitment loss (<c>commitment_factor</c>).</param>
    /// <param name="norm">Normalisation of clustered vectors: L2 (PyTorch library) or LayerNorm (authors).</param>
    /// <param name="seed">Seed of the initial centroids, their data initialisation and the memory key/values.</param>
    /// <param name="lookBackward">Causal only: each chunk also attends the previous chunk of its own cluster (a query
    /// then sees up to 2·W keys instead of the members of its own chunk before it); no memory key/values.</param>
    /// <param name="name">Module name.</param>
    /// <param name="numClusters">Centroids per head; null = ⌈maxSeqLen / windowSize⌉ (the PyTorch library's rule). The authors
    /// set it separately (<c>sparsity_cluster_size</c>): each cluster still takes windowSize tokens (encoder) or is chunked
    /// every windowSize members (decoder).</param>
    public RoutingAttention(int heads, int dimHead, int maxSeqLen, int windowSize, bool causal = false, bool sharedQk = false,
        int numMemKv = 0, double kmeansEmaDecay = 0.999, double commitmentFactor = 1e-4, KMeansNorm norm = KMeansNorm.L2,
        long seed = 0, bool lookBackward = false, string name = "routing_attention", int? numClusters = null) : base(name)
    {
        Check.That(numClusters is null or > 0, nameof(numClusters), $"must be positive when given, got {numClusters}.");
        Check.That(!lookBackward || causal, nameof(lookBackward), "looking back to the previous chunk of a cluster is for causal routing (non-causal clusters are not chunked).");
        Check.That(!lookBackward || numMemKv == 0, nameof(lookBackward), $"look-back and memory key/values cannot be combined (numMemKv = {numMemKv}).");
        this.lookBackward = lookBackward;
        Check.Positive(heads, nameof(heads));
        Check.Positive(dimHead, nameof(dimHead));
        Check.Positive(maxSeqLen, nameof(maxSeqLen));
        Check.Positive(windowSize, nameof(windowSize));
        Check.That(windowSize <= maxSeqLen, nameof(windowSize), $"must be <= maxSeqLen ({maxSeqLen}), got {windowSize}.");
        Check.NonNegative(numMemKv, nameof(numMemKv));
        this.heads = heads;
        this.dimHead = dimHead;
        this.maxSeqLen = maxSeqLen;
        this.windowSize = windowSize;
        this.causal = causal;
        this.sharedQk = sharedQk;
        this.numMemKv = numMemKv;
        this.seed = seed;
        clusters = numClusters ?? (maxSeqLen + windowSize - 1) / windowSize;
        kmeans = new OnlineKMeans(heads, dimHead, clusters, kmeansEmaDecay, commitmentFactor, norm, seed);
        if (numMemKv > 0)
        {
            var gen = new Generator((ulong)seed + 0x9E3779B9UL);
            mem_key = new Parameter(randn(new long[] { heads, clusters, numMemKv, dimHead }, generator: gen));
            mem_value = new Parameter(randn(new long[] { heads, clusters, numMemKv, dimHead }, generator: gen));
        }
        RegisterComponents();
    }

    public OnlineKMeans KMeans => kmeans;
    public int Heads => heads;
    public int DimHead => dimHead;
    public int MaxSeqLen => maxSeqLen;
    public int WindowSize => windowSize;
    public int Clusters => clusters;
    public int NumMemKv => numMemKv;
    public bool Causal => causal;
    public bool SharedQk => sharedQk;
    public bool LookBackward => lookBackward;

    /// <summary>Kernel of the attention inside clusters (Auto: fused for float32 CPU without memory key/values).</summary>
    public AttentionKernel Kernel { get; set; } = AttentionKernel.Auto;

    /// <summary>Whether the owner attends with the k-means-normalised queries and keys (<see cref="AttendInput"/>), as the
    /// Routing Transformer authors do with LayerNorm; <see cref="forward"/> itself attends with what it is given.</summary>
    public bool AttendNormalized { get; init; }

    /// <summary>
    /// Hashed clusters (the Routing Transformer authors' <c>hash_items</c>): a token's cluster is the SimHash bucket of its
    /// normalised vector — bit k of the cluster index is 1 when x̂·r_k &gt; 0, for log2(C) fixed random orthonormal
    /// directions r_k per head (seeded, not learned, not stored) — instead of its nearest k-means centroid. The bucket is the
    /// nearest of the C fixed "vertices" v_c = Σ_k ±r_k (sign k = bit k of c), so everything else is unchanged: causal
    /// heads chunk each bucket's members by position, non-causal heads give each bucket its windowSize tokens of highest
    /// x̂·v_c. No commitment loss (the k-means is unused). Needs C a power of two and log2(C) ≤ dimHead. Self-attention only.
    /// </summary>
    public bool HashItems
    {
        get => hashItems;
        init
        {
            Check.That(!value || (clusters & (clusters - 1)) == 0, nameof(HashItems), $"hashed clusters need a power-of-two number of clusters, got {clusters}.");
            Check.That(!value || System.Numerics.BitOperations.Log2((uint)clusters) <= dimHead, nameof(HashItems),
                $"hashed clusters need log2(clusters) = {System.Numerics.BitOperations.Log2((uint)clusters)} <= dimHead = {dimHead} orthonormal directions.");
            hashItems = value;
        }
    }
    private bool hashItems;

    /// <summary>
    /// Strided cluster heads (the Routing Transformer authors' <c>sparsity_cluster_strided_num_heads</c>), for
    /// non-causal self-attention: in the last <see cref="StridedHeads"/> heads a centroid does not take its windowSize
    /// most similar tokens but ranks all real tokens by similarity and takes every ⌊n / windowSize⌋-th (ranks 0, s, 2s, …),
    /// so a group spans the whole similarity range — mostly tokens of other clusters. Whether a token is taken depends on
    /// every other token of the sequence, so causal heads cannot have it.
    /// </summary>
    public int StridedHeads
    {
        get => stridedHeads;
        init
        {
            Check.That(value >= 0 && value <= heads, nameof(StridedHeads), $"must be in [0, heads = {heads}], got {value}.");
            Check.That(value == 0 || !causal, nameof(StridedHeads),
                "strided cluster heads rank the whole sequence (a token's group depends on later tokens), so they need causal = false.");
            stridedHeads = value;
        }
    }
    private int stridedHeads;
    private Tensor? hashProjections;   // (H, bits, D) float64 CPU, made on first use

    /// <summary>With <see cref="HashItems"/>: the (H, log2 C, D) float64 orthonormal hashing directions of every head.</summary>
    internal Tensor HashProjections()
    {
        if (hashProjections is null)
        {
            using var scope = NewDisposeScope();
            int bits = System.Numerics.BitOperations.Log2((uint)clusters);
            var gen = new Generator((ulong)seed + 0x5851F42DUL);
            var (qr, _) = linalg.qr(randn(new long[] { heads, dimHead, Math.Max(bits, 1) }, dtype: ScalarType.Float64, generator: gen));   // (H, D, bits) orthonormal columns
            hashProjections = qr.narrow(2, 0, bits).transpose(1, 2).contiguous().DetachFromDisposeScope();   // (H, bits, D)
        }
        return hashProjections;
    }

    /// <summary>With <see cref="HashItems"/>: normalised x (B, H, T, D) (padding rows zeroed first), its similarities to the
    /// bucket vertices (B, H, T, C) and its bucket (B, H, T) (−1 = padding).</summary>
    private (Tensor Normalized, Tensor Similarities, Tensor Nearest) Hash(Tensor x, Tensor? keyMask)
    {
        long batch = x.shape[0], t = x.shape[2];
        var padding = keyMask?.logical_not().view(batch, 1, t);                          // (B, 1, T)
        var normalized = kmeans.Normalize(padding is null ? x : x.masked_fill(padding.unsqueeze(-1), 0));   // (B, H, T, D)
        int bits = System.Numerics.BitOperations.Log2((uint)clusters);
        var signs = (arange(clusters, dtype: ScalarType.Int64).view(clusters, 1)
                     .bitwise_right_shift(arange(bits, dtype: ScalarType.Int64).view(1, bits)).bitwise_and(1) * 2 - 1)
                    .to(ScalarType.Float64);                                              // (C, bits) ±1, bit k of c
        var vertices = einsum("cb,hbd->hcd", signs, HashProjections()).to(x.dtype, x.device);   // (H, C, D)
        Tensor sims, nearest;
        using (no_grad())
        {
            sims = einsum("bhtd,hcd->bhtc", normalized, vertices);                       // (B, H, T, C)
            nearest = sims.argmax(-1);                                                    // (B, H, T)
            if (padding is not null) nearest = nearest.masked_fill(padding, -1);
        }
        return (normalized, sims, nearest);
    }

    /// <summary>The cluster (B, H, T) of each vector of x (B, H, T, D) as a forward assigns it — the SimHash bucket with
    /// <see cref="HashItems"/>, else the nearest of <paramref name="centroids"/> (H, C, D) — for incremental decoding.</summary>
    internal Tensor NearestOf(Tensor x, Tensor centroids)
    {
        if (!hashItems) return kmeans.NearestOf(x, centroids);
        using var scope = NewDisposeScope();
        return Hash(x, null).Nearest.MoveToOuterDisposeScope();
    }

    /// <summary>The query or key (B, H, T, D) to pass to <see cref="forward"/>: normalised by the k-means when
    /// <see cref="AttendNormalized"/>, else <paramref name="x"/> itself. Forward and incremental decoding both use it.</summary>
    public Tensor AttendInput(Tensor x) => AttendNormalized ? kmeans.Normalize(x) : x;

    /// <param name="q">Queries (B, H, T, D), T ≤ maxSeqLen.</param>
    /// <param name="k">Keys (B, H, T, D); must be null with shared QK (the keys are then the normalised queries).</param>
    /// <param name="v">Values (B, H, T, D).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token, false = padding (never routed, never attended,
    /// excluded from the k-means).</param>
    /// <param name="relative">Optional terms of the distance j − i between the original positions of every attended pair
    /// (Shaw, ALiBi; evaluated by the grouped Ops kernel; memory key/values have no position and get none). Not with look-back.</param>
    public override RoutingAttentionOutput forward(Tensor q, Tensor? k, Tensor v, Tensor? keyMask = null, RelativePositionTerms? relative = null)
    {
        Check.That(relative is null || !lookBackward, nameof(relative), "relative-position terms are not available with look-back (routing_look_back) yet.");
        Check.Shape(q, nameof(q), "(B, H, T, D)", -1, heads, -1, dimHead);
        Check.FloatingPoint(q, nameof(q));
        long batch = q.shape[0], seqLen = q.shape[2];
        Check.That(seqLen <= maxSeqLen, nameof(q), $"sequence length T = {seqLen} exceeds maxSeqLen = {maxSeqLen}.");
        Check.That(seqLen > 0, nameof(q), "sequence length T must be > 0.");
        if (sharedQk) Check.That(k is null, nameof(k), "must be null with shared QK: the keys are the normalised queries.");
        else
        {
            Check.That(k is not null, nameof(k), "is required without shared QK.");
            Check.Shape(k!, nameof(k), "(B, H, T, D)", batch, heads, seqLen, dimHead);
            Check.SameDtype(q, nameof(q), k!, nameof(k));
        }
        Check.Shape(v, nameof(v), "(B, H, T, D)", batch, heads, seqLen, dimHead);
        Check.SameDtype(q, nameof(q), v, nameof(v));
        Check.KeyMask(keyMask, batch, seqLen);

        using var scope = NewDisposeScope();
        Tensor keys, querySims, keySims, queryNearest, keyNearest;
        Tensor aux;
        if (hashItems)
        {
            var hq = Hash(q, keyMask);
            var hk = sharedQk ? hq : Hash(k!, keyMask);
            aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
            keys = sharedQk ? hq.Normalized : k!;                                     // (B, H, T, D)
            (querySims, keySims, queryNearest, keyNearest) = (hq.Similarities, hk.Similarities, hq.Nearest, hk.Nearest);
        }
        else if (sharedQk)
        {
            var routed = kmeans.Forward(q, keyMask, similarities: !causal);           // causal routing needs only the nearest
            aux = routed.Loss;
            keys = routed.Normalized;                                                  // (B, H, T, D)
            querySims = keySims = routed.Similarities;                                 // (B, H, T, C)
            queryNearest = keyNearest = routed.Nearest;                                // (B, H, T)
        }
        else
        {
            // The k-means clusters the union of queries and keys, without concatenating them.
            var (_, sims, nearest, loss) = kmeans.ForwardParts([q, k!], keyMask, similarities: !causal, normalized: false);
            aux = loss;
            keys = k!;
            querySims = sims[0];                                                       // (B, H, T, C); empty when causal
            keySims = sims[1];
            queryNearest = nearest[0];                                                 // (B, H, T)
            keyNearest = nearest[1];
        }

        Tensor queryIdx, keyIdx, groupClusters;
        if (causal)
            (queryIdx, keyIdx, groupClusters) = CausalGroups(queryNearest, keyNearest, windowSize, clusters);
        else
        {
            queryIdx = Groups(querySims, keyMask);                                     // (B, H, C, W)
            keyIdx = sharedQk ? queryIdx : Groups(keySims, keyMask);
            groupClusters = arange(clusters, dtype: ScalarType.Int64, device: q.device)
                            .view(1, 1, clusters).expand(batch, heads, clusters).contiguous(); // (B, H, C)
        }

        Tensor? memKeys = null, memValues = null;
        if (mem_key is not null && mem_value is not null)
        {
            memKeys = MemoryPerGroup(mem_key.to(q.dtype), groupClusters);              // (B, H, G, M, D)
            memValues = MemoryPerGroup(mem_value.to(q.dtype), groupClusters);
        }
        if (lookBackward)
        {
            var previous = PreviousChunkOfSameCluster(groupClusters);                 // (B, H, G)
            var merged = GroupedAttention.MergedAttention(q, keys, v, queryIdx, keyIdx, previous, rounds: 1, causal: true,
                sharedQk: sharedQk, keyMask: keyMask, kernel: Kernel);               // (B, H, T, D)
            return new RoutingAttentionOutput(merged.MoveToOuterDisposeScope(), queryIdx.MoveToOuterDisposeScope(),
                keyIdx.MoveToOuterDisposeScope(), groupClusters.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
        }
        var output = GroupedAttention.Attention(q, keys, v, queryIdx, keyIdx, causal: causal, sharedQk: sharedQk,
            keyMask: keyMask, memoryKeys: memKeys, memoryValues: memValues, kernel: Kernel, relative: relative);   // (B, H, T, D)
        return new RoutingAttentionOutput(output.MoveToOuterDisposeScope(), queryIdx.MoveToOuterDisposeScope(),
            keyIdx.MoveToOuterDisposeScope(), groupClusters.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Routing cross-attention: queries of one sequence (B, H, T, D) attend keys and values of a context
    /// (B, H, S, D), e.g. an encoder's output. The k-means clusters the union of the real queries and real context
    /// keys; every centroid takes its min(<paramref name="contextWindowSize"/>, S) most similar real context keys
    /// (balanced top-k, as in self-attention — the context is fully visible, so this leaks nothing). Queries are
    /// grouped as in self-attention: balanced top-windowSize when not causal; when causal, each query goes to its
    /// nearest centroid and a cluster's queries are cut into chunks of windowSize in position order, so a query's
    /// group and keys never depend on later queries. No causal rule between queries and context positions (they are
    /// unrelated sequences), no memory key/values, no shared QK.
    /// </summary>
    /// <param name="q">Queries (B, H, T, D), T ≤ maxSeqLen.</param>
    /// <param name="k">Context keys (B, H, S, D).</param>
    /// <param name="v">Context values (B, H, S, D).</param>
    /// <param name="queryMask">Optional (B, T) bool; false = padded query (not routed; zero output, excluded from the k-means).</param>
    /// <param name="contextMask">Optional (B, S) bool; false = padded context token (never attended).</param>
    /// <param name="contextWindowSize">Context keys per cluster.</param>
    /// <returns>Output (B, H, T, D); query positions (B, H, G, Wq); context positions (B, H, G, Wc) (−1 = empty slot);
    /// each group's cluster (B, H, G); the commitment loss.</returns>
    public RoutingAttentionOutput CrossForward(Tensor q, Tensor k, Tensor v, Tensor? queryMask, Tensor? contextMask, int contextWindowSize)
    {
        Check.Shape(q, nameof(q), "(B, H, T, D)", -1, heads, -1, dimHead);
        Check.FloatingPoint(q, nameof(q));
        long batch = q.shape[0], seqLen = q.shape[2];
        Check.That(seqLen > 0 && seqLen <= maxSeqLen, nameof(q), $"sequence length T must be in [1, maxSeqLen = {maxSeqLen}], got {seqLen}.");
        Check.Shape(k, nameof(k), "(B, H, S, D)", batch, heads, -1, dimHead);
        long ctxLen = k.shape[2];
        Check.That(ctxLen > 0, nameof(k), "the context must hold at least one token.");
        Check.Shape(v, nameof(v), "(B, H, S, D)", batch, heads, ctxLen, dimHead);
        Check.SameDtype(q, nameof(q), k, nameof(k));
        Check.SameDtype(q, nameof(q), v, nameof(v));
        Check.KeyMask(queryMask, batch, seqLen);
        Check.KeyMask(contextMask, batch, ctxLen);
        Check.Positive(contextWindowSize, nameof(contextWindowSize));
        Check.That(!sharedQk && numMemKv == 0, nameof(sharedQk), "routing cross-attention has its own keys and no memory key/values; build the module with sharedQk = false and numMemKv = 0.");
        Check.That(!hashItems, nameof(HashItems), "routing cross-attention clusters with the k-means; hashed clusters are for self-attention.");

        using var scope = NewDisposeScope();
        var (_, sims, nearest, aux) = kmeans.ForwardParts([q, k], [queryMask, contextMask], similarities: true);
        var contextIdx = BalancedGroups(sims[1], contextMask, contextWindowSize);         // (B, H, C, Wc)
        Tensor queryIdx, keyIdx, groupClusters;
        if (causal)
        {
            var unrouted = full_like(nearest[0], -1L);                                     // (B, H, T): no key roles among the queries
            (queryIdx, _, groupClusters) = CausalGroups(nearest[0], unrouted, windowSize, clusters);   // (B, H, G, W), (B, H, G)
            long groups = groupClusters.shape[2], wc = contextIdx.shape[3];
            var index = groupClusters.clamp_min(0).unsqueeze(-1).expand(batch, heads, groups, wc);      // (B, H, G, Wc)
            keyIdx = contextIdx.gather(2, index)
                               .masked_fill(groupClusters.lt(0).unsqueeze(-1), -1);      // unused groups attend nothing
        }
        else
        {
            queryIdx = BalancedGroups(sims[0], queryMask, windowSize);                     // (B, H, C, W)
            keyIdx = contextIdx;
            groupClusters = arange(clusters, dtype: ScalarType.Int64, device: q.device)
                            .view(1, 1, clusters).expand(batch, heads, clusters).contiguous(); // (B, H, C)
        }
        var output = GroupedAttention.Attention(q, k, v, queryIdx, keyIdx, keyMask: contextMask, kernel: Kernel);  // (B, H, T, D)
        return new RoutingAttentionOutput(output.MoveToOuterDisposeScope(), queryIdx.MoveToOuterDisposeScope(),
            keyIdx.MoveToOuterDisposeScope(), groupClusters.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// For causal groups (<see cref="CausalGroups"/>, whose chunks of one cluster are consecutive in G order): the
    /// group holding the previous chunk of the same cluster, −1 for a cluster's first chunk and for unused groups.
    /// The previous chunk's members all come before the chunk's, so looking back keeps routing causal.
    /// </summary>
    /// <param name="groupClusters">(B, H, G) int64 cluster of each group, −1 = unused.</param>
    /// <returns>(B, H, G) int64.</returns>
    public static Tensor PreviousChunkOfSameCluster(Tensor groupClusters)
    {
        Check.Shape(groupClusters, nameof(groupClusters), "(B, H, G)", -1, -1, -1);
        using var scope = NewDisposeScope();
        long groups = groupClusters.shape[2];
        var before = cat([full_like(groupClusters.narrow(2, 0, 1), -1L), groupClusters.narrow(2, 0, groups - 1)], 2);  // (B, H, G) cluster of group g − 1
        var index = arange(groups, dtype: ScalarType.Int64, device: groupClusters.device).view(1, 1, groups) - 1;       // (1, 1, G)
        var same = groupClusters.ge(0).logical_and(before.eq(groupClusters));
        return where(same, index.expand_as(groupClusters), full_like(groupClusters, -1L)).MoveToOuterDisposeScope();
    }

    /// <summary>Non-causal groups (B, H, C, W): balanced top-W in the first heads, strided in the last <see cref="StridedHeads"/>.</summary>
    private Tensor Groups(Tensor similarities, Tensor? keyMask)
    {
        if (stridedHeads == 0) return BalancedGroups(similarities, keyMask, windowSize);
        if (stridedHeads == heads) return StridedGroups(similarities, keyMask, windowSize);
        int balanced = heads - stridedHeads;
        return cat([BalancedGroups(similarities.narrow(1, 0, balanced), keyMask, windowSize),
                    StridedGroups(similarities.narrow(1, balanced, stridedHeads), keyMask, windowSize)], 1);
    }

    /// <summary>Strided routing: every centroid ranks the n real tokens of its sequence by similarity and takes those
    /// of rank 0, s, 2s, … (s = max(1, ⌊n / W⌋), W = min(windowSize, T)): W tokens spread over the whole ranking.</summary>
    /// <param name="similarities">(B, H, T, C) token–centroid similarities.</param>
    /// <param name="keyMask">Optional (B, T) bool, true = real; padding is never chosen (slot −1 instead).</param>
    /// <param name="windowSize">Tokens per centroid.</param>
    /// <returns>(B, H, C, W) int64 positions per centroid, ascending, −1 = empty slot (sorted first).</returns>
    public static Tensor StridedGroups(Tensor similarities, Tensor? keyMask, int windowSize)
    {
        using var scope = NewDisposeScope();
        var (sims, window) = RealSimilarities(similarities, keyMask, windowSize);       // (B, H, T, C)
        long batch = sims.shape[0], heads = sims.shape[1], seqLen = sims.shape[2], clusters = sims.shape[3];
        var real = keyMask?.sum(1) ?? full(batch, seqLen, dtype: ScalarType.Int64, device: sims.device);   // (B) n
        var stride = real.div(window, rounding_mode: RoundingMode.floor).clamp_min(1);                     // (B) s
        var ranks = (arange(window, dtype: ScalarType.Int64, device: sims.device).view(1, window) * stride.view(batch, 1))
                    .clamp_max(seqLen - 1);                                            // (B, W): ranks ≥ n land on padding
        var order = sims.argsort(dim: 2, descending: true);                            // (B, H, T, C) positions by rank
        var index = order.gather(2, ranks.view(batch, 1, window, 1).expand(batch, heads, window, clusters));   // (B, H, W, C)
        index = index.masked_fill(sims.gather(2, index).isneginf(), -1);               // padding → empty slot
        return InPositionOrder(index).MoveToOuterDisposeScope();                      // (B, H, C, W)
    }

    /// <summary>Balanced routing: every centroid takes its min(windowSize, T) most similar real tokens.</summary>
    /// <param name="similarities">(B, H, T, C) token–centroid similarities.</param>
    /// <param name="keyMask">Optional (B, T) bool, true = real; padding is never chosen (slot −1 instead).</param>
    /// <param name="windowSize">Tokens per centroid.</param>
    /// <returns>(B, H, C, W) int64 positions per centroid, ascending, −1 = empty slot (sorted first).</returns>
    public static Tensor BalancedGroups(Tensor similarities, Tensor? keyMask, int windowSize)
    {
        using var scope = NewDisposeScope();
        var (sims, window) = RealSimilarities(similarities, keyMask, windowSize);       // (B, H, T, C)
        var (top, index) = sims.topk(window, dim: 2);                                  // (B, H, W, C)
        index = index.masked_fill(top.isneginf(), -1);                                 // padding → empty slot
        return InPositionOrder(index).MoveToOuterDisposeScope();                      // (B, H, C, W)
    }

    /// <summary>Checked, detached similarities with padding tokens at −∞ (never chosen), and W = min(windowSize, T).</summary>
    private static (Tensor Sims, int Window) RealSimilarities(Tensor similarities, Tensor? keyMask, int windowSize)
    {
        Check.Positive(windowSize, nameof(windowSize));
        Check.Shape(similarities, nameof(similarities), "(B, H, T, C)", -1, -1, -1, -1);
        long batch = similarities.shape[0], seqLen = similarities.shape[2];
        Check.KeyMask(keyMask, batch, seqLen);
        var sims = similarities.detach();
        if (keyMask is not null)
            sims = sims.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), double.NegativeInfinity);
        return (sims, (int)Math.Min(windowSize, seqLen));
    }

    /// <summary>(B, H, W, C) chosen positions → (B, H, C, W) in ascending position order (empty slots, −1, first).</summary>
    private static Tensor InPositionOrder(Tensor index) => index.sort(dim: 2).Values.transpose(2, 3).contiguous();

    /// <summary>
    /// Causal routing groups: the members of each cluster (tokens whose query or key chose it), in position order,
    /// cut into consecutive chunks of W = min(windowSize, T); a token's membership depends only on itself and
    /// earlier tokens (see the class remarks).
    /// </summary>
    /// <param name="queryClusters">(B, H, T) int64 cluster of each token's query, −1 = not routed (padding).</param>
    /// <param name="keyClusters">(B, H, T) int64 cluster of each token's key, −1 = not routed.</param>
    /// <param name="windowSize">Members per chunk.</param>
    /// <param name="clusters">Number of clusters C (values are in [−1, C)).</param>
    /// <returns>Query and key positions (B, H, G, W) (−1 = empty slot; a slot holds the same token in both when it
    /// is a member in both roles) and each group's cluster (B, H, G) (−1 = unused group).
    /// G = the largest number of chunks over (B, H), at least 1.</returns>
    public static (Tensor QueryIndices, Tensor KeyIndices, Tensor GroupClusters) CausalGroups(
        Tensor queryClusters, Tensor keyClusters, int windowSize, int clusters)
    {
        Check.Positive(windowSize, nameof(windowSize));
        Check.Positive(clusters, nameof(clusters));
        Check.Shape(queryClusters, nameof(queryClusters), "(B, H, T)", -1, -1, -1);
        Check.Shape(keyClusters, nameof(keyClusters), "(B, H, T)", queryClusters.shape[0], queryClusters.shape[1], queryClusters.shape[2]);
        if (queryClusters.device.type == DeviceType.CPU && keyClusters.device.type == DeviceType.CPU)
            return CausalGroupsCpu(queryClusters, keyClusters, windowSize, clusters);
        return CausalGroupsOps(queryClusters, keyClusters, windowSize, clusters);
    }

    /// <summary><see cref="CausalGroups"/> by one linear pass per (batch, head) over CPU memory: a stable counting
    /// sort by cluster of the entries, which are generated in position order (a token's query entry and key-only
    /// entry are in different clusters, so no two entries of one cluster share a position).</summary>
    internal static unsafe (Tensor QueryIndices, Tensor KeyIndices, Tensor GroupClusters) CausalGroupsCpu(
        Tensor queryClusters, Tensor keyClusters, int windowSize, int clusters)
    {
        long batch = queryClusters.shape[0], heads = queryClusters.shape[1], seqLen = queryClusters.shape[2];
        int window = (int)Math.Max(1, Math.Min(windowSize, seqLen));
        int rows = (int)(batch * heads), t = (int)seqLen;
        using var scope = NewDisposeScope();
        var qcT = queryClusters.to(ScalarType.Int64).contiguous();
        var kcT = keyClusters.to(ScalarType.Int64).contiguous();
        long* qcAll = (long*)FusedBlockSparseAttention.Pointer(qcT), kcAll = (long*)FusedBlockSparseAttention.Pointer(kcT);
        var counts = new int[rows * clusters];
        var groupsPerRow = new int[rows];
        Parallel.For(0, rows, bh =>
        {
            long* qc = qcAll + (long)bh * t, kc = kcAll + (long)bh * t;
            var count = counts.AsSpan(bh * clusters, clusters);
            for (int i = 0; i < t; i++)
            {
                long c = qc[i], d = kc[i];
                if (c >= 0 && c < clusters) count[(int)c]++;
                if (d >= 0 && d < clusters && d != c) count[(int)d]++;
            }
            int g = 0;
            foreach (int n in count) g += (n + window - 1) / window;
            groupsPerRow[bh] = g;
        });
        int groups = Math.Max(1, groupsPerRow.Length == 0 ? 0 : groupsPerRow.Max());
        var queryIdx = full(new long[] { batch, heads, groups, window }, -1L, dtype: ScalarType.Int64);
        var keyIdx = full(new long[] { batch, heads, groups, window }, -1L, dtype: ScalarType.Int64);
        var groupClusters = full(new long[] { batch, heads, groups }, -1L, dtype: ScalarType.Int64);
        long* qOut = (long*)FusedBlockSparseAttention.Pointer(queryIdx), kOut = (long*)FusedBlockSparseAttention.Pointer(keyIdx), gOut = (long*)FusedBlockSparseAttention.Pointer(groupClusters);
        Parallel.For(0, rows, bh =>
        {
            long* qc = qcAll + (long)bh * t, kc = kcAll + (long)bh * t;
            long* qo = qOut + (long)bh * groups * window, ko = kOut + (long)bh * groups * window, go = gOut + (long)bh * groups;
            var count = counts.AsSpan(bh * clusters, clusters);
            var start = new int[clusters];
            int g = 0;
            for (int c = 0; c < clusters; c++) { start[c] = g; g += (count[c] + window - 1) / window; }
            count.Clear();                                                                 // reused as running rank
            for (int i = 0; i < t; i++)
            {
                long c = qc[i], d = kc[i];
                if (c >= 0 && c < clusters)
                {
                    int r = count[(int)c]++;
                    long at = (long)(start[c] + r / window) * window + r % window;
                    qo[at] = i;
                    if (d == c) ko[at] = i;
                    go[start[c] + r / window] = c;
                }
                if (d >= 0 && d < clusters && d != c)
                {
                    int r = count[(int)d]++;
                    long at = (long)(start[d] + r / window) * window + r % window;
                    ko[at] = i;
                    go[start[d] + r / window] = d;
                }
            }
        });
        GC.KeepAlive(qcT); GC.KeepAlive(kcT);                                           // read through raw pointers above
        var device = queryClusters.device;
        return (queryIdx.to(device).MoveToOuterDisposeScope(), keyIdx.to(device).MoveToOuterDisposeScope(),
            groupClusters.to(device).MoveToOuterDisposeScope());
    }

    /// <summary><see cref="CausalGroups"/> with tensor operations (any device).</summary>
    internal static (Tensor QueryIndices, Tensor KeyIndices, Tensor GroupClusters) CausalGroupsOps(
        Tensor queryClusters, Tensor keyClusters, int windowSize, int clusters)
    {
        long batch = queryClusters.shape[0], heads = queryClusters.shape[1], seqLen = queryClusters.shape[2];
        long window = Math.Max(1, Math.Min(windowSize, seqLen));
        var device = queryClusters.device;

        using var scope = NewDisposeScope();
        // Entries: each token is a member of its query's cluster (role: query, and key too when its key chose the
        // same cluster) and, when its key chose another cluster, a key-only member there. 2T candidate entries.
        var positions = arange(seqLen, dtype: ScalarType.Int64, device: device).view(1, 1, seqLen).expand(batch, heads, seqLen); // (B, H, T)
        var queryRouted = queryClusters.ge(0);                                          // (B, H, T)
        var keyElsewhere = keyClusters.ge(0).logical_and(keyClusters.ne(queryClusters));
        var entryCluster = cat([queryClusters.masked_fill(queryRouted.logical_not(), -1),
                                keyClusters.masked_fill(keyElsewhere.logical_not(), -1)], 2);       // (B, H, 2T)
        var entryIsQuery = cat([queryRouted, zeros_like(queryRouted)], 2);                         // (B, H, 2T)
        var entryIsKey = cat([queryRouted.logical_and(keyClusters.eq(queryClusters)), keyElsewhere], 2);
        var entryPos = cat([positions, positions], 2);                                             // (B, H, 2T)
        var bucket = entryCluster.masked_fill(entryCluster.lt(0), clusters);           // unrouted → sentinel bucket C

        // Sort by (cluster, position): each cluster's members become a run in position order.
        var order = (bucket * seqLen + entryPos).sort(dim: 2, stable: true).Indices;   // (B, H, 2T)
        var bucketSorted = bucket.gather(2, order);
        var posSorted = entryPos.gather(2, order);
        var routedSorted = bucketSorted.lt(clusters);
        var querySorted = entryIsQuery.gather(2, order).logical_and(routedSorted);
        var keySorted = entryIsKey.gather(2, order).logical_and(routedSorted);

        var counts = zeros(new long[] { batch, heads, clusters + 1 }, dtype: ScalarType.Int64, device: device)
                     .scatter_add(2, bucket, ones_like(bucket));                       // (B, H, C + 1)
        var runStart = counts.cumsum(2) - counts;                                      // (B, H, C + 1) exclusive
        var rank = arange(2 * seqLen, dtype: ScalarType.Int64, device: device).view(1, 1, 2 * seqLen)
                   - runStart.gather(2, bucketSorted);                                 // (B, H, 2T) members before, same cluster
        var chunk = rank.div(window, rounding_mode: RoundingMode.floor);
        var slot = rank - chunk * window;
        var chunks = (counts.narrow(2, 0, clusters) + (window - 1)).div(window, rounding_mode: RoundingMode.floor); // (B, H, C)
        var groupStart = chunks.cumsum(2) - chunks;                                    // (B, H, C) exclusive
        long groups = Math.Max(1, chunks.sum(2).max().item<long>());
        var group = groupStart.gather(2, bucketSorted.clamp_max(clusters - 1)) + chunk; // (B, H, 2T)

        long slots = groups * window, dummy = slots;                                   // one extra slot swallows non-members
        var flat = group * window + slot;                                              // (B, H, 2T)
        Tensor Place(Tensor member) =>
            full(new long[] { batch, heads, slots + 1 }, -1L, dtype: ScalarType.Int64, device: device)
                .scatter(2, flat.masked_fill(member.logical_not(), dummy), posSorted)  // (B, H, G·W + 1)
                .narrow(2, 0, slots).view(batch, heads, groups, window);               // (B, H, G, W)
        var queryIdx = Place(querySorted);
        var keyIdx = Place(keySorted);
        var groupClusters = full(new long[] { batch, heads, groups + 1 }, -1L, dtype: ScalarType.Int64, device: device)
                            .scatter(2, group.masked_fill(routedSorted.logical_not(), groups), bucketSorted)
                            .narrow(2, 0, groups).contiguous();                        // (B, H, G)
        return (queryIdx.MoveToOuterDisposeScope(), keyIdx.MoveToOuterDisposeScope(), groupClusters.MoveToOuterDisposeScope());
    }

    /// <summary>Memory rows per group: memory (H, C, M, D), groupClusters (B, H, G) → (B, H, G, M, D).
    /// Unused groups (−1) get cluster 0's memory; they have no queries.</summary>
    private static Tensor MemoryPerGroup(Tensor memory, Tensor groupClusters)
    {
        long batch = groupClusters.shape[0], h = groupClusters.shape[1], g = groupClusters.shape[2];
        long c = memory.shape[1], m = memory.shape[2], d = memory.shape[3];
        var index = groupClusters.clamp_min(0).view(batch, h, g, 1, 1).expand(batch, h, g, m, d);  // (B, H, G, M, D)
        return memory.unsqueeze(0).expand(batch, h, c, m, d).gather(2, index);                     // (B, H, G, M, D)
    }
}
