using SparseAttention.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>The routing one <see cref="RoutingHeadGroup"/> forward chose (see <see cref="RoutingAttentionOutput"/>).</summary>
/// <param name="Group">The head group that ran (with weight tying the same group runs once per layer).</param>
/// <param name="QueryIndices">(B, Hg, G, W) int64 query positions of each group, −1 = empty slot.</param>
/// <param name="KeyIndices">(B, Hg, G, W) int64 key positions of each group, −1 = empty slot.</param>
/// <param name="GroupClusters">(B, Hg, G) int64 centroid of each group, −1 = unused group.</param>
public sealed record RoutingRecord(RoutingHeadGroup Group, Tensor QueryIndices, Tensor KeyIndices, Tensor GroupClusters);

/// <summary>
/// Records which clusters routing heads chose, for inspection (e.g. <c>sparse-attn plot attention</c>): while a
/// capture is open on the current thread, every <see cref="RoutingHeadGroup"/> forward appends a
/// <see cref="RoutingRecord"/> (detached CPU copies), in call order — i.e. layer order within one model forward.
/// Costs nothing when no capture is open. Capture around an inference forward (eval mode, no gradients): forwards
/// recomputed by a reversible backward would be recorded again.
/// </summary>
/// <example><code>
/// using var capture = RoutingCapture.Start();
/// model.forward(tokens, null);
/// foreach (var r in capture.Records) { ... }
/// </code></example>
public sealed class RoutingCapture : IDisposable
{
    [ThreadStatic] private static RoutingCapture? current;
    private readonly RoutingCapture? previous;
    private readonly List<RoutingRecord> records = [];
    private bool disposed;

    private RoutingCapture(RoutingCapture? previous) => this.previous = previous;

    /// <summary>Opens a capture on the current thread (nested captures: the innermost records).</summary>
    public static RoutingCapture Start() => current = new RoutingCapture(current);

    /// <summary>What was recorded so far, in call order.</summary>
    public IReadOnlyList<RoutingRecord> Records => records;

    internal static void Record(RoutingHeadGroup group, RoutingAttentionOutput result)
    {
        var capture = current;
        if (capture is null) return;
        static Tensor Keep(Tensor t) => t.detach().cpu().clone().DetachFromDisposeScope();
        capture.records.Add(new RoutingRecord(group, Keep(result.QueryIndices), Keep(result.KeyIndices), Keep(result.GroupClusters)));
    }

    /// <summary>Closes the capture and frees the recorded tensors.</summary>
    public void Dispose()
    {
        if (disposed) return;
        disposed = true;
        if (ReferenceEquals(current, this)) current = previous;
        foreach (var r in records)
        {
            r.QueryIndices.Dispose();
            r.KeyIndices.Dispose();
            r.GroupClusters.Dispose();
        }
    }
}
