using SparseAttention.Hashing;
using SparseAttention.Model;
using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests, mixed part: one layer holding every head-group kind at once
/// (2 local + 1 strided + 2 LSH + 1 synthesizer + 2 routing heads).</summary>
public partial class ModelTests
{
    private static TransformerConfig EveryKind(bool causal = true) => Tiny(causal) with
    {
        Dim = 32, Heads = 8, Depth = 2, NLocalAttnHeads = [2],
        StaticHeadGroups = [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Strided, Size: 3), 1)],
        Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4 },
        Synthesizer = new SynthesizerSpec { Heads = 1, Kind = SynthesizerKind.FactorizedRandom, Mix = SynthesizerMix.Sum },
    };

    [Fact]
    public void OneLayerCanMixEveryHeadGroupKind()
    {
        var config = EveryKind().Validate();
        Assert.Equal(
            [(HeadGroupKind.Local, 2), (HeadGroupKind.Static, 1), (HeadGroupKind.Lsh, 2), (HeadGroupKind.Synthesizer, 1), (HeadGroupKind.Routing, 2)],
            config.HeadGroupsForLayer(1).Select(g => (g.Kind, g.Heads)).ToArray());
        var model = Lm(config, seed: 12);
        model.train();
        var tokens = Tokens(2, 23, 17, 13);
        var (logits, aux) = model.forward(tokens);
        LanguageModelLoss.NextToken(logits, tokens, aux).backward();
        foreach (var (name, p) in model.named_parameters())
            Assert.True(p.grad is not null && p.grad.abs().sum().item<float>() > 0, $"{name} got no gradient");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void DecoderMixingEveryHeadGroupKindNeverSeesLaterTokens(bool training)
    {
        var model = Lm(EveryKind(), seed: 14);
        model.train(training);
        const int seqLen = 23;
        model.forward(Tokens(2, seqLen, 17, 60));                  // training: initialises the k-means first
        var tokens = Tokens(2, seqLen, 17, 61);
        var logits = model.forward(tokens).Item1.detach();
        foreach (int t in new[] { 0, 5, 12, 21 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = Tokens(2, seqLen - t - 1, 17, (ulong)(70 + t));
            var changed = model.forward(perturbed).Item1.detach();
            AssertSame(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}");
        }
    }
}
