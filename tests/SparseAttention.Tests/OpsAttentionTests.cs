using SparseAttention.Kernels;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class OpsAttentionTests
{
    /// <summary>The token-defined patterns under test, by a short key (theory data must be serialisable).</summary>
    public static AttentionPattern Make(string kind, bool causal) => kind switch
    {
        "all" => new DensePattern(causal),
        "local3" => new LocalBandPattern(3, causal),
        "window4" => new WindowPattern(4, 1, causal ? 0 : 1, exactWindowSize: false, causal),
        "window3exact" => new WindowPattern(3, 2, causal ? 0 : 1, exactWindowSize: true, causal),
        "strided3merged" => new StridedPattern(3, causal, FactorizedCombine.Merged),
        "strided3multihead" => new StridedPattern(3, causal, FactorizedCombine.MultiHead),
        "fixed4merged" => new FixedPattern(4, 1, 2, causal, FactorizedCombine.Merged),
        "fixed4multihead" => new FixedPattern(4, 1, 2, causal, FactorizedCombine.MultiHead),
        // Block layouts with their own block of 4 (compiled with other block sizes too).
        "dsfixed" => new DsFixedPattern(4, causal, numLocalBlocks: 2, numGlobalBlocks: 1, horizontalGlobalAttention: !causal),
        "dsvariable" => new DsVariablePattern(4, causal, numRandomBlocks: 1, localWindowBlocks: [1, 2], globalBlockIndices: [0], differentLayoutPerHead: true, seed: 3),
        "bigbird" => new BigBirdPattern(4, causal, numRandomBlocks: 1, numSlidingWindowBlocks: 3, numGlobalBlocks: 1, differentLayoutPerHead: true, seed: 1),
        "longformer" => new LongformerPattern(4, causal, numSlidingWindowBlocks: 3, globalBlockIndices: [1]),
        "slidingwindow" => new SlidingWindowPattern(4, causal, numSlidingWindowBlocks: 3),
        "groups" => AttentionPattern.HeadGroups((new LocalBandPattern(2, causal), 1), (new StridedPattern(2, causal), 2)),
        _ => throw new ArgumentException(kind),
    };

    public static readonly string[] Kinds =
        ["all", "local3", "window4", "window3exact", "strided3merged", "strided3multihead", "fixed4merged", "fixed4multihead",
         "dsfixed", "dsvariable", "bigbird", "longformer", "slidingwindow"];

    private static readonly string[] BlockLayoutKinds = ["dsfixed", "dsvariable", "bigbird", "longformer", "slidingwindow"];

    public static TheoryData<string, bool, int, int, int> Cases()
    {
        var data = new TheoryData<string, bool, int, int, int>();
        foreach (var kind in Kinds)
            foreach (bool causal in new[] { true, false })
                foreach (var (seqLen, block) in new[] { (1, 4), (5, 4), (16, 4), (19, 8), (13, 16), (23, 3) })
                    foreach (int heads in new[] { 1, 3 })
                        // DeepSpeed rejects layouts with fewer blocks than the window/random/global counts (tested elsewhere).
                        if (!BlockLayoutKinds.Contains(kind) || seqLen > 8)
                            data.Add(kind, causal, seqLen, block, heads);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void OpsEqualsOracleInOutputsAndGradients(string kind, bool causal, int seqLen, int block, int heads)
    {
        var mask = Make(kind, causal).Compile(seqLen, block, heads);
        var (q, k, v) = TestSupport.RandomQkv(2, heads, seqLen, 5, seed: seqLen * 31 + heads);
        var upstream = randn(q.shape, dtype: q.dtype, generator: new Generator(7));
        var dense = mask.ToDense().unsqueeze(0);                                     // (1, H, T, T)
        var expected = TestSupport.ForwardBackward((a, b, c) => ReferenceAttention.Attention(a, b, c, mask: dense), q, k, v, upstream);
        var actual = TestSupport.ForwardBackward((a, b, c) => BlockSparseOpsAttention.Attention(a, b, c, mask), q, k, v, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        TestSupport.AssertClose(expected.Dk, actual.Dk, "dk");
        TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
    }

    [Theory]
    [InlineData("local3", 11, 4)]
    [InlineData("fixed4merged", 18, 8)]
    [InlineData("groups", 9, 4)]
    public void KeyMaskMatchesOracleAndNaNInPaddingNeverLeaks(string kind, int seqLen, int block)
    {
        var pattern = Make(kind, causal: true);
        int heads = kind == "groups" ? 3 : 2;
        var mask = pattern.Compile(seqLen, block, heads);
        var (q, k, v) = TestSupport.RandomQkv(3, heads, seqLen, 4, seed: 11);
        // Batch 0 unpadded, batch 1 right-padded, batch 2 with holes.
        var keyMask = ones(3, seqLen, dtype: ScalarType.Bool);
        keyMask[1, (seqLen - 4)..] = tensor(false);
        keyMask[2, 1] = tensor(false); keyMask[2, seqLen - 2] = tensor(false);
        var upstream = randn(q.shape, dtype: q.dtype, generator: new Generator(3));
        var dense = mask.ToDense().unsqueeze(0);
        var expected = TestSupport.ForwardBackward((a, b, c) => ReferenceAttention.Attention(a, b, c, mask: dense, keyMask: keyMask), q, k, v, upstream);

        var kNan = k.detach().clone(); var vNan = v.detach().clone();
        var padded = keyMask.logical_not().view(3, 1, seqLen, 1).expand_as(kNan);
        kNan = kNan.masked_fill(padded, double.NaN).requires_grad_(true);
        vNan = vNan.masked_fill(padded, double.NaN).requires_grad_(true);
        var actual = TestSupport.ForwardBackward((a, b, c) => BlockSparseOpsAttention.Attention(a, b, c, mask, keyMask), q, kNan, vNan, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        // Gradients at padded positions are zero (padding is never attended), elsewhere they match.
        var keep = keyMask.view(3, 1, seqLen, 1).expand_as(k);
        TestSupport.AssertClose(expected.Dk.masked_fill(keep.logical_not(), 0), actual.Dk.masked_fill(keep.logical_not(), 0), "dk");
        TestSupport.AssertClose(expected.Dv.masked_fill(keep.logical_not(), 0), actual.Dv.masked_fill(keep.logical_not(), 0), "dv");
    }

    [Theory]
    [MemberData(nameof(CausalKinds))]
    public void ChangingTokensAfterTChangesNothingUpToT(string kind)
    {
        const int seqLen = 21, heads = 2;
        var mask = Make(kind, causal: true).Compile(seqLen, 8, heads);
        Assert.True(mask.IsCausal);
        var (q, k, v) = TestSupport.RandomQkv(2, heads, seqLen, 4, seed: 5);
        var before = BlockSparseOpsAttention.Attention(q, k, v, mask);
        foreach (int t in new[] { 0, 7, 8, 15, 19 })
        {
            var gen = new Generator((ulong)t + 100);
            Tensor Perturb(Tensor x)
            {
                var y = x.detach().clone();
                y[.., .., (t + 1)..] = randn(2, heads, seqLen - t - 1, 4, dtype: ScalarType.Float64, generator: gen) * 10;
                return y;
            }
            var after = BlockSparseOpsAttention.Attention(Perturb(q), Perturb(k), Perturb(v), mask);
            TestSupport.AssertClose(before.narrow(2, 0, t + 1), after.narrow(2, 0, t + 1), $"outputs up to t = {t}", atol: 0, rtol: 0);
        }
    }

    public static TheoryData<string> CausalKinds() => new(Kinds);

    [Fact]
    public void RowsWithNoAllowedKeyGiveZeroOutputAndZeroGradient()
    {
        // Strided part B with stride 4 AND local band 2: query i sees only itself (i − j = 0).
        // Then hide even keys with the key mask: even queries see nothing at all.
        var pattern = new StridedPattern(4, true, FactorizedCombine.Interleaved, layer: 1).And(new LocalBandPattern(2, true));
        var mask = pattern.Compile(10, 4, 1);
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 10, 3, seed: 9, dtype: ScalarType.Float32);
        var keyMask = (arange(10) % 2).eq(1).view(1, 10);
        var output = BlockSparseOpsAttention.Attention(q, k, v, mask, keyMask);
        output.sum().backward();
        Assert.False(output.isnan().any().item<bool>());
        Assert.False(q.grad!.isnan().any().item<bool>());
        var even = arange(0, 10, 2);
        Assert.Equal(0.0, output.index_select(2, even).abs().sum().item<float>());
        Assert.Equal(0.0, q.grad!.index_select(2, even).abs().sum().item<float>());
        // Odd queries see exactly themselves.
        var odd = arange(1, 10, 2);
        TestSupport.AssertClose(v.detach().index_select(2, odd), output.detach().index_select(2, odd), "self only");
    }

    [Fact]
    public void Float32MatchesOracle()
    {
        var mask = new FixedPattern(8, 2, 2, causal: true).Compile(45, 16, 2);
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 45, 16, seed: 21, dtype: ScalarType.Float32);
        var upstream = randn(q.shape, generator: new Generator(1));
        var dense = mask.ToDense().unsqueeze(0);
        var expected = TestSupport.ForwardBackward((a, b, c) => ReferenceAttention.Attention(a, b, c, mask: dense), q, k, v, upstream);
        var actual = TestSupport.ForwardBackward((a, b, c) => BlockSparseAttention.Attention(a, b, c, mask), q, k, v, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        TestSupport.AssertClose(expected.Dk, actual.Dk, "dk");
        TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
    }

    [Fact]
    public void GatherSizeDoesNotGrowWithLengthForLocalPatterns()
    {
        // Memory of the Ops path is B·H·T·K·block: K (key blocks per query block) must stay fixed as T grows.
        var pattern = new WindowPattern(64, 1, 0, false, causal: true);
        var small = pattern.Compile(1024, 64, 2);
        var large = pattern.Compile(16384, 64, 2);
        Assert.Equal(2, small.MaxKeyBlocksPerRow);
        Assert.Equal(2, large.MaxKeyBlocksPerRow);
        var (index, slots) = large.ToGatherIndex();
        Assert.Equal(new long[] { 2, 256, 2 }, index.shape);
        Assert.Equal(new long[] { 2, 256, 2, 64, 64 }, slots.shape);
    }

    [Fact]
    public void BadInputNamesTheArgument()
    {
        var mask = new LocalBandPattern(4, true).Compile(16, 4, 2);
        var x = zeros(1, 2, 16, 8);
        Assert.Equal("mask", Assert.Throws<ArgumentException>(() => BlockSparseOpsAttention.Attention(zeros(1, 2, 15, 8), zeros(1, 2, 15, 8), zeros(1, 2, 15, 8), mask)).ParamName);
        Assert.Equal("mask", Assert.Throws<ArgumentException>(() => BlockSparseOpsAttention.Attention(zeros(1, 3, 16, 8), zeros(1, 3, 16, 8), zeros(1, 3, 16, 8), mask)).ParamName);
        Assert.Equal("k", Assert.Throws<ArgumentException>(() => BlockSparseOpsAttention.Attention(x, zeros(1, 2, 16, 4), x, mask)).ParamName);
        Assert.Equal("v", Assert.Throws<ArgumentException>(() => BlockSparseOpsAttention.Attention(x, x, zeros(1, 2, 16, 8, dtype: ScalarType.Float64), mask)).ParamName);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => BlockSparseOpsAttention.Attention(zeros(1, 2, 16, 8, dtype: ScalarType.Int64), zeros(1, 2, 16, 8, dtype: ScalarType.Int64), zeros(1, 2, 16, 8, dtype: ScalarType.Int64), mask)).ParamName);
        Assert.Equal("keyMask", Assert.Throws<ArgumentException>(() => BlockSparseOpsAttention.Attention(x, x, x, mask, ones(1, 16))).ParamName);
        Assert.Equal("blockSize", Assert.Throws<ArgumentException>(() => new DensePattern(true).Compile(16, 0, 1)).ParamName);
    }
}
