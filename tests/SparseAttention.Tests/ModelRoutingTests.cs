using SparseAttention.Clustering;
using SparseAttention.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests, routing part: the language model with routing heads: 1 local + 1 strided + 2 routing heads per layer
/// (the first layer local/static only, <c>SparsitySkipFirst = 1</c>).</summary>
public partial class ModelTests
{
    private static TransformerConfig WithRouting(bool causal = true, bool? sharedQk = null, int numMemKv = 0) => Tiny(causal) with
    {
        Depth = 3, NLocalAttnHeads = [1], SparsitySkipFirst = 1, SharedQk = sharedQk, NumMemKv = numMemKv,
        StaticHeadGroups = [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Strided, Size: 3), 1)],
    };

    private static Tensor RoutingTokens(long batch, long length, ulong seed) =>
        randint(0, 17, new long[] { batch, length }, generator: new Generator(seed));

    public static TheoryData<bool, bool, int> RoutingVariants() => new()
    {
        // shared QK, training mode, memory key/values per cluster
        { true, false, 0 },
        { true, true, 0 },
        { false, true, 2 },
        { false, false, 0 },
    };

    [Theory]
    [MemberData(nameof(RoutingVariants))]
    public void DecoderWithRoutingHeadsNeverSeesLaterTokens(bool sharedQk, bool training, int numMemKv)
    {
        random.manual_seed(3);
        var model = new RoutingTransformerLM(WithRouting(sharedQk: sharedQk, numMemKv: numMemKv));
        Assert.Equal(2, model.modules().OfType<OnlineKMeans>().Count());     // layers 1 and 2 route; layer 0 is skipped
        model.train(training);
        const int seqLen = 27;
        var tokens = RoutingTokens(2, seqLen, 5);
        // In training mode the first forward initialises the k-means (routing within that forward uses the
        // centroids it started with); compare forwards made with the same centroids, i.e. after it.
        model.forward(RoutingTokens(2, seqLen, 6));
        var (logits, _) = model.forward(tokens);
        foreach (int t in new[] { 0, 6, 13, 25 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = RoutingTokens(2, seqLen - t - 1, (ulong)(50 + t));
            var (changed, _) = model.forward(perturbed);
            TestSupport.AssertClose(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}", atol: 1e-5, rtol: 1e-5);
        }
    }

    [Fact]
    public void RoutingLanguageModelOverfitsAFixedBatchAndMovesItsCentroids()
    {
        random.manual_seed(17);
        var model = new RoutingTransformerLM(WithRouting());
        var tokens = RoutingTokens(4, 24, 18);
        var optimizer = optim.AdamW(model.parameters(), lr: 1e-2);
        model.train();
        float first = 0, last = 0, firstAux = 0;
        Tensor? meansBefore = null;
        for (int step = 0; step < 50; step++)
        {
            using var scope = NewDisposeScope();
            optimizer.zero_grad();
            var (logits, aux) = model.forward(tokens);
            var loss = LanguageModelLoss.NextToken(logits, tokens, aux);
            loss.backward();
            optimizer.step();
            if (step == 0)
            {
                meansBefore = model.modules().OfType<OnlineKMeans>().First().Means.clone().DetachFromDisposeScope();
                firstAux = aux.item<float>();
            }
            Assert.True(OnlineKMeans.UpdateAll(model) > 0);
            if (step == 0) first = loss.item<float>();
            last = loss.item<float>();
        }
        Assert.True(firstAux > 0, "routing heads report a commitment loss");
        Assert.True(last < 0.3f * first, $"loss went from {first} to {last}");
        var meansAfter = model.modules().OfType<OnlineKMeans>().First().Means;
        Assert.True((meansAfter - meansBefore!).abs().max().item<float>() > 0, "centroids never moved");
    }

    [Fact]
    public void GenerateWithRoutingHeadsFromOneTokenBeforeTraining()
    {
        random.manual_seed(4);
        var model = new RoutingTransformerLM(WithRouting());
        model.eval();
        var sample = model.Generate(tensor(new long[] { 3 }).view(1, 1), maxNewTokens: 40, seed: 1);   // crops at MaxSeqLen = 32
        Assert.Equal([1L, 40], sample.shape);
        Assert.True(sample.min().item<long>() >= 0 && sample.max().item<long>() < 17);
    }

    [Fact]
    public void EncoderWithRoutingHeadsUsesBalancedRoutingAndPaddingStaysOut()
    {
        random.manual_seed(5);
        var model = new RoutingTransformerLM(WithRouting(causal: false));
        model.eval();
        var tokens = RoutingTokens(2, 20, 9);
        var mask = ones(2, 20, dtype: ScalarType.Bool);
        mask[1, 15..] = tensor(false);
        var (logits, _) = model.forward(tokens, mask);
        Assert.False(logits.isnan().any().item<bool>());
        var other = tokens.clone();
        other[1, 15..] = tensor(0L);
        var (again, _) = model.forward(other, mask);
        TestSupport.AssertClose(logits[1, ..15], again[1, ..15], "padding changed real tokens", atol: 1e-5, rtol: 1e-5);
    }

    [Fact]
    public void KmeansNormReachesEveryRoutingModuleAndChangesTheRouting()
    {
        var baseline = WithRouting(sharedQk: true);
        var layerNorm = baseline with { KmeansNorm = KMeansNorm.LayerNorm };
        var a = Lm(baseline);
        var b = Lm(layerNorm);
        Assert.All(a.modules().OfType<OnlineKMeans>(), k => Assert.Equal(KMeansNorm.L2, k.Norm));
        Assert.All(b.modules().OfType<OnlineKMeans>(), k => Assert.Equal(KMeansNorm.LayerNorm, k.Norm));
        b.load_state_dict(a.state_dict());                                                  // same weights and centroids
        a.eval(); b.eval();
        var tokens = RoutingTokens(2, 24, 31);
        Assert.True(Differ(Logits(a, tokens), Logits(b, tokens)), "kmeans_norm changed nothing");
        Assert.Equal(KMeansNorm.LayerNorm, SparseAttention.Training.ConfigBinding.Apply(baseline, ["kmeans_norm=LayerNorm"]).KmeansNorm);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void RoutingLookBackKeepsTheDecoderCausal(bool sharedQk)
    {
        var config = WithRouting(sharedQk: sharedQk) with { RoutingLookBack = true };
        var model = Lm(config, seed: 21);
        Assert.All(model.modules().OfType<SparseAttention.Modules.RoutingAttention>(), r => Assert.True(r.LookBackward));
        model.train();
        const int seqLen = 32;
        model.forward(RoutingTokens(2, seqLen, 40));                                         // initialises the k-means
        var tokens = RoutingTokens(2, seqLen, 41);
        var logits = model.forward(tokens).Logits.detach();
        foreach (int t in new[] { 3, 15, 30 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = RoutingTokens(2, seqLen - t - 1, (ulong)(60 + t));
            TestSupport.AssertClose(logits[.., ..(t + 1)], model.forward(perturbed).Logits.detach()[.., ..(t + 1)], $"logits up to {t}", atol: 1e-5, rtol: 1e-5);
        }
        Assert.Equal("RoutingLookBack", Assert.ThrowsAny<ArgumentException>(() => (config with { Causal = false }).Validate()).ParamName);
        Assert.Equal("RoutingLookBack", Assert.ThrowsAny<ArgumentException>(() => (config with { NumMemKv = 2 }).Validate()).ParamName);
    }
}
