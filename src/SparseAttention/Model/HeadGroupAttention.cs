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
}

/// <summary>
/// A head group attending with a static <see cref="AttentionPattern"/>. Without relative positions it
/// calls <see cref="BlockSparseAttention.Attention"/> (fused CPU kernels for float32, TorchSharp ops
/// otherwise); attention dropout then applies to the group's output, because those kernels never form
/// probabilities. With Shaw relative positions it attends through a dense masked path (O(T²) memory)
/// that adds the key-side term q·a<sup>K</sup><sub>j−i</sub> to the scores and the value-side term
/// Σ p·a<sup>V</sup><sub>j−i</sub> to the output; attention dropout then applies to the probabilities.
/// </summary>
/// <remarks>Relative positions: Shaw, Uszkoreit and Vaswani 2018, "Self-Attention with Relative
/// Position Representations" (arXiv 1803.02155). One pair of tables per group, shared by its heads.</remarks>
public sealed partial class StaticPatternAttention : HeadGroupAttention
{
    private readonly Parameter? rel_k, rel_v;  // (2·R + 1, D) Shaw tables, index = clip(j − i, ±R) + R
    private readonly AttentionPattern pattern;
    private readonly int blockSize, maxRelativePosition, dimHead;
    private readonly double dropout;
    private readonly AttentionKernel kernel;
    private readonly ConcurrentDictionary<int, BlockMask> masks = new();
    private readonly ConcurrentDictionary<int, Tensor> denseMasks = new();   // (Hg, T, T) bool on the CPU, dense path only

    /// <param name="heads">Heads in the group (Hg).</param>
    /// <param name="dimHead">Head width D.</param>
    /// <param name="pattern">Which keys each query may attend (heads renumbered from 0 within the group).</param>
    /// <param name="blockSize">Block size the pattern is compiled with (capped at T).</param>
    /// <param name="dropout">Attention dropout probability (see the class remarks for where it applies).</param>
    /// <param name="maxRelativePosition">0 = no relative positions; otherwise Shaw tables clipped at ±this.</param>
    /// <param name="kernel">Kernel for the block-sparse path.</param>
    /// <param name="name">Module name.</param>
    public StaticPatternAttention(int heads, int dimHead, AttentionPattern pattern, int blockSize = 64, double dropout = 0,
        int maxRelativePosition = 0, AttentionKernel kernel = AttentionKernel.Auto, string name = "static_attention")
        : base(name, heads)
    {
        ArgumentNullException.ThrowIfNull(pattern);
        Check.Positive(dimHead, nameof(dimHead));
        Check.Positive(blockSize, nameof(blockSize));
        Check.NonNegative(maxRelativePosition, nameof(maxRelativePosition));
        Check.That(dropout >= 0 && dropout < 1, nameof(dropout), $"must be in [0, 1), got {dropout}.");
        this.pattern = pattern;
        this.dimHead = dimHead;
        this.blockSize = blockSize;
        this.dropout = dropout;
        this.maxRelativePosition = maxRelativePosition;
        this.kernel = kernel;
        if (maxRelativePosition > 0)
        {
            rel_k = new Parameter(randn(2 * maxRelativePosition + 1, dimHead) * 0.02);
            rel_v = new Parameter(randn(2 * maxRelativePosition + 1, dimHead) * 0.02);
        }
        RegisterComponents();
    }

    public AttentionPattern Pattern => pattern;

    /// <summary>The compiled mask used for sequences of <paramref name="seqLen"/> tokens.</summary>
    public BlockMask MaskFor(int seqLen) => masks.GetOrAdd(seqLen, t => pattern.Compile(t, Math.Min(blockSize, t), Heads));

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        Check.QueryKeyValue(q, k, v);
        Check.That(q.shape[1] == Heads, nameof(q), $"this group has {Heads} heads, q has H = {q.shape[1]}.");
        using var scope = NewDisposeScope();
        int seqLen = (int)q.shape[2];
        Tensor output;
        if (rel_k is null)
        {
            output = BlockSparseAttention.Attention(q, k, v, MaskFor(seqLen), keyMask, kernel: kernel);   // (B, Hg, T, D)
            output = nn.functional.dropout(output, dropout, training);
        }
        else output = RelativeDense(q, k, v, keyMask, seqLen);
        var aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    private Tensor RelativeDense(Tensor q, Tensor k, Tensor v, Tensor? keyMask, int seqLen)
    {
        long batch = q.shape[0], dim = q.shape[3];
        var dense = denseMasks.GetOrAdd(seqLen, t => MaskFor(t).ToDense().DetachFromDisposeScope());   // (Hg, T, T)
        var allowed = dense.to(q.device).unsqueeze(0);                                     // (1, Hg, T, T)
        if (keyMask is not null)
        {
            allowed = allowed.logical_and(keyMask.view(batch, 1, 1, seqLen));              // (B, Hg, T, T)
            var drop = keyMask.logical_not().view(batch, 1, seqLen, 1);                     // (B, 1, T, 1)
            k = k.masked_fill(drop, 0);                                                     // NaN in padding must not leak via 0·x
            v = v.masked_fill(drop, 0);
        }
        var positions = arange(seqLen, device: q.device);
        var relIndex = (positions.view(1, seqLen) - positions.view(seqLen, 1))             // (T, T): j − i
                       .clamp(-maxRelativePosition, maxRelativePosition) + maxRelativePosition;
        int buckets = 2 * maxRelativePosition + 1;
        double scale = 1.0 / Math.Sqrt(dim);
        var relScores = matmul(q, rel_k!.to(q.dtype).t());                                 // (B, Hg, T, 2R+1)
        var index = relIndex.view(1, 1, seqLen, seqLen).expand(batch, Heads, seqLen, seqLen);  // (B, Hg, T, T)
        var scores = (matmul(q, k.transpose(-1, -2)) + relScores.gather(-1, index)) * scale;    // (B, Hg, T, T)
        var probs = Kernels.ReferenceAttention.MaskedSoftmax(scores, allowed);
        probs = nn.functional.dropout(probs, dropout, training);
        var perBucket = zeros(batch, Heads, seqLen, buckets, dtype: q.dtype, device: q.device)
                        .scatter_add(-1, index, probs);                                    // (B, Hg, T, 2R+1)
        return matmul(probs, v) + matmul(perBucket, rel_v!.to(q.dtype));                  // (B, Hg, T, D)
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

    public RoutingHeadGroup(TransformerConfig config, int heads, int layer, string name = "routing_group") : base(name, heads)
    {
        routing = new RoutingAttention(heads, config.ResolvedDimHead, config.MaxSeqLen, config.WindowSize, config.Causal,
            config.ResolvedSharedQk, config.ResolvedNumMemKv, config.KmeansEmaDecay, config.CommitmentFactor, config.KmeansNorm, seed: layer,
            lookBackward: config.RoutingLookBack, numClusters: config.NumClusters)
        { Kernel = config.Kernel, AttendNormalized = config.KmeansAttendNormalized };
        dropout = config.AttnDropout;
        RegisterComponents();
    }

    public RoutingAttention Routing => routing;

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        using var scope = NewDisposeScope();
        (q, k) = (routing.AttendInput(q), routing.AttendInput(k));                     // (B, Hg, T, D) each
        var result = routing.forward(q, routing.SharedQk ? null : k, v, keyMask);
        RoutingCapture.Record(this, result);   // no-op unless a RoutingCapture is open (plots)
        var output = dropout > 0 ? nn.functional.dropout(result.Output, dropout, training) : result.Output;  // (B, Hg, T, D)
        return (output.MoveToOuterDisposeScope(), result.AuxLoss.MoveToOuterDisposeScope());
    }
}
