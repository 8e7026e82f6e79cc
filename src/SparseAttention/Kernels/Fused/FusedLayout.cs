using System.Runtime.CompilerServices;
using SparseAttention.Patterns;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// What the fused kernels need from a <see cref="BlockMask"/>, built once per mask: partial tiles as
/// additive float biases (0 or −∞, also transposed for the key-major backward pass) and the
/// transposed block index (per key block, the query blocks that visit it).
/// </summary>
internal sealed class FusedLayout
{
    private static readonly ConditionalWeakTable<BlockMask, FusedLayout> Cache = new();

    public static FusedLayout For(BlockMask mask) => Cache.GetValue(mask, m => new FusedLayout(m));

    public readonly int Heads, NumBlocks, BlockSize, SeqLen;
    public readonly int[] RowStart, KeyBlock, TileIndex;          // query-major CSR (from the mask)
    public readonly int[] ColStart, ColQueryBlock, ColEntry;      // key-major CSR: (head, key block) → query blocks
    public readonly float[] TileBias, TileBiasT;                  // per partial tile, [q, k] and [k, q]; pinned

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
