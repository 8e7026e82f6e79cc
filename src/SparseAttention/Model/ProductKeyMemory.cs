using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// Product-key memory layer: a position-wise sublayer with numKeys² learned memory values addressed by product keys.
/// Per head, the token's query (2·dimHead features, each half layer-normalised) is split in two halves; half p is
/// scored against that head's numKeys sub-keys K<sub>p</sub>. The product key (i, j) scores
/// q₁·K₁[i] + q₂·K₂[j]; the topK best of the numKeys² product keys are found exactly from the topK best sub-keys of
/// each half (topK² candidates), their scores softmaxed, and the output is the softmax-weighted sum of their values
/// (memory index i·numKeys + j), summed over heads — an EmbeddingBag in sum mode with per-sample weights.
/// </summary>
/// <remarks>Lample et al. 2019, "Large Memory Layers with Product Keys" (arXiv 1907.05242); defaults and layout as in
/// the product-key-memory library the PyTorch routing-transformer uses (heads 4, 128 keys, top 32, layer-normalised
/// queries, normal initialisation with std 1/√(last dimension)).</remarks>
public sealed class ProductKeyMemory : nn.Module<Tensor, Tensor>
{
    private readonly Linear to_queries;                 // dim → 2·heads·dimHead, no bias
    private readonly LayerNorm norm;                     // over dimHead
    private readonly Parameter keys;                     // (heads, numKeys, 2, dimHead)
    private readonly EmbeddingBag values;                // (numKeys², dim), sum of weighted rows
    private readonly int heads, numKeys, topK, dimHead;

    /// <param name="dim">Feature size of the input and output.</param>
    /// <param name="numKeys">Sub-keys per half; the memory holds numKeys² values.</param>
    /// <param name="topK">Memory slots each head reads per token (≤ numKeys).</param>
    /// <param name="heads">Independent query heads (their reads are summed).</param>
    /// <param name="dimHead">Features of each query half.</param>
    /// <param name="name">Module name.</param>
    public ProductKeyMemory(int dim, int numKeys = 128, int topK = 32, int heads = 4, int dimHead = 128, string name = "pkm") : base(name)
    {
        Check.Positive(dim, nameof(dim));
        Check.Positive(numKeys, nameof(numKeys));
        Check.That(topK >= 1 && topK <= numKeys, nameof(topK), $"must be in [1, numKeys = {numKeys}], got {topK}.");
        Check.Positive(heads, nameof(heads));
        Check.Positive(dimHead, nameof(dimHead));
        Check.That((long)numKeys * numKeys <= int.MaxValue, nameof(numKeys), $"numKeys² must fit in an int, got numKeys = {numKeys}.");
        (this.heads, this.numKeys, this.topK, this.dimHead) = (heads, numKeys, topK, dimHead);
        to_queries = nn.Linear(dim, 2L * heads * dimHead, hasBias: false);
        norm = nn.LayerNorm(dimHead);
        keys = new Parameter(randn(heads, numKeys, 2, dimHead) / Math.Sqrt(dimHead));
        values = nn.EmbeddingBag((long)numKeys * numKeys, dim, mode: EmbeddingBagMode.Sum);
        using (no_grad()) nn.init.normal_(values.weight!, 0, 1 / Math.Sqrt(dim));
        RegisterComponents();
    }

    /// <summary>Sub-keys (heads, numKeys, 2, dimHead): [h, i, p] is sub-key i of half p of head h.</summary>
    public Tensor Keys => keys;

    /// <summary>Memory values (numKeys², dim); row i·numKeys + j belongs to product key (i, j).</summary>
    public Tensor Values => values.weight!;

    /// <summary>The normalised query halves of <paramref name="x"/> (B, T, dim): (B, T, heads, 2, dimHead).</summary>
    public Tensor Queries(Tensor x)
    {
        using var scope = NewDisposeScope();
        long batch = x.shape[0], seqLen = x.shape[1];
        var q = to_queries.forward(x).view(batch, seqLen, heads, 2, dimHead);              // (B, T, H, 2, Dh)
        return norm.forward(q).MoveToOuterDisposeScope();
    }

    /// <param name="x">(B, T, dim).</param>
    /// <returns>(B, T, dim).</returns>
    public override Tensor forward(Tensor x)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, values.weight!.shape[1]);
        using var scope = NewDisposeScope();
        long batch = x.shape[0], seqLen = x.shape[1], dim = x.shape[2];
        var q = Queries(x);                                                                 // (B, T, H, 2, Dh)
        var dots = einsum("bthpd,hnpd->bthpn", q, keys.to(x.dtype));                        // (B, T, H, 2, numKeys)
        var (halfScores, halfIndices) = dots.topk(topK, dim: -1);                           // (B, T, H, 2, k) each
        var s1 = halfScores.select(3, 0).unsqueeze(-1);                                     // (B, T, H, k, 1)
        var s2 = halfScores.select(3, 1).unsqueeze(-2);                                     // (B, T, H, 1, k)
        var i1 = halfIndices.select(3, 0).unsqueeze(-1);
        var i2 = halfIndices.select(3, 1).unsqueeze(-2);
        var candidates = (s1 + s2).flatten(-2);                                             // (B, T, H, k²)
        var candidateIndices = (i1 * numKeys + i2).flatten(-2);                             // (B, T, H, k²)
        var (scores, best) = candidates.topk(topK, dim: -1);                                // (B, T, H, k)
        var memory = candidateIndices.gather(-1, best);                                     // (B, T, H, k)
        var weights = scores.softmax(-1);                                                   // (B, T, H, k)
        var bags = memory.reshape(batch * seqLen, heads * topK);                            // (N, H·k): one bag per token
        var output = values.forward(bags, null, weights.reshape(batch * seqLen, heads * topK));   // (N, dim)
        return output.view(batch, seqLen, dim).MoveToOuterDisposeScope();
    }
}
