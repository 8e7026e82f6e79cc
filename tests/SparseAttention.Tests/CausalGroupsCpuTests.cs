using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class CausalGroupsCpuTests
{
    [Theory]
    [InlineData(1, 1, 1, 1, 1, 0)]
    [InlineData(2, 3, 17, 4, 5, 1)]
    [InlineData(1, 2, 64, 8, 3, 2)]
    [InlineData(2, 2, 50, 64, 7, 3)]
    [InlineData(1, 4, 200, 16, 13, 4)]
    public void LinearPassEqualsTheSortBasedGroups(long batch, long heads, long seqLen, int window, int clusters, long seed)
    {
        var gen = new Generator((ulong)seed);
        var query = randint(-1, clusters, new long[] { batch, heads, seqLen }, dtype: ScalarType.Int64, generator: gen);
        var key = randint(-1, clusters, new long[] { batch, heads, seqLen }, dtype: ScalarType.Int64, generator: gen);
        // Some keys in the query's cluster, some padding in both.
        key = where(rand(new long[] { batch, heads, seqLen }, generator: gen).lt(0.4), query, key);
        var (q1, k1, g1) = RoutingAttention.CausalGroupsCpu(query, key, window, clusters);
        var (q2, k2, g2) = RoutingAttention.CausalGroupsOps(query, key, window, clusters);
        Assert.Equal(q2.shape, q1.shape);
        Assert.Equal(g2.shape, g1.shape);
        Assert.True(q1.eq(q2).all().item<bool>(), "query indices");
        Assert.True(k1.eq(k2).all().item<bool>(), "key indices");
        Assert.True(g1.eq(g2).all().item<bool>(), "group clusters");
    }
}
