using SparseAttention.Clustering;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class OnlineKMeansTests
{
    private static Tensor Rows(params double[][] rows) =>
        tensor(rows.SelectMany(r => r).ToArray(), new long[] { 1, 1, rows.Length, rows[0].Length });  // (1, 1, T, D)

    private static OnlineKMeans HandMade(double decay)
    {
        var kmeans = new OnlineKMeans(heads: 1, dim: 2, clusters: 2, emaDecay: decay, commitmentFactor: 0.5);
        kmeans.to(ScalarType.Float64);
        kmeans.SetMeans(tensor(new double[] { 1, 0, 0, 1 }, new long[] { 1, 2, 2 }));
        return kmeans;
    }

    private static Tensor RandomBatch(long seed, long batch = 2, long heads = 2, long seqLen = 9, long dim = 4) =>
        randn(new long[] { batch, heads, seqLen, dim }, dtype: ScalarType.Float64, generator: new Generator((ulong)seed));

    [Fact]
    public void EmaStepAndCommitmentLossOnAHandMadeExample()
    {
        var kmeans = HandMade(decay: 0.5);
        kmeans.train();
        // (1, 0) and (0.8, 0.6) are nearest to centroid 0; centroid 1 = (0, 1) gets nothing.
        var output = kmeans.forward(Rows([1, 0], [0.8, 0.6]), null);
        Assert.Equal(new long[] { 0, 0 }, output.Nearest.data<long>().ToArray());
        // Commitment: 0.5 · mean over 2 tokens × 2 dims of squared distance = 0.5 · (0 + 0.04 + 0.36) / 4.
        Assert.Equal(0.5 * 0.4 / 4, output.Loss.item<double>(), 12);
        TestSupport.AssertClose(tensor(new double[] { 1, 0, 0.8, 0.6 }).view(1, 2, 2), output.Similarities.view(1, 2, 2), "similarities");

        Assert.True(kmeans.HasPendingStatistics);
        TestSupport.AssertClose(tensor(new double[] { 1, 0, 0, 1 }).view(1, 2, 2), kmeans.Means, "no step before Update()");
        Assert.True(kmeans.Update());
        Assert.False(kmeans.HasPendingStatistics);
        // batch mean of cluster 0 = (0.9, 0.3); 0.5·(1, 0) + 0.5·(0.9, 0.3) = (0.95, 0.15), then L2-normalised.
        double n = Math.Sqrt(0.95 * 0.95 + 0.15 * 0.15);
        TestSupport.AssertClose(tensor(new double[] { 0.95 / n, 0.15 / n, 0, 1 }).view(1, 2, 2), kmeans.Means, "means after one step");
        Assert.False(kmeans.Update());                                               // nothing pending
    }

    [Fact]
    public void PaddingNeverMovesCentroidsNorEntersTheLoss()
    {
        var clean = HandMade(decay: 0.5);
        var padded = HandMade(decay: 0.5);
        var cleanOut = clean.forward(Rows([1, 0], [0.8, 0.6]), null);
        // Same tokens with two padded ones that would go to centroid 1 (one of them NaN).
        var x = Rows([0, 1], [1, 0], [double.NaN, double.NaN], [0.8, 0.6]);
        var keyMask = tensor(new[] { false, true, false, true }).view(1, 4);
        var paddedOut = padded.forward(x, keyMask);
        Assert.Equal(new long[] { -1, 0, -1, 0 }, paddedOut.Nearest.data<long>().ToArray());
        Assert.Equal(cleanOut.Loss.item<double>(), paddedOut.Loss.item<double>(), 14);
        Assert.False(paddedOut.Similarities.isnan().any().item<bool>());
        clean.Update();
        padded.Update();
        TestSupport.AssertClose(clean.Means, padded.Means, "means");
        TestSupport.AssertClose(tensor(new double[] { 0, 1 }), padded.Means[0, 1], "empty centroid 1 keeps its mean");
    }

    [Theory]
    [InlineData(KMeansNorm.L2)]
    [InlineData(KMeansNorm.LayerNorm)]
    public void CentroidsStayNormalised(KMeansNorm norm)
    {
        var kmeans = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, emaDecay: 0.7, norm: norm, seed: 5);
        kmeans.to(ScalarType.Float64);
        for (int step = 0; step < 4; step++)
        {
            kmeans.forward(RandomBatch(step) * 3 + 1, null);
            kmeans.Update();
            var means = kmeans.Means;
            if (norm == KMeansNorm.L2)
                TestSupport.AssertClose(ones(2, 3, dtype: ScalarType.Float64), means.norm(-1), $"L2 norms, step {step}");
            else
            {
                TestSupport.AssertClose(zeros(2, 3, dtype: ScalarType.Float64), means.mean(new long[] { -1 }), $"means, step {step}", atol: 1e-9);
                TestSupport.AssertClose(ones(2, 3, dtype: ScalarType.Float64), means.var(-1, unbiased: false), $"variances, step {step}", atol: 1e-4);
            }
        }
    }

    [Fact]
    public void EvalModeChangesNothing()
    {
        var kmeans = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, seed: 2);
        kmeans.to(ScalarType.Float64);
        kmeans.eval();
        var before = kmeans.Means;
        var output = kmeans.forward(RandomBatch(1), null);                 // uninitialised: uses the seeded random centroids
        Assert.False(kmeans.IsInitialized);
        Assert.False(kmeans.HasPendingStatistics);
        Assert.False(kmeans.Update());
        TestSupport.AssertClose(before, kmeans.Means, "uninitialised means", atol: 0, rtol: 0);
        Assert.False(output.Similarities.isnan().any().item<bool>());
        Assert.Equal(new long[] { 2, 2, 9 }, output.Nearest.shape);

        // Once initialised, eval still changes nothing, even with UpdateOnForward.
        kmeans.train();
        kmeans.forward(RandomBatch(2), null);
        kmeans.Update();
        kmeans.UpdateOnForward = true;
        kmeans.eval();
        var trained = kmeans.Means;
        kmeans.forward(RandomBatch(3), null);
        Assert.False(kmeans.HasPendingStatistics);
        TestSupport.AssertClose(trained, kmeans.Means, "trained means", atol: 0, rtol: 0);
    }

    [Fact]
    public void UninitialisedCentroidsAreDeterministicUnderTheSeed()
    {
        var a = new OnlineKMeans(2, 4, 3, seed: 9);
        var b = new OnlineKMeans(2, 4, 3, seed: 9);
        var c = new OnlineKMeans(2, 4, 3, seed: 10);
        TestSupport.AssertClose(a.Means, b.Means, "same seed", atol: 0, rtol: 0);
        Assert.False(allclose(a.Means, c.Means));
        TestSupport.AssertClose(ones(2, 3), a.Means.norm(-1), "normalised");
        // Initialisation from data is deterministic too.
        foreach (var m in new[] { a, b }) { m.to(ScalarType.Float64); m.forward(RandomBatch(4), null); }
        Assert.True(a.IsInitialized);
        TestSupport.AssertClose(a.Means, b.Means, "same seed, same batch", atol: 0, rtol: 0);
    }

    [Fact]
    public void InitialisationUsesOnlyRealTokensAndAnAllPaddingBatchLeavesItUninitialised()
    {
        var kmeans = new OnlineKMeans(heads: 1, dim: 3, clusters: 2, seed: 1);
        kmeans.to(ScalarType.Float64);
        var x = RandomBatch(5, batch: 1, heads: 1, seqLen: 6, dim: 3);
        kmeans.forward(x, zeros(1, 6, dtype: ScalarType.Bool));
        Assert.False(kmeans.IsInitialized);
        Assert.False(kmeans.HasPendingStatistics);

        // Real tokens along +e0 and +e1; padding (NaN, and a huge −e2) must not become a centroid.
        var data = x.clone();
        data[0, 0, 0] = tensor(new double[] { 1, 0.1, 0 }); data[0, 0, 1] = tensor(new double[] { 1, -0.1, 0 });
        data[0, 0, 2] = tensor(new double[] { 0.1, 1, 0 }); data[0, 0, 3] = tensor(new double[] { -0.1, 1, 0 });
        data[0, 0, 4] = tensor(new double[] { double.NaN, 0, 0 }); data[0, 0, 5] = tensor(new double[] { 0, 0, -100 });
        var keyMask = tensor(new[] { true, true, true, true, false, false }).view(1, 6);
        kmeans.forward(data, keyMask);
        Assert.True(kmeans.IsInitialized);
        var means = kmeans.Means[0];                                               // (2, 3)
        Assert.False(means.isnan().any().item<bool>());
        var sorted = means[.., 0].argsort();
        TestSupport.AssertClose(tensor(new double[] { 0, 1, 0, 1, 0, 0 }).view(2, 3), means.index_select(0, sorted), "two clusters e1, e0", atol: 1e-12);
    }

    [Fact]
    public void AccumulatedMicroBatchesThenUpdateEqualOneStepOnTheirUnion()
    {
        var micro = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, emaDecay: 0.6, seed: 3);
        micro.to(ScalarType.Float64);
        micro.forward(RandomBatch(10), null);                                    // initialise
        micro.Update();
        var union = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, emaDecay: 0.6, seed: 99);
        union.to(ScalarType.Float64);
        union.SetMeans(micro.Means);

        var batches = Enumerable.Range(0, 4).Select(i => RandomBatch(20 + i, batch: 2, seqLen: 7)).ToArray();
        var masks = Enumerable.Range(0, 4).Select(i => (arange(7) + i).remainder(3).ne(0).view(1, 7).expand(2, 7).contiguous()).ToArray();
        var start = micro.Means;
        foreach (var (x, m) in batches.Zip(masks)) micro.forward(x, m);
        TestSupport.AssertClose(start, micro.Means, "micro-batches route with fixed centroids", atol: 0, rtol: 0);
        micro.Update();

        union.forward(cat(batches, 0), cat(masks, 0));
        union.Update();
        TestSupport.AssertClose(union.Means, micro.Means, "one step on the union");
        Assert.False(allclose(start, micro.Means));                               // it did move

        // UpdateOnForward instead takes one step per forward: different from the single step above.
        var eager = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, emaDecay: 0.6) { UpdateOnForward = true };
        eager.to(ScalarType.Float64);
        eager.SetMeans(start);
        foreach (var (x, m) in batches.Zip(masks)) eager.forward(x, m);
        Assert.False(eager.HasPendingStatistics);
        Assert.False(allclose(eager.Means, micro.Means));
    }

    [Fact]
    public void SuspendedUpdatesNeitherInitialiseNorAccumulate()
    {
        var kmeans = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, seed: 4) { UpdateOnForward = true };
        kmeans.to(ScalarType.Float64);
        var before = kmeans.Means;
        using (OnlineKMeans.SuspendUpdates(kmeans))
        {
            Assert.True(kmeans.UpdatesSuspended);
            kmeans.forward(RandomBatch(1), null);
        }
        Assert.False(kmeans.UpdatesSuspended);
        Assert.False(kmeans.IsInitialized);
        TestSupport.AssertClose(before, kmeans.Means, "suspended", atol: 0, rtol: 0);
        kmeans.forward(RandomBatch(1), null);
        Assert.True(kmeans.IsInitialized);
        Assert.Equal(0, OnlineKMeans.UpdateAll(kmeans));                          // already applied on forward
    }

    [Fact]
    public void StateDictRoundTripRestoresIdenticalOutputs()
    {
        var trained = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, seed: 6, norm: KMeansNorm.LayerNorm);
        trained.to(ScalarType.Float64);
        trained.forward(RandomBatch(1), null);
        trained.forward(RandomBatch(2), null);
        trained.Update();
        Assert.Equal(new[] { "initted", "means" }, trained.state_dict().Keys.Order().ToArray());

        var stream = new MemoryStream();
        trained.save(stream);
        var restored = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, seed: 7, norm: KMeansNorm.LayerNorm);
        restored.to(ScalarType.Float64);
        Assert.False(restored.IsInitialized);
        restored.load(new MemoryStream(stream.ToArray()));
        Assert.True(restored.IsInitialized);
        TestSupport.AssertClose(trained.Means, restored.Means, "means", atol: 0, rtol: 0);

        // Also through state_dict / load_state_dict; then outputs agree exactly.
        var viaDict = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, seed: 8, norm: KMeansNorm.LayerNorm);
        viaDict.to(ScalarType.Float64);
        viaDict.load_state_dict(trained.state_dict());
        foreach (var m in new[] { trained, restored, viaDict }) m.eval();
        var x = RandomBatch(3);
        var expected = trained.forward(x, null);
        foreach (var other in new[] { restored, viaDict })
        {
            var actual = other.forward(x, null);
            TestSupport.AssertClose(expected.Similarities, actual.Similarities, "similarities", atol: 0, rtol: 0);
            Assert.True(expected.Nearest.eq(actual.Nearest).all().item<bool>());
            Assert.Equal(expected.Loss.item<double>(), actual.Loss.item<double>());
        }
    }

    [Fact]
    public void CommitmentLossPullsInputsTowardTheirCentroids()
    {
        var kmeans = HandMade(decay: 0.9);
        kmeans.eval();
        var x = Rows([0.8, 0.6]).requires_grad_(true);
        var loss = kmeans.forward(x, null).Loss;
        loss.backward();
        // Moving x along −grad (within the unit circle) must reduce the distance to centroid 0 = (1, 0).
        var step = x.detach() - x.grad!;
        var after = kmeans.forward(step, null).Loss.item<double>();
        Assert.True(after < loss.item<double>());
    }

    [Fact]
    public void BadInputNamesTheArgument()
    {
        var kmeans = new OnlineKMeans(heads: 2, dim: 4, clusters: 3);
        string Param(Action a) => Assert.Throws<ArgumentException>(a).ParamName!;
        Assert.Equal("x", Param(() => kmeans.forward(zeros(1, 3, 5, 4), null)));
        Assert.Equal("x", Param(() => kmeans.forward(zeros(1, 2, 5, 3), null)));
        Assert.Equal("x", Param(() => kmeans.forward(zeros(new long[] { 1, 2, 5, 4 }, dtype: ScalarType.Int64), null)));
        Assert.Equal("keyMask", Param(() => kmeans.forward(zeros(1, 2, 5, 4), ones(1, 4, dtype: ScalarType.Bool))));
        Assert.Equal("keyMask", Param(() => kmeans.forward(zeros(1, 2, 5, 4), ones(1, 5))));
        Assert.Equal("newMeans", Param(() => kmeans.SetMeans(zeros(2, 4, 4))));
        Assert.Equal("clusters", Param(() => new OnlineKMeans(2, 4, 0)));
        Assert.Equal("heads", Param(() => new OnlineKMeans(0, 4, 2)));
        Assert.Equal("dim", Param(() => new OnlineKMeans(2, -1, 2)));
        Assert.Equal("emaDecay", Param(() => new OnlineKMeans(2, 4, 2, emaDecay: 1.0)));
        Assert.Equal("commitmentFactor", Param(() => new OnlineKMeans(2, 4, 2, commitmentFactor: -1)));
        Assert.Equal("initIterations", Param(() => new OnlineKMeans(2, 4, 2, initIterations: -1)));
    }
}
