using System.Runtime.CompilerServices;
using SparseAttention.Patterns;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// What the fused kernels need from a <see cref="BlockMask"/>, built once per mask: partial tiles as
/// additive float biases (0 or −∞, query-major and transposed), or, for band tiles (allowed ⇔
/// lo ≤ key − query ≤ hi, e.g. the causal diagonal), just the band, which the kernels apply inline;
/// per tile, a fully masked quadrant (queries before h, keys from h) that the kernels skip; the
/// transposed block index (per key block, the query blocks that visit it); and compacted entries:
/// a partial tile whose allowed pairs fall in at most half of its key columns (e.g. the summary
/// columns of the fixed pattern) is computed over those columns only.
/// </summary>
internal sealed class FusedLayout
{
    private static readonly ConditionalWeakTable<BlockMask, FusedLayout> Cache = new();

    /// <summary>Compacted tiles keep a multiple of this many columns (one 512-bit vector of floats).</summary>
    private const int CompactGranule = 16;

    public static FusedLayout For(BlockMask mask) => Cache.GetValue(mask, m => new FusedLayout(m));

    public readonly int Heads, NumBlocks, BlockSize, SeqLen;
    public readonly int[] RowStart, KeyBlock, TileIndex;          // query-major CSR (from the mask)
    public readonly int[] ColStart, ColQueryBlock, ColEntry;      // key-major CSR: (head, key block) → query blocks
    public readonly float[] TileBias, TileBiasT;                  // per partial tile, [q, k] and [k, q]; pinned
    public readonly int[] ActiveStart, ActiveCount, CompactTile;  // per distinct tile; ActiveStart −1 = not compacted
    public readonly int[] ActiveColumns;                          // key columns (within the block) of compacted entries
    public readonly float[] CompactBias, CompactBiasT;            // per compacted tile, [q, active j] and [active j, q]
    public readonly bool HasCompacted;
    public readonly bool[] IsBand;                                // per tile: allowed ⇔ BandLo ≤ key − query ≤ BandHi
    public readonly int[] BandLo, BandHi;                         //   (in-tile indices, over every region an entry reads)
    public readonly int[] Split;                                  // per tile: h > 0 when no pair (query < h, key ≥ h) is allowed

    private FusedLayout(BlockMask mask)
    {
        Heads = mask.Heads; NumBlocks = mask.NumBlocks; BlockSize = mask.BlockSize; SeqLen = mask.SeqLen;
        RowStart = mask.RowStart; KeyBlock = mask.KeyBlockOfEntry; TileIndex = mask.TileOfEntry;
        int b = BlockSize, tile = b * b;
        bool[] tiles = mask.Tiles;
        int tileCount = tiles.Length / tile;
        TileBias = GC.AllocateUninitializedArray<float>(tiles.Length, pinned: true);
        TileBiasT = GC.AllocateUninitializedArray<float>(tiles.Length, pinned: true);
        for (int t = 0; t < tileCount; t++)
            for (int i = 0; i < b; i++)
                for (int j = 0; j < b; j++)
                {
                    float bias = tiles[(long)t * tile + i * b + j] ? 0f : float.NegativeInfinity;
                    TileBias[(long)t * tile + i * b + j] = bias;
                    TileBiasT[(long)t * tile + j * b + i] = bias;
                }

        // Compaction, per distinct tile: keep only the key columns that some query of the tile may attend.
        ActiveStart = new int[tileCount];
        ActiveCount = new int[tileCount];
        CompactTile = new int[tileCount];
        var columns = new List<int>();
        var compacted = new List<int>();
        var realCount = new List<int>();
        for (int t = 0; t < tileCount; t++)
        {
            ActiveStart[t] = -1;
            var used = new List<int>();
            for (int j = 0; j < b; j++)
                for (int i = 0; i < b; i++)
                    if (tiles[(long)t * tile + i * b + j]) { used.Add(j); break; }
            int realColumns = used.Count;
            // Pad to a whole number of 512-bit vectors (a narrow tile would run the GEMM's scalar tail) by
            // repeating a real column with bias −∞: zero weight, and its key row exists even when the
            // tile is used for a last block cut short by the sequence end.
            int padded = Math.Min(b, (used.Count + CompactGranule - 1) / CompactGranule * CompactGranule);
            if (padded >= b) continue;
            while (used.Count < padded) used.Add(used[0]);
            ActiveStart[t] = columns.Count;
            ActiveCount[t] = used.Count;
            CompactTile[t] = compacted.Count;
            columns.AddRange(used);
            compacted.Add(t);
            realCount.Add(realColumns);
        }
        HasCompacted = compacted.Count > 0;
        ActiveColumns = GC.AllocateArray<int>(Math.Max(1, columns.Count), pinned: true);
        columns.CopyTo(ActiveColumns);
        CompactBias = GC.AllocateArray<float>(Math.Max(1, compacted.Count * tile), pinned: true);
        CompactBiasT = GC.AllocateArray<float>(Math.Max(1, compacted.Count * tile), pinned: true);
        for (int c = 0; c < compacted.Count; c++)
        {
            int t = compacted[c];
            for (int jj = 0; jj < ActiveCount[t]; jj++)
            {
                int j = ActiveColumns[ActiveStart[t] + jj];
                bool padding = jj >= realCount[c];
                for (int i = 0; i < b; i++)
                {
                    float bias = padding ? float.NegativeInfinity : TileBias[(long)t * tile + i * b + j];
                    CompactBias[(long)c * tile + i * b + jj] = bias;
                    CompactBiasT[(long)c * tile + jj * b + i] = bias;
                }
            }
        }

        // Band tiles and skippable quadrants, judged on the largest region any entry reads from each tile
        // (a tile at the sequence end is cut short; outside its real rows and columns it is all false).
        var usedRows = new int[tileCount];
        var usedCols = new int[tileCount];
        for (int h = 0; h < Heads; h++)
            for (int qb = 0; qb < NumBlocks; qb++)
                for (int e = RowStart[h * NumBlocks + qb]; e < RowStart[h * NumBlocks + qb + 1]; e++)
                {
                    int t = TileIndex[e];
                    if (t < 0) continue;
                    usedRows[t] = Math.Max(usedRows[t], Math.Min(b, SeqLen - qb * b));
                    usedCols[t] = Math.Max(usedCols[t], Math.Min(b, SeqLen - KeyBlock[e] * b));
                }
        IsBand = new bool[tileCount];
        BandLo = new int[tileCount];
        BandHi = new int[tileCount];
        Split = new int[tileCount];
        // Vector-aligned half of the block; tiles narrower than two vectors are not split.
        int half = b / 2 / CompactGranule * CompactGranule;
        for (int t = 0; t < tileCount; t++)
        {
            var allowed = new ReadOnlySpan<bool>(tiles, t * tile, tile);
            int lo = int.MaxValue, hi = int.MinValue;
            for (int i = 0; i < usedRows[t]; i++)
                for (int j = 0; j < usedCols[t]; j++)
                    if (allowed[i * b + j]) { lo = Math.Min(lo, j - i); hi = Math.Max(hi, j - i); }
            bool band = lo <= hi;
            for (int i = 0; i < usedRows[t] && band; i++)
                for (int j = 0; j < usedCols[t] && band; j++)
                    band = allowed[i * b + j] == (j - i >= lo && j - i <= hi);
            (IsBand[t], BandLo[t], BandHi[t]) = (band, lo, hi);
            bool quadrantEmpty = half > 0;
            for (int i = 0; i < half && quadrantEmpty; i++)
                quadrantEmpty = allowed.Slice(i * b + half, b - half).IndexOf(true) < 0;
            Split[t] = quadrantEmpty ? half : 0;
        }

        // Counting sort of entries by (head, key block); query blocks stay in increasing order.
        int rows = Heads * NumBlocks;
        ColStart = new int[rows + 1];
        for (int h = 0; h < Heads; h++)
            for (int qb = 0; qb < NumBlocks; qb++)
                for (int e = RowStart[h * NumBlocks + qb]; e < RowStart[h * NumBlocks + qb + 1]; e++)
                    ColStart[h * NumBlocks + KeyBlock[e] + 1]++;
        for (int r = 0; r < rows; r++) ColStart[r + 1] += ColStart[r];
        var fill = (int[])ColStart.Clone();
        ColQueryBlock = new int[KeyBlock.Length];
        ColEntry = new int[KeyBlock.Length];
        for (int h = 0; h < Heads; h++)
            for (int qb = 0; qb < NumBlocks; qb++)
                for (int e = RowStart[h * NumBlocks + qb]; e < RowStart[h * NumBlocks + qb + 1]; e++)
                {
                    int slot = fill[h * NumBlocks + KeyBlock[e]]++;
                    ColQueryBlock[slot] = qb;
                    ColEntry[slot] = e;
                }
    }
}
