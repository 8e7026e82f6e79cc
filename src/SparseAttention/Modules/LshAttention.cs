using SparseAttention.Hashing;
using SparseAttention.Kernels;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Modules;

/// <summary>Result of an <see cref="LshAttention"/> forward.</summary>
/// <param name="Output">(B, H, T, D) attention output; zeros at padded positions.</param>
/// <param name="QueryBuckets">(B, H, R, T) int64 bucket of every query in every round.</param>
/// <param name="KeyBuckets">(B, H, R, T) int64 bucket of every key (the same tensor as QueryBuckets with shared QK).</param>
/// <param name="Groups">The chunks the kernel attended (query/key slots and look-back links per round).</param>
public sealed record LshAttentionOutput(Tensor Output, Tensor QueryBuckets, Tensor KeyBuckets, LshGroups Groups);

/// <summary>
/// LSH attention heads (the Reformer's): tokens are hashed into buckets, sorted by (bucket, position) and cut into
/// chunks of <c>bucketSize</c>; each chunk attends itself and the previous chunk; <c>nHashes</c> rounds with
/// independent hashes are merged into one softmax. Takes q (and, for ALSH, k) and v already split per head,
/// (B, H, T, D); projections live in the enclosing multi-head module.
/// </summary>
/// <remarks>
/// <para>Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020, arXiv 2001.04451.</para>
/// <para><b>Shared QK</b> (default, the paper's): keys are the L2-normalised queries, k̂ = q/‖q‖, and buckets are
/// angular LSH of k̂ by random rotations (<see cref="AngularLsh"/>). A token attends itself only when nothing else
/// is allowed in any round.</para>
/// <para><b>ALSH</b> (set <c>alsh</c>): queries and keys are separate; keys are hashed from P(k) and queries from their
/// own Q(q) (<see cref="MipsTransforms"/>) with sign random projections (<see cref="SignRandomProjection"/>,
/// log2(nBuckets) bits), so a query lands with the keys of large inner product (maximum-inner-product routing).
/// Causal ALSH normalises by the running maximum key norm (see <see cref="MipsTransforms.Apply"/>).</para>
/// <para><b>Rounds merge</b>: the output is one softmax over every key attended in any round, a key attended in c rounds
/// counting c times — exactly the log-sum-exp-weighted average of the rounds' outputs; with <c>dedup</c> once.</para>
/// <para><b>Chunks</b> and <b>causality</b>: see <see cref="LshGrouping"/> (causal chunks are cut per bucket so that
/// nothing depends on later tokens). <c>attendAcrossBuckets = false</c> also restricts a query to keys of its own
/// bucket inside its chunk window (always the case in causal mode).</para>
/// <para><b>Randomness</b>: the rotations (or hyperplanes) are a buffer <c>rotations</c>, (H or 1, R, D', n) drawn
/// once from <c>seed</c> at construction (in the state dict) — the same hash on every forward and in eval. With
/// <c>freshRotations</c> each TRAINING forward draws new ones from a generator seeded with <c>seed</c> (the
/// Reformer's training behaviour; deterministic sequence), and eval uses the buffer.</para>
/// </remarks>
public sealed partial class LshAttention : nn.Module<Tensor, Tensor?, Tensor, Tensor?, LshAttentionOutput>
{
    private readonly Tensor rotations;   // (Hr, R, D', nBuckets/2) rotations, or (Hr, R, D + e, bits) hyperplanes for ALSH
    private readonly Generator freshGenerator;
    private readonly int heads, dimHead, bucketSize, nHashes, nBuckets, maxSeqLen;
    private readonly bool causal, attendAcrossBuckets, dedup, perHeadRotations, freshRotations, queryNormalizedFirst;
    private readonly AlshTransform? alsh;

    /// <param name="heads">LSH heads H.</param>
    /// <param name="dimHead">Head width D.</param>
    /// <param name="maxSeqLen">Longest sequence accepted (fixes the default number of buckets).</param>
    /// <param name="bucketSize">Chunk length W (<c>bucket_size</c>): a query sees at most 2·W keys per round.</param>
    /// <param name="nHashes">Hash rounds R (<c>n_hashes</c>).</param>
    /// <param name="nBuckets">Buckets per round; null = ⌈maxSeqLen / bucketSize⌉ rounded up to an even number ≥ 2
    /// (a power of two for ALSH, whose sign hashes give 2^bits buckets).</param>
    /// <param name="causal">Query i attends keys j ≤ i only, and grouping never looks ahead.</param>
    /// <param name="attendAcrossBuckets">false = a query attends only keys in its own bucket, even inside its chunk window.</param>
    /// <param name="dedup">A key attended in several rounds counts once in the merged softmax.</param>
    /// <param name="perHeadRotations">Each head draws its own rotations (false = one set shared by all heads).</param>
    /// <param name="freshRotations">Draw new rotations on every training forward (see remarks).</param>
    /// <param name="alsh">null = shared-QK angular LSH; otherwise separate q/k routed by this MIPS transform.</param>
    /// <param name="queryNormalizedFirst">ALSH only: QNF rescaling of the transformed queries.</param>
    /// <param name="seed">Seed of the rotations (and of the fresh-rotation generator).</param>
    /// <param name="name">Module name.</param>
    public LshAttention(int heads, int dimHead, int maxSeqLen, int bucketSize, int nHashes = 1, int? nBuckets = null,
        bool causal = false, bool attendAcrossBuckets = true, bool dedup = false, bool perHeadRotations = true,
        bool freshRotations = false, AlshTransform? alsh = null, bool queryNormalizedFirst = false, long seed = 0,
        string name = "lsh_attention") : base(name)
    {
        Check.Positive(heads, nameof(heads));
        Check.Positive(dimHead, nameof(dimHead));
        Check.Positive(maxSeqLen, nameof(maxSeqLen));
        Check.Positive(bucketSize, nameof(bucketSize));
        Check.Positive(nHashes, nameof(nHashes));
        Check.That(alsh is null || Enum.IsDefined(alsh.Value), nameof(alsh), $"unknown value {alsh}.");
        Check.That(alsh is not null || !queryNormalizedFirst, nameof(queryNormalizedFirst), "only applies to ALSH (set alsh).");
        int defaultBuckets = Math.Max(2, (maxSeqLen + bucketSize - 1) / bucketSize);
        if (alsh is null)
        {
            this.nBuckets = nBuckets ?? defaultBuckets + defaultBuckets % 2;
            AngularLsh.CheckBuckets(this.nBuckets);
        }
        else
        {
            this.nBuckets = nBuckets ?? (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)defaultBuckets);
            Check.That(this.nBuckets >= 2 && System.Numerics.BitOperations.IsPow2(this.nBuckets), nameof(nBuckets),
                $"ALSH hashes with sign bits, so it needs a power of two >= 2, got {this.nBuckets}.");
        }
        this.heads = heads;
        this.dimHead = dimHead;
        this.maxSeqLen = maxSeqLen;
        this.bucketSize = bucketSize;
        this.nHashes = nHashes;
        this.causal = causal;
        this.attendAcrossBuckets = attendAcrossBuckets;
        this.dedup = dedup;
        this.perHeadRotations = perHeadRotations;
        this.freshRotations = freshRotations;
        this.alsh = alsh;
        this.queryNormalizedFirst = queryNormalizedFirst;
        freshGenerator = new Generator((ulong)seed + 0x5EEDUL);
        rotations = DrawRotations(new Generator((ulong)seed)).DetachFromDisposeScope();
        RegisterComponents();
    }

    public int Heads => heads;
    public int DimHead => dimHead;
    public int MaxSeqLen => maxSeqLen;
    public int BucketSize => bucketSize;
    public int NHashes => nHashes;
    public int NBuckets => nBuckets;
    public bool Causal => causal;
    public bool AttendAcrossBuckets => attendAcrossBuckets;
    public bool Dedup => dedup;
    /// <summary>True when keys are the normalised queries (no ALSH transform).</summary>
    public bool SharedQk => alsh is null;
    public AlshTransform? Alsh => alsh;

    /// <summary>Kernel of the attention inside chunks (Auto: fused for float32 CPU).</summary>
    public AttentionKernel Kernel { get; set; } = AttentionKernel.Auto;

    /// <summary>The fixed rotations (or ALSH hyperplanes) buffer, a copy.</summary>
    public Tensor Rotations => rotations.detach().clone();

    private Tensor DrawRotations(Generator generator)
    {
        int hr = perHeadRotations ? heads : 1;
        return alsh is AlshTransform t
            ? SignRandomProjection.Planes(hr, nHashes, dimHead + MipsTransforms.ExtraDims(t), System.Numerics.BitOperations.Log2((uint)nBuckets), generator)
            : AngularLsh.Rotations(hr, nHashes, dimHead, nBuckets, generator);
    }

    /// <summary>
    /// Which keys each query attended in any round of <paramref name="result"/> (a forward of this module with the
    /// same <paramref name="keyMask"/>), as a dense (B, H, T, T) bool tensor: the chunk window, causal rule, bucket
    /// restriction and key mask applied; under shared QK a token's own key only where nothing else was allowed.
    /// For display and inspection (O(T²) memory).
    /// </summary>
    public Tensor AttendedMask(LshAttentionOutput result, Tensor? keyMask = null)
    {
        ArgumentNullException.ThrowIfNull(result);
        var g = result.Groups;
        long batch = g.QueryIndices.shape[0], h = g.QueryIndices.shape[1], groups = g.QueryIndices.shape[2], wq = g.QueryIndices.shape[3];
        long seqLen = result.QueryBuckets.shape[3];
        Check.KeyMask(keyMask, batch, seqLen);
        using var scope = NewDisposeScope();
        var keyIdx = GroupedAttention.WithPreviousKeys(g.KeyIndices, g.PreviousGroup);  // (B, H, G, Wk2)
        long wk = keyIdx.shape[3];
        var qp = g.QueryIndices.unsqueeze(-1);                                           // (B, H, G, Wq, 1)
        var kp = keyIdx.unsqueeze(-2);                                                   // (B, H, G, 1, Wk2)
        var allowed = qp.ge(0).logical_and(kp.ge(0));                                    // (B, H, G, Wq, Wk2)
        if (causal) allowed = allowed.logical_and(kp.le(qp));
        if (SharedQk) allowed = allowed.logical_and(kp.ne(qp));
        if (keyMask is not null)
            allowed = allowed.logical_and(keyMask.view(batch, 1, seqLen).expand(batch, h, seqLen)
                .gather(2, keyIdx.clamp_min(0).view(batch, h, -1)).view(batch, h, groups, 1, wk));
        if (!attendAcrossBuckets && !causal)
        {
            var round = arange(groups, device: qp.device).div(groups / nHashes, rounding_mode: RoundingMode.floor)
                        .view(1, 1, groups, 1).expand(batch, h, groups, wq);              // (B, H, G, Wq)
            var qLabel = result.QueryBuckets.view(batch, h, -1)
                         .gather(2, (round * seqLen + g.QueryIndices.clamp_min(0)).view(batch, h, -1)).view(batch, h, groups, wq, 1);
            var kLabel = result.KeyBuckets.view(batch, h, -1)
                         .gather(2, (round.narrow(3, 0, 1).expand(batch, h, groups, wk) * seqLen + keyIdx.clamp_min(0)).view(batch, h, -1))
                         .view(batch, h, groups, 1, wk);
            allowed = allowed.logical_and(qLabel.eq(kLabel));
        }
        var flat = (qp.clamp_min(0) * seqLen + kp.clamp_min(0)).masked_fill(allowed.logical_not(), seqLen * seqLen)
                   .view(batch, h, -1);                                                  // (B, H, G·Wq·Wk2)
        var dense = zeros(new long[] { batch, h, seqLen * seqLen + 1 }, dtype: ScalarType.Int64, device: qp.device)
                    .scatter_add(2, flat, ones_like(flat))
                    .narrow(2, 0, seqLen * seqLen).view(batch, h, seqLen, seqLen).gt(0);  // (B, H, T, T)
        if (SharedQk)
        {
            var alone = dense.any(-1).logical_not();                                     // (B, H, T)
            if (keyMask is not null) alone = alone.logical_and(keyMask.view(batch, 1, seqLen));
            dense = dense.logical_or(alone.unsqueeze(-1).logical_and(eye(seqLen, dtype: ScalarType.Bool, device: qp.device)));
        }
        return dense.MoveToOuterDisposeScope();
    }

    /// <param name="q">Queries (B, H, T, D), 0 &lt; T ≤ maxSeqLen.</param>
    /// <param name="k">Keys (B, H, T, D) for ALSH; must be null with shared QK (the keys are then q/‖q‖).</param>
    /// <param name="v">Values (B, H, T, Dv); Dv may differ from D.</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token, false = padding (never hashed into a chunk,
    /// never attended, zero output).</param>
    public override LshAttentionOutput forward(Tensor q, Tensor? k, Tensor v, Tensor? keyMask = null) => forward(q, k, v, keyMask, null);

    /// <inheritdoc cref="forward(Tensor, Tensor?, Tensor, Tensor?)"/>
    /// <param name="relative">Optional terms of the distance j − i between the original positions of every attended pair
    /// (Shaw, ALiBi), evaluated by the grouped Ops kernel on the chunks' pairs only (O(T·W) memory); a token alone with
    /// itself under shared QK gets the distance-0 terms.</param>
    public LshAttentionOutput forward(Tensor q, Tensor? k, Tensor v, Tensor? keyMask, RelativePositionTerms? relative)
    {
        Check.Shape(q, nameof(q), "(B, H, T, D)", -1, heads, -1, dimHead);
        Check.FloatingPoint(q, nameof(q));
        long batch = q.shape[0], seqLen = q.shape[2];
        Check.That(seqLen > 0, nameof(q), "sequence length T must be > 0.");
        Check.That(seqLen <= maxSeqLen, nameof(q), $"sequence length T = {seqLen} exceeds maxSeqLen = {maxSeqLen}.");
        if (SharedQk) Check.That(k is null, nameof(k), "must be null with shared QK: the keys are the normalised queries.");
        else
        {
            Check.That(k is not null, nameof(k), "is required for ALSH (queries and keys are hashed separately).");
            Check.Shape(k!, nameof(k), "(B, H, T, D)", batch, heads, seqLen, dimHead);
            Check.SameDtype(q, nameof(q), k!, nameof(k));
        }
        Check.Shape(v, nameof(v), "(B, H, T, Dv)", batch, heads, seqLen, -1);
        Check.SameDtype(q, nameof(q), v, nameof(v));
        Check.KeyMask(keyMask, batch, seqLen);

        using var scope = NewDisposeScope();
        var hash = freshRotations && training ? DrawRotations(freshGenerator) : rotations;
        Tensor keys, queryBuckets, keyBuckets;
        if (alsh is AlshTransform transform)
        {
            keys = k!;
            var (pk, qq) = MipsTransforms.Apply(keys, q, transform, queryNormalizedFirst, keyMask, causal);   // (B, H, T, D + e)
            keyBuckets = SignRandomProjection.Buckets(pk, hash);                          // (B, H, R, T)
            queryBuckets = SignRandomProjection.Buckets(qq, hash);                        // the query's OWN transformed vector
        }
        else
        {
            keys = SharedKeys(q);                                                        // (B, H, T, D) shared QK: k̂ = q/‖q‖
            keyBuckets = queryBuckets = AngularLsh.Buckets(keys, hash);                   // (B, H, R, T)
        }
        var groups = LshGrouping.Build(queryBuckets, keyBuckets, keyMask, bucketSize, causal);
        bool labels = !attendAcrossBuckets && !causal;                                   // causal chunks hold one bucket already
        var output = GroupedAttention.MergedAttention(q, keys, v, groups.QueryIndices, groups.KeyIndices, groups.PreviousGroup,
            nHashes, causal, SharedQk, keyMask, labels ? queryBuckets : null, labels ? keyBuckets : null, dedup, scale: null, Kernel,
            builtGroups: true, relative);                                                // (B, H, T, Dv)
        if (keyMask is not null) output = output.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), 0);
        return new LshAttentionOutput(output.MoveToOuterDisposeScope(), queryBuckets.MoveToOuterDisposeScope(),
            ReferenceEquals(keyBuckets, queryBuckets) ? queryBuckets : keyBuckets.MoveToOuterDisposeScope(),
            new LshGroups(groups.QueryIndices.MoveToOuterDisposeScope(), groups.KeyIndices.MoveToOuterDisposeScope(),
                          groups.PreviousGroup.MoveToOuterDisposeScope(), nHashes));
    }
}
