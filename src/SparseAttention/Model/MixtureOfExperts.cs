using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// Mixture-of-experts feed-forward with top-2 gating: a gate (dim → experts, softmax) picks each token's two most
/// probable experts; the token's output is the sum of those two experts' outputs (each a <see cref="FeedForward"/>)
/// weighted by their gate probabilities renormalised to sum to 1. Every token is processed by exactly its two experts —
/// no expert capacity limit and no random dropping of the second expert — so the layer is a function of each position
/// alone (cached decoding calls it on one token and gets the same result).
/// </summary>
/// <remarks>
/// <para>Shazeer et al. 2017, "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer"; the
/// load-balancing loss is GShard's (Lepikhin et al. 2020), as in the mixture-of-experts library the PyTorch
/// routing-transformer uses: per sequence, density<sub>e</sub> = fraction of real tokens whose first choice is expert
/// e, proxy<sub>e</sub> = mean gate probability of expert e over the real tokens;
/// loss = lossCoef · E² · mean over sequences and experts of density<sub>e</sub>·proxy<sub>e</sub>. Perfectly balanced
/// routing gives lossCoef. Unlike that library, padded positions are left out of both means, and there is no capacity
/// limit (whose token dropping depends on the other tokens of the batch).</para>
/// </remarks>
public sealed class MixtureOfExperts : nn.Module<Tensor, Tensor?, (Tensor Output, Tensor AuxLoss)>
{
    /// <summary>Experts each token is sent to.</summary>
    public const int TopK = 2;

    private readonly Parameter w_gating;               // (dim, E)
    private readonly ModuleList<FeedForward> experts;
    private readonly double lossCoef;

    /// <param name="dim">Feature size of the input and output.</param>
    /// <param name="numExperts">Number of experts E (≥ 2).</param>
    /// <param name="lossCoef">Weight of the load-balancing loss (≥ 0).</param>
    /// <param name="expert">Builds one expert (a position-wise feed-forward dim → dim).</param>
    /// <param name="name">Module name.</param>
    public MixtureOfExperts(int dim, int numExperts, double lossCoef, Func<FeedForward> expert, string name = "mixture_of_experts") : base(name)
    {
        Check.Positive(dim, nameof(dim));
        Check.That(numExperts >= TopK, nameof(numExperts), $"top-{TopK} gating needs at least {TopK} experts, got {numExperts}.");
        Check.That(lossCoef >= 0 && double.IsFinite(lossCoef), nameof(lossCoef), $"must be finite and >= 0, got {lossCoef}.");
        ArgumentNullException.ThrowIfNull(expert);
        this.lossCoef = lossCoef;
        w_gating = new Parameter(randn(dim, numExperts) / Math.Sqrt(dim));
        experts = nn.ModuleList(Enumerable.Range(0, numExperts).Select(_ => expert()).ToArray());
        RegisterComponents();
    }

    /// <summary>Number of experts E.</summary>
    public int NumExperts => experts.Count;

    /// <summary>The gate's weight (dim, E): gate logits = x · W.</summary>
    public Tensor GateWeight => w_gating;

    /// <summary>The experts, in gate order.</summary>
    public IReadOnlyList<FeedForward> Experts => experts.ToList();

    /// <param name="x">(B, T, dim).</param>
    /// <param name="inputMask">Optional (B, T) bool; true = real token. Padding is processed but left out of the loss.</param>
    /// <returns>(B, T, dim) and the scalar load-balancing loss (already multiplied by the loss coefficient).</returns>
    public override (Tensor Output, Tensor AuxLoss) forward(Tensor x, Tensor? inputMask = null)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, w_gating.shape[0]);
        Check.KeyMask(inputMask, x.shape[0], x.shape[1]);
        using var scope = NewDisposeScope();
        long batch = x.shape[0], seqLen = x.shape[1], dim = x.shape[2], numExperts = experts.Count;
        var flat = x.reshape(batch * seqLen, dim);                                          // (N, dim)
        var probs = flat.matmul(w_gating.to(x.dtype)).softmax(-1);                          // (N, E)
        var (top, chosen) = probs.topk(TopK, dim: -1);                                      // (N, 2) each, best first
        var weights = top / top.sum(-1, keepdim: true);                                     // (N, 2); the sum is ≥ 2/E
        var output = zeros_like(flat);                                                      // (N, dim)
        for (int e = 0; e < numExperts; e++)
        {
            var picked = chosen.eq(e);                                                      // (N, 2)
            var rows = picked.any(-1).nonzero().squeeze(-1);                                // (n_e)
            if (rows.numel() == 0) continue;
            var weight = (weights * picked).sum(-1).index_select(0, rows).unsqueeze(-1);    // (n_e, 1)
            var expertOut = experts[e].forward(flat.index_select(0, rows).unsqueeze(0)).squeeze(0);   // (n_e, dim)
            output = output.index_add(0, rows, expertOut * weight, 1);
        }
        var loss = LoadBalancingLoss(probs.view(batch, seqLen, numExperts), chosen.select(-1, 0).view(batch, seqLen), inputMask);
        return (output.view(batch, seqLen, dim).MoveToOuterDisposeScope(), (loss * lossCoef).MoveToOuterDisposeScope());
    }

    /// <summary>E² · mean over sequences and experts of (fraction of real tokens whose first choice is e) · (mean gate
    /// probability of e over real tokens), without the loss coefficient.</summary>
    /// <param name="probs">(B, T, E) gate probabilities.</param>
    /// <param name="first">(B, T) int64 first-choice expert per token.</param>
    /// <param name="inputMask">Optional (B, T) bool; true = real token.</param>
    public static Tensor LoadBalancingLoss(Tensor probs, Tensor first, Tensor? inputMask)
    {
        Check.Shape(probs, nameof(probs), "(B, T, E)", -1, -1, -1);
        Check.Shape(first, nameof(first), "(B, T)", probs.shape[0], probs.shape[1]);
        using var scope = NewDisposeScope();
        long numExperts = probs.shape[2];
        var real = inputMask is null ? ones_like(first, dtype: probs.dtype) : inputMask.to(probs.dtype);   // (B, T)
        var count = real.sum(1, keepdim: true).clamp_min(1).unsqueeze(-1);                  // (B, 1, 1)
        var weight = real.unsqueeze(-1) / count;                                            // (B, T, 1)
        var density = (nn.functional.one_hot(first, numExperts).to(probs.dtype) * weight).sum(1);   // (B, E)
        var proxy = (probs * weight).sum(1);                                                // (B, E)
        return ((density * proxy).mean() * (numExperts * numExperts)).MoveToOuterDisposeScope();
    }
}
