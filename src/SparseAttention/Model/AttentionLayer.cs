using SparseAttention.Modules;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>The attention sublayer of a <see cref="TransformerBlock"/>: self-attention or cross-attention.</summary>
public abstract partial class AttentionSublayer : nn.Module
{
    protected AttentionSublayer(string name) : base(name) { }

    /// <param name="x">(B, T, dim), already normalised.</param>
    /// <param name="inputMask">Optional (B, T) bool; true = real token.</param>
    /// <param name="context">Optional (B, S, contextDim) sequence for cross-attention.</param>
    /// <param name="contextMask">Optional (B, S) bool; true = real context token.</param>
    /// <returns>(B, T, dim) and a scalar auxiliary loss.</returns>
    public abstract (Tensor Output, Tensor AuxLoss) Forward(Tensor x, Tensor? inputMask, Tensor? context, Tensor? contextMask);
}

/// <summary>
/// Multi-head self-attention whose heads are split into groups, each computed by a
/// <see cref="HeadGroupAttention"/> (local, static pattern, later routing). Owns the q/k/v/out
/// projections; applies rotary embeddings to q and k when configured; concatenates the groups'
/// outputs in head order, projects back to dim and applies the attention-layer dropout.
/// </summary>
public sealed partial class AttentionLayer : AttentionSublayer
{
    private readonly Linear to_q, to_k, to_v, to_out;
    private readonly ModuleList<HeadGroupAttention> groups;
    private readonly int heads, dimHead;
    private readonly bool rotary;
    private readonly double layerDropout;
    private readonly ComputeDtype computeDtype;

    /// <summary>Builds layer <paramref name="layer"/> of a model with configuration <paramref name="config"/>.</summary>
    public AttentionLayer(TransformerConfig config, int layer, string name = "attention") : base(name)
    {
        ArgumentNullException.ThrowIfNull(config);
        heads = config.Heads;
        dimHead = config.ResolvedDimHead;
        rotary = config.PositionalEncoding == PositionalEncoding.Rotary;
        layerDropout = config.AttnLayerDropout;
        computeDtype = config.ComputeDtype;
        int inner = heads * dimHead;
        to_q = nn.Linear(config.Dim, inner, hasBias: false);
        to_k = nn.Linear(config.Dim, inner, hasBias: false);
        to_v = nn.Linear(config.Dim, inner, hasBias: false);
        to_out = nn.Linear(inner, config.Dim, hasBias: false);
        var plan = config.HeadGroupsForLayer(layer);
        Check.That(plan.Sum(g => g.Heads) == heads, nameof(config), $"layer {layer}'s head groups hold {plan.Sum(g => g.Heads)} heads, expected {heads}.");
        var firstHeads = plan.Select((_, n) => plan.Take(n).Sum(g => g.Heads)).ToArray();   // each group's first head
        groups = nn.ModuleList(plan.Select((g, n) => CreateGroup(config, layer, g, firstHeads[n])).ToArray());
        RegisterComponents();
    }

    /// <summary>The head groups, in head order.</summary>
    public IReadOnlyList<HeadGroupAttention> Groups => groups.ToList();

    /// <summary>
    /// The module computing one head group: local and static groups attend with their pattern,
    /// routing groups with <see cref="RoutingHeadGroup"/>, LSH groups with <see cref="LshHeadGroup"/>, synthesizer groups
    /// with <see cref="SynthesizerHeadGroup"/>.
    /// </summary>
    /// <param name="config">The model configuration.</param>
    /// <param name="layer">Layer index.</param>
    /// <param name="group">The group's plan.</param>
    /// <param name="firstHead">The group's first head in the layer (ALiBi slopes follow the layer's head order).</param>
    public static HeadGroupAttention CreateGroup(TransformerConfig config, int layer, HeadGroupPlan group, int firstHead = 0) => group.Kind switch
    {
        HeadGroupKind.Local or HeadGroupKind.Static => new StaticPatternAttention(group.Heads, config.ResolvedDimHead, group.Pattern!,
            config.BlockSize, config.AttnDropout,
            config.PositionalEncoding == PositionalEncoding.RelativeShaw ? config.MaxRelativePosition : 0, config.Kernel,
            alibiSlopes: AlibiSlopes(config, firstHead, group.Heads)),
        HeadGroupKind.Routing => WithCentroidTraining(config, new RoutingHeadGroup(config, group.Heads, layer, alibiSlopes: AlibiSlopes(config, firstHead, group.Heads))),
        HeadGroupKind.Lsh => new LshHeadGroup(config, group.Heads, layer, alibiSlopes: AlibiSlopes(config, firstHead, group.Heads)),
        HeadGroupKind.Synthesizer => new SynthesizerHeadGroup(config, group.Heads, layer),
        _ => throw new ArgumentException($"group: unknown head group kind {group.Kind}.", nameof(group)),
    };

    /// <summary><paramref name="module"/>, its k-means centroids trained by gradient when the configuration says
    /// <c>kmeans_ema = false</c> (<see cref="Clustering.OnlineKMeans.TrainCentroidsByGradient"/>).</summary>
    internal static T WithCentroidTraining<T>(TransformerConfig config, T module) where T : nn.Module
    {
        if (!config.KmeansEma)
            foreach (var kmeans in Clustering.OnlineKMeans.All(module)) kmeans.TrainCentroidsByGradient();
        return module;
    }

    /// <summary>With ALiBi positions: the slopes of heads [firstHead, firstHead + heads) of a layer; otherwise null.</summary>
    private static double[]? AlibiSlopes(TransformerConfig config, int firstHead, int heads) =>
        config.PositionalEncoding == PositionalEncoding.Alibi ? Kernels.AlibiPositions.StandardSlopes(config.Heads)[firstHead..(firstHead + heads)] : null;

    /// <summary>
    /// The q/k/v projections as one GEMM (the three weights concatenated at call time, so the parameters stay
    /// <c>to_q</c>, <c>to_k</c>, <c>to_v</c>), in the configured compute dtype, with rotary embeddings applied to q and k
    /// for positions <paramref name="offset"/> … <paramref name="offset"/> + T − 1 when the model uses them.
    /// </summary>
    /// <param name="x">(B, T, dim), already normalised.</param>
    /// <param name="offset">Position of the first token (incremental decoding passes the token's position).</param>
    /// <returns>q, k, v, each (B, H, T, Dh) in x's dtype; q and k are contiguous when rotary embeddings are on.</returns>
    /// <param name="fusedWeight">The concatenated weight when the caller keeps it (decoding, where the weights do not
    /// change between tokens); null = concatenate now.</param>
    internal (Tensor Q, Tensor K, Tensor V) ProjectQkv(Tensor x, long offset = 0, Tensor? fusedWeight = null)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, to_q.in_features);
        using var scope = NewDisposeScope();
        long batch = x.shape[0], seqLen = x.shape[1];
        var weight = fusedWeight ?? FusedQkvWeight();                                             // (3·H·Dh, dim)
        var qkv = MixedPrecision.Linear(x, weight, null, computeDtype).to(x.dtype)               // (B, T, 3·H·Dh)
                  .view(batch, seqLen, 3, heads, dimHead).permute(2, 0, 3, 1, 4);                // (3, B, H, T, Dh)
        // split and unbind (not three selects): their backward writes one gradient tensor instead of three zero-filled ones.
        var parts = qkv.split([2, 1], 0);                                                        // (2, B, H, T, Dh), (1, B, H, T, Dh)
        var qk = rotary ? RotaryEmbedding.Apply(parts[0], offset) : parts[0];                   // (2, B, H, T, Dh)
        var qAndK = qk.unbind(0);                                                                // 2 × (B, H, T, Dh)
        var v = parts[1].squeeze(0);                                                             // (B, H, T, Dh)
        return (qAndK[0].MoveToOuterDisposeScope(), qAndK[1].MoveToOuterDisposeScope(), v.MoveToOuterDisposeScope());
    }

    /// <summary>to_q, to_k and to_v stacked: (3·H·Dh, dim).</summary>
    private Tensor FusedQkvWeight() => cat([to_q.weight!, to_k.weight!, to_v.weight!], 0);

    /// <summary>The output projection in the configured compute dtype: the head groups' outputs, each (B, Hg, T, Dh) in
    /// head order, → (B, T, dim) in their dtype. The groups are merged head-interleaved in one copy.</summary>
    internal Tensor ProjectOut(IReadOnlyList<Tensor> groupOutputs)
    {
        long batch = groupOutputs[0].shape[0], seqLen = groupOutputs[0].shape[2];
        var merged = cat(groupOutputs.Select(o => o.transpose(1, 2)).ToArray(), 2)               // (B, T, H, Dh)
                     .reshape(batch, seqLen, heads * dimHead);                                   // (B, T, H·Dh), a view
        return MixedPrecision.Linear(merged, to_out.weight!, null, computeDtype).to(groupOutputs[0].dtype);   // (B, T, dim)
    }

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor x, Tensor? inputMask, Tensor? context, Tensor? contextMask)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, to_q.in_features);
        Check.KeyMask(inputMask, x.shape[0], x.shape[1]);
        using var scope = NewDisposeScope();
        var (q, k, v) = ProjectQkv(x);                                                           // (B, H, T, Dh) each
        var outputs = new List<Tensor>();
        var aux = zeros(Array.Empty<long>(), dtype: x.dtype, device: x.device);
        long first = 0;
        foreach (var group in groups)
        {
            var (o, loss) = group.Forward(q.narrow(1, first, group.Heads), k.narrow(1, first, group.Heads),
                                          v.narrow(1, first, group.Heads), inputMask);          // (B, Hg, T, Dh)
            outputs.Add(o);
            aux = aux + loss;
            first += group.Heads;
        }
        var output = nn.functional.dropout(ProjectOut(outputs), layerDropout, training);        // (B, T, dim)
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// Multi-head cross-attention from the sequence to a context (e.g. an encoder's output). Dense
/// (<see cref="CrossAttentionKind.Dense"/>): every query may attend every real context token, computed with
/// <see cref="Kernels.ReferenceAttention"/> (O(T·S) memory). Routing: all heads route with
/// <see cref="RoutingAttention.CrossForward"/> (ContextWindowSize context keys per cluster; the commitment loss
/// is this layer's auxiliary loss). Attention dropout applies to the output of the heads, attention-layer
/// dropout after the output projection. No positional encoding (the two sequences' positions are unrelated).
/// </summary>
public sealed partial class CrossAttentionLayer : AttentionSublayer
{
    private readonly Linear to_q, to_v, to_out;
    private readonly Linear? to_k;                       // null with ContextSharedQk: keys use to_q
    private readonly RoutingAttention? routing;
    private readonly int heads, dimHead, contextWindowSize;
    private readonly double dropout, layerDropout;

    /// <param name="config">The model configuration (Heads, DimHead, ContextDim, CrossAttention, …).</param>
    /// <param name="layer">Layer index (seeds the routing k-means).</param>
    /// <param name="name">Module name.</param>
    public CrossAttentionLayer(TransformerConfig config, int layer = 0, string name = "cross_attention") : base(name)
    {
        ArgumentNullException.ThrowIfNull(config);
        heads = config.Heads;
        dimHead = config.ResolvedDimHead;
        dropout = config.AttnDropout;
        layerDropout = config.AttnLayerDropout;
        int inner = heads * dimHead;
        to_q = nn.Linear(config.Dim, inner, hasBias: false);
        if (!config.ContextSharedQk) to_k = nn.Linear(config.ResolvedContextDim, inner, hasBias: false);
        to_v = nn.Linear(config.ResolvedContextDim, inner, hasBias: false);
        to_out = nn.Linear(inner, config.Dim, hasBias: false);
        contextWindowSize = config.ResolvedContextWindowSize;
        if (config.ResolvedCrossAttention == CrossAttentionKind.Routing)
            routing = AttentionLayer.WithCentroidTraining(config, new RoutingAttention(heads, dimHead, config.MaxSeqLen, config.WindowSize, config.Causal,
                sharedQk: false, numMemKv: 0, config.KmeansEmaDecay, config.CommitmentFactor, config.KmeansNorm, seed: 1000 + layer,
                numClusters: config.NumClusters) { Kernel = config.Kernel });
        RegisterComponents();
    }

    /// <summary>The routing module of a routing cross-attention layer; null when dense.</summary>
    public RoutingAttention? Routing => routing;

    /// <summary>The context's keys (B, S, contextDim) → (B, H, S, Dh): <c>to_k</c>, or <c>to_q</c> with ContextSharedQk.</summary>
    private Tensor ContextKeys(Tensor context) =>
        (to_k ?? to_q).forward(context).view(context.shape[0], context.shape[1], heads, dimHead).transpose(1, 2);

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor x, Tensor? inputMask, Tensor? context, Tensor? contextMask)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, to_q.in_features);
        Check.That(context is not null, nameof(context), "this model receives context (ReceivesContext = true); pass the context sequence.");
        Check.Shape(context!, nameof(context), "(B, S, contextDim)", x.shape[0], -1, to_v.in_features);
        Check.SameDtype(x, nameof(x), context!, nameof(context));
        long batch = x.shape[0], seqLen = x.shape[1], ctxLen = context!.shape[1];
        if (contextMask is not null)
        {
            Check.Shape(contextMask, nameof(contextMask), "(B, S)", batch, ctxLen);
            Check.Bool(contextMask, nameof(contextMask));
        }
        using var scope = NewDisposeScope();
        var q = to_q.forward(x).view(batch, seqLen, heads, dimHead).transpose(1, 2);           // (B, H, T, Dh)
        var k = ContextKeys(context);                                                          // (B, H, S, Dh)
        var v = to_v.forward(context).view(batch, ctxLen, heads, dimHead).transpose(1, 2);     // (B, H, S, Dh)
        Tensor attended, aux;
        if (routing is null)
        {
            attended = Kernels.ReferenceAttention.Attention(q, k, v, keyMask: contextMask);     // (B, H, T, Dh)
            aux = zeros(Array.Empty<long>(), dtype: x.dtype, device: x.device);
        }
        else
        {
            var routed = routing.CrossForward(q, k, v, inputMask, contextMask, contextWindowSize);
            (attended, aux) = (routed.Output, routed.AuxLoss);                                 // (B, H, T, Dh)
        }
        attended = nn.functional.dropout(attended, dropout, training);
        var merged = attended.transpose(1, 2).reshape(batch, seqLen, heads * dimHead);         // (B, T, H·Dh)
        var output = nn.functional.dropout(to_out.forward(merged), layerDropout, training);    // (B, T, dim)
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }
}
