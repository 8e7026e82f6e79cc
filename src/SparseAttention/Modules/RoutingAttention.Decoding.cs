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
}
