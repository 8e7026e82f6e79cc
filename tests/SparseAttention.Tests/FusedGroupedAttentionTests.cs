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

    // Relative terms: terms × causal × shared QK × look-back × padding, heads alternating 1 and 3; two wider heads.
    public static TheoryData<string, bool, bool, bool, bool, int, int, int> RelativeCases()
    {
        var data = new TheoryData<string, bool, bool, bool, bool, int, int, int>();
        int n = 0;
        foreach (string terms in new[] { "shaw", "alibi" })
            foreach (bool causal in new[] { false, true })
                foreach (bool sharedQk in new[] { false, true })
                    foreach (bool lookBackward in new[] { false, true })
                        foreach (bool padded in new[] { false, true })
                            data.Add(terms, causal, sharedQk, lookBackward, padded, n++ % 2 == 0 ? 1 : 3, 20, 17);
        data.Add("shaw", true, false, true, true, 3, 33, 70);
        data.Add("shaw", false, true, false, false, 1, 70, 33);
        return data;
    }

    /// <summary>Shaw tables (2R + 1, D) and (2R + 1, Dv), R = 3 (distances in a 23-token sequence reach 22: clipped).</summary>
    private static (Tensor KeyTable, Tensor ValueTable) ShawTables(Generator gen, int dim, int dimV) =>
        (randn(new long[] { 7, dim }, generator: gen), randn(new long[] { 7, dimV }, generator: gen));

    private static RelativePositionTerms Terms(string terms, int heads, Tensor keyTable, Tensor valueTable) =>
        terms == "alibi" ? new AlibiPositions([.. AlibiPositions.StandardSlopes(heads).Select(m => m * 3)])   // steep: the bias matters at T = 23
                         : new ShawRelativePositions(keyTable, valueTable);

    /// <summary>The fused kernel with Shaw or ALiBi terms equals the Ops kernel with the same terms (itself checked
    /// against per-pair loops in <see cref="RelativePositionTests"/>), run in float64: outputs and the gradients of q,
    /// k, v and both Shaw tables.</summary>
    [Theory]
    [MemberData(nameof(RelativeCases))]
    public void FusedWithRelativeTermsEqualsOpsInOutputsAndGradients(string terms, bool causal, bool sharedQk, bool lookBackward, bool padded,
        int heads, int dim, int dimV)
    {
        const long batch = 2, seqLen = 23, groups = 5;
        int seed = (causal ? 1 : 0) + (sharedQk ? 2 : 0) + (lookBackward ? 4 : 0) + (padded ? 8 : 0) + heads * 16 + dim;
        var gen = new Generator((ulong)seed + 7);
        var q = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var k = sharedQk ? nn.functional.normalize(q, 2, -1) : randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        var (keyTable, valueTable) = ShawTables(gen, dim, dimV);
        var qIdx = GroupedAttentionTests.RandomIndices(seed, batch, heads, groups, 7, seqLen);
        var kIdx = sharedQk ? qIdx : GroupedAttentionTests.RandomIndices(seed + 100, batch, heads, groups, 9, seqLen);
        Tensor? keyMask = null;
        if (padded)
        {
            keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
            keyMask[1, 17..] = tensor(false);
            keyMask[0, 3] = tensor(false);
        }
        var upstream = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        Tensor F64(Tensor t) => t.to(ScalarType.Float64);
        var expected = GroupedAttentionTests.Grad(x => GroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward,
            kernel: AttentionKernel.Ops, relative: Terms(terms, heads, x[3], x[4])), F64(upstream), F64(q), F64(k), F64(v), F64(keyTable), F64(valueTable));
        var actual = GroupedAttentionTests.Grad(x => GroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward,
            kernel: AttentionKernel.Fused, relative: Terms(terms, heads, x[3], x[4])), upstream, q, k, v, keyTable, valueTable);
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        string[] names = ["dq", "dk", "dv", "d key table", "d value table"];
        for (int n = 0; n < names.Length; n++) TestSupport.AssertClose(expected.Grads[n].to(ScalarType.Float32), actual.Grads[n], names[n]);
        if (terms == "shaw") Assert.True(actual.Grads[3].abs().sum().item<float>() > 0 && actual.Grads[4].abs().sum().item<float>() > 0, "the tables get gradients");
    }

    /// <summary>Merged (multi-round, LSH) mode with relative terms: fused equals Ops, with look-back links, labels,
    /// de-duplication and the shared-QK last resort (a token alone with itself gets the distance-0 value term).</summary>
    [Theory]
    [InlineData("shaw", true, false, false, false)]
    [InlineData("shaw", false, true, true, true)]
    [InlineData("shaw", true, true, true, false)]
    [InlineData("alibi", true, false, true, true)]
    public void MergedWithRelativeTermsMatchesOps(string terms, bool causal, bool sharedQk, bool dedup, bool labels)
    {
        const long batch = 2, heads = 2, seqLen = 60;
        const int rounds = 2, perRound = 3, width = 20, dim = 20, dimV = 17;
        var gen = new Generator(29);
        var q = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var k = sharedQk ? nn.functional.normalize(q, 2, -1) : randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        var (keyTable, valueTable) = ShawTables(gen, dim, dimV);
        var (qIdx, kIdx, previous) = GroupedBlockLayoutTests.MergedGroups(11, batch, heads, rounds, perRound, width, seqLen);
        if (sharedQk) kIdx = qIdx;
        Tensor? queryLabels = labels ? randint(0, 2, new long[] { batch, heads, rounds, seqLen }, generator: gen) : null;
        Tensor? keyLabels = labels ? (sharedQk ? queryLabels : randint(0, 2, new long[] { batch, heads, rounds, seqLen }, generator: gen)) : null;
        var upstream = randn(new long[] { batch, heads, seqLen, dimV }, generator: gen);
        Tensor F64(Tensor t) => t.to(ScalarType.Float64);
        Func<Tensor[], Tensor> With(AttentionKernel kernel) => x => GroupedAttention.MergedAttention(x[0], x[1], x[2], qIdx, kIdx, previous, rounds,
            causal, sharedQk, null, queryLabels, keyLabels, dedup, null, kernel, builtGroups: false, Terms(terms, (int)heads, x[3], x[4]));
        var expected = GroupedAttentionTests.Grad(With(AttentionKernel.Ops), F64(upstream), F64(q), F64(k), F64(v), F64(keyTable), F64(valueTable));
        var actual = GroupedAttentionTests.Grad(With(AttentionKernel.Fused), upstream, q, k, v, keyTable, valueTable);
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        string[] names = ["dq", "dk", "dv", "d key table", "d value table"];
        for (int n = 0; n < names.Length; n++) TestSupport.AssertClose(expected.Grads[n].to(ScalarType.Float32), actual.Grads[n], names[n]);
    }

    /// <summary>Auto takes the fused kernel for Shaw and ALiBi (float32 tables); a term the kernel does not know is
    /// refused under Fused by name and runs on Ops under Auto.</summary>
    [Fact]
    public void RelativeTermsChooseTheKernelByWhatItKnows()
    {
        var gen = new Generator(31);
        var (q, k, v) = (randn(new long[] { 1, 2, 40, 16 }, generator: gen), randn(new long[] { 1, 2, 40, 16 }, generator: gen), randn(new long[] { 1, 2, 40, 16 }, generator: gen));
        var (keyTable, valueTable) = ShawTables(gen, 16, 16);
        var qIdx = GroupedAttentionTests.RandomIndices(1, 1, 2, 4, 10, 40);
        foreach (var terms in new RelativePositionTerms[] { new ShawRelativePositions(keyTable, valueTable), new AlibiPositions([0.5, 0.25]) })
        {
            var ops = GroupedAttention.Attention(q, k, v, qIdx, qIdx, causal: true, kernel: AttentionKernel.Ops, relative: terms);
            var auto = GroupedAttention.Attention(q, k, v, qIdx, qIdx, causal: true, relative: terms);
            var fused = GroupedAttention.Attention(q, k, v, qIdx, qIdx, causal: true, kernel: AttentionKernel.Fused, relative: terms);
            TestSupport.AssertClose(ops, auto, "auto");
            FusedAttentionTests.AssertAutoChoseByVectorWidth(auto, fused, ops);
        }
        var custom = new ScoreOffset();
        Assert.Equal("relative", Assert.Throws<ArgumentException>(() =>
            GroupedAttention.Attention(q, k, v, qIdx, qIdx, causal: true, kernel: AttentionKernel.Fused, relative: custom)).ParamName);
        TestSupport.AssertClose(GroupedAttention.Attention(q, k, v, qIdx, qIdx, causal: true, kernel: AttentionKernel.Ops),
            GroupedAttention.Attention(q, k, v, qIdx, qIdx, causal: true, relative: custom), "a constant offset changes nothing");
    }

    private sealed class ScoreOffset : RelativePositionTerms
    {
        public override int? Heads => null;
        public override Tensor AddToScores(Tensor scaledScores, Tensor q, Tensor distance, double scale) => scaledScores + 1;
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
        var (keyTable, valueTable) = ShawTables(gen, 32, 32);
        foreach (bool shaw in new[] { false, true })
        {
            Func<Tensor[], Tensor> Run(int threads) => x => FusedGroupedAttention.AttentionChecked(x[0], x[1], x[2], qIdx, kIdx, causal: true,
                sharedQk: false, keyMask: null, lookBackward: false, scale: null, threads, shaw ? new ShawRelativePositions(x[3], x[4]) : null);
            var one = GroupedAttentionTests.Grad(Run(1), upstream, q, k, v, keyTable, valueTable);
            var two = GroupedAttentionTests.Grad(Run(2), upstream, q, k, v, keyTable, valueTable);
            Assert.True(torch.equal(one.Output, two.Output).all().item<bool>());
            for (int n = 0; n < 5; n++) Assert.True(torch.equal(one.Grads[n], two.Grads[n]).all().item<bool>(), $"gradient {n}");
        }
    }
}
