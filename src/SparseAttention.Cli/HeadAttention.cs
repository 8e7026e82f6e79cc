using SparseAttention.Model;

namespace SparseAttention.Cli;

/// <summary>What one head of one layer may attend on a text: <c>Allowed[q·T + k]</c>; for routing heads
/// <c>Cluster[q]</c> is the cluster of the group query q was routed to (−1 = none), for static heads null.</summary>
internal sealed record HeadAttention(int Layer, int Head, HeadGroupKind Kind, bool[] Allowed, int[]? Cluster);
