using SparseAttention.Kernels;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// The fused grouped kernel's permuted block layout on sizes the small oracle tests do not reach: groups wider than
/// the 4-vector micro-kernels (so the full-width tiles, the transposed-A key-side products and their tails run),
/// merged mode with look-back links that are not "group g − 1" (a key block that is not adjacent), and scratch
/// memory reused across calls of different sizes and modes.
/// </summary>
public class GroupedBlockLayoutTests
{
    private static Tensor F64(Tensor t) => t.to(ScalarType.Float64);

    [Theory]
    [InlineData(false, false, false, 64, 64)]
    [InlineData(true, false, true, 64, 80)]
    [InlineData(true, true, false, 80, 64)]
    [InlineData(false, true, true, 48, 33)]
    public void WideGroupsMatchTheOracle(bool causal, bool sharedQk, bool lookBackward, int dim, int dimV)
    {
        const long batch = 1, heads = 2, seqLen = 300, groups = 4;
        var gen = new Generator(31);
        var q = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var k = sharedQk ? nn.functional.normalize(q, 2, -1) : randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        var qIdx = GroupedAttentionTests.RandomIndices(3, batch, heads, groups, 90, seqLen);     // up to 90 queries per group
        var kIdx = sharedQk ? qIdx : GroupedAttentionTests.RandomIndices(4, batch, heads, groups, 70, seqLen);
        var keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
        keyMask[0, 290..] = tensor(false);
        var upstream = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        var expected = GroupedAttentionTests.Grad(x => GroupedOracle.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward),
            F64(upstream), F64(q), F64(k), F64(v));
        var actual = GroupedAttentionTests.Grad(x => FusedGroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward),
            upstream, q, k, v);
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        string[] names = ["dq", "dk", "dv"];
        for (int n = 0; n < 3; n++) TestSupport.AssertClose(expected.Grads[n].to(ScalarType.Float32), actual.Grads[n], names[n]);
    }

    /// <summary>Per round, a random permutation of the positions cut into groups of <paramref name="width"/>, about a
    /// tenth of the slots left empty; each group's look-back link points to a random other group of its round.</summary>
    internal static (Tensor Query, Tensor Key, Tensor Previous) MergedGroups(int seed, long batch, long heads, int rounds, int perRound, int width, long seqLen)
    {
        var rng = new Random(seed);
        int groups = rounds * perRound;
        var query = new long[batch * heads * groups * width];
        var key = new long[batch * heads * groups * width];
        var previous = new long[batch * heads * groups];
        for (long bh = 0; bh < batch * heads; bh++)
            for (int r = 0; r < rounds; r++)
            {
                foreach (var target in new[] { query, key })
                {
                    var order = Enumerable.Range(0, (int)seqLen).OrderBy(_ => rng.Next()).ToArray();
                    for (int s = 0; s < perRound * width; s++)
                        target[(bh * groups + r * perRound) * width + s] = s < order.Length && rng.NextDouble() > 0.1 ? order[s] : -1;
                }
                for (int g = 0; g < perRound; g++)
                {
                    int other = rng.Next(-1, perRound);                                       // −1 = none; may be itself
                    previous[bh * groups + r * perRound + g] = other < 0 ? -1 : r * perRound + other;
                }
            }
        return (tensor(query, new[] { batch, heads, groups, (long)width }), tensor(key, new[] { batch, heads, groups, (long)width }),
            tensor(previous, new[] { batch, heads, (long)groups }));
    }

    [Theory]
    [InlineData(false, false, false)]
    [InlineData(true, true, true)]
    [InlineData(true, false, true)]
    public void MergedWithNonAdjacentLookBackMatchesOps(bool causal, bool sharedQk, bool dedup)
    {
        const long batch = 2, heads = 1, seqLen = 150;
        const int rounds = 2, perRound = 3, width = 50, dim = 64;
        var gen = new Generator(17);
        var q = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var k = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var (qIdx, kIdx, previous) = MergedGroups(5, batch, heads, rounds, perRound, width, seqLen);
        var upstream = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var expected = GroupedAttentionTests.Grad(x => GroupedAttention.MergedAttention(x[0], x[1], x[2], qIdx, kIdx, previous, rounds, causal, sharedQk,
            dedup: dedup, kernel: AttentionKernel.Ops), F64(upstream), F64(q), F64(k), F64(v));
        var actual = GroupedAttentionTests.Grad(x => FusedGroupedAttention.MergedAttention(x[0], x[1], x[2], qIdx, kIdx, previous, rounds, causal, sharedQk,
            dedup: dedup), upstream, q, k, v);
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        string[] names = ["dq", "dk", "dv"];
        for (int n = 0; n < 3; n++) TestSupport.AssertClose(expected.Grads[n].to(ScalarType.Float32), actual.Grads[n], names[n]);
    }

    [Fact]
    public void PooledScratchCarriesNothingBetweenCalls()
    {
        // One thread, so every call reuses the same pooled scratch: a large merged call (look-back links set), then a
        // small plain call with look-back (which must use g − 1, not the stale links), then a large plain call.
        var gen = new Generator(23);
        Tensor Rand(long t, long d) => randn(new long[] { 1, 2, t, d }, generator: gen);
        var (qIdx, kIdx, previous) = MergedGroups(9, 1, 2, 2, 4, 40, 160);
        var (q1, k1, v1) = (Rand(160, 32), Rand(160, 32), Rand(160, 32));
        var merged = FusedGroupedAttention.MergedAttention(q1, k1, v1, qIdx, kIdx, previous, 2, causal: true, dedup: true, threads: 1);
        TestSupport.AssertClose(GroupedAttention.MergedAttention(F64(q1), F64(k1), F64(v1), qIdx, kIdx, previous, 2, causal: true, dedup: true,
            kernel: AttentionKernel.Ops).to(ScalarType.Float32), merged, "merged");
        foreach (var (t, g, w) in new[] { (30L, 3L, 7), (400L, 5L, 100) })
        {
            var (q, k, v) = (Rand(t, 24), Rand(t, 24), Rand(t, 24));
            var qi = GroupedAttentionTests.RandomIndices((int)t, 1, 2, g, w, t);
            var ki = GroupedAttentionTests.RandomIndices((int)t + 1, 1, 2, g, w, t);
            var fused = FusedGroupedAttention.Attention(q, k, v, qi, ki, causal: true, lookBackward: true, threads: 1);
            var oracle = GroupedOracle.Attention(F64(q), F64(k), F64(v), qi, ki, causal: true, sharedQk: false, lookBackward: true);
            TestSupport.AssertClose(oracle.to(ScalarType.Float32), fused, $"plain T={t}");
        }
    }
}
