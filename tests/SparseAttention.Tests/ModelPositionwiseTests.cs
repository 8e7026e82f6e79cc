using SparseAttention.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests: the position-wise sublayers other than the feed-forward — mixture of experts (moe_layers) and
/// product-key memory (pkm_layers) — against dense oracles, and inside the model.</summary>
public partial class ModelTests
{
    private static TransformerConfig TinyMoe() => Tiny() with { MoeLayers = [2], MoeNumExperts = 3 };

    private static TransformerConfig TinyPkm() => Tiny() with { PkmLayers = [1], PkmNumKeys = 6, PkmTopK = 3, PkmHeads = 2, PkmDimHead = 4 };

    /// <summary>Loss sum(output · upstream) backpropagated; returns the output and the gradients of x and of every parameter.</summary>
    private static Dictionary<string, Tensor> OutputAndGradients(nn.Module module, Tensor x, Func<Tensor, Tensor> forward, Tensor upstream)
    {
        module.zero_grad();
        var leaf = x.detach().clone().requires_grad_(true);
        var output = forward(leaf);
        (output * upstream).sum().backward();
        var result = new Dictionary<string, Tensor> { ["output"] = output.detach(), ["grad x"] = leaf.grad!.detach() };
        foreach (var (name, p) in module.named_parameters())
            result[$"grad {name}"] = p.grad?.detach().clone() ?? zeros(1, dtype: x.dtype);
        return result;
    }

    /// <summary>Validation of <paramref name="config"/> fails with an ArgumentException naming <paramref name="field"/>.</summary>
    internal static void AssertRejectedBy(TransformerConfig config, string field) =>
        Assert.Equal(field, Assert.ThrowsAny<ArgumentException>(() => config.Validate()).ParamName);

    private static void AssertSameEntries(Dictionary<string, Tensor> expected, Dictionary<string, Tensor> actual, string what)
    {
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        foreach (var (name, value) in expected) TestSupport.AssertClose(value, actual[name], $"{what}: {name}");
    }

    // ------------------------------------------------------------------------------------------
    // Mixture of experts
    // ------------------------------------------------------------------------------------------

    /// <summary>Every expert on every token, combined with a weight matrix that keeps each token's two largest gate
    /// probabilities (found by sorting), renormalised.</summary>
    private static Tensor MoeOracle(MixtureOfExperts moe, Tensor x)
    {
        var probs = x.matmul(moe.GateWeight).softmax(-1);                                  // (B, T, E)
        var order = probs.argsort(-1, descending: true);                                   // (B, T, E)
        var keep = zeros_like(probs).scatter(-1, order.narrow(-1, 0, 2), ones_like(probs).narrow(-1, 0, 2));
        var kept = probs * keep;
        var weights = kept / kept.sum(-1, keepdim: true);                                  // (B, T, E)
        var output = zeros_like(x);
        for (int e = 0; e < moe.NumExperts; e++)
            output = output + moe.Experts[e].forward(x) * weights.narrow(-1, e, 1);
        return output;
    }

    [Theory]
    [InlineData(2, false)]
    [InlineData(3, true)]
    [InlineData(5, true)]
    public void MixtureOfExpertsEqualsEveryExpertOnEveryTokenWeightedByTheTopTwoGates(int experts, bool glu)
    {
        random.manual_seed(41);
        var moe = new MixtureOfExperts(6, experts, 0.01, () => new FeedForward(6, mult: 2, glu: glu));
        moe.to(ScalarType.Float64);
        var x = randn(new long[] { 2, 7, 6 }, dtype: ScalarType.Float64, generator: new Generator(42));
        var upstream = randn(new long[] { 2, 7, 6 }, dtype: ScalarType.Float64, generator: new Generator(43));
        var expected = OutputAndGradients(moe, x, t => MoeOracle(moe, t), upstream);
        var actual = OutputAndGradients(moe, x, t => moe.forward(t).Output, upstream);
        AssertSameEntries(expected, actual, $"{experts} experts");
        // Every parameter takes part: the gate through the weights, each expert through its tokens.
        foreach (var (name, grad) in actual.Where(kv => kv.Key.StartsWith("grad ")))
            Assert.True(grad.abs().sum().item<double>() > 0, $"{name} got no gradient");
    }

    [Fact]
    public void LoadBalancingLossHasTheHandComputedValue()
    {
        // Gate probabilities of four tokens over two experts; first choices 0, 0, 1, 0.
        var probs = tensor(new double[] { 0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.6, 0.4 }).view(1, 4, 2);
        var first = tensor(new long[] { 0, 0, 1, 0 }).view(1, 4);
        // density = (3/4, 1/4), proxy = (2.6/4, 1.4/4): 2² · mean(3/4 · 0.65, 1/4 · 0.35) = 4 · 0.2875.
        Assert.Equal(1.15, MixtureOfExperts.LoadBalancingLoss(probs, first, null).item<double>(), 12);
        // The last token is padding: density = (2/3, 1/3), proxy = (2/3, 1/3): 4 · mean(4/9, 1/9) = 10/9.
        var mask = tensor(new[] { true, true, true, false }).view(1, 4);
        Assert.Equal(10.0 / 9, MixtureOfExperts.LoadBalancingLoss(probs, first, mask).item<double>(), 12);
        // Balanced routing gives 1; a second sequence is averaged in.
        var balanced = full(new long[] { 1, 4, 2 }, 0.5, dtype: ScalarType.Float64);
        Assert.Equal(1.0, MixtureOfExperts.LoadBalancingLoss(balanced, tensor(new long[] { 0, 1, 0, 1 }).view(1, 4), null).item<double>(), 12);
        var two = MixtureOfExperts.LoadBalancingLoss(cat([probs, balanced], 0), cat([first, tensor(new long[] { 0, 1, 0, 1 }).view(1, 4)], 0), null);
        Assert.Equal((1.15 + 1.0) / 2, two.item<double>(), 12);
    }

    [Fact]
    public void MixtureOfExpertsReportsTheLoadBalancingLossTimesItsCoefficient()
    {
        // dim 1, gate weight (1, −1): logits (x, −x), so p₀ = sigmoid(2x).
        var moe = new MixtureOfExperts(1, 2, 0.25, () => new FeedForward(1));
        moe.to(ScalarType.Float64);
        using (no_grad()) moe.GateWeight.copy_(tensor(new double[] { 1, -1 }).view(1, 2));
        double[] xs = [1.0, 0.5, -1.0, 0.2];
        var (_, aux) = moe.forward(tensor(xs).view(1, 4, 1));
        double[] p0 = xs.Select(v => 1 / (1 + Math.Exp(-2 * v))).ToArray();
        double density0 = 3.0 / 4, density1 = 1.0 / 4;                                     // first choices 0, 0, 1, 0
        double proxy0 = p0.Average(), proxy1 = 1 - proxy0;
        double expected = 0.25 * 4 * (density0 * proxy0 + density1 * proxy1) / 2;
        Assert.Equal(expected, aux.item<double>(), 12);
    }

    [Fact]
    public void MixtureOfExpertsLayersAddTheirLossToTheAuxiliaryLossAndTrain()
    {
        var config = TinyMoe();
        var model = Lm(config, seed: 44);
        Assert.IsType<MixtureOfExperts>(model.Transformer.Blocks[1].Positionwise);
        Assert.IsType<FeedForward>(model.Transformer.Blocks[0].Positionwise);
        var tokens = Tokens(3, 13, 17, 45);
        // Tiny has no routing heads, so the auxiliary loss is the mixture's alone: coefficient × a positive balance term.
        var (_, aux) = model.forward(tokens);
        Assert.True(aux.item<float>() > 0, $"aux = {aux.item<float>()}");
        var (_, none) = Lm(config with { MoeLossCoef = 0 }, seed: 44).forward(tokens);
        Assert.Equal(0f, none.item<float>());
        AssertOverfits(Lm(config with { MoeLayers = [1, 2] }, seed: 46), Tokens(4, 16, 17, 18));
    }

    [Fact]
    public void TheLoadBalancingLossGradientReachesTheGate()
    {
        var model = Lm(TinyMoe(), seed: 47);
        var (_, aux) = model.forward(Tokens(2, 9, 17, 48));
        aux.backward();
        var gate = model.named_parameters().Single(p => p.name.EndsWith("w_gating")).parameter;
        Assert.True(gate.grad!.abs().sum().item<float>() > 0);
    }

    // ------------------------------------------------------------------------------------------
    // Product-key memory
    // ------------------------------------------------------------------------------------------

    /// <summary>Brute force: the score of every one of the numKeys² product keys, the topK best of them, softmax,
    /// weighted sum of their values, summed over heads.</summary>
    private static Tensor PkmOracle(ProductKeyMemory pkm, Tensor x, int topK)
    {
        var q = pkm.Queries(x);                                                            // (B, T, H, 2, Dh)
        long numKeys = pkm.Keys.shape[1];
        var first = einsum("bthd,hnd->bthn", q.select(3, 0), pkm.Keys.select(2, 0));       // (B, T, H, n)
        var second = einsum("bthd,hnd->bthn", q.select(3, 1), pkm.Keys.select(2, 1));     // (B, T, H, n)
        var all = (first.unsqueeze(-1) + second.unsqueeze(-2)).flatten(-2);               // (B, T, H, n²): index i·n + j
        Assert.Equal(numKeys * numKeys, all.shape[^1]);
        var (scores, index) = all.topk(topK, dim: -1);                                     // (B, T, H, k)
        var rows = pkm.Values.index_select(0, index.flatten()).view([.. index.shape, -1]); // (B, T, H, k, dim)
        return (rows * scores.softmax(-1).unsqueeze(-1)).sum([2, 3]);                      // (B, T, dim)
    }

    [Theory]
    [InlineData(5, 3, 2)]
    [InlineData(7, 7, 1)]
    [InlineData(4, 1, 3)]
    public void ProductKeyMemoryEqualsABruteForceSearchOverAllProductKeys(int numKeys, int topK, int heads)
    {
        random.manual_seed(51);
        var pkm = new ProductKeyMemory(6, numKeys, topK, heads, dimHead: 4);
        pkm.to(ScalarType.Float64);
        var x = randn(new long[] { 2, 5, 6 }, dtype: ScalarType.Float64, generator: new Generator(52));
        var upstream = randn(new long[] { 2, 5, 6 }, dtype: ScalarType.Float64, generator: new Generator(53));
        var expected = OutputAndGradients(pkm, x, t => PkmOracle(pkm, t, topK), upstream);
        var actual = OutputAndGradients(pkm, x, pkm.forward, upstream);
        AssertSameEntries(expected, actual, $"{numKeys} keys, top {topK}, {heads} heads");
        // With one slot its softmax weight is 1, so the scores (keys, queries) get no gradient; values always do.
        foreach (var name in topK > 1 ? ["grad keys", "grad values.weight", "grad to_queries.weight", "grad x"] : new[] { "grad values.weight" })
            Assert.True(actual[name].abs().sum().item<double>() > 0, $"{name} got no gradient");
    }

    [Fact]
    public void ProductKeyMemoryLayersTrain()
    {
        var config = TinyPkm();
        var model = Lm(config, seed: 54);
        Assert.IsType<ProductKeyMemory>(model.Transformer.Blocks[0].Positionwise);
        Assert.Equal([6L * 6, 16], Shapes(model)["transformer.layers.0.ff.values.weight"]);
        Assert.Equal([2L, 6, 2, 4], Shapes(model)["transformer.layers.0.ff.keys"]);
        AssertOverfits(model, Tokens(4, 16, 17, 18));
    }

    [Fact]
    public void ReversibleLayersWithExpertsAndMemoriesRecomputeTheSameGradients()
    {
        var config = TinyMoe() with { PkmLayers = [1], PkmNumKeys = 5, PkmTopK = 2, PkmHeads = 2, PkmDimHead = 4, Reversible = true };
        var tokens = Tokens(2, 11, 17, 55);
        var mask = ones(2, 11, dtype: ScalarType.Bool).index_put_(tensor(false), TensorIndex.Single(1), TensorIndex.Slice(8));
        var plain = RunReversible(Lm(config, seed: 56), tokens, mask, recompute: false, steps: 1);
        var recomputed = RunReversible(Lm(config, seed: 56), tokens, mask, recompute: true, steps: 1);
        Assert.Contains(plain, kv => kv.Key.EndsWith("w_gating"));
        for (int i = 0; i < plain.Count; i++)
            TestSupport.AssertClose(plain[i].Value, recomputed[i].Value, plain[i].Key, atol: 2e-5, rtol: 1e-4);
    }

    // ------------------------------------------------------------------------------------------
    // context_shared_qk, return_embeddings
    // ------------------------------------------------------------------------------------------

    [Fact]
    public void ContextSharedQkProjectsTheContextKeysWithTheQueryProjection()
    {
        var separate = Tiny() with { ReceivesContext = true };
        var shared = separate with { ContextSharedQk = true };
        var a = Lm(separate, seed: 61);
        var b = Lm(shared, seed: 62);
        var missing = Shapes(a).Keys.Except(Shapes(b).Keys).ToList();                       // one to_k per cross-attention layer
        Assert.Equal(2, missing.Count);
        Assert.All(missing, k => Assert.EndsWith("to_k.weight", k));
        Assert.Empty(Shapes(b).Keys.Except(Shapes(a).Keys));
        // b's weights into a, and a's cross-attention to_k := to_q: the same function.
        var bParams = b.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        var aParams = a.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        using (no_grad())
            foreach (var (name, p) in aParams)
                p.copy_(bParams.TryGetValue(name, out var same) ? same : bParams[name.Replace("to_k.weight", "to_q.weight")]);
        var tokens = Tokens(2, 10, 17, 63);
        var context = randn(new long[] { 2, 6, 16 }, generator: new Generator(64));
        var contextMask = ones(2, 6, dtype: ScalarType.Bool).index_put_(tensor(false), TensorIndex.Single(0), TensorIndex.Slice(4));
        a.eval(); b.eval();
        using var noGrad = no_grad();
        TestSupport.AssertClose(a.forward(tokens, null, context, contextMask).Logits, b.forward(tokens, null, context, contextMask).Logits, "shared qk");
        var (hidden, _) = b.forward(tokens, null, context, contextMask, returnEmbeddings: true);
        Assert.Equal([2L, 10, 16], hidden.shape);
    }

    [Fact]
    public void PositionwiseOptionsAreValidatedByName()
    {
        AssertRejectedBy(Tiny() with { MoeLayers = [0] }, nameof(TransformerConfig.MoeLayers));
        AssertRejectedBy(Tiny() with { MoeLayers = [3] }, nameof(TransformerConfig.MoeLayers));
        AssertRejectedBy(Tiny() with { MoeLayers = [1, 1] }, nameof(TransformerConfig.MoeLayers));
        AssertRejectedBy(Tiny() with { MoeLayers = [1], MoeNumExperts = 1 }, nameof(TransformerConfig.MoeNumExperts));
        AssertRejectedBy(Tiny() with { MoeLayers = [1], MoeLossCoef = -1 }, nameof(TransformerConfig.MoeLossCoef));
        AssertRejectedBy(Tiny() with { PkmLayers = [5] }, nameof(TransformerConfig.PkmLayers));
        AssertRejectedBy(Tiny() with { MoeLayers = [1], PkmLayers = [1] }, nameof(TransformerConfig.PkmLayers));
        AssertRejectedBy(Tiny() with { PkmLayers = [1], PkmTopK = 200 }, nameof(TransformerConfig.PkmTopK));
        AssertRejectedBy(Tiny() with { PkmLayers = [1], PkmNumKeys = 0 }, nameof(TransformerConfig.PkmNumKeys));
        AssertRejectedBy(Tiny() with { PkmLayers = [2], PkmHeads = 0 }, nameof(TransformerConfig.PkmHeads));
        AssertRejectedBy(Tiny() with { PkmLayers = [2], PkmDimHead = 0 }, nameof(TransformerConfig.PkmDimHead));
        AssertRejectedBy(Tiny() with { MoeLayers = [1], WeightTie = true }, nameof(TransformerConfig.WeightTie));
        AssertRejectedBy(Tiny() with { ContextSharedQk = true }, nameof(TransformerConfig.ContextSharedQk));
        AssertRejectedBy(Tiny() with { ReceivesContext = true, ContextDim = 8, ContextSharedQk = true }, nameof(TransformerConfig.ContextSharedQk));
        (Tiny() with { MoeLayers = [1, 2], WeightTie = true }).Validate();
        var json = System.Text.Json.JsonSerializer.Deserialize<TransformerConfig>(
            """{"depth": 3, "moe_layers": [1, 3], "moe_num_experts": 5, "moe_loss_coef": 0.5, "pkm_layers": [2], "pkm_num_keys": 9, "pkm_topk": 4, "pkm_heads": 3, "pkm_dim_head": 8}""")!;
        Assert.Equal([1, 3], json.MoeLayers!);
        Assert.Equal((5, 0.5, 9, 4, 3, 8), (json.MoeNumExperts, json.MoeLossCoef, json.PkmNumKeys, json.PkmTopK, json.PkmHeads, json.PkmDimHead));
        Assert.Equal([PositionwiseKind.MixtureOfExperts, PositionwiseKind.ProductKeyMemory, PositionwiseKind.MixtureOfExperts],
            Enumerable.Range(0, 3).Select(json.PositionwiseKindForLayer));
        // Options of unused sublayers are not checked.
        (Tiny() with { MoeNumExperts = 0, PkmTopK = 0 }).Validate();
    }
}
