using SparseAttention.Clustering;
using SparseAttention.Hashing;
using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Modules;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>The README's usage examples, at smaller sizes, so the README keeps compiling and running.</summary>
public class ReadmeExamplesTests
{
    [Fact]
    public void PatternKernelAndModuleExample()
    {
        var pattern = AttentionPattern.HeadGroups(
            (new WindowPattern(windowSize: 32, lookBackward: 1, lookForward: 0, exactWindowSize: false, causal: true), 4),
            (new FixedPattern(stride: 32, vertsize: 2, numVerts: 2, causal: true), 4));
        var mask = pattern.Compile(seqLen: 256, blockSize: 16, heads: 8);
        Assert.InRange(mask.Sparsity, 0.5, 1.0);
        var q = randn(1, 8, 256, 16); var k = randn(1, 8, 256, 16); var v = randn(1, 8, 256, 16);
        Assert.Equal(new long[] { 1, 8, 256, 16 }, BlockSparseAttention.Attention(q, k, v, mask).shape);
        var attention = new SparseMultiHeadAttention(dim: 64, heads: 8, pattern, blockSize: 16);
        Assert.Equal(new long[] { 2, 100, 64 }, attention.forward(randn(2, 100, 64), null).shape);
    }

    [Fact]
    public void RoutingLanguageModelExample()
    {
        var config = new TransformerConfig
        {
            NumTokens = 256, Dim = 32, Depth = 2, Heads = 4, MaxSeqLen = 128, Causal = true,
            WindowSize = 32, NLocalAttnHeads = [2], LocalAttnWindowSize = 32, BlockSize = 32,
        };
        var model = new RoutingTransformerLM(config);
        var optimizer = optim.AdamW(model.parameters(), lr: 3e-4);
        var tokens = randint(0, 256, new long[] { 1, 128 });
        using (NoGcSection.Enter())
        {
            var (logits, aux) = model.forward(tokens);
            Assert.Equal(new long[] { 1, 128, 256 }, logits.shape);
            var loss = LanguageModelLoss.NextToken(logits, tokens, aux);
            loss.backward();
            optimizer.step();
            optimizer.zero_grad();
        }
        var centroids = model.modules().OfType<OnlineKMeans>().First().Means;
        model.forward(tokens);                                                           // the next step begins: centroids move
        Assert.True((model.modules().OfType<OnlineKMeans>().First().Means - centroids).abs().max().item<float>() > 0);
        var sample = model.Generate(tokens[.., ..1], maxNewTokens: 10, temperature: 1.0, topP: 0.9, seed: 1);
        Assert.Equal(new long[] { 1, 10 }, sample.shape);
    }

    [Fact]
    public void MixedHeadKindsAndBertAdapterExample()
    {
        var mixed = new TransformerConfig
        {
            NumTokens = 256, Dim = 32, Depth = 2, Heads = 8, MaxSeqLen = 128, Causal = true, WindowSize = 32,
            NLocalAttnHeads = [2],
            StaticHeadGroups = [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Strided, Size: 32), 1)],
            Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 16 },
            Synthesizer = new SynthesizerSpec { Heads = 1, Kind = SynthesizerKind.FactorizedRandom, Mix = SynthesizerMix.Sum },
            Reversible = true, BlockSize = 32,
        };
        Assert.Equal(2, mixed.Validate().HeadGroupsForLayer(1).Single(g => g.Kind == HeadGroupKind.Routing).Heads);
        var model = new RoutingTransformerLM(mixed);
        var tokens = randint(0, 256, new long[] { 1, 128 });
        var (logits, aux) = model.forward(tokens);
        LanguageModelLoss.NextToken(logits, tokens, aux).backward();
        Assert.Equal(new long[] { 1, 128, 256 }, logits.shape);

        var attention = BertSelfAttention.FromConfig(mixed with { Causal = false }, layer: 0);
        var hidden = randn(2, 100, 32);
        var additiveMask = zeros(2, 1, 1, 100);
        var result = attention.forward(hidden, additiveMask, outputAttentions: true);
        Assert.Equal(new long[] { 2, 100, 32 }, result.Context.shape);
        Assert.Equal(new long[] { 2, 8, 100, 100 }, result.AttentionProbs!.shape);
    }
}
