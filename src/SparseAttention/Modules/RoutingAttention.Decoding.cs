using SparseAttention.Kernels;
using static TorchSharp.torch;

namespace SparseAttention.Modules;

public sealed partial class RoutingAttention
{
    /// <summary>The memory keys (or values) of one cluster per (row, head), for decoding one token.</summary>
    /// <param name="clusterIndex">(B, H) int64 cluster of each row's query.</param>
    /// <param name="values">false = mem_key, true = mem_value.</param>
    /// <returns>(B, H, M, D).</returns>
    internal Tensor MemoryOf(Tensor clusterIndex, bool values)
    {
        Check.That(mem_key is not null && mem_value is not null, nameof(values), "this routing module has no memory key/values (numMemKv = 0).");
        using var scope = NewDisposeScope();
        long batch = clusterIndex.shape[0];
        var memory = values ? mem_value! : mem_key!;                                       // (H, C, M, D)
        var index = clusterIndex.view(batch, heads, 1, 1, 1).expand(batch, heads, 1, numMemKv, dimHead);   // (B, H, 1, M, D)
        return memory.unsqueeze(0).expand(batch, heads, clusters, numMemKv, dimHead)
                     .gather(2, index).squeeze(2).MoveToOuterDisposeScope();                // (B, H, M, D)
    }

    /// <summary>
    /// Incremental decoding of causal routing cross-attention, first part: every cluster's context keys, chosen by
    /// <see cref="CrossForward"/>'s balanced top-k. The context's similarities to the centroids do not depend on the
    /// queries (each part is normalised and compared to the centroid snapshot on its own), so one call per context serves
    /// every later query. Evaluation mode only (a training forward would accumulate k-means statistics).
    /// </summary>
    /// <param name="k">Context keys (B, H, S, D).</param>
    /// <param name="contextMask">Optional (B, S) bool; false = padded context token.</param>
    /// <param name="contextWindowSize">Context keys per cluster.</param>
    /// <returns>(B, H, C, Wc) int64 context positions per cluster, −1 = empty slot.</returns>
    internal Tensor CrossContextGroups(Tensor k, Tensor? contextMask, int contextWindowSize)
    {
        Check.That(causal, nameof(causal), "incremental routing cross-attention needs a causal module (non-causal query groups depend on every query).");
        Check.That(!training, nameof(training), "incremental decoding needs the module in evaluation mode.");
        Check.Shape(k, nameof(k), "(B, H, S, D)", -1, heads, -1, dimHead);
        Check.KeyMask(contextMask, k.shape[0], k.shape[2]);
        Check.Positive(contextWindowSize, nameof(contextWindowSize));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (_, sims, _, _) = kmeans.ForwardParts([k], [contextMask], similarities: true);  // as CrossForward computes the context's part
        return BalancedGroups(sims[0], contextMask, contextWindowSize).MoveToOuterDisposeScope();   // (B, H, C, Wc)
    }

    /// <summary>
    /// Incremental decoding of causal routing cross-attention, one new query per row: it goes to its nearest centroid
    /// (the similarities computed as in <see cref="CrossForward"/>) and attends that cluster's context keys — what the full
    /// forward gives it, whichever chunk of its cluster it falls in (every chunk of a cluster attends the same keys).
    /// </summary>
    /// <param name="q">Queries (B, H, 1, D).</param>
    /// <param name="k">Context keys (B, H, S, D).</param>
    /// <param name="v">Context values (B, H, S, D).</param>
    /// <param name="contextGroups">(B, H, C, Wc) from <see cref="CrossContextGroups"/>.</param>
    /// <param name="contextMask">Optional (B, S) bool; false = padded context token.</param>
    /// <returns>(B, H, 1, D).</returns>
    internal Tensor CrossStep(Tensor q, Tensor k, Tensor v, Tensor contextGroups, Tensor? contextMask)
    {
        Check.Shape(q, nameof(q), "(B, H, 1, D)", -1, heads, 1, dimHead);
        long batch = q.shape[0];
        Check.Shape(contextGroups, nameof(contextGroups), "(B, H, C, Wc)", batch, heads, clusters, -1);
        using var scope = NewDisposeScope();
        var (_, _, nearest, _) = kmeans.ForwardParts([q], [null], similarities: true);     // (B, H, 1) cluster of each query
        long wc = contextGroups.shape[3];
        var keyIdx = contextGroups.gather(2, nearest[0].unsqueeze(-1).expand(batch, heads, 1, wc));   // (B, H, 1, Wc)
        var queryIdx = zeros(new long[] { batch, heads, 1, 1 }, dtype: ScalarType.Int64, device: q.device);   // (B, H, 1, 1)
        return GroupedAttention.Attention(q, k, v, queryIdx, keyIdx, keyMask: contextMask, kernel: Kernel)
                               .MoveToOuterDisposeScope();                                 // (B, H, 1, D)
    }
}
