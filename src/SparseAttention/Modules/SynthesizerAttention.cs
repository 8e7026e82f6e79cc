using SparseAttention.Kernels;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace SparseAttention.Modules;

/// <summary>How a <see cref="SynthesizerAttention"/> head synthesizes its attention logits.</summary>
public enum SynthesizerKind
{
    /// <summary>Per token, a two-layer MLP from the token's features to <c>maxLen</c> logits:
    /// F(x) = W₂·relu(W₁·x + b₁) + b₂.</summary>
    Dense,
    /// <summary>A (maxLen × maxLen) logits matrix R per head, independent of the input (learned or fixed).</summary>
    Random,
    /// <summary>Dense, but the last layer produces two short vectors A (width a) and B (width b), a·b = maxLen,
    /// composed into maxLen logits: logit j = A[j mod a] · B[j div a] (A tiled b times, each entry of B repeated a times).</summary>
    FactorizedDense,
    /// <summary>R = R₁·R₂ᵀ per head with R₁, R₂ of shape (maxLen × k), learned or fixed.</summary>
    FactorizedRandom,
}

/// <summary>How synthetic logits combine with dot-product attention.</summary>
public enum SynthesizerMix
{
    /// <summary>Synthetic logits only; the keys are not used.</summary>
    None,
    /// <summary>Synthetic logits + q·kᵀ/√D (the paper's "R + V"-style mixtures with unit weights).</summary>
    Sum,
    /// <summary>α₀·synthetic + α₁·q·kᵀ/√D with α = softmax(w) per head, w learned and initialised to 0
    /// (α₀ = α₁ = ½): the paper's mixture of synthesizers, whose α's sum to 1.</summary>
    Learned,
}

/// <summary>
/// Synthesizer attention heads: the attention weights are synthesized per token (Dense kinds) or learned
/// globally (Random kinds) instead of, or in addition to, computed from query–key dot products. Takes
/// q, k, v already split per head, (B, H, T, D), like <see cref="RoutingAttention"/>.
/// </summary>
/// <remarks>
/// <para>Tay, Bahri, Metzler, Juan, Zhao, Zheng, "Synthesizer: Rethinking Self-Attention in Transformer Models",
/// arXiv 2005.00743 (ICML 2021). Y = softmax(S)·V with S the (T × T) synthetic logits, or S + q·kᵀ/√D for mixtures.</para>
/// <para><b>Per-token features of the Dense kinds.</b> The paper's F acts on each token's representation X_i. Here
/// it acts on the head's query vector <c>q</c> (D features), so each head has its own D → D → maxLen MLP on a
/// head-specific projection of the token (the enclosing layer's query projection plays the role of the per-head
/// input slice). With rotary positions the query also carries the token's position, as the paper's X_i carries
/// its position embedding.</para>
/// <para><b>Lengths.</b> Any T ≤ maxLen: the logits are the first T rows and columns of the maxLen × maxLen
/// matrix (Random kinds) or the first T of the maxLen outputs of F (Dense kinds). Column j always means key
/// position j.</para>
/// <para><b>Masks.</b> Causal: query i never weights a key j &gt; i. Key padding: padded keys get zero weight and
/// their values (and the features/queries/keys of padded positions) are zeroed first, so even NaN there never
/// reaches a real output. A query with no allowed key gets a zero output, never NaN.</para>
/// <para><b>Parameters per head</b> (D = head width, ℓ = maxLen), the paper's counts (weights) plus our biases:
/// Dense D² + D·ℓ weights + (D + ℓ) biases; Random ℓ² (0 when fixed); FactorizedDense D² + D·(a + b) weights +
/// (D + a + b) biases; FactorizedRandom 2·ℓ·k (0 when fixed); <see cref="SynthesizerMix.Learned"/> adds 2 mixing
/// weights. <see cref="ParameterCount"/> computes the total. Fixed random logits are a buffer: saved in the state
/// dict, never trained.</para>
/// <para><b>Memory</b>: the (B, H, T, T) logits are materialised (like the paper); Random kinds also hold an
/// (H, ℓ, ℓ) matrix, so keep maxLen modest for them.</para>
/// </remarks>
public sealed partial class SynthesizerAttention : nn.Module
{
    // Dense and FactorizedDense: first layer, (H, D, D) and (H, D).
    private readonly Parameter? w1, b1;
    // Dense: second layer, (H, D, ℓ) and (H, ℓ).
    private readonly Parameter? w2, b2;
    // FactorizedDense: the two short output layers, (H, D, a), (H, a), (H, D, b), (H, b).
    private readonly Parameter? w_a, b_a, w_b, b_b;
    // Random: (H, ℓ, ℓ) logits; FactorizedRandom: (H, ℓ, k) factors. A Parameter when trainable, else a buffer.
    private readonly Tensor? random_logits, r1, r2;
    // Learned mix: (H, 2) raw weights; α = softmax over the last dimension, [synthetic, dot product].
    private readonly Parameter? mix_weights;

    private readonly double dropout;

    /// <param name="heads">Heads H.</param>
    /// <param name="dimHead">Head width D (of q, k and v).</param>
    /// <param name="maxLen">Longest sequence ℓ; the synthetic logits are (ℓ × ℓ) per head and sliced to T.</param>
    /// <param name="kind">How the logits are synthesized.</param>
    /// <param name="causal">Query i attends only keys j ≤ i.</param>
    /// <param name="mix">Combination with dot-product attention.</param>
    /// <param name="trainable">Random kinds: learn the logits (true) or keep their random initialisation fixed.
    /// Must be true for the Dense kinds.</param>
    /// <param name="rank">FactorizedRandom: k, the rank of R₁·R₂ᵀ (the paper uses 8).</param>
    /// <param name="factorA">FactorizedDense: a, a divisor of maxLen (b = maxLen / a); null = the largest divisor ≤ √maxLen.</param>
    /// <param name="dropout">Dropout on the attention probabilities in training, in [0, 1).</param>
    /// <param name="seed">Seed of the initial weights; null = torch's global generator (like nn.Linear).</param>
    /// <param name="name">Module name.</param>
    public SynthesizerAttention(int heads, int dimHead, int maxLen, SynthesizerKind kind, bool causal = false,
        SynthesizerMix mix = SynthesizerMix.None, bool trainable = true, int rank = 8, int? factorA = null,
        double dropout = 0, long? seed = null, string name = "synthesizer_attention") : base(name)
    {
        Check.Positive(heads, nameof(heads));
        Check.Positive(dimHead, nameof(dimHead));
        Check.Positive(maxLen, nameof(maxLen));
        Check.That(Enum.IsDefined(kind), nameof(kind), $"unknown synthesizer kind {kind}.");
        Check.That(Enum.IsDefined(mix), nameof(mix), $"unknown mix {mix}.");
        Check.That(trainable || IsRandom(kind), nameof(trainable),
            $"only the Random and FactorizedRandom kinds can be fixed; {kind} is computed from the input by learned layers.");
        Check.Positive(rank, nameof(rank));
        Check.That(dropout >= 0 && dropout < 1, nameof(dropout), $"must be in [0, 1), got {dropout}.");
        Heads = heads; DimHead = dimHead; MaxLen = maxLen; Kind = kind; Causal = causal; Mix = mix;
        Trainable = trainable; Rank = rank;
        FactorA = kind == SynthesizerKind.FactorizedDense ? ResolveFactorA(maxLen, factorA) : 0;
        this.dropout = dropout;

        var gen = seed is long s ? new Generator((ulong)s) : null;
        double bound = 1.0 / Math.Sqrt(dimHead);                    // nn.Linear's default init for fan-in D
        Parameter Uniform(params long[] shape) => new(rand(shape, dtype: ScalarType.Float32, generator: gen) * (2 * bound) - bound);
        Tensor Random(double std, params long[] shape)
        {
            var t = randn(shape, dtype: ScalarType.Float32, generator: gen) * std;
            return trainable ? new Parameter(t) : t;
        }
        switch (kind)
        {
            case SynthesizerKind.Dense:
                (w1, b1) = (Uniform(heads, dimHead, dimHead), Uniform(heads, dimHead));
                (w2, b2) = (Uniform(heads, dimHead, maxLen), Uniform(heads, maxLen));
                break;
            case SynthesizerKind.FactorizedDense:
                int b = maxLen / FactorA;
                (w1, b1) = (Uniform(heads, dimHead, dimHead), Uniform(heads, dimHead));
                (w_a, b_a) = (Uniform(heads, dimHead, FactorA), Uniform(heads, FactorA));
                (w_b, b_b) = (Uniform(heads, dimHead, b), Uniform(heads, b));
                break;
            case SynthesizerKind.Random:
                random_logits = Random(1.0, heads, maxLen, maxLen);
                break;
            case SynthesizerKind.FactorizedRandom:
                double std = Math.Pow(rank, -0.25);                  // entries of R₁·R₂ᵀ then have unit variance
                r1 = Random(std, heads, maxLen, rank);
                r2 = Random(std, heads, maxLen, rank);
                break;
        }
        if (mix == SynthesizerMix.Learned) mix_weights = new Parameter(zeros(heads, 2));
        RegisterComponents();
    }

    /// <summary>Heads H.</summary>
    public int Heads { get; }
    /// <summary>Head width D.</summary>
    public int DimHead { get; }
    /// <summary>Longest sequence ℓ.</summary>
    public int MaxLen { get; }
    /// <summary>How the logits are synthesized.</summary>
    public SynthesizerKind Kind { get; }
    /// <summary>Query i attends only keys j ≤ i.</summary>
    public bool Causal { get; }
    /// <summary>Combination with dot-product attention.</summary>
    public SynthesizerMix Mix { get; }
    /// <summary>Random kinds: whether the logits are learned.</summary>
    public bool Trainable { get; }
    /// <summary>FactorizedRandom: the rank k.</summary>
    public int Rank { get; }
    /// <summary>FactorizedDense: a (b = MaxLen / a); 0 for the other kinds.</summary>
    public int FactorA { get; }

    private static bool IsRandom(SynthesizerKind kind) => kind is SynthesizerKind.Random or SynthesizerKind.FactorizedRandom;

    /// <summary>The FactorizedDense width a for <paramref name="maxLen"/>: <paramref name="factorA"/> when given
    /// (it must divide maxLen), else the largest divisor of maxLen that is ≤ √maxLen.</summary>
    public static int ResolveFactorA(int maxLen, int? factorA)
    {
        Check.Positive(maxLen, nameof(maxLen));
        if (factorA is int a)
        {
            Check.That(a > 0 && maxLen % a == 0, nameof(factorA), $"must be a positive divisor of maxLen = {maxLen} (a·b = maxLen), got {a}.");
            return a;
        }
        int best = 1;
        for (int d = 1; (long)d * d <= maxLen; d++) if (maxLen % d == 0) best = d;
        return best;
    }

    /// <summary>
    /// Trainable parameters of a synthesizer with these settings, by the per-head formulas in the class remarks:
    /// H·(D² + D·ℓ + D + ℓ) Dense; H·ℓ² Random; H·(D² + D·(a + b) + D + a + b) FactorizedDense; H·2·ℓ·k
    /// FactorizedRandom; 0 for fixed random kinds; plus 2·H for a learned mix.
    /// </summary>
    public static long ParameterCount(SynthesizerKind kind, int heads, int dimHead, int maxLen,
        SynthesizerMix mix = SynthesizerMix.None, bool trainable = true, int rank = 8, int? factorA = null)
    {
        long h = heads, d = dimHead, l = maxLen;
        long perHead = kind switch
        {
            SynthesizerKind.Dense => d * d + d * l + d + l,
            SynthesizerKind.Random => trainable ? l * l : 0,
            SynthesizerKind.FactorizedDense => FactorizedDenseCount(d, l, ResolveFactorA(maxLen, factorA)),
            SynthesizerKind.FactorizedRandom => trainable ? 2 * l * rank : 0,
            _ => throw new ArgumentException($"kind: unknown synthesizer kind {kind}.", nameof(kind)),
        };
        return h * perHead + (mix == SynthesizerMix.Learned ? 2 * h : 0);

        static long FactorizedDenseCount(long d, long l, long a) => d * d + d * (a + l / a) + d + a + l / a;
    }

    /// <summary>The mixing weights α = [α_synthetic, α_dot] per head, (H, 2); null unless Mix = Learned.</summary>
    public Tensor? MixingWeights => mix_weights?.detach().softmax(-1);

    /// <summary>
    /// The synthetic logits S (before masking) for a sequence of <paramref name="seqLen"/> tokens.
    /// </summary>
    /// <param name="q">(B, H, T, D) per-token features; read by the Dense kinds only (may be null for Random kinds).</param>
    /// <param name="seqLen">T ≤ MaxLen.</param>
    /// <returns>(B, H, T, T) for the Dense kinds, (1, H, T, T) for the Random kinds; row i = query i, column j = key j.</returns>
    public Tensor SyntheticLogits(Tensor? q, int seqLen)
    {
        Check.That(seqLen >= 1 && seqLen <= MaxLen, nameof(seqLen), $"must be in [1, MaxLen = {MaxLen}], got {seqLen}.");
        if (Kind is SynthesizerKind.Dense or SynthesizerKind.FactorizedDense)
        {
            Check.That(q is not null, nameof(q), $"the {Kind} synthesizer needs the per-token features q (B, H, T, D).");
            Check.Shape(q!, nameof(q), "(B, H, T, D)", -1, Heads, seqLen, DimHead);
            Check.FloatingPoint(q!, nameof(q));
        }
        using var scope = NewDisposeScope();
        Tensor logits;
        switch (Kind)
        {
            case SynthesizerKind.Dense:
            {
                var hidden = Hidden(q!);                                                        // (B, H, T, D)
                var w = w2!.to(q!.dtype).narrow(2, 0, seqLen);                                 // (H, D, T): the first T outputs
                var bias = b2!.to(q.dtype).narrow(1, 0, seqLen).unsqueeze(1);                   // (H, 1, T)
                logits = matmul(hidden, w) + bias;                                              // (B, H, T, T)
                break;
            }
            case SynthesizerKind.FactorizedDense:
            {
                var hidden = Hidden(q!);                                                        // (B, H, T, D)
                var a = matmul(hidden, w_a!.to(q!.dtype)) + b_a!.to(q.dtype).unsqueeze(1);       // (B, H, T, a)
                var b = matmul(hidden, w_b!.to(q.dtype)) + b_b!.to(q.dtype).unsqueeze(1);        // (B, H, T, b)
                // Logit j = A[j mod a]·B[j div a]: the (b, a) outer product flattened row-major is exactly
                // A tiled b times times each B entry repeated a times, so no two of the ℓ products coincide.
                var full = (b.unsqueeze(-1) * a.unsqueeze(-2)).flatten(-2);                      // (B, H, T, ℓ)
                logits = full.narrow(-1, 0, seqLen);                                            // (B, H, T, T)
                break;
            }
            case SynthesizerKind.Random:
                logits = random_logits!.narrow(1, 0, seqLen).narrow(2, 0, seqLen).unsqueeze(0); // (1, H, T, T)
                break;
            default:
            {
                var left = r1!.narrow(1, 0, seqLen);                                            // (H, T, k)
                var right = r2!.narrow(1, 0, seqLen);                                           // (H, T, k)
                logits = matmul(left, right.transpose(1, 2)).unsqueeze(0);                      // (1, H, T, T)
                break;
            }
        }
        if (q is not null) logits = logits.to(q.dtype);
        return logits.MoveToOuterDisposeScope();
    }

    private Tensor Hidden(Tensor q) =>
        nn.functional.relu(matmul(q, w1!.to(q.dtype)) + b1!.to(q.dtype).unsqueeze(1));           // (B, H, T, D)

    /// <summary>The logits the softmax sees (before masking): S, S + q·kᵀ/√D, or α₀·S + α₁·q·kᵀ/√D.</summary>
    /// <param name="q">(B, H, T, D) queries / per-token features.</param>
    /// <param name="k">(B, H, T, D) keys; needed when Mix ≠ None, ignored otherwise.</param>
    /// <returns>(B or 1, H, T, T).</returns>
    public Tensor Scores(Tensor q, Tensor? k)
    {
        Check.Shape(q, nameof(q), "(B, H, T, D)", -1, Heads, -1, DimHead);
        Check.FloatingPoint(q, nameof(q));
        int seqLen = (int)q.shape[2];
        var synthetic = SyntheticLogits(q, seqLen);
        if (Mix == SynthesizerMix.None) return synthetic;
        Check.That(k is not null, nameof(k), $"a synthesizer mixed with dot-product attention (Mix = {Mix}) needs the keys.");
        Check.Shape(k!, nameof(k), "(B, H, T, D)", q.shape[0], Heads, seqLen, DimHead);
        Check.SameDtype(q, nameof(q), k!, nameof(k));
        using var scope = NewDisposeScope();
        var dot = matmul(q, k!.transpose(-1, -2)) / Math.Sqrt(DimHead);                       // (B, H, T, T)
        if (Mix == SynthesizerMix.Sum) return (synthetic + dot).MoveToOuterDisposeScope();
        var alpha = mix_weights!.to(q.dtype).softmax(-1);                                      // (H, 2)
        var mixed = alpha[.., 0].view(1, Heads, 1, 1) * synthetic + alpha[.., 1].view(1, Heads, 1, 1) * dot;
        return mixed.MoveToOuterDisposeScope();                                                // (B, H, T, T)
    }

    /// <summary>Attention probabilities (no dropout): masked softmax of <see cref="Scores"/>.</summary>
    /// <param name="q">(B, H, T, D) queries / per-token features.</param>
    /// <param name="k">(B, H, T, D) keys (used when Mix ≠ None; may be null otherwise).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token, false = padding (never attended).</param>
    /// <returns>(B, H, T, T); each row sums to 1 over its allowed keys, or is all zeros when none is allowed.</returns>
    public Tensor Probabilities(Tensor q, Tensor? k, Tensor? keyMask = null)
    {
        Check.Shape(q, nameof(q), "(B, H, T, D)", -1, Heads, -1, DimHead);
        Check.KeyMask(keyMask, q.shape[0], q.shape[2]);
        using var scope = NewDisposeScope();
        (q, k) = (ZeroPadding(q, keyMask), k is null ? null : ZeroPadding(k, keyMask));
        var scores = Scores(q, k);
        var probs = ReferenceAttention.MaskedSoftmax(scores, Allowed(q, keyMask));                // (1 or B, H, T, T)
        return probs.expand(q.shape[0], -1, -1, -1).MoveToOuterDisposeScope();                    // (B, H, T, T)
    }

    /// <summary>Synthesizer attention.</summary>
    /// <param name="q">(B, H, T, D) queries: the per-token features of the Dense kinds and the queries of a mix.</param>
    /// <param name="k">(B, H, T, D) keys; used only when Mix ≠ None (may be null otherwise).</param>
    /// <param name="v">(B, H, T, Dv) values.</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token, false = padding (never attended).</param>
    /// <returns>(B, H, T, Dv); zeros for a query with no allowed key.</returns>
    public Tensor forward(Tensor q, Tensor? k, Tensor v, Tensor? keyMask = null)
    {
        Check.Shape(q, nameof(q), "(B, H, T, D)", -1, Heads, -1, DimHead);
        Check.Shape(v, nameof(v), "(B, H, T, Dv)", q.shape[0], Heads, q.shape[2], -1);
        Check.SameDtype(q, nameof(q), v, nameof(v));
        using var scope = NewDisposeScope();
        var probs = Probabilities(q, k, keyMask);                                              // (B, H, T, T)
        probs = nn.functional.dropout(probs, dropout, training);
        return matmul(probs, ZeroPadding(v, keyMask)).MoveToOuterDisposeScope();              // (B, H, T, Dv)
    }

    /// <summary>Which (query, key) pairs may attend: causal rule and key padding, (1 or B, 1, T, T) bool.</summary>
    private Tensor Allowed(Tensor q, Tensor? keyMask)
    {
        long batch = q.shape[0], seqLen = q.shape[2];
        var allowed = Causal
            ? ones(seqLen, seqLen, dtype: ScalarType.Bool, device: q.device).tril().view(1, 1, seqLen, seqLen)
            : ones(new long[] { 1, 1, seqLen, seqLen }, dtype: ScalarType.Bool, device: q.device);
        if (keyMask is not null) allowed = allowed.logical_and(keyMask.view(batch, 1, 1, seqLen));   // (B, 1, T, T)
        return allowed;
    }

    /// <summary>Zeroes padded positions of a (B, H, T, ·) tensor so that garbage there (even NaN) cannot leak.</summary>
    private static Tensor ZeroPadding(Tensor x, Tensor? keyMask) =>
        keyMask is null ? x : x.masked_fill(keyMask.logical_not().view(x.shape[0], 1, x.shape[2], 1), 0);
}
