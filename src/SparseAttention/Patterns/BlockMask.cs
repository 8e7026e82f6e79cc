using System.Text;
using static TorchSharp.torch;

namespace SparseAttention.Patterns;

/// <summary>
/// A pattern compiled for one (sequence length, block size, heads): per head and query block, the
/// key blocks visited and, for those only partly allowed, the exact token-level tile. Keys past the
/// end of the sequence (padding of the last block) are never allowed, so a last key block that is
/// cut short is always partial. Immutable; safe to share between threads and calls.
/// </summary>
public sealed class BlockMask
{
    private readonly int[] rowStart;   // (Heads·NumBlocks + 1): entries of (head, query block) are rowStart[r]..rowStart[r+1]
    private readonly int[] keyBlock;   // per entry: the visited key block
    private readonly int[] tileIndex;  // per entry: -1 = fully allowed, else the index of its tile
    private readonly bool[] tiles;     // per partial entry: BlockSize × BlockSize, [query in block, key in block]

    private BlockMask(string name, bool isCausal, int seqLen, int blockSize, int heads,
        int[] rowStart, int[] keyBlock, int[] tileIndex, bool[] tiles)
    {
        Name = name; IsCausal = isCausal; SeqLen = seqLen; BlockSize = blockSize; Heads = heads;
        this.rowStart = rowStart; this.keyBlock = keyBlock; this.tileIndex = tileIndex; this.tiles = tiles;
    }

    // Raw compiled data for kernels in this assembly (read-only by convention).
    internal int[] RowStart => rowStart;
    internal int[] KeyBlockOfEntry => keyBlock;
    internal int[] TileOfEntry => tileIndex;
    internal bool[] Tiles => tiles;
    /// <summary>The pattern this mask was compiled from (lets kernels recognise a structure they run faster).</summary>
    internal AttentionPattern? Pattern { get; private init; }

    public string Name { get; }
    public bool IsCausal { get; }
    public int SeqLen { get; }
    public int BlockSize { get; }
    public int Heads { get; }
    /// <summary>Query blocks = key blocks = ⌈SeqLen / BlockSize⌉.</summary>
    public int NumBlocks => (SeqLen + BlockSize - 1) / BlockSize;
    /// <summary>Sequence length padded up to a multiple of the block size.</summary>
    public int PaddedLength => NumBlocks * BlockSize;
    /// <summary>Number of (head, query block, key block) entries visited.</summary>
    public int VisitedBlocks => keyBlock.Length;
    /// <summary>The most key blocks any (head, query block) visits.</summary>
    public int MaxKeyBlocksPerRow { get; private set; }
    /// <summary>Fraction of the (head, query block, key block) grid visited — the compute a block kernel does.</summary>
    public double BlockDensity => (double)VisitedBlocks / ((long)Heads * NumBlocks * NumBlocks);
    /// <summary>Fraction of (head, query, key) token pairs that are allowed.</summary>
    public double Density { get; private set; }
    /// <summary>1 − <see cref="Density"/>: the fraction of token pairs that are not attended.</summary>
    public double Sparsity => 1 - Density;

    /// <summary>Key blocks visited by (head, query block), in increasing order.</summary>
    public ReadOnlySpan<int> KeyBlocks(int head, int queryBlock)
    {
        int r = head * NumBlocks + queryBlock;
        return keyBlock.AsSpan(rowStart[r], rowStart[r + 1] - rowStart[r]);
    }

    /// <summary>Is the i-th visited key block of (head, query block) only partly allowed?</summary>
    public bool IsPartial(int head, int queryBlock, int i) => tileIndex[rowStart[head * NumBlocks + queryBlock] + i] >= 0;

    /// <summary>Token-level answer read from the compiled data (not from the pattern).</summary>
    public bool Allows(int head, int query, int key)
    {
        if ((uint)query >= SeqLen || (uint)key >= SeqLen) return false;
        int qb = query / BlockSize, kb = key / BlockSize;
        int r = head * NumBlocks + qb;
        for (int e = rowStart[r]; e < rowStart[r + 1]; e++)
        {
            if (keyBlock[e] != kb) continue;
            int t = tileIndex[e];
            return t < 0 || tiles[(long)t * BlockSize * BlockSize + (query % BlockSize) * BlockSize + key % BlockSize];
        }
        return false;
    }

    /// <summary>
    /// Compiles <paramref name="pattern"/> for a sequence of <paramref name="seqLen"/> tokens cut into
    /// blocks of <paramref name="blockSize"/> (the last block may be short), for <paramref name="heads"/> heads.
    /// </summary>
    public static BlockMask Compile(AttentionPattern pattern, int seqLen, int blockSize, int heads)
    {
        ArgumentNullException.ThrowIfNull(pattern);
        Check.Positive(seqLen, nameof(seqLen));
        Check.Positive(blockSize, nameof(blockSize));
        Check.Positive(heads, nameof(heads));
        pattern.Validate(seqLen, heads);

        int numBlocks = (seqLen + blockSize - 1) / blockSize;
        int tile = blockSize * blockSize;
        var rowStart = new int[heads * numBlocks + 1];
        var keyBlock = new List<int>();
        var tileIndex = new List<int>();
        var tiles = new List<bool[]>();
        // Identical tiles are stored once (e.g. every summary-column tile of the fixed pattern).
        var tileIds = new Dictionary<bool[], int>(TileContentComparer.Instance);
        long allowedPairs = 0;
        int maxPerRow = 0;
        int compiledHeads = pattern.SameForAllHeads ? 1 : heads;

        for (int h = 0; h < compiledHeads; h++)
        {
            for (int qb = 0; qb < numBlocks; qb++)
            {
                rowStart[h * numBlocks + qb] = keyBlock.Count;
                int q0 = qb * blockSize, q1 = Math.Min(q0 + blockSize, seqLen);
                foreach (int kb in pattern.CandidateKeyBlocks(h, qb, blockSize, seqLen).Distinct().Order())
                {
                    if (kb < 0 || kb >= numBlocks) continue;
                    int k0 = kb * blockSize, k1 = Math.Min(k0 + blockSize, seqLen);
                    var t = new bool[tile];
                    int count = 0;
                    for (int i = q0; i < q1; i++)
                        for (int j = k0; j < k1; j++)
                            if (pattern.Allows(h, i, j, seqLen)) { t[(i - q0) * blockSize + (j - k0)] = true; count++; }
                    if (count == 0) continue;
                    allowedPairs += count;
                    keyBlock.Add(kb);
                    // Full only when every real (query, key) pair is allowed and no key is padding.
                    bool full = count == (q1 - q0) * blockSize;
                    if (full) { tileIndex.Add(-1); continue; }
                    if (!tileIds.TryGetValue(t, out int id))
                    {
                        id = tiles.Count;
                        tiles.Add(t);
                        tileIds.Add(t, id);
                    }
                    tileIndex.Add(id);
                }
                maxPerRow = Math.Max(maxPerRow, keyBlock.Count - rowStart[h * numBlocks + qb]);
            }
        }
        int perHeadEntries = keyBlock.Count;
        if (compiledHeads == 1 && heads > 1)
        {
            // Same pattern in every head: repeat head 0's rows (tiles are shared, not copied).
            int[] kb0 = keyBlock.ToArray(), ti0 = tileIndex.ToArray();
            for (int h = 1; h < heads; h++)
            {
                for (int qb = 0; qb < numBlocks; qb++) rowStart[h * numBlocks + qb] = rowStart[qb] + h * perHeadEntries;
                keyBlock.AddRange(kb0);
                tileIndex.AddRange(ti0);
            }
            allowedPairs *= heads;
        }
        rowStart[heads * numBlocks] = keyBlock.Count;

        var flatTiles = new bool[(long)tiles.Count * tile];
        for (int i = 0; i < tiles.Count; i++) Array.Copy(tiles[i], 0, flatTiles, (long)i * tile, tile);
        return new BlockMask(pattern.Name, pattern.IsCausal, seqLen, blockSize, heads,
            rowStart, keyBlock.ToArray(), tileIndex.ToArray(), flatTiles)
        {
            MaxKeyBlocksPerRow = maxPerRow,
            Pattern = pattern,
            Density = allowedPairs / ((double)heads * seqLen * seqLen),
        };
    }

    private sealed class TileContentComparer : IEqualityComparer<bool[]>
    {
        public static readonly TileContentComparer Instance = new();
        public bool Equals(bool[]? a, bool[]? b) => a.AsSpan().SequenceEqual(b);
        public int GetHashCode(bool[] tile)
        {
            var hash = new HashCode();
            hash.AddBytes(System.Runtime.InteropServices.MemoryMarshal.AsBytes(tile.AsSpan()));
            return hash.ToHashCode();
        }
    }

    /// <summary>The token-level mask, shape (Heads, SeqLen, SeqLen), true = may attend.</summary>
    public Tensor ToDense()
    {
        var dense = new bool[(long)Heads * SeqLen * SeqLen];
        for (int h = 0; h < Heads; h++)
            for (int qb = 0; qb < NumBlocks; qb++)
            {
                int r = h * NumBlocks + qb;
                int q0 = qb * BlockSize, q1 = Math.Min(q0 + BlockSize, SeqLen);
                for (int e = rowStart[r]; e < rowStart[r + 1]; e++)
                {
                    int k0 = keyBlock[e] * BlockSize, k1 = Math.Min(k0 + BlockSize, SeqLen);
                    long tileBase = (long)tileIndex[e] * BlockSize * BlockSize;
                    for (int i = q0; i < q1; i++)
                        for (int j = k0; j < k1; j++)
                            dense[((long)h * SeqLen + i) * SeqLen + j] =
                                tileIndex[e] < 0 || tiles[tileBase + (i - q0) * BlockSize + (j - k0)];
                }
            }
        return tensor(dense, new long[] { Heads, SeqLen, SeqLen });
    }

    /// <summary>Block layout of one head: [query block, key block] = visited.</summary>
    public bool[,] Layout(int head)
    {
        var layout = new bool[NumBlocks, NumBlocks];
        for (int qb = 0; qb < NumBlocks; qb++)
            foreach (int kb in KeyBlocks(head, qb)) layout[qb, kb] = true;
        return layout;
    }

    /// <summary>
    /// ASCII drawing of each head's block layout: '█' fully allowed block, '▒' partly allowed,
    /// '·' not visited. Rows are query blocks, columns key blocks.
    /// </summary>
    public string ToAscii(int maxHeads = int.MaxValue)
    {
        var sb = new StringBuilder();
        sb.AppendLine($"{Name}: seq_len={SeqLen} block={BlockSize} heads={Heads} sparsity={Sparsity:F3} visited blocks={BlockDensity:P1}");
        for (int h = 0; h < Math.Min(Heads, maxHeads); h++)
        {
            if (h > 0 && SameHeadAs(h, h - 1)) { sb.AppendLine($"head {h}: same as head {h - 1}"); continue; }
            sb.AppendLine($"head {h}:");
            for (int qb = 0; qb < NumBlocks; qb++)
            {
                var row = new char[NumBlocks];
                Array.Fill(row, '·');
                var kbs = KeyBlocks(h, qb);
                for (int i = 0; i < kbs.Length; i++) row[kbs[i]] = IsPartial(h, qb, i) ? '▒' : '█';
                sb.Append("  ").AppendLine(new string(row));
            }
        }
        if (maxHeads < Heads) sb.AppendLine($"({Heads - maxHeads} more heads not drawn)");
        return sb.ToString();
    }

    private bool SameHeadAs(int h, int other)
    {
        for (int qb = 0; qb < NumBlocks; qb++)
        {
            var a = KeyBlocks(h, qb); var b = KeyBlocks(other, qb);
            if (!a.SequenceEqual(b)) return false;
            for (int i = 0; i < a.Length; i++)
            {
                int ta = tileIndex[rowStart[h * NumBlocks + qb] + i], tb = tileIndex[rowStart[other * NumBlocks + qb] + i];
                if ((ta < 0) != (tb < 0)) return false;
                if (ta >= 0 && ta != tb && !tiles.AsSpan((int)((long)ta * BlockSize * BlockSize), BlockSize * BlockSize)
                        .SequenceEqual(tiles.AsSpan((int)((long)tb * BlockSize * BlockSize), BlockSize * BlockSize))) return false;
            }
        }
        return true;
    }

    /// <summary>
    /// Index data for gather-style kernels, every row padded to <see cref="MaxKeyBlocksPerRow"/> slots:
    /// key block per slot (H, NumBlocks, K) as int64 (padding slots point at block 0) and the token
    /// mask per slot (H, NumBlocks, K, BlockSize, BlockSize), false for padding slots and padding keys.
    /// </summary>
    public (Tensor KeyBlockIndex, Tensor SlotMask) ToGatherIndex()
    {
        lock (gatherLock)
        {
            // Built once per mask and kept outside any dispose scope: a BlockMask is reused across calls.
            gatherIndex ??= BuildGatherIndex();
            return gatherIndex.Value;
        }
    }

    private readonly object gatherLock = new();
    private (Tensor, Tensor)? gatherIndex;

    private (Tensor, Tensor) BuildGatherIndex()
    {
        int k = Math.Max(1, MaxKeyBlocksPerRow), b = BlockSize, tile = b * b;
        var index = new long[(long)Heads * NumBlocks * k];
        var mask = new bool[(long)Heads * NumBlocks * k * tile];
        for (int r = 0; r < Heads * NumBlocks; r++)
            for (int e = rowStart[r]; e < rowStart[r + 1]; e++)
            {
                long slot = (long)r * k + (e - rowStart[r]);
                index[slot] = keyBlock[e];
                if (tileIndex[e] < 0) Array.Fill(mask, true, (int)(slot * tile), tile);
                else Array.Copy(tiles, (long)tileIndex[e] * tile, mask, slot * tile, tile);
            }
        return (tensor(index, new long[] { Heads, NumBlocks, k }).DetachFromDisposeScope(),
                tensor(mask, new long[] { Heads, NumBlocks, k, b, b }).DetachFromDisposeScope());
    }
}
