using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Strided attention by permutation (<see cref="FusedStridedAttention"/>) against the Reference oracle with a mask
/// written here from index arithmetic (not from the library's pattern or BlockMask): outputs and gradients.
/// Mutation check: letting the merged pattern's strided part keep the diagonal (so the query's own key is counted
/// in both parts) made 9 of these tests fail.
/// </summary>
public sealed class FusedStridedAttentionTests
{
    /// <summary>The strided pattern's token mask (H, T, T) from index arithmetic: part A = |i − j| &lt; s,
    /// part B = (i − j) divisible by s; causal also j ≤ i; combined per <paramref name="combine"/>.</summary>
    private static Tensor StridedMask(int seqLen, int stride, bool causal, FactorizedCombine combine, int layer, int heads)
    {
        var i = arange(seqLen).view(seqLen, 1);
        var j = arange(seqLen).view(1, seqLen);
        var diff = i - j;                                                              // (T, T)
        var partA = diff.abs().lt(stride);
        var partB = diff.remainder(stride).eq(0);
        if (causal) { partA = partA.logical_and(diff.ge(0)); partB = partB.logical_and(diff.ge(0)); }
        var perHead = Enumerable.Range(0, heads).Select(h => combine switch
        {
            FactorizedCombine.Merged => partA.logical_or(partB),
            FactorizedCombine.MultiHead => h % 2 == 0 ? partA : partB,
            _ => layer % 2 == 0 ? partA : partB,
        }).ToArray();
        return stack(perHead);                                                         // (H, T, T)
    }

    /// <summary>The permuted path and the float64 Reference oracle on the same float32 inputs: output, dq, dk, dv.</summary>
    private static void AssertMatchesOracle(Func<Tensor, Tensor, Tensor, Tensor> attention, Tensor dense, Tensor q, Tensor k, Tensor v, Tensor? keyMask)
    {
        var upstream = randn(new[] { q.shape[0], q.shape[1], q.shape[2], v.shape[3] }, generator: new Generator(7));
        Tensor F64(Tensor t) => t.detach().to(ScalarType.Float64).requires_grad_(true);
        var expected = TestSupport.ForwardBackward((a, b, c) => ReferenceAttention.Attention(a, b, c, mask: dense.unsqueeze(0), keyMask: keyMask),
            F64(q), F64(k), F64(v), upstream.to(ScalarType.Float64));
        var actual = TestSupport.ForwardBackward(attention, q, k, v, upstream);
        var keep = keyMask is null ? ones(1, dtype: ScalarType.Bool) : keyMask.view(keyMask.shape[0], 1, keyMask.shape[1], 1);
        Tensor Real(Tensor t) => t.to(ScalarType.Float32).masked_fill(keep.logical_not(), 0);   // padded keys: no gradient compared
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        TestSupport.AssertClose(expected.Dq.to(ScalarType.Float32), actual.Dq, "dq");
        Assert.False(actual.Dk.isnan().any().item<bool>() || actual.Dv.isnan().any().item<bool>(), "NaN in dk/dv");
        TestSupport.AssertClose(Real(expected.Dk), Real(actual.Dk), "dk");
        TestSupport.AssertClose(Real(expected.Dv), Real(actual.Dv), "dv");
    }

    public static TheoryData<FactorizedCombine, int, bool, int, int, int, int, int> Cases() => new()
    {
        // combine, layer, causal, T, stride, block, heads, batch
        { FactorizedCombine.Merged, 0, true, 50, 7, 8, 1, 2 },      // T not a multiple of s or of the block; one head; batch 2
        { FactorizedCombine.Merged, 0, true, 64, 8, 16, 2, 1 },     // s divides T: the classes are the p(t)
        { FactorizedCombine.Merged, 0, false, 45, 6, 8, 2, 2 },     // bidirectional: whole residue class
        { FactorizedCombine.Merged, 0, true, 33, 1, 8, 1, 1 },      // s = 1: part A = the diagonal, part B = everything before
        { FactorizedCombine.Merged, 0, true, 20, 32, 8, 1, 1 },     // s > T: no strided pairs beyond the diagonal
        { FactorizedCombine.Merged, 0, true, 1, 4, 4, 1, 3 },       // one token
        { FactorizedCombine.MultiHead, 0, true, 41, 5, 8, 3, 2 },   // even heads part A, odd heads part B
        { FactorizedCombine.MultiHead, 0, false, 30, 4, 16, 2, 1 },
        { FactorizedCombine.Interleaved, 1, true, 39, 6, 8, 2, 2 }, // odd layer: part B only (OpenAI's "strided" mode)
        { FactorizedCombine.Interleaved, 1, false, 26, 5, 8, 1, 1 },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void PermutedEqualsOracleInOutputsAndGradients(FactorizedCombine combine, int layer, bool causal, int seqLen, int stride, int block, int heads, int batch)
    {
        var mask = new StridedPattern(stride, causal, combine, layer).Compile(seqLen, block, heads);
        var (q, k, v) = TestSupport.RandomQkv(batch, heads, seqLen, 5, seed: seqLen * 3 + stride, dtype: ScalarType.Float32);
        AssertMatchesOracle((a, b, c) => FusedStridedAttention.Attention(a, b, c, mask), StridedMask(seqLen, stride, causal, combine, layer, heads), q, k, v, null);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void KeyMaskAndNaNInPaddingNeverLeak(bool causal)
    {
        const int seqLen = 43, stride = 6, heads = 2;
        var mask = new StridedPattern(stride, causal).Compile(seqLen, 8, heads);
        var (q, k, v) = TestSupport.RandomQkv(3, heads, seqLen, 4, seed: 21, dtype: ScalarType.Float32);
        var keyMask = ones(3, seqLen, dtype: ScalarType.Bool);
        keyMask[1, 30..] = tensor(false);
        keyMask[2, 0] = tensor(false); keyMask[2, 12] = tensor(false); keyMask[2, 18] = tensor(false);  // one residue class thinned out
        var padded = keyMask.logical_not().view(3, 1, seqLen, 1).expand_as(k);
        var kNan = k.detach().masked_fill(padded, float.NaN).requires_grad_(true);
        var vNan = v.detach().masked_fill(padded, float.NaN).requires_grad_(true);
        AssertMatchesOracle((a, b, c) => FusedStridedAttention.Attention(a, b, c, mask, keyMask), StridedMask(seqLen, stride, causal, FactorizedCombine.Merged, 0, heads),
            q, kNan, vNan, keyMask);
    }

    [Fact]
    public void AutoAndFusedDispatchToThePermutedPathWhenItVisitsFewerBlocks()
    {
        const int seqLen = 300, stride = 16;
        var mask = new StridedPattern(stride, causal: true).Compile(seqLen, 16, 2);
        Assert.True(FusedStridedAttention.Handles(mask));
        var (q, k, v) = TestSupport.RandomQkv(2, 2, seqLen, 8, seed: 5, dtype: ScalarType.Float32);
        var dense = StridedMask(seqLen, stride, true, FactorizedCombine.Merged, 0, 2);
        foreach (var kernel in new[] { AttentionKernel.Auto, AttentionKernel.Fused })
            AssertMatchesOracle((a, b, c) => BlockSparseAttention.Attention(a, b, c, mask, kernel: kernel), dense, q, k, v, null);

        // Not for: other patterns, a layer without a strided part, a sequence too short to gain.
        Assert.False(FusedStridedAttention.Handles(new LocalBandPattern(16, true).Compile(seqLen, 16, 2)));
        Assert.False(FusedStridedAttention.Handles(new StridedPattern(stride, true, FactorizedCombine.Interleaved, layer: 0).Compile(seqLen, 16, 2)));
        Assert.False(FusedStridedAttention.Handles(new StridedPattern(4, true).Compile(8, 8, 1)));
        var local = new LocalBandPattern(4, true).Compile(12, 4, 1);
        var (q1, k1, v1) = TestSupport.RandomQkv(1, 1, 12, 4, seed: 2, dtype: ScalarType.Float32);
        Assert.Equal("mask", Assert.Throws<ArgumentException>(() => FusedStridedAttention.Attention(q1, k1, v1, local)).ParamName);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => FusedStridedAttention.Attention(q.@double(), k.@double(), v.@double(), mask)).ParamName);
    }

    [Fact]
    public void StaticHeadGroupWithAStridedPatternMatchesTheReferenceKernel()
    {
        // A model's static head group (Auto kernel, float32 CPU) against the same group on the Reference kernel.
        var spec = new StaticPatternSpec(StaticPatternKind.Strided, Size: 12);
        using var auto = new StaticPatternAttention(2, 8, spec.ToPattern(causal: true), blockSize: 16);
        using var reference = new StaticPatternAttention(2, 8, spec.ToPattern(causal: true), blockSize: 16, kernel: AttentionKernel.Reference);
        Assert.True(FusedStridedAttention.Handles(auto.MaskFor(250)));
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 250, 8, seed: 8, dtype: ScalarType.Float32);
        var upstream = randn(q.shape, generator: new Generator(3));
        var expected = TestSupport.ForwardBackward((a, b, c) => reference.Forward(a, b, c, null).Output, q, k, v, upstream);
        var actual = TestSupport.ForwardBackward((a, b, c) => auto.Forward(a, b, c, null).Output, q, k, v, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        TestSupport.AssertClose(expected.Dk, actual.Dk, "dk");
        TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
    }

    [Fact]
    public void ResultsDoNotDependOnTheThreadCount()
    {
        var mask = new StridedPattern(9, causal: true).Compile(200, 16, 3);
        var (q, k, v) = TestSupport.RandomQkv(2, 3, 200, 16, seed: 3, dtype: ScalarType.Float32);
        var upstream = randn(q.shape, generator: new Generator(1));
        var one = TestSupport.ForwardBackward((a, b, c) => FusedStridedAttention.Attention(a, b, c, mask, threads: 1), q, k, v, upstream);
        var two = TestSupport.ForwardBackward((a, b, c) => FusedStridedAttention.Attention(a, b, c, mask, threads: 2), q, k, v, upstream);
        Assert.True(torch.equal(one.Output, two.Output).all().item<bool>());
        Assert.True(torch.equal(one.Dq, two.Dq).all().item<bool>());
        Assert.True(torch.equal(one.Dk, two.Dk).all().item<bool>());
        Assert.True(torch.equal(one.Dv, two.Dv).all().item<bool>());
    }

    [Theory]
    [InlineData(64, 8)]
    [InlineData(50, 7)]
    [InlineData(5, 9)]
    public void ClassOrderIsAPermutationThatKeepsEachResidueClassInOrder(int seqLen, int stride)
    {
        var classes = new ResidueClassPattern(stride, seqLen, causal: true, includeSelf: true);
        var order = Enumerable.Range(0, seqLen).Select(classes.Position).ToArray();
        Assert.Equal(Enumerable.Range(0, seqLen), order.Order());
        // Class by class (residue 0, 1, …), increasing position within a class.
        var expected = Enumerable.Range(0, seqLen).OrderBy(t => t % stride).ThenBy(t => t).ToArray();
        Assert.Equal(expected, order);
        if (seqLen % stride == 0)   // the p(t) = (t mod s)·(T/s) + ⌊t/s⌋ is the slot of t
            for (int slot = 0; slot < seqLen; slot++)
                Assert.Equal(slot, order[slot] % stride * (seqLen / stride) + order[slot] / stride);
    }
}
