using SparseAttention.Clustering;
using System.Text.Json.Serialization;
using SparseAttention.Kernels;
using SparseAttention.Patterns;

namespace SparseAttention.Model;

/// <summary>How token positions enter attention.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<PositionalEncoding>))]
public enum PositionalEncoding
{
    /// <summary>Rotary embeddings (RoFormer) applied to q and k of every self-attention head; no parameters.
    /// Works with every kernel. What the PyTorch routing-transformer uses.</summary>
    Rotary,
    /// <summary>Shaw et al. (2018) learned relative embeddings on the key and value side, distances
    /// clipped to ±<see cref="TransformerConfig.MaxRelativePosition"/> (the authors' Routing Transformer): one pair of
    /// tables per local/static, routing and LSH head group, on original positions. The per-(query, key) terms are
    /// evaluated on the attended pairs only (O(T·W) memory): for local/static heads on float32 CPU by the fused kernel
    /// (far pairs) plus ops (the band |j − i| &lt; R), otherwise by the Ops kernels. Synthesizer heads get none;
    /// not with routing_look_back.</summary>
    RelativeShaw,
    /// <summary>No positional information at all.</summary>
    None,
    /// <summary>ALiBi (Press et al. 2022): a bias −mₕ·|j − i| on the scores of local/static, routing and LSH heads, the
    /// paper's fixed slope per head (over all of a layer's heads, in head order); no parameters. Evaluated like
    /// RelativeShaw (local/static heads on float32 CPU: the fused kernel with the bias as an extra key feature);
    /// synthesizer heads get none; not with routing_look_back.</summary>
    Alibi,
}

/// <summary>Which vocabulary a language model's token ids come from (see <c>SparseAttention.Training.TextTokenizer</c>).</summary>
[JsonConverter(typeof(JsonStringEnumConverter<TokenizerKind>))]
public enum TokenizerKind
{
    /// <summary>UTF-8 bytes: token id = byte value, 256 tokens.</summary>
    [JsonStringEnumMemberName("bytes")] Bytes,
    /// <summary>GPT-2's byte-level BPE (r50k): 50,257 tokens.</summary>
    [JsonStringEnumMemberName("gpt2")] Gpt2,
    /// <summary>The cl100k_base byte-level BPE (GPT-3.5/4): 100,277 token ids (100,256 merges plus special tokens).</summary>
    [JsonStringEnumMemberName("cl100k")] Cl100k,
}

/// <summary>How cross-attention (ReceivesContext) attends the context.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<CrossAttentionKind>))]
public enum CrossAttentionKind
{
    /// <summary>Every query attends every real context token.</summary>
    Dense,
    /// <summary>Content-based routing between queries and context keys (online k-means).</summary>
    Routing,
}

/// <summary>The position-wise sublayer of a layer (after its attention sublayer).</summary>
public enum PositionwiseKind
{
    /// <summary>The feed-forward (<see cref="Model.FeedForward"/>).</summary>
    FeedForward,
    /// <summary>A top-2 mixture of feed-forward experts (<see cref="Model.MixtureOfExperts"/>; <c>moe_layers</c>).</summary>
    MixtureOfExperts,
    /// <summary>A product-key memory (<see cref="Model.ProductKeyMemory"/>; <c>pkm_layers</c>).</summary>
    ProductKeyMemory,
}

/// <summary>The kind of a head group inside an attention layer.</summary>
public enum HeadGroupKind
{
    /// <summary>Local heads: a <see cref="WindowPattern"/> built from the local-attention fields.</summary>
    Local,
    /// <summary>One of <see cref="TransformerConfig.StaticHeadGroups"/>.</summary>
    Static,
    /// <summary>Content-based routing heads (online k-means): the heads not claimed by local, static, LSH or synthesizer groups.</summary>
    Routing,
    /// <summary>Synthesizer heads (<see cref="TransformerConfig.Synthesizer"/>), after the LSH heads.</summary>
    Synthesizer,
    /// <summary>LSH / ALSH heads (<see cref="TransformerConfig.Lsh"/>), after the static groups and before synthesizer and routing heads.</summary>
    Lsh,
}

/// <summary>One head group of one layer, as the configuration lays it out.</summary>
/// <param name="Kind">What computes the group.</param>
/// <param name="Heads">Number of heads in the group.</param>
/// <param name="Pattern">The static pattern (Local and Static groups); null for Routing and Synthesizer.</param>
public sealed record HeadGroupPlan(HeadGroupKind Kind, int Heads, AttentionPattern? Pattern);

/// <summary>
/// The one configuration record behind <see cref="RoutingTransformer"/> and <see cref="RoutingTransformerLM"/>.
/// Property names mirror the PyTorch <c>routing_transformer</c> library in PascalCase; JSON presets use
/// its snake_case names. Each comment gives the default and the meaning.
/// </summary>
/// <remarks>Roy et al. 2020, "Efficient Content-Based Sparse Attention with Routing Transformers" (arXiv 2003.05997).</remarks>
public sealed record TransformerConfig
{
    // ---- sizes -------------------------------------------------------------------------------
    /// <summary>20000 — vocabulary size (LM only): token ids are in [0, NumTokens).</summary>
    [JsonPropertyName("num_tokens")] public int NumTokens { get; init; } = 20000;
    /// <summary>512 — model width (features per token inside the layers).</summary>
    [JsonPropertyName("dim")] public int Dim { get; init; } = 512;
    /// <summary>12 — number of layers (each: attention sublayer + feed-forward sublayer).</summary>
    [JsonPropertyName("depth")] public int Depth { get; init; } = 12;
    /// <summary>8 — attention heads per layer (local + static groups + LSH + synthesizer + routing).</summary>
    [JsonPropertyName("heads")] public int Heads { get; init; } = 8;
    /// <summary>null — width of one head; null = Dim / Heads (then Dim must divide by Heads).</summary>
    [JsonPropertyName("dim_head")] public int? DimHead { get; init; }
    /// <summary>8192 — longest sequence the model accepts; any T ≤ MaxSeqLen works.</summary>
    [JsonPropertyName("max_seq_len")] public int MaxSeqLen { get; init; } = 8192;
    /// <summary>false — true = decoder (no query sees a later key), false = encoder (bidirectional).</summary>
    [JsonPropertyName("causal")] public bool Causal { get; init; }
    /// <summary>bytes — the vocabulary of the token ids (LM only): bytes, gpt2 or cl100k. Recorded so that sampling and
    /// evaluation encode and decode text as training did; training needs NumTokens = the tokenizer's vocabulary size.</summary>
    [JsonPropertyName("tokenizer")] public TokenizerKind Tokenizer { get; init; } = TokenizerKind.Bytes;

    // ---- head groups ---------------------------------------------------------------------------
    /// <summary>64 — used by routing heads: tokens per k-means cluster; clusters = MaxSeqLen / WindowSize.</summary>
    [JsonPropertyName("window_size")] public int WindowSize { get; init; } = 64;
    /// <summary>null — used by routing heads and routing cross-attention: k-means centroids per head; null = MaxSeqLen / WindowSize (the PyTorch
    /// library's rule). Set it to decouple the two, as the authors' <c>sparsity_cluster_size</c> does: each cluster still
    /// takes WindowSize tokens (encoder) or is chunked every WindowSize members (decoder).</summary>
    [JsonPropertyName("num_clusters")] public int? NumClusters { get; init; }
    /// <summary>null — local heads' window (tokens); null = WindowSize / 2, as in the PyTorch library.</summary>
    [JsonPropertyName("local_attn_window_size")] public int? LocalAttnWindowSize { get; init; }
    /// <summary>1 — local heads attend their own window plus this many windows back (and forward when not causal).</summary>
    [JsonPropertyName("local_attn_radius_blocks")] public int LocalAttnRadiusBlocks { get; init; } = 1;
    /// <summary>[0] — local heads per layer: one value = every layer, or one value per layer (Depth values).</summary>
    [JsonPropertyName("n_local_attn_heads")] public int[] NLocalAttnHeads { get; init; } = [0];
    /// <summary>0 — the first N layers have no routing heads: the heads that would route are local heads there.</summary>
    [JsonPropertyName("sparsity_skip_first")] public int SparsitySkipFirst { get; init; }
    /// <summary>null — extra static head groups in every layer (e.g. strided or fixed heads), after the local heads;
    /// the remaining heads route.</summary>
    [JsonPropertyName("static_head_groups")] public StaticHeadGroup[]? StaticHeadGroups { get; init; }
    /// <summary>null — LSH (Reformer) or ALSH heads in every layer, after the static groups; see <see cref="LshSpec"/>
    /// for its fields (heads, n_hashes, bucket_size, …). Below SparsitySkipFirst they are local heads.</summary>
    [JsonPropertyName("lsh")] public LshSpec? Lsh { get; init; }
    /// <summary>null — Synthesizer heads in every layer (after the static groups; see <see cref="SynthesizerSpec"/>);
    /// the remaining heads route.</summary>
    [JsonPropertyName("synthesizer")] public SynthesizerSpec? Synthesizer { get; init; }

    // ---- regularisation ------------------------------------------------------------------------
    /// <summary>0 — attention dropout: on attention probabilities where they are materialised (the dense
    /// RelativeShaw path), otherwise on each head group's output before the output projection (the fused
    /// block-sparse kernels never form probabilities).</summary>
    [JsonPropertyName("attn_dropout")] public double AttnDropout { get; init; }
    /// <summary>0 — dropout on the attention sublayer's output, after the output projection.</summary>
    [JsonPropertyName("attn_layer_dropout")] public double AttnLayerDropout { get; init; }
    /// <summary>0 — dropout inside the feed-forward, after the activation.</summary>
    [JsonPropertyName("ff_dropout")] public double FfDropout { get; init; }
    /// <summary>0 — LayerDrop (Fan et al. 2020): in training, each layer is skipped with this probability.</summary>
    [JsonPropertyName("layer_dropout")] public double LayerDropout { get; init; }

    // ---- feed-forward --------------------------------------------------------------------------
    /// <summary>4 — feed-forward hidden width = FfMult · Dim.</summary>
    [JsonPropertyName("ff_mult")] public int FfMult { get; init; } = 4;
    /// <summary>false — GEGLU feed-forward (Shazeer 2020): GELU(x·W) ⊙ (x·V) instead of GELU(x·W).</summary>
    [JsonPropertyName("ff_glu")] public bool FfGlu { get; init; }
    /// <summary>Gelu — the feed-forward nonlinearity (<c>ff_activation</c>): Gelu, Relu, Silu or ReluSquared; with ff_glu it
    /// is the gate's.</summary>
    [JsonPropertyName("ff_activation"), JsonConverter(typeof(JsonStringEnumConverter<FeedForwardActivation>))]
    public FeedForwardActivation FfActivation { get; init; } = FeedForwardActivation.Gelu;
    /// <summary>1 — the feed-forward runs over the sequence in this many chunks (same result, smaller peak
    /// intermediate when gradients are not recorded).</summary>
    [JsonPropertyName("ff_chunks")] public int FfChunks { get; init; } = 1;
    /// <summary>null — layers (1-based, as the PyTorch library's <c>moe_layers</c>) whose feed-forward is a top-2
    /// mixture of experts (<see cref="MixtureOfExperts"/>; each expert is the feed-forward the fields above describe);
    /// its load-balancing loss is added to the auxiliary loss. Not in cross-attention blocks. With WeightTie: none or
    /// every layer.</summary>
    [JsonPropertyName("moe_layers")] public int[]? MoeLayers { get; init; }
    /// <summary>4 — MoeLayers only: experts per mixture-of-experts layer (≥ 2).</summary>
    [JsonPropertyName("moe_num_experts")] public int MoeNumExperts { get; init; } = 4;
    /// <summary>0.01 — MoeLayers only: weight of the load-balancing loss in the auxiliary loss (≥ 0).</summary>
    [JsonPropertyName("moe_loss_coef")] public double MoeLossCoef { get; init; } = 1e-2;
    /// <summary>null — layers (1-based, as the PyTorch library's <c>pkm_layers</c>) whose feed-forward is a product-key
    /// memory (<see cref="ProductKeyMemory"/>). Not in cross-attention blocks; not together with MoeLayers in one layer.
    /// With WeightTie: none or every layer.</summary>
    [JsonPropertyName("pkm_layers")] public int[]? PkmLayers { get; init; }
    /// <summary>128 — PkmLayers only: sub-keys per half; the memory holds pkm_num_keys² values.</summary>
    [JsonPropertyName("pkm_num_keys")] public int PkmNumKeys { get; init; } = 128;
    /// <summary>32 — PkmLayers only: memory slots each head reads per token (≤ PkmNumKeys).</summary>
    [JsonPropertyName("pkm_topk")] public int PkmTopK { get; init; } = 32;
    /// <summary>4 — PkmLayers only: query heads of a product-key memory (their reads are summed).</summary>
    [JsonPropertyName("pkm_heads")] public int PkmHeads { get; init; } = 4;
    /// <summary>128 — PkmLayers only: features of each half of a memory query.</summary>
    [JsonPropertyName("pkm_dim_head")] public int PkmDimHead { get; init; } = 128;

    // ---- architecture --------------------------------------------------------------------------
    /// <summary>false — RevNet layers (y1 = x1 + attn(x2), y2 = x2 + ff(y1), output = (y1 + y2) / 2). Training keeps
    /// no per-layer activations: the backward rebuilds each layer's input from its output and recomputes it, replaying
    /// dropout masks and k-means routing exactly (memory for activations independent of Depth, one extra forward).</summary>
    [JsonPropertyName("reversible")] public bool Reversible { get; init; }
    /// <summary>false — one layer's weights are shared by all Depth layers (needs the same head groups in every layer).</summary>
    [JsonPropertyName("weight_tie")] public bool WeightTie { get; init; }
    /// <summary>false — LM only: logits use the token embedding matrix transposed instead of a separate output layer.</summary>
    [JsonPropertyName("tie_embedding")] public bool TieEmbedding { get; init; }
    /// <summary>null — LM only: token embedding width; when ≠ Dim, embeddings are projected EmbDim → Dim and back (factorized embedding).</summary>
    [JsonPropertyName("emb_dim")] public int? EmbDim { get; init; }
    /// <summary>false — LM only: a learned absolute position embedding (MaxSeqLen × EmbDim) is added to the token embedding,
    /// as the PyTorch library's <c>use_absolute_pos_emb</c>; positions are 0.. within the context (a sliding decoding
    /// window starts again at 0 after each re-encode, as a full forward of that window does).</summary>
    [JsonPropertyName("use_absolute_pos_emb")] public bool UseAbsolutePosEmb { get; init; }
    /// <summary>false — LM only: the sinusoidal timing signal (<see cref="TimingSignal"/>, tensor2tensor's) is added to the
    /// token embedding, as the authors' <c>add_timing_signal</c>; positions as for UseAbsolutePosEmb.</summary>
    [JsonPropertyName("add_timing_signal")] public bool AddTimingSignal { get; init; }
    /// <summary>0 — LM only, bidirectional models (Causal = false; the encoder of an encoder-decoder): dropout on the
    /// embedded tokens before the first layer, as the authors' <c>input_dropout</c> on their encoder's inputs.</summary>
    [JsonPropertyName("input_dropout")] public double InputDropout { get; init; }
    /// <summary>0 — LM only, causal models (a decoder, or a language model): dropout on the embedded tokens before the
    /// first layer, as the authors' <c>target_dropout</c> on their decoder's targets.</summary>
    [JsonPropertyName("target_dropout")] public double TargetDropout { get; init; }
    /// <summary>false — ScaleNorm (g·x/‖x‖, g learned, init √Dim) instead of LayerNorm before each sublayer and at the end.</summary>
    [JsonPropertyName("use_scale_norm")] public bool UseScaleNorm { get; init; }
    /// <summary>false — ReZero: no pre-norm; each sublayer's output is scaled by a learned scalar initialised to 0.</summary>
    [JsonPropertyName("use_rezero")] public bool UseRezero { get; init; }
    /// <summary>false — token shift before each sublayer's norm: causal, the second half of the features comes from
    /// the previous token; bidirectional, the first third from the next token and the last third from the previous
    /// one (padding is zeroed first). See <see cref="TokenShift"/>.</summary>
    [JsonPropertyName("shift_tokens")] public bool ShiftTokens { get; init; }

    // ---- routing (k-means) ---------------------------------------------------------------------
    /// <summary>null — used by routing heads: learned memory key/value pairs per cluster. null = 1 for causal routing without
    /// shared QK and without look-back (there a query's cluster chunk may hold no earlier key, and one memory pair gives
    /// every query something to attend, as the PyTorch library forces), else 0. An explicit 0 keeps such queries' outputs
    /// at zero.</summary>
    [JsonPropertyName("num_mem_kv")] public int? NumMemKv { get; init; }
    /// <summary>null — used by routing heads: share query and key projections; null = Causal (the PyTorch default).</summary>
    [JsonPropertyName("shared_qk")] public bool? SharedQk { get; init; }
    /// <summary>0.999 — used by routing heads: EMA decay of the k-means centroids, in [0, 1).</summary>
    [JsonPropertyName("kmeans_ema_decay")] public double KmeansEmaDecay { get; init; } = 0.999;
    /// <summary>true — used by routing heads: centroids move by exponential moving average of their assigned vectors. false
    /// — the authors' <c>ema = false</c>: the centroids are a parameter trained by gradient, pulled toward their tokens by a
    /// codebook term (weight 1) added to the k-means loss (<see cref="OnlineKMeans.TrainCentroidsByGradient"/>).</summary>
    [JsonPropertyName("kmeans_ema")] public bool KmeansEma { get; init; } = true;
    /// <summary>L2 — used by routing heads: how queries, keys and centroids are normalised before clustering: L2 (unit
    /// vectors, the PyTorch library) or LayerNorm without affine (centred and scaled, the authors' choice; centring
    /// removes a direction shared by all positions, which otherwise can pull every token into one cluster).</summary>
    [JsonPropertyName("kmeans_norm"), JsonConverter(typeof(JsonStringEnumConverter<KMeansNorm>))]
    public KMeansNorm KmeansNorm { get; init; } = KMeansNorm.L2;
    /// <summary>false — routing heads attend with the k-means-normalised queries and keys (normalised as
    /// <see cref="KmeansNorm"/> says), not only cluster them: with <c>kmeans_norm = LayerNorm</c> this is the Routing
    /// Transformer authors' variant (they layer-normalise q and k and attend with them); false is the PyTorch library's
    /// (raw q and k attend; with shared QK the keys are the normalised queries either way).</summary>
    [JsonPropertyName("kmeans_attend_normalized")] public bool KmeansAttendNormalized { get; init; }
    /// <summary>false — causal routing heads: each chunk of a cluster also attends the previous chunk of the same cluster
    /// (a query sees up to 2·WindowSize keys; stays causal). Needs Causal and NumMemKv = 0.</summary>
    [JsonPropertyName("routing_look_back")] public bool RoutingLookBack { get; init; }
    /// <summary>false — routing heads (self-attention) cluster by SimHash instead of k-means, as the authors' <c>hash_items</c>:
    /// a token's cluster is the sign pattern of its normalised vector on log2(clusters) fixed random orthonormal directions;
    /// no centroids to learn, no commitment loss (see <see cref="Modules.RoutingAttention.HashItems"/>). Needs a power-of-two
    /// number of clusters no larger than 2^DimHead.</summary>
    [JsonPropertyName("hash_items")] public bool HashItems { get; init; }
    /// <summary>0 — in every layer with routing heads, this many of them (the last) are strided cluster heads, as the
    /// authors' <c>sparsity_cluster_strided_num_heads</c>: each centroid takes every ⌊n / WindowSize⌋-th token of its
    /// similarity ranking instead of its WindowSize nearest (see <see cref="Modules.RoutingAttention.StridedHeads"/>).
    /// Non-causal self-attention only (encoders): the ranking covers the whole sequence.</summary>
    [JsonPropertyName("sparsity_cluster_strided_num_heads")] public int SparsityClusterStridedNumHeads { get; init; }
    /// <summary>1e-4 — used by routing heads: weight of the k-means commitment loss in the auxiliary loss.</summary>
    [JsonPropertyName("commitment_factor")] public double CommitmentFactor { get; init; } = 1e-4;

    // ---- positions -----------------------------------------------------------------------------
    /// <summary>Rotary — how positions enter attention; see <see cref="Model.PositionalEncoding"/>.</summary>
    [JsonPropertyName("positional_encoding")] public PositionalEncoding PositionalEncoding { get; init; } = PositionalEncoding.Rotary;
    /// <summary>16 — RelativeShaw only: relative distances are clipped to ±this (2·this + 1 learned embeddings per table).</summary>
    [JsonPropertyName("max_relative_position")] public int MaxRelativePosition { get; init; } = 16;

    // ---- encoder-decoder -----------------------------------------------------------------------
    /// <summary>false — every layer also cross-attends (all heads; routing unless CrossAttention = Dense) to a context
    /// sequence, e.g. an encoder's output.</summary>
    [JsonPropertyName("receives_context")] public bool ReceivesContext { get; init; }
    /// <summary>null — ReceivesContext only: width of the context vectors; null = Dim.</summary>
    [JsonPropertyName("context_dim")] public int? ContextDim { get; init; }
    /// <summary>null — ReceivesContext only: how the cross-attention attends the context; null = Routing when
    /// ReceivesContext (as the PyTorch library, which always routes it), else Dense. Dense: every query sees every real
    /// context token (O(T·S)). Routing: all heads route — the k-means clusters queries and context keys together, each
    /// cluster takes its ContextWindowSize nearest context keys, and queries are grouped like routing self-attention
    /// (causal-safe in a decoder, and decoded incrementally); see <see cref="Modules.RoutingAttention.CrossForward"/>.
    /// Routing needs MaxSeqLen divisible by WindowSize unless NumClusters is set.</summary>
    [JsonPropertyName("cross_attention")]
    public CrossAttentionKind? CrossAttention { get; init; }
    /// <summary>false — ReceivesContext only: cross-attention projects the context's keys with the query projection
    /// (<c>to_q</c>; no <c>to_k</c>), as the PyTorch library's <c>context_shared_qk</c>. Needs ContextDim = Dim.</summary>
    [JsonPropertyName("context_shared_qk")] public bool ContextSharedQk { get; init; }
    /// <summary>null — CrossAttention = Routing only: context tokens per cluster; null = WindowSize.</summary>
    [JsonPropertyName("context_window_size")] public int? ContextWindowSize { get; init; }

    // ---- kernels -------------------------------------------------------------------------------
    /// <summary>64 — block size static patterns are compiled with (performance only; capped at T).</summary>
    [JsonPropertyName("block_size")] public int BlockSize { get; init; } = 64;
    /// <summary>Auto — kernel for static head groups (Auto = fused C# kernels for float32 CPU, else TorchSharp ops; with
    /// RelativeShaw or Alibi positions, Ops) and routing cross-attention; dense cross-attention uses the reference kernel.</summary>
    [JsonPropertyName("kernel"), JsonConverter(typeof(JsonStringEnumConverter<AttentionKernel>))]
    public AttentionKernel Kernel { get; init; } = AttentionKernel.Auto;
    /// <summary>Float32 — dtype of the self-attention q/k/v/out projections and the feed-forward matmuls: Float32, or
    /// BFloat16 (cast at each matmul; the float32 weights stay the master copy; norms, attention, cross-attention, residual
    /// stream, loss and optimizer stay float32). See <see cref="Model.ComputeDtype"/>.</summary>
    [JsonPropertyName("compute_dtype")] public ComputeDtype ComputeDtype { get; init; } = ComputeDtype.Float32;

    // ---- derived values ------------------------------------------------------------------------
    /// <summary>DimHead, or Dim / Heads when unset.</summary>
    [JsonIgnore] public int ResolvedDimHead => DimHead ?? Dim / Math.Max(1, Heads);
    /// <summary>LocalAttnWindowSize, or WindowSize / 2 (at least 1) when unset.</summary>
    [JsonIgnore] public int ResolvedLocalAttnWindowSize => LocalAttnWindowSize ?? Math.Max(1, WindowSize / 2);
    /// <summary>EmbDim, or Dim when unset.</summary>
    [JsonIgnore] public int ResolvedEmbDim => EmbDim ?? Dim;
    /// <summary>SharedQk, or Causal when unset.</summary>
    [JsonIgnore] public bool ResolvedSharedQk => SharedQk ?? Causal;

    /// <summary>NumMemKv, or its default when unset (see <see cref="NumMemKv"/>).</summary>
    [JsonIgnore] public int ResolvedNumMemKv => NumMemKv ?? (Causal && !ResolvedSharedQk && !RoutingLookBack ? 1 : 0);
    /// <summary>ContextDim, or Dim when unset.</summary>
    [JsonIgnore] public int ResolvedContextDim => ContextDim ?? Dim;
    /// <summary>ContextWindowSize, or WindowSize when unset.</summary>
    [JsonIgnore] public int ResolvedContextWindowSize => ContextWindowSize ?? WindowSize;
    /// <summary>CrossAttention, or Routing when unset and ReceivesContext (Dense when the model receives no context).</summary>
    [JsonIgnore] public CrossAttentionKind ResolvedCrossAttention => CrossAttention ?? (ReceivesContext ? CrossAttentionKind.Routing : CrossAttentionKind.Dense);

    /// <summary>The position-wise sublayer of layer <paramref name="layer"/> (0-based; MoeLayers and PkmLayers are 1-based).</summary>
    public PositionwiseKind PositionwiseKindForLayer(int layer) =>
        MoeLayers?.Contains(layer + 1) == true ? PositionwiseKind.MixtureOfExperts
        : PkmLayers?.Contains(layer + 1) == true ? PositionwiseKind.ProductKeyMemory
        : PositionwiseKind.FeedForward;

    /// <summary>Local heads in layer <paramref name="layer"/> as NLocalAttnHeads gives them (before SparsitySkipFirst).</summary>
    public int LocalHeadsInLayer(int layer) => NLocalAttnHeads.Length == 1 ? NLocalAttnHeads[0] : NLocalAttnHeads[layer];

    /// <summary>
    /// The head groups of layer <paramref name="layer"/>, in head order: local heads, then each static
    /// group, then LSH heads, then the synthesizer heads, then routing heads (the rest). Layers below SparsitySkipFirst turn
    /// their routing and LSH heads into local heads. Empty groups are left out. Call <see cref="Validate"/> first.
    /// </summary>
    public IReadOnlyList<HeadGroupPlan> HeadGroupsForLayer(int layer)
    {
        Check.That(layer >= 0 && layer < Depth, nameof(layer), $"must be in [0, Depth = {Depth}), got {layer}.");
        int staticHeads = StaticHeadGroups?.Sum(g => g.Heads) ?? 0;
        int local = LocalHeadsInLayer(layer);
        int lsh = Lsh?.Heads ?? 0;
        int synthesizer = Synthesizer?.Heads ?? 0;
        int routing = Heads - local - staticHeads - lsh - synthesizer;
        if (layer < SparsitySkipFirst) { local += routing + lsh; routing = 0; lsh = 0; }
        var plan = new List<HeadGroupPlan>();
        if (local > 0)
        {
            int radius = LocalAttnRadiusBlocks;
            plan.Add(new HeadGroupPlan(HeadGroupKind.Local, local,
                new WindowPattern(ResolvedLocalAttnWindowSize, radius, Causal ? 0 : radius, exactWindowSize: false, Causal)));
        }
        foreach (var g in StaticHeadGroups ?? [])
            plan.Add(new HeadGroupPlan(HeadGroupKind.Static, g.Heads, g.Pattern.ToModelPattern(Causal, layer, MaxSeqLen)));
        if (lsh > 0) plan.Add(new HeadGroupPlan(HeadGroupKind.Lsh, lsh, null));
        if (synthesizer > 0) plan.Add(new HeadGroupPlan(HeadGroupKind.Synthesizer, synthesizer, null));
        if (routing > 0) plan.Add(new HeadGroupPlan(HeadGroupKind.Routing, routing, null));
        return plan;
    }

    /// <summary>Throws <see cref="ArgumentException"/> whose ParamName is the offending field when the
    /// configuration is inconsistent; returns this configuration otherwise.</summary>
    public TransformerConfig Validate()
    {
        Check.Positive(NumTokens, nameof(NumTokens));
        Check.Positive(Dim, nameof(Dim));
        Check.Positive(Depth, nameof(Depth));
        Check.Positive(Heads, nameof(Heads));
        if (DimHead is int dh) Check.Positive(dh, nameof(DimHead));
        else Check.That(Dim % Heads == 0, nameof(Heads), $"Dim ({Dim}) must be divisible by Heads ({Heads}) when DimHead is not set.");
        Check.Positive(MaxSeqLen, nameof(MaxSeqLen));

        Check.Positive(WindowSize, nameof(WindowSize));
        if (LocalAttnWindowSize is int lw) Check.Positive(lw, nameof(LocalAttnWindowSize));
        Check.NonNegative(LocalAttnRadiusBlocks, nameof(LocalAttnRadiusBlocks));
        Check.That(NLocalAttnHeads is not null && (NLocalAttnHeads.Length == 1 || NLocalAttnHeads.Length == Depth),
            nameof(NLocalAttnHeads), $"must hold one value (all layers) or Depth = {Depth} values, got {NLocalAttnHeads?.Length.ToString() ?? "null"}.");
        int staticHeads = 0;
        if (StaticHeadGroups is not null)
            for (int i = 0; i < StaticHeadGroups.Length; i++)
            {
                var g = StaticHeadGroups[i];
                string field = $"{nameof(StaticHeadGroups)}[{i}]";
                Check.That(g is not null && g.Pattern is not null, field, "must be a group with a pattern.");
                Check.That(g!.Heads > 0, field, $"Heads must be > 0, got {g.Heads}.");
                try { g.Pattern!.ToModelPattern(Causal, 0, MaxSeqLen).Validate(MaxSeqLen, g.Heads); }
                catch (ArgumentException e) { throw new ArgumentException($"{field}: {e.Message}", field, e); }
                staticHeads += g.Heads;
            }
        Lsh?.Validate(nameof(Lsh));
        int lshHeads = Lsh?.Heads ?? 0;
        for (int layer = 0; layer < NLocalAttnHeads!.Length; layer++)
        {
            int local = NLocalAttnHeads[layer];
            Check.That(local >= 0 && local + staticHeads + lshHeads <= Heads, nameof(NLocalAttnHeads),
                $"local heads ({local}{(NLocalAttnHeads.Length > 1 ? $" in layer {layer}" : "")}) plus static group heads ({staticHeads}) plus LSH heads ({lshHeads}) must be in [0, Heads = {Heads}].");
        }
        if (Synthesizer is not null)
        {
            Synthesizer.Validate(MaxSeqLen, nameof(Synthesizer));
            int mostLocal = NLocalAttnHeads.Max();
            Check.That(mostLocal + staticHeads + lshHeads + Synthesizer.Heads <= Heads, nameof(Synthesizer),
                $"local heads ({mostLocal}) plus static group heads ({staticHeads}) plus LSH heads ({lshHeads}) plus synthesizer heads ({Synthesizer.Heads}) must be at most Heads = {Heads}.");
        }
        Check.That(SparsitySkipFirst >= 0 && SparsitySkipFirst <= Depth, nameof(SparsitySkipFirst),
            $"must be in [0, Depth = {Depth}], got {SparsitySkipFirst}.");
        bool anyRouting = Enumerable.Range(0, Depth).Any(l => HeadGroupsForLayer(l).Any(g => g.Kind == HeadGroupKind.Routing));
        Check.That(NumClusters is null or > 0, nameof(NumClusters), $"must be positive when given, got {NumClusters}.");
        if (SparsityClusterStridedNumHeads != 0)
        {
            Check.That(SparsityClusterStridedNumHeads > 0, nameof(SparsityClusterStridedNumHeads), $"must be ≥ 0, got {SparsityClusterStridedNumHeads}.");
            Check.That(!Causal, nameof(SparsityClusterStridedNumHeads),
                "strided cluster heads rank the whole sequence (a token's group depends on later tokens), so they need causal = false.");
            for (int l = 0; l < Depth; l++)
                foreach (var g in HeadGroupsForLayer(l).Where(g => g.Kind == HeadGroupKind.Routing))
                    Check.That(g.Heads >= SparsityClusterStridedNumHeads, nameof(SparsityClusterStridedNumHeads),
                        $"layer {l} has {g.Heads} routing heads, fewer than the {SparsityClusterStridedNumHeads} strided ones asked for.");
        }
        if (HashItems)
        {
            int hashed = NumClusters ?? Math.Max(1, MaxSeqLen / Math.Max(1, WindowSize));
            Check.That((hashed & (hashed - 1)) == 0 && System.Numerics.BitOperations.Log2((uint)hashed) <= ResolvedDimHead, nameof(HashItems),
                $"hashed clusters need a power-of-two number of clusters (num_clusters, or max_seq_len / window_size) of at most 2^DimHead, got {hashed} with DimHead {ResolvedDimHead}.");
        }
        if (anyRouting && NumClusters is null)
            Check.That(MaxSeqLen % WindowSize == 0, nameof(WindowSize),
                $"routing heads need MaxSeqLen ({MaxSeqLen}) divisible by WindowSize ({WindowSize}) to fix the number of clusters.");

        Probability(AttnDropout, nameof(AttnDropout));
        Probability(AttnLayerDropout, nameof(AttnLayerDropout));
        Probability(FfDropout, nameof(FfDropout));
        Probability(LayerDropout, nameof(LayerDropout));
        Probability(InputDropout, nameof(InputDropout));
        Probability(TargetDropout, nameof(TargetDropout));
        Check.That(InputDropout == 0 || !Causal, nameof(InputDropout),
            "drops the embedded inputs of a bidirectional model (the authors' encoder inputs); a causal model reads targets: use TargetDropout.");
        Check.That(TargetDropout == 0 || Causal, nameof(TargetDropout),
            "drops the embedded targets of a causal model (the authors' decoder targets); a bidirectional model reads inputs: use InputDropout.");

        Check.Positive(FfMult, nameof(FfMult));
        Check.Positive(FfChunks, nameof(FfChunks));
        if (EmbDim is int ed) Check.Positive(ed, nameof(EmbDim));
        LayerList(MoeLayers, nameof(MoeLayers));
        LayerList(PkmLayers, nameof(PkmLayers));
        if (MoeLayers is { Length: > 0 })
        {
            Check.That(MoeNumExperts >= MixtureOfExperts.TopK, nameof(MoeNumExperts), $"top-{MixtureOfExperts.TopK} gating needs at least {MixtureOfExperts.TopK} experts, got {MoeNumExperts}.");
            Check.That(MoeLossCoef >= 0 && double.IsFinite(MoeLossCoef), nameof(MoeLossCoef), $"must be finite and >= 0, got {MoeLossCoef}.");
            int? both = PkmLayers?.Intersect(MoeLayers).Cast<int?>().FirstOrDefault();
            Check.That(both is null, nameof(PkmLayers), $"layer {both} is in both MoeLayers and PkmLayers; a layer has one feed-forward.");
        }
        if (PkmLayers is { Length: > 0 })
        {
            Check.Positive(PkmNumKeys, nameof(PkmNumKeys));
            Check.That((long)PkmNumKeys * PkmNumKeys <= int.MaxValue, nameof(PkmNumKeys), $"pkm_num_keys² must fit in an int, got {PkmNumKeys}.");
            Check.That(PkmTopK >= 1 && PkmTopK <= PkmNumKeys, nameof(PkmTopK), $"must be in [1, PkmNumKeys = {PkmNumKeys}], got {PkmTopK}.");
            Check.Positive(PkmHeads, nameof(PkmHeads));
            Check.Positive(PkmDimHead, nameof(PkmDimHead));
        }

        Check.That(!(UseScaleNorm && UseRezero), nameof(UseRezero),
            "ReZero replaces the pre-norm, so UseScaleNorm would have no effect; set at most one of UseScaleNorm and UseRezero.");
        if (WeightTie)
        {
            var first = Signature(0);
            for (int l = 1; l < Depth; l++)
                Check.That(Signature(l) == first, nameof(WeightTie),
                    $"shares one layer across depth, so every layer needs the same head groups and position-wise sublayer; layer {l} has {Signature(l)}, layer 0 has {first} (see NLocalAttnHeads, SparsitySkipFirst, Interleaved static groups, MoeLayers, PkmLayers).");
        }

        Check.NonNegative(ResolvedNumMemKv, nameof(NumMemKv));
        Check.That(KmeansEmaDecay >= 0 && KmeansEmaDecay < 1, nameof(KmeansEmaDecay), $"must be in [0, 1), got {KmeansEmaDecay}.");
        Check.That(Enum.IsDefined(KmeansNorm), nameof(KmeansNorm), $"unknown value {KmeansNorm}.");
        Check.That(Enum.IsDefined(FfActivation), nameof(FfActivation), $"unknown value {FfActivation}.");
        Check.That(!RoutingLookBack || Causal, nameof(RoutingLookBack), "looks back along causal routing chunks; it needs Causal = true.");
        Check.That(!RoutingLookBack || ResolvedNumMemKv == 0, nameof(RoutingLookBack), $"cannot be combined with memory key/values (NumMemKv = {NumMemKv}).");
        Check.That(CommitmentFactor >= 0 && double.IsFinite(CommitmentFactor), nameof(CommitmentFactor), $"must be finite and >= 0, got {CommitmentFactor}.");

        Check.That(Enum.IsDefined(PositionalEncoding), nameof(PositionalEncoding), $"unknown value {PositionalEncoding}.");
        if (PositionalEncoding == PositionalEncoding.Rotary)
            Check.That(ResolvedDimHead % 2 == 0, nameof(DimHead), $"rotary embeddings rotate pairs of features, so the head width must be even, got {ResolvedDimHead}.");
        if (PositionalEncoding == PositionalEncoding.RelativeShaw) Check.Positive(MaxRelativePosition, nameof(MaxRelativePosition));
        if (PositionalEncoding is PositionalEncoding.RelativeShaw or PositionalEncoding.Alibi)
        {
            // Local and static heads take the terms in the fused block kernel; routing and LSH heads only in the grouped
            // Ops kernel, so a forced Fused cannot hold for every head kind.
            Check.That(Kernel != AttentionKernel.Fused, nameof(Kernel), $"the fused grouped kernel (routing and LSH heads) does not take {PositionalEncoding} terms; use Auto or Ops.");
            Check.That(!RoutingLookBack, nameof(RoutingLookBack), $"cannot be combined with {PositionalEncoding} positions yet.");
        }

        if (ContextDim is int cd) Check.Positive(cd, nameof(ContextDim));
        Check.That(ContextDim is null || ReceivesContext, nameof(ContextDim), "is only used when ReceivesContext is true.");
        Check.That(CrossAttention is null || Enum.IsDefined(CrossAttention.Value), nameof(CrossAttention), $"unknown value {CrossAttention}.");
        Check.That(!ContextSharedQk || ReceivesContext, nameof(ContextSharedQk), "is only used when ReceivesContext is true.");
        Check.That(!ContextSharedQk || ResolvedContextDim == Dim, nameof(ContextSharedQk),
            $"projects the context with the query projection, so ContextDim ({ResolvedContextDim}) must equal Dim ({Dim}).");
        Check.That(CrossAttention != CrossAttentionKind.Routing || ReceivesContext, nameof(CrossAttention), "Routing is only used when ReceivesContext is true.");
        if (ContextWindowSize is int cw) Check.Positive(cw, nameof(ContextWindowSize));
        bool routedCross = ReceivesContext && ResolvedCrossAttention == CrossAttentionKind.Routing;
        Check.That(ContextWindowSize is null || routedCross, nameof(ContextWindowSize), "is only used by routing cross-attention (ReceivesContext, CrossAttention Routing or unset).");
        if (routedCross)
        {
            Check.That(WindowSize <= MaxSeqLen, nameof(WindowSize), $"routing cross-attention needs WindowSize ({WindowSize}) <= MaxSeqLen ({MaxSeqLen}); or set cross_attention = Dense.");
            Check.That(NumClusters is not null || MaxSeqLen % WindowSize == 0, nameof(WindowSize),
                $"routing cross-attention (the default with ReceivesContext) needs MaxSeqLen ({MaxSeqLen}) divisible by WindowSize ({WindowSize}) to fix the number of clusters; set num_clusters, or cross_attention = Dense.");
        }
        Check.Positive(BlockSize, nameof(BlockSize));
        Check.That(Enum.IsDefined(Kernel), nameof(Kernel), $"unknown value {Kernel}.");
        Check.That(Enum.IsDefined(ComputeDtype), nameof(ComputeDtype), $"unknown value {ComputeDtype}; expected Float32 or BFloat16.");
        return this;
    }

    private string Signature(int layer) =>
        string.Join(" + ", HeadGroupsForLayer(layer).Select(g => $"{g.Heads}×{g.Pattern?.Name ?? g.Kind.ToString()}"))
        + $" with {PositionwiseKindForLayer(layer)}";

    /// <summary>A list of 1-based layer numbers: each in [1, Depth], no repeats.</summary>
    private void LayerList(int[]? layers, string name)
    {
        if (layers is null) return;
        foreach (int l in layers)
            Check.That(l >= 1 && l <= Depth, name, $"holds 1-based layer numbers in [1, Depth = {Depth}], got {l}.");
        Check.That(layers.Distinct().Count() == layers.Length, name, $"lists a layer twice: [{string.Join(", ", layers)}].");
    }

    private static void Probability(double p, string name) =>
        Check.That(p >= 0 && p < 1, name, $"must be in [0, 1), got {p}.");
}
