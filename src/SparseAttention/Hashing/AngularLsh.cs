using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Hashing;

/// <summary>
/// Angular locality-sensitive hashing by random rotations (Andoni et al. 2015, as used by the Reformer):
/// bucket(x) = argmax([x·R; −x·R]) for a random Gaussian matrix R of shape (D, nBuckets / 2). Vectors at a
/// small angle land in the same bucket with high probability; the hash ignores the vectors' lengths.
/// </summary>
/// <remarks>Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020, arXiv 2001.04451, §2.</remarks>
public static class AngularLsh
{
    /// <summary>Random rotations for <paramref name="rounds"/> hash rounds.</summary>
    /// <param name="heads">Heads with their own rotations (1 = one set shared by all heads).</param>
    /// <param name="rounds">Hash rounds (<c>n_hashes</c>), each with its own rotation.</param>
    /// <param name="dim">Width D of the hashed vectors.</param>
    /// <param name="buckets">Buckets per round; must be even (the hash picks one of ±R's columns).</param>
    /// <param name="generator">Source of randomness (deterministic under its seed).</param>
    /// <returns>(heads, rounds, D, buckets / 2) float32 standard-normal entries.</returns>
    public static Tensor Rotations(int heads, int rounds, int dim, int buckets, Generator generator)
    {
        Check.Positive(heads, nameof(heads));
        Check.Positive(rounds, nameof(rounds));
        Check.Positive(dim, nameof(dim));
        CheckBuckets(buckets);
        return randn(new long[] { heads, rounds, dim, buckets / 2 }, generator: generator);
    }

    /// <summary>Bucket of every vector in every round.</summary>
    /// <param name="x">(B, H, T, D) vectors (any length; only the direction matters).</param>
    /// <param name="rotations">(H or 1, R, D, nBuckets / 2), e.g. from <see cref="Rotations"/>.</param>
    /// <returns>(B, H, R, T) int64 buckets in [0, nBuckets).</returns>
    public static Tensor Buckets(Tensor x, Tensor rotations)
    {
        Check.Shape(x, nameof(x), "(B, H, T, D)", -1, -1, -1, -1);
        Check.FloatingPoint(x, nameof(x));
        Check.Shape(rotations, nameof(rotations), "(H or 1, R, D, nBuckets / 2)", -1, -1, x.shape[3], -1);
        Check.That(rotations.shape[0] == 1 || rotations.shape[0] == x.shape[1], nameof(rotations),
            $"first dimension must be 1 or H = {x.shape[1]}, got {Check.ShapeOf(rotations)}.");
        using var scope = NewDisposeScope();
        long batch = x.shape[0], heads = x.shape[1], seqLen = x.shape[2], dim = x.shape[3];
        long rounds = rotations.shape[1], half = rotations.shape[3];
        var rot = rotations.to(x.dtype).to(x.device).permute(0, 2, 1, 3)                  // (Hr, D, R, nBuckets/2)
                           .reshape(rotations.shape[0], dim, rounds * half);              // (Hr, D, R·nBuckets/2)
        var rotated = matmul(x.detach(), rot)                                            // (B, H, T, R·nBuckets/2): one GEMM per head
                      .view(batch, heads, seqLen, rounds, half).permute(0, 1, 3, 2, 4);   // (B, H, R, T, nBuckets/2)
        var both = cat([rotated, rotated.neg()], -1);                                    // (B, H, R, T, nBuckets)
        return both.argmax(-1).MoveToOuterDisposeScope();                                // (B, H, R, T)
    }

    internal static void CheckBuckets(int buckets) =>
        Check.That(buckets >= 2 && buckets % 2 == 0, nameof(buckets), $"must be an even number >= 2, got {buckets}.");
}

/// <summary>
/// Sign random projections (Charikar 2002), the hash the ALSH papers use after their transforms: each of
/// <c>bits</c> random hyperplanes contributes one bit (1 when the projection is ≥ 0), and the bucket is the
/// bit string read as an integer. Collision probability per bit is 1 − θ/π for vectors at angle θ.
/// </summary>
public static class SignRandomProjection
{
    /// <summary>Random hyperplanes: (heads, rounds, D, bits) standard-normal entries.</summary>
    public static Tensor Planes(int heads, int rounds, int dim, int bits, Generator generator)
    {
        Check.Positive(heads, nameof(heads));
        Check.Positive(rounds, nameof(rounds));
        Check.Positive(dim, nameof(dim));
        Check.That(bits >= 1 && bits <= 30, nameof(bits), $"must be in [1, 30], got {bits}.");
        return randn(new long[] { heads, rounds, dim, bits }, generator: generator);
    }

    /// <summary>Bucket of every vector in every round.</summary>
    /// <param name="x">(B, H, T, D) vectors.</param>
    /// <param name="planes">(H or 1, R, D, bits).</param>
    /// <returns>(B, H, R, T) int64 buckets in [0, 2^bits).</returns>
    public static Tensor Buckets(Tensor x, Tensor planes)
    {
        Check.Shape(x, nameof(x), "(B, H, T, D)", -1, -1, -1, -1);
        Check.FloatingPoint(x, nameof(x));
        Check.Shape(planes, nameof(planes), "(H or 1, R, D, bits)", -1, -1, x.shape[3], -1);
        Check.That(planes.shape[0] == 1 || planes.shape[0] == x.shape[1], nameof(planes),
            $"first dimension must be 1 or H = {x.shape[1]}, got {Check.ShapeOf(planes)}.");
        using var scope = NewDisposeScope();
        long batch = x.shape[0], heads = x.shape[1], seqLen = x.shape[2], dim = x.shape[3];
        long rounds = planes.shape[1], bits = planes.shape[3];
        var flat = planes.to(x.dtype).to(x.device).permute(0, 2, 1, 3).reshape(planes.shape[0], dim, rounds * bits);   // (Hr, D, R·bits)
        var projected = matmul(x.detach(), flat).view(batch, heads, seqLen, rounds, bits).permute(0, 1, 3, 2, 4);   // (B, H, R, T, bits)
        var weights = tensor(Enumerable.Range(0, (int)bits).Select(i => 1L << i).ToArray(), device: x.device);     // (bits)
        return (projected.ge(0).to(ScalarType.Int64) * weights).sum(-1).MoveToOuterDisposeScope();      // (B, H, R, T)
    }
}
