using SparseAttention.Kernels;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Relative-position terms through the fused block kernel (far and near parts merged by log-sum-exp for Shaw, an extra
/// key feature for ALiBi) against the Ops kernel in float64: outputs and the gradients of q, k, v and both Shaw tables,
/// over lengths that are not multiples of the block, one head, batch 2, padded keys, R = 1 and R beyond the window.
/// </summary>
public sealed class FusedRelativeAttentionTests
{
    public static TheoryData<string, int, int, int, int, int, int, bool, bool> Cases() => new()
    {
        // terms, batch, heads, T, block, window blocks back, R, causal, padded keys
        { "shaw", 2, 2, 13, 4, 1, 2, true, false },
        { "shaw", 1, 1, 37, 8, 2, 1, true, true },
        { "shaw", 2, 3, 21, 4, 1, 16, true, false },
        { "shaw", 2, 2, 19, 4, 1, 3, false, true },
        { "shaw", 1, 2, 5, 8, 1, 2, true, false },
        { "shaw", 2, 1, 1, 4, 1, 2, true, false },                             // one token
        { "shaw", 2, 2, 32, 8, 2, 16, false, true },                           // T a multiple of the band: blocks cross heads
        { "alibi", 2, 2, 13, 4, 1, 0, true, true },
        { "alibi", 1, 1, 37, 8, 2, 0, true, false },
        { "alibi", 2, 3, 19, 4, 1, 0, false, true },
        { "alibi", 2, 3, 41, 4, 1, 0, true, true },
        { "alibi", 1, 1, 50, 8, 1, 0, true, false },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void FusedEqualsOpsInOutputsAndGradients(string terms, int batch, int heads, int seqLen, int block, int back, int r,
        bool causal, bool padded)
    {
        const int dim = 8, dimV = 6;
        var gen = new Generator((ulong)(seqLen * 31 + heads + r));
        Tensor Rand(params long[] shape) => randn(shape, dtype: ScalarType.Float32, generator: gen);
        Tensor[] inputs = [Rand(batch, heads, seqLen, dim), Rand(batch, heads, seqLen, dim), Rand(batch, heads, seqLen, dimV),
                           Rand(2 * Math.Max(r, 1) + 1, dim), Rand(2 * Math.Max(r, 1) + 1, dimV)];
        var upstream = Rand(batch, heads, seqLen, dimV);
        var pattern = new WindowPattern(block, lookBackward: back, lookForward: causal ? 0 : 1, exactWindowSize: false, causal: causal);
        var mask = pattern.Compile(seqLen, block, heads);
        Tensor? keyMask = null;
        if (padded)
        {
            keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
            keyMask[0, 0] = tensor(false);
            keyMask[^1, seqLen - 3] = tensor(false);
        }
        RelativePositionTerms Make(Tensor kt, Tensor vt) => terms == "alibi"
            ? new AlibiPositions(AlibiPositions.StandardSlopes(heads))
            : new ShawRelativePositions(kt, vt);
        Tensor[] Run(AttentionKernel kernel, ScalarType dtype) => RelativePositionTests.GradientsOf(
            x => BlockSparseAttention.Attention(x[0], x[1], x[2], mask, keyMask, kernel: kernel, relative: Make(x[3], x[4])),
            upstream.to(dtype), [.. inputs.Select(x => x.to(dtype))]);
        var expected = Run(AttentionKernel.Ops, ScalarType.Float64);
        var fused = Run(AttentionKernel.Fused, ScalarType.Float32);
        var auto = Run(AttentionKernel.Auto, ScalarType.Float32);
        string[] names = ["output", "dq", "dk", "dv", "d key table", "d value table"];
        for (int n = 0; n < names.Length; n++)
        {
            TestSupport.AssertClose(expected[n].to(ScalarType.Float32), fused[n], names[n], atol: 2e-5, rtol: 2e-4);
            Assert.True(allclose(fused[n], auto[n], 0, 0), $"{names[n]}: Auto took another path than Fused");
        }
        if (terms == "shaw" && seqLen > 1)                                     // one key: its score term has no gradient
            Assert.True(fused[4].abs().sum().item<float>() > 0 && fused[5].abs().sum().item<float>() > 0, "both tables get gradients");
    }

    /// <summary>The far part alone is the fused kernel with Shaw's clipped row, so a pattern whose every pair is far from
    /// the diagonal (a dilated band) tests it without a near band; the near band alone is a window narrower than R.</summary>
    /// <summary>The near band in chunks of one or a few blocks (a chunk's first and last blocks need the key blocks of
    /// its neighbours, or zeros at the ends of the flattened block axis): the same outputs and gradients.</summary>
    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void NearBandInSmallChunksEqualsOps(int blocksPerChunk)
    {
        int saved = FusedRelativeAttention.NearChunkScores;
        try
        {
            foreach (var (batch, heads, seqLen, r, causal, padded) in new[] { (2, 2, 21, 3, true, true), (2, 3, 19, 2, false, true), (1, 2, 40, 4, false, false) })
            {
                int band = Math.Max(16, r), width = (causal ? 2 : 3) * band;
                FusedRelativeAttention.NearChunkScores = blocksPerChunk * band * width;
                FusedEqualsOpsInOutputsAndGradients("shaw", batch, heads, seqLen, 4, 1, r, causal, padded);
            }
        }
        finally { FusedRelativeAttention.NearChunkScores = saved; }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(5)]
    public void FarOnlyAndNearOnlyPatternsMatchOps(int r)
    {
        const int batch = 2, heads = 2, seqLen = 23, dim = 4;
        var gen = new Generator(3);
        Tensor Rand(params long[] shape) => randn(shape, dtype: ScalarType.Float32, generator: gen);
        Tensor[] inputs = [Rand(batch, heads, seqLen, dim), Rand(batch, heads, seqLen, dim), Rand(batch, heads, seqLen, dim),
                           Rand(2 * r + 1, dim), Rand(2 * r + 1, dim)];
        var upstream = Rand(batch, heads, seqLen, dim);
        var far = AttentionPattern.FromPredicate("far", isCausal: true, sameForAllHeads: false, (h, i, j, _) => i - j >= 3 + h && i - j < 9);
        foreach (var mask in new[] { far.Compile(seqLen, 4, heads), new WindowPattern(2, 1, 0, false, causal: true).Compile(seqLen, 2, heads) })
        {
            Tensor[] Run(AttentionKernel kernel, ScalarType dtype) => RelativePositionTests.GradientsOf(
                x => BlockSparseAttention.Attention(x[0], x[1], x[2], mask, kernel: kernel, relative: new ShawRelativePositions(x[3], x[4])),
                upstream.to(dtype), [.. inputs.Select(x => x.to(dtype))]);
            var expected = Run(AttentionKernel.Ops, ScalarType.Float64);
            var actual = Run(AttentionKernel.Fused, ScalarType.Float32);
            for (int n = 0; n < expected.Length; n++)
                TestSupport.AssertClose(expected[n].to(ScalarType.Float32), actual[n], $"{mask.Name} #{n}", atol: 2e-5, rtol: 2e-4);
        }
    }

    /// <summary>Causal ALiBi on a local window keeps float32 precision at any length: positions are counted from the start
    /// of the two segments a row can see, not from 0 (from 0 the scores would carry m·T and lose ~10⁻⁴ here).</summary>
    [Fact]
    public void AlibiOnALongLocalWindowKeepsFloat32Precision()
    {
        const int seqLen = 4096;
        var (q, k, v) = TestSupport.RandomQkv(1, 1, seqLen, 8, seed: 8, dtype: ScalarType.Float32);
        var mask = new WindowPattern(32, 1, 0, false, causal: true).Compile(seqLen, 32, 1);
        var alibi = new AlibiPositions([0.5]);
        using var _ = no_grad();
        var fused = BlockSparseAttention.Attention(q, k, v, mask, kernel: AttentionKernel.Fused, relative: alibi);
        var exact = BlockSparseAttention.Attention(q.to(ScalarType.Float64), k.to(ScalarType.Float64), v.to(ScalarType.Float64), mask,
            kernel: AttentionKernel.Ops, relative: alibi);
        TestSupport.AssertClose(exact.to(ScalarType.Float32), fused, "output", atol: 1e-5, rtol: 1e-5);
    }

    /// <summary>Rows whose keys are all padding get zeros and no NaN, as the other kernels give.</summary>
    [Fact]
    public void RowsWithNoKeyGetZeros()
    {
        var (q, k, v) = TestSupport.RandomQkv(1, 2, 9, 4, seed: 4, dtype: ScalarType.Float32);
        var mask = new WindowPattern(2, 1, 0, false, causal: true).Compile(9, 2, 2);
        var keyMask = ones(1, 9, dtype: ScalarType.Bool);
        keyMask[0, 0] = tensor(false);
        keyMask[0, 1] = tensor(false);
        var gen = new Generator(5);
        var shaw = new ShawRelativePositions(randn(5, 4, generator: gen), randn(5, 4, generator: gen));
        foreach (RelativePositionTerms terms in new RelativePositionTerms[] { shaw, new AlibiPositions([0.5, 0.25]) })
        {
            var output = BlockSparseAttention.Attention(q, k, v, mask, keyMask, kernel: AttentionKernel.Fused, relative: terms);
            output.sum().backward();
            Assert.True(output[0, .., 0].abs().sum().item<float>() == 0, "query 0 sees only padding");
            Assert.False(q.grad!.isnan().any().item<bool>());
            q.grad!.zero_(); k.grad!.zero_(); v.grad!.zero_();
        }
    }

    /// <summary>What the path caches with a mask outlives the dispose scope of the call that built it (a model forward).</summary>
    [Fact]
    public void CachedPartsOutliveTheFirstCallsDisposeScope()
    {
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 12, 4, seed: 6, dtype: ScalarType.Float32);
        var mask = new WindowPattern(4, 1, 0, false, causal: true).Compile(12, 4, 1);
        var gen = new Generator(7);
        var shaw = new ShawRelativePositions(randn(5, 4, generator: gen), randn(5, 4, generator: gen));
        Tensor first;
        using (var scope = NewDisposeScope())
            first = BlockSparseAttention.Attention(q, k, v, mask, kernel: AttentionKernel.Fused, relative: shaw).MoveToOuterDisposeScope();
        using (var scope = NewDisposeScope())
            Assert.True(allclose(first, BlockSparseAttention.Attention(q, k, v, mask, kernel: AttentionKernel.Fused, relative: shaw), 0, 0));
    }
}
