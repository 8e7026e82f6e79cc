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
            AssertSame(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}");
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void HashedClusterHeadsKeepTheDecoderCausalWithoutAnAuxiliaryLoss(bool sharedQk)
    {
        random.manual_seed(3);
        var model = new RoutingTransformerLM(WithRouting(sharedQk: sharedQk, numMemKv: sharedQk ? 0 : 1) with { HashItems = true });
        model.train();
        const int seqLen = 27;
        var tokens = RoutingTokens(2, seqLen, 5);
        var (logits, aux) = model.forward(tokens);
        Assert.Equal(0.0, aux.item<float>());
        Assert.All(model.modules().OfType<OnlineKMeans>(), k => Assert.False(k.IsInitialized || k.HasPendingStatistics));
        foreach (int t in new[] { 0, 6, 13, 25 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = RoutingTokens(2, seqLen - t - 1, (ulong)(50 + t));
            var (changed, _) = model.forward(perturbed);
            AssertSame(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}");
        }
        AssertRejectedBy(WithRouting() with { HashItems = true, NumClusters = 3 }, nameof(TransformerConfig.HashItems));
    }

    /// <summary>sparsity_cluster_strided_num_heads: an encoder with strided cluster heads runs forward and backward with
    /// finite gradients reaching every projection; decoders and too many strided heads are refused by name.</summary>
    [Fact]
    public void StridedClusterHeadsTrainInAnEncoderAndAreRefusedInADecoder()
    {
        random.manual_seed(4);
        var config = WithRouting(causal: false) with { NLocalAttnHeads = [0], StaticHeadGroups = null, SparsityClusterStridedNumHeads = 1 };
        var model = new RoutingTransformerLM(config);
        model.train();
        var (logits, aux) = model.forward(RoutingTokens(2, 23, 8));
        (logits.square().mean() + aux).backward();
        var grads = model.named_parameters().Where(p => p.name.Contains("to_q") || p.name.Contains("to_qk")).Select(p => p.parameter.grad).ToList();
        Assert.NotEmpty(grads);
        Assert.All(grads, g => Assert.True(g is not null && g.isfinite().all().item<bool>() && g.abs().sum().item<float>() > 0));
        AssertRejectedBy(WithRouting() with { SparsityClusterStridedNumHeads = 1 }, nameof(TransformerConfig.SparsityClusterStridedNumHeads));
        AssertRejectedBy(config with { SparsityClusterStridedNumHeads = config.Heads + 1 }, nameof(TransformerConfig.SparsityClusterStridedNumHeads));
        AssertRejectedBy(config with { SparsityClusterStridedNumHeads = -1 }, nameof(TransformerConfig.SparsityClusterStridedNumHeads));
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

    /// <summary>Weight-tied layers share one k-means: layer 2 must route with the centroids the model forward began with,
    /// not with centroids layer 1 just initialised (or, with UpdateOnForward, moved) from this batch's future tokens.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void WeightTiedRoutingStaysCausalInTheForwardThatInitialisesOrMovesTheCentroids(bool updateOnForward)
    {
        var config = WithRouting() with { WeightTie = true, SparsitySkipFirst = 0 };
        const int seqLen = 27;
        var tokens = RoutingTokens(2, seqLen, 5);
        RoutingTransformerLM Fresh()
        {
            var model = Lm(config, seed: 3);
            Assert.Single(model.modules().OfType<OnlineKMeans>().Distinct());   // one k-means for every layer
            foreach (var k in model.modules().OfType<OnlineKMeans>()) k.UpdateOnForward = updateOnForward;
            model.train();
            return model;
        }
        foreach (int t in new[] { 0, 6, 13, 25 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = RoutingTokens(2, seqLen - t - 1, (ulong)(50 + t));
            var (a, b) = (Fresh(), Fresh());
            // The initialising forward.
            AssertSame(Logits(a, tokens)[.., ..(t + 1)], Logits(b, perturbed)[.., ..(t + 1)], $"initialising forward, logits up to {t}");
            if (!updateOnForward) continue;
            // Both now hold centroids initialised from their own batch: give them the same ones, then a forward that
            // steps the EMA after layer 1 (before the fix) must still route layer 2 with the centroids it began with.
            var shared = a.modules().OfType<OnlineKMeans>().First().Means;
            foreach (var k in b.modules().OfType<OnlineKMeans>()) k.SetMeans(shared);
            foreach (var k in a.modules().OfType<OnlineKMeans>()) k.SetMeans(shared);
            AssertSame(Logits(a, tokens)[.., ..(t + 1)], Logits(b, perturbed)[.., ..(t + 1)], $"updating forward, logits up to {t}");
        }
    }

    /// <summary>The PyTorch library's README loop — forward, backward, step, zero_grad, nothing else — moves the centroids;
    /// AutoUpdate = false leaves that to the caller.</summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void APlainTrainingLoopMovesTheCentroidsOncePerStep(bool autoUpdate)
    {
        var model = Lm(WithRouting(), seed: 17);
        foreach (var k in model.modules().OfType<OnlineKMeans>()) k.AutoUpdate = autoUpdate;
        var optimizer = optim.AdamW(model.parameters(), lr: 1e-3);
        var kmeans = model.modules().OfType<OnlineKMeans>().First();
        model.train();
        var centroids = new List<Tensor>();
        for (int step = 0; step < 4; step++)
        {
            var tokens = RoutingTokens(2, 24, (ulong)(30 + step));
            var (logits, aux) = model.forward(tokens);
            LanguageModelLoss.NextToken(logits, tokens, aux).backward();
            optimizer.step();
            optimizer.zero_grad();
            centroids.Add(kmeans.Means);
        }
        Assert.True(kmeans.IsInitialized);
        for (int step = 1; step < 4; step++)
        {
            bool moved = (centroids[step] - centroids[step - 1]).abs().max().item<float>() > 0;
            Assert.True(moved == autoUpdate, $"step {step}: centroids {(moved ? "moved" : "stayed")} with AutoUpdate = {autoUpdate}");
        }
    }

    /// <summary>Two micro-batches of gradient accumulation then one optimizer step: the automatic update is one EMA step over
    /// both micro-batches, exactly what an explicit UpdateAll after the step gives.</summary>
    [Fact]
    public void AutomaticUpdatesUnderGradientAccumulationEqualOneExplicitUpdatePerStep()
    {
        var (automatic, manual) = (Lm(WithRouting(), seed: 21), Lm(WithRouting(), seed: 21));
        foreach (var k in manual.modules().OfType<OnlineKMeans>()) k.AutoUpdate = false;
        var batches = Enumerable.Range(0, 5).Select(i => RoutingTokens(2, 24, (ulong)(60 + i))).ToArray();
        Tensor Run(RoutingTransformerLM model, bool explicitUpdates)
        {
            var optimizer = optim.AdamW(model.parameters(), lr: 1e-3);
            model.train();
            void Backward(Tensor tokens)
            {
                var (logits, aux) = model.forward(tokens);
                LanguageModelLoss.NextToken(logits, tokens, aux).backward();
            }
            for (int step = 0; step < 2; step++)
            {
                optimizer.zero_grad();
                Backward(batches[2 * step]);          // micro-batch 1
                Backward(batches[2 * step + 1]);      // micro-batch 2
                optimizer.step();
                if (explicitUpdates) OnlineKMeans.UpdateAll(model);
            }
            optimizer.zero_grad();
            return Logits(model, batches[4]);        // the automatic model applies its pending step here
        }
        var (a, m) = (Run(automatic, explicitUpdates: false), Run(manual, explicitUpdates: true));
        AssertSame(m, a, "logits after two accumulated steps");
        var pairs = automatic.modules().OfType<OnlineKMeans>().Zip(manual.modules().OfType<OnlineKMeans>());
        foreach (var (x, y) in pairs) AssertSame(y.Means, x.Means, "centroids");
    }

    /// <summary>Causal routing with separate query and key clusters can leave a query without any earlier key in its cluster's
    /// chunk (output exactly zero); by default such models get one memory key/value per cluster, so every query attends.</summary>
    [Fact]
    public void CausalRoutingWithoutSharedQkGivesEveryQuerySomethingToAttendByDefault()
    {
        var separate = WithRouting(sharedQk: false) with { NumMemKv = null };
        Assert.Equal(1, separate.ResolvedNumMemKv);
        Assert.Equal(0, (separate with { NumMemKv = 0 }).ResolvedNumMemKv);                  // an explicit choice is kept
        Assert.Equal(0, WithRouting(sharedQk: true).ResolvedNumMemKv);
        Assert.Equal(0, (separate with { RoutingLookBack = true }).Validate().ResolvedNumMemKv);
        Assert.Equal(0, (separate with { Causal = false }).ResolvedNumMemKv);
        Assert.Equal(1, Lm(separate).modules().OfType<Modules.RoutingAttention>().First().NumMemKv);

        int EmptyRows(int memKv)
        {
            var routing = new Modules.RoutingAttention(2, 4, 32, 4, causal: true, sharedQk: false, numMemKv: memKv, seed: 5);
            routing.eval();
            var gen = new Generator(9);
            Tensor Random() => randn(new long[] { 2, 2, 32, 4 }, generator: gen);
            var output = routing.forward(Random(), Random(), Random() + 3, null).Output;          // values away from 0
            return (int)output.abs().sum(-1).eq(0).sum().item<long>();
        }
        Assert.True(EmptyRows(memKv: 0) > 0, "the case exists: some query has no key to attend");
        Assert.Equal(0, EmptyRows(memKv: 1));
    }

    /// <summary>kmeans_attend_normalized: the routing heads attend with the layer-normalised q and k (the authors'
    /// variant), not only cluster them.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void RoutingHeadsCanAttendWithTheLayerNormalisedQueriesAndKeys(bool sharedQk)
    {
        var config = WithRouting(sharedQk: sharedQk) with { KmeansNorm = KMeansNorm.LayerNorm, KmeansAttendNormalized = true, NumMemKv = 0 };
        random.manual_seed(8);
        var group = new RoutingHeadGroup(config.Validate(), heads: 2, layer: 1);
        var plain = new RoutingHeadGroup((config with { KmeansAttendNormalized = false }).Validate(), heads: 2, layer: 1);
        plain.load_state_dict(group.state_dict());
        group.eval(); plain.eval();
        var gen = new Generator(12);
        Tensor Random() => randn(new long[] { 2, 2, 32, 4 }, generator: gen) * 3 + 1;          // off-centre, not unit length
        var (q, k, v) = (Random(), Random(), Random());
        var output = group.Forward(q, k, v, null).Output;
        Tensor LayerNorm(Tensor x) => nn.functional.layer_norm(x, [4], null, null, 1e-5);       // written out, not the module's
        var expected = group.Routing.forward(LayerNorm(q), sharedQk ? null : LayerNorm(k), v).Output;
        TestSupport.AssertClose(expected, output, "attends with layer-normalised q and k", atol: 1e-6, rtol: 1e-5);
        Assert.True(Differ(output, plain.Forward(q, k, v, null).Output), "the switch changes what the heads attend with");
    }

    /// <summary>What attn_dropout does, exactly: for routing, LSH and block-sparse static heads (the kernels never form
    /// probabilities) it drops elements of each head group's output, with the global generator, before the output
    /// projection — bit for bit the same as dropout applied to the group's output without attention dropout.</summary>
    [Fact]
    public void AttentionDropoutDropsEachHeadGroupsOutput()
    {
        const double p = 0.3;
        var config = WithRouting() with { AttnDropout = p, Lsh = new LshSpec { Heads = 1, NHashes = 2, BucketSize = 4 } };
        var groups = new (HeadGroupAttention With, HeadGroupAttention Without)[]
        {
            (new RoutingHeadGroup(config.Validate(), 2, 1), new RoutingHeadGroup((config with { AttnDropout = 0 }).Validate(), 2, 1)),
            (new LshHeadGroup(config.Validate(), 1, 1), new LshHeadGroup((config with { AttnDropout = 0 }).Validate(), 1, 1)),
            (new StaticPatternAttention(2, 4, new Patterns.StridedPattern(3, causal: true), blockSize: 8, dropout: p),
             new StaticPatternAttention(2, 4, new Patterns.StridedPattern(3, causal: true), blockSize: 8, dropout: 0)),
        };
        foreach (var (with, without) in groups)
        {
            without.load_state_dict(with.state_dict());
            foreach (var kmeans in with.modules().OfType<OnlineKMeans>().Concat(without.modules().OfType<OnlineKMeans>()))
                kmeans.SetMeans(randn(kmeans.Heads, kmeans.Clusters, kmeans.Dim, generator: new Generator(4)));   // initialised: no draw in forward
            with.train(); without.train();
            int heads = with.Heads;
            var gen = new Generator(13);
            Tensor Random() => randn(new long[] { 2, heads, 32, 4 }, generator: gen);
            var (q, k, v) = (Random(), Random(), Random());
            random.manual_seed(99);
            var dropped = with.Forward(q, k, v, null).Output;
            var plain = without.Forward(q, k, v, null).Output;
            random.manual_seed(99);
            AssertSame(nn.functional.dropout(plain, p, true), dropped, $"{with.GetType().Name}: attention dropout");
            Assert.True(dropped.eq(0).sum().item<long>() > 0, "some outputs were dropped");
        }
    }

    /// <summary>num_clusters decouples the number of centroids from MaxSeqLen / WindowSize (the authors' sparsity_cluster_size).</summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void NumClustersSetsTheCentroidsPerHead(bool causal)
    {
        var config = WithRouting(causal) with { NumClusters = 5, WindowSize = 6 };       // 32 is not a multiple of 6: fine here
        var model = Lm(config.Validate());
        var routing = model.modules().OfType<Modules.RoutingAttention>().First();
        Assert.Equal(5, routing.Clusters);
        Assert.Equal([2L, 5, 4], routing.KMeans.Means.shape);                           // (H, C, D)
        model.train();
        var (logits, aux) = model.forward(RoutingTokens(2, 32, 3));
        Assert.Equal([2L, 32, 17], logits.shape);
        Assert.True(logits.isfinite().all().item<bool>() && aux.item<float>() > 0);
        Assert.Equal("NumClusters", Assert.ThrowsAny<ArgumentException>(() => (config with { NumClusters = 0 }).Validate()).ParamName);
        Assert.Equal("WindowSize", Assert.ThrowsAny<ArgumentException>(() => (config with { NumClusters = null }).Validate()).ParamName);
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
            AssertSame(logits[.., ..(t + 1)], model.forward(perturbed).Logits.detach()[.., ..(t + 1)], $"logits up to {t}");
        }
        Assert.Equal("RoutingLookBack", Assert.ThrowsAny<ArgumentException>(() => (config with { Causal = false }).Validate()).ParamName);
        Assert.Equal("RoutingLookBack", Assert.ThrowsAny<ArgumentException>(() => (config with { NumMemKv = 2 }).Validate()).ParamName);
    }

    /// <summary>Relative positions on routing heads: the decoder stays causal (bit-exact, in the forward that initialises the
    /// k-means too), the routing group's own Shaw tables get gradients, and the combinations the
    /// kernels cannot run are refused by name.</summary>
    [Theory]
    [InlineData(PositionalEncoding.RelativeShaw)]
    [InlineData(PositionalEncoding.Alibi)]
    public void RelativePositionsOnRoutingHeadsKeepTheDecoderCausalAndTrainTheirTables(PositionalEncoding positions)
    {
        var config = WithRouting(sharedQk: false) with { PositionalEncoding = positions, MaxRelativePosition = 3 };
        var model = Lm(config, seed: 23);
        var routingGroups = model.modules().OfType<RoutingHeadGroup>().ToArray();
        Assert.NotEmpty(routingGroups);
        model.train();
        const int seqLen = 32;
        var tokens = RoutingTokens(2, seqLen, 43);
        var logits = model.forward(tokens).Logits;                                           // initialises the k-means
        if (positions == PositionalEncoding.RelativeShaw)
        {
            logits.sum().backward();
            foreach (var group in routingGroups)
                foreach (string table in new[] { "rel_k", "rel_v" })
                {
                    var grad = group.named_parameters().Single(p => p.name == table).parameter.grad;
                    Assert.True(grad is not null && grad.abs().sum().item<float>() > 0, $"{table} of a routing group gets no gradient");
                }
        }
        model.eval();
        var reference = model.forward(tokens).Logits.detach();
        foreach (int t in new[] { 3, 15, 30 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = RoutingTokens(2, seqLen - t - 1, (ulong)(70 + t));
            AssertSame(reference[.., ..(t + 1)], model.forward(perturbed).Logits.detach()[.., ..(t + 1)], $"logits up to {t}");
        }
        Assert.Equal("RoutingLookBack", Assert.ThrowsAny<ArgumentException>(() => (config with { RoutingLookBack = true, NumMemKv = 0 }).Validate()).ParamName);
        Assert.Equal("Kernel", Assert.ThrowsAny<ArgumentException>(() => (config with { Kernel = SparseAttention.Kernels.AttentionKernel.Fused }).Validate()).ParamName);
    }
}
