using SparseAttention.Kernels;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class FusedGroupedAttentionTests
{
    // Head widths: 20/17 = one vector + a scalar tail at 512 bits; 70/33 = the 4-vector micro-kernel + 1-vector + tail.
    public static TheoryData<bool, bool, bool, bool, int, int, int> Cases()
    {
        var data = new TheoryData<bool, bool, bool, bool, int, int, int>();
        foreach (bool causal in new[] { false, true })
            foreach (bool sharedQk in new[] { false, true })
                foreach (bool lookBackward in new[] { false, true })
                    foreach (bool padded in new[] { false, true })
                        foreach (int heads in new[] { 1, 3 })
                            data.Add(causal, sharedQk, lookBackward, padded, heads, 20, 17);
        data.Add(true, true, true, true, 1, 33, 70);
        data.Add(true, false, false, false, 3, 70, 33);
        data.Add(false, false, true, true, 1, 70, 70);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void FusedEqualsPerGroupOracleInOutputsAndGradients(bool causal, bool sharedQk, bool lookBackward, bool padded, int heads, int dim, int dimV)
    {
        const long batch = 2, seqLen = 23, groups = 5;
        int seed = (causal ? 1 : 0) + (sharedQk ? 2 : 0) + (lookBackward ? 4 : 0) + (padded ? 8 : 0) + heads * 16;
        var gen = new Generator((ulong)seed + 1);
        var q = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var k = sharedQk ? nn.functional.normalize(q, 2, -1) : randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        // 7 query slots and 9 key slots per group: a token in several groups, one in none, empty slots.
        var qIdx = GroupedAttentionTests.RandomIndices(seed, batch, heads, groups, 7, seqLen);
        var kIdx = sharedQk ? qIdx : GroupedAttentionTests.RandomIndices(seed + 100, batch, heads, groups, 9, seqLen);
        Tensor? keyMask = null;
        if (padded)
        {
            keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
            keyMask[1, 17..] = tensor(false);
            keyMask[0, 3] = tensor(false);
            // Padding holds NaN: it must never reach a real output or gradient.
            var drop = keyMask.logical_not().view(batch, 1, seqLen, 1);
            k = k.masked_fill(drop, float.NaN);
            v = v.masked_fill(drop, float.NaN);
        }
        var upstream = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        Tensor F64(Tensor t) => t.to(ScalarType.Float64);
        var expected = GroupedAttentionTests.Grad(x => GroupedOracle.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward),
            F64(upstream), F64(q), F64(k.nan_to_num(0)), F64(v.nan_to_num(0)));
        var actual = GroupedAttentionTests.Grad(x => FusedGroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward),
            upstream, q, k, v);
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        string[] names = ["dq", "dk", "dv"];
        for (int n = 0; n < 3; n++)
        {
            var grad = actual.Grads[n];
            Assert.False(grad.isnan().any().item<bool>(), $"{names[n]}: NaN");
            if (n > 0 && keyMask is not null)   // padded keys get no gradient on either path
                grad = grad.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), 0);
            var want = expected.Grads[n].to(ScalarType.Float32);
            if (n > 0 && keyMask is not null) want = want.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), 0);
            TestSupport.AssertClose(want, grad, names[n]);
        }
    }

    [Fact]
    public void AutoUsesFusedForFloat32WithVectorsAndMatchesOps()
    {
        var gen = new Generator(3);
        var q = randn(new long[] { 1, 2, 40, 16 }, generator: gen);
        var k = randn(new long[] { 1, 2, 40, 16 }, generator: gen);
        var v = randn(new long[] { 1, 2, 40, 16 }, generator: gen);
        var qIdx = GroupedAttentionTests.RandomIndices(1, 1, 2, 4, 10, 40);
        var kIdx = GroupedAttentionTests.RandomIndices(2, 1, 2, 4, 10, 40);
        var ops = GroupedAttention.Attention(q, k, v, qIdx, kIdx, causal: true, lookBackward: true, kernel: AttentionKernel.Ops);
        var auto = GroupedAttention.Attention(q, k, v, qIdx, kIdx, causal: true, lookBackward: true);
        var fused = FusedGroupedAttention.Attention(q, k, v, qIdx, kIdx, causal: true, lookBackward: true);
        TestSupport.AssertClose(ops, auto, "auto");
        FusedAttentionTests.AssertAutoChoseByVectorWidth(auto, fused, ops);
        Assert.Equal("memoryKeys", Assert.Throws<ArgumentException>(() => GroupedAttention.Attention(q, k, v, qIdx, kIdx,
            memoryKeys: zeros(new long[] { 1, 2, 4, 1, 16 }), memoryValues: zeros(new long[] { 1, 2, 4, 1, 16 }), kernel: AttentionKernel.Fused)).ParamName);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => FusedGroupedAttention.Attention(q.to(ScalarType.Float64), k.to(ScalarType.Float64), v.to(ScalarType.Float64), qIdx, kIdx)).ParamName);
    }

    [Fact]
    public void ResultsDoNotDependOnTheThreadCount()
    {
        var gen = new Generator(5);
        var q = randn(new long[] { 2, 3, 64, 32 }, generator: gen);
        var k = randn(new long[] { 2, 3, 64, 32 }, generator: gen);
        var v = randn(new long[] { 2, 3, 64, 32 }, generator: gen);
        var qIdx = GroupedAttentionTests.RandomIndices(7, 2, 3, 6, 16, 64);
        var kIdx = GroupedAttentionTests.RandomIndices(8, 2, 3, 6, 16, 64);
        var upstream = randn(new long[] { 2, 3, 64, 32 }, generator: gen);
        var one = GroupedAttentionTests.Grad(x => FusedGroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal: true, threads: 1), upstream, q, k, v);
        var two = GroupedAttentionTests.Grad(x => FusedGroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal: true, threads: 2), upstream, q, k, v);
        Assert.True(torch.equal(one.Output, two.Output).all().item<bool>());
        for (int n = 0; n < 3; n++) Assert.True(torch.equal(one.Grads[n], two.Grads[n]).all().item<bool>());
    }
}
