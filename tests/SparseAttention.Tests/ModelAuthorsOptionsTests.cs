using SparseAttention.Clustering;
using SparseAttention.Model;
using SparseAttention.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests: options of the Routing Transformer authors' code — centroids trained by gradient
/// (kmeans_ema = false), the sinusoidal timing signal, input and target dropout.</summary>
public partial class ModelTests
{
    private static TransformerConfig TinyRouting() => Tiny() with { NLocalAttnHeads = [2], StaticHeadGroups = null, WindowSize = 4 };

    [Fact]
    public void GradientTrainedCentroidsAreAParameterPulledTowardTheirTokens()
    {
        var kmeans = new OnlineKMeans(heads: 2, dim: 4, clusters: 3, commitmentFactor: 0.1, seed: 71);
        kmeans.TrainCentroidsByGradient();
        kmeans.to(ScalarType.Float64);
        Assert.False(kmeans.Ema);
        Assert.Equal(["means"], kmeans.named_parameters().Select(p => p.name));
        Assert.DoesNotContain(kmeans.named_buffers(), b => b.name == "means");
        Assert.Contains("means", kmeans.state_dict().Keys);
        kmeans.train();
        var x = randn(new long[] { 2, 2, 7, 4 }, dtype: ScalarType.Float64, generator: new Generator(72));
        var mask = ones(2, 7, dtype: ScalarType.Bool).index_put_(tensor(false), TensorIndex.Single(1), TensorIndex.Slice(5));
        kmeans.forward(x, mask);                                                            // initialises from data
        Assert.True(kmeans.IsInitialized);
        Assert.False(kmeans.HasPendingStatistics);                                         // no EMA statistics
        // Move the parameter off the unit sphere: the forward routes with normalise(means).
        var means = kmeans.parameters().Single();
        using (no_grad()) means.mul_(tensor(new double[] { 2, 0.5, 3 }).view(1, 3, 1));

        // Oracle: explicit gather of each real token's nearest normalised centroid.
        var leafMeans = means.detach().clone().requires_grad_(true);
        var xLeaf = x.detach().clone().requires_grad_(true);
        var c = nn.functional.normalize(leafMeans, p: 2, dim: -1);                          // (H, C, D)
        var xn = nn.functional.normalize(xLeaf, p: 2, dim: -1);                             // (B, H, T, D)
        var nearest = einsum("bhtd,hcd->bhtc", xn, c).argmax(-1);                           // (B, H, T)
        var picked = c.unsqueeze(0).expand(2, -1, -1, -1).gather(2, nearest.unsqueeze(-1).expand(-1, -1, -1, 4));   // (B, H, T, D)
        var real = mask.view(2, 1, 7, 1).to(ScalarType.Float64);
        double elements = real.sum().item<double>() * 2 * 4;
        var expected = (0.1 * ((xn - picked.detach()).square() * real).sum() + ((xn.detach() - picked).square() * real).sum()) / elements;
        expected.backward();

        means.grad?.zero_();
        var xModule = x.detach().clone().requires_grad_(true);
        var loss = kmeans.forward(xModule, mask).Loss;
        loss.backward();
        Assert.Equal(expected.item<double>(), loss.item<double>(), 10);
        TestSupport.AssertClose(leafMeans.grad!, means.grad!, "centroid gradient");
        TestSupport.AssertClose(xLeaf.grad!, xModule.grad!, "input gradient");
        TestSupport.AssertClose(c.detach(), kmeans.Means, "Means are the normalised parameter");
        Assert.False(kmeans.Update());
    }

    [Fact]
    public void ModelsWithGradientTrainedCentroidsTrainTheirCentroids()
    {
        var config = TinyRouting() with { KmeansEma = false };
        var model = Lm(config, seed: 73);
        var centroids = model.named_parameters().Where(p => p.name.EndsWith("means")).Select(p => p.parameter).ToList();
        Assert.Equal(2, centroids.Count);                                                   // one routing group per layer
        Assert.Equal(ParameterCount(Lm(TinyRouting(), seed: 73)) + centroids.Sum(c => c.numel()), ParameterCount(model));
        var tokens = Tokens(4, 16, 17, 18);
        model.train();
        model.forward(tokens);                                                              // initialises from data
        var before = centroids.Select(c => c.detach().clone()).ToList();
        AssertOverfits(model, tokens);
        Assert.All(centroids.Zip(before), pair => Assert.False(pair.First.allclose(pair.Second), "centroids did not move"));
    }

    [Fact]
    public void TheTimingSignalHasTheHandComputedValues()
    {
        // 5 channels: 2 timescales 1 and 10⁻⁴, then sin, sin, cos, cos, 0.
        var signal = TimingSignal.Of(tensor(new long[] { 0, 3 }).view(1, 2), 5, ScalarType.Float64);
        Assert.Equal([1L, 2, 5], signal.shape);
        double[] expected = [0, 0, 1, 1, 0, Math.Sin(3), Math.Sin(3e-4), Math.Cos(3), Math.Cos(3e-4), 0];
        var actual = signal.data<double>().ToArray();
        for (int i = 0; i < expected.Length; i++) Assert.True(Math.Abs(expected[i] - actual[i]) < 1e-12, $"channel {i % 5} of position {i / 5}: {actual[i]}, expected {expected[i]}");
        // One timescale: 10000^0 = 1.
        Assert.Equal(Math.Sin(2), TimingSignal.Of(tensor(new long[] { 2 }).view(1, 1), 2, ScalarType.Float64)[0, 0, 0].item<double>(), 12);
    }

    [Fact]
    public void AddTimingSignalEqualsAFixedAbsolutePositionTableHoldingTheSignal()
    {
        var timing = Lm(Tiny() with { AddTimingSignal = true }, seed: 74);
        var table = Lm(Tiny() with { UseAbsolutePosEmb = true }, seed: 75);
        Assert.Equal(ParameterCount(timing) + 32L * 16, ParameterCount(table));            // the signal has no parameters
        var source = timing.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using (no_grad())
            foreach (var (name, p) in table.named_parameters())
                p.copy_(name == "pos_emb.weight" ? TimingSignal.Of(arange(32L).unsqueeze(0), 16).squeeze(0) : source[name]);
        var tokens = Tokens(2, 11, 17, 76);
        timing.eval(); table.eval();
        using var noGrad = no_grad();
        TestSupport.AssertClose(table.forward(tokens).Logits, timing.forward(tokens).Logits, "timing signal");
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void InputAndTargetDropoutDropTheEmbeddingInTrainingOnly(bool causal)
    {
        var plain = Tiny(causal) with { StaticHeadGroups = null, NLocalAttnHeads = [4] };
        var config = causal ? plain with { TargetDropout = 0.5 } : plain with { InputDropout = 0.5 };
        var dropped = Lm(config, seed: 77);
        var tokens = Tokens(2, 9, 17, 78);
        dropped.train();
        using var noGrad = no_grad();
        Assert.False(dropped.forward(tokens).Logits.allclose(dropped.forward(tokens).Logits));   // a new mask per forward
        var reference = Lm(plain, seed: 77);
        reference.train();
        Assert.True(reference.forward(tokens).Logits.allclose(reference.forward(tokens).Logits));
        dropped.eval(); reference.eval();
        TestSupport.AssertClose(reference.forward(tokens).Logits, dropped.forward(tokens).Logits, "evaluation");
    }

    [Fact]
    public void AuthorsOptionsAreValidatedByName()
    {
        AssertRejectedBy(Tiny(causal: true) with { InputDropout = 0.1 }, nameof(TransformerConfig.InputDropout));
        AssertRejectedBy(Tiny(causal: false) with { TargetDropout = 0.1 }, nameof(TransformerConfig.TargetDropout));
        AssertRejectedBy(Tiny(causal: false) with { InputDropout = 1 }, nameof(TransformerConfig.InputDropout));
        AssertRejectedBy(Tiny(causal: true) with { TargetDropout = -0.1 }, nameof(TransformerConfig.TargetDropout));
        var json = System.Text.Json.JsonSerializer.Deserialize<TransformerConfig>(
            """{"causal": true, "kmeans_ema": false, "add_timing_signal": true, "target_dropout": 0.25}""")!;
        Assert.Equal((false, true, 0.25), (json.KmeansEma, json.AddTimingSignal, json.TargetDropout));
        // Every new key is reachable from --set (ConfigBinding).
        var set = ConfigBinding.Apply(Tiny(), ["moe_layers=[1,2]", "moe_num_experts=3", "moe_loss_coef=0.5", "pkm_num_keys=7", "pkm_topk=2",
            "pkm_heads=1", "pkm_dim_head=8", "kmeans_ema=false", "add_timing_signal=true", "target_dropout=0.1", "context_shared_qk=false"]);
        Assert.Equal([1, 2], set.MoeLayers!);
        Assert.Equal((3, 0.5, 7, 2, 1, 8), (set.MoeNumExperts, set.MoeLossCoef, set.PkmNumKeys, set.PkmTopK, set.PkmHeads, set.PkmDimHead));
        Assert.Equal((false, true, 0.1), (set.KmeansEma, set.AddTimingSignal, set.TargetDropout));
        Assert.Equal([2], ConfigBinding.Apply(Tiny(), ["pkm_layers=[2]"]).PkmLayers!);
        Assert.Equal(0.2, ConfigBinding.Apply(Tiny(causal: false), ["input_dropout=0.2"]).InputDropout);
    }
}
