namespace SparseAttention.Patterns;

/// <summary>How the two factorized Sparse Transformer patterns (A = local part, B = strided or
/// summary part) are combined (Child et al. 2019, §4.3).</summary>
public enum FactorizedCombine
{
    /// <summary>Every head attends the union A ∪ B.</summary>
    Merged,
    /// <summary>Even heads attend A, odd heads attend B; their outputs are concatenated.</summary>
    MultiHead,
    /// <summary>Even layers attend A, odd layers attend B (pick the layer with the <c>layer</c> argument).</summary>
    Interleaved,
}

/// <summary>Dense attention: every key (causal: every key ≤ query).</summary>
public sealed class DensePattern(bool causal) : AttentionPattern(causal ? "all(causal)" : "all")
{
    public override bool IsCausal => causal;
    public override bool IsPrefixStable => true;
    public override bool Allows(int head, int query, int key, int seqLen) => !causal || key <= query;
}

/// <summary>
/// OpenAI's local band (<c>attn_mode = "local"</c>, <c>local_attn_ctx = C</c>): causal, key in
/// [query − C + 1, query]; bidirectional, |query − key| &lt; C.
/// </summary>
public sealed class LocalBandPattern : AttentionPattern
{
    public LocalBandPattern(int localAttnCtx, bool causal)
        : base($"local(ctx={localAttnCtx}{(causal ? ", causal" : "")})")
    {
        Check.Positive(localAttnCtx, nameof(localAttnCtx));
        LocalAttnCtx = localAttnCtx; Causal = causal;
    }

    public int LocalAttnCtx { get; }
    public bool Causal { get; }
    public override bool IsCausal => Causal;
    public override bool IsPrefixStable => true;
    public override int? CausalReach => LocalAttnCtx - 1;

    public override bool Allows(int head, int query, int key, int seqLen) =>
        key <= query ? query - key < LocalAttnCtx : !Causal && key - query < LocalAttnCtx;

    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        int q0 = queryBlock * blockSize, q1 = Math.Min(q0 + blockSize, seqLen) - 1;
        int first = Math.Max(0, q0 - LocalAttnCtx + 1) / blockSize;
        int last = Causal ? queryBlock : Math.Min(seqLen - 1, q1 + LocalAttnCtx - 1) / blockSize;
        for (int kb = first; kb <= last; kb++) yield return kb;
    }
}

/// <summary>
/// Blocked local windows (the local-attention / Routing Transformer vocabulary): the sequence is cut
/// into windows of <c>window_size</c>; a query attends keys in its own window, <c>look_backward</c>
/// windows before and <c>look_forward</c> windows after. Causal also requires key ≤ query.
/// <c>exact_windowsize</c> limits the reach to exactly window_size·look_backward tokens back (and
/// window_size·look_forward forward). The authors' <c>query_shape</c> = window_size and
/// <c>memory_flange</c> = look_backward·window_size (and look_forward when not causal).
/// </summary>
public sealed class WindowPattern : AttentionPattern
{
    public WindowPattern(int windowSize, int lookBackward, int lookForward, bool exactWindowSize, bool causal)
        : base($"window(size={windowSize}, back={lookBackward}, fwd={lookForward}{(exactWindowSize ? ", exact" : "")}{(causal ? ", causal" : "")})")
    {
        Check.Positive(windowSize, nameof(windowSize));
        Check.NonNegative(lookBackward, nameof(lookBackward));
        Check.NonNegative(lookForward, nameof(lookForward));
        Check.That(!(causal && lookForward > 0), nameof(lookForward), $"a causal window cannot look forward; got lookForward = {lookForward}.");
        WindowSize = windowSize; LookBackward = lookBackward; LookForward = lookForward;
        ExactWindowSize = exactWindowSize; Causal = causal;
    }

    public int WindowSize { get; }
    public int LookBackward { get; }
    public int LookForward { get; }
    public bool ExactWindowSize { get; }
    public bool Causal { get; }
    public override bool IsCausal => Causal;
    public override bool IsPrefixStable => true;
    // The earliest key is the first of the window LookBackward windows back: at most (LookBackward + 1)·W − 1 away.
    public override int? CausalReach => ExactWindowSize ? Math.Min(WindowSize * LookBackward, (LookBackward + 1) * WindowSize - 1)
                                                        : (LookBackward + 1) * WindowSize - 1;

    public override bool Allows(int head, int query, int key, int seqLen)
    {
        if (Causal && key > query) return false;
        int qw = query / WindowSize, kw = key / WindowSize;
        if (kw < qw - LookBackward || kw > qw + LookForward) return false;
        if (!ExactWindowSize) return true;
        return query - key <= WindowSize * LookBackward && key - query <= WindowSize * LookForward;
    }

    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        int q0 = queryBlock * blockSize, q1 = Math.Min(q0 + blockSize, seqLen) - 1;
        int firstKey = Math.Max(0, (q0 / WindowSize - LookBackward) * WindowSize);
        int lastKey = Causal ? q1 : Math.Min(seqLen - 1, (q1 / WindowSize + LookForward + 1) * WindowSize - 1);
        for (int kb = firstKey / blockSize; kb <= lastKey / blockSize; kb++) yield return kb;
    }
}

/// <summary>
/// The Sparse Transformer's strided pattern with stride L: part A = the previous L positions
/// (query − L &lt; key ≤ query; bidirectional |query − key| &lt; L), part B = every L-th position
/// ((query − key) mod L = 0, key ≤ query when causal).
/// </summary>
public sealed class StridedPattern : AttentionPattern
{
    public StridedPattern(int stride, bool causal, FactorizedCombine combine = FactorizedCombine.Merged, int layer = 0)
        : base($"strided(stride={stride}, {combine}{(combine == FactorizedCombine.Interleaved ? $" layer {layer}" : "")}{(causal ? ", causal" : "")})")
    {
        Check.Positive(stride, nameof(stride));
        Check.NonNegative(layer, nameof(layer));
        Stride = stride; Causal = causal; Combine = combine; Layer = layer;
    }

    public int Stride { get; }
    public bool Causal { get; }
    public FactorizedCombine Combine { get; }
    public int Layer { get; }
    public override bool IsCausal => Causal;
    public override bool SameForAllHeads => Combine != FactorizedCombine.MultiHead;
    public override bool IsPrefixStable => true;
    public override int? CausalReach => Combine == FactorizedCombine.Interleaved && Layer % 2 == 0 ? Stride - 1 : null;

    public bool LocalPart(int query, int key) => Math.Abs(query - key) < Stride && (!Causal || key <= query);
    public bool StridePart(int query, int key) => (query - key) % Stride == 0 && (!Causal || key <= query);

    public override bool Allows(int head, int query, int key, int seqLen) => Combine switch
    {
        FactorizedCombine.Merged => LocalPart(query, key) || StridePart(query, key),
        FactorizedCombine.MultiHead => head % 2 == 0 ? LocalPart(query, key) : StridePart(query, key),
        _ => Layer % 2 == 0 ? LocalPart(query, key) : StridePart(query, key),
    };

    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        bool onlyLocal = Combine == FactorizedCombine.MultiHead ? head % 2 == 0
                       : Combine == FactorizedCombine.Interleaved && Layer % 2 == 0;
        return onlyLocal
            ? new LocalBandPattern(Stride, Causal).CandidateKeyBlocks(head, queryBlock, blockSize, seqLen)
            : base.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen);
    }
}

/// <summary>
/// The Sparse Transformer's fixed pattern with stride L: part A = the same block of L
/// (⌊key/L⌋ = ⌊query/L⌋), part B = summary cells, the last <c>vertsize</c> (c) positions of every
/// block, shifted for head h by (h mod <c>num_verts</c>)·c from the block end. Causal also requires
/// key ≤ query in both parts.
/// </summary>
public sealed class FixedPattern : AttentionPattern
{
    public FixedPattern(int stride, int vertsize, int numVerts, bool causal,
        FactorizedCombine combine = FactorizedCombine.Merged, int layer = 0)
        : base($"fixed(stride={stride}, vertsize={vertsize}, num_verts={numVerts}, {combine}{(combine == FactorizedCombine.Interleaved ? $" layer {layer}" : "")}{(causal ? ", causal" : "")})")
    {
        Check.Positive(stride, nameof(stride));
        Check.Positive(vertsize, nameof(vertsize));
        Check.Positive(numVerts, nameof(numVerts));
        Check.NonNegative(layer, nameof(layer));
        Check.That((long)numVerts * vertsize <= stride, nameof(numVerts),
            $"num_verts · vertsize must fit in one block of stride {stride}; got {numVerts} · {vertsize} = {(long)numVerts * vertsize}.");
        Stride = stride; Vertsize = vertsize; NumVerts = numVerts; Causal = causal; Combine = combine; Layer = layer;
    }

    public int Stride { get; }
    public int Vertsize { get; }
    public int NumVerts { get; }
    public bool Causal { get; }
    public FactorizedCombine Combine { get; }
    public int Layer { get; }
    public override bool IsCausal => Causal;
    public override bool SameForAllHeads => Combine == FactorizedCombine.Interleaved ? Layer % 2 == 0 || NumVerts == 1
                                          : Combine == FactorizedCombine.Merged && NumVerts == 1;
    public override bool IsPrefixStable => true;
    public override int? CausalReach => Combine == FactorizedCombine.Interleaved && Layer % 2 == 0 ? Stride - 1 : null;

    public bool BlockPart(int query, int key) => query / Stride == key / Stride && (!Causal || key <= query);

    public bool SummaryPart(int head, int query, int key)
    {
        if (Causal && key > query) return false;
        int fromEnd = Stride - 1 - key % Stride;          // 0 = last position of its block
        int shift = head % NumVerts * Vertsize;
        return fromEnd >= shift && fromEnd < shift + Vertsize;
    }

    public override bool Allows(int head, int query, int key, int seqLen) => Combine switch
    {
        FactorizedCombine.Merged => BlockPart(query, key) || SummaryPart(head, query, key),
        FactorizedCombine.MultiHead => head % 2 == 0 ? BlockPart(query, key) : SummaryPart(head, query, key),
        _ => Layer % 2 == 0 ? BlockPart(query, key) : SummaryPart(head, query, key),
    };

    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        bool onlyBlock = Combine == FactorizedCombine.MultiHead ? head % 2 == 0
                       : Combine == FactorizedCombine.Interleaved && Layer % 2 == 0;
        if (!onlyBlock) return base.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen);
        int q0 = queryBlock * blockSize, q1 = Math.Min(q0 + blockSize, seqLen) - 1;
        int firstKey = q0 / Stride * Stride;
        int lastKey = Causal ? q1 : Math.Min(seqLen - 1, (q1 / Stride + 1) * Stride - 1);
        return Enumerable.Range(firstKey / blockSize, lastKey / blockSize - firstKey / blockSize + 1);
    }
}
