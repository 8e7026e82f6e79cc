using SparseAttention.Kernels;
using SparseAttention.Kernels.Fused;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class FusedAttentionTests
{
    public static TheoryData<string, bool, int, int, int> Cases() => OpsAttentionTests.Cases();

    private static void AssertFusedMatchesOracle(BlockMask mask, Tensor q, Tensor k, Tensor v, Tensor? keyMask, int? threads = null,
        int backwardChunks = 0)
    {
        var upstream = randn(new[] { q.shape[0], q.shape[1], q.shape[2], v.shape[3] }, generator: new Generator(7));
        var dense = mask.ToDense().unsqueeze(0);
        // The oracle in float64 from the same float32 inputs: the fused kernel is compared with exact math.
        Tensor F64(Tensor t) => t.detach().to(ScalarType.Float64).requires_grad_(true);
        var expected = TestSupport.ForwardBackward((a, b, c) => ReferenceAttention.Attention(a, b, c, mask: dense, keyMask: keyMask),
            F64(q), F64(k), F64(v), upstream.to(ScalarType.Float64));
        var actual = TestSupport.ForwardBackward((a, b, c) => FusedBlockSparseAttention.Attention(a, b, c, mask, keyMask, null, threads, backwardChunks),
            q, k, v, upstream);
        var keep = keyMask is null ? ones(1, dtype: ScalarType.Bool) : keyMask.view(keyMask.shape[0], 1, keyMask.shape[1], 1);
        // Padded keys get no gradient on either path (the oracle's comes from masked_fill); compare the rest.
        Tensor Real(Tensor t) => t.to(ScalarType.Float32).masked_fill(keep.logical_not(), 0);
        TestSupport.AssertClose(expected.Output.to(ScalarType.Float32), actual.Output, "output");
        TestSupport.AssertClose(expected.Dq.to(ScalarType.Float32), actual.Dq, "dq");
        Assert.False(actual.Dk.isnan().any().item<bool>() || actual.Dv.isnan().any().item<bool>(), "NaN in dk/dv");
        TestSupport.AssertClose(Real(expected.Dk), Real(actual.Dk), "dk");
        TestSupport.AssertClose(Real(expected.Dv), Real(actual.Dv), "dv");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void FusedEqualsOracleInOutputsAndGradients(string kind, bool causal, int seqLen, int block, int heads)
    {
        var mask = OpsAttentionTests.Make(kind, causal).Compile(seqLen, block, heads);
        var (q, k, v) = TestSupport.RandomQkv(2, heads, seqLen, 5, seed: seqLen * 7 + heads, dtype: ScalarType.Float32);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask: null);
    }

    [Theory]
    [InlineData(40, 16, 64, 64)]   // full vector tiles (AVX-512 4×4 micro-kernel) and a short last block
    [InlineData(70, 32, 48, 16)]   // D not a multiple of the 4-vector tile
    [InlineData(33, 8, 17, 3)]     // odd sizes everywhere
    [InlineData(150, 64, 20, 36)]  // split diagonal tiles (half 32) with D, Dv not multiples of the vector width
    public void FusedHandlesVectorTilesAndTails(int seqLen, int block, int dim, int dimV)
    {
        var mask = new WindowPattern(block, 1, 0, false, causal: true).Or(new FixedPattern(8, 2, 2, causal: true)).Compile(seqLen, block, 2);
        var gen = new Generator(5);
        var q = randn(new long[] { 2, 2, seqLen, dim }, generator: gen).requires_grad_(true);
        var k = randn(new long[] { 2, 2, seqLen, dim }, generator: gen).requires_grad_(true);
        var v = randn(new long[] { 2, 2, seqLen, dimV }, generator: gen).requires_grad_(true);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask: null);
    }

    [Theory]
    [InlineData(true, 200)]
    [InlineData(false, 150)]
    public void CompactedSummaryColumnTilesMatchOracle(bool causal, int seqLen)
    {
        // Fixed pattern, stride 16, 2 summary cells, 2 offsets: past key blocks of 64 hold 8 allowed columns,
        // which the fused layout compacts (padded to 16 columns); the last block is cut short.
        var mask = new FixedPattern(16, 2, 2, causal).Compile(seqLen, 64, 2);
        var layout = SparseAttention.Kernels.Fused.FusedLayout.For(mask);
        Assert.Contains(layout.ActiveStart, start => start >= 0);
        var (q, k, v) = TestSupport.RandomQkv(2, 2, seqLen, 16, seed: 4, dtype: ScalarType.Float32);
        var keyMask = ones(2, seqLen, dtype: ScalarType.Bool);
        keyMask[1, 47] = tensor(false); keyMask[1, (seqLen - 5)..] = tensor(false);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask);
    }

    [Theory]
    [InlineData(200, 64, true)]    // last block of 8 rows: the cut diagonal tile is still a band
    [InlineData(200, 64, false)]
    [InlineData(131, 48, true)]    // half of 48 rounds down to one vector (16)
    [InlineData(97, 32, false)]
    public void BandTilesAndSkippedQuadrantsMatchOracle(int seqLen, int block, bool causal)
    {
        // Head 0: a band narrower than the block (band tiles with both bounds; causal → skipped quadrant);
        // head 1: strided dots plus a short band (partial tiles that are not bands, masked by bias tiles; causal diagonal ones split).
        var mask = AttentionPattern.HeadGroups((new LocalBandPattern(block / 2 + 3, causal), 1),
            (new StridedPattern(block / 4, causal, FactorizedCombine.Interleaved, layer: 1).Or(new LocalBandPattern(3, causal)), 1))
            .Compile(seqLen, block, 2);
        var layout = SparseAttention.Kernels.Fused.FusedLayout.For(mask);
        Assert.Contains(layout.IsBand, band => band);
        Assert.Contains(layout.IsBand, band => !band);
        if (causal)
        {
            Assert.Contains(Enumerable.Range(0, layout.Split.Length), t => layout.Split[t] > 0 && layout.IsBand[t]);
            Assert.Contains(Enumerable.Range(0, layout.Split.Length), t => layout.Split[t] > 0 && !layout.IsBand[t]);
        }
        var (q, k, v) = TestSupport.RandomQkv(2, 2, seqLen, 24, seed: seqLen + block, dtype: ScalarType.Float32);
        var keyMask = ones(2, seqLen, dtype: ScalarType.Bool);
        keyMask[1, 5] = tensor(false); keyMask[1, (seqLen - 3)..] = tensor(false);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask: null);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask);
    }

    [Fact]
    public void BandDetectionIsExact()
    {
        // A causal band of width 5 in blocks of 8: tiles on the diagonal allow −4 ≤ key − query ≤ 0 (in-tile indices),
        // the tiles left of them 4 ≤ key − query ≤ 7 (absolute −4 … −1); a strided pattern's tiles are not bands.
        var layout = SparseAttention.Kernels.Fused.FusedLayout.For(new LocalBandPattern(5, true).Compile(40, 8, 1));
        var bands = Enumerable.Range(0, layout.IsBand.Length).Where(t => layout.IsBand[t]).Select(t => (layout.BandLo[t], layout.BandHi[t])).ToHashSet();
        Assert.Equal(new HashSet<(int, int)> { (-4, 0), (4, 7) }, bands);
        Assert.All(layout.IsBand, Assert.True);
        var strided = SparseAttention.Kernels.Fused.FusedLayout.For(new StridedPattern(3, true, FactorizedCombine.Interleaved, layer: 1).Compile(40, 8, 1));
        Assert.Contains(strided.IsBand, band => !band);
    }

    [Theory]
    [InlineData(2, true)]
    [InlineData(3, false)]
    [InlineData(5, true)]
    public void DqPartialsOfSplitHeadsMatchOracle(int chunks, bool causal)
    {
        // One (batch, head), its key blocks split over several backward tasks: dQ goes through private partials.
        var mask = new WindowPattern(32, 1, causal ? 0 : 1, exactWindowSize: false, causal).Or(new FixedPattern(16, 2, 1, causal))
            .Compile(300, 32, 1);
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 300, 16, seed: chunks, dtype: ScalarType.Float32);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask: null, backwardChunks: chunks);
        var keyMask = ones(1, 300, dtype: ScalarType.Bool);
        keyMask[0, 40..50] = tensor(false);
        AssertFusedMatchesOracle(mask, q, k, v, keyMask, backwardChunks: chunks);
    }

    [Fact]
    public void SingleHeadResultsDoNotDependOnTheThreadCount()
    {
        // B·H = 1 < processors splits the head (automatic chunk count); still bit-identical for 1 and 2 threads.
        var mask = new BigBirdLikePattern().Compile(300, 32, 1);
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 300, 32, seed: 8, dtype: ScalarType.Float32);
        var upstream = randn(q.shape, generator: new Generator(2));
        var one = TestSupport.ForwardBackward((a, b, c) => FusedBlockSparseAttention.Attention(a, b, c, mask, threads: 1), q, k, v, upstream);
        var two = TestSupport.ForwardBackward((a, b, c) => FusedBlockSparseAttention.Attention(a, b, c, mask, threads: 2), q, k, v, upstream);
        foreach (var (x, y) in new[] { (one.Output, two.Output), (one.Dq, two.Dq), (one.Dk, two.Dk), (one.Dv, two.Dv) })
            Assert.True(torch.equal(x, y).all().item<bool>());
    }

    [Fact]
    public unsafe void PointerWorksForTensorsOfTwoGibibytesAndMore()
    {
        // Pointer() once went through Tensor.bytes, an int-length span, and threw from 2 GiB on. The tensor is
        // never filled (its pages stay untouched, so this is fast); only two of its elements are written.
        const long count = (1L << 29) + 16;                                                      // 2³¹ + 64 bytes
        using var scope = NewDisposeScope();
        var big = empty(count);
        Assert.True(big.numel() * sizeof(float) >= 1L << 31);
        float* p = (float*)FusedBlockSparseAttention.Pointer(big);
        p[0] = 3f;
        p[count - 1] = 5f;
        Assert.Equal(3f, big[0].item<float>());
        Assert.Equal(5f, big[count - 1].item<float>());
        // A view starts at its own first element (storage offset included), also beyond 2 GiB.
        var tail = big.narrow(0, count - 4, 4).view(2, 2);
        Assert.Equal((nint)(p + count - 4), FusedBlockSparseAttention.Pointer(tail));
        Assert.Equal(0, FusedBlockSparseAttention.Pointer(empty(0)));
    }

    [Fact]
    public void KeyMaskAndNaNInPaddingNeverLeak()
    {
        const int seqLen = 27, heads = 3;
        var mask = AttentionPattern.HeadGroups((new LocalBandPattern(5, true), 1), (new StridedPattern(4, true), 2)).Compile(seqLen, 8, heads);
        var (q, k, v) = TestSupport.RandomQkv(3, heads, seqLen, 6, seed: 13, dtype: ScalarType.Float32);
        var keyMask = ones(3, seqLen, dtype: ScalarType.Bool);
        keyMask[1, 20..] = tensor(false);
        keyMask[2, 0] = tensor(false); keyMask[2, 9] = tensor(false);
        var padded = keyMask.logical_not().view(3, 1, seqLen, 1).expand_as(k);
        var kNan = k.detach().masked_fill(padded, float.NaN).requires_grad_(true);
        var vNan = v.detach().masked_fill(padded, float.NaN).requires_grad_(true);
        AssertFusedMatchesOracle(mask, q, kNan, vNan, keyMask);
    }

    [Fact]
    public void RowsWithNoAllowedKeyGiveZeroOutputAndZeroGradient()
    {
        var pattern = new StridedPattern(4, true, FactorizedCombine.Interleaved, layer: 1).And(new LocalBandPattern(2, true));
        var mask = pattern.Compile(10, 4, 1);
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 10, 3, seed: 9, dtype: ScalarType.Float32);
        var keyMask = (arange(10) % 2).eq(1).view(1, 10);
        var output = FusedBlockSparseAttention.Attention(q, k, v, mask, keyMask);
        output.sum().backward();
        Assert.False(output.isnan().any().item<bool>());
        foreach (var g in new[] { q.grad!, k.grad!, v.grad! }) Assert.False(g.isnan().any().item<bool>());
        var even = arange(0, 10, 2);
        Assert.Equal(0.0, output.index_select(2, even).abs().sum().item<float>());
        Assert.Equal(0.0, q.grad!.index_select(2, even).abs().sum().item<float>());
        Assert.Equal(0.0, k.grad!.index_select(2, even).abs().sum().item<float>());
    }

    [Fact]
    public void ResultsDoNotDependOnTheThreadCount()
    {
        var mask = new BigBirdLikePattern().Compile(300, 32, 4);
        var (q, k, v) = TestSupport.RandomQkv(2, 4, 300, 32, seed: 3, dtype: ScalarType.Float32);
        var upstream = randn(q.shape, generator: new Generator(1));
        var one = TestSupport.ForwardBackward((a, b, c) => FusedBlockSparseAttention.Attention(a, b, c, mask, threads: 1), q, k, v, upstream);
        var two = TestSupport.ForwardBackward((a, b, c) => FusedBlockSparseAttention.Attention(a, b, c, mask, threads: 2), q, k, v, upstream);
        // Every output row is written by exactly one task in a fixed order: results are bit-identical.
        Assert.True(torch.equal(one.Output, two.Output).all().item<bool>());
        Assert.True(torch.equal(one.Dq, two.Dq).all().item<bool>());
        Assert.True(torch.equal(one.Dk, two.Dk).all().item<bool>());
        Assert.True(torch.equal(one.Dv, two.Dv).all().item<bool>());
    }

    /// <summary>Local band plus a few global columns: a mix of full, partial and skipped blocks.</summary>
    private sealed class BigBirdLikePattern() : AttentionPattern("local+global")
    {
        public override bool IsCausal => false;
        public override bool Allows(int head, int query, int key, int seqLen) => Math.Abs(query - key) < 40 + head * 8 || key < 16 || query < 16;
        public override bool SameForAllHeads => false;
    }

    [Fact]
    public void DispatchUsesFusedOnCpuFloat32AndRejectsOtherDtypes()
    {
        var mask = new LocalBandPattern(3, true).Compile(12, 4, 1);
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 12, 4, seed: 2);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => FusedBlockSparseAttention.Attention(q, k, v, mask)).ParamName);
        Assert.Equal("threads", Assert.Throws<ArgumentException>(() =>
            FusedBlockSparseAttention.Attention(q.@float(), k.@float(), v.@float(), mask, threads: 0)).ParamName);
        // Auto on float64 falls back to the Ops path and still matches the oracle.
        var dense = mask.ToDense().unsqueeze(0);
        TestSupport.AssertClose(ReferenceAttention.Attention(q, k, v, mask: dense), BlockSparseAttention.Attention(q, k, v, mask), "auto float64");
        TestSupport.AssertClose(ReferenceAttention.Attention(q, k, v, mask: dense).@float(),
            BlockSparseAttention.Attention(q.@float(), k.@float(), v.@float(), mask, kernel: AttentionKernel.Fused), "fused float32");
    }

    /// <summary>Auto's result is bit-identical to the fused kernel's when the machine has an accelerated vector width and
    /// to the Ops kernel's otherwise (the scalar fused path is slower than Ops); fused and Ops must differ somewhere on
    /// the input, or the check could not tell which one ran.</summary>
    internal static void AssertAutoChoseByVectorWidth(Tensor auto, Tensor fused, Tensor ops)
    {
        Assert.False(torch.equal(fused, ops).all().item<bool>(), "fused and Ops agree bit for bit: this input cannot show which one Auto ran");
        Assert.True(torch.equal(auto, SimdWidth.Vectorised ? fused : ops).all().item<bool>(),
            $"Auto did not run the {(SimdWidth.Vectorised ? "fused" : "Ops")} kernel with {SimdWidth.Bits}-bit vectors");
    }

    [Fact]
    public void AutoRunsFusedOnlyWithAnAcceleratedVectorWidth()
    {
        var mask = new LocalBandPattern(16, true).Compile(100, 16, 2);
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 100, 8, seed: 4, dtype: ScalarType.Float32);
        Tensor Run(AttentionKernel kernel) => BlockSparseAttention.Attention(q, k, v, mask, kernel: kernel);
        AssertAutoChoseByVectorWidth(Run(AttentionKernel.Auto), Run(AttentionKernel.Fused), Run(AttentionKernel.Ops));
        Assert.Equal(SimdWidth.Vectorised, FusedBlockSparseAttention.PreferredFor(q));
        Assert.False(FusedBlockSparseAttention.PreferredFor(q.@double()));
    }
}
