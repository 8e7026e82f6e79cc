using System.Text.Json.Serialization;
using SparseAttention.Hashing;
using SparseAttention.Kernels;
using SparseAttention.Modules;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace SparseAttention.Model;

/// <summary>
/// The LSH head group of every layer (<see cref="TransformerConfig.Lsh"/>): Reformer LSH attention, or ALSH
/// maximum-inner-product routing when <see cref="Alsh"/> is set. JSON names are snake_case like the rest of the
/// configuration. See <see cref="LshAttention"/> for the behaviour of each field.
/// </summary>
public sealed record LshSpec
{
    /// <summary>0 — LSH heads per layer (placed after the local and static heads, before the routing heads).</summary>
    [JsonPropertyName("heads")] public int Heads { get; init; }
    /// <summary>1 — hash rounds (<c>n_hashes</c>); the rounds are merged into one softmax over the keys they attended.</summary>
    [JsonPropertyName("n_hashes")] public int NHashes { get; init; } = 1;
    /// <summary>64 — chunk length W (capped at T): sorted tokens are cut into chunks of W that attend themselves and the previous chunk.</summary>
    [JsonPropertyName("bucket_size")] public int BucketSize { get; init; } = 64;
    /// <summary>null — buckets per round; null = ⌈MaxSeqLen / BucketSize⌉ rounded up to even (to a power of two with ALSH).</summary>
    [JsonPropertyName("n_buckets")] public int? NBuckets { get; init; }
    /// <summary>true — false = a query attends only keys of its own bucket, even inside its chunk window.</summary>
    [JsonPropertyName("attend_across_buckets")] public bool AttendAcrossBuckets { get; init; } = true;
    /// <summary>false — a key attended in several rounds counts once in the merged softmax (else once per round).</summary>
    [JsonPropertyName("dedup")] public bool Dedup { get; init; }
    /// <summary>true — every head has its own random rotations; false = one set shared by the group's heads.</summary>
    [JsonPropertyName("per_head_rotations")] public bool PerHeadRotations { get; init; } = true;
    /// <summary>false — draw new rotations on every training forward (the Reformer's habit); eval always uses the fixed ones.</summary>
    [JsonPropertyName("fresh_rotations")] public bool FreshRotations { get; init; }
    /// <summary>null — null = shared-QK angular LSH; SimpleLsh / Xbox / SignAlsh = separate q and k routed by that MIPS transform.</summary>
    [JsonPropertyName("alsh")] public AlshTransform? Alsh { get; init; }
    /// <summary>false — ALSH only: query-normalised-first rescaling of the transformed queries (no effect on sign hashes).</summary>
    [JsonPropertyName("query_normalized_first")] public bool QueryNormalizedFirst { get; init; }

    /// <summary>Throws an <see cref="ArgumentException"/> naming <paramref name="field"/> and the offending key.</summary>
    public void Validate(string field)
    {
        void That(bool ok, string key, string message)
        {
            if (!ok) throw new ArgumentException($"{field}.{key}: {message}", field);
        }
        That(Heads >= 0, "heads", $"must be >= 0, got {Heads}.");
        That(NHashes >= 1, "n_hashes", $"must be >= 1, got {NHashes}.");
        That(BucketSize >= 1, "bucket_size", $"must be >= 1 (it is capped at the sequence length), got {BucketSize}.");
        That(Alsh is null || Enum.IsDefined(Alsh.Value), "alsh", $"unknown value {Alsh}.");
        if (NBuckets is int n)
        {
            if (Alsh is null) That(n >= 2 && n % 2 == 0, "n_buckets", $"must be an even number >= 2, got {n}.");
            else That(n >= 2 && (n & (n - 1)) == 0, "n_buckets", $"ALSH hashes with sign bits, so it must be a power of two >= 2, got {n}.");
        }
        That(Alsh is not null || !QueryNormalizedFirst, "query_normalized_first", "only applies to ALSH (set alsh).");
    }
}

/// <summary>
/// A head group of LSH attention (<see cref="LshAttention"/>) inside an <see cref="AttentionLayer"/>. With shared QK
/// (no ALSH transform) the keys are the normalised queries and the layer's k projection is not used by this group.
/// Attention dropout applies to the group's output, as for routing groups. Auxiliary loss: zero. The model's kernel
/// choice is passed on (Reference, which has no grouped form, means Auto here).
/// </summary>
public sealed partial class LshHeadGroup : HeadGroupAttention, IAttentionProbabilitiesSource
{
    private readonly LshAttention lsh;
    private readonly double dropout;
    private readonly Parameter? rel_k, rel_v;  // (2·R + 1, D) Shaw tables on original positions, row = clip(j − i, ±R) + R
    private readonly AlibiPositions? alibi;

    /// <param name="config">The model configuration.</param>
    /// <param name="heads">Heads in the group.</param>
    /// <param name="layer">Layer index (seeds the rotations).</param>
    /// <param name="name">Module name.</param>
    /// <param name="alibiSlopes">With <see cref="PositionalEncoding.Alibi"/>: the slope of each head of the group.</param>
    public LshHeadGroup(TransformerConfig config, int heads, int layer, string name = "lsh_group", double[]? alibiSlopes = null) : base(name, heads)
    {
        ArgumentNullException.ThrowIfNull(config);
        var spec = config.Lsh ?? new LshSpec();
        lsh = new LshAttention(heads, config.ResolvedDimHead, config.MaxSeqLen, spec.BucketSize, spec.NHashes, spec.NBuckets,
            config.Causal, spec.AttendAcrossBuckets, spec.Dedup, spec.PerHeadRotations, spec.FreshRotations, spec.Alsh,
            spec.QueryNormalizedFirst, seed: 1000 + layer)
        { Kernel = config.Kernel == AttentionKernel.Reference ? AttentionKernel.Auto : config.Kernel };
        dropout = config.AttnDropout;
        if (config.PositionalEncoding == PositionalEncoding.RelativeShaw) (rel_k, rel_v) = NewShawTables(config.MaxRelativePosition, config.ResolvedDimHead);
        if (alibiSlopes is not null) alibi = new AlibiPositions(alibiSlopes);
        RegisterComponents();
    }

    /// <summary>The relative-position terms of this group as its parameters are now (null without any).</summary>
    internal RelativePositionTerms? Relative => TermsOf(rel_k, rel_v, alibi);

    /// <summary>The LSH attention module (call its forward directly to get the buckets).</summary>
    public LshAttention Attention => lsh;

    public override (Tensor Output, Tensor AuxLoss) Forward(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        using var scope = NewDisposeScope();
        var result = lsh.forward(q, lsh.SharedQk ? null : k, v, keyMask, Relative);
        if (RoutingCapture.Active)                                                       // plots: which keys, which buckets
            RoutingCapture.RecordLsh(this, lsh.AttendedMask(result, keyMask), result.QueryBuckets.select(2, 0));
        var output = dropout > 0 ? nn.functional.dropout(result.Output, dropout, training) : result.Output;   // (B, Hg, T, D)
        var aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Forward plus the merged probabilities of the same forward. The output is linear in the values for fixed buckets,
    /// so appending the identity to v, v' = [v | I] (B, Hg, T, D + T), makes the extra output columns exactly the
    /// weights each query gave each key — every rule (rounds, dedup, self as last resort, padding) included — with the
    /// buckets hashed once. O(T²) memory, like any probabilities.
    /// </summary>
    public (Tensor Output, Tensor AuxLoss, Tensor Probabilities) ForwardWithProbabilities(Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        using var scope = NewDisposeScope();
        long batch = v.shape[0], seqLen = v.shape[2], dim = v.shape[3];
        var identity = eye(seqLen, dtype: v.dtype, device: v.device).expand(batch, Heads, seqLen, seqLen);   // (B, Hg, T, T)
        // Shaw's value term belongs to the D value columns only: its table gets zero columns for the identity's T.
        var relative = Relative is ShawRelativePositions shaw
            ? new ShawRelativePositions(shaw.KeyTable, cat([shaw.ValueTable, zeros(shaw.ValueTable.shape[0], seqLen, dtype: shaw.ValueTable.dtype)], 1))
            : Relative;
        var result = lsh.forward(q, lsh.SharedQk ? null : k, cat([v, identity], -1), keyMask, relative);              // (B, Hg, T, D + T)
        var output = result.Output.narrow(-1, 0, dim);                                                       // (B, Hg, T, D)
        var probabilities = result.Output.narrow(-1, dim, seqLen);                                           // (B, Hg, T, T)
        if (dropout > 0) output = nn.functional.dropout(output, dropout, training);
        var aux = zeros(Array.Empty<long>(), dtype: q.dtype, device: q.device);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope(), probabilities.contiguous().MoveToOuterDisposeScope());
    }
}
