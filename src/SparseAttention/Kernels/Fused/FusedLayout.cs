using System.Runtime.CompilerServices;
using SparseAttention.Patterns;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// What the fused kernels need from a <see cref="BlockMask"/>, built once per mask: partial tiles as
/// additive float biases (0 or −∞, also transposed for the key-major backward pass) and the
/// transposed block index (per key block, the query blocks that visit it), and compacted entries:
/// a partial tile whose allowed pairs fall in at most half of its key columns (e.g. the summary
/// columns of the fixed pattern) is computed over those columns only.
/// </summary>
internal sealed class FusedLayout
{
    private static readonly ConditionalWeakTable<BlockMask, FusedLayout> Cache = new();

    public static FusedLayout For(BlockMask mask) => Cache.GetValue(mask, m => new FusedLayout(m));

    public readonly int Heads, NumBlocks, BlockSize, SeqLen;
    public readonly int[] RowStart, KeyBlock, TileIndex;          // query-major CSR (from the mask)
    public readonly int[] ColStart, ColQueryBlock, ColEntry;      // key-major CSR: (head, key block) → query blocks
    public readonly float[] TileBias, TileBiasT;                  // per partial tile, [q, k] and [k, q]; pinned
    public readonly int[] ActiveStart, ActiveCount, CompactTile;  // per entry; ActiveStart −1 = not compacted
    public readonly int[] ActiveColumns;                          // key columns (within the block) of compacted entries
    public readonly float[] CompactBias, CompactBiasT;            // per compacted entry, [q, active j] and [active j, q]

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

        // Compaction: keep only the key columns that some query of the tile may attend.
        ActiveStart = new int[KeyBlock.Length];
        ActiveCount = new int[KeyBlock.Length];
        CompactTile = new int[KeyBlock.Length];
        var columns = new List<int>();
        var compacted = new List<int>();
        for (int e = 0; e < KeyBlock.Length; e++)
        {
            ActiveStart[e] = -1;
            int t = TileIndex[e];
            if (t < 0) continue;
            var used = new List<int>();
            for (int j = 0; j < b; j++)
                for (int i = 0; i < b; i++)
                    if (tiles[(long)t * tile + i * b + j]) { used.Add(j); break; }
            if (used.Count > b / 2) continue;
            ActiveStart[e] = columns.Count;
            ActiveCount[e] = used.Count;
            CompactTile[e] = compacted.Count;
            columns.AddRange(used);
            compacted.Add(e);
        }
        ActiveColumns = GC.AllocateArray<int>(Math.Max(1, columns.Count), pinned: true);
        columns.CopyTo(ActiveColumns);
        CompactBias = GC.AllocateArray<float>(Math.Max(1, compacted.Count * tile), pinned: true);
        CompactBiasT = GC.AllocateArray<float>(Math.Max(1, compacted.Count * tile), pinned: true);
        for (int c = 0; c < compacted.Count; c++)
        {
            int e = compacted[c], t = TileIndex[e];
            for (int jj = 0; jj < ActiveCount[e]; jj++)
            {
                int j = ActiveColumns[ActiveStart[e] + jj];
                for (int i = 0; i < b; i++)
                {
                    float bias = TileBias[(long)t * tile + i * b + j];
                    CompactBias[(long)c * tile + i * b + jj] = bias;
                    CompactBiasT[(long)c * tile + jj * b + i] = bias;
                }
            }
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
