namespace SparseAttention.Patterns;

/// <summary>
/// A static attention pattern: a predicate <c>(head, query, key) → may attend</c> over a sequence of
/// a given length. Patterns hold no parameters; they are compiled once per (length, block size,
/// heads) into a <see cref="BlockMask"/>, which is what kernels consume.
/// </summary>
public abstract class AttentionPattern
{
    protected AttentionPattern(string name) => Name = name;

    /// <summary>A short human-readable description, e.g. <c>local(ctx=64, causal)</c>.</summary>
    public string Name { get; }

    /// <summary>True when the pattern never lets a query see a later key (key ≤ query always).</summary>
    public abstract bool IsCausal { get; }

    /// <summary>True when every head has the same pattern (lets compilation share one head).</summary>
    public virtual bool SameForAllHeads => true;

    /// <summary>True when whether query i may attend key j never depends on the sequence length (so a prefix of a
    /// longer sequence sees exactly what it saw alone). Cached decoding needs it; false unless a pattern says so.</summary>
    public virtual bool IsPrefixStable => false;

    /// <summary>For a causal, prefix-stable pattern: the largest query − key distance any head may attend, or null
    /// when unbounded. Cached decoding keeps only the last CausalReach + 1 keys of such a head group.</summary>
    public virtual int? CausalReach => null;

    /// <summary>May query position <paramref name="query"/> attend key position <paramref name="key"/>
    /// in head <paramref name="head"/>, for a sequence of <paramref name="seqLen"/> tokens?
    /// Both positions are in [0, seqLen).</summary>
    public abstract bool Allows(int head, int query, int key, int seqLen);

    /// <summary>
    /// Key blocks (of <paramref name="blockSize"/> tokens) that may contain an allowed key for the
    /// given query block — a superset is fine, compilation tests each candidate exactly. Override to
    /// make compilation cost proportional to the visited blocks instead of the whole square.
    /// </summary>
    public virtual IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        int numBlocks = (seqLen + blockSize - 1) / blockSize;
        int last = IsCausal ? queryBlock : numBlocks - 1;
        for (int kb = 0; kb <= last; kb++) yield return kb;
    }

    /// <summary>Checks that the pattern can be used for this length and head count; throws
    /// <see cref="ArgumentException"/> naming the offending parameter otherwise.</summary>
    public virtual void Validate(int seqLen, int heads) { }

    public AttentionPattern And(AttentionPattern other) => new AndPattern(this, other);

    /// <summary>This pattern as it is at length <paramref name="length"/>, cropped to shorter sequences: query i may attend
    /// key j at every length ≤ <paramref name="length"/> exactly when it may at <paramref name="length"/>. Prefix-stable by
    /// construction, so a causal layout whose rows depend on the sequence length (random or window-aligned blocks) can
    /// decode from a cache; a pattern that is already prefix-stable is returned as it is.</summary>
    public AttentionPattern AtLength(int length) => IsPrefixStable ? this : new FixedLengthPattern(this, length);

    public AttentionPattern Or(AttentionPattern other) => new OrPattern(this, other);

    /// <summary>Compiles to a block mask; see <see cref="BlockMask.Compile"/>.</summary>
    public BlockMask Compile(int seqLen, int blockSize, int heads) => BlockMask.Compile(this, seqLen, blockSize, heads);

    public override string ToString() => Name;

    /// <summary>A pattern from a user predicate <c>(head, query, key, seqLen) → may attend</c>.</summary>
    public static AttentionPattern FromPredicate(string name, bool isCausal, bool sameForAllHeads,
        Func<int, int, int, int, bool> allows) => new PredicatePattern(name, isCausal, sameForAllHeads, allows);

    /// <summary>Heads split into consecutive groups, each group with its own pattern; within a
    /// group, heads are renumbered from 0. E.g. 4 local heads then 4 strided heads.</summary>
    public static AttentionPattern HeadGroups(params (AttentionPattern Pattern, int Heads)[] groups) => new HeadGroupPattern(groups);
}

internal sealed class PredicatePattern(string name, bool isCausal, bool sameForAllHeads, Func<int, int, int, int, bool> allows)
    : AttentionPattern(name)
{
    public override bool IsCausal => isCausal;
    public override bool SameForAllHeads => sameForAllHeads;
    public override bool Allows(int head, int query, int key, int seqLen) =>
        (!isCausal || key <= query) && allows(head, query, key, seqLen);
    // A user predicate may read seqLen: not prefix-stable.
}

internal sealed class FixedLengthPattern : AttentionPattern
{
    private readonly AttentionPattern inner;
    private readonly int length;

    public FixedLengthPattern(AttentionPattern inner, int length) : base($"{inner.Name} at length {length}")
    {
        Check.Positive(length, nameof(length));
        this.inner = inner;
        this.length = length;
    }

    public override bool IsCausal => inner.IsCausal;
    public override bool SameForAllHeads => inner.SameForAllHeads;
    public override bool IsPrefixStable => true;

    public override bool Allows(int head, int query, int key, int seqLen) => inner.Allows(head, query, key, length);

    // The inner candidates at the fixed length, clipped to this sequence's blocks (compilation tests each exactly).
    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        int blocks = (seqLen + blockSize - 1) / blockSize;
        return inner.CandidateKeyBlocks(head, queryBlock, blockSize, length).Where(kb => kb < blocks);
    }

    public override void Validate(int seqLen, int heads)
    {
        Check.That(seqLen <= length, nameof(seqLen), $"must be <= {length}, the length this pattern is fixed at; got {seqLen}.");
        inner.Validate(length, heads);
    }
}

internal sealed class AndPattern(AttentionPattern a, AttentionPattern b) : AttentionPattern($"({a.Name} and {b.Name})")
{
    public override bool IsCausal => a.IsCausal || b.IsCausal;
    public override bool SameForAllHeads => a.SameForAllHeads && b.SameForAllHeads;
    public override bool IsPrefixStable => a.IsPrefixStable && b.IsPrefixStable;
    public override int? CausalReach => a.CausalReach is int ra ? (b.CausalReach is int rb ? Math.Min(ra, rb) : ra) : b.CausalReach;
    public override bool Allows(int head, int query, int key, int seqLen) =>
        a.Allows(head, query, key, seqLen) && b.Allows(head, query, key, seqLen);
    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        var fromB = new HashSet<int>(b.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen));
        return a.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen).Where(fromB.Contains);
    }
    public override void Validate(int seqLen, int heads) { a.Validate(seqLen, heads); b.Validate(seqLen, heads); }
}

internal sealed class OrPattern(AttentionPattern a, AttentionPattern b) : AttentionPattern($"({a.Name} or {b.Name})")
{
    public override bool IsCausal => a.IsCausal && b.IsCausal;
    public override bool SameForAllHeads => a.SameForAllHeads && b.SameForAllHeads;
    public override bool IsPrefixStable => a.IsPrefixStable && b.IsPrefixStable;
    public override int? CausalReach => a.CausalReach is int ra && b.CausalReach is int rb ? Math.Max(ra, rb) : null;
    public override bool Allows(int head, int query, int key, int seqLen) =>
        a.Allows(head, query, key, seqLen) || b.Allows(head, query, key, seqLen);
    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen) =>
        a.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen)
         .Union(b.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen)).Order();
    public override void Validate(int seqLen, int heads) { a.Validate(seqLen, heads); b.Validate(seqLen, heads); }
}

internal sealed class HeadGroupPattern : AttentionPattern
{
    private readonly (AttentionPattern Pattern, int Heads)[] groups;
    private readonly int totalHeads;

    public HeadGroupPattern((AttentionPattern Pattern, int Heads)[] groups)
        : base(string.Join(" + ", groups.Select(g => $"{g.Heads}×{g.Pattern.Name}")))
    {
        Check.That(groups.Length > 0, nameof(groups), "at least one head group is needed.");
        foreach (var g in groups) Check.Positive(g.Heads, "groups[].Heads");
        this.groups = groups;
        totalHeads = groups.Sum(g => g.Heads);
    }

    public override bool IsCausal => groups.All(g => g.Pattern.IsCausal);
    public override bool SameForAllHeads => false;
    public override bool IsPrefixStable => groups.All(g => g.Pattern.IsPrefixStable);
    public override int? CausalReach => groups.All(g => g.Pattern.CausalReach is not null) ? groups.Max(g => g.Pattern.CausalReach) : null;

    private (AttentionPattern Pattern, int LocalHead) Find(int head)
    {
        foreach (var g in groups)
        {
            if (head < g.Heads) return (g.Pattern, head);
            head -= g.Heads;
        }
        throw new ArgumentOutOfRangeException(nameof(head), $"head must be < {totalHeads} (the heads of all groups).");
    }

    public override bool Allows(int head, int query, int key, int seqLen)
    {
        var (p, h) = Find(head);
        return p.Allows(h, query, key, seqLen);
    }

    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        var (p, h) = Find(head);
        return p.CandidateKeyBlocks(h, queryBlock, blockSize, seqLen);
    }

    public override void Validate(int seqLen, int heads)
    {
        Check.That(heads == totalHeads, nameof(heads), $"the head groups hold {totalHeads} heads, got heads = {heads}.");
        foreach (var g in groups) g.Pattern.Validate(seqLen, g.Heads);
    }
}
