using SparseAttention.Kernels;
using SparseAttention.Modules;
using SparseAttention.Patterns;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>What <see cref="BertSelfAttention.forward"/> returns.</summary>
/// <param name="Context">(B, T, H·D) attended values, heads concatenated (HF's <c>context_layer</c>).</param>
/// <param name="AttentionProbs">(B, H, T, Tk) attention probabilities when requested (HF's <c>attention_probs</c>), else null.</param>
/// <param name="AuxLoss">Scalar auxiliary loss of the head groups (routing: k-means commitment); zero otherwise.
/// Not part of the HF tuple; add it to the training loss when routing heads are used.</param>
public sealed record BertSelfAttentionOutput(Tensor Context, Tensor? AttentionProbs, Tensor AuxLoss)
{
    /// <summary>HF's return value: <c>(context,)</c>, or <c>(context, attention_probs)</c> with output_attentions.</summary>
    public Tensor[] ToTuple() => AttentionProbs is null ? [Context] : [Context, AttentionProbs];
}

/// <summary>
/// A self-attention module with the call shape of HuggingFace's <c>BertSelfAttention</c> — <c>(hidden_states,
/// attention_mask, head_mask, encoder_hidden_states, encoder_attention_mask, output_attentions)</c> → <c>(context,)</c>
/// or <c>(context, attention_probs)</c> — over any of this library's attention kinds: its heads are computed by
/// <see cref="HeadGroupAttention"/> groups (dense or any static pattern, routing, synthesizer, and any future group
/// kind), e.g. the head groups a <see cref="TransformerConfig"/> lays out (<see cref="FromConfig"/>).
/// </summary>
/// <remarks>
/// <para><b>Weights.</b> <c>query</c>, <c>key</c>, <c>value</c> are <see cref="Linear"/> layers with bias, hidden → H·D,
/// named like HF's, so a BERT checkpoint's <c>…attention.self.{query,key,value}.{weight,bias}</c> load by name.
/// As in HF there is no output projection here (that is <c>BertSelfOutput</c>). No positional encoding is applied:
/// BERT adds absolute position embeddings to <c>hidden_states</c> before the layers.</para>
/// <para><b>Masks.</b> <c>attention_mask</c> is HF's extended additive mask (B or 1, 1, 1, T): 0 = keep, a large
/// negative value (≤ −10000, e.g. −10000, <c>torch.finfo(dtype).min</c> or −∞) = padding. Our kernels take boolean
/// key masks, so soft biases in between are rejected with an <see cref="ArgumentException"/>. A query whose allowed
/// keys are all padding gets a zero context (HF would spread its weight uniformly). <c>head_mask</c> (H) or (B, H)
/// multiplies each head's probabilities, i.e. its context.</para>
/// <para><b>output_attentions</b>: the probabilities each group's computation actually used, before dropout:
/// static groups (dense included) — the dense oracle, softmax(q·kᵀ/√D) restricted to the pattern's implied mask
/// and the padding mask; synthesizer groups — their own probabilities (<see cref="IAttentionProbabilitiesSource"/>);
/// routing groups — the per-cluster softmaxes of the clusters chosen in this same forward, scattered into (T × T) and
/// averaged over the clusters a query joined (what the grouped kernel computes; routing with memory key/values is
/// rejected, its weights on memory slots have no column). HF applies head_mask to the returned probabilities; so do
/// we. Any other group kind must implement <see cref="IAttentionProbabilitiesSource"/>.</para>
/// <para><b>Cross-attention</b> (<c>encoder_hidden_states</c> given): keys and values come from the encoder states
/// through the same <c>key</c>/<c>value</c> layers, masked by <c>encoder_attention_mask</c> (as HF does,
/// <c>attention_mask</c> is then ignored); it is always dense, over all heads, with dropout on the probabilities.</para>
/// <para><b>Dropout</b> (<c>attention_probs_dropout_prob</c>): static groups apply theirs to their output (their
/// kernels never form probabilities), synthesizer groups and cross-attention to the probabilities; routing groups,
/// called directly here to expose their clusters, get the adapter's dropout on their output.</para>
/// </remarks>
public sealed class BertSelfAttention : nn.Module
{
    private readonly Linear query, key, value;
    private readonly ModuleList<HeadGroupAttention> groups;
    private readonly int heads, headSize;
    private readonly double dropout;

    /// <param name="hiddenSize">Width of <c>hidden_states</c> (and of <c>encoder_hidden_states</c>).</param>
    /// <param name="numAttentionHeads">Heads H; the groups' heads must add up to it.</param>
    /// <param name="groups">The head groups in head order (heads renumbered from 0 within each group); each must
    /// have been built for head width <paramref name="attentionHeadSize"/>.</param>
    /// <param name="attentionHeadSize">Head width D; null = hiddenSize / H (which must then divide).</param>
    /// <param name="attentionProbsDropoutProb">Dropout of cross-attention probabilities and of routing groups' output.</param>
    /// <param name="name">Module name.</param>
    public BertSelfAttention(int hiddenSize, int numAttentionHeads, IReadOnlyList<HeadGroupAttention> groups,
        int? attentionHeadSize = null, double attentionProbsDropoutProb = 0, string name = "self") : base(name)
    {
        Check.Positive(hiddenSize, nameof(hiddenSize));
        Check.Positive(numAttentionHeads, nameof(numAttentionHeads));
        ArgumentNullException.ThrowIfNull(groups);
        Check.That(attentionHeadSize is not null || hiddenSize % numAttentionHeads == 0, nameof(numAttentionHeads),
            $"the hidden size ({hiddenSize}) must be a multiple of the number of attention heads ({numAttentionHeads}) when attentionHeadSize is not given.");
        Check.That(groups.Count > 0 && groups.All(g => g is not null), nameof(groups), "must hold at least one head group and no nulls.");
        Check.That(groups.Sum(g => g.Heads) == numAttentionHeads, nameof(groups),
            $"the groups hold {groups.Sum(g => g.Heads)} heads, expected numAttentionHeads = {numAttentionHeads}.");
        Check.That(attentionProbsDropoutProb >= 0 && attentionProbsDropoutProb < 1, nameof(attentionProbsDropoutProb),
            $"must be in [0, 1), got {attentionProbsDropoutProb}.");
        heads = numAttentionHeads;
        headSize = attentionHeadSize ?? hiddenSize / numAttentionHeads;
        Check.Positive(headSize, nameof(attentionHeadSize));
        dropout = attentionProbsDropoutProb;
        query = nn.Linear(hiddenSize, heads * headSize);
        key = nn.Linear(hiddenSize, heads * headSize);
        value = nn.Linear(hiddenSize, heads * headSize);
        this.groups = nn.ModuleList(groups.ToArray());
        RegisterComponents();
    }

    /// <summary>Plain dense (BERT) self-attention: one group attending every key, bidirectional.</summary>
    public static BertSelfAttention Dense(int hiddenSize, int numAttentionHeads, double attentionProbsDropoutProb = 0) =>
        FromPattern(hiddenSize, numAttentionHeads, new DensePattern(causal: false), attentionProbsDropoutProb: attentionProbsDropoutProb);

    /// <summary>Every head attends with one static <paramref name="pattern"/> (use <see cref="AttentionPattern.HeadGroups"/>
    /// to give heads different patterns).</summary>
    public static BertSelfAttention FromPattern(int hiddenSize, int numAttentionHeads, AttentionPattern pattern, int blockSize = 64,
        double attentionProbsDropoutProb = 0)
    {
        ArgumentNullException.ThrowIfNull(pattern);
        Check.Positive(numAttentionHeads, nameof(numAttentionHeads));
        Check.That(hiddenSize % numAttentionHeads == 0, nameof(numAttentionHeads),
            $"the hidden size ({hiddenSize}) must be a multiple of the number of attention heads ({numAttentionHeads}).");
        var group = new StaticPatternAttention(numAttentionHeads, hiddenSize / numAttentionHeads, pattern, blockSize, attentionProbsDropoutProb);
        return new BertSelfAttention(hiddenSize, numAttentionHeads, [group], null, attentionProbsDropoutProb);
    }

    /// <summary>
    /// The head groups <paramref name="config"/> lays out for layer <paramref name="layer"/> (local, static, synthesizer,
    /// routing, and any kind <see cref="AttentionLayer.CreateGroup"/> knows), hidden size = Dim, H = Heads,
    /// D = ResolvedDimHead, dropout = AttnDropout. Positional encodings of the config are not used (see remarks).
    /// </summary>
    public static BertSelfAttention FromConfig(TransformerConfig config, int layer = 0)
    {
        ArgumentNullException.ThrowIfNull(config);
        var plain = (config with { PositionalEncoding = PositionalEncoding.None }).Validate();   // no Shaw tables in static groups
        var groups = plain.HeadGroupsForLayer(layer).Select(g => AttentionLayer.CreateGroup(plain, layer, g)).ToArray();
        return new BertSelfAttention(plain.Dim, plain.Heads, groups, plain.ResolvedDimHead, plain.AttnDropout);
    }

    /// <summary>Heads H.</summary>
    public int NumAttentionHeads => heads;
    /// <summary>Head width D.</summary>
    public int AttentionHeadSize => headSize;
    /// <summary>The head groups, in head order.</summary>
    public IReadOnlyList<HeadGroupAttention> Groups => groups.ToList();

    /// <summary>Self-attention (or cross-attention when <paramref name="encoderHiddenStates"/> is given), HF call shape.</summary>
    /// <param name="hiddenStates">(B, T, hidden).</param>
    /// <param name="attentionMask">Optional additive mask (B or 1, 1, 1, T): 0 = keep, ≤ −10000 or −∞ = padding.</param>
    /// <param name="headMask">Optional multiplicative mask per head, (H) or (B, H); 0 silences a head.</param>
    /// <param name="encoderHiddenStates">Optional (B, S, hidden): attend to these instead (dense cross-attention).</param>
    /// <param name="encoderAttentionMask">Optional additive mask (B or 1, 1, 1, S) for the encoder states.</param>
    /// <param name="outputAttentions">Also return the attention probabilities (B, H, T, T or S).</param>
    public BertSelfAttentionOutput forward(Tensor hiddenStates, Tensor? attentionMask = null, Tensor? headMask = null,
        Tensor? encoderHiddenStates = null, Tensor? encoderAttentionMask = null, bool outputAttentions = false)
    {
        Check.Shape(hiddenStates, "hidden_states", "(B, T, hidden)", -1, -1, query.in_features);
        Check.FloatingPoint(hiddenStates, "hidden_states");
        long batch = hiddenStates.shape[0], seqLen = hiddenStates.shape[1];
        Check.That(seqLen > 0, "hidden_states", "the sequence length T must be > 0.");
        bool cross = encoderHiddenStates is not null;
        if (cross)
        {
            Check.Shape(encoderHiddenStates!, "encoder_hidden_states", "(B, S, hidden)", batch, -1, key.in_features);
            Check.SameDtype(hiddenStates, "hidden_states", encoderHiddenStates!, "encoder_hidden_states");
        }
        else Check.That(encoderAttentionMask is null, "encoder_attention_mask", "is only used with encoder_hidden_states.");
        var source = encoderHiddenStates ?? hiddenStates;
        long keys = source.shape[1];
        if (headMask is not null)
        {
            Check.That((headMask.dim() == 1 && headMask.shape[0] == heads) || (headMask.dim() == 2 && headMask.shape[0] == batch && headMask.shape[1] == heads),
                "head_mask", $"must have shape (H) = ({heads}) or (B, H) = ({batch}, {heads}), got {Check.ShapeOf(headMask)}.");
            Check.FloatingPoint(headMask, "head_mask");
            Check.That(headMask.isfinite().all().item<bool>(), "head_mask", "must be finite.");
        }
        using var scope = NewDisposeScope();
        var keyMask = cross
            ? KeyMaskFromAdditive(encoderAttentionMask, batch, keys, "encoder_attention_mask")
            : KeyMaskFromAdditive(attentionMask, batch, keys, "attention_mask");               // (B, Tk) bool, true = keep
        if (keyMask is not null) keyMask = keyMask.to(hiddenStates.device);
        Tensor SplitHeads(Tensor t, long len) => t.view(batch, len, heads, headSize).transpose(1, 2);   // (B, H, len, D)
        var q = SplitHeads(query.forward(hiddenStates), seqLen);
        var k = SplitHeads(key.forward(source), keys);
        var v = SplitHeads(value.forward(source), keys);

        Tensor context, aux = zeros(Array.Empty<long>(), dtype: hiddenStates.dtype, device: hiddenStates.device);
        Tensor? probs = null;
        if (cross)
        {
            probs = DenseProbabilities(q, k, keyMask, null);                                  // (B, H, T, S)
            context = matmul(nn.functional.dropout(probs, dropout, training), ZeroPadding(v, keyMask));   // (B, H, T, D)
        }
        else
        {
            var outputs = new List<Tensor>();
            var groupProbs = new List<Tensor>();
            long first = 0;
            foreach (var group in groups)
            {
                var (gq, gk, gv) = (q.narrow(1, first, group.Heads), k.narrow(1, first, group.Heads), v.narrow(1, first, group.Heads));
                var (o, loss, p) = GroupForward(group, gq, gk, gv, keyMask, outputAttentions);  // (B, Hg, T, D), (B, Hg, T, T)
                outputs.Add(o);
                if (p is not null) groupProbs.Add(p);
                aux = aux + loss;
                first += group.Heads;
            }
            context = outputs.Count == 1 ? outputs[0] : cat(outputs, 1);                       // (B, H, T, D)
            if (outputAttentions) probs = groupProbs.Count == 1 ? groupProbs[0] : cat(groupProbs, 1);   // (B, H, T, T)
        }
        if (headMask is not null)
        {
            var perHead = headMask.to(context.dtype, context.device).view(headMask.dim() == 1 ? 1 : batch, heads, 1, 1);
            context = context * perHead;
            if (probs is not null) probs = probs * perHead;
        }
        var merged = context.transpose(1, 2).reshape(batch, seqLen, heads * headSize);            // (B, T, H·D)
        return new BertSelfAttentionOutput(merged.MoveToOuterDisposeScope(),
            outputAttentions ? probs!.MoveToOuterDisposeScope() : null, aux.MoveToOuterDisposeScope());
    }

    /// <summary>One group's output, auxiliary loss and (when asked) probabilities, from a single forward of the group.</summary>
    private (Tensor Output, Tensor AuxLoss, Tensor? Probs) GroupForward(HeadGroupAttention group, Tensor q, Tensor k, Tensor v,
        Tensor? keyMask, bool wantProbs)
    {
        switch (group)
        {
            case RoutingHeadGroup routingGroup:
            {
                var routing = routingGroup.Routing;
                var result = routing.forward(q, routing.SharedQk ? null : k, v, keyMask);
                var output = nn.functional.dropout(result.Output, dropout, training);              // (B, Hg, T, D)
                if (!wantProbs) return (output, result.AuxLoss, null);
                Check.That(!routing.named_parameters().Any(p => p.name == "mem_key"), "output_attentions",
                    "routing heads with memory key/values (num_mem_kv > 0) put weight on memory slots that have no key position; turn output_attentions off.");
                var keysUsed = routing.SharedQk ? routing.KMeans.Normalize(q) : k;                   // shared QK: keys are the normalised queries
                return (output, result.AuxLoss, RoutingProbabilities(q, keysUsed, result, keyMask, routing.Causal, routing.SharedQk));
            }
            case IAttentionProbabilitiesSource source when wantProbs:
                return source.ForwardWithProbabilities(q, k, v, keyMask);
            case StaticPatternAttention staticGroup when wantProbs:
            {
                Check.That(!staticGroup.named_parameters().Any(p => p.name == "rel_k"), "output_attentions",
                    "static groups with Shaw relative positions are not supported by the adapter's probabilities; build the group without them.");
                var (output, loss) = staticGroup.Forward(q, k, v, keyMask);
                var pattern = staticGroup.MaskFor((int)q.shape[2]).ToDense().to(q.device).unsqueeze(0);   // (1, Hg, T, T)
                return (output, loss, DenseProbabilities(q, k, keyMask, pattern));
            }
            default:
            {
                Check.That(!wantProbs, "output_attentions",
                    $"head group {group.GetType().Name} cannot report its probabilities (it does not implement {nameof(IAttentionProbabilitiesSource)}).");
                var (output, loss) = group.Forward(q, k, v, keyMask);
                return (output, loss, null);
            }
        }
    }

    /// <summary>softmax(q·kᵀ/√D) over the allowed keys (pattern and padding), (B, H, Tq, Tk); empty rows are zeros.</summary>
    private static Tensor DenseProbabilities(Tensor q, Tensor k, Tensor? keyMask, Tensor? pattern)
    {
        long batch = q.shape[0], tk = k.shape[2];
        var allowed = ones(new long[] { 1, 1, 1, tk }, dtype: ScalarType.Bool, device: q.device);
        if (pattern is not null) allowed = allowed.logical_and(pattern);
        if (keyMask is not null) allowed = allowed.logical_and(keyMask.view(batch, 1, 1, tk));
        var scores = matmul(q, ZeroPadding(k, keyMask).transpose(-1, -2)) / Math.Sqrt(q.shape[3]);   // (B, H, Tq, Tk)
        return ReferenceAttention.MaskedSoftmax(scores, allowed.expand(scores.shape));
    }

    /// <summary>
    /// The weights routing attention put on each key: per group, a softmax over its key slots under the causal,
    /// shared-QK and padding rules; scattered to (query position, key position) and averaged over the query slots
    /// holding each position (the grouped kernel's mean). (B, H, T, T).
    /// </summary>
    private static Tensor RoutingProbabilities(Tensor q, Tensor keys, RoutingAttentionOutput routed, Tensor? keyMask, bool causal, bool sharedQk)
    {
        long batch = q.shape[0], h = q.shape[1], seqLen = q.shape[2], dim = q.shape[3];
        var queryIdx = routed.QueryIndices; var keyIdx = routed.KeyIndices;                     // (B, H, G, W), −1 = empty
        long groupCount = queryIdx.shape[2], wq = queryIdx.shape[3], wk = keyIdx.shape[3];
        var qPos = queryIdx.clamp_min(0); var kPos = keyIdx.clamp_min(0);
        Tensor Gather(Tensor x, Tensor pos, long w) =>
            x.gather(2, pos.view(batch, h, groupCount * w, 1).expand(-1, -1, -1, dim)).view(batch, h, groupCount, w, dim);   // (B, H, G, W, D)
        var scores = matmul(Gather(q, qPos, wq), Gather(keys, kPos, wk).transpose(-1, -2)) / Math.Sqrt(dim);   // (B, H, G, Wq, Wk)
        var allowed = queryIdx.ge(0).unsqueeze(-1).logical_and(keyIdx.ge(0).unsqueeze(-2));      // (B, H, G, Wq, Wk)
        if (keyMask is not null)
        {
            var realKey = keyMask.view(batch, 1, seqLen).expand(batch, h, seqLen)
                                 .gather(2, kPos.view(batch, h, groupCount * wk)).view(batch, h, groupCount, 1, wk);
            allowed = allowed.logical_and(realKey);
        }
        if (causal) allowed = allowed.logical_and(keyIdx.unsqueeze(-2).le(queryIdx.unsqueeze(-1)));
        if (sharedQk)
        {
            // Attending to oneself only when nothing else is allowed.
            var others = allowed.logical_and(keyIdx.unsqueeze(-2).ne(queryIdx.unsqueeze(-1)));
            allowed = where(others.any(-1, keepdim: true), others, allowed);
        }
        var slotProbs = ReferenceAttention.MaskedSoftmax(scores, allowed);                      // (B, H, G, Wq, Wk)
        var flat = (qPos.unsqueeze(-1) * seqLen + kPos.unsqueeze(-2)).view(batch, h, -1);          // (B, H, G·Wq·Wk)
        var summed = zeros(new long[] { batch, h, seqLen * seqLen }, dtype: q.dtype, device: q.device)
                     .scatter_add(2, flat, slotProbs.reshape(batch, h, -1)).view(batch, h, seqLen, seqLen);   // (B, H, T, T)
        var slots = zeros(new long[] { batch, h, seqLen }, dtype: q.dtype, device: q.device)
                    .scatter_add(2, qPos.view(batch, h, -1), queryIdx.ge(0).to(q.dtype).view(batch, h, -1));  // (B, H, T)
        return summed / slots.clamp_min(1).unsqueeze(-1);
    }

    /// <summary>
    /// HF's extended additive mask → our key mask. <paramref name="mask"/> must be floating point of shape
    /// (B or 1, 1, 1, keys) with values 0 (keep) or ≤ −10000 / −∞ (padding); NaN, positive values and soft biases in
    /// between are rejected with an <see cref="ArgumentException"/> naming <paramref name="name"/>.
    /// </summary>
    /// <returns>(B, keys) bool, true = keep; null when <paramref name="mask"/> is null.</returns>
    public static Tensor? KeyMaskFromAdditive(Tensor? mask, long batch, long keys, string name = "attention_mask")
    {
        if (mask is null) return null;
        Check.That(mask.dim() == 4 && (mask.shape[0] == batch || mask.shape[0] == 1) && mask.shape[1] == 1 && mask.shape[2] == 1 && mask.shape[3] == keys,
            name, $"must be an additive mask of shape (B, 1, 1, T) = ({batch}, 1, 1, {keys}) (0 = keep, large negative = padding), got {Check.ShapeOf(mask)}.");
        Check.FloatingPoint(mask, name);
        using var scope = NewDisposeScope();
        var values = mask.detach().to(ScalarType.Float64).view(mask.shape[0], keys);
        Check.That(!values.isnan().any().item<bool>(), name, "contains NaN; expected 0 (keep) or a large negative value (padding).");
        double max = values.max().item<double>();
        Check.That(max <= 0, name, $"additive mask values must be <= 0 (0 = keep, large negative = padding), got {max}.");
        var keep = values.eq(0);
        var drop = values.le(-1e4);
        if (!keep.logical_or(drop).all().item<bool>())
        {
            double soft = values.masked_select(keep.logical_or(drop).logical_not())[0].item<double>();
            throw new ArgumentException($"{name}: values must be 0 (keep) or <= -10000 (padding: -10000, torch.finfo(dtype).min or -inf), got {soft}; " +
                "soft additive biases are not supported by the sparse kernels.", name);
        }
        return keep.expand(batch, keys).contiguous().MoveToOuterDisposeScope();
    }

    private static Tensor ZeroPadding(Tensor x, Tensor? keyMask) =>
        keyMask is null ? x : x.masked_fill(keyMask.logical_not().view(x.shape[0], 1, x.shape[2], 1), 0);
}
