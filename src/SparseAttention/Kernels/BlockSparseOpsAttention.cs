using SparseAttention.Patterns;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Block-sparse attention for any <see cref="BlockMask"/> with TorchSharp tensor ops only: gather the
/// key/value blocks each query block visits, attend inside that small window, write back. Runs on
/// any device and dtype, gradients come from autograd. Memory is O(B·H·T·K·block) for K visited
/// blocks per query block — linear in T for sparse patterns.
/// </summary>
public static class BlockSparseOpsAttention
{
    /// <summary>Argument checks shared by every block-sparse kernel.</summary>
    internal static void CheckArguments(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask)
    {
        ArgumentNullException.ThrowIfNull(mask);
        Check.QueryKeyValue(q, k, v);
        long seqLen = q.shape[2];
        Check.That(k.shape[2] == seqLen, nameof(k), $"block-sparse attention is self-attention: k must have T = {seqLen} like q, got {k.shape[2]}.");
        Check.That(mask.SeqLen == seqLen, nameof(mask), $"was compiled for seq_len {mask.SeqLen}, but q has T = {seqLen}.");
        Check.That(mask.Heads == q.shape[1], nameof(mask), $"was compiled for {mask.Heads} heads, but q has H = {q.shape[1]}.");
        Check.KeyMask(keyMask, q.shape[0], seqLen);
    }

    /// <param name="q">Queries (B, H, T, D).</param>
    /// <param name="k">Keys (B, H, T, D).</param>
    /// <param name="v">Values (B, H, T, Dv).</param>
    /// <param name="mask">The compiled pattern; its SeqLen must be T and its Heads H.</param>
    /// <param name="keyMask">Optional (B, T) bool; true = a real key, false = padding (never attended).</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <param name="relative">Optional terms of the distance j − i, evaluated on the visited pairs only.</param>
    /// <returns>(B, H, T, Dv); a query with no allowed key gets zeros.</returns>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask = null, double? scale = null,
        RelativePositionTerms? relative = null)
    {
        CheckArguments(q, k, v, mask, keyMask);
        relative?.CheckFits(q.shape[1], q.shape[3], v.shape[3], nameof(relative));
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dim = q.shape[3], dimV = v.shape[3];

        using var scope = NewDisposeScope();
        int nb = mask.NumBlocks, b = mask.BlockSize, slots = Math.Max(1, mask.MaxKeyBlocksPerRow);
        long padded = mask.PaddedLength, pad = padded - seqLen;
        if (keyMask is not null)
        {
            var drop = keyMask.logical_not().view(batch, 1, seqLen, 1);            // (B, 1, T, 1)
            k = k.masked_fill(drop, 0);                                            // NaN in padding must not leak via 0·x
            v = v.masked_fill(drop, 0);
        }
        if (pad > 0)
        {
            q = nn.functional.pad(q, [0, 0, 0, pad]);                              // (B, H, Tp, D)
            k = nn.functional.pad(k, [0, 0, 0, pad]);
            v = nn.functional.pad(v, [0, 0, 0, pad]);
        }
        var (blockIndex, slotMask) = mask.ToGatherIndex();
        blockIndex = blockIndex.to(q.device);                                      // (H, nb, K)
        slotMask = slotMask.to(q.device);                                          // (H, nb, K, b, b)

        var keyIdx = blockIndex.view(1, heads, nb * slots, 1, 1).expand(batch, heads, nb * slots, b, dim);
        var kg = k.view(batch, heads, nb, b, dim).gather(2, keyIdx)                // (B, H, nb·K, b, D)
                  .view(batch, heads, nb, slots * b, dim);                         // (B, H, nb, K·b, D)
        var valIdx = dimV == dim ? keyIdx : blockIndex.view(1, heads, nb * slots, 1, 1).expand(batch, heads, nb * slots, b, dimV);
        var vg = v.view(batch, heads, nb, b, dimV).gather(2, valIdx)
                  .view(batch, heads, nb, slots * b, dimV);                        // (B, H, nb, K·b, Dv)

        var allowed = slotMask.permute(0, 1, 3, 2, 4)                              // (H, nb, b, K, b)
                              .reshape(1, heads, nb, b, slots * b);                // (1, H, nb, b, K·b)
        if (keyMask is not null)
        {
            var km = nn.functional.pad(keyMask, [0, pad], value: 0).view(batch, nb, b);   // (B, nb, b)
            var kmg = km.index_select(1, blockIndex.flatten())                     // (B, H·nb·K, b)
                        .view(batch, heads, nb, 1, slots * b);                     // (B, H, nb, 1, K·b)
            allowed = allowed.logical_and(kmg);                                    // (B, H, nb, b, K·b)
        }
        double s = scale ?? 1.0 / Math.Sqrt(dim);
        var qb = q.view(batch, heads, nb, b, dim);                                 // (B, H, nb, b, D)
        var scores = matmul(qb, kg.transpose(-1, -2)) * s;                         // (B, H, nb, b, K·b)
        Tensor? distance = null;
        if (relative is not null)
        {
            var keyPos = (blockIndex.unsqueeze(-1) * b + arange(b, device: q.device))   // (H, nb, K, b)
                         .view(1, heads, nb, 1, slots * b);                        // (1, H, nb, 1, K·b)
            var queryPos = arange(padded, device: q.device).view(1, 1, nb, b, 1);  // (1, 1, nb, b, 1)
            distance = keyPos - queryPos;                                          // (1, H, nb, b, K·b): j − i
            scores = relative.AddToScores(scores, qb, distance, s);
        }
        var probs = ReferenceAttention.MaskedSoftmax(scores, allowed);
        var blocks = matmul(probs, vg);                                            // (B, H, nb, b, Dv)
        if (relative is not null) blocks = relative.AddToOutput(blocks, probs, distance!);
        var output = blocks.view(batch, heads, padded, dimV);                      // (B, H, Tp, Dv)
        if (pad > 0) output = output.narrow(2, 0, seqLen);                         // (B, H, T, Dv)
        return output.MoveToOuterDisposeScope();
    }
}
