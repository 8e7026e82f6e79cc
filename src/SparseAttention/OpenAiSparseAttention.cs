using SparseAttention.Kernels;
using SparseAttention.Patterns;
using static TorchSharp.torch;

namespace SparseAttention;

/// <summary>The attention modes of OpenAI's sparse_attention reference code. All are causal.</summary>
public enum AttnMode
{
    /// <summary><c>"all"</c>: dense causal attention, key ≤ query.</summary>
    All,
    /// <summary><c>"local"</c>: key ∈ [query − local_attn_ctx + 1, query].</summary>
    Local,
    /// <summary><c>"strided"</c>: key ≤ query and (query − key) mod local_attn_ctx = 0.</summary>
    Strided,
    /// <summary><c>"fixed"</c> (block-sparse only): same block of local_attn_ctx, or one of the summary cells
    /// (the last vertsize positions of each block, shifted by (head mod num_verts)·vertsize).</summary>
    Fixed,
}

/// <summary>
/// Functional API in the vocabulary of OpenAI's sparse attention (Child et al. 2019,
/// github.com/openai/sparse_attention) for porting code written against it: inputs are
/// (B, T, E) with all heads packed in E; heads are split, attended with the mode's pattern, merged.
/// </summary>
public static class OpenAiSparseAttention
{
    /// <summary>
    /// Counterpart of <c>attention_impl(q, k, v, heads, attn_mode, local_attn_ctx)</c>: dense
    /// masked attention (the mask built for the whole T × T square).
    /// </summary>
    /// <param name="q">Queries (B, T, E); E must be divisible by <paramref name="heads"/>.</param>
    /// <param name="k">Keys (B, T, E).</param>
    /// <param name="v">Values (B, T, E).</param>
    /// <param name="heads">Number of heads E is split into.</param>
    /// <param name="attnMode">All, Local or Strided (Fixed needs <see cref="BlocksparseAttentionImpl"/>).</param>
    /// <param name="localAttnCtx">Band width (Local) or stride (Strided); ignored for All.</param>
    /// <returns>(B, T, E).</returns>
    public static Tensor AttentionImpl(Tensor q, Tensor k, Tensor v, int heads, AttnMode attnMode, int localAttnCtx = 0)
    {
        Check.That(attnMode != AttnMode.Fixed, nameof(attnMode), "Fixed is only defined for BlocksparseAttentionImpl (it needs num_verts and vertsize).");
        var pattern = PatternFor(attnMode, localAttnCtx, 0, 0);
        return Run(q, k, v, heads, pattern, blockSize: null);
    }

    /// <summary>
    /// Counterpart of <c>blocksparse_attention_impl(q, k, v, heads, attn_mode, local_attn_ctx,
    /// blocksize, num_verts, vertsize)</c>: the same patterns computed block-sparsely (the
    /// <see cref="AttentionKernel.Auto"/> kernel), so memory stays linear in T for sparse modes.
    /// Unlike OpenAI's kernels, T need not be a multiple of <paramref name="blocksize"/>.
    /// </summary>
    /// <param name="q">Queries (B, T, E).</param>
    /// <param name="k">Keys (B, T, E).</param>
    /// <param name="v">Values (B, T, E).</param>
    /// <param name="heads">Number of heads E is split into.</param>
    /// <param name="attnMode">All, Local, Strided or Fixed.</param>
    /// <param name="localAttnCtx">Band width (Local) or stride (Strided, Fixed).</param>
    /// <param name="blocksize">Block size of the block-sparse computation.</param>
    /// <param name="numVerts">Fixed: number of different summary offsets cycled over heads.</param>
    /// <param name="vertsize">Fixed: summary cells per block.</param>
    /// <returns>(B, T, E).</returns>
    public static Tensor BlocksparseAttentionImpl(Tensor q, Tensor k, Tensor v, int heads, AttnMode attnMode,
        int localAttnCtx = 0, int blocksize = 32, int numVerts = 1, int vertsize = 1)
    {
        Check.Positive(blocksize, nameof(blocksize));
        var pattern = PatternFor(attnMode, localAttnCtx, numVerts, vertsize);
        return Run(q, k, v, heads, pattern, blocksize);
    }

    private static AttentionPattern PatternFor(AttnMode mode, int localAttnCtx, int numVerts, int vertsize)
    {
        if (mode != AttnMode.All) Check.Positive(localAttnCtx, nameof(localAttnCtx));
        return mode switch
        {
            AttnMode.All => new DensePattern(causal: true),
            AttnMode.Local => new LocalBandPattern(localAttnCtx, causal: true),
            AttnMode.Strided => new StridedPattern(localAttnCtx, causal: true, FactorizedCombine.Interleaved, layer: 1),
            AttnMode.Fixed => new FixedPattern(localAttnCtx, vertsize, numVerts, causal: true),
            _ => throw new ArgumentException($"attnMode: unknown value {mode}.", nameof(mode)),
        };
    }

    private static Tensor Run(Tensor q, Tensor k, Tensor v, int heads, AttentionPattern pattern, int? blockSize)
    {
        Check.Positive(heads, nameof(heads));
        Check.Shape(q, nameof(q), "(B, T, E)", -1, -1, -1);
        Check.Shape(k, nameof(k), "(B, T, E)", q.shape[0], q.shape[1], q.shape[2]);
        Check.Shape(v, nameof(v), "(B, T, E)", q.shape[0], q.shape[1], q.shape[2]);
        long batch = q.shape[0], seqLen = q.shape[1], embed = q.shape[2];
        Check.That(embed % heads == 0, nameof(heads), $"E ({embed}) must be divisible by heads ({heads}).");
        using var scope = NewDisposeScope();
        Tensor Split(Tensor t) => t.view(batch, seqLen, heads, embed / heads).transpose(1, 2);  // (B, H, T, E/H)
        var mask = pattern.Compile((int)seqLen, blockSize is int b ? Math.Min(b, (int)seqLen) : (int)seqLen, heads);
        var kernel = blockSize is null ? AttentionKernel.Reference : AttentionKernel.Auto;
        var output = BlockSparseAttention.Attention(Split(q), Split(k), Split(v), mask, kernel: kernel);  // (B, H, T, E/H)
        return output.transpose(1, 2).reshape(batch, seqLen, embed).MoveToOuterDisposeScope();          // (B, T, E)
    }
}
