using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using SparseAttention.Kernels;
using SparseAttention.Kernels.Fused;
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
    /// <remarks>float32 CPU input is hashed by a fused kernel (argmax of |x·R| with its sign, no rotated tensor); a token's
    /// bucket is then bit-identical whether it is hashed inside a long sequence or alone, on any number of threads
    /// (what incremental decoding relies on). Other inputs use tensor ops.</remarks>
    public static Tensor Buckets(Tensor x, Tensor rotations)
    {
        Check.Shape(x, nameof(x), "(B, H, T, D)", -1, -1, -1, -1);
        Check.FloatingPoint(x, nameof(x));
        Check.Shape(rotations, nameof(rotations), "(H or 1, R, D, nBuckets / 2)", -1, -1, x.shape[3], -1);
        Check.That(rotations.shape[0] == 1 || rotations.shape[0] == x.shape[1], nameof(rotations),
            $"first dimension must be 1 or H = {x.shape[1]}, got {Check.ShapeOf(rotations)}.");
        if (x.dtype == ScalarType.Float32 && x.device.type == DeviceType.CPU && rotations.device.type == DeviceType.CPU)
            return FusedAngularHash.Buckets(x, rotations, FusedBlockSparseAttention.DefaultThreads);
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
/// Angular LSH of float32 CPU vectors in one pass: each token is projected on every round's rotation columns by
/// <see cref="TokenProjection"/> and its bucket is the argmax of [x·R; −x·R] read off x·R alone (largest |x·R_j|: j when
/// positive, half + j when negative; first index on ties, like argmax), so neither the rotated tensor, its negation nor
/// their concatenation is built.
/// </summary>
internal static unsafe class FusedAngularHash
{
    private const int TaskTokens = 1024;   // tokens per task (the hash of a token does not depend on the partition)

    /// <param name="x">(B, H, T, D) float32 CPU.</param>
    /// <param name="rotations">(H or 1, R, D, half).</param>
    /// <param name="threads">Worker threads.</param>
    /// <returns>(B, H, R, T) int64.</returns>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static Tensor Buckets(Tensor x, Tensor rotations, int threads)
    {
        using var scope = NewDisposeScope();
        var input = x.detach().contiguous();
        var rot = rotations.detach().to(ScalarType.Float32).contiguous();
        int batch = (int)x.shape[0], heads = (int)x.shape[1], seqLen = (int)x.shape[2], dim = (int)x.shape[3];
        int rotationHeads = (int)rot.shape[0], rounds = (int)rot.shape[1], half = (int)rot.shape[3];
        int columns = rounds * half, padded = TokenProjection.PaddedColumns(columns, SimdWidth.Bits / 32);
        // Every round's columns side by side: (Hr, D, Cp), zero beyond R·half.
        var table = new float[(long)rotationHeads * dim * padded];
        float* r0 = (float*)FusedBlockSparseAttention.Pointer(rot);
        for (int hr = 0; hr < rotationHeads; hr++)
            for (int r = 0; r < rounds; r++)
                for (int d = 0; d < dim; d++)
                    new Span<float>(r0 + (((long)hr * rounds + r) * dim + d) * half, half)
                        .CopyTo(table.AsSpan((int)(((long)hr * dim + d) * padded + (long)r * half), half));
        var buckets = empty(new long[] { batch, heads, rounds, seqLen }, dtype: ScalarType.Int64);   // (B, H, R, T)
        float* xs = (float*)FusedBlockSparseAttention.Pointer(input);
        long* output = (long*)FusedBlockSparseAttention.Pointer(buckets);
        int chunks = (seqLen + TaskTokens - 1) / TaskTokens;
        fixed (float* tablePointer = table)
        {
            float* tp = tablePointer;
            Parallel.For(0, batch * heads * chunks, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, threads) }, task =>
            {
                int row = task / chunks, chunk = task % chunks, head = row % heads;
                int t0 = chunk * TaskTokens, t1 = Math.Min(seqLen, t0 + TaskTokens);
                float* rowTable = tp + (long)(rotationHeads == 1 ? 0 : head) * dim * padded;
                float* rowX = xs + (long)row * seqLen * dim;
                long* rowOut = output + (long)row * rounds * seqLen;
                var call = new HashCall(rowX, dim, t0, t1, seqLen, rowTable, padded, rounds, half, rowOut);
                SimdWidth.Run(ref call);
            });
        }
        GC.KeepAlive(input); GC.KeepAlive(rot); GC.KeepAlive(buckets);
        return buckets.MoveToOuterDisposeScope();
    }

    private readonly struct HashCall(float* x, int dim, int t0, int t1, int seqLen, float* table, int padded, int rounds, int half, long* output)
        : ISimdKernel
    {
        public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged =>
            HashTokens<TS, TV>(x, dim, t0, t1, seqLen, table, padded, rounds, half, output);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void HashTokens<TS, TV>(float* x, int dim, int t0, int t1, int seqLen, float* table, int padded, int rounds, int half, long* output)
        where TS : ISimd<TV> where TV : unmanaged
    {
        const int tile = TokenProjection.Rows;
        var buffer = ArrayPool<float>.Shared.Rent(tile * (dim + padded));          // heap: many buckets would overflow a stack
        fixed (float* rows = buffer)
        {
            float* projected = rows + tile * dim;
            for (int t = t0; t < t1; t += tile)
            {
                int n = Math.Min(tile, t1 - t);
                new Span<float>(x + (long)t * dim, n * dim).CopyTo(new Span<float>(rows, n * dim));
                if (n < tile) new Span<float>(rows + n * dim, (tile - n) * dim).Clear();
                TokenProjection.Project4<TS, TV>(rows, dim, table, padded, projected);
                for (int i = 0; i < n; i++)
                    for (int r = 0; r < rounds; r++)
                        output[(long)r * seqLen + t + i] = SignedArgMax(projected + (long)i * padded + (long)r * half, half);
            }
        }
        ArrayPool<float>.Shared.Return(buffer);
    }

    /// <summary>argmax over [a; −a] (2·n values) from a alone: first index of the largest, a NaN counting as largest.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    internal static int SignedArgMax(float* a, int n)
    {
        int j = 0;
        float best = float.NegativeInfinity;                                            // max |a_j|
        if (Vector512.IsHardwareAccelerated && n >= 16)
        {
            var m = Vector512.Create(float.NegativeInfinity);
            for (; j + 16 <= n; j += 16)
            {
                var v = Vector512.Load(a + j);
                if (!Vector512.EqualsAll(v, v)) return FirstNaN(a, n);
                m = Vector512.Max(m, Vector512.Abs(v));
            }
            best = Simd512.ReduceMax(m);
        }
        for (; j < n; j++)
        {
            if (float.IsNaN(a[j])) return FirstNaN(a, n);
            best = MathF.Max(best, MathF.Abs(a[j]));
        }
        int at = FirstEqual(a, n, best, 1f);
        return at >= 0 ? at : n + FirstEqual(a, n, best, -1f);
    }

    private static int FirstNaN(float* a, int n)
    {
        for (int j = 0; j < n; j++) if (float.IsNaN(a[j])) return j;                   // argmax returns the first NaN
        return 0;
    }

    /// <summary>First j with sign·a[j] == value, −1 if none.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int FirstEqual(float* a, int n, float value, float sign)
    {
        int j = 0;
        if (Vector512.IsHardwareAccelerated)
        {
            var target = Vector512.Create(value * sign);                               // sign·a == v ⇔ a == sign·v
            for (; j + 16 <= n; j += 16)
            {
                ulong hit = Vector512.Equals(Vector512.Load(a + j), target).ExtractMostSignificantBits();
                if (hit != 0) return j + System.Numerics.BitOperations.TrailingZeroCount(hit);
            }
        }
        for (; j < n; j++) if (sign * a[j] == value) return j;
        return -1;
    }
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
