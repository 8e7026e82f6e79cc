using SparseAttention.Hashing;
using SparseAttention.Model;
using SparseAttention.Modules;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class BertAdapterTests
{
    private const int Hidden = 16, Heads = 4, HeadSize = Hidden / Heads, SeqLen = 11;

    /// <summary>An encoder config whose layer 0 has the given head groups (all others are routing heads).</summary>
    private static TransformerConfig Encoder(int local, StaticHeadGroup[]? statics = null, SynthesizerSpec? synthesizer = null, LshSpec? lsh = null) => new()
    {
        NumTokens = 17, Dim = Hidden, Depth = 1, Heads = Heads, MaxSeqLen = 16, Causal = false, WindowSize = 4,
        LocalAttnWindowSize = 3, NLocalAttnHeads = [local], StaticHeadGroups = statics, Synthesizer = synthesizer, Lsh = lsh, BlockSize = 4,
    };

    public enum Kind { Dense, Strided, Routing, Synthesizer, Mixed, Lsh }

    private static BertSelfAttention Make(Kind kind, long seed = 3)
    {
        random.manual_seed(seed);
        var module = kind switch
        {
            Kind.Dense => BertSelfAttention.Dense(Hidden, Heads),
            Kind.Strided => BertSelfAttention.FromPattern(Hidden, Heads, new StridedPattern(3, causal: false), blockSize: 4),
            Kind.Routing => BertSelfAttention.FromConfig(Encoder(local: 0)),
            Kind.Synthesizer => BertSelfAttention.FromConfig(Encoder(0, synthesizer: new SynthesizerSpec { Heads = Heads, Kind = SynthesizerKind.Dense, Mix = SynthesizerMix.Sum })),
            Kind.Lsh => BertSelfAttention.FromConfig(Encoder(1, lsh: new LshSpec { Heads = 3, NHashes = 2, BucketSize = 3, Dedup = true })),  // local + LSH
            _ => BertSelfAttention.FromConfig(Encoder(1,
                    [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Fixed, Size: 4), 1)],
                    new SynthesizerSpec { Heads = 1, Kind = SynthesizerKind.FactorizedRandom, Rank = 2 })),   // local, fixed, synthesizer, routing
        };
        module.to(ScalarType.Float64);
        if (kind is Kind.Routing or Kind.Mixed)
        {
            // Initialise the k-means centroids with one training forward, as a trained model would have them.
            module.train();
            module.forward(States(5, 16, 100));
        }
        module.eval();
        return module;
    }

    private static Tensor States(long batch, long seqLen, ulong seed) =>
        randn(new[] { batch, seqLen, (long)Hidden }, dtype: ScalarType.Float64, generator: new Generator(seed));

    /// <summary>HF's extended mask: (B, 1, 1, T), 0 = keep, <paramref name="drop"/> = padding.
    /// Batch 0 has its last three tokens padded, batch 1 its first token.</summary>
    private static Tensor AdditiveMask(long batch, long seqLen, double drop = -10000)
    {
        var mask = zeros(new[] { batch, 1, 1, seqLen }, dtype: ScalarType.Float64);
        mask[0, 0, 0, (int)(seqLen - 3)..] = tensor(drop);
        if (batch > 1) mask[1, 0, 0, 0] = tensor(drop);
        return mask;
    }

    private static Tensor Values(BertSelfAttention m, Tensor states)
    {
        var value = (TorchSharp.Modules.Linear)m.named_children().First(c => c.name == "value").module;
        return value.forward(states).view(states.shape[0], states.shape[1], Heads, HeadSize).transpose(1, 2);   // (B, H, S, D)
    }

    [Theory]
    [InlineData(Kind.Dense)]
    [InlineData(Kind.Strided)]
    [InlineData(Kind.Routing)]
    [InlineData(Kind.Synthesizer)]
    [InlineData(Kind.Mixed)]
    [InlineData(Kind.Lsh)]
    public void Returns_the_HF_tuple_and_probabilities_that_produce_the_context(Kind kind)
    {
        var m = Make(kind);
        var states = States(2, SeqLen, 7);
        var mask = AdditiveMask(2, SeqLen);
        var plain = m.forward(states, mask);
        Assert.Single(plain.ToTuple());
        Assert.Null(plain.AttentionProbs);
        Assert.Equal(new long[] { 2, SeqLen, Hidden }, plain.Context.shape);

        var full = m.forward(states, mask, outputAttentions: true);
        var tuple = full.ToTuple();
        Assert.Equal(2, tuple.Length);
        Assert.Equal(new long[] { 2, Heads, SeqLen, SeqLen }, tuple[1].shape);
        TestSupport.AssertClose(plain.Context, tuple[0], "context with and without output_attentions");
        // The probabilities are the ones the computation used: probs · V gives back the context.
        var fromProbs = matmul(full.AttentionProbs!, Values(m, states)).transpose(1, 2).reshape(2, SeqLen, Hidden);
        TestSupport.AssertClose(fromProbs, full.Context, "probs · V vs context");
    }

    [Theory]
    [InlineData(Kind.Dense)]
    [InlineData(Kind.Strided)]
    [InlineData(Kind.Routing)]
    [InlineData(Kind.Synthesizer)]
    [InlineData(Kind.Mixed)]
    [InlineData(Kind.Lsh)]
    public void Padded_keys_get_no_weight_and_rows_sum_to_one_over_allowed_keys(Kind kind)
    {
        var m = Make(kind);
        var states = States(2, SeqLen, 8);
        var mask = AdditiveMask(2, SeqLen, drop: double.NegativeInfinity);
        var probs = m.forward(states, mask, outputAttentions: true).AttentionProbs!;
        var padKey = mask.eq(double.NegativeInfinity).expand_as(probs);
        Assert.Equal(0.0, probs.masked_select(padKey).abs().sum().item<double>());
        // Real query rows: the weights sum to 1 (routing may leave a token out of every cluster: then its row is 0).
        var realQuery = mask.eq(0).view(2, 1, SeqLen, 1).expand(2, Heads, SeqLen, 1).squeeze(-1);   // (B, H, T)
        var sums = probs.sum(-1).masked_select(realQuery);
        var ok = sums.sub(1).abs().lt(1e-9).logical_or(kind is Kind.Routing or Kind.Mixed ? sums.eq(0) : zeros_like(sums).to(ScalarType.Bool));
        Assert.True(ok.all().item<bool>(), $"row sums: {string.Join(", ", sums.data<double>().ToArray().Select(s => s.ToString("G4")))}");
        Assert.True(sums.gt(0.5).sum().item<long>() > sums.numel() / 2, "most rows must carry weight");

        // The context of real tokens does not depend on what the padded positions hold (padding is never routed either).
        var poisoned = states.clone();
        poisoned[0, (SeqLen - 3)..] = randn(3, Hidden, dtype: ScalarType.Float64) * 100;
        poisoned[1, 0] = randn(Hidden, dtype: ScalarType.Float64) * 100;
        var (clean, changed) = (m.forward(states, mask).Context, m.forward(poisoned, mask).Context);
        TestSupport.AssertClose(clean[0, ..(SeqLen - 3)], changed[0, ..(SeqLen - 3)], "real tokens of batch 0");
        TestSupport.AssertClose(clean[1, 1..], changed[1, 1..], "real tokens of batch 1");
    }

    [Fact]
    public void Head_mask_silences_heads()
    {
        var m = Make(Kind.Mixed);
        var states = States(2, SeqLen, 9);
        var reference = m.forward(states, outputAttentions: true);
        var masked = m.forward(states, headMask: tensor(new double[] { 1, 0, 1, 0.5 }), outputAttentions: true);
        Tensor Head(Tensor context, int h) => context.view(2, SeqLen, Heads, HeadSize)[.., .., h];
        Assert.Equal(0.0, Head(masked.Context, 1).abs().sum().item<double>());
        Assert.Equal(0.0, masked.AttentionProbs![.., 1].abs().sum().item<double>());
        TestSupport.AssertClose(Head(reference.Context, 0), Head(masked.Context, 0), "head 0");
        TestSupport.AssertClose(Head(reference.Context, 3) * 0.5, Head(masked.Context, 3), "head 3 halved");
        TestSupport.AssertClose(reference.AttentionProbs![.., 2], masked.AttentionProbs[.., 2], "head 2 probabilities");

        var perBatch = m.forward(states, headMask: tensor(new double[] { 1, 1, 1, 1, 0, 0, 0, 0 }).view(2, Heads)).Context;
        TestSupport.AssertClose(reference.Context[0], perBatch[0], "batch 0 kept");
        Assert.Equal(0.0, perBatch[1].abs().sum().item<double>());
    }

    /// <summary>BERT self-attention written out: projections, scores + additive mask, softmax, weighted values.</summary>
    private static (Tensor Context, Tensor Probs) HandWritten(BertSelfAttention m, Tensor states, Tensor? mask, Tensor? encoder = null)
    {
        var p = m.named_parameters().ToDictionary(x => x.name, x => (Tensor)x.parameter);
        var source = encoder ?? states;
        Tensor Project(string name, Tensor x) => (x.matmul(p[$"{name}.weight"].t()) + p[$"{name}.bias"])
            .view(x.shape[0], x.shape[1], Heads, HeadSize).permute(0, 2, 1, 3);                   // (B, H, len, D)
        var scores = Project("query", states).matmul(Project("key", source).transpose(-1, -2)) / Math.Sqrt(HeadSize);
        if (mask is not null) scores = scores + mask;
        var probs = scores.softmax(-1);
        var context = probs.matmul(Project("value", source)).permute(0, 2, 1, 3).reshape(states.shape[0], states.shape[1], Hidden);
        return (context, probs);
    }

    [Fact]
    public void Dense_kind_equals_a_hand_written_BERT_self_attention_with_gradients()
    {
        var m = Make(Kind.Dense);
        var states = States(2, SeqLen, 10).requires_grad_(true);
        var mask = AdditiveMask(2, SeqLen, drop: -1e9);
        var ours = m.forward(states, mask, outputAttentions: true);
        var (context, probs) = HandWritten(m, states, mask);
        TestSupport.AssertClose(context.detach(), ours.Context.detach(), "context");
        TestSupport.AssertClose(probs.detach(), ours.AttentionProbs!.detach(), "probabilities");
        var upstream = randn(context.shape, dtype: ScalarType.Float64, generator: new Generator(4));
        var gradOurs = autograd.grad([(ours.Context * upstream).sum()], [states])[0];
        var gradHand = autograd.grad([(context * upstream).sum()], [states])[0];
        TestSupport.AssertClose(gradHand, gradOurs, "d hidden_states");

        var keys = m.state_dict().Keys.ToHashSet();
        foreach (var name in new[] { "query.weight", "query.bias", "key.weight", "key.bias", "value.weight", "value.bias" })
            Assert.Contains(name, keys);
    }

    [Fact]
    public void Cross_attention_is_dense_over_the_encoder_states_with_their_mask()
    {
        var m = Make(Kind.Strided);
        var states = States(2, SeqLen, 11);
        var encoder = States(2, 6, 12);
        var encoderMask = AdditiveMask(2, 6, drop: -3.4e38);
        var ours = m.forward(states, attentionMask: null, encoderHiddenStates: encoder, encoderAttentionMask: encoderMask, outputAttentions: true);
        var (context, probs) = HandWritten(m, states, encoderMask, encoder);
        TestSupport.AssertClose(context, ours.Context, "cross context");
        TestSupport.AssertClose(probs, ours.AttentionProbs!, "cross probabilities");
        Assert.Equal(new long[] { 2, Heads, SeqLen, 6 }, ours.AttentionProbs!.shape);
    }

    [Fact]
    public void Bad_arguments_throw_ArgumentException_naming_the_argument()
    {
        var m = Make(Kind.Dense);
        var states = States(2, SeqLen, 13);
        void Throws(string name, string expected, Action call)
        {
            var e = Assert.Throws<ArgumentException>(call);
            Assert.Equal(name, e.ParamName);
            Assert.Contains(expected, e.Message);
        }
        Throws("attention_mask", "(B, 1, 1, T)", () => m.forward(states, zeros(2, SeqLen, dtype: ScalarType.Float64)));
        Throws("attention_mask", "(B, 1, 1, T)", () => m.forward(states, zeros(2, 1, 1, SeqLen + 1, dtype: ScalarType.Float64)));
        Throws("attention_mask", "floating-point", () => m.forward(states, zeros(2, 1, 1, SeqLen, dtype: ScalarType.Int64)));
        Throws("attention_mask", "<= 0", () => m.forward(states, AdditiveMask(2, SeqLen, drop: 10000)));
        Throws("attention_mask", "<= 0", () => m.forward(states, AdditiveMask(2, SeqLen, drop: double.PositiveInfinity)));
        Throws("attention_mask", "NaN", () => m.forward(states, AdditiveMask(2, SeqLen, drop: double.NaN)));
        Throws("attention_mask", "soft additive biases", () => m.forward(states, AdditiveMask(2, SeqLen, drop: -5)));
        Throws("head_mask", "(H)", () => m.forward(states, headMask: ones(Heads + 1, dtype: ScalarType.Float64)));
        Throws("head_mask", "finite", () => m.forward(states, headMask: tensor(new double[] { 1, double.NaN, 1, 1 })));
        Throws("hidden_states", "(B, T, hidden)", () => m.forward(States(2, SeqLen, 1).narrow(2, 0, Hidden - 1)));
        Throws("encoder_attention_mask", "only used with encoder_hidden_states", () => m.forward(states, encoderAttentionMask: AdditiveMask(2, SeqLen)));
        Throws("encoder_attention_mask", "(B, 1, 1, T)", () => m.forward(states, encoderHiddenStates: States(2, 5, 2), encoderAttentionMask: AdditiveMask(2, SeqLen)));
        Throws("groups", "expected numAttentionHeads = 4", () => new BertSelfAttention(Hidden, Heads,
            [new StaticPatternAttention(3, HeadSize, new DensePattern(false))]));
        // A batch-1 mask broadcasts over the batch.
        var shared = m.forward(states, AdditiveMask(1, SeqLen)).Context;
        TestSupport.AssertClose(m.forward(states, AdditiveMask(1, SeqLen).expand(2, 1, 1, SeqLen)).Context, shared, "broadcast mask");
    }
}
