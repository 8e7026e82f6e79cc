using System.Text.Json.Serialization;
using SparseAttention.Modules;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// The Synthesizer heads of every attention layer (<see cref="TransformerConfig.Synthesizer"/>), computed by
/// <see cref="SynthesizerAttention"/>. Only the fields of the chosen kind are read; the others keep their defaults.
/// </summary>
public sealed record SynthesizerSpec
{
    /// <summary>0 — synthesizer heads per layer; must be &gt; 0 when the record is given.</summary>
    [JsonPropertyName("heads")] public int Heads { get; init; }
    /// <summary>Dense — Dense, Random, FactorizedDense or FactorizedRandom (see <see cref="SynthesizerKind"/>).</summary>
    [JsonPropertyName("kind"), JsonConverter(typeof(JsonStringEnumConverter<SynthesizerKind>))]
    public SynthesizerKind Kind { get; init; } = SynthesizerKind.Dense;
    /// <summary>None — None (synthetic logits only), Sum (+ q·kᵀ/√D) or Learned (softmax-normalised weights per head).</summary>
    [JsonPropertyName("mix"), JsonConverter(typeof(JsonStringEnumConverter<SynthesizerMix>))]
    public SynthesizerMix Mix { get; init; } = SynthesizerMix.None;
    /// <summary>true — Random kinds: learn the logits; false = keep the random initialisation fixed (a buffer).</summary>
    [JsonPropertyName("trainable")] public bool Trainable { get; init; } = true;
    /// <summary>8 — FactorizedRandom: rank k of R₁·R₂ᵀ (the paper's value).</summary>
    [JsonPropertyName("rank")] public int Rank { get; init; } = 8;
    /// <summary>null — FactorizedDense: width a of the first factor, a divisor of max_seq_len (b = max_seq_len / a);
    /// null = the largest divisor ≤ √max_seq_len.</summary>
    [JsonPropertyName("factor_a")] public int? FactorA { get; init; }

    /// <summary>Throws <see cref="ArgumentException"/> with ParamName <paramref name="field"/> when inconsistent.</summary>
    /// <param name="maxSeqLen">The model's MaxSeqLen (ℓ).</param>
    /// <param name="field">Name of the configuration field holding this record, used in errors.</param>
    public void Validate(int maxSeqLen, string field)
    {
        Check.That(Heads > 0, field, $"Heads must be > 0, got {Heads}.");
        Check.That(Enum.IsDefined(Kind), field, $"unknown Kind {Kind}.");
        Check.That(Enum.IsDefined(Mix), field, $"unknown Mix {Mix}.");
        Check.That(Trainable || Kind is SynthesizerKind.Random or SynthesizerKind.FactorizedRandom, field,
            $"Trainable = false (fixed logits) needs Kind Random or FactorizedRandom, got {Kind}.");
        Check.That(Rank > 0, field, $"Rank must be > 0, got {Rank}.");
        if (FactorA is int a)
            Check.That(a > 0 && maxSeqLen % a == 0, field, $"FactorA must be a positive divisor of MaxSeqLen = {maxSeqLen} (a·b = MaxSeqLen), got {a}.");
    }
}

/// <summary>
/// A head group of Synthesizer attention (<see cref="SynthesizerAttention"/>), configured by
/// <see cref="TransformerConfig.Synthesizer"/>; returns a zero auxiliary loss. Attention dropout applies to
/// the probabilities, which this group materialises.
/// </summary>
/// <remarks>
/// <para><b>Per-token features of the Dense kinds</b>: <see cref="HeadGroupAttention.Forward"/> receives the
/// projected q, k, v of the group's heads, not the layer input. The Dense kinds read each head's query vector
/// (after rotary embeddings when configured) as the token's features. That keeps the head-group interface
/// unchanged, gives every head its own learned input projection (the layer's query projection, which a pure
/// synthesizer head would otherwise leave unused) and, with rotary positions, lets the MLP see the token's
/// position — the paper's X_i includes a position embedding, while our x carries none under rotary.</para>
/// <para>With <see cref="PositionalEncoding.RelativeShaw"/> the synthesizer heads do not add the Shaw terms
/// (the Random kinds are already position-indexed; the dot-product part of a mix is plain q·kᵀ).</para>
/// </remarks>
public sealed partial class SynthesizerHeadGroup : HeadGroupAttention, IAttentionProbabilitiesSource
{
    private readonly SynthesizerAttention synthesizer;
    private readonly double dropout;

    /// <param name="config">The model configuration; <see cref="TransformerConfig.Synthesizer"/> must be set.</param>
    /// <param name="heads">Heads in this group.</param>
    /// <param name="layer">Layer index (unused today; kept for symmetry with the other groups).</param>
    /// <param name="name">Module name.</param>
    public SynthesizerHeadGroup(TransformerConfig config, int heads, int layer, string name = "synthesizer_group") : base(name, heads)
    {
        ArgumentNullException.ThrowIfNull(config);
        var spec = config.Synthesizer;
        Check.That(spec is not null, nameof(config), "Synthesizer must be set to build a synthesizer head group.");
        spec!.Validate(config.MaxSeqLen, nameof(TransformerConfig.Synthesizer));
        dropout = config.AttnDropout;
        synthesizer = new SynthesizerAttention(heads, config.ResolvedDimHead, config.MaxSeqLen, spec.Kind, config.Causal,
            spec.Mix, spec.Trainable, spec.Rank, spec.FactorA, config.AttnDropout, name: "synthesizer");
        RegisterComponents();
    }

    /// <summary>The synthesizer computing this group.</summary>
    public SynthesizerAttention Synthesizer => synthesizer;

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        Check.QueryKeyValue(q, k, v);
        Check.That(q.shape[1] == Heads, nameof(q), $"this group has {Heads} heads, q has H = {q.shape[1]}.");
        using var scope = NewDisposeScope();
        var output = synthesizer.forward(q, k, v, keyMask);                                   // (B, Hg, T, D)
        var aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <inheritdoc/>
    public (Tensor Output, Tensor AuxLoss, Tensor Probabilities) ForwardWithProbabilities(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        Check.QueryKeyValue(q, k, v);
        Check.That(q.shape[1] == Heads, nameof(q), $"this group has {Heads} heads, q has H = {q.shape[1]}.");
        Check.KeyMask(keyMask, q.shape[0], q.shape[2]);
        using var scope = NewDisposeScope();
        var probs = synthesizer.Probabilities(q, k, keyMask);                                  // (B, Hg, T, T)
        if (keyMask is not null) v = v.masked_fill(keyMask.logical_not().view(v.shape[0], 1, v.shape[2], 1), 0);
        var output = matmul(nn.functional.dropout(probs, dropout, training), v);               // (B, Hg, T, D)
        var aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope(), probs.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// A head group that can report the attention probabilities of its own forward, for callers that return them
/// (e.g. the BERT-style adapter with <c>output_attentions</c>). Content-based groups must
/// return the probabilities of the same forward (same memberships) as the output.
/// </summary>
public interface IAttentionProbabilitiesSource
{
    /// <summary>Forward plus probabilities.</summary>
    /// <param name="q">Queries (B, Hg, T, D).</param>
    /// <param name="k">Keys (B, Hg, T, D).</param>
    /// <param name="v">Values (B, Hg, T, D).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token.</param>
    /// <returns>Output (B, Hg, T, D), scalar auxiliary loss, and probabilities (B, Hg, T, T) before dropout:
    /// row i holds the weight of each key j in query i's output (zeros where not allowed).</returns>
    (Tensor Output, Tensor AuxLoss, Tensor Probabilities) ForwardWithProbabilities(Tensor q, Tensor k, Tensor v, Tensor? keyMask);
}
