using SparseAttention.Hashing;
using SparseAttention.Model;
using SparseAttention.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests, LSH part: 1 local + 1 strided + 2 LSH heads per layer.</summary>
public partial class ModelTests
{
    private static TransformerConfig WithLsh(bool causal = true, LshSpec? spec = null) => Tiny(causal) with
    {
        Depth = 2, NLocalAttnHeads = [1],
        StaticHeadGroups = [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Strided, Size: 3), 1)],
        Lsh = spec ?? new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4 },
    };

    [Fact]
    public void LshHeadsSitAfterStaticGroupsAndBeforeRouting()
    {
        var config = WithLsh(spec: new LshSpec { Heads = 1, BucketSize = 4 }).Validate();
        var kinds = config.HeadGroupsForLayer(0).Select(g => (g.Kind, g.Heads)).ToArray();
        Assert.Equal([(HeadGroupKind.Local, 1), (HeadGroupKind.Static, 1), (HeadGroupKind.Lsh, 1), (HeadGroupKind.Routing, 1)], kinds);
        var skipped = (config with { SparsitySkipFirst = 1 }).Validate().HeadGroupsForLayer(0).Select(g => (g.Kind, g.Heads)).ToArray();
        Assert.Equal([(HeadGroupKind.Local, 3), (HeadGroupKind.Static, 1)], skipped);
        using var model = new RoutingTransformerLM(config);
        Assert.Equal(2, model.modules().OfType<LshHeadGroup>().Count());
    }

    [Theory]
    [InlineData("{\"heads\": -1}", "heads")]
    [InlineData("{\"heads\": 5}", "heads")]
    [InlineData("{\"heads\": 2, \"n_hashes\": 0}", "n_hashes")]
    [InlineData("{\"heads\": 2, \"bucket_size\": 0}", "bucket_size")]
    [InlineData("{\"heads\": 2, \"n_buckets\": 3}", "n_buckets")]
    [InlineData("{\"heads\": 2, \"alsh\": \"Xbox\", \"n_buckets\": 6}", "n_buckets")]
    [InlineData("{\"heads\": 2, \"query_normalized_first\": true}", "query_normalized_first")]
    public void LshConfigErrorsNameTheField(string lsh, string key)
    {
        var json = ConfigBinding.ToJson(Tiny() with { StaticHeadGroups = null });
        var node = System.Text.Json.Nodes.JsonNode.Parse(json)!.AsObject();
        node["lsh"] = System.Text.Json.Nodes.JsonNode.Parse(lsh);
        var config = ConfigBinding.FromJson(node.ToJsonString(), "test");
        var error = Assert.ThrowsAny<ArgumentException>(() => config.Validate());
        Assert.True(error.Message.Contains(key), error.Message);
        Assert.True(error.ParamName is "Lsh" or "NLocalAttnHeads", error.ParamName);
    }

    [Fact]
    public void LshConfigBindsFromSnakeCaseJson()
    {
        var config = ConfigBinding.Apply(Tiny(), ["lsh={\"heads\": 1, \"n_hashes\": 3, \"bucket_size\": 8, \"alsh\": \"SignAlsh\", \"dedup\": true}"]);
        Assert.Equal(new LshSpec { Heads = 1, NHashes = 3, BucketSize = 8, Alsh = AlshTransform.SignAlsh, Dedup = true }, config.Lsh);
        Assert.Throws<ArgumentException>(() => ConfigBinding.Apply(Tiny(), ["lsh={\"hedas\": 1}"]));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void DecoderWithLshHeadsNeverSeesLaterTokens(bool alsh)
    {
        random.manual_seed(3);
        var model = new RoutingTransformerLM(WithLsh(spec: new LshSpec
        {
            Heads = 2, NHashes = 2, BucketSize = 3, Dedup = true, Alsh = alsh ? AlshTransform.Xbox : null,
        }));
        model.eval();
        const int seqLen = 23;
        var tokens = RoutingTokens(2, seqLen, 5);
        var (logits, _) = model.forward(tokens);
        foreach (int t in new[] { 0, 7, 21 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = RoutingTokens(2, seqLen - t - 1, (ulong)(50 + t));
            var (changed, _) = model.forward(perturbed);
            AssertSame(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}");
        }
    }

    [Fact]
    public void LshLanguageModelOverfitsAFixedBatch()
    {
        random.manual_seed(17);
        var model = new RoutingTransformerLM(WithLsh());
        var tokens = RoutingTokens(4, 24, 18);
        AssertOverfits(model, tokens);
    }
}
