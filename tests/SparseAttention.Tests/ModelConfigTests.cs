using System.Text.Json;
using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Patterns;
using SparseAttention.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests, part 1: the configuration record — validation names the field, and every field
/// reaches the modules (parameter shapes and counts, module structure, outputs).</summary>
public partial class ModelTests
{
    /// <summary>A tiny decoder with 2 local heads, 1 strided head and 1 fixed head per layer (no routing heads).</summary>
    internal static TransformerConfig Tiny(bool causal = true) => new()
    {
        NumTokens = 17, Dim = 16, Depth = 2, Heads = 4, MaxSeqLen = 32, Causal = causal,
        WindowSize = 8, LocalAttnWindowSize = 4, LocalAttnRadiusBlocks = 1, NLocalAttnHeads = [2],
        StaticHeadGroups =
        [
            new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Strided, Size: 3), 1),
            new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Fixed, Size: 4), 1),
        ],
        BlockSize = 8,
    };

    internal static RoutingTransformerLM Lm(TransformerConfig config, long seed = 1)
    {
        random.manual_seed(seed);
        return new RoutingTransformerLM(config);
    }

    internal static long ParameterCount(nn.Module module) => module.parameters().Sum(p => p.numel());

    internal static Dictionary<string, long[]> Shapes(nn.Module module) =>
        module.named_parameters().ToDictionary(p => p.name, p => p.parameter.shape);

    internal static Tensor Tokens(long batch, long seqLen, long vocab, ulong seed) =>
        randint(0, vocab, new[] { batch, seqLen }, dtype: ScalarType.Int64, generator: new Generator(seed));

    internal static Tensor Logits(RoutingTransformerLM model, Tensor tokens, Tensor? mask = null)
    {
        using var _ = no_grad();
        return model.forward(tokens, mask).Logits;
    }

    internal static void AssertSame(Tensor expected, Tensor actual, string what)
    {
        Assert.Equal(expected.shape, actual.shape);
        if (!equal(expected, actual).all().item<bool>())
        {
            double diff = (expected - actual).abs().max().item<float>();
            Assert.Fail($"{what}: not identical, max |diff| = {diff:G4}");
        }
    }

    internal static bool Differ(Tensor a, Tensor b) => !allclose(a, b, 1e-4, 1e-5);

    // ------------------------------------------------------------------------------------------
    // Validation
    // ------------------------------------------------------------------------------------------

    private static readonly Dictionary<string, Func<TransformerConfig, TransformerConfig>> BadConfigs = new()
    {
        ["NumTokens"] = c => c with { NumTokens = 0 },
        ["Dim"] = c => c with { Dim = 0 },
        ["Depth"] = c => c with { Depth = -1 },
        ["Heads"] = c => c with { Heads = 3 },                                    // 16 not divisible by 3
        ["DimHead"] = c => c with { DimHead = 0 },
        ["DimHead "] = c => c with { DimHead = 5 },                               // rotary needs an even head width
        ["MaxSeqLen"] = c => c with { MaxSeqLen = 0 },
        ["WindowSize"] = c => c with { WindowSize = 0 },
        ["WindowSize "] = c => c with { NLocalAttnHeads = [1], MaxSeqLen = 30 },  // routing heads: 30 % 8 ≠ 0
        ["LocalAttnWindowSize"] = c => c with { LocalAttnWindowSize = 0 },
        ["LocalAttnRadiusBlocks"] = c => c with { LocalAttnRadiusBlocks = -1 },
        ["NLocalAttnHeads"] = c => c with { NLocalAttnHeads = [1, 1, 1] },       // neither 1 nor Depth values
        ["NLocalAttnHeads "] = c => c with { NLocalAttnHeads = [3] },            // 3 local + 2 static > 4 heads
        ["NLocalAttnHeads  "] = c => c with { NLocalAttnHeads = [-1] },
        ["StaticHeadGroups[0]"] = c => c with { StaticHeadGroups = [new(new(StaticPatternKind.Fixed, Size: 2, Vertsize: 2, NumVerts: 2), 1)] },
        ["StaticHeadGroups[1]"] = c => c with { StaticHeadGroups = [c.StaticHeadGroups![0], new(new(StaticPatternKind.Strided, Size: 3), 0)] },
        ["SparsitySkipFirst"] = c => c with { SparsitySkipFirst = 3 },
        ["AttnDropout"] = c => c with { AttnDropout = 1.0 },
        ["AttnLayerDropout"] = c => c with { AttnLayerDropout = -0.1 },
        ["FfDropout"] = c => c with { FfDropout = 1.5 },
        ["LayerDropout"] = c => c with { LayerDropout = double.NaN },
        ["FfMult"] = c => c with { FfMult = 0 },
        ["FfChunks"] = c => c with { FfChunks = 0 },
        ["EmbDim"] = c => c with { EmbDim = 0 },
        ["UseRezero"] = c => c with { UseRezero = true, UseScaleNorm = true },
        ["WeightTie"] = c => c with { WeightTie = true, NLocalAttnHeads = [2, 1], StaticHeadGroups = [new(new(StaticPatternKind.Dense), 1)] },
        ["WeightTie "] = c => c with { WeightTie = true, StaticHeadGroups = [new(new(StaticPatternKind.Strided, Size: 3, Combine: FactorizedCombine.Interleaved), 2)] },
        ["NumMemKv"] = c => c with { NumMemKv = -1 },
        ["KmeansEmaDecay"] = c => c with { KmeansEmaDecay = 1.0 },
        ["CommitmentFactor"] = c => c with { CommitmentFactor = -1e-4 },
        ["MaxRelativePosition"] = c => c with { PositionalEncoding = PositionalEncoding.RelativeShaw, MaxRelativePosition = 0 },
        ["ContextDim"] = c => c with { ContextDim = 8 },                          // without ReceivesContext
        ["BlockSize"] = c => c with { BlockSize = 0 },
        ["Kernel"] = c => c with { Kernel = (AttentionKernel)42 },
        ["ComputeDtype"] = c => c with { ComputeDtype = (ComputeDtype)42 },
    };

    public static TheoryData<string> BadConfigNames() => new(BadConfigs.Keys);

    [Theory]
    [MemberData(nameof(BadConfigNames))]
    public void ValidateNamesTheOffendingField(string key)
    {
        var bad = BadConfigs[key](Tiny());
        var error = Assert.ThrowsAny<ArgumentException>(() => bad.Validate());
        Assert.Equal(key.Trim(), error.ParamName);
        Assert.Contains(key.Trim(), error.Message);
        // The model constructors validate too.
        Assert.ThrowsAny<ArgumentException>(() => new RoutingTransformerLM(bad));
    }

    [Fact]
    public void TinyConfigIsValidAndDefaultsMirrorThePyTorchLibrary()
    {
        Tiny().Validate();
        var d = new TransformerConfig().Validate();
        Assert.Equal((8, 64, 1, 4, 0.999, 1e-4, 1), (d.Heads, d.WindowSize, d.LocalAttnRadiusBlocks, d.FfMult, d.KmeansEmaDecay, d.CommitmentFactor, d.FfChunks));
        Assert.Equal(32, d.ResolvedLocalAttnWindowSize);                        // window_size // 2
        Assert.Equal(64, d.ResolvedDimHead);
        Assert.False(d.ResolvedSharedQk);
        Assert.True((d with { Causal = true }).ResolvedSharedQk);                // shared_qk defaults to causal
        Assert.Equal(PositionalEncoding.Rotary, d.PositionalEncoding);
    }

    [Fact]
    public void HeadsLeftOverBecomeRoutingHeads()
    {
        var config = Tiny() with { NLocalAttnHeads = [1] };                      // 1 local + 2 static → 1 routing head
        config.Validate();
        var plan = config.HeadGroupsForLayer(0);
        Assert.Equal([HeadGroupKind.Local, HeadGroupKind.Static, HeadGroupKind.Static, HeadGroupKind.Routing], plan.Select(g => g.Kind));
        var model = new RoutingTransformerLM(config);
        Assert.Contains(model.named_buffers(), b => b.name.EndsWith("means"));     // the routing heads' k-means centroids
    }

    [Fact]
    public void JsonUsesSnakeCaseNamesAndRoundTrips()
    {
        var config = Tiny() with { PositionalEncoding = PositionalEncoding.RelativeShaw, EmbDim = 8, SharedQk = true };
        string json = JsonSerializer.Serialize(config);
        foreach (var name in new[] { "\"num_tokens\"", "\"n_local_attn_heads\"", "\"local_attn_radius_blocks\"", "\"static_head_groups\"",
                                     "\"kmeans_ema_decay\"", "\"commitment_factor\"", "\"ff_mult\"", "\"positional_encoding\":\"RelativeShaw\"",
                                     "\"kind\":\"Strided\"", "\"emb_dim\":8" })
            Assert.Contains(name, json);
        Assert.DoesNotContain("Resolved", json);
        var back = JsonSerializer.Deserialize<TransformerConfig>(json)!;
        Assert.Equal(json, JsonSerializer.Serialize(back));
        var fromPreset = JsonSerializer.Deserialize<TransformerConfig>("""{"dim": 64, "heads": 4, "n_local_attn_heads": [4], "causal": true}""")!;
        Assert.Equal((64, 4, 4, true), (fromPreset.Dim, fromPreset.Heads, fromPreset.NLocalAttnHeads[0], fromPreset.Causal));
        Assert.Equal(ComputeDtype.Float32, fromPreset.ComputeDtype);
        Assert.Contains("\"compute_dtype\":\"Float32\"", json);
        var bf16 = SparseAttention.Training.ConfigBinding.Apply(config, ["compute_dtype=BFloat16"]);   // what train --set does
        Assert.Equal(ComputeDtype.BFloat16, bf16.ComputeDtype);
        Assert.Contains("\"compute_dtype\": \"BFloat16\"", SparseAttention.Training.ConfigBinding.ToJson(bf16));
    }

    /// <summary>The BigBird, Longformer and DeepSpeed block layouts are reachable from configuration JSON (what presets and
    /// --set give) and build the pattern classes with the parameters written there.</summary>
    [Fact]
    public void BlockLayoutsAreReachableFromConfigurationJson()
    {
        string json = """
            {"num_tokens": 17, "dim": 16, "depth": 1, "heads": 4, "max_seq_len": 32, "causal": false, "n_local_attn_heads": [0],
             "static_head_groups": [
               {"pattern": {"kind": "BigBird", "size": 4, "num_random_blocks": 2, "num_sliding_window_blocks": 3, "num_global_blocks": 1, "seed": 5}, "heads": 1},
               {"pattern": {"kind": "Longformer", "size": 4, "num_sliding_window_blocks": 5, "global_block_indices": [0, 3]}, "heads": 1},
               {"pattern": {"kind": "DsFixed", "size": 4, "num_local_blocks": 2, "num_global_blocks": 1, "horizontal_global_attention": true}, "heads": 1},
               {"pattern": {"kind": "DsVariable", "size": 4, "num_random_blocks": 1, "local_window_blocks": [1, 2], "global_block_indices": [0]}, "heads": 1}]}
            """;
        var config = JsonSerializer.Deserialize<TransformerConfig>(json)!.Validate();
        var patterns = config.HeadGroupsForLayer(0).Select(g => g.Pattern!).ToArray();
        Assert.Equal(
            [new Patterns.BigBirdPattern(4, causal: false, numRandomBlocks: 2, numSlidingWindowBlocks: 3, numGlobalBlocks: 1, seed: 5).Name,
             new Patterns.LongformerPattern(4, causal: false, numSlidingWindowBlocks: 5, globalBlockIndices: [0, 3]).Name,
             new Patterns.DsFixedPattern(4, causal: false, numLocalBlocks: 2, numGlobalBlocks: 1, horizontalGlobalAttention: true).Name,
             new Patterns.DsVariablePattern(4, causal: false, numRandomBlocks: 1, localWindowBlocks: [1, 2], globalBlockIndices: [0]).Name],
            patterns.Select(p => p.Name));
        Assert.IsType<Patterns.BigBirdPattern>(patterns[0]);
        // The layout's own rules, not a default: Longformer's global block 3 (tokens 12..15) is seen from token 0.
        Assert.True(patterns[1].Allows(0, 0, 13, 32));
        var model = Lm(config);
        var (logits, _) = model.forward(randint(0, 17, new long[] { 2, 32 }));
        Assert.True(logits.isfinite().all().item<bool>());
    }

    // ------------------------------------------------------------------------------------------
    // Head groups
    // ------------------------------------------------------------------------------------------

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void LocalHeadsUseTheLocalWindowFieldsAndStaticGroupsTheirSpecs(bool causal)
    {
        var config = Tiny(causal) with { LocalAttnWindowSize = 5, LocalAttnRadiusBlocks = 2 };
        var model = Lm(config);
        var layer = (AttentionLayer)model.Transformer.Blocks[0].Attention;
        Assert.Equal([2, 1, 1], layer.Groups.Select(g => g.Heads));
        var local = Assert.IsType<WindowPattern>(((StaticPatternAttention)layer.Groups[0]).Pattern);
        Assert.Equal((5, 2, causal ? 0 : 2, causal), (local.WindowSize, local.LookBackward, local.LookForward, local.Causal));
        var strided = Assert.IsType<StridedPattern>(((StaticPatternAttention)layer.Groups[1]).Pattern);
        Assert.Equal((3, causal), (strided.Stride, strided.Causal));
        var fixedPattern = Assert.IsType<FixedPattern>(((StaticPatternAttention)layer.Groups[2]).Pattern);
        Assert.Equal(4, fixedPattern.Stride);
        // Unset local window = WindowSize / 2.
        var byDefault = (Tiny(causal) with { LocalAttnWindowSize = null }).HeadGroupsForLayer(0)[0].Pattern;
        Assert.Equal(4, Assert.IsType<WindowPattern>(byDefault).WindowSize);
    }

    [Fact]
    public void PerLayerLocalHeadsAndSparsitySkipFirstShapeThePlan()
    {
        var config = Tiny() with { Depth = 3, NLocalAttnHeads = [2, 1, 0], StaticHeadGroups = [new(new(StaticPatternKind.Dense), 1)], SparsitySkipFirst = 2 };
        config.Validate();
        string Plan(int layer) => string.Join(",", config.HeadGroupsForLayer(layer).Select(g => $"{g.Kind}{g.Heads}"));
        Assert.Equal("Local3,Static1", Plan(0));                                 // skip-first: routing heads become local
        Assert.Equal("Local3,Static1", Plan(1));
        Assert.Equal("Static1,Routing3", Plan(2));
        // With every routing head inside the skipped layers, the model builds.
        var local = config with { Depth = 2, NLocalAttnHeads = [2, 1] };
        var model = Lm(local);
        Assert.All(model.Transformer.Blocks, b => Assert.Equal([3, 1], ((AttentionLayer)b.Attention).Groups.Select(g => g.Heads)));
    }

    [Fact]
    public void InterleavedStaticGroupsAlternateAcrossLayers()
    {
        var config = Tiny() with { StaticHeadGroups = [new(new(StaticPatternKind.Strided, Size: 3, Combine: FactorizedCombine.Interleaved), 2)] };
        var p0 = Assert.IsType<StridedPattern>(config.HeadGroupsForLayer(0)[1].Pattern);
        var p1 = Assert.IsType<StridedPattern>(config.HeadGroupsForLayer(1)[1].Pattern);
        Assert.Equal((0, 1), (p0.Layer, p1.Layer));
    }

    // ------------------------------------------------------------------------------------------
    // Every field reaches the modules
    // ------------------------------------------------------------------------------------------

    [Fact]
    public void SizesShapeTheParameters()
    {
        var config = Tiny() with { DimHead = 6 };
        var shapes = Shapes(Lm(config));
        Assert.Equal([17L, 16], shapes["token_emb.weight"]);
        Assert.Equal([24L, 16], shapes["transformer.layers.0.attn.to_q.weight"]);     // Heads · DimHead × Dim
        Assert.Equal([16L, 24], shapes["transformer.layers.1.attn.to_out.weight"]);
        Assert.Equal([17L, 16], shapes["to_logits.weight"]);
        Assert.DoesNotContain(shapes.Keys, k => k.StartsWith("transformer.layers.2."));
    }

    [Fact]
    public void FfMultAndFfGluChangeTheFeedForwardWidth()
    {
        int dim = 16, depth = 2;
        long mult4 = ParameterCount(Lm(Tiny() with { FfMult = 4 })), mult2 = ParameterCount(Lm(Tiny() with { FfMult = 2 }));
        // Per layer: w1 (dim → h) + bias + w2 (h → dim); h shrinks by 2·dim.
        Assert.Equal(depth * (2L * dim * 2 * dim + 2 * dim), mult4 - mult2);
        var glu = Shapes(Lm(Tiny() with { FfMult = 3, FfGlu = true }));
        Assert.Equal([2L * 3 * dim, dim], glu["transformer.layers.0.ff.w1.weight"]);
        Assert.Equal([(long)dim, 3 * dim], glu["transformer.layers.0.ff.w2.weight"]);
    }

    [Theory]
    [InlineData(FeedForwardActivation.Gelu, false)]
    [InlineData(FeedForwardActivation.Relu, false)]
    [InlineData(FeedForwardActivation.Silu, true)]
    [InlineData(FeedForwardActivation.ReluSquared, false)]
    [InlineData(FeedForwardActivation.ReluSquared, true)]
    public void FfActivationIsTheFeedForwardNonlinearity(FeedForwardActivation activation, bool glu)
    {
        random.manual_seed(2);
        var ff = new FeedForward(8, mult: 2, glu: glu, activation: activation);
        ff.to(ScalarType.Float64);
        var p = ff.named_parameters().ToDictionary(n => n.name, n => n.parameter);
        var x = randn(2, 5, 8, dtype: ScalarType.Float64);
        Tensor Act(Tensor h) => activation switch                                     // the formulas, written out
        {
            FeedForwardActivation.Relu => h.clamp_min(0),
            FeedForwardActivation.Silu => h / (1 + (-h).exp()),
            FeedForwardActivation.ReluSquared => h.clamp_min(0) * h.clamp_min(0),
            _ => 0.5 * h * (1 + special.erf(h / Math.Sqrt(2))),
        };
        var h = x.matmul(p["w1.weight"].t()) + p["w1.bias"];
        var inner = glu ? Act(h.narrow(-1, 0, 16)) * h.narrow(-1, 16, 16) : Act(h);
        TestSupport.AssertClose(inner.matmul(p["w2.weight"].t()) + p["w2.bias"], ff.forward(x), $"{activation} glu={glu}");
        var config = ConfigBinding.Apply(Tiny(), [$"ff_activation={activation}"], "set").Validate();
        Assert.Equal(activation, config.FfActivation);
    }

    /// <summary>Every configuration key is in the README's options table, with its default as the record has it.</summary>
    [Fact]
    public void TheReadmeOptionsTableListsEveryKeyWithItsDefault()
    {
        string readme = File.ReadAllText(Path.Combine(RepositoryRoot(), "README.md"));
        int start = readme.IndexOf("## Configuration options", StringComparison.Ordinal);
        Assert.True(start >= 0, "README has a Configuration options section");
        var rows = readme[start..].Split('\n').TakeWhile(l => !l.StartsWith("## Command line", StringComparison.Ordinal))
            .Where(l => l.StartsWith("| `", StringComparison.Ordinal))
            .ToDictionary(l => l.Split('`')[1], l => l.Split('|')[2].Trim());
        var keys = typeof(TransformerConfig).GetProperties()
            .Select(p => p.GetCustomAttributes(typeof(System.Text.Json.Serialization.JsonPropertyNameAttribute), false)
                .Cast<System.Text.Json.Serialization.JsonPropertyNameAttribute>().FirstOrDefault()?.Name)
            .OfType<string>().ToList();
        Assert.Empty(keys.Except(rows.Keys));                                             // every key documented
        Assert.Empty(rows.Keys.Except(keys));                                             // no row for a key that does not exist
        var defaults = JsonDocument.Parse(JsonSerializer.Serialize(new TransformerConfig())).RootElement;
        foreach (var key in keys)
        {
            var value = defaults.GetProperty(key);
            string expected = value.ValueKind switch
            {
                JsonValueKind.True => "true", JsonValueKind.False => "false",
                JsonValueKind.Number or JsonValueKind.String => value.ToString(),
                _ => "",
            };
            if (expected.Length == 0) continue;                                           // null / arrays: described in words
            if (key == "commitment_factor") expected = "1e-4";
            Assert.True(rows[key] == expected, $"README default of {key}: '{rows[key]}', the record has '{expected}'");
        }
    }

    internal static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "README.md")) && Directory.Exists(Path.Combine(dir.FullName, "src"))) return dir.FullName;
        throw new InvalidOperationException("repository root not found above " + AppContext.BaseDirectory);
    }

    [Fact]
    public void UseAbsolutePosEmbAddsALearnedPositionTable()
    {
        var config = Tiny() with { UseAbsolutePosEmb = true };
        var with = Lm(config);
        var without = Lm(config with { UseAbsolutePosEmb = false });
        Assert.Equal(32L * 16, ParameterCount(with) - ParameterCount(without));
        Assert.Equal([32L, 16], Shapes(with)["pos_emb.weight"]);                         // (MaxSeqLen, EmbDim)
        // Same weights otherwise: a zero table changes nothing, a non-zero one is added at each position.
        without.load_state_dict(with.state_dict(), strict: false);
        var table = with.named_parameters().Single(p => p.name == "pos_emb.weight").parameter;
        var tokens = Tokens(2, 12, 17, 5);
        using (no_grad()) table.zero_();
        AssertSame(Logits(without, tokens), Logits(with, tokens), "zero position table");
        using (no_grad()) table.copy_(randn(32, 16));
        Assert.True(Differ(Logits(without, tokens), Logits(with, tokens)), "the table reaches the logits");
    }

    [Fact]
    public void DepthAddsWholeLayers()
    {
        long d1 = ParameterCount(Lm(Tiny() with { Depth = 1 })), d2 = ParameterCount(Lm(Tiny() with { Depth = 2 })), d3 = ParameterCount(Lm(Tiny() with { Depth = 3 }));
        Assert.True(d2 > d1);
        Assert.Equal(d2 - d1, d3 - d2);
        Assert.Equal(3, Lm(Tiny() with { Depth = 3 }).Transformer.Blocks.Count);
    }

    [Fact]
    public void TieEmbeddingRemovesTheOutputLayer()
    {
        var untied = Lm(Tiny());
        var tied = Lm(Tiny() with { TieEmbedding = true });
        Assert.Equal(17L * 16 + 17, ParameterCount(untied) - ParameterCount(tied));
        Assert.DoesNotContain(Shapes(tied).Keys, k => k.StartsWith("to_logits"));
        // Logits are hidden · Eᵀ.
        var tokens = Tokens(2, 9, 17, 3);
        tied.eval();
        using var _ = no_grad();
        var (hidden, _) = tied.forward(tokens, returnEmbeddings: true);
        var weight = tied.named_parameters().Single(p => p.name == "token_emb.weight").parameter;
        TestSupport.AssertClose(matmul(hidden, weight.t()), tied.forward(tokens).Logits, "tied logits");
    }

    [Fact]
    public void WeightTieSharesOneLayerAcrossDepth()
    {
        var untiedOne = Lm(Tiny() with { Depth = 1 });
        var tiedThree = Lm(Tiny() with { Depth = 3, WeightTie = true });
        Assert.Equal(ParameterCount(untiedOne), ParameterCount(tiedThree));
        Assert.Single(tiedThree.Transformer.Blocks);
        // Same weights, applied once vs three times.
        tiedThree.load_state_dict(untiedOne.state_dict());
        untiedOne.eval(); tiedThree.eval();
        var tokens = Tokens(1, 10, 17, 4);
        Assert.True(Differ(Logits(untiedOne, tokens), Logits(tiedThree, tokens)));
        // Gradients from all three applications land in the one shared layer.
        tiedThree.train();
        var (logits, aux) = tiedThree.forward(tokens);
        LanguageModelLoss.NextToken(logits, tokens, aux).backward();
        Assert.All(tiedThree.parameters(), p => Assert.NotNull(p.grad));
    }

    [Fact]
    public void EmbDimAddsAFactorizedProjection()
    {
        var plain = Shapes(Lm(Tiny()));
        var factorized = Shapes(Lm(Tiny() with { EmbDim = 6 }));
        Assert.DoesNotContain(plain.Keys, k => k.StartsWith("project_"));
        Assert.Equal([17L, 6], factorized["token_emb.weight"]);
        Assert.Equal([16L, 6], factorized["project_in.weight"]);
        Assert.Equal([6L, 16], factorized["project_out.weight"]);
        Assert.Equal([17L, 6], factorized["to_logits.weight"]);
        var model = Lm(Tiny() with { EmbDim = 6, TieEmbedding = true });
        Assert.Equal([2L, 5, 17], Logits(model, Tokens(2, 5, 17, 1)).shape);
    }

    [Fact]
    public void NormChoicesChangeTheModules()
    {
        var layerNorm = Shapes(Lm(Tiny()));
        Assert.Contains("transformer.layers.0.attn_norm.weight", layerNorm.Keys);
        var scaleNorm = Shapes(Lm(Tiny() with { UseScaleNorm = true }));
        Assert.Equal([1L], scaleNorm["transformer.layers.0.attn_norm.g"]);
        Assert.Equal([1L], scaleNorm["transformer.norm.g"]);
        Assert.DoesNotContain(scaleNorm.Keys, k => k.EndsWith("norm.weight"));
        var rezero = Shapes(Lm(Tiny() with { UseRezero = true }));
        Assert.Equal([1L], rezero["transformer.layers.0.attn_rezero.g"]);
        Assert.Equal([1L], rezero["transformer.layers.1.ff_rezero.g"]);
        Assert.DoesNotContain(rezero.Keys, k => k.Contains("attn_norm") || k.Contains("ff_norm"));
    }

    [Fact]
    public void ReZeroStartsAsTheIdentityBeforeTheFinalNorm()
    {
        random.manual_seed(2);
        var body = new RoutingTransformer(Tiny(causal: false) with { UseRezero = true });
        var x = randn(2, 7, 16);
        using var _ = no_grad();
        var (y, _) = body.forward(x);
        TestSupport.AssertClose(nn.functional.layer_norm(x, [16]), y, "rezero at init");
    }

    [Fact]
    public void ScaleNormIsGTimesTheUnitVector()
    {
        var norm = new ScaleNorm(9);
        var x = randn(3, 4, 9, generator: new Generator(5));
        using var _ = no_grad();
        TestSupport.AssertClose(x / x.norm(-1, keepdim: true) * 3.0, norm.forward(x), "scale norm");
    }

    public static TheoryData<string> BehaviourFields() => new(["ShiftTokens", "Reversible", "PositionalEncoding", "Causal", "UseScaleNorm"]);

    /// <summary>Fields that keep the parameter names change the function computed with the same weights.</summary>
    [Theory]
    [MemberData(nameof(BehaviourFields))]
    public void BehaviourFieldsChangeTheOutputWithTheSameWeights(string field)
    {
        var baseline = Tiny();
        var changed = field switch
        {
            "ShiftTokens" => baseline with { ShiftTokens = true },
            "Reversible" => baseline with { Reversible = true },
            "PositionalEncoding" => baseline with { PositionalEncoding = PositionalEncoding.None },
            "Causal" => baseline with { Causal = false },
            "UseScaleNorm" => baseline with { UseScaleNorm = true },
            _ => throw new ArgumentException(field),
        };
        var a = Lm(baseline);
        var b = Lm(changed);
        b.load_state_dict(a.state_dict(), strict: field != "UseScaleNorm");          // same weights wherever the names agree
        a.eval(); b.eval();
        var tokens = Tokens(2, 12, 17, 6);
        Assert.True(Differ(Logits(a, tokens), Logits(b, tokens)), $"{field} changed nothing");
    }

    [Fact]
    public void RelativeShawAddsRelativeTablesPerHeadGroup()
    {
        var shapes = Shapes(Lm(Tiny() with { PositionalEncoding = PositionalEncoding.RelativeShaw, MaxRelativePosition = 3 }));
        Assert.Equal([7L, 4], shapes["transformer.layers.0.attn.groups.0.rel_k"]);
        Assert.Equal([7L, 4], shapes["transformer.layers.1.attn.groups.2.rel_v"]);
        Assert.DoesNotContain(Shapes(Lm(Tiny())).Keys, k => k.Contains("rel_"));
    }

    [Fact]
    public void FfChunksGiveTheSameResult()
    {
        var whole = Lm(Tiny());
        var chunked = Lm(Tiny() with { FfChunks = 3 });
        chunked.load_state_dict(whole.state_dict());
        whole.eval(); chunked.eval();
        var tokens = Tokens(2, 11, 17, 8);
        TestSupport.AssertClose(Logits(whole, tokens), Logits(chunked, tokens), "ff chunks");
    }

    [Fact]
    public void KernelAndBlockSizeChangeHowNotWhat()
    {
        var auto = Lm(Tiny() with { BlockSize = 8 });
        var reference = Lm(Tiny() with { Kernel = AttentionKernel.Reference, BlockSize = 3 });
        reference.load_state_dict(auto.state_dict());
        auto.eval(); reference.eval();
        var tokens = Tokens(2, 13, 17, 9);
        TestSupport.AssertClose(Logits(auto, tokens), Logits(reference, tokens), "fused vs reference kernel");
        var group = (StaticPatternAttention)((AttentionLayer)reference.Transformer.Blocks[0].Attention).Groups[1];
        Assert.Equal(3, group.MaskFor(13).BlockSize);
        Assert.Equal(2, group.MaskFor(2).BlockSize);                                  // capped at T
    }

    public static TheoryData<string> DropoutFields() => new(["AttnDropout", "AttnLayerDropout", "FfDropout", "LayerDropout"]);

    [Theory]
    [MemberData(nameof(DropoutFields))]
    public void DropoutFieldsActOnlyInTraining(string field)
    {
        var baseline = Tiny();
        var withDropout = field switch
        {
            "AttnDropout" => baseline with { AttnDropout = 0.5 },
            "AttnLayerDropout" => baseline with { AttnLayerDropout = 0.5 },
            "FfDropout" => baseline with { FfDropout = 0.5 },
            _ => baseline with { LayerDropout = 0.5 },
        };
        var a = Lm(baseline);
        var b = Lm(withDropout);
        b.load_state_dict(a.state_dict());
        var tokens = Tokens(2, 12, 17, 10);
        a.eval(); b.eval();
        AssertSame(Logits(a, tokens), Logits(b, tokens), $"{field} in eval mode");
        a.train(); b.train();
        var reference = Logits(a, tokens);                                           // no dropout: train = eval
        bool changed = false;
        for (int seed = 0; seed < 8 && !changed; seed++)
        {
            random.manual_seed(seed);
            changed = Differ(reference, Logits(b, tokens));
        }
        Assert.True(changed, $"{field} never changed a training forward");
    }

    [Fact]
    public void LayerDropSkipsWholeLayers()
    {
        // With LayerDropout close to 1 almost every forward skips every layer: output = final norm of the embeddings.
        var config = Tiny(causal: false) with { LayerDropout = 0.999 };
        random.manual_seed(3);
        var body = new RoutingTransformer(config);
        var x = randn(1, 6, 16);
        random.manual_seed(0);
        using var _ = no_grad();
        var (y, _) = body.forward(x);
        TestSupport.AssertClose(nn.functional.layer_norm(x, [16]), y, "all layers dropped");
    }

    [Fact]
    public void LongerThanMaxSeqLenIsRejectedByName()
    {
        var model = Lm(Tiny());
        var error = Assert.ThrowsAny<ArgumentException>(() => model.forward(Tokens(1, 33, 17, 1)));
        Assert.Equal("tokens", error.ParamName);
        Assert.Equal("tokens", Assert.ThrowsAny<ArgumentException>(() => model.forward(full(new long[] { 1, 4 }, 17, dtype: ScalarType.Int64))).ParamName);
        Assert.Equal([1L, 32, 17], Logits(model, Tokens(1, 32, 17, 1)).shape);
    }

    [Fact]
    public void ReceivesContextRoutesCrossAttentionByDefaultAndKeepsDenseAvailable()
    {
        static IEnumerable<CrossAttentionLayer> Cross(RoutingTransformerLM m) => m.Transformer.Blocks.Select(b => b.Attention).OfType<CrossAttentionLayer>();
        var decoder = Tiny() with { ReceivesContext = true };
        Assert.Null(decoder.CrossAttention);
        Assert.Equal(CrossAttentionKind.Routing, decoder.ResolvedCrossAttention);
        Assert.Equal(CrossAttentionKind.Dense, Tiny().ResolvedCrossAttention);
        var routed = Lm(decoder);
        Assert.Equal(2, Cross(routed).Count());
        Assert.All(Cross(routed), c => Assert.Equal(32 / 8, c.Routing!.Clusters));
        Assert.True(routed.SupportsCachedDecoding);
        Assert.All(Cross(Lm(decoder with { CrossAttention = CrossAttentionKind.Dense })), c => Assert.Null(c.Routing));
        Tiny().Validate();
        (Tiny() with { CrossAttention = CrossAttentionKind.Dense }).Validate();          // as configurations written before the default changed
        AssertRejectedBy(Tiny() with { CrossAttention = CrossAttentionKind.Routing }, nameof(TransformerConfig.CrossAttention));
        AssertRejectedBy(Tiny() with { ContextWindowSize = 4 }, nameof(TransformerConfig.ContextWindowSize));
        AssertRejectedBy(decoder with { CrossAttention = CrossAttentionKind.Dense, ContextWindowSize = 4 }, nameof(TransformerConfig.ContextWindowSize));
        (decoder with { ContextWindowSize = 4 }).Validate();

        // Clusters fixed by MaxSeqLen / WindowSize: a length that does not divide is refused with the two ways out.
        var uneven = decoder with { MaxSeqLen = 30 };
        var error = Assert.ThrowsAny<ArgumentException>(() => uneven.Validate());
        Assert.Equal(nameof(TransformerConfig.WindowSize), error.ParamName);
        Assert.Contains("num_clusters", error.Message);
        Assert.Contains("cross_attention = Dense", error.Message);
        (uneven with { CrossAttention = CrossAttentionKind.Dense }).Validate();
        Assert.All(Cross(Lm(uneven with { NumClusters = 5 })), c => Assert.Equal(5, c.Routing!.Clusters));

        // JSON: unset stays unset (null), an explicit kind round-trips, --set picks either.
        var json = ConfigBinding.ToJson(decoder);
        Assert.Contains("\"cross_attention\": null", json);
        Assert.Null(ConfigBinding.FromJson(json, "config").CrossAttention);
        Assert.Equal(CrossAttentionKind.Dense, ConfigBinding.FromJson(ConfigBinding.ToJson(decoder with { CrossAttention = CrossAttentionKind.Dense }), "config").CrossAttention);
        Assert.Equal(CrossAttentionKind.Dense, ConfigBinding.Apply(decoder, ["cross_attention=Dense"]).ResolvedCrossAttention);
        Assert.Equal(CrossAttentionKind.Routing, ConfigBinding.Apply(decoder with { CrossAttention = CrossAttentionKind.Dense }, ["cross_attention=null"]).ResolvedCrossAttention);
        Assert.Equal("set", Assert.ThrowsAny<ArgumentException>(() => ConfigBinding.Apply(decoder, ["cross_attention=Sparse"])).ParamName);
    }
}
