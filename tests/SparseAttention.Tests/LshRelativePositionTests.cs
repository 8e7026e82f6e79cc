using SparseAttention.Hashing;
using SparseAttention.Kernels;
using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Relative-position terms on LSH / ALSH heads (on original positions): the module against one dense softmax over the
/// implied multiset of pairs (<see cref="LshAttentionTests.ImpliedCounts"/>: the test's own reading of the LSH rules,
/// score + log count) with the same terms — outputs and the gradients of q, k, v and the Shaw tables.
/// </summary>
public sealed class LshRelativePositionTests
{
    private const int Dim = 4, MaxDistance = 2;

    public static TheoryData<string, bool, int, bool, AlshTransform?, bool> Cases() => new()
    {
        // terms, causal, nHashes, dedup, alsh, padded
        { "shaw", true, 1, false, null, false },
        { "shaw", false, 2, false, null, true },
        { "shaw", true, 3, true, null, true },
        { "shaw", true, 2, false, AlshTransform.SimpleLsh, true },
        { "alibi", true, 2, false, null, true },
        { "alibi", false, 2, true, AlshTransform.Xbox, false },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void LshWithRelativeTermsEqualsTheDenseOracle(string terms, bool causal, int nHashes, bool dedup, AlshTransform? alsh, bool padded)
    {
        const int batch = 2, heads = 2, T = 15, bucketSize = 4;
        var module = new LshAttention(heads, Dim, maxSeqLen: 32, bucketSize, nHashes, nBuckets: 4, causal: causal, dedup: dedup,
            alsh: alsh, seed: 3) { Kernel = AttentionKernel.Auto };
        module.to(ScalarType.Float64);
        var gen = new Generator(17);
        Tensor Rand(params long[] shape) => randn(shape, dtype: ScalarType.Float64, generator: gen);
        Tensor[] inputs = [Rand(batch, heads, T, Dim), Rand(batch, heads, T, Dim), Rand(batch, heads, T, Dim),
                           Rand(2 * MaxDistance + 1, Dim), Rand(2 * MaxDistance + 1, Dim)];
        var upstream = Rand(batch, heads, T, Dim);
        Tensor? keyMask = null;
        if (padded)
        {
            keyMask = ones(batch, T, dtype: ScalarType.Bool);
            keyMask[0, 2] = tensor(false);
            keyMask[batch - 1, (T - 3)..] = tensor(false);
        }
        bool sharedQk = alsh is null;
        RelativePositionTerms Make(Tensor kt, Tensor vt) => terms == "alibi" ? new AlibiPositions([0.7, 0.3]) : new ShawRelativePositions(kt, vt);
        var buckets = module.forward(inputs[0], sharedQk ? null : inputs[1], inputs[2], keyMask);
        var counts = LshAttentionTests.ImpliedCounts(buckets.QueryBuckets, buckets.KeyBuckets, keyMask, bucketSize, causal, sharedQk,
            acrossBuckets: true, dedup);

        Tensor Oracle(Tensor[] x)
        {
            var keys = sharedQk ? x[0] / x[0].norm(-1, keepdim: true).clamp_min(1e-6) : x[1];
            var mask = counts.gt(0);                                                     // (B, H, T, T)
            if (sharedQk)
            {
                var alone = mask.any(-1).logical_not();                                  // itself only when nothing else
                if (keyMask is not null) alone = alone.logical_and(keyMask.view(batch, 1, T));
                mask = mask.logical_or(alone.unsqueeze(-1).logical_and(eye(T, dtype: ScalarType.Bool)));
            }
            var output = ReferenceAttention.Attention(x[0], keys, x[2], mask, keyMask: keyMask, bias: counts.clamp_min(1).log(),
                relative: Make(x[3], x[4]));
            return keyMask is null ? output : output.masked_fill(keyMask.logical_not().view(batch, 1, T, 1), 0);
        }
        var expected = RelativePositionTests.GradientsOf(Oracle, upstream, inputs);
        var actual = RelativePositionTests.GradientsOf(x => module.forward(x[0], sharedQk ? null : x[1], x[2], keyMask, Make(x[3], x[4])).Output, upstream, inputs);
        string[] names = ["output", "dq", "dk", "dv", "d key table", "d value table"];
        for (int n = 0; n < names.Length; n++) TestSupport.AssertClose(expected[n], actual[n], names[n]);
        if (terms == "shaw") Assert.True(actual[4].abs().sum().item<double>() > 0, "the key table gets a gradient");
        var plain = module.forward(inputs[0], sharedQk ? null : inputs[1], inputs[2], keyMask).Output;
        Assert.False(allclose(plain, actual[0]), "the terms change the output");
    }

    /// <summary>The LSH head group's probabilities (the identity-column trick) stay the forward's weights with Shaw's value
    /// term: the output is the same, each real row sums to 1, and the probabilities rebuild the output with the value table.</summary>
    [Fact]
    public void HeadGroupProbabilitiesWithShawRebuildTheOutput()
    {
        const int T = 11;
        var config = new Model.TransformerConfig
        {
            NumTokens = 16, Dim = 8, Heads = 2, MaxSeqLen = 16, Causal = true,
            PositionalEncoding = Model.PositionalEncoding.RelativeShaw, MaxRelativePosition = 2, Lsh = new Model.LshSpec { Heads = 2, BucketSize = 4 },
        };
        var group = new Model.LshHeadGroup(config, 2, layer: 0);
        group.to(ScalarType.Float64).eval();
        var (q, k, v) = TestSupport.RandomQkv(1, 2, T, 4, seed: 9);
        var output = group.Forward(q, k, v, null).Output;
        var (again, _, probabilities) = group.ForwardWithProbabilities(q, k, v, null);
        TestSupport.AssertClose(output, again, "output");
        TestSupport.AssertClose(ones(1, 2, T, dtype: ScalarType.Float64), probabilities.sum(-1), "row sums");
        var table = group.named_parameters().Single(p => p.name == "rel_v").parameter;      // (2R + 1, D)
        var row = (RelativePositionTerms.DenseDistance(T, CPU).clamp(-2, 2) + 2);          // (T, T)
        var valueTerm = (probabilities.unsqueeze(-1) * table[row]).sum(-2);                // (1, 2, T, D)
        TestSupport.AssertClose(output, matmul(probabilities, v) + valueTerm, "rebuilt");
    }

    /// <summary>The fused kernel takes Shaw and ALiBi on LSH heads (equal to Ops in float32) and refuses a term it does
    /// not know by name.</summary>
    [Fact]
    public void FusedKernelTakesShawAndAlibiOnLshAndRefusesOtherTermsByName()
    {
        var module = new LshAttention(2, Dim, maxSeqLen: 16, 4, seed: 1);
        var (q, _, v) = TestSupport.RandomQkv(1, 2, 8, Dim, seed: 2, dtype: ScalarType.Float32);
        var gen = new Generator(3);
        var shaw = new ShawRelativePositions(randn(new long[] { 2 * MaxDistance + 1, Dim }, generator: gen), randn(new long[] { 2 * MaxDistance + 1, Dim }, generator: gen));
        foreach (var terms in new RelativePositionTerms[] { new AlibiPositions([0.5, 0.25]), shaw })
        {
            module.Kernel = AttentionKernel.Ops;
            var ops = module.forward(q, null, v, null, terms).Output;
            module.Kernel = AttentionKernel.Fused;
            TestSupport.AssertClose(ops, module.forward(q, null, v, null, terms).Output, terms.GetType().Name);
        }
        var e = Assert.Throws<ArgumentException>(() => module.forward(q, null, v, null, new Offset()));
        Assert.Equal("relative", e.ParamName);
    }

    private sealed class Offset : RelativePositionTerms
    {
        public override int? Heads => null;
        public override Tensor AddToScores(Tensor scaledScores, Tensor q, Tensor distance, double scale) => scaledScores + 1;
    }
}
