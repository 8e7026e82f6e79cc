using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Modules;
using SparseAttention.Training;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class SynthesizerTests
{
    private const int Dim = 4, MaxLen = 12;

    private static SynthesizerAttention Make(SynthesizerKind kind, int heads = 2, bool causal = false,
        SynthesizerMix mix = SynthesizerMix.None, bool trainable = true, int rank = 3, int? factorA = null, long seed = 5)
    {
        var module = new SynthesizerAttention(heads, Dim, MaxLen, kind, causal, mix, trainable, rank, factorA, seed: seed);
        module.to(ScalarType.Float64);
        if (mix == SynthesizerMix.Learned)
            using (no_grad()) Param(module, "mix_weights").copy_(arange(2 * heads, dtype: ScalarType.Float64).view(heads, 2).cos());   // unequal α's
        return module;
    }

    private static Tensor Param(nn.Module module, string name) =>
        module.named_parameters().Select(p => (p.name, (Tensor)p.parameter)).Concat(module.named_buffers()).First(p => p.Item1 == name).Item2;

    private static Tensor? PaddingMask(long batch, long seqLen, bool padded)
    {
        if (!padded) return null;
        var mask = ones(batch, seqLen, dtype: ScalarType.Bool);
        mask[0, (int)(seqLen - 3)..] = tensor(false);        // batch 0: three padded tokens at the end
        if (batch > 1) mask[1, 0] = tensor(false);       // batch 1: a padded token at the start
        return mask;
    }

    /// <summary>
    /// The synthetic logits written independently from the module's parameters: one head at a time with 2-D
    /// matrix products, factorized dense by index arithmetic (key j uses A[j mod a] and B[j div a]).
    /// </summary>
    private static Tensor ExpectedSynthetic(SynthesizerAttention m, Tensor q, int seqLen)
    {
        long batch = q.shape[0];
        var perHead = new List<Tensor>();
        for (int h = 0; h < m.Heads; h++)
        {
            Tensor Hidden() => nn.functional.relu(q[.., h].reshape(-1, Dim).mm(Param(m, "w1")[h]) + Param(m, "b1")[h]);  // (B·T, D)
            Tensor s = m.Kind switch
            {
                SynthesizerKind.Dense => (Hidden().mm(Param(m, "w2")[h]) + Param(m, "b2")[h])[.., ..seqLen].reshape(batch, seqLen, seqLen),
                SynthesizerKind.FactorizedDense => FactorizedDense(m, Hidden(), h, seqLen).reshape(batch, seqLen, seqLen),
                SynthesizerKind.Random => Param(m, "random_logits")[h][..seqLen, ..seqLen].expand(batch, seqLen, seqLen),
                _ => Param(m, "r1")[h][..seqLen].mm(Param(m, "r2")[h][..seqLen].t()).expand(batch, seqLen, seqLen),
            };
            perHead.Add(s);
        }
        return stack(perHead, 1);                                                                   // (B, H, T, T)
    }

    private static Tensor FactorizedDense(SynthesizerAttention m, Tensor hidden, int h, int seqLen)
    {
        var a = hidden.mm(Param(m, "w_a")[h]) + Param(m, "b_a")[h];                                // (B·T, a)
        var b = hidden.mm(Param(m, "w_b")[h]) + Param(m, "b_b")[h];                                // (B·T, b)
        var j = arange(seqLen, dtype: ScalarType.Int64);
        return a.index_select(1, j.remainder(m.FactorA)) * b.index_select(1, j.div(m.FactorA, rounding_mode: RoundingMode.floor));
    }

    public static TheoryData<SynthesizerKind, SynthesizerMix, bool, bool, int> OracleCases()
    {
        var data = new TheoryData<SynthesizerKind, SynthesizerMix, bool, bool, int>();
        foreach (var kind in Enum.GetValues<SynthesizerKind>())
        {
            data.Add(kind, SynthesizerMix.None, false, false, MaxLen);
            data.Add(kind, SynthesizerMix.None, true, true, 7);
            data.Add(kind, SynthesizerMix.Sum, true, false, 9);
            data.Add(kind, SynthesizerMix.Learned, false, true, 5);
        }
        data.Add(SynthesizerKind.Dense, SynthesizerMix.Sum, true, true, 1);        // one token
        return data;
    }

    [Theory]
    [MemberData(nameof(OracleCases))]
    public void Output_and_gradients_equal_the_oracle_with_independently_computed_logits(
        SynthesizerKind kind, SynthesizerMix mix, bool causal, bool padded, int seqLen)
    {
        var m = Make(kind, heads: 2, causal: causal, mix: mix);
        var (q, k, v) = TestSupport.RandomQkv(2, 2, seqLen, Dim, seed: 11);
        var keyMask = PaddingMask(2, seqLen, padded && seqLen > 3);
        var upstream = randn(new long[] { 2, 2, seqLen, Dim }, dtype: ScalarType.Float64, generator: new Generator(12));

        // 0·sum keeps an input that a variant does not read (keys without a mix, q of Random kinds) in the graph.
        Tensor Unused(Tensor q1, Tensor k1) => 0 * (q1.sum() + k1.sum());
        var actual = TestSupport.ForwardBackward((q1, k1, v1) => m.forward(q1, k1, v1, keyMask) + Unused(q1, k1), q, k, v, upstream);
        var expected = TestSupport.ForwardBackward((q1, k1, v1) => Unused(q1, k1) + Oracle(q1, k1, v1), q, k, v, upstream);
        Tensor Oracle(Tensor q1, Tensor k1, Tensor v1)
        {
            // The module zeroes the features/queries of padded positions (NaN safety); so does the oracle here.
            if (keyMask is not null) q1 = q1.masked_fill(keyMask.logical_not().view(2, 1, seqLen, 1), 0);
            // Mixture = synthetic logits plus the dot-product logits, as the oracle's bias and scale.
            var synthetic = ExpectedSynthetic(m, q1, seqLen);
            var alpha = mix == SynthesizerMix.Learned ? Param(m, "mix_weights").softmax(-1) : ones(2, 2, dtype: ScalarType.Float64);
            var bias = alpha[.., 0].view(1, 2, 1, 1) * synthetic;
            if (mix == SynthesizerMix.None)
                return ReferenceAttention.Attention(zeros_like(q1), k1, v1, causal: causal, keyMask: keyMask, bias: bias);
            var dotScale = alpha[.., 1].view(1, 2, 1, 1) / Math.Sqrt(Dim);
            return ReferenceAttention.Attention(q1, k1, v1, causal: causal, keyMask: keyMask, bias: bias + dotScale * matmul(q1, k1.transpose(-1, -2)), scale: 0);
        }

        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        TestSupport.AssertClose(expected.Dk, actual.Dk, "dk");
        TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
        if (mix == SynthesizerMix.None) Assert.Equal(0.0, actual.Dk.abs().sum().item<double>());     // keys unused
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense, 1, 1)]
    [InlineData(SynthesizerKind.Random, 3, 2)]
    [InlineData(SynthesizerKind.FactorizedDense, 1, 3)]
    [InlineData(SynthesizerKind.FactorizedRandom, 3, 1)]
    public void Shapes_for_every_variant_and_length(SynthesizerKind kind, int heads, int batch)
    {
        foreach (var mix in Enum.GetValues<SynthesizerMix>())
            foreach (int seqLen in new[] { 1, 5, MaxLen })
            {
                var m = Make(kind, heads: heads, mix: mix, causal: seqLen == 5);
                var gen = new Generator(3);
                var q = randn(new long[] { batch, heads, seqLen, Dim }, dtype: ScalarType.Float64, generator: gen);
                var v = randn(new long[] { batch, heads, seqLen, 6 }, dtype: ScalarType.Float64, generator: gen);
                var output = m.forward(q, q.flip(2), v);
                Assert.Equal(new long[] { batch, heads, seqLen, 6 }, output.shape);
                Assert.False(output.isnan().any().item<bool>());
                var probs = m.Probabilities(q, q.flip(2));
                Assert.Equal(new long[] { batch, heads, seqLen, seqLen }, probs.shape);
                TestSupport.AssertClose(ones(batch, heads, seqLen, dtype: ScalarType.Float64), probs.sum(-1), "row sums");
            }
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense, SynthesizerMix.None)]
    [InlineData(SynthesizerKind.Random, SynthesizerMix.Sum)]
    [InlineData(SynthesizerKind.FactorizedDense, SynthesizerMix.Learned)]
    [InlineData(SynthesizerKind.FactorizedRandom, SynthesizerMix.None)]
    public void Causal_heads_put_no_weight_on_later_keys_and_never_see_the_future(SynthesizerKind kind, SynthesizerMix mix)
    {
        var m = Make(kind, heads: 2, causal: true, mix: mix);
        const int seqLen = 10;
        var (q, k, v) = TestSupport.RandomQkv(2, 2, seqLen, Dim, seed: 21);
        var probs = m.Probabilities(q, k);
        var later = ones(seqLen, seqLen, dtype: ScalarType.Bool).triu(1);                          // key j > query i
        Assert.Equal(0.0, probs.masked_select(later.expand_as(probs)).abs().sum().item<double>());
        var output = m.forward(q, k, v).detach();
        foreach (int t in new[] { 0, 4, 8 })
        {
            Tensor Perturb(Tensor x) { var y = x.detach().clone(); y[.., .., (t + 1)..] = randn_like(y[.., .., (t + 1)..]) * 5; return y; }
            var changed = m.forward(Perturb(q), Perturb(k), Perturb(v)).detach();
            TestSupport.AssertClose(output[.., .., ..(t + 1)], changed[.., .., ..(t + 1)], $"outputs up to {t}", atol: 0, rtol: 0);
            Assert.False(allclose(output[.., .., (t + 1)..], changed[.., .., (t + 1)..]), "perturbing the future changed nothing at all");
        }
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense)]
    [InlineData(SynthesizerKind.Random)]
    [InlineData(SynthesizerKind.FactorizedDense)]
    [InlineData(SynthesizerKind.FactorizedRandom)]
    public void Padding_gets_no_weight_and_NaN_in_padding_never_reaches_real_tokens(SynthesizerKind kind)
    {
        var m = Make(kind, heads: 2, mix: SynthesizerMix.Sum);
        const int seqLen = 8;
        var (q, k, v) = TestSupport.RandomQkv(2, 2, seqLen, Dim, seed: 31);
        var keyMask = PaddingMask(2, seqLen, padded: true)!;
        var probs = m.Probabilities(q, k, keyMask);
        var padKeys = keyMask.logical_not().view(2, 1, 1, seqLen).expand_as(probs);
        Assert.Equal(0.0, probs.masked_select(padKeys).sum().item<double>());
        var real = keyMask.view(2, 1, 1, seqLen).expand_as(probs);
        TestSupport.AssertClose(ones(2, 2, seqLen, dtype: ScalarType.Float64), (probs * real).sum(-1), "rows sum to 1 over real keys");

        var clean = m.forward(q, k, v, keyMask).detach();
        var drop = keyMask.logical_not().view(2, 1, seqLen, 1);
        Tensor Poison(Tensor x) => x.detach().masked_fill(drop, double.NaN);
        var poisoned = m.forward(Poison(q), Poison(k), Poison(v), keyMask).detach();
        Assert.False(poisoned.isnan().any().item<bool>(), "NaN in padding reached an output");
        TestSupport.AssertClose(clean, poisoned, "outputs with NaN in padding");

        // A query with no allowed key (causal, first token padded) gets zeros, not NaN.
        var causal = Make(kind, heads: 2, causal: true);
        var output = causal.forward(q, k, v, keyMask);
        Assert.Equal(0.0, output[1, .., 0].abs().sum().item<double>());
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense)]
    [InlineData(SynthesizerKind.Random)]
    [InlineData(SynthesizerKind.FactorizedDense)]
    [InlineData(SynthesizerKind.FactorizedRandom)]
    public void Shorter_sequences_use_the_top_left_block_of_the_full_length_logits(SynthesizerKind kind)
    {
        var m = Make(kind, heads: 2);
        var q = randn(new long[] { 2, 2, MaxLen, Dim }, dtype: ScalarType.Float64, generator: new Generator(41));
        var full = m.SyntheticLogits(q, MaxLen);                                                    // (·, H, ℓ, ℓ)
        foreach (int seqLen in new[] { 1, 5, 11 })
        {
            var shorter = m.SyntheticLogits(q[.., .., ..seqLen], seqLen);
            TestSupport.AssertClose(full[.., .., ..seqLen, ..seqLen], shorter, $"logits at T = {seqLen}");
        }
        var tooLong = randn(new long[] { 1, 2, MaxLen + 1, Dim }, dtype: ScalarType.Float64);
        var e = Assert.Throws<ArgumentException>(() => m.forward(tooLong, tooLong, tooLong));
        Assert.Contains("MaxLen", e.Message);
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense, SynthesizerMix.None, true)]
    [InlineData(SynthesizerKind.Dense, SynthesizerMix.Learned, true)]
    [InlineData(SynthesizerKind.Random, SynthesizerMix.None, true)]
    [InlineData(SynthesizerKind.Random, SynthesizerMix.Sum, false)]
    [InlineData(SynthesizerKind.FactorizedDense, SynthesizerMix.None, true)]
    [InlineData(SynthesizerKind.FactorizedRandom, SynthesizerMix.None, true)]
    [InlineData(SynthesizerKind.FactorizedRandom, SynthesizerMix.Learned, false)]
    public void Parameter_counts_follow_the_papers_formulas(SynthesizerKind kind, SynthesizerMix mix, bool trainable)
    {
        const int heads = 3, rank = 2, factorA = 3;
        long h = heads, d = Dim, l = MaxLen, a = factorA, b = MaxLen / factorA;
        // Paper, per head: Dense d² + d·ℓ; Random ℓ²; Factorized Dense d² + d(a + b); Factorized Random 2ℓk.
        // Ours adds the biases of the dense layers and 2 mixing weights per head for a learned mix.
        long expected = kind switch
        {
            SynthesizerKind.Dense => h * (d * d + d * l) + h * (d + l),
            SynthesizerKind.Random => trainable ? h * l * l : 0,
            SynthesizerKind.FactorizedDense => h * (d * d + d * (a + b)) + h * (d + a + b),
            _ => trainable ? h * 2 * l * rank : 0,
        } + (mix == SynthesizerMix.Learned ? 2 * h : 0);
        var m = new SynthesizerAttention(heads, Dim, MaxLen, kind, mix: mix, trainable: trainable, rank: rank, factorA: factorA);
        Assert.Equal(expected, m.parameters().Sum(p => p.numel()));
        Assert.Equal(expected, SynthesizerAttention.ParameterCount(kind, heads, Dim, MaxLen, mix, trainable, rank, factorA));
    }

    [Fact]
    public void FactorizedDense_default_factor_is_the_largest_divisor_below_the_square_root()
    {
        Assert.Equal(3, SynthesizerAttention.ResolveFactorA(12, null));
        Assert.Equal(8, SynthesizerAttention.ResolveFactorA(128, null));
        Assert.Equal(1, SynthesizerAttention.ResolveFactorA(13, null));
        var e = Assert.Throws<ArgumentException>(() => new SynthesizerAttention(1, Dim, 12, SynthesizerKind.FactorizedDense, factorA: 5));
        Assert.Equal("factorA", e.ParamName);
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense, SynthesizerMix.Learned)]
    [InlineData(SynthesizerKind.Random, SynthesizerMix.None)]
    [InlineData(SynthesizerKind.FactorizedDense, SynthesizerMix.Sum)]
    [InlineData(SynthesizerKind.FactorizedRandom, SynthesizerMix.Learned)]
    public void Gradients_reach_every_parameter(SynthesizerKind kind, SynthesizerMix mix)
    {
        var m = Make(kind, heads: 2, mix: mix, causal: true);
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 9, Dim, seed: 51);
        (m.forward(q, k, v) * randn(2, 2, 9, Dim, dtype: ScalarType.Float64)).sum().backward();
        foreach (var (name, p) in m.named_parameters())
        {
            Assert.NotNull(p.grad);
            Assert.True(p.grad!.abs().sum().item<double>() > 0, $"{name} got a zero gradient");
        }
        if (kind is SynthesizerKind.Dense or SynthesizerKind.FactorizedDense)
            Assert.True(q.grad!.abs().sum().item<double>() > 0, "no gradient reached the per-token features");
    }

    [Theory]
    [InlineData(SynthesizerKind.Random)]
    [InlineData(SynthesizerKind.FactorizedRandom)]
    public void Fixed_random_logits_are_a_saved_buffer_with_no_trainable_parameters(SynthesizerKind kind)
    {
        var m = Make(kind, trainable: false);
        Assert.Empty(m.parameters());
        var names = m.state_dict().Keys.ToArray();
        Assert.NotEmpty(names);
        var before = m.state_dict().ToDictionary(p => p.Key, p => p.Value.clone());
        var (q, k, v) = TestSupport.RandomQkv(1, 2, 6, Dim, seed: 61);
        var output = m.forward(q, k, v);
        output.sum().backward();
        Assert.True(v.grad!.abs().sum().item<double>() > 0);
        foreach (var (name, value) in m.state_dict()) Assert.True(equal(before[name], value).all().item<bool>(), name);

        // A fresh module with another seed gets the same outputs after loading the state dict.
        var other = Make(kind, trainable: false, seed: 99);
        Assert.False(allclose(other.forward(q, k, v), output));
        other.load_state_dict(m.state_dict());
        TestSupport.AssertClose(output.detach(), other.forward(q, k, v).detach(), "after load_state_dict");

        var e = Assert.Throws<ArgumentException>(() => new SynthesizerAttention(1, Dim, MaxLen, SynthesizerKind.Dense, trainable: false));
        Assert.Equal("trainable", e.ParamName);
    }

    [Fact]
    public void Learned_mixing_weights_sum_to_one_per_head()
    {
        var m = Make(SynthesizerKind.Random, heads: 2, mix: SynthesizerMix.Learned);
        var alpha = m.MixingWeights!;
        Assert.Equal(new long[] { 2, 2 }, alpha.shape);
        TestSupport.AssertClose(ones(2, dtype: ScalarType.Float64), alpha.sum(-1), "α sums");
        Assert.Null(Make(SynthesizerKind.Random, mix: SynthesizerMix.Sum).MixingWeights);
    }

    [Fact]
    public void Bad_arguments_name_the_argument()
    {
        var m = Make(SynthesizerKind.Dense, heads: 2, mix: SynthesizerMix.Sum);
        var (q, k, v) = TestSupport.RandomQkv(1, 2, 5, Dim, seed: 71);
        Assert.Equal("k", Assert.Throws<ArgumentException>(() => m.forward(q, null, v)).ParamName);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => m.forward(q[.., ..1], k, v)).ParamName);
        Assert.Equal("keyMask", Assert.Throws<ArgumentException>(() => m.forward(q, k, v, ones(1, 4, dtype: ScalarType.Bool))).ParamName);
        Assert.Equal("heads", Assert.Throws<ArgumentException>(() => new SynthesizerAttention(0, Dim, MaxLen, SynthesizerKind.Dense)).ParamName);
        Assert.Equal("rank", Assert.Throws<ArgumentException>(() => new SynthesizerAttention(1, Dim, MaxLen, SynthesizerKind.FactorizedRandom, rank: 0)).ParamName);
        Assert.Equal("dropout", Assert.Throws<ArgumentException>(() => new SynthesizerAttention(1, Dim, MaxLen, SynthesizerKind.Random, dropout: 1)).ParamName);
    }

    // ------------------------------------------------------------------------------------------
    // In the model
    // ------------------------------------------------------------------------------------------

    /// <summary>A tiny decoder: 1 local head, 1 strided head, 2 synthesizer heads of the given kind.</summary>
    private static TransformerConfig Tiny(SynthesizerSpec synthesizer, bool causal = true) => ModelTests.Tiny(causal) with
    {
        NLocalAttnHeads = [1],
        StaticHeadGroups = [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Strided, Size: 3), 1)],
        Synthesizer = synthesizer,
    };

    [Fact]
    public void Config_places_synthesizer_heads_after_static_groups_and_before_routing()
    {
        var config = Tiny(new SynthesizerSpec { Heads = 1, Kind = SynthesizerKind.Random }) with { MaxSeqLen = 32, WindowSize = 8 };
        config.Validate();
        Assert.Equal([HeadGroupKind.Local, HeadGroupKind.Static, HeadGroupKind.Synthesizer, HeadGroupKind.Routing],
            config.HeadGroupsForLayer(0).Select(g => g.Kind));
        Assert.Equal([1, 1, 1, 1], config.HeadGroupsForLayer(0).Select(g => g.Heads));
        var layer = new AttentionLayer(config, 0);
        Assert.IsType<SynthesizerHeadGroup>(layer.Groups[2]);
        Assert.Equal(config.MaxSeqLen, ((SynthesizerHeadGroup)layer.Groups[2]).Synthesizer.MaxLen);
    }

    [Theory]
    [InlineData("""{"heads": 0}""", "Heads must be > 0")]
    [InlineData("""{"heads": 3}""", "plus synthesizer heads (3) must be at most Heads = 4")]
    [InlineData("""{"heads": 1, "kind": "Dense", "trainable": false}""", "needs Kind Random or FactorizedRandom")]
    [InlineData("""{"heads": 1, "kind": "FactorizedRandom", "rank": 0}""", "Rank must be > 0")]
    [InlineData("""{"heads": 1, "kind": "FactorizedDense", "factor_a": 5}""", "FactorA must be a positive divisor of MaxSeqLen = 32")]
    public void Bad_synthesizer_config_names_the_field(string json, string expected)
    {
        var config = ConfigBinding.Apply(Tiny(new SynthesizerSpec { Heads = 1 }), [$"synthesizer={json}"]);
        var e = Assert.Throws<ArgumentException>(() => config.Validate());
        Assert.Equal(nameof(TransformerConfig.Synthesizer), e.ParamName);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Set_binds_the_synthesizer_record_and_json_round_trips()
    {
        var config = ConfigBinding.Apply(new TransformerConfig(),
            ["""synthesizer={"heads": 2, "kind": "FactorizedRandom", "mix": "Learned", "trainable": false, "rank": 4}"""]);
        Assert.Equal(new SynthesizerSpec { Heads = 2, Kind = SynthesizerKind.FactorizedRandom, Mix = SynthesizerMix.Learned, Trainable = false, Rank = 4 },
            config.Synthesizer);
        var back = ConfigBinding.FromJson(ConfigBinding.ToJson(config), "x");
        Assert.Equal(config.Synthesizer, back.Synthesizer);
        var e = Assert.Throws<ArgumentException>(() => ConfigBinding.Apply(new TransformerConfig(), ["""synthesizer={"heads": 1, "kind": "Dens"}"""]));
        Assert.Contains("synthesizer expects", e.Message);
    }

    public static TheoryData<SynthesizerKind, SynthesizerMix, bool> ModelVariants() => new()
    {
        { SynthesizerKind.Dense, SynthesizerMix.None, true },
        { SynthesizerKind.Random, SynthesizerMix.None, false },
        { SynthesizerKind.FactorizedDense, SynthesizerMix.None, true },
        { SynthesizerKind.FactorizedRandom, SynthesizerMix.None, true },
        { SynthesizerKind.Random, SynthesizerMix.Learned, true },
    };

    [Theory]
    [MemberData(nameof(ModelVariants))]
    public void Tiny_language_model_with_synthesizer_heads_overfits_a_fixed_batch(SynthesizerKind kind, SynthesizerMix mix, bool trainable)
    {
        // Every head of the model is a synthesizer head, so the loss can only fall through them.
        var config = ModelTests.Tiny() with
        {
            NLocalAttnHeads = [0], StaticHeadGroups = null,
            Synthesizer = new SynthesizerSpec { Heads = 4, Kind = kind, Mix = mix, Trainable = trainable, Rank = 4 },
        };
        var model = ModelTests.Lm(config, seed: 17);
        var tokens = ModelTests.Tokens(4, 16, 17, 18);
        ModelTests.AssertOverfits(model, tokens);
    }

    [Theory]
    [InlineData(SynthesizerKind.Dense, SynthesizerMix.Sum)]
    [InlineData(SynthesizerKind.FactorizedRandom, SynthesizerMix.None)]
    public void Decoder_with_synthesizer_heads_never_sees_later_tokens(SynthesizerKind kind, SynthesizerMix mix)
    {
        var model = ModelTests.Lm(Tiny(new SynthesizerSpec { Heads = 2, Kind = kind, Mix = mix }) with { ShiftTokens = true });
        model.train();
        const int seqLen = 19;
        var tokens = ModelTests.Tokens(2, seqLen, 17, 11);
        var logits = ModelTests.Logits(model, tokens);
        foreach (int t in new[] { 0, 6, 17 })
        {
            var perturbed = tokens.clone();
            perturbed[.., (t + 1)..] = ModelTests.Tokens(2, seqLen - t - 1, 17, (ulong)(100 + t));
            var changed = ModelTests.Logits(model, perturbed);
            ModelTests.AssertSame(logits[.., ..(t + 1)], changed[.., ..(t + 1)], $"logits up to {t}");
            Assert.True(ModelTests.Differ(logits[.., (t + 1)..], changed[.., (t + 1)..]), $"perturbing after {t} changed nothing");
        }
    }
}
