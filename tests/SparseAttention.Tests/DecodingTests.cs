using SparseAttention.Hashing;
using SparseAttention.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Incremental decoding (<see cref="RoutingTransformerLM.DecodingState"/>) against the oracle: a full forward over the
/// whole sequence (the model is causal, so its logits at position t are what the cached path must give after token t),
/// and against uncached generation (which re-encodes the context window per token).
/// </summary>
public class DecodingTests
{
    // A full forward and the cached step sum in different orders (tile sizes, one query vs many).
    private const double LogitTolerance = 1e-5;

    private static TransformerConfig Base => ModelTests.Tiny();

    /// <summary>Every head kind and model option the decoder handles, by name.</summary>
    public static TheoryData<string> Variants() => new(VariantConfigs.Keys);

    private static readonly Dictionary<string, TransformerConfig> VariantConfigs = new()
    {
        ["local+strided+fixed"] = Base,
        ["local only, radius 2"] = Base with { NLocalAttnHeads = [4], StaticHeadGroups = null, LocalAttnRadiusBlocks = 2 },
        ["local band + window exact"] = Base with
        {
            NLocalAttnHeads = [0],
            StaticHeadGroups = [new(new(StaticPatternKind.LocalBand, Size: 5), 2), new(new(StaticPatternKind.Window, Size: 4, LookBackward: 2, ExactWindowSize: true), 2)],
        },
        ["strided multihead + fixed multihead"] = Base with
        {
            NLocalAttnHeads = [0],
            StaticHeadGroups = [new(new(StaticPatternKind.Strided, Size: 5, Combine: Patterns.FactorizedCombine.MultiHead), 2),
                                new(new(StaticPatternKind.Fixed, Size: 4, Vertsize: 1, NumVerts: 2, Combine: Patterns.FactorizedCombine.MultiHead), 2)],
        },
        ["routing shared qk"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, WindowSize = 4 },
        ["routing separate qk + memory"] = Base with { NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, SharedQk = false, NumMemKv = 2 },
        ["routing shared qk + memory"] = Base with { NLocalAttnHeads = [0], StaticHeadGroups = null, WindowSize = 4, NumMemKv = 1 },
        ["routing look-back"] = Base with { NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, RoutingLookBack = true },
        ["routing hashed clusters"] = Base with { NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, HashItems = true },
        ["routing hashed clusters separate qk + memory"] = Base with { NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, HashItems = true, SharedQk = false, NumMemKv = 1 },
        ["routing look-back separate qk, layernorm k-means"] = Base with
        {
            NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, RoutingLookBack = true, SharedQk = false, KmeansNorm = Clustering.KMeansNorm.LayerNorm,
        },
        ["routing attends layer-normalised q and k (authors), separate qk + memory"] = Base with
        {
            NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, SharedQk = false, NumMemKv = 1,
            KmeansNorm = Clustering.KMeansNorm.LayerNorm, KmeansAttendNormalized = true,
        },
        ["routing attends layer-normalised q (authors), shared qk"] = Base with
        {
            NLocalAttnHeads = [2], StaticHeadGroups = null, WindowSize = 4, KmeansNorm = Clustering.KMeansNorm.LayerNorm, KmeansAttendNormalized = true,
        },
        ["routing with 3 clusters of window 4 (num_clusters)"] = Base with { NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4, NumClusters = 3 },
        ["absolute position embedding + routing"] = Base with { UseAbsolutePosEmb = true, NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4 },
        ["token shift + reversible + scale norm"] = Base with { ShiftTokens = true, Reversible = true, UseScaleNorm = true, Depth = 3, WindowSize = 4, NLocalAttnHeads = [1], StaticHeadGroups = null },
        ["weight tie + rezero + glu + factorized embedding"] = Base with
        {
            WeightTie = true, Depth = 3, UseRezero = true, FfGlu = true, EmbDim = 8, WindowSize = 4, NLocalAttnHeads = [2], StaticHeadGroups = null,
        },
        ["relative shaw + tied embedding"] = Base with { PositionalEncoding = PositionalEncoding.RelativeShaw, MaxRelativePosition = 3, TieEmbedding = true },
        ["relative shaw on local + routing heads, separate qk + memory"] = Base with
        {
            PositionalEncoding = PositionalEncoding.RelativeShaw, MaxRelativePosition = 3, NLocalAttnHeads = [2], StaticHeadGroups = null,
            WindowSize = 4, SharedQk = false, NumMemKv = 1,
        },
        ["mixture of experts + product-key memory + routing"] = Base with
        {
            MoeLayers = [1], PkmLayers = [2], PkmNumKeys = 5, PkmTopK = 2, PkmHeads = 2, PkmDimHead = 4, NLocalAttnHeads = [2], StaticHeadGroups = null, WindowSize = 4,
        },
        ["routing, centroids trained by gradient (kmeans_ema = false)"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, WindowSize = 4, KmeansEma = false },
        ["timing signal + target dropout + factorized embedding"] = Base with { AddTimingSignal = true, TargetDropout = 0.3, EmbDim = 8 },
        ["alibi on static groups"] = Base with { PositionalEncoding = PositionalEncoding.Alibi },
        ["alibi on local + routing heads, shared qk"] = Base with { PositionalEncoding = PositionalEncoding.Alibi, NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4 },
        ["no positions + sparsity skip first"] = Base with { PositionalEncoding = PositionalEncoding.None, Depth = 3, SparsitySkipFirst = 1, NLocalAttnHeads = [1], StaticHeadGroups = null, WindowSize = 4 },
        ["lsh 2 rounds"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4 } },
        ["lsh 3 rounds dedup, 4 buckets"] = Base with { NLocalAttnHeads = [1], StaticHeadGroups = null, Lsh = new LshSpec { Heads = 3, NHashes = 3, BucketSize = 3, NBuckets = 4, Dedup = true } },
        ["alsh simple-lsh"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4, Alsh = AlshTransform.SimpleLsh } },
        ["alsh xbox + qnf"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Lsh = new LshSpec { Heads = 2, BucketSize = 4, Alsh = AlshTransform.Xbox, QueryNormalizedFirst = true } },
        ["alsh sign-alsh"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Lsh = new LshSpec { Heads = 2, BucketSize = 4, Alsh = AlshTransform.SignAlsh } },
        ["relative shaw on lsh 2 rounds"] = Base with
        {
            PositionalEncoding = PositionalEncoding.RelativeShaw, MaxRelativePosition = 3, NLocalAttnHeads = [2], StaticHeadGroups = null,
            Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4 },
        },
        ["alibi on alsh simple-lsh, 2 rounds dedup"] = Base with
        {
            PositionalEncoding = PositionalEncoding.Alibi, NLocalAttnHeads = [2], StaticHeadGroups = null,
            Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4, Dedup = true, Alsh = AlshTransform.SimpleLsh },
        },
        ["synthesizer dense"] = Base with { NLocalAttnHeads = [0], StaticHeadGroups = null, Synthesizer = new SynthesizerSpec { Heads = 4, Kind = Modules.SynthesizerKind.Dense } },
        ["synthesizer random + learned mix"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Synthesizer = new SynthesizerSpec { Heads = 2, Kind = Modules.SynthesizerKind.Random, Mix = Modules.SynthesizerMix.Learned } },
        ["synthesizer factorized dense + sum"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Synthesizer = new SynthesizerSpec { Heads = 2, Kind = Modules.SynthesizerKind.FactorizedDense, Mix = Modules.SynthesizerMix.Sum } },
        ["synthesizer factorized random fixed"] = Base with { NLocalAttnHeads = [2], StaticHeadGroups = null, Synthesizer = new SynthesizerSpec { Heads = 2, Kind = Modules.SynthesizerKind.FactorizedRandom, Trainable = false } },
        // Causal block layouts whose rows depend on the length (random blocks, window-aligned globals): the model fixes
        // them at max_seq_len, so a prompt of 1 or 7 tokens sees what the full forward sees.
        ["bigbird + ds variable + ds fixed"] = Base with
        {
            NLocalAttnHeads = [1],
            StaticHeadGroups =
            [
                new(new(StaticPatternKind.BigBird, Size: 4, NumRandomBlocks: 2, DifferentLayoutPerHead: true, Seed: 5), 1),
                new(new(StaticPatternKind.DsVariable, Size: 4, NumRandomBlocks: 1, LocalWindowBlocks: [1, 2], GlobalBlockIndices: [0], Seed: 7), 1),
                new(new(StaticPatternKind.DsFixed, Size: 4, NumLocalBlocks: 3, NumGlobalBlocks: 1), 1),
            ],
        },
        ["longformer + sliding window"] = Base with
        {
            NLocalAttnHeads = [2],
            StaticHeadGroups = [new(new(StaticPatternKind.Longformer, Size: 4, GlobalBlockIndices: [1]), 1), new(new(StaticPatternKind.SlidingWindow, Size: 4), 1)],
        },
        ["every kind in one layer + shift + reversible"] = Base with
        {
            Heads = 8, Dim = 32, NLocalAttnHeads = [1], WindowSize = 4, ShiftTokens = true, Reversible = true,
            StaticHeadGroups = [new(new(StaticPatternKind.Strided, Size: 3), 1), new(new(StaticPatternKind.Fixed, Size: 4), 1)],
            Lsh = new LshSpec { Heads = 2, NHashes = 2, BucketSize = 4 },
            Synthesizer = new SynthesizerSpec { Heads = 1, Kind = Modules.SynthesizerKind.Dense, Mix = Modules.SynthesizerMix.Sum },
            RoutingLookBack = true,
        },
    };

    /// <summary>The CLI's shipped presets, shrunk to a test size (same head kinds and options).</summary>
    public static TheoryData<string> Presets() => new(Cli.Presets.Names);

    private static RoutingTransformerLM Model(TransformerConfig config, long seed)
    {
        var model = ModelTests.Lm(config, seed);
        // A trained-like spread: larger embeddings make the logits (and the k-means assignments) less uniform.
        using (no_grad())
            foreach (var (name, p) in model.named_parameters())
                if (name.Contains("token_emb")) p.mul_(20);
        // Centroids from data, as after training: one training forward initialises every k-means module.
        model.train();
        model.forward(randint(0, config.NumTokens, new long[] { 2, config.MaxSeqLen }, generator: new Generator((ulong)seed + 1)));
        model.eval();
        return model;
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public void CachedLogitsEqualAFullForwardAtEveryStep(string variant)
    {
        var config = VariantConfigs[variant];
        var model = Model(config, seed: 3);
        Assert.True(model.SupportsCachedDecoding, variant);
        int promptLength = variant.Length % 2 == 0 ? 1 : 7;                              // both a one-token and a longer prompt across variants
        {
            var tokens = randint(0, config.NumTokens, new long[] { 2, config.MaxSeqLen }, generator: new Generator(11));
            using var noGrad = no_grad();
            var expected = model.forward(tokens).Logits;                                   // (2, T, V)
            using var state = model.StartDecoding(tokens.narrow(1, 0, promptLength));
            TestSupport.AssertClose(expected.select(1, promptLength - 1), state.Logits, $"{variant}: after the prompt of {promptLength}",
                atol: LogitTolerance, rtol: LogitTolerance);
            for (int t = promptLength; t < config.MaxSeqLen; t++)
            {
                var logits = state.Append(tokens.select(1, t));
                TestSupport.AssertClose(expected.select(1, t), logits, $"{variant}: step at position {t} (prompt {promptLength})",
                    atol: LogitTolerance, rtol: LogitTolerance);
            }
            Assert.Equal(0, state.ReEncodes);
        }
    }

    [Theory]
    [MemberData(nameof(Presets))]
    public void EveryPresetDecodesLikeAFullForward(string preset)
    {
        var shipped = Cli.Presets.Load(preset);
        // Test size: context 48 (three windows of 16), dim 32, depth 2; every head kind and option of the preset kept.
        var config = shipped with
        {
            Dim = 32, Depth = 2, MaxSeqLen = 48, WindowSize = 16, LocalAttnWindowSize = null, BlockSize = 16,
            NLocalAttnHeads = shipped.NLocalAttnHeads.Length == 1 ? shipped.NLocalAttnHeads : shipped.NLocalAttnHeads.Take(2).ToArray(),
            Lsh = shipped.Lsh is null ? null : shipped.Lsh with { BucketSize = 8 },
        };
        var model = Model(config, seed: 4);
        Assert.True(model.SupportsCachedDecoding, preset);
        var tokens = randint(0, config.NumTokens, new long[] { 1, config.MaxSeqLen }, generator: new Generator(12));
        using var noGrad = no_grad();
        var expected = model.forward(tokens).Logits;                                       // (1, T, V)
        using var state = model.StartDecoding(tokens.narrow(1, 0, 5));
        TestSupport.AssertClose(expected.select(1, 4), state.Logits, $"{preset}: prompt", atol: LogitTolerance, rtol: LogitTolerance);
        for (int t = 5; t < config.MaxSeqLen; t++)
            TestSupport.AssertClose(expected.select(1, t), state.Append(tokens.select(1, t)), $"{preset}: position {t}",
                atol: LogitTolerance, rtol: LogitTolerance);
    }

    [Theory]
    [InlineData(false, false, CrossAttentionKind.Dense)]
    [InlineData(true, false, CrossAttentionKind.Dense)]
    [InlineData(false, true, CrossAttentionKind.Dense)]
    [InlineData(false, false, CrossAttentionKind.Routing)]
    [InlineData(true, true, CrossAttentionKind.Routing)]
    public void CrossAttendingDecodersDecodeLikeAFullForward(bool tokenShift, bool contextSharedQk, CrossAttentionKind cross)
    {
        // A decoder with cross-attention to a context (an encoder's output, here random) and routing + local
        // self-attention; some context rows padded. With context_shared_qk the context is projected by to_q (width Dim).
        // Routing cross-attention: 3 context keys per cluster out of 9 (5 real in row 1), 8 clusters, query chunks of 4.
        var config = VariantConfigs["routing look-back"] with
        {
            ReceivesContext = true, ContextDim = contextSharedQk ? null : 12, ShiftTokens = tokenShift, ContextSharedQk = contextSharedQk,
            CrossAttention = cross, ContextWindowSize = cross == CrossAttentionKind.Routing ? 3 : null,
        };
        var model = ModelTests.Lm(config, seed: 13);
        var context = randn(new long[] { 2, 9, config.ResolvedContextDim }, generator: new Generator(14));
        var contextMask = ones(2, 9, dtype: ScalarType.Bool);
        contextMask[1, 5..] = tensor(false);
        var tokens = randint(0, config.NumTokens, new long[] { 2, config.MaxSeqLen }, generator: new Generator(15));
        model.train();
        using (no_grad()) model.forward(tokens, null, context, contextMask);                // k-means from data
        model.eval();
        Assert.True(model.SupportsCachedDecoding);
        using var noGrad = no_grad();
        var expected = model.forward(tokens, null, context, contextMask).Logits;          // (2, T, V)
        using var state = model.StartDecoding(tokens.narrow(1, 0, 3), context: context, contextMask: contextMask);
        TestSupport.AssertClose(expected.select(1, 2), state.Logits, "prompt", atol: LogitTolerance, rtol: LogitTolerance);
        for (int t = 3; t < config.MaxSeqLen; t++)
            TestSupport.AssertClose(expected.select(1, t), state.Append(tokens.select(1, t)), $"position {t}", atol: LogitTolerance, rtol: LogitTolerance);
        Assert.Equal("context", Assert.ThrowsAny<ArgumentException>(() => model.StartDecoding(tokens.narrow(1, 0, 3))).ParamName);
    }

    [Fact]
    public void EncoderDecoderGenerationWithTheCacheEqualsRegeneration()
    {
        var encoder = ModelTests.Tiny(causal: false) with { NumTokens = 11, Dim = 12, Heads = 2, NLocalAttnHeads = [1], StaticHeadGroups = [new(new(StaticPatternKind.Dense), 1)] };
        var decoder = VariantConfigs["routing separate qk + memory"] with { ReceivesContext = true, ContextDim = 12 };
        var source = randint(0, 11, new long[] { 2, 9 }, generator: new Generator(17));
        var sourceMask = ones(2, 9, dtype: ScalarType.Bool);
        sourceMask[0, 6..] = tensor(false);
        var prompt = randint(0, decoder.NumTokens, new long[] { 2, 2 }, generator: new Generator(18));
        foreach (var cross in new[] { CrossAttentionKind.Dense, CrossAttentionKind.Routing })
        {
            random.manual_seed(16);
            var model = new RoutingTransformerEncDec(encoder, decoder with { CrossAttention = cross });
            model.train();                                                                    // k-means from data
            using (no_grad()) model.forward(source, randint(0, decoder.NumTokens, new long[] { 2, decoder.MaxSeqLen }, generator: new Generator(19)), sourceMask);
            Assert.True(model.Decoder.SupportsCachedDecoding);
            var cached = model.Generate(source, prompt, 60, sourceMask, temperature: 0);
            var uncached = model.Generate(source, prompt, 60, sourceMask, temperature: 0, useCache: false);
            Assert.Equal(uncached.data<long>().ToArray(), cached.data<long>().ToArray());
        }
        // Non-causal routing cross-attention groups its queries by balanced top-k over all of them: no incremental decoder.
        var bidirectional = decoder with { Causal = false, CrossAttention = CrossAttentionKind.Routing, SharedQk = false };
        Assert.False(ModelTests.Lm(bidirectional, seed: 1).SupportsCachedDecoding);
    }

    [Fact]
    public void RoutingDecodingCrossesChunkBoundaries()
    {
        // Window 4, 32 tokens, 8 clusters: the test is only meaningful if some cluster gets more than one chunk.
        var config = VariantConfigs["routing shared qk"];
        var model = Model(config, seed: 3);
        var tokens = randint(0, config.NumTokens, new long[] { 2, config.MaxSeqLen }, generator: new Generator(11));
        using var capture = RoutingCapture.Start();
        using (no_grad()) model.forward(tokens);
        var repeated = capture.Records.Any(r =>
        {
            var clusters = r.GroupClusters.cpu().data<long>().ToArray();
            return clusters.Where(c => c >= 0).GroupBy(c => c).Any(g => g.Count() > 1);
        });
        Assert.True(repeated, "no cluster filled a chunk: the decoding tests never cross a chunk boundary");
    }

    [Theory]
    [InlineData("routing separate qk + memory")]
    [InlineData("every kind in one layer + shift + reversible")]
    public void GreedyDecodingOfAThousandTokensEqualsUncachedGeneration(string variant)
    {
        var config = VariantConfigs[variant];
        var model = Model(config, seed: 5);
        var prompt = randint(0, config.NumTokens, new long[] { 1, 5 }, generator: new Generator(2));
        var cached = model.Generate(prompt, 1000, temperature: 0);
        var uncached = model.Generate(prompt, 1000, temperature: 0, useCache: false);
        Assert.Equal(uncached.data<long>().ToArray(), cached.data<long>().ToArray());
        Assert.Equal(new long[] { 1, 1000 }, cached.shape);
    }

    [Fact]
    public void SamplingWithTheCacheEqualsSamplingWithout()
    {
        var config = VariantConfigs["routing shared qk"];
        var model = Model(config, seed: 6);
        var prompt = randint(0, config.NumTokens, new long[] { 2, 3 }, generator: new Generator(4));
        var cached = model.Generate(prompt, 80, temperature: 0.8, topP: 0.9, seed: 9);
        var uncached = model.Generate(prompt, 80, temperature: 0.8, topP: 0.9, seed: 9, useCache: false);
        Assert.Equal(uncached.data<long>().ToArray(), cached.data<long>().ToArray());
    }

    [Fact]
    public void PastTheContextTheStateReEncodesTheKeptWindow()
    {
        var config = VariantConfigs["routing look-back"];
        int m = config.MaxSeqLen, keep = 10;
        var model = Model(config, seed: 7);
        var tokens = randint(0, config.NumTokens, new long[] { 1, 3 * m }, generator: new Generator(8));
        using var state = model.StartDecoding(tokens.narrow(1, 0, 2), contextKeep: keep);
        using var noGrad = no_grad();
        for (int n = 3; n <= 3 * m; n++)
        {
            var logits = state.Append(tokens.select(1, n - 1));
            long from = RoutingTransformerLM.DecodingState.ContextStart(n, m, keep);
            Assert.Equal(n - from, state.ContextLengths[0]);
            Assert.InRange(state.ContextLengths[0], 1, m);
            var expected = model.forward(tokens.narrow(1, from, n - from)).Logits.select(1, -1);   // the window's last logits
            TestSupport.AssertClose(expected, logits, $"after {n} tokens", atol: LogitTolerance, rtol: LogitTolerance);
        }
        Assert.Equal((3 * m - m + (m - keep) - 1) / (m - keep), state.ReEncodes);
    }

    [Theory]
    [InlineData(false, null)]
    [InlineData(true, null)]
    [InlineData(false, "shaw")]
    [InlineData(true, "alibi")]
    public void FusedOneQueryAttentionEqualsTheOpsPath(bool memory, string? relative)
    {
        // The ops path is the oracle (plain gather + masked softmax); lists hold empty slots, a repeated slot and a
        // (row, head) with no key at all.
        const int batch = 2, heads = 3, capacity = 9, dim = 8, width = 5;
        var gen = new Generator(3);
        var q = randn(new long[] { batch, heads, dim }, generator: gen);
        var keys = randn(new long[] { batch, capacity, heads, dim }, generator: gen);
        var values = randn(new long[] { batch, capacity, heads, dim }, generator: gen);
        var slots = new long[batch * heads * width];
        var rng = new Random(4);
        for (int i = 0; i < slots.Length; i++) slots[i] = rng.Next(-2, capacity);
        slots[3] = slots[4] = 5;                                                            // one key listed twice
        for (int l = 0; l < width; l++) slots[width + l] = -1;                              // (0, 1) sees nothing
        Tensor? memK = memory ? randn(new long[] { batch, heads, 2, dim }, generator: gen) : null;
        Tensor? memV = memory ? randn(new long[] { batch, heads, 2, dim }, generator: gen) : null;
        // Distances beyond the Shaw tables' reach (±2) exercise the clipping.
        Kernels.RelativePositionTerms? terms = relative switch
        {
            "shaw" => new Kernels.ShawRelativePositions(randn(new long[] { 5, dim }, generator: gen), randn(new long[] { 5, dim }, generator: gen)),
            "alibi" => new Kernels.AlibiPositions([0.5, 0.25, 0.125]),
            _ => null,
        };
        Kernels.DecodeAttention.Relative? rel = terms is null ? null : new(slots.Select(_ => (long)rng.Next(-6, 1)).ToArray(), terms);
        double scale = 1 / Math.Sqrt(dim);
        var expected = Kernels.DecodeAttention.AttendOps(q, keys, values, slots, width, memK, memV, rel, scale);
        var actual = Kernels.DecodeAttention.AttendCpu(q, keys, values, slots, width, memK, memV, rel, (float)scale);
        TestSupport.AssertClose(expected, actual, $"memory {memory}, relative {relative}");
        if (!memory) Assert.Equal(0, actual[0, 1].abs().sum().item<float>());              // no key, no memory: zeros
    }

    [Fact]
    public void ContextStartFollowsItsDefinition()
    {
        Assert.Equal(0, RoutingTransformerLM.DecodingState.ContextStart(32, 32, 16));
        Assert.Equal(16, RoutingTransformerLM.DecodingState.ContextStart(33, 32, 16));
        Assert.Equal(16, RoutingTransformerLM.DecodingState.ContextStart(48, 32, 16));
        Assert.Equal(32, RoutingTransformerLM.DecodingState.ContextStart(49, 32, 16));
        Assert.Equal(1, RoutingTransformerLM.DecodingState.ContextStart(2, 1, 0));   // a one-token context
    }

    [Theory]
    [InlineData("routing separate qk + memory")]
    [InlineData("token shift + reversible + scale norm")]
    public void BatchedPromptsOfDifferentLengthsDecodeLikeOneAtATime(string variant)
    {
        var config = VariantConfigs[variant];
        var model = Model(config, seed: 9);
        var lengths = new[] { 3, 9, 1 };
        var rows = lengths.Select((n, i) => randint(0, config.NumTokens, new long[] { 1, n }, generator: new Generator((ulong)(20 + i)))).ToArray();
        // Left padding (the Hugging Face convention): real tokens at the end of each row.
        int width = lengths.Max();
        var prompt = zeros(new long[] { 3, width }, dtype: ScalarType.Int64);
        var mask = zeros(new long[] { 3, width }, dtype: ScalarType.Bool);
        for (int b = 0; b < 3; b++)
        {
            prompt[b, (width - lengths[b])..] = rows[b][0];
            mask[b, (width - lengths[b])..] = true;
        }
        var batched = Sampling.GenerateCached(model, prompt, 60, temperature: 0, promptMask: mask);
        for (int b = 0; b < 3; b++)
        {
            var alone = model.Generate(rows[b], 60, temperature: 0, useCache: false);
            Assert.Equal(alone[0].data<long>().ToArray(), batched[b].data<long>().ToArray());
        }
    }

    [Fact]
    public void LiveTensorsDoNotGrowWithTheNumberOfDecodedTokens()
    {
        var config = VariantConfigs["routing look-back"];
        var model = Model(config, seed: 10);
        using var noGrad = no_grad();
        using var state = model.StartDecoding(randint(0, config.NumTokens, new long[] { 2, 4 }, generator: new Generator(1)));
        var next = zeros(2, dtype: ScalarType.Int64);
        long LiveAfter(int steps)
        {
            for (int i = 0; i < steps; i++) state.Append(next);     // crosses the context several times: re-encodes included
            GC.Collect();
            GC.WaitForPendingFinalizers();
            return DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        }
        long early = LiveAfter(40);
        long late = LiveAfter(200);
        Assert.Equal(early, late);
    }

    [Fact]
    public void DecodingRefusesWhatItCannotDoWithClearErrors()
    {
        var model = Model(Base, seed: 1);
        var prompt = zeros(new long[] { 1, 2 }, dtype: ScalarType.Int64);
        model.train();
        Assert.Equal("prompt", Assert.ThrowsAny<ArgumentException>(() => model.StartDecoding(prompt)).ParamName);
        model.eval();
        Assert.Equal("contextKeep", Assert.ThrowsAny<ArgumentException>(() => model.StartDecoding(prompt, contextKeep: Base.MaxSeqLen)).ParamName);
        Assert.Equal("promptMask", Assert.ThrowsAny<ArgumentException>(() =>
            model.StartDecoding(prompt, zeros(new long[] { 1, 2 }, dtype: ScalarType.Bool))).ParamName);
        using var state = model.StartDecoding(prompt);
        Assert.Equal("tokens", Assert.ThrowsAny<ArgumentException>(() => state.Append(full(1, 17L))).ParamName);
        Assert.Equal("tokens", Assert.ThrowsAny<ArgumentException>(() => state.Append(zeros(2, dtype: ScalarType.Int64))).ParamName);
        Assert.Equal("maxNewTokens", Assert.ThrowsAny<ArgumentException>(() => model.Generate(prompt, Sampling.MaxNewTokensLimit + 1)).ParamName);

        var encoder = Model(Base with { Causal = false }, seed: 1);
        Assert.False(encoder.SupportsCachedDecoding);
        Assert.Throws<NotSupportedException>(() => encoder.StartDecoding(prompt));
    }
}
