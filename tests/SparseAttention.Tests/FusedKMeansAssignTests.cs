using SparseAttention.Clustering;
using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>The fused k-means assignment (float32 CPU, no similarities) against the tensor-ops path it replaces:
/// nearest centroids, commitment loss, gradients through the normalisation, accumulated statistics, initialisation.</summary>
public class FusedKMeansAssignTests
{
    private static OnlineKMeans Make(int heads, int dim, int clusters, KMeansNorm norm, bool fused, Tensor? means)
    {
        var kmeans = new OnlineKMeans(heads, dim, clusters, emaDecay: 0.5, commitmentFactor: 1.0, norm: norm, seed: 7) { UseFusedAssign = fused };
        kmeans.train();
        if (means is not null) kmeans.SetMeans(means);
        return kmeans;
    }

    /// <summary>Nearest centroids must agree except where the two best similarities tie to float32 rounding.</summary>
    private static void AssertSameNearest(Tensor expected, Tensor actual, Tensor x, Tensor centroids, OnlineKMeans kmeans, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        var differ = expected.ne(actual);                                                         // (B, H, T)
        if (!differ.any().item<bool>()) return;
        using var _ = no_grad();
        var sims = einsum("bhtd,hcd->bhtc", kmeans.Normalize(x.to(ScalarType.Float64)), centroids.to(ScalarType.Float64)); // (B, H, T, C)
        var gap = (sims.gather(-1, expected.clamp_min(0).unsqueeze(-1)) - sims.gather(-1, actual.clamp_min(0).unsqueeze(-1))).abs().squeeze(-1);
        Assert.True(gap.masked_select(differ).max().item<double>() < 1e-5, $"{what}: {differ.sum().item<long>()} tokens routed differently beyond a near tie");
    }

    public static TheoryData<int, int, int, int, int, int, bool, KMeansNorm> Sizes => new()
    {
        // batch, heads, T, D, clusters, parts, padding, norm
        { 2, 3, 37, 24, 5, 2, true, KMeansNorm.L2 },
        { 2, 3, 37, 24, 5, 2, true, KMeansNorm.LayerNorm },
        { 1, 1, 1, 8, 3, 1, false, KMeansNorm.L2 },
        { 1, 1, 1, 8, 3, 2, false, KMeansNorm.LayerNorm },
        { 1, 2, 1100, 64, 40, 2, false, KMeansNorm.L2 },
        { 3, 1, 50, 7, 33, 1, true, KMeansNorm.L2 },
    };

    [Theory]
    [MemberData(nameof(Sizes))]
    public void FusedMatchesOps(int batch, int heads, int seqLen, int dim, int clusters, int partCount, bool padding, KMeansNorm norm)
    {
        var gen = new Generator(11);
        var means = randn(new long[] { heads, clusters, dim }, generator: gen);
        var inputs = Enumerable.Range(0, partCount).Select(_ => randn(new long[] { batch, heads, seqLen, dim }, generator: gen)).ToArray();
        Tensor? mask = padding ? rand(new long[] { batch, seqLen }, generator: gen).gt(0.3) : null;
        if (mask is not null) mask[0, 0] = tensor(false);

        var results = new List<(Tensor[] Nearest, Tensor Loss, Tensor[] Grads, Tensor Means)>();
        var modules = new List<OnlineKMeans>();
        foreach (bool fused in new[] { false, true })
        {
            var kmeans = Make(heads, dim, clusters, norm, fused, means);
            modules.Add(kmeans);
            var parts = inputs.Select(x => x.clone().requires_grad_(true)).ToArray();
            var (_, sims, nearest, loss) = kmeans.ForwardParts(parts, mask, similarities: false, normalized: false);
            Assert.All(sims, s => Assert.Equal(0, s.numel()));
            // Scaled by the element count so the gradients are O(1) and the default float32 tolerances bite.
            double elements = (mask is null ? batch * seqLen : mask.sum().item<long>()) * (double)partCount * heads * dim;
            (loss * elements).backward();
            Assert.True(kmeans.Update());
            results.Add((nearest, loss.detach(), parts.Select(p => p.grad!.detach()).ToArray(), kmeans.Means));
        }
        var (ops, fast) = (results[0], results[1]);
        for (int p = 0; p < partCount; p++)
        {
            AssertSameNearest(ops.Nearest[p], fast.Nearest[p], inputs[p], modules[0].Normalize(means), modules[0], $"part {p} nearest");
            if (mask is not null)
            {
                Assert.True(fast.Nearest[p].masked_select(mask.logical_not().unsqueeze(1).expand(batch, heads, seqLen)).eq(-1).all().item<bool>(), "padding → −1");
                Assert.True(fast.Grads[p].masked_select(mask.logical_not().view(batch, 1, seqLen, 1).expand(batch, heads, seqLen, dim)).eq(0).all().item<bool>(), "padding gets no gradient");
            }
        }
        bool sameRouting = Enumerable.Range(0, partCount).All(p => ops.Nearest[p].equal(fast.Nearest[p]).all().item<bool>());
        Assert.True(sameRouting, "random data should have no near ties at these sizes");
        TestSupport.AssertClose(ops.Loss, fast.Loss, "loss");
        for (int p = 0; p < partCount; p++)
            TestSupport.AssertClose(ops.Grads[p], fast.Grads[p], $"part {p} gradient");
        TestSupport.AssertClose(ops.Means, fast.Means, "means after Update");
    }

    [Theory]
    [InlineData(KMeansNorm.L2)]
    [InlineData(KMeansNorm.LayerNorm)]
    public void InitialisingForwardMatchesOps(KMeansNorm norm)
    {
        var gen = new Generator(5);
        var q = randn(new long[] { 2, 2, 45, 16 }, generator: gen);
        var k = randn(new long[] { 2, 2, 45, 16 }, generator: gen);
        var mask = rand(new long[] { 2, 45 }, generator: gen).gt(0.2);
        var after = new List<Tensor>();
        var nearest = new List<Tensor>();
        foreach (bool fused in new[] { false, true })
        {
            var kmeans = Make(2, 16, 6, norm, fused, null);
            var r = kmeans.ForwardParts([q, k], mask, similarities: false, normalized: false);
            Assert.True(kmeans.IsInitialized);
            kmeans.Update();
            after.Add(kmeans.Means);
            nearest.Add(cat(r.Nearest, 2));
        }
        Assert.True(nearest[0].equal(nearest[1]).all().item<bool>(), "the initialising forward routes with the seeded centroids");
        TestSupport.AssertClose(after[0], after[1], "means after initialisation and update");
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]                                                    // the tensor-ops path, the fused one's oracle
    public void NaNInPaddingStaysHidden(bool fused)
    {
        var gen = new Generator(3);
        var x = randn(new long[] { 2, 2, 20, 8 }, generator: gen);
        var mask = ones(2, 20, dtype: ScalarType.Bool);
        mask[1, TensorIndex.Slice(15, null)] = tensor(false);
        x[1, TensorIndex.Colon, TensorIndex.Slice(15, null)] = tensor(float.NaN);
        var kmeans = Make(2, 8, 4, KMeansNorm.L2, fused: fused, randn(new long[] { 2, 4, 8 }, generator: gen));
        var xg = x.requires_grad_(true);
        var r = kmeans.ForwardParts([xg], mask, similarities: false, normalized: false);
        r.Loss.backward();
        Assert.False(r.Loss.isnan().item<bool>());
        Assert.False(xg.grad!.isnan().any().item<bool>());
        kmeans.Update();
        Assert.False(kmeans.Means.isnan().any().item<bool>());
    }

    [Fact]
    public void ResultDoesNotDependOnThreads()
    {
        var gen = new Generator(9);
        var x = randn(new long[] { 2, 3, 2100, 16 }, generator: gen);
        var centroids = randn(new long[] { 3, 9, 16 }, generator: gen);
        var one = FusedKMeansAssign.Assign(x, null, centroids, KMeansNorm.L2, threads: 1);
        var four = FusedKMeansAssign.Assign(x, null, centroids, KMeansNorm.L2, threads: 4);
        Assert.True(one.Nearest.equal(four.Nearest).all().item<bool>());
        Assert.True(one.Sums.equal(four.Sums).all().item<bool>());
        Assert.True(one.Squared.equal(four.Squared).item<bool>());
    }

    [Theory]
    [InlineData(false, true)]
    [InlineData(true, true)]
    [InlineData(false, false)]
    [InlineData(true, false)]
    public void CausalRoutingAttentionMatchesOpsPath(bool sharedQk, bool withAux)
    {
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 70, 16, seed: 21, dtype: ScalarType.Float32);
        var upstream = randn(2, 2, 70, 16, generator: new Generator(22));
        var mask = ones(2, 70, dtype: ScalarType.Bool);
        mask[1, TensorIndex.Slice(60, null)] = tensor(false);
        var outputs = new List<(Tensor Out, Tensor Qi, Tensor Ki, Tensor Loss, Tensor Dq, Tensor Dk, Tensor Dv)>();
        foreach (bool fused in new[] { false, true })
        {
            using var routing = new RoutingAttention(2, 16, 70, 16, causal: true, sharedQk: sharedQk, commitmentFactor: 1000.0);  // k-means gradients as large as attention's
            routing.KMeans.UseFusedAssign = fused;
            routing.KMeans.SetMeans(randn(new long[] { 2, routing.Clusters, 16 }, generator: new Generator(23)));
            var (q2, k2, v2) = (q.detach().clone().requires_grad_(true), k.detach().clone().requires_grad_(true), v.detach().clone().requires_grad_(true));
            var r = routing.forward(q2, sharedQk ? null : k2, v2, mask);
            var objective = (r.Output * upstream).sum();
            (withAux ? objective + r.AuxLoss : objective).backward();             // without: the loss's gradient is undefined
            outputs.Add((r.Output.detach(), r.QueryIndices, r.KeyIndices, r.AuxLoss.detach(), q2.grad!, sharedQk ? zeros(1) : k2.grad!, v2.grad!));
        }
        var (a, b) = (outputs[0], outputs[1]);
        Assert.True(a.Qi.equal(b.Qi).all().item<bool>(), "query memberships");
        Assert.True(a.Ki.equal(b.Ki).all().item<bool>(), "key memberships");
        TestSupport.AssertClose(a.Out, b.Out, "output");
        TestSupport.AssertClose(a.Loss, b.Loss, "aux loss");
        TestSupport.AssertClose(a.Dq, b.Dq, "dq");
        TestSupport.AssertClose(a.Dk, b.Dk, "dk");
        TestSupport.AssertClose(a.Dv, b.Dv, "dv");
    }
}
