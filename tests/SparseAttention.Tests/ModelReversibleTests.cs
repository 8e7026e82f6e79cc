using SparseAttention.Clustering;
using SparseAttention.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests, reversible part: the recomputing reversible stack against the same reversible math through
/// ordinary autograd (<see cref="RoutingTransformer.ReversibleRecompute"/> = false), outputs and every gradient.</summary>
public partial class ModelTests
{
    public static TheoryData<string> ReversibleVariants() => new(["static", "routing", "routing-update-on-forward", "dropout", "weight-tie", "padding",
        "gradient-trained centroids"]);

    [Theory]
    [MemberData(nameof(ReversibleVariants))]
    public void ReversibleRecomputeMatchesPlainAutograd(string variant)
    {
        var config = variant switch
        {
            "static" => Tiny() with { Depth = 3 },
            "routing" or "routing-update-on-forward" or "padding" => WithRouting(causal: variant != "padding"),
            "dropout" => WithRouting() with { AttnDropout = 0.2, FfDropout = 0.3, AttnLayerDropout = 0.1, LayerDropout = 0.3, Depth = 4 },
            "weight-tie" => WithRouting() with { WeightTie = true, SparsitySkipFirst = 0 },
            "gradient-trained centroids" => WithRouting() with { KmeansEma = false },
            _ => throw new ArgumentException(variant),
        } with { Reversible = true };
        RoutingTransformerLM Model()
        {
            // A fresh model per path: same weights and the same k-means initialisation generator state.
            var model = Lm(config, seed: 5);
            model.train();
            if (variant == "routing-update-on-forward")
                foreach (var k in model.modules().OfType<OnlineKMeans>()) k.UpdateOnForward = true;
            if (variant == "gradient-trained centroids")
                foreach (var k in model.modules().OfType<OnlineKMeans>())
                {
                    // Initialised, then off the unit sphere, as after optimizer steps: the recompute must route with and
                    // differentiate at the stored parameter, not at its normalised copy.
                    k.SetMeans(k.Means);
                    using (no_grad()) k.parameters().Single().mul_(3);
                }
            return model;
        }
        var tokens = Tokens(2, 27, 17, 9);
        var mask = variant == "padding" ? ones(2, 27, dtype: ScalarType.Bool).index_put_(tensor(false), TensorIndex.Single(1), TensorIndex.Slice(20)) : null;

        // Two steps each, so the second forward routes with centroids the first one initialised (or moved).
        var plain = RunReversible(Model(), tokens, mask, recompute: false, steps: 2);
        var recomputed = RunReversible(Model(), tokens, mask, recompute: true, steps: 2);

        for (int i = 0; i < plain.Count; i++)
            TestSupport.AssertClose(plain[i].Value, recomputed[i].Value, $"{variant}: {plain[i].Key}", atol: 2e-5, rtol: 1e-4);
    }

    /// <summary>Forward + backward <paramref name="steps"/> times; returns logits, aux loss, every gradient, the input
    /// embedding gradient and the centroids after each step (k-means updated explicitly unless on forward).</summary>
    private static List<KeyValuePair<string, Tensor>> RunReversible(RoutingTransformerLM model, Tensor tokens, Tensor? mask, bool recompute, int steps)
    {
        model.Transformer.ReversibleRecompute = recompute;
        var results = new List<KeyValuePair<string, Tensor>>();
        random.manual_seed(123);                                             // dropout and LayerDrop draws
        for (int step = 0; step < steps; step++)
        {
            model.zero_grad();
            var (logits, aux) = model.forward(tokens, mask);
            var loss = LanguageModelLoss.NextToken(logits, tokens, aux);
            loss.backward();
            results.Add(new($"step {step} logits", logits.detach().clone()));
            results.Add(new($"step {step} aux loss", aux.detach().clone()));
            foreach (var (name, p) in model.named_parameters())
                results.Add(new($"step {step} grad {name}", p.grad is null ? zeros(1) : p.grad.clone()));
            OnlineKMeans.UpdateAll(model);
            foreach (var (k, i) in model.modules().OfType<OnlineKMeans>().Select((k, i) => (k, i)))
                results.Add(new($"step {step} centroids {i}", k.Means));
            // What a later draw sees must not depend on the path either (the recompute puts the RNG back).
            results.Add(new($"step {step} next draw", rand(3)));
        }
        return results;
    }

    [Fact]
    public void ReversibleRecomputeGivesContextGradientsInTheEncoderDecoder()
    {
        var encoderConfig = Tiny(causal: false) with { Reversible = true };
        var decoderConfig = Tiny() with { Reversible = true, ReceivesContext = true };
        var source = Tokens(2, 13, 17, 3);
        var target = Tokens(2, 11, 17, 4);
        var sourceMask = ones(2, 13, dtype: ScalarType.Bool).index_put_(tensor(false), TensorIndex.Single(0), TensorIndex.Slice(9));
        RoutingTransformerEncDec model = null!;
        List<Tensor> Run(bool recompute)
        {
            random.manual_seed(8);
            model = new RoutingTransformerEncDec(encoderConfig, decoderConfig);
            model.train();
            model.Encoder.Transformer.ReversibleRecompute = recompute;
            model.Decoder.Transformer.ReversibleRecompute = recompute;
            var (logits, aux) = model.forward(source, target, sourceMask, null);
            LanguageModelLoss.NextToken(logits, target, aux).backward();
            return [logits.detach().clone(), .. model.parameters().Select(p => p.grad?.clone() ?? zeros(1))];
        }
        var plain = Run(false);
        var recomputed = Run(true);
        // The encoder's gradients only arrive through the decoder's context, so they test dContext.
        Assert.True(model.Encoder.parameters().Any(p => p.grad is not null && p.grad.abs().sum().item<float>() > 0), "encoder got no gradient");
        for (int i = 0; i < plain.Count; i++)
            TestSupport.AssertClose(plain[i], recomputed[i], $"tensor {i}", atol: 2e-5, rtol: 1e-4);
    }

    [Fact]
    public void ReversibleRecomputeTrainsEmbeddingsTheModelDoesNotOwn()
    {
        // The autograd function also runs when its input does not require a gradient (parameters are its inputs too).
        var config = Tiny() with { Reversible = true };
        random.manual_seed(2);
        var body = new RoutingTransformer(config);
        var x = randn(2, 9, config.Dim);
        var (output, _) = body.forward(x, null);
        output.square().sum().backward();
        Assert.All(body.parameters(), p => Assert.True(p.grad is not null && p.grad.abs().sum().item<float>() > 0));
    }
}

/// <summary>The encoder-decoder learns a task that needs its cross-attention: copying the source.</summary>
public class EncoderDecoderCopyTests
{
    [Theory]
    [InlineData(CrossAttentionKind.Dense)]
    [InlineData(CrossAttentionKind.Routing)]
    public void EncoderDecoderLearnsToCopyAShortSequence(CrossAttentionKind cross)
    {
        // Source: 6 distinct tokens from 2..13; decoder input: BOS (1) + source[..5]; target: the source. Token shift in
        // the encoder puts each source token's successor into its features, so the decoder can find "the token after the
        // one I just wrote" by content.
        const int length = 6, vocab = 14, batch = 32;
        var encoder = new TransformerConfig
        {
            NumTokens = vocab, Dim = 32, Depth = 1, Heads = 2, MaxSeqLen = 8, Causal = false, WindowSize = 4,
            NLocalAttnHeads = [2], LocalAttnRadiusBlocks = 1, ShiftTokens = true, BlockSize = 4,
        };
        var decoder = encoder with
        {
            Causal = true, ReceivesContext = true, CrossAttention = cross, ContextWindowSize = cross == CrossAttentionKind.Routing ? 4 : null,
            KmeansEmaDecay = 0.9, ShiftTokens = false,
        };
        random.manual_seed(4);
        var model = new RoutingTransformerEncDec(encoder, decoder);
        var optimizer = optim.AdamW(model.parameters(), lr: 1e-2);
        var gen = new Generator(11);
        (Tensor Source, Tensor Input) Batch()
        {
            var source = stack(Enumerable.Range(0, batch).Select(_ => randperm(vocab - 2, generator: gen).narrow(0, 0, length) + 2).ToArray());  // (B, 6)
            var input = cat([full(batch, 1, 1L), source.narrow(1, 0, length - 1)], 1);                                                          // (B, 6)
            return (source, input);
        }
        double Accuracy()
        {
            using var _ = no_grad();
            model.eval();
            var (source, input) = Batch();
            var predicted = model.forward(source, input).Logits.argmax(-1);
            model.train();
            return predicted.eq(source).to(ScalarType.Float32).mean().item<float>();
        }
        double before = Accuracy();
        model.train();
        for (int step = 0; step < 150; step++)
        {
            var (source, input) = Batch();
            optimizer.zero_grad();
            var (logits, aux) = model.forward(source, input);
            var loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), source.reshape(-1)) + aux;
            loss.backward();
            optimizer.step();
            OnlineKMeans.UpdateAll(model);
        }
        double after = Accuracy();
        // Routing cross-attention reads only the context keys its clusters picked (2 clusters × 4 of the 6 source tokens,
        // overlaps allowed), so a source token no cluster picked cannot be copied: it plateaus near 90 %; dense reaches
        // 94–97 % in 150 steps (which, depends on the rounding of the GEMM kernels MKL picks), chance is 8 %.
        double required = cross == CrossAttentionKind.Dense ? 0.9 : 0.8;
        Assert.True(after > required, $"{cross}: copy accuracy {before:P0} → {after:P0} after 150 steps (chance ≈ 8 %), required {required:P0}");
    }
}
