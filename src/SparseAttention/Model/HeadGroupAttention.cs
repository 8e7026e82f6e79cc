using System.Collections.Concurrent;
using SparseAttention.Clustering;
using SparseAttention.Kernels;
using SparseAttention.Modules;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace SparseAttention.Model;

/// <summary>
/// The attention of one head group inside an <see cref="AttentionLayer"/>: it receives that group's
/// already projected (and position-encoded) queries, keys and values and returns the attended values
/// plus an auxiliary loss. Static groups return a zero loss; content-based groups (routing) return
/// their commitment loss. Add a group kind by deriving from this class and adding one case to
/// <see cref="AttentionLayer.CreateGroup"/>.
/// </summary>
public abstract partial class HeadGroupAttention : nn.Module
{
    protected HeadGroupAttention(string name, int heads) : base(name)
    {
        Check.Positive(heads, nameof(heads));
        Heads = heads;
    }

    /// <summary>Heads in this group (Hg).</summary>
    public int Heads { get; }

    /// <summary>Attention for this group's heads.</summary>
    /// <param name="q">Queries (B, Hg, T, D).</param>
    /// <param name="k">Keys (B, Hg, T, D).</param>
    /// <param name="v">Values (B, Hg, T, D).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token that may be attended, false = padding.</param>
    /// <returns>Output (B, Hg, T, D) and a scalar auxiliary loss (zero for static groups).</returns>
    public abstract (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask);

    /// <summary>A new pair of Shaw tables (2·R + 1, D), key side then value side, each drawn from N(0, 0.02²).</summary>
    private protected static (Parameter Key, Parameter Value) NewShawTables(int maxDistance, int dimHead) =>
        (new Parameter(randn(2 * maxDistance + 1, dimHead) * 0.02), new Parameter(randn(2 * maxDistance + 1, dimHead) * 0.02));

    /// <summary>A group's relative-position terms as its parameters are now: Shaw when it has tables, else its ALiBi
    /// slopes, else none.</summary>
    private protected static RelativePositionTerms? TermsOf(Parameter? relK, Parameter? relV, AlibiPositions? alibi) =>
        relK is not null && relV is not null ? new ShawRelativePositions(relK, relV) : alibi;
}

/// <summary>
/// A head group attending with a static <see cref="AttentionPattern"/> through <see cref="BlockSparseAttention.Attention"/>
/// (fused CPU kernels for float32, TorchSharp ops otherwise). Attention dropout applies to the group's output,
/// because the fused kernels never form probabilities. With relative positions (Shaw tables or ALiBi slopes) the
/// terms are evaluated on the attended pairs only (fused kernel plus a near band for float32 CPU, the Ops kernel
/// otherwise): memory stays O(T·W).
/// </summary>
/// <remarks>Relative positions: Shaw, Uszkoreit and Vaswani 2018, "Self-Attention with Relative
/// Position Representations" (arXiv 1803.02155), one pair of tables per group shared by its heads; ALiBi,
/// Press, Smith and Lewis 2022 (arXiv 2108.12409), one fixed slope per head.</remarks>
public sealed partial class StaticPatternAttention : HeadGroupAttention
{
    private readonly Parameter? rel_k, rel_v;  // (2·R + 1, D) Shaw tables, row = clip(j − i, ±R) + R
    private readonly AlibiPositions? alibi;
    private readonly AttentionPattern pattern;
    private readonly int blockSize, dimHead;
    private readonly double dropout;
    private readonly AttentionKernel kernel;
    private readonly ConcurrentDictionary<int, BlockMask> masks = new();

    /// <param name="heads">Heads in the group (Hg).</param>
    /// <param name="dimHead">Head width D.</param>
    /// <param name="pattern">Which keys each query may attend (heads renumbered from 0 within the group).</param>
    /// <param name="blockSize">Block size the pattern is compiled with (capped at T).</param>
    /// <param name="dropout">Attention dropout probability (applied to the group's output).</param>
    /// <param name="maxRelativePosition">0 = no Shaw terms; otherwise Shaw tables clipped at ±this.</param>
    /// <param name="kernel">Kernel for the block-sparse path.</param>
    /// <param name="name">Module name.</param>
    /// <param name="alibiSlopes">Optional ALiBi slope per head of the group.</param>
    public StaticPatternAttention(int heads, int dimHead, AttentionPattern pattern, int blockSize = 64, double dropout = 0,
        int maxRelativePosition = 0, AttentionKernel kernel = AttentionKernel.Auto, string name = "static_attention",
        double[]? alibiSlopes = null)
        : base(name, heads)
    {
        ArgumentNullException.ThrowIfNull(pattern);
        Check.Positive(dimHead, nameof(dimHead));
        Check.Positive(blockSize, nameof(blockSize));
        Check.NonNegative(maxRelativePosition, nameof(maxRelativePosition));
        Check.That(dropout >= 0 && dropout < 1, nameof(dropout), $"must be in [0, 1), got {dropout}.");
        Check.That(alibiSlopes is null || alibiSlopes.Length == heads, nameof(alibiSlopes), $"needs one slope per head ({heads}), got {alibiSlopes?.Length}.");
        Check.That(alibiSlopes is null || maxRelativePosition == 0, nameof(alibiSlopes), "ALiBi and Shaw terms are alternatives; give one.");
        this.pattern = pattern;
        this.dimHead = dimHead;
        this.blockSize = blockSize;
        this.dropout = dropout;
        this.kernel = kernel;
        if (maxRelativePosition > 0) (rel_k, rel_v) = NewShawTables(maxRelativePosition, dimHead);
        if (alibiSlopes is not null) alibi = new AlibiPositions(alibiSlopes);
        RegisterComponents();
    }

    /// <summary>The relative-position terms of this group as its parameters are now (null without any).</summary>
    internal RelativePositionTerms? Relative => TermsOf(rel_k, rel_v, alibi);

    public AttentionPattern Pattern => pattern;

    /// <summary>The compiled mask used for sequences of <paramref name="seqLen"/> tokens.</summary>
    public BlockMask MaskFor(int seqLen) => masks.GetOrAdd(seqLen, t => pattern.Compile(t, Math.Min(blockSize, t), Heads));

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        Check.QueryKeyValue(q, k, v);
        Check.That(q.shape[1] == Heads, nameof(q), $"this group has {Heads} heads, q has H = {q.shape[1]}.");
        using var scope = NewDisposeScope();
        int seqLen = (int)q.shape[2];
        var output = BlockSparseAttention.Attention(q, k, v, MaskFor(seqLen), keyMask, kernel: kernel, relative: Relative);   // (B, Hg, T, D)
        output = nn.functional.dropout(output, dropout, training);
        var aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// A head group of content-based routing attention (<see cref="RoutingAttention"/>): clusters of
/// <c>WindowSize</c> tokens chosen by online k-means, clusters = ⌈MaxSeqLen / WindowSize⌉; returns
/// the k-means commitment loss as its auxiliary loss. With shared QK the keys are the normalised
/// queries (the layer's k projection is not used by this group). Attention dropout applies to the
/// group's output, as for static groups. The k-means centroids move when the trainer calls
/// <see cref="OnlineKMeans.UpdateAll"/> after an optimizer step (see <see cref="OnlineKMeans"/>).
/// </summary>
public sealed partial class RoutingHeadGroup : HeadGroupAttention
{
    private readonly RoutingAttention routing;
    private readonly double dropout;
    private readonly Parameter? rel_k, rel_v;  // (2·R + 1, D) Shaw tables on original positions, row = clip(j − i, ±R) + R
    private readonly AlibiPositions? alibi;

    /// <param name="config">The model configuration.</param>
    /// <param name="heads">Heads in the group.</param>
    /// <param name="layer">Layer index (seeds the centroids).</param>
    /// <param name="name">Module name.</param>
    /// <param name="alibiSlopes">With <see cref="PositionalEncoding.Alibi"/>: the slope of each head of the group.</param>
    public RoutingHeadGroup(TransformerConfig config, int heads, int layer, string name = "routing_group", double[]? alibiSlopes = null) : base(name, heads)
    {
        routing = new RoutingAttention(heads, config.ResolvedDimHead, config.MaxSeqLen, config.WindowSize, config.Causal,
            config.ResolvedSharedQk, config.ResolvedNumMemKv, config.KmeansEmaDecay, config.CommitmentFactor, config.KmeansNorm, seed: layer,
            lookBackward: config.RoutingLookBack, numClusters: config.NumClusters)
        { Kernel = config.Kernel, AttendNormalized = config.KmeansAttendNormalized, HashItems = config.HashItems,
          StridedHeads = config.SparsityClusterStridedNumHeads };
        dropout = config.AttnDropout;
        if (config.PositionalEncoding == PositionalEncoding.RelativeShaw) (rel_k, rel_v) = NewShawTables(config.MaxRelativePosition, config.ResolvedDimHead);
        if (alibiSlopes is not null) alibi = new AlibiPositions(alibiSlopes);
        RegisterComponents();
    }

    public RoutingAttention Routing => routing;

    /// <summary>The relative-position terms of this group as its parameters are now (null without any).</summary>
    internal RelativePositionTerms? Relative => TermsOf(rel_k, rel_v, alibi);

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        using var scope = NewDisposeScope();
        (q, k) = (routing.AttendInput(q), routing.AttendInput(k));                     // (B, Hg, T, D) each
        var result = routing.forward(q, routing.SharedQk ? null : k, v, keyMask, Relative);
        RoutingCapture.Record(this, result);   // no-op unless a RoutingCapture is open (plots)
        var output = dropout > 0 ? nn.functional.dropout(result.Output, dropout, training) : result.Output;  // (B, Hg, T, D)
        return (output.MoveToOuterDisposeScope(), result.AuxLoss.MoveToOuterDisposeScope());
    }
}
