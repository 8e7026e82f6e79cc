using System.Collections.Concurrent;

namespace SparseAttention.Patterns;

/// <summary>
/// A pattern defined by a block layout: the sequence is cut into blocks of <see cref="Block"/>
/// tokens and, per head, a (numBlocks × numBlocks) 0/1 matrix says which key blocks each query
/// block attends. Token level: <c>Allows(h, i, j, T) = Layout(h, ⌈T / Block⌉)[i / Block, j / Block]
/// &amp;&amp; (!Causal || j ≤ i)</c>.
/// </summary>
/// <remarks>
/// These are the block-sparse layouts of DeepSpeed's sparse attention
/// (<c>deepspeed/ops/sparse_attention/sparsity_config.py</c>). DeepSpeed requires the sequence
/// length to be a multiple of <c>block</c>; here numBlocks = ⌈seqLen / Block⌉ and the last block
/// may be short (its missing keys are padding, never attended). The layout's block size is
/// independent of the block size the pattern is compiled with (<see cref="BlockMask.Compile"/>):
/// <see cref="CandidateKeyBlocks"/> maps one onto the other.
/// </remarks>
public abstract class BlockLayoutPattern : AttentionPattern
{
    // Layouts are immutable once built; keyed by (head-layout index, numBlocks).
    private readonly ConcurrentDictionary<(int LayoutIndex, int NumBlocks), bool[,]> cache = new();

    /// <param name="name">Debug name.</param>
    /// <param name="block">Tokens per layout block (DeepSpeed <c>block</c>); must be &gt; 0.</param>
    /// <param name="causal">True = DeepSpeed <c>attention="unidirectional"</c>.</param>
    /// <param name="differentLayoutPerHead">DeepSpeed <c>different_layout_per_head</c>.</param>
    protected BlockLayoutPattern(string name, int block, bool causal, bool differentLayoutPerHead) : base(name)
    {
        Check.Positive(block, nameof(block));
        Block = block;
        Causal = causal;
        DifferentLayoutPerHead = differentLayoutPerHead;
    }

    /// <summary>Tokens per layout block (DeepSpeed <c>block</c>).</summary>
    public int Block { get; }

    /// <summary>True = DeepSpeed <c>attention="unidirectional"</c> (a query sees only keys ≤ itself);
    /// false = <c>"bidirectional"</c>.</summary>
    public bool Causal { get; }

    /// <summary>DeepSpeed <c>different_layout_per_head</c>: when false every head uses head 0's
    /// layout ("propagate first head"); when true each head may get its own layout (it only differs
    /// where the layout has per-head ingredients: random blocks, or Fixed's global patterns).</summary>
    public bool DifferentLayoutPerHead { get; }

    /// <inheritdoc/>
    public override bool IsCausal => Causal;

    /// <summary>True unless heads can actually get different layouts.</summary>
    public override bool SameForAllHeads => true;

    /// <summary>
    /// The (numBlocks × numBlocks) layout of head <paramref name="head"/>: [query block, key block],
    /// true = visited. Returns a fresh copy (the cached layout stays untouched). Cached per
    /// (head-layout index, numBlocks); thread-safe.
    /// </summary>
    /// <param name="head">Head index, ≥ 0.</param>
    /// <param name="numBlocks">Blocks per row = ⌈seqLen / Block⌉, &gt; 0.</param>
    public bool[,] Layout(int head, int numBlocks) => (bool[,])CachedLayout(head, numBlocks).Clone();

    /// <summary>Which stored layout head <paramref name="head"/> uses: 0 for all heads unless the
    /// layout varies per head. Two heads with the same index have the same layout.</summary>
    protected virtual int LayoutIndex(int head) => 0;

    /// <summary>Builds the layout number <paramref name="layoutIndex"/> for <paramref name="numBlocks"/>
    /// blocks; called once per (index, numBlocks), after <see cref="CheckNumBlocks"/>.</summary>
    protected abstract bool[,] BuildLayout(int layoutIndex, int numBlocks);

    /// <summary>Throws where DeepSpeed raises for counts larger than the number of blocks.
    /// <paramref name="numBlocksText"/> describes the block count for the message.</summary>
    protected virtual void CheckNumBlocks(int numBlocks, string numBlocksText) { }

    private bool[,] CachedLayout(int head, int numBlocks)
    {
        Check.NonNegative(head, nameof(head));
        Check.Positive(numBlocks, nameof(numBlocks));
        int index = LayoutIndex(head);
        if (cache.TryGetValue((index, numBlocks), out var layout)) return layout;
        CheckNumBlocks(numBlocks, numBlocks.ToString());
        // A race may build the same layout twice; both are identical (seeded), one is kept.
        return cache.GetOrAdd((index, numBlocks), key => BuildLayout(key.LayoutIndex, key.NumBlocks));
    }

    private int NumBlocksFor(int seqLen) => (seqLen + Block - 1) / Block;

    /// <inheritdoc/>
    public override bool Allows(int head, int query, int key, int seqLen)
    {
        if (Causal && key > query) return false;
        return CachedLayout(head, NumBlocksFor(seqLen))[query / Block, key / Block];
    }

    /// <summary>Exact: the compile blocks overlapping a layout block visited by any layout row that
    /// the query block overlaps (and, when causal, not after the query block).</summary>
    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        var layout = CachedLayout(head, NumBlocksFor(seqLen));
        int numBlocks = layout.GetLength(0);
        int compileBlocks = (seqLen + blockSize - 1) / blockSize;
        int q0 = queryBlock * blockSize, q1 = Math.Min(q0 + blockSize, seqLen) - 1;
        if (q0 >= seqLen) yield break;
        var hit = new bool[compileBlocks];
        for (int row = q0 / Block; row <= q1 / Block; row++)
            for (int col = 0; col < numBlocks; col++)
            {
                if (!layout[row, col]) continue;
                int k0 = col * Block, k1 = Math.Min(k0 + Block, seqLen) - 1;   // key tokens of this layout block
                for (int kb = k0 / blockSize; kb <= k1 / blockSize; kb++) hit[kb] = true;
            }
        int last = Causal ? Math.Min(queryBlock, compileBlocks - 1) : compileBlocks - 1;
        for (int kb = 0; kb <= last; kb++)
            if (hit[kb]) yield return kb;
    }

    /// <inheritdoc/>
    public override void Validate(int seqLen, int heads)
    {
        Check.Positive(seqLen, nameof(seqLen));
        Check.Positive(heads, nameof(heads));
        CheckNumBlocks(NumBlocksFor(seqLen), $"⌈seq_len / block⌉ = ⌈{seqLen} / {Block}⌉ = {NumBlocksFor(seqLen)}");
    }

    // ---- helpers shared by the layouts below ----

    /// <summary>Seed for one layout: the user seed mixed with the layout index and the block count
    /// (SplitMix64 finaliser) so that each (head layout, length) gets its own reproducible stream.</summary>
    private protected static int MixSeed(int seed, int layoutIndex, int numBlocks)
    {
        unchecked
        {
            ulong z = (ulong)(uint)seed * 0x9E3779B97F4A7C15UL ^ ((ulong)(uint)layoutIndex << 32 | (uint)numBlocks);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return (int)(z ^ (z >> 31));
        }
    }

    /// <summary>Marks <paramref name="count"/> distinct columns drawn uniformly from
    /// [0, <paramref name="population"/>) in row <paramref name="row"/> (partial Fisher–Yates,
    /// the equivalent of Python's <c>random.sample(range(population), count)</c>).</summary>
    private protected static void MarkRandom(bool[,] layout, int row, int population, int count, Random rng, int[] scratch)
    {
        for (int i = 0; i < population; i++) scratch[i] = i;
        for (int i = 0; i < count; i++)
        {
            int pick = rng.Next(i, population);
            (scratch[i], scratch[pick]) = (scratch[pick], scratch[i]);
            layout[row, scratch[i]] = true;
        }
    }

    /// <summary>Sets rows [r0, r1) × columns [c0, c1) (bounds clipped to the layout).</summary>
    private protected static void Fill(bool[,] layout, int r0, int r1, int c0, int c1)
    {
        int n = layout.GetLength(0);
        for (int r = Math.Max(0, r0); r < Math.Min(r1, n); r++)
            for (int c = Math.Max(0, c0); c < Math.Min(c1, n); c++)
                layout[r, c] = true;
    }

    /// <summary>Sliding window of ±⌊window/2⌋ blocks around the diagonal (DeepSpeed's
    /// <c>set_sliding_window_layout</c> for BigBird / BSLongformer, and LocalSlidingWindow when
    /// bidirectional); <paramref name="backOnly"/> keeps only the part at or before the diagonal.</summary>
    private protected static void MarkSlidingWindow(bool[,] layout, int window, bool backOnly)
    {
        int n = layout.GetLength(0), w = window / 2;
        for (int r = 0; r < n; r++) Fill(layout, r, r + 1, r - w, backOnly ? r + 1 : r + w + 1);
    }

    /// <summary>Clears everything above the diagonal (DeepSpeed's <c>torch.tril(layout)</c>).</summary>
    private protected static void LowerTriangle(bool[,] layout)
    {
        int n = layout.GetLength(0);
        for (int r = 0; r < n; r++)
            for (int c = r + 1; c < n; c++) layout[r, c] = false;
    }

    /// <summary>Global block ranges [start, end): from start/end index lists as DeepSpeed reads them
    /// (no end list: one block per index); ranges starting at or past the last block are dropped and
    /// ends clipped to numBlocks.</summary>
    private protected static IEnumerable<(int Start, int End)> GlobalRanges(int[] starts, int[]? ends, int numBlocks)
    {
        for (int i = 0; i < starts.Length; i++)
            if (starts[i] < numBlocks) yield return (starts[i], Math.Min(ends is null ? starts[i] + 1 : ends[i], numBlocks));
    }

    private protected static void CheckGlobalIndices(int[] starts, int[]? ends)
    {
        foreach (int s in starts)
            Check.That(s >= 0, "globalBlockIndices", $"global_block_indices must be block indices >= 0, got {s}.");
        if (ends is null) return;
        Check.That(ends.Length == starts.Length, "globalBlockEndIndices",
            $"global_block_end_indices must have the length of global_block_indices ({starts.Length}), got {ends.Length}.");
        for (int i = 0; i < starts.Length; i++)
            Check.That(starts[i] < ends[i], "globalBlockEndIndices",
                $"each global block end index must be > its start index; got start {starts[i]}, end {ends[i]} at position {i}.");
    }

    // Runs before the constructor's checks, so it must cope with lists of different lengths.
    private protected static string FormatGlobal(int[] starts, int[]? ends) =>
        ends is not null && ends.Length == starts.Length
            ? "[" + string.Join(", ", starts.Zip(ends, (s, e) => $"{s}:{e}")) + "]"
            : $"[{string.Join(", ", starts)}]" + (ends is null ? "" : $" ends [{string.Join(", ", ends)}]");

    private protected static string Flags(bool perHead, bool causal, int seed = 0) =>
        (seed != 0 ? $", seed={seed}" : "") + (perHead ? ", per_head" : "") + (causal ? ", causal" : "");

    private protected static void CheckAtMostBlocks(int count, string name, string snakeName, int numBlocks, string numBlocksText) =>
        Check.That(count <= numBlocks, name,
            $"{snakeName} must be <= the number of blocks in a row, {numBlocksText}; got {count}.");
}

/// <summary>
/// DeepSpeed's <c>FixedSparsityConfig</c>: local windows of <c>num_local_blocks</c> blocks (a block
/// attends every block of its own window; causal: the ones not after it) plus global "summary"
/// blocks, <c>num_global_blocks</c> per window, attended by every query block (causal: every
/// query block from the summary group's first block on).
/// </summary>
/// <remarks>
/// Child et al. 2019, "Generating Long Sequences with Sparse Transformers" (arXiv 1904.10509), the
/// fixed pattern, as customised in DeepSpeed (sparsity_config.py, <c>FixedSparsityConfig</c>).
/// Rules followed: global pattern p = head mod num_different_global_patterns puts the summary group
/// of each full window at offsets [L − (p + 1)·G, L − p·G) from the window start (L =
/// num_local_blocks, G = num_global_blocks), i.e. pattern 0 uses the last G blocks of the window.
/// A short last window puts its group at min(windowStart + L − (p + 1)·G, numBlocks − G) so it
/// always fits. Causal: a summary group's columns are set from the row of the group's first block
/// down, so with G &gt; 1 a few layout entries sit above the diagonal; the token-level rule
/// key ≤ query removes them. When numBlocks &lt; G DeepSpeed indexes with a negative Python start;
/// here the group is clamped to start at block 0.
/// </remarks>
public sealed class DsFixedPattern : BlockLayoutPattern
{
    /// <param name="block">DeepSpeed <c>block</c>: tokens per layout block (DeepSpeed default 16), &gt; 0.</param>
    /// <param name="causal">True = <c>attention="unidirectional"</c>; false = <c>"bidirectional"</c> (DeepSpeed default).</param>
    /// <param name="numLocalBlocks"><c>num_local_blocks</c> (default 4): blocks per local window; a multiple of numGlobalBlocks.</param>
    /// <param name="numGlobalBlocks"><c>num_global_blocks</c> (default 1): consecutive blocks of each window that represent it globally.</param>
    /// <param name="horizontalGlobalAttention"><c>horizontal_global_attention</c> (default false): true = the global
    /// blocks also attend every block (whole rows); bidirectional only.</param>
    /// <param name="numDifferentGlobalPatterns"><c>num_different_global_patterns</c> (default 1): heads cycle
    /// over this many summary positions per window; &gt; 1 needs differentLayoutPerHead and at most
    /// numLocalBlocks / numGlobalBlocks.</param>
    /// <param name="differentLayoutPerHead"><c>different_layout_per_head</c> (default false).</param>
    public DsFixedPattern(int block, bool causal, int numLocalBlocks = 4, int numGlobalBlocks = 1,
        bool horizontalGlobalAttention = false, int numDifferentGlobalPatterns = 1, bool differentLayoutPerHead = false)
        : base($"ds_fixed(block={block}, local={numLocalBlocks}, global={numGlobalBlocks}"
               + (horizontalGlobalAttention ? ", horizontal" : "")
               + (numDifferentGlobalPatterns != 1 ? $", patterns={numDifferentGlobalPatterns}" : "")
               + Flags(differentLayoutPerHead, causal) + ")",
               block, causal, differentLayoutPerHead)
    {
        Check.Positive(numLocalBlocks, nameof(numLocalBlocks));
        Check.Positive(numGlobalBlocks, nameof(numGlobalBlocks));
        Check.That(numLocalBlocks % numGlobalBlocks == 0, nameof(numLocalBlocks),
            $"num_local_blocks must be a multiple of num_global_blocks ({numGlobalBlocks}), got {numLocalBlocks}.");
        Check.That(!(causal && horizontalGlobalAttention), nameof(horizontalGlobalAttention),
            "horizontal_global_attention needs bidirectional attention, got it with causal = true.");
        Check.Positive(numDifferentGlobalPatterns, nameof(numDifferentGlobalPatterns));
        Check.That(numDifferentGlobalPatterns == 1 || differentLayoutPerHead, nameof(numDifferentGlobalPatterns),
            $"num_different_global_patterns > 1 needs differentLayoutPerHead = true; got {numDifferentGlobalPatterns} with one layout for all heads.");
        Check.That(numDifferentGlobalPatterns <= numLocalBlocks / numGlobalBlocks, nameof(numDifferentGlobalPatterns),
            $"num_different_global_patterns must be <= num_local_blocks / num_global_blocks = {numLocalBlocks} / {numGlobalBlocks} = {numLocalBlocks / numGlobalBlocks}, got {numDifferentGlobalPatterns}.");
        NumLocalBlocks = numLocalBlocks;
        NumGlobalBlocks = numGlobalBlocks;
        HorizontalGlobalAttention = horizontalGlobalAttention;
        NumDifferentGlobalPatterns = numDifferentGlobalPatterns;
    }

    /// <summary>DeepSpeed <c>num_local_blocks</c>.</summary>
    public int NumLocalBlocks { get; }
    /// <summary>DeepSpeed <c>num_global_blocks</c>.</summary>
    public int NumGlobalBlocks { get; }
    /// <summary>DeepSpeed <c>horizontal_global_attention</c>.</summary>
    public bool HorizontalGlobalAttention { get; }
    /// <summary>DeepSpeed <c>num_different_global_patterns</c>.</summary>
    public int NumDifferentGlobalPatterns { get; }

    /// <inheritdoc/>
    public override bool SameForAllHeads => NumDifferentGlobalPatterns == 1;

    /// <summary>The global pattern of the head: head mod num_different_global_patterns.</summary>
    protected override int LayoutIndex(int head) => head % NumDifferentGlobalPatterns;

    /// <inheritdoc/>
    protected override bool[,] BuildLayout(int layoutIndex, int numBlocks)
    {
        var layout = new bool[numBlocks, numBlocks];
        int local = NumLocalBlocks, global = NumGlobalBlocks;
        for (int w0 = 0; w0 < numBlocks; w0 += local)
        {
            int w1 = Math.Min(w0 + local, numBlocks);
            for (int r = w0; r < w1; r++) Fill(layout, r, r + 1, w0, Causal ? r + 1 : w1);
        }

        int offset = local - (layoutIndex + 1) * global;    // summary group's offset inside a window
        int fullEnd = numBlocks - numBlocks % local;        // end of the last full window
        for (int g = offset; g < fullEnd; g += local) MarkGlobalGroup(layout, g, g + global);
        if (fullEnd < numBlocks)
        {
            // Short last window: keep the group inside the sequence.
            int g = Math.Max(0, Math.Min(fullEnd + offset, numBlocks - global));
            MarkGlobalGroup(layout, g, g + global);
        }
        return layout;
    }

    private void MarkGlobalGroup(bool[,] layout, int g0, int g1)
    {
        int n = layout.GetLength(0);
        Fill(layout, Causal ? g0 : 0, n, g0, g1);             // every (later) block attends the group
        if (HorizontalGlobalAttention) Fill(layout, g0, g1, 0, n);   // the group attends everything
    }
}

/// <summary>
/// DeepSpeed's <c>VariableSparsityConfig</c>: local windows of varying sizes
/// (<c>local_window_blocks</c>, the last size repeating), global blocks at given indices (or index
/// ranges) attended by every block, and <c>num_random_blocks</c> random key blocks per query block.
/// </summary>
/// <remarks>
/// An extension of the Sparse Transformer's fixed pattern (Child et al. 2019, arXiv 1904.10509) in
/// DeepSpeed (sparsity_config.py, <c>VariableSparsityConfig</c>). Rules followed: windows are
/// consecutive ([0, s0), [s0, s0 + s1), …, then the last size repeated to the end); global block
/// (range) g is attended by every block (causal: by the rows from g's first block on) and with
/// <c>horizontal_global_attention</c> also attends every block; global indices at or past the last
/// block are ignored. DeepSpeed samples the random columns from <em>all</em> blocks even when
/// unidirectional, so a causal layout may hold random blocks above the diagonal; they are kept in
/// <see cref="BlockLayoutPattern.Layout"/> (as in DeepSpeed) and removed at token level by
/// key ≤ query. Random blocks come from <see cref="System.Random"/> seeded with (seed, head layout,
/// numBlocks): reproducible, but not the values of DeepSpeed's Python <c>random</c>.
/// </remarks>
public sealed class DsVariablePattern : BlockLayoutPattern
{
    private readonly int[] localWindowBlocks, globalBlockIndices;
    private readonly int[]? globalBlockEndIndices;

    /// <param name="block">DeepSpeed <c>block</c>: tokens per layout block (DeepSpeed default 16), &gt; 0.</param>
    /// <param name="causal">True = <c>attention="unidirectional"</c>; false = <c>"bidirectional"</c> (DeepSpeed default).</param>
    /// <param name="numRandomBlocks"><c>num_random_blocks</c> (default 0): random key blocks per query block; at most the number of blocks.</param>
    /// <param name="localWindowBlocks"><c>local_window_blocks</c> (default [4]): sizes of the consecutive local windows; the last size repeats. Non-empty, each &gt; 0.</param>
    /// <param name="globalBlockIndices"><c>global_block_indices</c> (default [0]): global blocks, or the starts of global ranges when end indices are given. Each ≥ 0.</param>
    /// <param name="globalBlockEndIndices"><c>global_block_end_indices</c> (default null = unused): exclusive ends of the global ranges; same length as globalBlockIndices, each end &gt; its start.</param>
    /// <param name="horizontalGlobalAttention"><c>horizontal_global_attention</c> (default false): true = global blocks also attend every block; bidirectional only.</param>
    /// <param name="differentLayoutPerHead"><c>different_layout_per_head</c> (default false): true = each head draws its own random blocks.</param>
    /// <param name="seed">Seed of the random blocks (not in DeepSpeed, which uses Python's global <c>random</c>).</param>
    public DsVariablePattern(int block, bool causal, int numRandomBlocks = 0, int[]? localWindowBlocks = null,
        int[]? globalBlockIndices = null, int[]? globalBlockEndIndices = null, bool horizontalGlobalAttention = false,
        bool differentLayoutPerHead = false, int seed = 0)
        : base($"ds_variable(block={block}, random={numRandomBlocks}, windows=[{string.Join(", ", localWindowBlocks ?? [4])}], "
               + $"global={FormatGlobal(globalBlockIndices ?? [0], globalBlockEndIndices)}"
               + (horizontalGlobalAttention ? ", horizontal" : "")
               + Flags(differentLayoutPerHead, causal, numRandomBlocks > 0 ? seed : 0) + ")",
               block, causal, differentLayoutPerHead)
    {
        Check.NonNegative(numRandomBlocks, nameof(numRandomBlocks));
        this.localWindowBlocks = (int[])(localWindowBlocks ?? [4]).Clone();
        this.globalBlockIndices = (int[])(globalBlockIndices ?? [0]).Clone();
        this.globalBlockEndIndices = (int[]?)globalBlockEndIndices?.Clone();
        Check.That(this.localWindowBlocks.Length > 0, nameof(localWindowBlocks), "local_window_blocks needs at least one window size, got an empty list.");
        foreach (int s in this.localWindowBlocks)
            Check.That(s > 0, nameof(localWindowBlocks), $"local_window_blocks sizes must be > 0, got {s}.");
        CheckGlobalIndices(this.globalBlockIndices, this.globalBlockEndIndices);
        Check.That(!(causal && horizontalGlobalAttention), nameof(horizontalGlobalAttention),
            "horizontal_global_attention needs bidirectional attention, got it with causal = true.");
        NumRandomBlocks = numRandomBlocks;
        HorizontalGlobalAttention = horizontalGlobalAttention;
        Seed = seed;
    }

    /// <summary>DeepSpeed <c>num_random_blocks</c>.</summary>
    public int NumRandomBlocks { get; }
    /// <summary>DeepSpeed <c>local_window_blocks</c>.</summary>
    public IReadOnlyList<int> LocalWindowBlocks => localWindowBlocks;
    /// <summary>DeepSpeed <c>global_block_indices</c>.</summary>
    public IReadOnlyList<int> GlobalBlockIndices => globalBlockIndices;
    /// <summary>DeepSpeed <c>global_block_end_indices</c> (null = one block per index).</summary>
    public IReadOnlyList<int>? GlobalBlockEndIndices => globalBlockEndIndices;
    /// <summary>DeepSpeed <c>horizontal_global_attention</c>.</summary>
    public bool HorizontalGlobalAttention { get; }
    /// <summary>Seed of the random blocks.</summary>
    public int Seed { get; }

    /// <inheritdoc/>
    public override bool SameForAllHeads => !(DifferentLayoutPerHead && NumRandomBlocks > 0);

    /// <inheritdoc/>
    protected override int LayoutIndex(int head) => SameForAllHeads ? 0 : head;

    /// <inheritdoc/>
    protected override void CheckNumBlocks(int numBlocks, string numBlocksText) =>
        CheckAtMostBlocks(NumRandomBlocks, "numRandomBlocks", "num_random_blocks", numBlocks, numBlocksText);

    /// <inheritdoc/>
    protected override bool[,] BuildLayout(int layoutIndex, int numBlocks)
    {
        var layout = new bool[numBlocks, numBlocks];
        if (NumRandomBlocks > 0)
        {
            var rng = new Random(MixSeed(Seed, layoutIndex, numBlocks));
            var scratch = new int[numBlocks];
            // DeepSpeed samples from every block, causal or not.
            for (int r = 0; r < numBlocks; r++) MarkRandom(layout, r, numBlocks, NumRandomBlocks, rng, scratch);
        }

        int w0 = 0;
        for (int k = 0; w0 < numBlocks; k++)
        {
            int size = localWindowBlocks[Math.Min(k, localWindowBlocks.Length - 1)];
            int w1 = Math.Min(w0 + size, numBlocks);
            for (int r = w0; r < w1; r++) Fill(layout, r, r + 1, w0, Causal ? r + 1 : w1);
            w0 += size;
        }

        foreach (var (g0, g1) in GlobalRanges(globalBlockIndices, globalBlockEndIndices, numBlocks))
        {
            if (HorizontalGlobalAttention) Fill(layout, g0, g1, 0, numBlocks);
            Fill(layout, Causal ? g0 : 0, numBlocks, g0, g1);
        }
        return layout;
    }
}

/// <summary>
/// DeepSpeed's <c>BigBirdSparsityConfig</c>: <c>num_random_blocks</c> random key blocks per query
/// block, a sliding window of <c>num_sliding_window_blocks</c> blocks centred on the diagonal, and the
/// first <c>num_global_blocks</c> blocks global (they attend, and are attended by, every block).
/// </summary>
/// <remarks>
/// Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences" (arXiv 2007.14062), block
/// version of DeepSpeed (sparsity_config.py, <c>BigBirdSparsityConfig</c>). Rules followed: the
/// window covers blocks [r − ⌊w/2⌋, r + ⌊w/2⌋], so an even w covers w + 1 blocks; unidirectional
/// layouts take the lower triangle of (random ∪ window ∪ global) and draw row r's random blocks
/// from blocks 0..r only. Deviation: DeepSpeed's <c>random.sample</c> fails for causal rows with
/// fewer than num_random_blocks candidates (every causal layout with num_random_blocks &gt; 1);
/// here such a row takes all its r + 1 candidates. Random blocks come from
/// <see cref="System.Random"/> seeded with (seed, head layout, numBlocks): reproducible, but not the
/// values of DeepSpeed's Python <c>random</c>.
/// </remarks>
public sealed class BigBirdPattern : BlockLayoutPattern
{
    /// <param name="block">DeepSpeed <c>block</c>: tokens per layout block (DeepSpeed default 16), &gt; 0.</param>
    /// <param name="causal">True = <c>attention="unidirectional"</c>; false = <c>"bidirectional"</c> (DeepSpeed default).</param>
    /// <param name="numRandomBlocks"><c>num_random_blocks</c> (default 1): random key blocks per query block, ≥ 0 and at most the number of blocks.</param>
    /// <param name="numSlidingWindowBlocks"><c>num_sliding_window_blocks</c> (default 3): window width in blocks (±⌊w/2⌋ around the diagonal), &gt; 0 and at most the number of blocks.</param>
    /// <param name="numGlobalBlocks"><c>num_global_blocks</c> (default 1): leading global blocks, ≥ 0 and at most the number of blocks.</param>
    /// <param name="differentLayoutPerHead"><c>different_layout_per_head</c> (default false): true = each head draws its own random blocks.</param>
    /// <param name="seed">Seed of the random blocks (not in DeepSpeed, which uses Python's global <c>random</c>).</param>
    public BigBirdPattern(int block, bool causal, int numRandomBlocks = 1, int numSlidingWindowBlocks = 3,
        int numGlobalBlocks = 1, bool differentLayoutPerHead = false, int seed = 0)
        : base($"bigbird(block={block}, random={numRandomBlocks}, window={numSlidingWindowBlocks}, global={numGlobalBlocks}"
               + Flags(differentLayoutPerHead, causal, numRandomBlocks > 0 ? seed : 0) + ")",
               block, causal, differentLayoutPerHead)
    {
        Check.NonNegative(numRandomBlocks, nameof(numRandomBlocks));
        Check.Positive(numSlidingWindowBlocks, nameof(numSlidingWindowBlocks));
        Check.NonNegative(numGlobalBlocks, nameof(numGlobalBlocks));
        NumRandomBlocks = numRandomBlocks;
        NumSlidingWindowBlocks = numSlidingWindowBlocks;
        NumGlobalBlocks = numGlobalBlocks;
        Seed = seed;
    }

    /// <summary>DeepSpeed <c>num_random_blocks</c>.</summary>
    public int NumRandomBlocks { get; }
    /// <summary>DeepSpeed <c>num_sliding_window_blocks</c>.</summary>
    public int NumSlidingWindowBlocks { get; }
    /// <summary>DeepSpeed <c>num_global_blocks</c>.</summary>
    public int NumGlobalBlocks { get; }
    /// <summary>Seed of the random blocks.</summary>
    public int Seed { get; }

    /// <inheritdoc/>
    public override bool SameForAllHeads => !(DifferentLayoutPerHead && NumRandomBlocks > 0);

    /// <inheritdoc/>
    protected override int LayoutIndex(int head) => SameForAllHeads ? 0 : head;

    /// <inheritdoc/>
    protected override void CheckNumBlocks(int numBlocks, string numBlocksText)
    {
        CheckAtMostBlocks(NumRandomBlocks, "numRandomBlocks", "num_random_blocks", numBlocks, numBlocksText);
        CheckAtMostBlocks(NumSlidingWindowBlocks, "numSlidingWindowBlocks", "num_sliding_window_blocks", numBlocks, numBlocksText);
        CheckAtMostBlocks(NumGlobalBlocks, "numGlobalBlocks", "num_global_blocks", numBlocks, numBlocksText);
    }

    /// <inheritdoc/>
    protected override bool[,] BuildLayout(int layoutIndex, int numBlocks)
    {
        var layout = new bool[numBlocks, numBlocks];
        if (NumRandomBlocks > 0)
        {
            var rng = new Random(MixSeed(Seed, layoutIndex, numBlocks));
            var scratch = new int[numBlocks];
            for (int r = 0; r < numBlocks; r++)
            {
                int population = Causal ? r + 1 : numBlocks;   // causal rows sample only blocks ≤ r
                MarkRandom(layout, r, population, Math.Min(NumRandomBlocks, population), rng, scratch);
            }
        }
        MarkSlidingWindow(layout, NumSlidingWindowBlocks, backOnly: false);
        Fill(layout, 0, NumGlobalBlocks, 0, numBlocks);
        Fill(layout, 0, numBlocks, 0, NumGlobalBlocks);
        if (Causal) LowerTriangle(layout);
        return layout;
    }
}

/// <summary>
/// DeepSpeed's <c>BSLongformerSparsityConfig</c> (block-sparse Longformer): a sliding window of
/// <c>num_sliding_window_blocks</c> blocks centred on the diagonal plus global blocks (or ranges)
/// that attend, and are attended by, every block.
/// </summary>
/// <remarks>
/// Beltagy et al. 2020, "Longformer: The Long-Document Transformer" (arXiv 2004.05150), in
/// DeepSpeed's block version (sparsity_config.py, <c>BSLongformerSparsityConfig</c>). Rules
/// followed: window [r − ⌊w/2⌋, r + ⌊w/2⌋]; global rows and columns at every index (or range) that
/// starts before the last block, ends clipped; unidirectional = the lower triangle of all that.
/// The layout never varies per head (DeepSpeed builds identical per-head layouts).
/// </remarks>
public sealed class LongformerPattern : BlockLayoutPattern
{
    private readonly int[] globalBlockIndices;
    private readonly int[]? globalBlockEndIndices;

    /// <param name="block">DeepSpeed <c>block</c>: tokens per layout block (DeepSpeed default 16), &gt; 0.</param>
    /// <param name="causal">True = <c>attention="unidirectional"</c>; false = <c>"bidirectional"</c> (DeepSpeed default).</param>
    /// <param name="numSlidingWindowBlocks"><c>num_sliding_window_blocks</c> (default 3): window width in blocks (±⌊w/2⌋ around the diagonal), &gt; 0 and at most the number of blocks.</param>
    /// <param name="globalBlockIndices"><c>global_block_indices</c> (default [0]): global blocks, or the starts of global ranges when end indices are given. Each ≥ 0.</param>
    /// <param name="globalBlockEndIndices"><c>global_block_end_indices</c> (default null = unused): exclusive ends of the global ranges; same length as globalBlockIndices, each end &gt; its start.</param>
    /// <param name="differentLayoutPerHead"><c>different_layout_per_head</c> (default false); accepted for parity, the layout is the same in every head.</param>
    public LongformerPattern(int block, bool causal, int numSlidingWindowBlocks = 3, int[]? globalBlockIndices = null,
        int[]? globalBlockEndIndices = null, bool differentLayoutPerHead = false)
        : base($"longformer(block={block}, window={numSlidingWindowBlocks}, global={FormatGlobal(globalBlockIndices ?? [0], globalBlockEndIndices)}"
               + Flags(differentLayoutPerHead, causal) + ")",
               block, causal, differentLayoutPerHead)
    {
        Check.Positive(numSlidingWindowBlocks, nameof(numSlidingWindowBlocks));
        this.globalBlockIndices = (int[])(globalBlockIndices ?? [0]).Clone();
        this.globalBlockEndIndices = (int[]?)globalBlockEndIndices?.Clone();
        CheckGlobalIndices(this.globalBlockIndices, this.globalBlockEndIndices);
        NumSlidingWindowBlocks = numSlidingWindowBlocks;
    }

    /// <summary>DeepSpeed <c>num_sliding_window_blocks</c>.</summary>
    public int NumSlidingWindowBlocks { get; }
    /// <summary>DeepSpeed <c>global_block_indices</c>.</summary>
    public IReadOnlyList<int> GlobalBlockIndices => globalBlockIndices;
    /// <summary>DeepSpeed <c>global_block_end_indices</c> (null = one block per index).</summary>
    public IReadOnlyList<int>? GlobalBlockEndIndices => globalBlockEndIndices;

    /// <inheritdoc/>
    protected override void CheckNumBlocks(int numBlocks, string numBlocksText) =>
        CheckAtMostBlocks(NumSlidingWindowBlocks, "numSlidingWindowBlocks", "num_sliding_window_blocks", numBlocks, numBlocksText);

    /// <inheritdoc/>
    protected override bool[,] BuildLayout(int layoutIndex, int numBlocks)
    {
        var layout = new bool[numBlocks, numBlocks];
        MarkSlidingWindow(layout, NumSlidingWindowBlocks, backOnly: false);
        foreach (var (g0, g1) in GlobalRanges(globalBlockIndices, globalBlockEndIndices, numBlocks))
        {
            Fill(layout, g0, g1, 0, numBlocks);
            Fill(layout, 0, numBlocks, g0, g1);
        }
        if (Causal) LowerTriangle(layout);
        return layout;
    }
}

/// <summary>
/// DeepSpeed's <c>LocalSlidingWindowSparsityConfig</c>: a purely local sliding window. Bidirectional:
/// blocks [r − ⌊w/2⌋, r + ⌊w/2⌋]; causal: blocks [r − ⌊w/2⌋, r] (so w = 3 gives 2 blocks).
/// </summary>
/// <remarks>
/// DeepSpeed sparsity_config.py, <c>LocalSlidingWindowSparsityConfig</c> (whose default attention is
/// unidirectional). It has no per-head variation.
/// </remarks>
public sealed class SlidingWindowPattern : BlockLayoutPattern
{
    /// <param name="block">DeepSpeed <c>block</c>: tokens per layout block (DeepSpeed default 16), &gt; 0.</param>
    /// <param name="causal">True = <c>attention="unidirectional"</c> (DeepSpeed's default here); false = <c>"bidirectional"</c>.</param>
    /// <param name="numSlidingWindowBlocks"><c>num_sliding_window_blocks</c> (default 3): window width in blocks, &gt; 0 and at most the number of blocks.</param>
    public SlidingWindowPattern(int block, bool causal, int numSlidingWindowBlocks = 3)
        : base($"sliding_window(block={block}, window={numSlidingWindowBlocks}{Flags(false, causal)})", block, causal, false)
    {
        Check.Positive(numSlidingWindowBlocks, nameof(numSlidingWindowBlocks));
        NumSlidingWindowBlocks = numSlidingWindowBlocks;
    }

    /// <summary>DeepSpeed <c>num_sliding_window_blocks</c>.</summary>
    public int NumSlidingWindowBlocks { get; }

    /// <inheritdoc/>
    protected override void CheckNumBlocks(int numBlocks, string numBlocksText) =>
        CheckAtMostBlocks(NumSlidingWindowBlocks, "numSlidingWindowBlocks", "num_sliding_window_blocks", numBlocks, numBlocksText);

    /// <inheritdoc/>
    protected override bool[,] BuildLayout(int layoutIndex, int numBlocks)
    {
        var layout = new bool[numBlocks, numBlocks];
        MarkSlidingWindow(layout, NumSlidingWindowBlocks, backOnly: Causal);
        return layout;
    }
}
