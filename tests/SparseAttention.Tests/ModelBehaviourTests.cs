using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Model tests, part 2: causality, padding, positions, the building blocks against
/// independent definitions, and the encoder-decoder.</summary>
public partial class ModelTests
{
    // ------------------------------------------------------------------------------------------
    // Causality
    // ------------------------------------------------------------------------------------------

    public static TheoryData<PositionalEncoding, bool, bool, bool> CausalVariants() => new()
    {
        // positions, reversible, shift tokens, training mode
        { PositionalEncoding.Rotary, false, false, false },
        { PositionalEncoding.Rotary, false, true, true },
        { PositionalEncoding.RelativeShaw, true, false, true },
        { PositionalEncoding.RelativeShaw, false, true, false },
        { PositionalEncoding.None, true, true, false },
    };

    [Theory]
    [MemberData(nameof(CausalVariants))]
    public void DecoderLogitsNeverSeeLaterTokens(PositionalEncoding positions, bool reversible, bool shift, bool training)
    {
        // 2 local + 1 strided + 1 fixed head per layer; dropout 0, so training mode must be exact too.
        var config = Tiny() with { PositionalEncoding = positions, Reversible = reversible, ShiftTokens = shift, Depth = 3, UseScaleNorm = reversible };
        var model = Lm(config);
        model.train(training);
        const int seqLen = 21;
        var tokens = Tokens(2, seqLen, 17, 11);
        var logits = Logits(model, tokens);
        foreach (int t in new[] { 0, 4, 9, 15, 19 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = Tokens(2, seqLen - t - 1, 17, (ulong)(100 + t));
            var changed = Logits(model, perturbed);
            AssertSame(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}");
            Assert.True(Differ(logits[.., (t + 1)..], changed[.., (t + 1)..]), $"perturbing after {t} changed nothing at all");
        }
    }

    [Theory]
    [InlineData(PositionalEncoding.Rotary)]
    [InlineData(PositionalEncoding.RelativeShaw)]
    public void EncoderIsBidirectional(PositionalEncoding positions)
    {
        var model = Lm(Tiny(causal: false) with { PositionalEncoding = positions });
        model.eval();
        var tokens = Tokens(1, 20, 17, 12);
        var changed = tokens.clone();
        changed[0, 19] = tensor((tokens[0, 19].item<long>() + 1) % 17);
        Assert.True(Differ(Logits(model, tokens)[.., 0], Logits(model, changed)[.., 0]), "changing the last token left the first output unchanged");
    }

    // ------------------------------------------------------------------------------------------
    // Key padding
    // ------------------------------------------------------------------------------------------

    public static TheoryData<PositionalEncoding, bool, bool> PaddingVariants() => new()
    {
        { PositionalEncoding.Rotary, false, false },
        { PositionalEncoding.Rotary, true, true },
        { PositionalEncoding.RelativeShaw, true, false },
    };

    [Theory]
    [MemberData(nameof(PaddingVariants))]
    public void PaddingNeverReachesRealTokensInTheEncoder(PositionalEncoding positions, bool shift, bool reversible)
    {
        var config = Tiny(causal: false) with { PositionalEncoding = positions, ShiftTokens = shift, Reversible = reversible };
        random.manual_seed(13);
        var body = new RoutingTransformer(config);
        body.eval();
        const int seqLen = 14;
        var mask = ones(3, seqLen, dtype: ScalarType.Bool);
        mask[0, 9..] = tensor(false);                                           // right padding
        mask[1, ..3] = tensor(false);                                           // left padding
        mask[1, 7] = tensor(false);                                             // a hole
        mask[2] = tensor(false);                                                // nothing real at all
        var x = randn(3, seqLen, 16, generator: new Generator(14));
        var garbage = x.masked_fill(mask.logical_not().unsqueeze(-1), double.NaN);
        using var _ = no_grad();
        var (clean, _) = body.forward(x, mask);
        var (dirty, _) = body.forward(garbage, mask);
        var real = mask.unsqueeze(-1).expand_as(clean);
        Assert.False(clean.isnan().any().item<bool>(), "NaN with finite padding");
        Assert.False(dirty.masked_select(real).isnan().any().item<bool>(), "NaN in padding reached a real token");
        AssertSame(clean.masked_select(real), dirty.masked_select(real), "real tokens with NaN padding");

        // At the LM level: different padding tokens, same real outputs.
        var model = Lm(config);
        model.eval();
        var tokens = Tokens(3, seqLen, 17, 15);
        var otherPadding = tokens.masked_fill(mask.logical_not(), 5);
        var a = Logits(model, tokens, mask);
        var b = Logits(model, otherPadding, mask);
        var realLogits = mask.unsqueeze(-1).expand_as(a);
        Assert.False(a.isnan().any().item<bool>());
        AssertSame(a.masked_select(realLogits), b.masked_select(realLogits), "real logits with other padding tokens");
    }

    // ------------------------------------------------------------------------------------------
    // Loss and training
    // ------------------------------------------------------------------------------------------

    [Fact]
    public void NextTokenLossShiftsTargetsAndIgnoresTheIgnoreIndex()
    {
        var logits = randn(2, 5, 7, generator: new Generator(16));
        var tokens = tensor(new long[] { 1, 2, 0, 3, 0, 4, 0, 6, 5, 2 }).view(2, 5);
        // Independent: −log softmax at the next token, averaged over targets ≠ 0.
        var logProbs = logits.log_softmax(-1);
        double sum = 0; int count = 0;
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < 4; t++)
            {
                long target = tokens[b, t + 1].item<long>();
                if (target == 0) continue;
                sum -= logProbs[b, t, target].item<float>();
                count++;
            }
        Assert.Equal(sum / count, LanguageModelLoss.NextToken(logits, tokens, ignoreIndex: 0).item<float>(), 5);
        // With the default ignore index nothing is ignored.
        var all = -logProbs.narrow(1, 0, 4).gather(-1, tokens.narrow(1, 1, 4).unsqueeze(-1)).mean();
        Assert.Equal(all.item<float>(), LanguageModelLoss.NextToken(logits, tokens).item<float>(), 5);
        // Everything ignored: zero, not NaN.
        Assert.Equal(0f, LanguageModelLoss.NextToken(logits, zeros_like(tokens), ignoreIndex: 0).item<float>());
        // The aux loss is added.
        var aux = tensor(0.25f);
        Assert.Equal(all.item<float>() + 0.25f, LanguageModelLoss.NextToken(logits, tokens, aux).item<float>(), 5);
    }

    /// <summary>50 AdamW steps (lr 1e-2) on one fixed batch must bring the next-token loss (aux included) below 0.3× its start.</summary>
    internal static void AssertOverfits(RoutingTransformerLM model, Tensor tokens)
    {
        var optimizer = optim.AdamW(model.parameters(), lr: 1e-2);
        model.train();
        float first = 0, last = 0;
        for (int step = 0; step < 50; step++)
        {
            using var scope = NewDisposeScope();
            optimizer.zero_grad();
            var (logits, aux) = model.forward(tokens);
            var loss = LanguageModelLoss.NextToken(logits, tokens, aux);
            loss.backward();
            optimizer.step();
            if (step == 0) first = loss.item<float>();
            last = loss.item<float>();
        }
        Assert.True(last < 0.3f * first, $"loss went from {first} to {last}");
    }

    [Fact]
    public void TinyLanguageModelOverfitsAFixedBatch()
    {
        var model = Lm(Tiny() with { ShiftTokens = true }, seed: 17);
        var tokens = Tokens(4, 16, 17, 18);
        AssertOverfits(model, tokens);
    }

    // ------------------------------------------------------------------------------------------
    // Generation
    // ------------------------------------------------------------------------------------------

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void GenerateWorksFromOneTokenBeforeTraining(bool everyOption)
    {
        var config = everyOption
            ? Tiny() with { ShiftTokens = true, PositionalEncoding = PositionalEncoding.RelativeShaw, Reversible = true, EmbDim = 8, TieEmbedding = true, FfGlu = true, FfChunks = 2 }
            : Tiny();
        var model = Lm(config);
        model.train();
        var sample = model.Generate(tensor(new long[] { 3 }).view(1, 1), maxNewTokens: 40, seed: 1);   // longer than MaxSeqLen = 32: cropped
        Assert.Equal([1L, 40], sample.shape);
        Assert.True(sample.min().item<long>() >= 0 && sample.max().item<long>() < 17);
        Assert.True(model.training, "Generate must restore training mode");
    }

    [Fact]
    public void TopKOneIsGreedyDecoding()
    {
        var model = Lm(Tiny(), seed: 19);
        model.eval();
        var prompt = Tokens(2, 3, 17, 20);
        // Greedy decoding written independently: argmax of the last position, window cropped to MaxSeqLen.
        var sequence = prompt;
        for (int i = 0; i < 35; i++)
        {
            long len = sequence.shape[1];
            var window = sequence.narrow(1, Math.Max(0, len - 32), Math.Min(len, 32));
            var next = Logits(model, window)[.., -1].argmax(-1, keepdim: true);
            sequence = cat([sequence, next], 1);
        }
        var greedy = sequence.narrow(1, 3, 35);
        AssertSame(greedy, model.Generate(prompt, 35, topK: 1, seed: 7), "topK = 1");
        AssertSame(greedy, model.Generate(prompt, 35, temperature: 0), "temperature = 0");
    }

    [Fact]
    public void SameSeedSameSample()
    {
        var model = Lm(Tiny());
        var prompt = Tokens(2, 2, 17, 21);
        var a = model.Generate(prompt, 20, temperature: 1.5, topP: 0.95, seed: 5);
        var b = model.Generate(prompt, 20, temperature: 1.5, topP: 0.95, seed: 5);
        AssertSame(a, b, "same seed");
        bool anyDifferent = Enumerable.Range(6, 5).Any(s => !equal(a, model.Generate(prompt, 20, temperature: 1.5, topP: 0.95, seed: (ulong)s)).all().item<bool>());
        Assert.True(anyDifferent, "the seed has no effect");
    }

    [Fact]
    public void EosStopsEachRowAndThenTheLoop()
    {
        var model = Lm(Tiny(), seed: 22);
        var prompt = Tokens(2, 2, 17, 23);
        var greedy = model.Generate(prompt, 12, temperature: 0);
        long eos = greedy[0, 2].item<long>();
        var stopped = model.Generate(prompt, 12, temperature: 0, eos: eos);
        // Row 0 ends at its first eos; after a row ends it repeats eos; generation ends once every row has ended.
        int FirstEos(int row) => Enumerable.Range(0, 12).FirstOrDefault(i => greedy[row, i].item<long>() == eos, 12);
        int end = Math.Min(12, Math.Max(FirstEos(0), FirstEos(1)) + 1);
        Assert.Equal(end, (int)stopped.shape[1]);
        for (int row = 0; row < 2; row++)
            for (int i = 0; i < end; i++)
                Assert.Equal(i <= FirstEos(row) ? greedy[row, i].item<long>() : eos, stopped[row, i].item<long>());
    }

    [Fact]
    public void TopPKeepsTheSmallestSetReachingTheMass()
    {
        // Probabilities 0.05, 0.5, 0.15, 0.3 (shuffled on purpose).
        var logits = tensor(new[] { 0.05f, 0.5f, 0.15f, 0.3f }).log().view(1, 4);
        bool[] Kept(int? k, double? p)
        {
            var filtered = Sampling.FilterLogits(logits, k, p);
            return Enumerable.Range(0, 4).Select(i => !float.IsNegativeInfinity(filtered[0, i].item<float>())).ToArray();
        }
        Assert.Equal([false, true, false, false], Kept(null, 0.4));                // 0.5 ≥ 0.4
        Assert.Equal([false, true, false, true], Kept(null, 0.7));                 // 0.5 < 0.7 ≤ 0.8
        Assert.Equal([false, true, true, true], Kept(null, 0.9));                  // 0.8 < 0.9 ≤ 0.95
        Assert.Equal([true, true, true, true], Kept(null, 0.97));
        Assert.Equal([true, true, true, true], Kept(null, 1.0));
        Assert.Equal([false, true, false, true], Kept(2, null));
        Assert.Equal([false, true, false, false], Kept(2, 0.6));                   // after top-2: 0.5/0.8 = 0.625 ≥ 0.6
        // Sampling only ever draws kept tokens, in proportion.
        var model = Lm(Tiny());
        var counts = new int[4];
        var gen = new Generator(3);
        var probs = Sampling.FilterLogits(logits, null, 0.7).softmax(-1);
        var draws = probs.multinomial(4000, replacement: true, generator: gen);
        foreach (long d in draws.data<long>()) counts[d]++;
        Assert.Equal(0, counts[0] + counts[2]);
        Assert.InRange(counts[1] / 4000.0, 0.5 / 0.8 - 0.03, 0.5 / 0.8 + 0.03);
        Assert.Equal("topP", Assert.ThrowsAny<ArgumentException>(() => Sampling.FilterLogits(logits, null, 0.0)).ParamName);
        Assert.Equal("prompt", Assert.ThrowsAny<ArgumentException>(() => model.Generate(zeros(1, 0, dtype: ScalarType.Int64), 3)).ParamName);
    }

    // ------------------------------------------------------------------------------------------
    // Positions
    // ------------------------------------------------------------------------------------------

    [Fact]
    public void RotaryDotProductsDependOnlyOnThePositionDifference()
    {
        var gen = new Generator(24);
        var q = randn(new long[] { 1, 1, 1, 8 }, dtype: ScalarType.Float64, generator: gen);
        var k = randn(new long[] { 1, 1, 1, 8 }, dtype: ScalarType.Float64, generator: gen);
        double Dot(long m, long n) => (RotaryEmbedding.Apply(q, m) * RotaryEmbedding.Apply(k, n)).sum().item<double>();
        foreach (var (m, n) in new[] { (0L, 0L), (5L, 2L), (3L, 9L), (40L, 1L) })
            foreach (long shift in new[] { 1L, 7L, 123L })
                Assert.Equal(Dot(m, n), Dot(m + shift, n + shift), 10);
        Assert.NotEqual(Dot(5, 2), Dot(5, 3), 6);                                  // and it does depend on the difference
        Assert.Equal(Dot(0, 0), (q * k).sum().item<double>(), 12);                // position 0 is the identity
        // Norms are preserved (a rotation), and a sequence gets position t at row t.
        var seq = randn(new long[] { 2, 3, 6, 8 }, dtype: ScalarType.Float64, generator: gen);
        var rotated = RotaryEmbedding.Apply(seq);
        TestSupport.AssertClose(seq.norm(-1), rotated.norm(-1), "norms");
        TestSupport.AssertClose(RotaryEmbedding.Apply(seq.narrow(2, 4, 1), offset: 4), rotated.narrow(2, 4, 1), "offset");
    }

    [Fact]
    public void ShawRelativeAttentionMatchesItsDefinition()
    {
        const int heads = 2, seqLen = 7, dim = 4, maxRel = 2;
        random.manual_seed(25);
        var pattern = new WindowPattern(3, 1, 0, false, causal: true);
        var group = new StaticPatternAttention(heads, dim, pattern, blockSize: 4, maxRelativePosition: maxRel);
        group.to(ScalarType.Float64);
        var p = group.named_parameters().ToDictionary(x => x.name, x => x.parameter);
        var (q, k, v) = TestSupport.RandomQkv(2, heads, seqLen, dim, 26);
        var keyMask = ones(2, seqLen, dtype: ScalarType.Bool);
        keyMask[1, 2] = tensor(false);
        var (output, aux) = group.Forward(q, k, v, keyMask);
        Assert.Equal(0.0, aux.item<double>());
        // Per pair: e_ij = q_i·(k_j + aK[clip(j − i)]) / √d over allowed j; z_i = Σ α_ij (v_j + aV[clip(j − i)]).
        using var _ = no_grad();
        Tensor At(Tensor t, params long[] index) => index.Aggregate(t, (x, i) => x.select(0, i));
        var rows = new List<Tensor>();
        for (int b = 0; b < 2; b++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < seqLen; i++)
                {
                    var allowed = Enumerable.Range(0, seqLen).Where(j => pattern.Allows(h, i, j, seqLen) && At(keyMask, b, j).item<bool>()).ToArray();
                    var rel = allowed.Select(j => (long)(Math.Clamp(j - i, -maxRel, maxRel) + maxRel)).ToArray();
                    var scores = stack(allowed.Select((j, n) => (At(q, b, h, i) * (At(k, b, h, j) + At(p["rel_k"], rel[n]))).sum() / Math.Sqrt(dim)).ToArray());
                    var alpha = scores.softmax(0L);
                    rows.Add(stack(allowed.Select((j, n) => At(alpha, n) * (At(v, b, h, j) + At(p["rel_v"], rel[n]))).ToArray()).sum(0L));
                }
        var expected = stack(rows).view(2, heads, seqLen, dim);
        TestSupport.AssertClose(expected.detach(), output.detach(), "Shaw attention");
    }

    [Fact]
    public void ShawWithZeroTablesEqualsTheSparseKernelPath()
    {
        var pattern = new FixedPattern(4, 1, 2, causal: false);
        var sparse = new StaticPatternAttention(2, 4, pattern, blockSize: 4);
        var dense = new StaticPatternAttention(2, 4, pattern, blockSize: 4, maxRelativePosition: 3);
        using (no_grad()) foreach (var prm in dense.parameters()) prm.zero_();
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 11, 4, 27, ScalarType.Float32);
        var keyMask = ones(2, 11, dtype: ScalarType.Bool);
        keyMask[0, 5..] = tensor(false);
        TestSupport.AssertClose(sparse.Forward(q, k, v, keyMask).Output.detach(), dense.Forward(q, k, v, keyMask).Output.detach(), "zero Shaw tables");
    }

    [Fact]
    public void TokenShiftMovesTheDocumentedSlices()
    {
        var x = arange(1, 1 + 4 * 6, dtype: ScalarType.Float32).view(1, 4, 6);   // token t, feature f = 6t + f + 1
        var causal = TokenShift.Apply(x, TokenShift.ShiftsFor(causal: true));
        // Causal: features 0..2 unchanged, 3..5 from the previous token (zero at t = 0).
        AssertSame(x.narrow(2, 0, 3), causal.narrow(2, 0, 3), "unshifted half");
        AssertSame(cat([zeros(1, 1, 3), x.narrow(1, 0, 3).narrow(2, 3, 3)], 1), causal.narrow(2, 3, 3), "shifted half");
        var both = TokenShift.Apply(x, TokenShift.ShiftsFor(causal: false));
        // Bidirectional: features 0..1 from the next token, 2..3 unchanged, 4..5 from the previous token.
        AssertSame(cat([x.narrow(1, 1, 3).narrow(2, 0, 2), zeros(1, 1, 2)], 1), both.narrow(2, 0, 2), "from next");
        AssertSame(x.narrow(2, 2, 2), both.narrow(2, 2, 2), "middle third");
        AssertSame(cat([zeros(1, 1, 2), x.narrow(1, 0, 3).narrow(2, 4, 2)], 1), both.narrow(2, 4, 2), "from previous");
        // Padding is zeroed before it moves.
        var mask = tensor(new[] { true, false, true, true }).view(1, 4);
        var masked = TokenShift.Apply(x, TokenShift.ShiftsFor(causal: true), mask);
        Assert.Equal(0f, masked[0, 2, 3..].abs().sum().item<float>());
        AssertSame(x[0, 1, ..3], masked[0, 1, ..3], "the padded token keeps its own unshifted features");
    }

    // ------------------------------------------------------------------------------------------
    // Encoder-decoder
    // ------------------------------------------------------------------------------------------

    private static RoutingTransformerEncDec EncDec(long seed = 28, CrossAttentionKind cross = CrossAttentionKind.Dense)
    {
        var encoder = Tiny(causal: false) with { NumTokens = 11, Dim = 12, Heads = 2, NLocalAttnHeads = [1], StaticHeadGroups = [new(new(StaticPatternKind.Dense), 1)] };
        var decoder = Tiny() with { ReceivesContext = true, ContextDim = 12, CrossAttention = cross, ContextWindowSize = cross == CrossAttentionKind.Routing ? 4 : null };
        random.manual_seed(seed);
        return new RoutingTransformerEncDec(encoder, decoder);
    }

    [Theory]
    [InlineData(CrossAttentionKind.Dense, false)]
    [InlineData(CrossAttentionKind.Routing, false)]
    [InlineData(CrossAttentionKind.Routing, true)]
    public void EncoderDecoderCrossAttendsToRealSourceTokensOnly(CrossAttentionKind cross, bool training)
    {
        var model = EncDec(cross: cross);
        bool routing = cross == CrossAttentionKind.Routing;
        Assert.Contains("decoder.transformer.layers.1.attn.to_k.weight", model.named_parameters().Select(p => p.name));   // cross-attention block
        var source = Tokens(2, 9, 11, 29);
        var target = Tokens(2, 13, 17, 30);
        var sourceMask = ones(2, 9, dtype: ScalarType.Bool);
        sourceMask[0, 6..] = tensor(false);
        using var _ = no_grad();
        model.train(training);
        if (training) model.forward(Tokens(2, 9, 11, 40), Tokens(2, 13, 17, 41), null, null);   // initialises the routing k-means
        var (logits, aux) = model.forward(source, target, sourceMask, null);
        Assert.Equal([2L, 13, 17], logits.shape);
        if (routing) Assert.True(aux.item<float>() > 0, "routing cross-attention adds its commitment loss");
        else Assert.Equal(0f, aux.item<float>());
        // Padded source tokens change nothing; a real source token changes everything downstream.
        var otherPadding = source.clone();
        otherPadding[0, 6..] = tensor(3L);
        AssertSame(logits, model.forward(otherPadding, target, sourceMask, null).Logits, "padded source");
        var otherReal = source.clone();
        otherReal[0, 8] = tensor((source[0, 8].item<long>() + 1) % 11);
        otherReal[1, 8] = tensor((source[1, 8].item<long>() + 1) % 11);
        var changed = model.forward(otherReal, target, sourceMask, null).Logits;
        AssertSame(logits[0], changed[0], "row 0's position 8 is padding");
        if (routing) Assert.True(Differ(logits[1], changed[1]), "a real source token must reach the decoder");
        else Assert.True(Differ(logits[1, 0], changed[1, 0]), "the last source token must reach the first target position");
        // The decoder stays causal with context (routing: query groups never depend on later queries).
        foreach (int t in new[] { 0, 4, 7, 11 })
        {
            var perturbed = target.clone();
            perturbed[.., (t + 1)..] = Tokens(2, 12 - t, 17, (ulong)(31 + t));
            AssertSame(logits[.., ..(t + 1)], model.forward(source, perturbed, sourceMask, null).Logits[.., ..(t + 1)], $"decoder causality up to {t}");
        }
        // Generation runs on top.
        Assert.Equal([2L, 5], model.Generate(source, target.narrow(1, 0, 1), 5, sourceMask, temperature: 0).shape);
    }

    [Fact]
    public void EncoderDecoderChecksItsConfigurations()
    {
        var encoder = Tiny(causal: false);
        Assert.Equal("decoderConfig", Assert.ThrowsAny<ArgumentException>(() => new RoutingTransformerEncDec(encoder, Tiny())).ParamName);
        Assert.Equal("decoderConfig", Assert.ThrowsAny<ArgumentException>(() =>
            new RoutingTransformerEncDec(encoder, Tiny() with { ReceivesContext = true, ContextDim = 8 })).ParamName);
        var decoderOnly = Lm(Tiny() with { ReceivesContext = true });
        Assert.Equal("context", Assert.ThrowsAny<ArgumentException>(() => decoderOnly.forward(Tokens(1, 4, 17, 1))).ParamName);
    }
}
