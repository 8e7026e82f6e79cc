using SparseAttention.Clustering;
using SparseAttention.Hashing;
using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Incremental decoding routes one new token at a time, so a token's k-means nearest centroid and LSH bucket must be
/// bit-identical whether computed inside a long sequence or for that token alone (a length-1 sequence), on any number
/// of threads. The centroids / rotations here come in near-identical twins, so the argmax of many tokens hinges on the
/// last bits of the dot products: any change of summation order with the sequence length or the partition would show.
/// Also: the fused hash against a float64 argmax over [xR; −xR], a very large cluster count (no stack buffer), and the
/// two sorts of the LSH chunking agreeing.
/// </summary>
public class AssignmentInvarianceTests
{
    private static readonly int[] Lengths = [1, 3, 37, 1030, 2100];
    private static readonly int[] Threads = [1, 2, 3];
    private static readonly int[] Probe = [0, 1, 2, 36, 511, 1023, 1024, 1029, 2099];

    /// <summary>(rows, D) random vectors, each odd row a copy of the one before scaled by (1 + 1e-7) plus 1e-7 noise.</summary>
    private static Tensor Twins(Generator gen, long rows, long dim)
    {
        var x = randn(new[] { rows, dim }, generator: gen);
        var near = x.narrow(0, 0, rows / 2 * 2).view(rows / 2, 2, dim);
        near.select(1, 1).copy_(near.select(1, 0) * (1 + 1e-7) + 1e-7 * randn(new[] { rows / 2, dim }, generator: gen));
        return x;
    }

    /// <summary>The data is tie-sensitive: float64 picks a different argmax than the float32 kernel for some tokens.</summary>
    private static void AssertTieSensitive(Tensor fused, Tensor float64, string what) =>
        Assert.True(fused.ne(float64).any().item<bool>(), $"{what}: test data has no near ties, so it could not detect a change of summation order");

    [Fact]
    public void KMeansNearestOfATokenDoesNotDependOnLengthOrThreads()
    {
        const int heads = 2, dim = 24, clusters = 40;
        var gen = new Generator(41);
        var centroids = nn.functional.normalize(Twins(gen, heads * clusters, dim), 2, -1).view(heads, clusters, dim);   // (H, C, D)
        // Tokens right between twin centroids: x = the first twin + tiny noise.
        var pick = randint(0, clusters / 2, new long[] { heads, Lengths.Max() }, generator: gen) * 2;                     // (H, T)
        var x = centroids.gather(1, pick.unsqueeze(-1).expand(heads, -1, dim)).unsqueeze(0)
                + 1e-7 * randn(new long[] { 1, heads, Lengths.Max(), dim }, generator: gen);                          // (1, H, T, D)
        var full = FusedKMeansAssign.Assign(x, null, centroids, KMeansNorm.L2, threads: 2).Nearest;                     // (1, H, T)
        var exact = einsum("bhtd,hcd->bhtc", nn.functional.normalize(x.to(ScalarType.Float64), 2, -1), centroids.to(ScalarType.Float64)).argmax(-1);
        AssertTieSensitive(full, exact, "k-means");
        foreach (int length in Lengths)
            foreach (int threads in Threads)
            {
                var prefix = FusedKMeansAssign.Assign(x.narrow(2, 0, length), null, centroids, KMeansNorm.L2, threads).Nearest;
                Assert.True(prefix.equal(full.narrow(2, 0, length)).all().item<bool>(), $"T={length}, threads={threads}");
            }
        foreach (int t in Probe)
        {
            var alone = FusedKMeansAssign.Assign(x.narrow(2, t, 1), null, centroids, KMeansNorm.L2, threads: 1).Nearest;   // (1, H, 1)
            Assert.True(alone.equal(full.narrow(2, t, 1)).all().item<bool>(), $"token {t} alone");
        }
    }

    private static Tensor Float64Buckets(Tensor x, Tensor rotations)
    {
        var rot = rotations.to(ScalarType.Float64);                                      // (Hr, R, D, half)
        var rotated = einsum("bhtd,hrdn->bhrtn", x.to(ScalarType.Float64), rot.expand(x.shape[1], -1, -1, -1));
        return cat([rotated, rotated.neg()], -1).argmax(-1);                             // (B, H, R, T)
    }

    [Fact]
    public void LshBucketOfATokenDoesNotDependOnLengthOrThreads()
    {
        const int heads = 2, rounds = 2, dim = 16, half = 24;
        var gen = new Generator(43);
        // Rotation columns in twins, so |x·R_j| and |x·R_j'| nearly tie for every token.
        var rotations = Twins(gen, heads * rounds * half, dim).view(heads, rounds, half, dim).transpose(2, 3).contiguous();   // (H, R, D, half)
        var x = randn(new long[] { 1, heads, Lengths.Max(), dim }, generator: gen);
        var full = FusedAngularHash.Buckets(x, rotations, threads: 2);                   // (1, H, R, T)
        AssertTieSensitive(full, Float64Buckets(x, rotations), "LSH");
        foreach (int length in Lengths)
            foreach (int threads in Threads)
            {
                var prefix = FusedAngularHash.Buckets(x.narrow(2, 0, length), rotations, threads);
                Assert.True(prefix.equal(full.narrow(3, 0, length)).all().item<bool>(), $"T={length}, threads={threads}");
            }
        foreach (int t in Probe)
            Assert.True(AngularLsh.Buckets(x.narrow(2, t, 1), rotations).equal(full.narrow(3, t, 1)).all().item<bool>(), $"token {t} alone");
    }

    [Fact]
    public void LshModuleBucketsATokenAloneAsInTheSequence()
    {
        // Through the module (normalisation included): the buckets of a full forward equal those of each token's own
        // length-1 forward.
        const int heads = 2, dim = 16, seqLen = 300;
        using var lsh = new LshAttention(heads, dim, maxSeqLen: seqLen, bucketSize: 16, nHashes: 2, causal: true, seed: 5);
        var gen = new Generator(47);
        var q = randn(new long[] { 1, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { 1, heads, seqLen, dim }, generator: gen);
        var full = lsh.forward(q, null, v).QueryBuckets;                                // (1, H, R, T)
        foreach (int t in new[] { 0, 1, 17, 150, 299 })
        {
            var alone = lsh.forward(q.narrow(2, t, 1), null, v.narrow(2, t, 1)).QueryBuckets;
            Assert.True(alone.equal(full.narrow(3, t, 1)).all().item<bool>(), $"token {t}");
        }
    }

    [Theory]
    [InlineData(1, 3, 7, 5)]        // shared rotations, half not a multiple of the vector width
    [InlineData(3, 2, 64, 64)]      // per-head rotations, the benchmark's shape
    public void FusedHashEqualsFloat64ArgmaxOfBothSigns(int rotationHeads, int rounds, int dim, int half)
    {
        const int batch = 2, heads = 3, seqLen = 301;
        var gen = new Generator(53);
        var rotations = randn(new long[] { rotationHeads, rounds, dim, half }, generator: gen);
        var x = randn(new long[] { batch, heads, seqLen, dim }, generator: gen);
        var fused = AngularLsh.Buckets(x, rotations);
        var exact = Float64Buckets(x, rotations);
        Assert.Equal(exact.shape, fused.shape);
        var differ = fused.ne(exact);
        if (!differ.any().item<bool>()) return;
        // Only a float32 near tie may pick the other bucket: compare the two buckets' float64 values.
        var rotated = einsum("bhtd,hrdn->bhrtn", x.to(ScalarType.Float64), rotations.to(ScalarType.Float64).expand(heads, -1, -1, -1));
        var both = cat([rotated, rotated.neg()], -1);
        var gap = (both.gather(-1, exact.unsqueeze(-1)) - both.gather(-1, fused.unsqueeze(-1))).squeeze(-1);
        Assert.True(gap.masked_select(differ).max().item<double>() < 1e-5, $"{differ.sum().item<long>()} buckets differ beyond a near tie");
    }

    [Fact]
    public void VeryManyClustersDoNotNeedAStackBuffer()
    {
        // 2^19 centroids: the old 4·C-float stack tile (8 MiB) overflowed a thread-pool thread's stack.
        const int clusters = 1 << 19, dim = 4, seqLen = 9;
        var gen = new Generator(59);
        var centroids = nn.functional.normalize(randn(new long[] { 1, clusters, dim }, generator: gen), 2, -1);
        var x = randn(new long[] { 2, 1, seqLen, dim }, generator: gen);
        var nearest = FusedKMeansAssign.Assign(x, null, centroids, KMeansNorm.L2, threads: 2).Nearest;      // (2, 1, T)
        var sims = einsum("bhtd,hcd->bhtc", nn.functional.normalize(x.to(ScalarType.Float64), 2, -1), centroids.to(ScalarType.Float64));
        var best = sims.amax(-1);                                                                           // (2, 1, T)
        var chosen = sims.gather(-1, nearest.unsqueeze(-1)).squeeze(-1);
        Assert.True((best - chosen).max().item<double>() < 1e-6, "a token was not sent to its nearest centroid");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void CountingSortAndWideBucketSortChunkAlike(bool causal)
    {
        // Buckets in a small range take the counting sort; the same buckets spread over a huge range (an order-keeping
        // map) take the packed-key sort. The chunks must be the same.
        const int batch = 2, heads = 2, rounds = 2, seqLen = 97;
        var gen = new Generator(61);
        var buckets = randint(0, 6, new long[] { batch, heads, rounds, seqLen }, generator: gen);
        var keyBuckets = randint(0, 6, new long[] { batch, heads, rounds, seqLen }, generator: gen);
        var keyMask = rand(new long[] { batch, seqLen }, generator: gen).gt(0.2);
        var wide = buckets * (1L << 33) + 5;
        var wideKeys = keyBuckets * (1L << 33) + 5;
        foreach (var (q, k, qw, kw) in new[] { (buckets, buckets, wide, wide), (buckets, keyBuckets, wide, wideKeys) })
        {
            var small = LshGrouping.Build(q, ReferenceEquals(q, k) ? q : k, keyMask, 8, causal);
            var spread = LshGrouping.Build(qw, ReferenceEquals(qw, kw) ? qw : kw, keyMask, 8, causal);
            Assert.True(small.QueryIndices.equal(spread.QueryIndices).all().item<bool>(), "query chunks");
            Assert.True(small.KeyIndices.equal(spread.KeyIndices).all().item<bool>(), "key chunks");
            Assert.True(small.PreviousGroup.equal(spread.PreviousGroup).all().item<bool>(), "look-back links");
            // And the chunks are sorted by (bucket, position) within each round of the non-causal layout.
            if (!causal && ReferenceEquals(q, k))
            {
                var idx = small.QueryIndices.view(batch, heads, rounds, -1);               // (B, H, R, G/R·W)
                var valid = idx.ge(0);
                var bucketOf = q.gather(3, idx.clamp_min(0));
                var order = (bucketOf * seqLen + idx).view(-1, idx.shape[3]);               // (B·H·R, slots)
                var real = valid.view(-1, idx.shape[3]);
                for (long row = 0; row < order.shape[0]; row++)
                    Assert.True(order[row].masked_select(real[row]).diff().gt(0).all().item<bool>(), "chunks follow (bucket, position) order");
            }
        }
    }
}
