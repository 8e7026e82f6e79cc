using SparseAttention.Patterns;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>Which implementation computes block-sparse attention.</summary>
public enum AttentionKernel
{
    /// <summary><see cref="Fused"/> for float32 CPU tensors when the machine has a hardware-accelerated vector width
    /// (512, 256 or 128 bits: AVX-512, AVX2, SSE or ARM64 NEON), otherwise <see cref="Ops"/>. With no accelerated width
    /// (e.g. <c>DOTNET_EnableHWIntrinsic=0</c>) the fused kernels would run one float at a time, slower than Ops, whose
    /// libtorch code stays vectorised; so Auto never picks a path slower than Ops.</summary>
    Auto,
    /// <summary>C# SIMD kernels (<see cref="FusedBlockSparseAttention"/>; strided patterns by permutation,
    /// <see cref="FusedStridedAttention"/>, when that visits fewer blocks): float32 on CPU only.</summary>
    Fused,
    /// <summary>TorchSharp tensor ops (<see cref="BlockSparseOpsAttention"/>): any device, any float dtype.</summary>
    Ops,
    /// <summary>The dense oracle with the pattern's token-level mask (<see cref="ReferenceAttention"/>): O(T²) memory.</summary>
    Reference,
}

/// <summary>Block-sparse attention over a compiled pattern, dispatching to a kernel.</summary>
public static class BlockSparseAttention
{
    /// <summary>
    /// Attention where query i may attend key j iff <paramref name="mask"/> allows (head, i, j) and
    /// <paramref name="keyMask"/> marks j as real.
    /// </summary>
    /// <param name="q">Queries (B, H, T, D).</param>
    /// <param name="k">Keys (B, H, T, D).</param>
    /// <param name="v">Values (B, H, T, Dv).</param>
    /// <param name="mask">The compiled pattern for (T, block, H).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real key.</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <param name="kernel">Implementation to use.</param>
    /// <param name="relative">Optional terms of the distance j − i (Shaw, ALiBi). <c>Auto</c> and <c>Fused</c> run them with
    /// the fused kernel over far and near parts merged by log-sum-exp (<see cref="FusedRelativeAttention"/>) when the mask
    /// was compiled from a pattern and the term is Shaw or ALiBi; otherwise <c>Auto</c> runs Ops and <c>Fused</c> refuses.</param>
    /// <returns>(B, H, T, Dv).</returns>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask = null,
        double? scale = null, AttentionKernel kernel = AttentionKernel.Auto, RelativePositionTerms? relative = null)
    {
        ArgumentNullException.ThrowIfNull(mask);
        Check.That(relative is null || kernel != AttentionKernel.Fused || FusedRelativeAttention.Handles(mask, relative), nameof(kernel),
            $"the fused block-sparse kernels take only Shaw or ALiBi terms on a mask compiled from a pattern, got {relative?.GetType().Name} on {mask.Name}; use Auto or Ops.");
        switch (kernel)
        {
            case AttentionKernel.Reference:
                Check.That(mask.SeqLen == q.shape[2] && mask.Heads == q.shape[1], nameof(mask),
                    $"was compiled for (T = {mask.SeqLen}, H = {mask.Heads}), q has (T = {q.shape[2]}, H = {q.shape[1]}).");
                using (var dense = mask.ToDense())                                 // (H, T, T)
                using (var onDevice = dense.to(q.device))
                    return ReferenceAttention.Attention(q, k, v, onDevice.unsqueeze(0), keyMask: keyMask, scale: scale, relative: relative);
            case AttentionKernel.Fused when relative is not null:
            case AttentionKernel.Auto when relative is not null && FusedBlockSparseAttention.PreferredFor(q) && FusedRelativeAttention.Handles(mask, relative):
                return FusedRelativeAttention.Attention(q, k, v, mask, keyMask, scale, relative);
            case AttentionKernel.Fused:
            case AttentionKernel.Auto when relative is null && FusedBlockSparseAttention.PreferredFor(q):
                // A strided pattern's strided part touches every key block in this layout; permuted it is a band.
                return FusedStridedAttention.Handles(mask)
                    ? FusedStridedAttention.Attention(q, k, v, mask, keyMask, scale)
                    : FusedBlockSparseAttention.Attention(q, k, v, mask, keyMask, scale);
            case AttentionKernel.Auto:
            case AttentionKernel.Ops:
                return BlockSparseOpsAttention.Attention(q, k, v, mask, keyMask, scale, relative);
            default:
                throw new ArgumentException($"kernel: unknown value {kernel}.", nameof(kernel));
        }
    }
}
