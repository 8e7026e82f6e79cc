using System.Text.Json.Serialization;
using SparseAttention.Patterns;

namespace SparseAttention.Model;

/// <summary>Which static pattern a <see cref="StaticPatternSpec"/> describes.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<StaticPatternKind>))]
public enum StaticPatternKind
{
    /// <summary>Every key (causal: every key ≤ query) — <see cref="DensePattern"/>.</summary>
    Dense,
    /// <summary>OpenAI's local band of <c>Size</c> tokens — <see cref="LocalBandPattern"/>.</summary>
    LocalBand,
    /// <summary>Blocked local windows of <c>Size</c> tokens with look-backward / look-forward windows — <see cref="WindowPattern"/>.</summary>
    Window,
    /// <summary>Sparse Transformer strided pattern with stride <c>Size</c> — <see cref="StridedPattern"/>.</summary>
    Strided,
    /// <summary>Sparse Transformer fixed pattern with stride <c>Size</c> — <see cref="FixedPattern"/>.</summary>
    Fixed,
    /// <summary>BigBird block layout (random, sliding-window and global blocks of <c>Size</c> tokens) — <see cref="BigBirdPattern"/>.</summary>
    BigBird,
    /// <summary>Longformer block layout (sliding window plus global blocks of <c>Size</c> tokens) — <see cref="LongformerPattern"/>.</summary>
    Longformer,
    /// <summary>DeepSpeed's fixed block layout (local and global blocks of <c>Size</c> tokens) — <see cref="DsFixedPattern"/>.</summary>
    DsFixed,
    /// <summary>DeepSpeed's variable block layout (random, variable local windows, global blocks) — <see cref="DsVariablePattern"/>.</summary>
    DsVariable,
    /// <summary>A sliding window of blocks of <c>Size</c> tokens — <see cref="SlidingWindowPattern"/>.</summary>
    SlidingWindow,
}

/// <summary>
/// A serialisable description of a static attention pattern (a kind and its parameters), turned into
/// an <see cref="AttentionPattern"/> by <see cref="ToPattern"/>. Only the parameters of the chosen
/// kind are read; the others keep their defaults.
/// </summary>
/// <param name="Kind">Which pattern.</param>
/// <param name="Size">LocalBand: context length; Window: window size; Strided / Fixed: stride; block layouts (BigBird,
/// Longformer, DsFixed, DsVariable, SlidingWindow): block size in tokens. Unused by Dense.</param>
/// <param name="LookBackward">Window: windows attended before the query's own window.</param>
/// <param name="LookForward">Window: windows attended after it (forced to 0 when the model is causal).</param>
/// <param name="ExactWindowSize">Window: limit the reach to exactly Size·LookBackward tokens.</param>
/// <param name="Vertsize">Fixed: summary cells per block (c).</param>
/// <param name="NumVerts">Fixed: number of different summary offsets cycled over heads.</param>
/// <param name="Combine">Strided / Fixed: how the two factorized parts are combined.</param>
/// <param name="NumRandomBlocks">BigBird (default 1) / DsVariable (default 0): random key blocks per query block; null = the kind's default.</param>
/// <param name="NumSlidingWindowBlocks">BigBird / Longformer / SlidingWindow: blocks in the sliding window (odd).</param>
/// <param name="NumGlobalBlocks">BigBird / DsFixed: global blocks.</param>
/// <param name="NumLocalBlocks">DsFixed: blocks per local window.</param>
/// <param name="GlobalBlockIndices">Longformer / DsVariable: the global blocks (default [0]).</param>
/// <param name="LocalWindowBlocks">DsVariable: sizes of the consecutive local windows, the last repeating (default [4]).</param>
/// <param name="HorizontalGlobalAttention">DsFixed / DsVariable: global blocks also attend every block (bidirectional only).</param>
/// <param name="DifferentLayoutPerHead">Block layouts: each head draws its own random blocks / global offsets.</param>
/// <param name="Seed">BigBird / DsVariable: seed of the random blocks.</param>
public sealed record StaticPatternSpec(
    [property: JsonPropertyName("kind")] StaticPatternKind Kind,
    [property: JsonPropertyName("size")] int Size = 0,
    [property: JsonPropertyName("look_backward")] int LookBackward = 1,
    [property: JsonPropertyName("look_forward")] int LookForward = 0,
    [property: JsonPropertyName("exact_window_size")] bool ExactWindowSize = false,
    [property: JsonPropertyName("vertsize")] int Vertsize = 1,
    [property: JsonPropertyName("num_verts")] int NumVerts = 1,
    [property: JsonPropertyName("combine"), JsonConverter(typeof(JsonStringEnumConverter<FactorizedCombine>))] FactorizedCombine Combine = FactorizedCombine.Merged,
    [property: JsonPropertyName("num_random_blocks")] int? NumRandomBlocks = null,
    [property: JsonPropertyName("num_sliding_window_blocks")] int NumSlidingWindowBlocks = 3,
    [property: JsonPropertyName("num_global_blocks")] int NumGlobalBlocks = 1,
    [property: JsonPropertyName("num_local_blocks")] int NumLocalBlocks = 4,
    [property: JsonPropertyName("global_block_indices")] int[]? GlobalBlockIndices = null,
    [property: JsonPropertyName("local_window_blocks")] int[]? LocalWindowBlocks = null,
    [property: JsonPropertyName("horizontal_global_attention")] bool HorizontalGlobalAttention = false,
    [property: JsonPropertyName("different_layout_per_head")] bool DifferentLayoutPerHead = false,
    [property: JsonPropertyName("seed")] int Seed = 0)
{
    /// <summary>
    /// The pattern for a causal (decoder) or bidirectional (encoder) model. <paramref name="layer"/>
    /// only matters for <see cref="FactorizedCombine.Interleaved"/> (even layers part A, odd layers part B).
    /// Throws <see cref="ArgumentException"/> naming the bad parameter.
    /// </summary>
    public AttentionPattern ToPattern(bool causal, int layer = 0) => Build(causal, layer);

    /// <summary>The pattern a model with sequences of at most <paramref name="maxSeqLen"/> tokens uses: a causal block layout
    /// whose rows depend on the sequence length (BigBird's random blocks, DeepSpeed's window-aligned globals) is built once
    /// at <paramref name="maxSeqLen"/> and cropped to shorter sequences (<see cref="AttentionPattern.AtLength"/>), so what
    /// a token sees never depends on how many tokens follow it — which cached decoding needs. Training at
    /// <c>max_seq_len</c> is unchanged; encoders keep the layout of each length, as DeepSpeed builds it.</summary>
    public AttentionPattern ToModelPattern(bool causal, int layer, int maxSeqLen)
    {
        var pattern = Build(causal, layer);
        return causal ? pattern.AtLength(maxSeqLen) : pattern;
    }

    private AttentionPattern Build(bool causal, int layer) => Kind switch
    {
        StaticPatternKind.Dense => new DensePattern(causal),
        StaticPatternKind.LocalBand => new LocalBandPattern(Size, causal),
        StaticPatternKind.Window => new WindowPattern(Size, LookBackward, causal ? 0 : LookForward, ExactWindowSize, causal),
        StaticPatternKind.Strided => new StridedPattern(Size, causal, Combine, layer),
        StaticPatternKind.Fixed => new FixedPattern(Size, Vertsize, NumVerts, causal, Combine, layer),
        StaticPatternKind.BigBird => new BigBirdPattern(Size, causal, NumRandomBlocks ?? 1, NumSlidingWindowBlocks, NumGlobalBlocks, DifferentLayoutPerHead, Seed),
        StaticPatternKind.Longformer => new LongformerPattern(Size, causal, NumSlidingWindowBlocks, GlobalBlockIndices, differentLayoutPerHead: DifferentLayoutPerHead),
        StaticPatternKind.DsFixed => new DsFixedPattern(Size, causal, NumLocalBlocks, NumGlobalBlocks, HorizontalGlobalAttention,
            differentLayoutPerHead: DifferentLayoutPerHead),
        StaticPatternKind.DsVariable => new DsVariablePattern(Size, causal, NumRandomBlocks ?? 0, LocalWindowBlocks, GlobalBlockIndices,
            horizontalGlobalAttention: HorizontalGlobalAttention, differentLayoutPerHead: DifferentLayoutPerHead, seed: Seed),
        StaticPatternKind.SlidingWindow => new SlidingWindowPattern(Size, causal, NumSlidingWindowBlocks),
        _ => throw new ArgumentException($"Kind: unknown static pattern kind {Kind}.", nameof(Kind)),
    };
}

/// <summary>A group of <paramref name="Heads"/> heads in every attention layer that attend with a static pattern.</summary>
/// <param name="Pattern">The pattern, described as data.</param>
/// <param name="Heads">How many heads use it (&gt; 0).</param>
public sealed record StaticHeadGroup(
    [property: JsonPropertyName("pattern")] StaticPatternSpec Pattern,
    [property: JsonPropertyName("heads")] int Heads);
