using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Terms of attention that depend on the distance d = j − i between a key's and a query's original positions — a
/// score modification in the spirit of FlexAttention's <c>score_mod</c>, plus (for Shaw) a value-side term. The
/// kernels that take it (<see cref="BlockSparseOpsAttention"/>, <see cref="GroupedAttention"/>'s Ops path,
/// <see cref="ReferenceAttention"/>, <see cref="DecodeAttention"/>) evaluate it only on the (query, key) pairs they
/// attend, so memory stays O(T·W) — no (T, T) table is ever formed.
/// </summary>
/// <remarks>Every layout the kernels use keeps heads on axis 1: scores are (B, H, …, Wq, Wk), queries (B, H, …, Wq, D),
/// distances (1 or B, H or 1, …, Wq, Wk) broadcastable to the scores.</remarks>
public abstract class RelativePositionTerms
{
    /// <summary>Adds the score term to <paramref name="scaledScores"/> (already multiplied by the scale).</summary>
    /// <param name="scaledScores">(B, H, …, Wq, Wk).</param>
    /// <param name="q">(B, H, …, Wq, D): the queries of those rows.</param>
    /// <param name="distance">int64 j − i, broadcastable to <paramref name="scaledScores"/>.</param>
    /// <param name="scale">The score scale (Shaw's key term is scaled with the dot product, ALiBi's bias is not).</param>
    public abstract Tensor AddToScores(Tensor scaledScores, Tensor q, Tensor distance, double scale);

    /// <summary>Adds the value-side term Σⱼ pᵢⱼ·t(j − i) to <paramref name="output"/>; none by default.</summary>
    /// <param name="output">(B, H, …, Wq, Dv).</param>
    /// <param name="probs">(B, H, …, Wq, Wk): the attention probabilities over the same pairs as <paramref name="distance"/>.</param>
    /// <param name="distance">int64 j − i, broadcastable to <paramref name="probs"/>.</param>
    public virtual Tensor AddToOutput(Tensor output, Tensor probs, Tensor distance) => output;

    /// <summary>Heads this term is built for, or null when the same for every head.</summary>
    public abstract int? Heads { get; }

    /// <summary>The tensors the terms are made of (their learned tables), for kernels that recompute the terms.</summary>
    internal virtual Tensor[] Tensors => [];

    /// <summary>The same terms made of <paramref name="tensors"/> (shaped as <see cref="Tensors"/>).</summary>
    internal virtual RelativePositionTerms With(Tensor[] tensors) => this;

    /// <summary>Checks that the term fits attention with <paramref name="heads"/> heads of width <paramref name="dim"/>.</summary>
    internal void CheckFits(long heads, long dim, long dimV, string argument)
    {
        Check.That(Heads is null || Heads == heads, argument, $"was built for {Heads} heads, the attention has H = {heads}.");
        CheckWidths(dim, dimV, argument);
    }

    private protected virtual void CheckWidths(long dim, long dimV, string argument) { }

    /// <summary>j − i for every (query, key) pair of a (B, H, T, T) score matrix: (T, T) int64.</summary>
    public static Tensor DenseDistance(long seqLen, Device device)
    {
        var positions = arange(seqLen, dtype: ScalarType.Int64, device: device);
        return positions.view(1, seqLen) - positions.view(seqLen, 1);                  // (T, T): j − i
    }
}

/// <summary>
/// Shaw, Uszkoreit and Vaswani (2018), "Self-Attention with Relative Position Representations" (arXiv 1803.02155):
/// learned embeddings per clipped distance c = clip(j − i, ±R): score term q·aᴷ_c (scaled like q·k) and value term
/// Σⱼ pᵢⱼ·aⱽ_c. The tables are shared by the heads. Gradients reach both tables through autograd.
/// </summary>
/// <param name="KeyTable">(2R + 1, D): aᴷ, row c + R.</param>
/// <param name="ValueTable">(2R + 1, Dv): aⱽ, row c + R.</param>
public sealed class ShawRelativePositions(Tensor KeyTable, Tensor ValueTable) : RelativePositionTerms
{
    /// <summary>(2R + 1, D).</summary>
    public Tensor KeyTable { get; } = CheckTable(KeyTable, nameof(KeyTable));

    /// <summary>(2R + 1, Dv).</summary>
    public Tensor ValueTable { get; } = CheckTable(ValueTable, nameof(ValueTable));

    /// <summary>R: distances are clipped to ±R.</summary>
    public int MaxDistance => (int)(KeyTable.shape[0] - 1) / 2;

    public override int? Heads => null;

    internal override Tensor[] Tensors => [KeyTable, ValueTable];

    internal override RelativePositionTerms With(Tensor[] tensors) => new ShawRelativePositions(tensors[0], tensors[1]);

    private static Tensor CheckTable(Tensor table, string name)
    {
        ArgumentNullException.ThrowIfNull(table, name);
        Check.That(table.dim() == 2 && table.shape[0] % 2 == 1, name, $"must be (2R + 1, D), got {Check.ShapeOf(table)}.");
        return table;
    }

    private protected override void CheckWidths(long dim, long dimV, string argument)
    {
        Check.That(KeyTable.shape[0] == ValueTable.shape[0], argument, $"key table has {KeyTable.shape[0]} rows, value table {ValueTable.shape[0]}.");
        Check.That(KeyTable.shape[1] == dim, argument, $"key table is {KeyTable.shape[1]} wide, the queries D = {dim}.");
        Check.That(ValueTable.shape[1] == dimV, argument, $"value table is {ValueTable.shape[1]} wide, the values Dv = {dimV}.");
    }

    /// <summary>Row of the tables for each distance: clip(d, ±R) + R, expanded to <paramref name="shape"/>.</summary>
    private Tensor TableRow(Tensor distance, long[] shape) =>
        (distance.clamp(-MaxDistance, MaxDistance) + MaxDistance).expand(shape);

    public override Tensor AddToScores(Tensor scaledScores, Tensor q, Tensor distance, double scale)
    {
        var perDistance = matmul(q, KeyTable.to(q.dtype).t());                          // (B, H, …, Wq, 2R+1)
        var row = TableRow(distance, scaledScores.shape);                               // (B, H, …, Wq, Wk)
        var leading = row.shape[..^1].Append(perDistance.shape[^1]).ToArray();
        return scaledScores + perDistance.expand(leading).gather(-1, row) * scale;
    }

    public override Tensor AddToOutput(Tensor output, Tensor probs, Tensor distance)
    {
        var row = TableRow(distance, probs.shape);                                      // (B, H, …, Wq, Wk)
        long[] bucketShape = [.. probs.shape[..^1], KeyTable.shape[0]];
        var perDistance = zeros(bucketShape, dtype: probs.dtype, device: probs.device)
                          .scatter_add(-1, row, probs);                                 // (B, H, …, Wq, 2R+1): Σ p per distance
        return output + matmul(perDistance, ValueTable.to(probs.dtype));               // (B, H, …, Wq, Dv)
    }
}

/// <summary>
/// ALiBi (Press, Smith and Lewis 2022, "Train Short, Test Long", arXiv 2108.12409): a bias −mₕ·|j − i| added to the
/// scaled scores, one fixed slope per head; no parameters. Causal attention sees only j ≤ i, where it is the paper's
/// mₕ·(j − i); bidirectional attention gets the symmetric form.
/// </summary>
public sealed class AlibiPositions : RelativePositionTerms
{
    private readonly double[] slopes;

    /// <param name="slopes">mₕ per head (positive).</param>
    public AlibiPositions(double[] slopes)
    {
        ArgumentNullException.ThrowIfNull(slopes);
        Check.That(slopes.Length > 0 && slopes.All(m => m > 0 && double.IsFinite(m)), nameof(slopes), "must be one positive finite slope per head.");
        this.slopes = (double[])slopes.Clone();
    }

    /// <summary>The paper's slopes for <paramref name="heads"/> heads: 2^(−8h/n) for h = 1..n with n the largest power
    /// of two ≤ heads, then for the remaining heads every other slope of the sequence for 2n.</summary>
    public static double[] StandardSlopes(int heads)
    {
        Check.Positive(heads, nameof(heads));
        static IEnumerable<double> Geometric(int n) => Enumerable.Range(1, n).Select(h => Math.Pow(2, -8.0 * h / n));
        int power = 1 << (int)Math.Floor(Math.Log2(heads));
        var result = Geometric(power).ToList();
        result.AddRange(Geometric(2 * power).Where((_, i) => i % 2 == 0).Take(heads - power));
        return [.. result];
    }

    /// <summary>The slopes, one per head.</summary>
    public IReadOnlyList<double> Slopes => slopes;

    public override int? Heads => slopes.Length;

    /// <summary>The same slopes for heads [<paramref name="start"/>, start + count): a head group's share.</summary>
    public AlibiPositions Slice(int start, int count) => new(slopes[start..(start + count)]);

    public override Tensor AddToScores(Tensor scaledScores, Tensor q, Tensor distance, double scale)
    {
        long[] slopeShape = [.. Enumerable.Repeat(1L, (int)scaledScores.dim())];
        slopeShape[1] = slopes.Length;
        var m = tensor(slopes, dtype: scaledScores.dtype, device: scaledScores.device).view(slopeShape);   // (1, H, 1, …)
        return scaledScores - m * distance.abs().to(scaledScores.dtype);
    }
}
