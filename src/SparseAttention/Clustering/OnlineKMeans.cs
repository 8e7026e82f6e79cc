using SparseAttention.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Clustering;

/// <summary>How <see cref="OnlineKMeans"/> normalises the vectors it clusters (and its centroids): both
/// give a cosine-like geometry in which "nearest centroid" is "largest dot product".</summary>
public enum KMeansNorm
{
    /// <summary>Divide by the L2 norm (unit vectors), as the PyTorch routing-transformer library does.</summary>
    L2,

    /// <summary>Layer normalisation over the feature dimension without scale or bias (mean 0, variance 1,
    /// norm √D), as the Routing Transformer authors do.</summary>
    LayerNorm,
}

/// <summary>Result of one <see cref="OnlineKMeans"/> forward.</summary>
/// <param name="Normalized">(B, H, T, D) the normalised input; carries gradients (shared-QK routing uses it as the keys).</param>
/// <param name="Similarities">(B, H, T, C) dot products with the centroids this forward used; no gradient;
/// 0 at padded positions.</param>
/// <param name="Nearest">(B, H, T) int64 index of the nearest centroid (argmax similarity); −1 at padded positions.</param>
/// <param name="Loss">Scalar commitment loss <c>commitment_factor · mse(x_normalised, means[nearest])</c> over real
/// tokens (centroids detached); 0 when there is no real token.</param>
public sealed record KMeansOutput(Tensor Normalized, Tensor Similarities, Tensor Nearest, Tensor Loss);

/// <summary>
/// Online spherical k-means per head: the centroid buffer <c>means</c> (H, C, D) of the Routing Transformer,
/// moved by exponential moving averages of the vectors assigned to each centroid.
/// </summary>
/// <remarks>
/// <para>Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing Transformers",
/// TACL 2021, arXiv 2003.05997.</para>
/// <para><b>State.</b> <c>means</c> (heads × clusters × dim) and <c>initted</c> (bool scalar) are registered buffers,
/// so both are in the state dict and survive save/load. Before the first training batch, <c>means</c> holds random
/// normalised vectors drawn from the constructor's seed, so an uninitialised module can still be run in eval mode:
/// it then routes by those random directions (like random-projection hashing) and changes nothing.</para>
/// <para><b>Initialisation.</b> On the first training forward (not suspended), the centroids are set from C random
/// real (non-padding) tokens of that batch — drawn with a generator seeded in the constructor, so deterministic —
/// refined by <c>initIterations</c> Lloyd iterations, each renormalised, on a random subset of at most max(32·C, 4096) real tokens per head (all of them when there are fewer). A batch without any real token leaves the
/// module uninitialised.</para>
/// <para><b>A forward uses the centroids as they stood when it began.</b> Similarities, assignments and the
/// commitment loss of a forward are computed with a snapshot of <c>means</c> taken before any initialisation or
/// update that this forward triggers; those take effect from the next forward. In particular the initialising
/// forward routes with the seeded random centroids. This is what keeps causal routing causal: the batch (including
/// future tokens) can only influence the centroids used by <i>later</i> forwards.</para>
/// <para><b>Update policy.</b> A training forward only <i>accumulates</i> statistics (per-cluster sums of the assigned
/// normalised vectors and their counts; padding excluded). <see cref="Update"/> applies ONE step
/// <c>means ← normalise(decay·means + (1 − decay)·batch_mean)</c> from everything accumulated since the previous
/// update and clears the statistics; clusters that received no vector keep their mean. So k micro-batches of
/// gradient accumulation followed by one <see cref="Update"/> equal one step on their union, and every micro-batch
/// of an optimizer step routes with the same centroids. Inside a model (<see cref="BeginModelForward"/>) that step is
/// taken automatically at the first training forward after the gradients were reset (<see cref="AutoUpdate"/>); a bare
/// module needs <see cref="Update"/> (or <see cref="UpdateAll"/>) once after each optimizer step. <see cref="UpdateOnForward"/> (default <c>false</c>) restores the PyTorch library's
/// behaviour of one EMA step per training forward; it is off by default because that behaviour takes several steps
/// per optimizer step under gradient accumulation and would step again during a reversible recompute.</para>
/// <para><b>Data parallelism.</b> With a <see cref="StatisticsReducer"/>, the statistics are summed over the replicas
/// just before each EMA step and initialisation runs on the union of the replicas' batches, so N replicas with batch b
/// keep the centroids of one process with batch N·b.</para>
/// <para><b>Eval mode</b> never initialises or accumulates. <see cref="SuspendUpdates()"/> gives the same guarantee in
/// training mode for the duration of a <c>using</c> scope (for reversible-layer or checkpoint recomputes).</para>
/// <para>Pending statistics are transient: they are not part of the state dict and are kept in float64 on the
/// centroids' device.</para>
/// <para><b>Gradient-trained centroids</b> (<see cref="TrainCentroidsByGradient"/>, the authors' <c>ema = false</c>):
/// <c>means</c> becomes a parameter that the optimizer moves; a forward routes with <c>normalise(means)</c> and its loss
/// adds the codebook term of VQ-VAE, mse(normalise(means)[nearest], sg(x)) with weight 1, which pulls each centroid
/// toward the tokens assigned to it (the commitment term on x keeps its factor). The first training forward still
/// initialises them from data; no statistics are accumulated and <see cref="Update"/> does nothing.</para>
/// </remarks>
public sealed class OnlineKMeans : nn.Module<Tensor, Tensor?, KMeansOutput>
{
    // Buffers (registered by RegisterComponents; PyTorch-style names so state dicts read alike).
    private Tensor means;      // (H, C, D)
    private Tensor initted;    // () bool

    // Not tensors: invisible to RegisterComponents and to module.to(...).
    private readonly Generator generator;
    private readonly PendingStatistics pending = new();
    private readonly int heads, dim, clusters, initIterations;
    private readonly double emaDecay, commitmentFactor;
    private readonly KMeansNorm norm;
    private const long InitSamplesPerCluster = 32, InitMinSamples = 4096;   // Lloyd iterations at initialisation see at most max(32·C, 4096) tokens
    private int suspendDepth;
    private int modelForwardDepth;   // > 0 inside BeginModelForward: initialisation and UpdateOnForward steps wait for its end
    private Tensor? initialMeans;    // (H, C, D) computed by an initialising forward inside a model forward, applied at its end
    private bool backwardSeen;       // a backward ran through a model output since the last automatic update
    private bool byGradient;         // means is a parameter trained by gradient (TrainCentroidsByGradient)

    /// <param name="heads">Number of heads H; each head has its own centroids.</param>
    /// <param name="dim">Feature size D of the clustered vectors.</param>
    /// <param name="clusters">Number of centroids C per head.</param>
    /// <param name="emaDecay">EMA decay in [0, 1) (<c>kmeans_ema_decay</c>, default 0.999).</param>
    /// <param name="commitmentFactor">Weight of the commitment loss (<c>commitment_factor</c>, default 1e-4), ≥ 0.</param>
    /// <param name="norm">How vectors and centroids are normalised.</param>
    /// <param name="seed">Seed of the random initial centroids and of the sampling at initialisation.</param>
    /// <param name="initIterations">Lloyd iterations refining the sampled initial centroids (default 10).</param>
    /// <param name="name">Module name.</param>
    public OnlineKMeans(int heads, int dim, int clusters, double emaDecay = 0.999, double commitmentFactor = 1e-4,
        KMeansNorm norm = KMeansNorm.L2, long seed = 0, int initIterations = 10, string name = "kmeans") : base(name)
    {
        Check.Positive(heads, nameof(heads));
        Check.Positive(dim, nameof(dim));
        Check.Positive(clusters, nameof(clusters));
        Check.NonNegative(initIterations, nameof(initIterations));
        Check.That(emaDecay >= 0 && emaDecay < 1, nameof(emaDecay), $"must be in [0, 1), got {emaDecay}.");
        Check.That(commitmentFactor >= 0 && double.IsFinite(commitmentFactor), nameof(commitmentFactor), $"must be finite and >= 0, got {commitmentFactor}.");
        Check.That(Enum.IsDefined(norm), nameof(norm), $"unknown normalisation {norm}.");
        this.heads = heads;
        this.dim = dim;
        this.clusters = clusters;
        this.emaDecay = emaDecay;
        this.commitmentFactor = commitmentFactor;
        this.norm = norm;
        this.initIterations = initIterations;
        generator = new Generator((ulong)seed);
        using (no_grad())
            means = Normalize(randn(new long[] { heads, clusters, dim }, generator: generator)).DetachFromDisposeScope();  // (H, C, D)
        initted = tensor(false).DetachFromDisposeScope();
        RegisterComponents();
    }

    public int Heads => heads;
    public int Dim => dim;
    public int Clusters => clusters;
    public double EmaDecay => emaDecay;
    public double CommitmentFactor => commitmentFactor;
    public KMeansNorm Norm => norm;

    /// <summary>When true, every training forward that accumulates statistics immediately applies
    /// <see cref="Update"/> (the PyTorch library's behaviour). Default false: call <see cref="Update"/> yourself
    /// once per optimizer step (see the class remarks for why).</summary>
    public bool UpdateOnForward { get; set; }

    /// <summary>Inside a model (<see cref="BeginModelForward"/>): apply pending statistics at the start of the first training
    /// forward after the model's gradients were reset (an optimizer step's <c>zero_grad</c>), so a plain training loop
    /// moves the centroids once per optimizer step without calling <see cref="Update"/>. Default true; set false when
    /// you drive <see cref="Update"/> yourself (an explicit call simply leaves nothing pending for this to apply).</summary>
    public bool AutoUpdate { get; set; } = true;

    /// <summary>Data-parallel replicas (null = this process alone, the default): when set, pending statistics are summed
    /// over all replicas before every EMA step and the initialising batch is the union of all replicas' batches, so every
    /// replica keeps the centroids one process would have on the union of their batches.</summary>
    public IStatisticsReducer? StatisticsReducer { get; set; }

    /// <summary>Sets <see cref="StatisticsReducer"/> of every <see cref="OnlineKMeans"/> in <paramref name="root"/> (itself included).</summary>
    public static void SetStatisticsReducer(nn.Module root, IStatisticsReducer? reducer)
    {
        ArgumentNullException.ThrowIfNull(root);
        foreach (var k in FindAll(root)) k.StatisticsReducer = reducer;
    }

    /// <summary>Use <see cref="FusedKMeansAssign"/> for float32 CPU forwards without similarities (default); false
    /// forces the tensor-ops path (the oracle of the fused one in tests).</summary>
    internal bool UseFusedAssign { get; set; } = true;

    /// <summary>true — centroids move by EMA (the default); false after <see cref="TrainCentroidsByGradient"/>.</summary>
    public bool Ema => !byGradient;

    /// <summary>
    /// Turns the centroids into a trained parameter (the Routing Transformer authors' <c>ema = false</c>): the
    /// <c>means</c> buffer becomes the parameter <c>means</c> (same name and value, so state dicts keep their key), the
    /// loss gains the codebook term that pulls the centroids (see the remarks), and no EMA statistics are kept. Call it
    /// before training starts (pending statistics are dropped); it cannot be undone.
    /// </summary>
    public void TrainCentroidsByGradient()
    {
        if (byGradient) return;
        DiscardPendingStatistics();
        var parameter = new TorchSharp.Modules.Parameter(means.detach().clone());
        _internal_buffers.Remove("means");
        register_parameter("means", parameter);
        means.Dispose();
        means = parameter;
        byGradient = true;
    }

    /// <summary>Whether the centroids have been initialised from data (the <c>initted</c> buffer).</summary>
    public bool IsInitialized => initted.item<bool>();

    /// <summary>Whether statistics are waiting for <see cref="Update"/>.</summary>
    public bool HasPendingStatistics => pending.Counts is not null;

    /// <summary>True inside a <see cref="SuspendUpdates()"/> scope.</summary>
    public bool UpdatesSuspended => suspendDepth > 0;

    /// <summary>A copy of the centroids (H, C, D) a forward routes with (normalised first when trained by gradient).</summary>
    public Tensor Means
    {
        get
        {
            using var scope = NewDisposeScope();                                           // the detached view is a temporary
            return (byGradient ? Normalize(means.detach()) : means.detach().clone()).MoveToOuterDisposeScope();
        }
    }

    /// <summary>A copy of the stored centroids (H, C, D) as they are (not normalised when trained by gradient): the snapshot
    /// <see cref="RouteWith"/> restores exactly.</summary>
    internal Tensor StoredMeans
    {
        get
        {
            using var scope = NewDisposeScope();
            return means.detach().clone().MoveToOuterDisposeScope();
        }
    }

    /// <summary>Sets the centroids to <c>normalise(<paramref name="newMeans"/>)</c> and marks the module initialised.
    /// Pending statistics are discarded.</summary>
    /// <param name="newMeans">(H, C, D) floating point.</param>
    public void SetMeans(Tensor newMeans)
    {
        Check.Shape(newMeans, nameof(newMeans), "(H, C, D)", heads, clusters, dim);
        Check.FloatingPoint(newMeans, nameof(newMeans));
        using var scope = NewDisposeScope();
        using (no_grad())
        {
            means.copy_(Normalize(newMeans.detach().to(ScalarType.Float64)).to(means.dtype, means.device));
            initted.fill_(true);
        }
        initialMeans?.Dispose();
        initialMeans = null;
        DiscardPendingStatistics();
    }

    /// <summary>Normalises the last dimension the way this module clusters (L2 or LayerNorm without affine).</summary>
    public Tensor Normalize(Tensor x) => norm switch
    {
        KMeansNorm.L2 => nn.functional.normalize(x, p: 2, dim: -1, eps: 1e-12),
        _ => nn.functional.layer_norm(x, new long[] { x.shape[^1] }, null, null, 1e-5),
    };

    /// <summary>
    /// Normalises <paramref name="x"/>, assigns every real token to its nearest centroid and computes the commitment
    /// loss. In training mode (and not suspended) it then initialises the centroids if needed and accumulates this
    /// batch's statistics for <see cref="Update"/> (applying it at once when <see cref="UpdateOnForward"/>).
    /// </summary>
    /// <param name="x">(B, H, T, D) vectors to cluster.</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token, false = padding (excluded from every
    /// statistic, from initialisation and from the loss).</param>
    public override KMeansOutput forward(Tensor x, Tensor? keyMask = null) => Forward(x, keyMask, similarities: true);

    /// <summary><see cref="forward"/>, optionally without materialising the (B, H, T, C) similarities (then
    /// <see cref="KMeansOutput.Similarities"/> is an empty tensor); the nearest centroids are then found in chunks
    /// of tokens, or for float32 CPU input by <see cref="FusedKMeansAssign"/> in one pass, so no (B, H, T, C)
    /// temporary is ever allocated.</summary>
    internal KMeansOutput Forward(Tensor x, Tensor? keyMask, bool similarities)
    {
        Check.Shape(x, nameof(x), "(B, H, T, D)", -1, heads, -1, dim);
        Check.FloatingPoint(x, nameof(x));
        Check.KeyMask(keyMask, x.shape[0], x.shape[2]);
        using var scope = NewDisposeScope();
        var r = ForwardParts([x], keyMask, similarities);
        return new KMeansOutput(r.Normalized[0].MoveToOuterDisposeScope(), r.Similarities[0].MoveToOuterDisposeScope(),
            r.Nearest[0].MoveToOuterDisposeScope(), r.Loss.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// <see cref="Forward"/> on <c>cat(parts, 2)</c> without building the concatenation: every part is
    /// (B, H, T, D) with the same B and T, and <paramref name="keyMask"/> (B, T) applies to each part. Returns the
    /// per-part normalised inputs, similarities (empty unless <paramref name="similarities"/>) and nearest
    /// centroids, and the loss over all parts — the same as one forward on the concatenation.
    /// </summary>
    internal (Tensor[] Normalized, Tensor[] Similarities, Tensor[] Nearest, Tensor Loss) ForwardParts(
        Tensor[] parts, Tensor? keyMask, bool similarities, bool normalized = true)
    {
        foreach (var part in parts)
            Check.Shape(part, nameof(parts), "(B, H, T, D)", parts[0].shape[0], heads, parts[0].shape[2], dim);
        return ForwardParts(parts, parts.Select(_ => keyMask).ToArray(), similarities, normalized);
    }

    /// <summary>
    /// <see cref="ForwardParts(Tensor[], Tensor?, bool, bool)"/> for parts of different lengths, each with its own mask:
    /// part p is (B, H, T_p, D) and <paramref name="masks"/>[p] is null or (B, T_p) bool (true = real token). Used by
    /// routing cross-attention, which clusters the decoder's queries together with the context's keys.
    /// </summary>
    /// <remarks>With <paramref name="normalized"/> false the caller does not need the normalised inputs; for float32 CPU
    /// inputs without similarities they are then never materialised (<see cref="FusedKMeansAssign"/>) and the returned
    /// Normalized tensors are empty.</remarks>
    internal (Tensor[] Normalized, Tensor[] Similarities, Tensor[] Nearest, Tensor Loss) ForwardParts(
        Tensor[] parts, Tensor?[] masks, bool similarities, bool normalized = true)
    {
        Check.That(parts.Length > 0 && masks.Length == parts.Length, nameof(masks), $"needs one mask (or null) per part, got {masks.Length} for {parts.Length} parts.");
        var x0 = parts[0];
        for (int p = 0; p < parts.Length; p++)
        {
            Check.Shape(parts[p], nameof(parts), "(B, H, T, D)", x0.shape[0], heads, -1, dim);
            Check.SameDtype(x0, nameof(parts), parts[p], nameof(parts));
            Check.KeyMask(masks[p], x0.shape[0], parts[p].shape[2]);
        }
        long batch = x0.shape[0];
        int count = parts.Length;

        using var scope = NewDisposeScope();
        // (H, C, D) snapshot used by this forward; trained by gradient, the normalised parameter itself (with its graph).
        var trained = byGradient ? Normalize(means.to(x0.dtype, x0.device)) : null;
        var centroids = trained?.detach() ?? means.detach().to(x0.dtype, x0.device).clone();
        if (!similarities && UseFusedAssign && !byGradient && FusedKMeansAssign.Supports(x0))
            return ForwardPartsFused(parts, masks, centroids, normalized);
        var normalizedParts = new Tensor[count];
        var sims = new Tensor[count];
        var nearest = new Tensor[count];
        var real = new Tensor[count];
        Tensor? sums = null, counts = null, squares = null;
        for (int p = 0; p < count; p++)
        {
            var padding = masks[p]?.logical_not().view(batch, 1, parts[p].shape[2]);  // (B, 1, T_p)
            // Padding rows are zeroed before normalising: NaN there would otherwise reach the gradient (0 · NaN).
            var clean = padding is null ? parts[p] : parts[p].masked_fill(padding.unsqueeze(-1), 0);
            normalizedParts[p] = Normalize(clean);                                // (B, H, T_p, D)
            using (no_grad())
            {
                if (similarities)
                {
                    sims[p] = einsum("bhtd,hcd->bhtc", normalizedParts[p], centroids);  // (B, H, T, C)
                    nearest[p] = sims[p].argmax(-1);                              // (B, H, T)
                    if (padding is not null) sims[p] = sims[p].masked_fill(padding.unsqueeze(-1), 0);
                }
                else
                {
                    sims[p] = empty(0, dtype: x0.dtype, device: x0.device);
                    nearest[p] = NearestInChunks(normalizedParts[p], centroids);  // (B, H, T)
                }
                if (padding is not null) nearest[p] = nearest[p].masked_fill(padding, -1);
            }
            // Commitment loss without gathering the routed centroids: with S_c = Σ_{t→c} x_t (the per-cluster sums,
            // which the statistics need anyway) and n_c the counts, Σ_t |x_t − μ_{a(t)}|² = Σ_t |x_t|² − 2 Σ_c μ_c·S_c
            // + Σ_c n_c |μ_c|². The gradient (through x and S) is 2 (x_t − μ_{a(t)}), as before.
            real[p] = padding is null ? normalizedParts[p] : normalizedParts[p].masked_fill(padding.unsqueeze(-1), 0);  // NaN in padding hidden
            var (partSums, partCounts) = ClusterSums(real[p], nearest[p]);        // (H, C, D) with grad, (H, C)
            var flat = real[p].reshape(-1);
            var partSquares = flat.dot(flat);
            sums = sums is null ? partSums : sums + partSums;
            counts = counts is null ? partCounts : counts + partCounts;
            squares = squares is null ? partSquares : squares + partSquares;
        }
        var squared = squares! - 2 * (sums! * centroids).sum() + (counts! * centroids.square().sum(-1)).sum();
        var elements = RealElements(parts, masks).clamp_min(1);
        var loss = squared / elements * commitmentFactor;
        if (trained is not null)                                                   // codebook term: centroids toward sg(x)
            loss = loss + (squares!.detach() - 2 * (sums!.detach() * trained).sum() + (counts! * trained.square().sum(-1)).sum()) / elements;
        AfterForward(parts, masks, () => real, sums!, counts!);
        return (normalizedParts.Select(t => t.MoveToOuterDisposeScope()).ToArray(), sims.Select(t => t.MoveToOuterDisposeScope()).ToArray(),
            nearest.Select(t => t.MoveToOuterDisposeScope()).ToArray(), loss.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// <see cref="ForwardParts(Tensor[], Tensor?[], bool, bool)"/> for float32 CPU inputs without similarities: one
    /// fused pass per part (<see cref="FusedKMeansAssign"/>) gives the nearest centroids, the per-cluster statistics and
    /// the commitment distance, with the normalisation's Jacobian in its backward. Runs inside the caller's dispose scope.
    /// </summary>
    private (Tensor[] Normalized, Tensor[] Similarities, Tensor[] Nearest, Tensor Loss) ForwardPartsFused(
        Tensor[] parts, Tensor?[] masks, Tensor centroids, bool keepNormalized)
    {
        var x0 = parts[0];
        int count = parts.Length;
        var normalizedParts = new Tensor[count];
        var nearest = new Tensor[count];
        Tensor? squared = null, sums = null, counts = null;
        for (int p = 0; p < count; p++)
        {
            var r = FusedKMeansAssign.Assign(parts[p], masks[p], centroids, norm, FusedBlockSparseAttention.DefaultThreads);
            nearest[p] = r.Nearest;                                                // (B, H, T_p)
            normalizedParts[p] = keepNormalized ? Normalize(parts[p]) : empty(0, dtype: x0.dtype, device: x0.device);
            squared = squared is null ? r.Squared : squared + r.Squared;
            sums = sums is null ? r.Sums : sums + r.Sums;                          // (H, C, D) float64
            counts = counts is null ? r.Counts : counts + r.Counts;                // (H, C) float64
        }
        var loss = squared! / RealElements(parts, masks).clamp_min(1) * commitmentFactor;
        // Only an initialising forward needs the normalised tokens themselves.
        AfterForward(parts, masks, () => parts.Select((x, p) => RealNormalized(x.detach(), masks[p])).ToArray(), sums!, counts!);
        return (normalizedParts.Select(t => t.MoveToOuterDisposeScope()).ToArray(),
            parts.Select(_ => empty(0, dtype: x0.dtype, device: x0.device).MoveToOuterDisposeScope()).ToArray(),
            nearest.Select(t => t.MoveToOuterDisposeScope()).ToArray(), loss.MoveToOuterDisposeScope());
    }

    /// <summary>Normalised x (B, H, T, D) with padding rows zeroed (NaN there hidden).</summary>
    private Tensor RealNormalized(Tensor x, Tensor? keyMask)
    {
        var normalized = Normalize(x);
        return keyMask is null ? normalized : normalized.masked_fill(keyMask.logical_not().view(x.shape[0], 1, x.shape[2], 1), 0);
    }

    /// <summary>Real tokens × H × D over all parts, as a scalar of the parts' dtype.</summary>
    private Tensor RealElements(Tensor[] parts, Tensor?[] masks)
    {
        var x0 = parts[0];
        long batch = x0.shape[0];
        Tensor elements = tensor(0.0, dtype: x0.dtype, device: x0.device);
        for (int p = 0; p < parts.Length; p++)
            elements = elements + (masks[p] is Tensor m ? m.sum().to(x0.dtype) : tensor((double)(batch * parts[p].shape[2]), dtype: x0.dtype, device: x0.device)) * (heads * dim);
        return elements;
    }

    /// <summary>In training mode (not suspended): initialise from this batch if needed (from <paramref name="realParts"/>,
    /// the normalised parts with padding zeroed), else accumulate the batch's statistics.</summary>
    private void AfterForward(Tensor[] parts, Tensor?[] masks, Func<Tensor[]> realParts, Tensor sums, Tensor counts)
    {
        if (!training || suspendDepth != 0) return;
        var x0 = parts[0];
        long batch = x0.shape[0];
        int count = parts.Length;
        using (no_grad())
        {
            if (!IsInitialized)
            {
                var real = realParts();
                if (initialMeans is null)
                {
                    var all = count == 1 ? real[0].detach() : cat(real.Select(t => t.detach()).ToArray(), 2);     // (B, H, ΣT_p, D)
                    var allMask = masks.All(m => m is null) ? null : count == 1 ? masks[0]
                        : cat(masks.Select((m, p) => m ?? ones(batch, parts[p].shape[2], dtype: ScalarType.Bool, device: x0.device)).ToArray(), 1);
                    if (StatisticsReducer is { } reducer)
                    {
                        // Every replica initialises from the union of all replicas' batches: the same centroids everywhere.
                        allMask = reducer.Concatenate(allMask ?? ones(batch, all.shape[2], dtype: ScalarType.Bool, device: x0.device));  // (ΣB, ΣT_p)
                        all = reducer.Concatenate(all);                                                                            // (ΣB, H, ΣT_p, D)
                    }
                    initialMeans = Initialize(all, allMask)?.DetachFromDisposeScope();
                    if (initialMeans is null) return;                            // no real token: stay uninitialised
                }
                // This batch's statistics, assigned to the centroids it initialised (not to the random ones it routed with).
                var fresh = initialMeans.to(x0.dtype, x0.device);               // (H, C, D)
                Tensor? freshSums = null, freshCounts = null;
                for (int p = 0; p < count; p++)
                {
                    var assignment = NearestInChunks(real[p].detach(), fresh);   // (B, H, T_p)
                    if (masks[p] is Tensor m) assignment = assignment.masked_fill(m.logical_not().view(batch, 1, parts[p].shape[2]), -1);
                    var (ps, pc) = ClusterSums(real[p].detach(), assignment);
                    freshSums = freshSums is null ? ps : freshSums + ps;
                    freshCounts = freshCounts is null ? pc : freshCounts + pc;
                }
                if (!byGradient) Accumulate(freshSums!, freshCounts!);
            }
            else if (!byGradient) Accumulate(sums.detach(), counts);
            if (modelForwardDepth == 0) ApplyDeferred();
        }
    }

    /// <summary>Writes centroids an initialising forward computed, then (with <see cref="UpdateOnForward"/>) the EMA step.</summary>
    private void ApplyDeferred()
    {
        if (initialMeans is not null)
        {
            using (no_grad())
            {
                means.copy_(initialMeans.to(means.dtype, means.device));
                initted.fill_(true);
            }
            initialMeans.Dispose();
            initialMeans = null;
        }
        if (UpdateOnForward) Update();
    }

    /// <summary>
    /// The nearest centroid of every token of <paramref name="x"/> (B, H, T, D) among <paramref name="centroids"/>
    /// (H, C, D, a snapshot in x's dtype), chosen by the same computation a forward without similarities uses (fused
    /// for float32 CPU, else chunked), so a token gets the cluster it gets in a forward — without the loss, the
    /// statistics or any update. For incremental decoding, one token at a time. Returns (B, H, T) int64.
    /// </summary>
    internal Tensor NearestOf(Tensor x, Tensor centroids)
    {
        using var scope = NewDisposeScope();
        var nearest = UseFusedAssign && FusedKMeansAssign.Supports(x)
            ? FusedKMeansAssign.Assign(x, null, centroids, norm, threads: 1).Nearest
            : NearestInChunks(Normalize(x), centroids);
        return nearest.MoveToOuterDisposeScope();
    }

    /// <summary>argmax over centroids of x·μ, in chunks of tokens: x (B, H, T, D), centroids (H, C, D) → (B, H, T).</summary>
    private Tensor NearestInChunks(Tensor x, Tensor centroids)
    {
        long batch = x.shape[0], t = x.shape[2];
        long chunk = Math.Max(1, (1L << 21) / Math.Max(1, batch * heads * clusters));   // ≤ 2M similarities (8 MB) at a time
        if (chunk >= t) return einsum("bhtd,hcd->bhtc", x, centroids).argmax(-1);
        var parts = new List<Tensor>();
        for (long s = 0; s < t; s += chunk)
        {
            long len = Math.Min(chunk, t - s);
            using var part = einsum("bhtd,hcd->bhtc", x.narrow(2, s, len), centroids);   // (B, H, len, C)
            parts.Add(part.argmax(-1));
        }
        return cat(parts, 2);
    }

    /// <summary>Per-(head, cluster) sums and counts by index-add (O(T·D)): x (B, H, T, D) with padding zeroed,
    /// assignment (B, H, T) with −1 = none → sums (H, C, D) in x's dtype (differentiable) and counts (H, C).</summary>
    private (Tensor Sums, Tensor Counts) ClusterSums(Tensor x, Tensor assignment)
    {
        long batch = x.shape[0], t = x.shape[2];
        var headOffset = (arange(heads, device: assignment.device) * clusters).view(1, heads, 1);   // (1, H, 1)
        var valid = assignment.ge(0);                                                            // (B, H, T)
        var slot = (assignment.clamp_min(0) + headOffset).masked_fill(valid.logical_not(), heads * clusters)
                   .flatten();                                                                   // (B·H·T), padding → spare row
        var sums = zeros(heads * clusters + 1, dim, dtype: x.dtype, device: x.device)
                   .index_add(0, slot, x.reshape(batch * heads * t, dim), 1.0).narrow(0, 0, heads * clusters)
                   .view(heads, clusters, dim);                                                  // (H, C, D)
        var counts = zeros(heads * clusters + 1, dtype: x.dtype, device: x.device)
                     .index_add_(0, slot, ones(slot.shape[0], dtype: x.dtype, device: x.device), 1.0)
                     .narrow(0, 0, heads * clusters).view(heads, clusters);                      // (H, C)
        return (sums, counts);
    }

    /// <summary>
    /// Applies one EMA step from the statistics accumulated since the last update and clears them:
    /// for every cluster with at least one assigned vector,
    /// <c>means ← normalise(decay·means + (1 − decay)·(sum / count))</c>; empty clusters keep their mean.
    /// Works in any mode (statistics are only ever accumulated in training mode).
    /// </summary>
    /// <returns>Whether there was anything to apply.</returns>
    public bool Update()
    {
        if (pending.Counts is null || pending.Sums is null) return false;
        ReducePending([this]);
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            var counts = pending.Counts.to(means.device);                          // (H, C)
            var sums = pending.Sums.to(means.device);                              // (H, C, D)
            var old = means.to(ScalarType.Float64);                               // (H, C, D)
            var batchMean = sums / counts.clamp_min(1).unsqueeze(-1);             // (H, C, D)
            var moved = Normalize(old * emaDecay + batchMean * (1 - emaDecay));   // (H, C, D)
            var next = where(counts.gt(0).unsqueeze(-1), moved, old);             // empty clusters keep their mean
            means.copy_(next.to(means.dtype));
        }
        DiscardPendingStatistics();
        return true;
    }

    /// <summary>Drops accumulated statistics without applying them.</summary>
    public void DiscardPendingStatistics()
    {
        pending.Sums?.Dispose();
        pending.Counts?.Dispose();
        pending.Sums = null;
        pending.Counts = null;
        pending.Reduced = false;
    }

    /// <summary>Sums the pending statistics of <paramref name="modules"/> over the replicas of their
    /// <see cref="StatisticsReducer"/>: one collective call per reducer, however many modules.</summary>
    private static void ReducePending(IEnumerable<OnlineKMeans> modules)
    {
        foreach (var group in modules.Where(k => k.StatisticsReducer is not null && k.HasPendingStatistics && !k.pending.Reduced)
                                     .GroupBy(k => k.StatisticsReducer!))
        {
            var members = group.ToList();
            group.Key.SumInPlace(members.SelectMany(k => new[] { k.pending.Sums!, k.pending.Counts! }).ToList());
            foreach (var k in members) k.pending.Reduced = true;
        }
    }

    /// <summary>Suspends initialisation and accumulation (in training mode) until the returned scope is disposed.
    /// Scopes nest. Use around a reversible-layer or checkpoint recompute.</summary>
    public IDisposable SuspendUpdates()
    {
        suspendDepth++;
        return new Resume(() => suspendDepth--);
    }

    /// <summary>Suspends every <see cref="OnlineKMeans"/> in <paramref name="root"/> (itself included).</summary>
    public static IDisposable SuspendUpdates(nn.Module root)
    {
        ArgumentNullException.ThrowIfNull(root);
        var scopes = FindAll(root).Select(k => k.SuspendUpdates()).ToList();
        return new Resume(() => scopes.ForEach(s => s.Dispose()));
    }

    /// <summary>Calls <see cref="Update"/> on every <see cref="OnlineKMeans"/> in <paramref name="root"/> (itself included).</summary>
    /// <returns>How many modules applied a step.</returns>
    public static int UpdateAll(nn.Module root)
    {
        ArgumentNullException.ThrowIfNull(root);
        var all = FindAll(root).ToList();
        ReducePending(all);
        return all.Count(k => k.Update());
    }

    /// <summary>
    /// Marks one forward of a model that may call the same <see cref="OnlineKMeans"/> several times (weight-tied layers):
    /// until the returned scope is disposed, an initialisation or <see cref="UpdateOnForward"/> step that a call triggers
    /// waits, so every call of this model forward routes with the centroids the forward began with — a causal model stays
    /// causal even when layer 1's batch (future tokens included) would otherwise initialise the centroids layer 2 routes
    /// with. In training mode it first takes the <see cref="AutoUpdate"/> step: pending statistics are applied when a
    /// backward has run through an earlier forward's output (<see cref="ModelForward.Watch"/>) and the model's gradients
    /// have been reset since (its smallest trainable parameter's gradient is null or zero) — so micro-batches of gradient
    /// accumulation, which run between two resets, are applied together as one step, and forwards without a backward
    /// (inference in training mode) never move the centroids.
    /// </summary>
    /// <param name="root">The model; every <see cref="OnlineKMeans"/> in it takes part.</param>
    public static ModelForward BeginModelForward(nn.Module root)
    {
        ArgumentNullException.ThrowIfNull(root);
        if (!root.training) return new ModelForward([]);                                  // eval never initialises or accumulates
        var all = FindAll(root).Where(k => k.training).ToList();
        if (all.Count == 0) return new ModelForward([]);
        bool outermost = all.All(k => k.modelForwardDepth == 0 && k.suspendDepth == 0);
        var due = all.Where(k => k.AutoUpdate && !k.UpdateOnForward && k.backwardSeen && k.HasPendingStatistics).ToList();
        if (outermost && due.Count > 0 && GradientsReset(root))
        {
            ReducePending(due);
            foreach (var k in due)
            {
                k.Update();
                k.backwardSeen = false;
            }
        }
        foreach (var k in all) k.modelForwardDepth++;
        return new ModelForward(all);
    }

    /// <summary>One model forward (<see cref="BeginModelForward"/>); disposing it applies what the forward deferred.</summary>
    public sealed class ModelForward : IDisposable
    {
        private readonly List<OnlineKMeans> members;
        private bool disposed;

        internal ModelForward(List<OnlineKMeans> members) => this.members = members;

        /// <summary>Returns <paramref name="output"/> unchanged, recording in the k-means modules when a backward passes
        /// through it (what <see cref="AutoUpdate"/> waits for). Identity outside training or without gradients.</summary>
        /// <param name="output">The model's output (any shape).</param>
        public Tensor Watch(Tensor output)
        {
            if (members.Count == 0 || !is_grad_enabled() || !output.requires_grad) return output;
            return BackwardMarker.apply(output, members);
        }

        public void Dispose()
        {
            if (disposed) return;
            disposed = true;
            foreach (var k in members)
                if (--k.modelForwardDepth == 0 && k.suspendDepth == 0)
                    using (no_grad()) k.ApplyDeferred();
        }
    }

    /// <summary>Identity whose backward tells the k-means modules that a backward ran.</summary>
    private sealed class BackwardMarker : autograd.SingleTensorFunction<BackwardMarker>
    {
        public override string Name => "KMeansBackwardMarker";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            ctx.save_data("members", vars[1]);
            return ((Tensor)vars[0]).alias();
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            foreach (var k in (List<OnlineKMeans>)ctx.get_data("members")) k.backwardSeen = true;
            return [gradOutput, null!];
        }
    }

    /// <summary>Whether the smallest trainable parameter of <paramref name="root"/> has no gradient or a zero one
    /// (after <c>zero_grad</c>); a model without trainable parameters counts as reset.</summary>
    private static bool GradientsReset(nn.Module root)
    {
        var witness = root.parameters().Where(p => p.requires_grad).MinBy(p => p.numel());
        if (witness?.grad is not Tensor grad) return true;
        using var scope = NewDisposeScope();
        return grad.count_nonzero().item<long>() == 0;
    }

    /// <summary>Every <see cref="OnlineKMeans"/> in <paramref name="root"/> (itself included), in module order.</summary>
    internal static IReadOnlyList<OnlineKMeans> All(nn.Module root) => FindAll(root).ToList();

    /// <summary>
    /// Makes the centroids equal <paramref name="snapshot"/> (an earlier <see cref="StoredMeans"/>) until the returned scope
    /// is disposed, then puts the current ones back. Pending statistics and the initialised flag are untouched: a
    /// reversible-layer recompute routes exactly as the original forward did, even if that forward initialised or
    /// (with <see cref="UpdateOnForward"/>) moved the centroids afterwards.
    /// </summary>
    internal IDisposable RouteWith(Tensor snapshot)
    {
        Check.Shape(snapshot, nameof(snapshot), "(H, C, D)", heads, clusters, dim);
        var current = means.detach().clone().DetachFromDisposeScope();
        using (no_grad()) means.copy_(snapshot);
        return new Resume(() =>
        {
            using (no_grad()) means.copy_(current);
            current.Dispose();
        });
    }

    private static IEnumerable<OnlineKMeans> FindAll(nn.Module root) =>
        new[] { root }.Concat(root.modules()).OfType<OnlineKMeans>().Distinct();

    /// <summary>Gathers centroid rows per head: centroids (H, C, D), index (B, H, T) → (B, H, T, D).</summary>
    private static Tensor GatherCentroids(Tensor centroids, Tensor index)
    {
        long batch = index.shape[0], h = index.shape[1], t = index.shape[2], c = centroids.shape[1], d = centroids.shape[2];
        return centroids.unsqueeze(0).expand(batch, h, c, d)                     // (B, H, C, D)
                        .gather(2, index.unsqueeze(-1).expand(batch, h, t, d));  // (B, H, T, D)
    }

    /// <summary>Initial centroids from random real tokens refined by Lloyd iterations. <paramref name="real"/> is
    /// (B, H, T, D) normalised with padding zeroed. Returns the centroids (H, C, D) in the buffer's dtype and device, or null
    /// without real tokens; the buffer itself is not touched (see <see cref="ApplyDeferred"/>).</summary>
    private Tensor? Initialize(Tensor real, Tensor? keyMask)
    {
        using var scope = NewDisposeScope();
        long batch = real.shape[0], seqLen = real.shape[2];
        var flat = real.permute(1, 0, 2, 3).reshape(heads, batch * seqLen, dim); // (H, B·T, D)
        var realRows = keyMask is null
            ? arange(batch * seqLen, dtype: ScalarType.Int64)
            : keyMask.reshape(-1).cpu().nonzero().view(-1);                       // (N)
        long n = realRows.shape[0];
        if (n == 0) return null;
        long sample = Math.Max(InitSamplesPerCluster * (long)clusters, InitMinSamples);
        if (n > sample)
        {
            // Lloyd iterations on a random subset of the real tokens: the cost no longer grows with the batch.
            realRows = realRows.index_select(0, randperm(n, generator: generator).narrow(0, 0, sample)).sort().Values;
            n = sample;
        }
        var pick = n >= clusters
            ? randperm(n, generator: generator).narrow(0, 0, clusters)
            : randint(0, n, new long[] { clusters }, generator: generator);        // (C)
        var points = flat.index_select(1, realRows.to(real.device));               // (H, N, D)
        var current = points.index_select(1, pick.to(real.device));               // (H, C, D)
        for (int i = 0; i < initIterations; i++) current = LloydStep(points, current);
        return current.to(means.dtype, means.device).MoveToOuterDisposeScope();
    }

    /// <summary>One Lloyd iteration: points (H, N, D), centroids (H, C, D) → (H, C, D), empty clusters unchanged.</summary>
    private Tensor LloydStep(Tensor points, Tensor centroids)
    {
        var assignment = einsum("hnd,hcd->hnc", points, centroids).argmax(-1);     // (H, N)
        long n = points.shape[1];
        var slot = (assignment + (arange(heads, device: points.device) * clusters).view(heads, 1)).flatten();  // (H·N)
        var sums = zeros(heads * clusters, dim, dtype: points.dtype, device: points.device)
                   .index_add_(0, slot, points.reshape(heads * n, dim), 1.0).view(heads, clusters, dim);        // (H, C, D)
        var counts = zeros(heads * clusters, dtype: points.dtype, device: points.device)
                     .index_add_(0, slot, ones(heads * n, dtype: points.dtype, device: points.device), 1.0)
                     .view(heads, clusters);                                                             // (H, C)
        var mean = Normalize(sums / counts.clamp_min(1).unsqueeze(-1));
        return where(counts.gt(0).unsqueeze(-1), mean, centroids);
    }

    /// <summary>Adds per-cluster sums (H, C, D) and counts (H, C) to the pending statistics (kept in float64).</summary>
    private void Accumulate(Tensor batchSums, Tensor batchCounts)
    {
        using var scope = NewDisposeScope();
        var sums = batchSums.to(ScalarType.Float64).to(means.device);
        var counts = batchCounts.to(ScalarType.Float64).to(means.device);
        if (pending.Sums is not null && pending.Counts is not null)
        {
            sums = sums + pending.Sums.to(means.device);
            counts = counts + pending.Counts.to(means.device);
            DiscardPendingStatistics();
        }
        pending.Sums = sums.DetachFromDisposeScope();
        pending.Counts = counts.DetachFromDisposeScope();
    }

    private sealed class PendingStatistics
    {
        public Tensor? Sums;    // (H, C, D) float64
        public Tensor? Counts;  // (H, C) float64
        public bool Reduced;    // already summed over the replicas (StatisticsReducer)
    }

    private sealed class Resume(Action onDispose) : IDisposable
    {
        private bool disposed;
        public void Dispose()
        {
            if (disposed) return;
            disposed = true;
            onDispose();
        }
    }
}
