using SparseAttention.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>The routing one <see cref="RoutingHeadGroup"/> forward chose (see <see cref="RoutingAttentionOutput"/>).</summary>
/// <param name="Group">The head group that ran (with weight tying the same group runs once per layer).</param>
/// <param name="QueryIndices">(B, Hg, G, W) int64 query positions of each group, −1 = empty slot.</param>
/// <param name="KeyIndices">(B, Hg, G, W) int64 key positions of each group, −1 = empty slot.</param>
/// <param name="GroupClusters">(B, Hg, G) int64 centroid of each group, −1 = unused group.</param>
public sealed record RoutingRecord(RoutingHeadGroup Group, Tensor QueryIndices, Tensor KeyIndices, Tensor GroupClusters);

/// <summary>The buckets one <see cref="LshHeadGroup"/> forward chose.</summary>
/// <param name="Group">The head group that ran.</param>
/// <param name="Allowed">(B, Hg, T, T) bool: the keys each query attended in some hash round (<see cref="Modules.LshAttention.AttendedMask"/>).</param>
/// <param name="Buckets">(B, Hg, T) int64: each position's query bucket in the first hash round.</param>
public sealed record LshRecord(LshHeadGroup Group, Tensor Allowed, Tensor Buckets);

/// <summary>
/// Records which clusters routing heads (and which buckets LSH heads) chose, for inspection (e.g. <c>sparse-attn plot attention</c>): while a
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
    private readonly List<LshRecord> lshRecords = [];
    private bool disposed;

    private RoutingCapture(RoutingCapture? previous) => this.previous = previous;

    /// <summary>Opens a capture on the current thread (nested captures: the innermost records).</summary>
    public static RoutingCapture Start() => current = new RoutingCapture(current);

    /// <summary>What was recorded so far, in call order.</summary>
    public IReadOnlyList<RoutingRecord> Records => records;

    /// <summary>What LSH head groups recorded so far, in call order.</summary>
    public IReadOnlyList<LshRecord> LshRecords => lshRecords;

    /// <summary>True when a capture is open on the current thread (recording has a cost; skip it otherwise).</summary>
    internal static bool Active => current is not null;

    internal static void RecordLsh(LshHeadGroup group, Tensor allowed, Tensor buckets)
    {
        var capture = current;
        if (capture is null) return;
        capture.lshRecords.Add(new LshRecord(group, allowed.detach().cpu().clone().DetachFromDisposeScope(), buckets.detach().cpu().clone().DetachFromDisposeScope()));
    }

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
        foreach (var r in lshRecords)
        {
            r.Allowed.Dispose();
            r.Buckets.Dispose();
        }
        foreach (var r in records)
        {
            r.QueryIndices.Dispose();
            r.KeyIndices.Dispose();
            r.GroupClusters.Dispose();
        }
    }
}
