using SparseAttention.Hashing;
using SparseAttention.Kernels;
using SparseAttention.Modules;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class LshAttentionTests
{
    private const int Dim = 4;

    private static Tensor? PaddingMask(long batch, long seqLen, bool padded)
    {
        if (!padded) return null;
        var mask = ones(batch, seqLen, dtype: ScalarType.Bool);
        mask[0, Math.Min(2, seqLen - 1)] = tensor(false);
        if (batch > 1 && seqLen >= 5) mask[batch - 1, (int)(seqLen - 3)..] = tensor(false);
        return mask;
    }

    /// <summary>
    /// The test's own reading of the LSH rules: how many rounds allow each (query, key) pair, (B, H, T, T), derived from
    /// the buckets alone with LINQ sorts and counting (the module uses index tensors and a kernel).
    /// </summary>
    internal static Tensor ImpliedCounts(Tensor queryBuckets, Tensor keyBuckets, Tensor? keyMask, int bucketSize,
        bool causal, bool sharedQk, bool acrossBuckets, bool dedup)
    {
        long batch = queryBuckets.shape[0], heads = queryBuckets.shape[1], rounds = queryBuckets.shape[2], T = queryBuckets.shape[3];
        int w = (int)Math.Min(bucketSize, T);
        var counts = new double[batch * heads * T * T];
        for (int b = 0; b < batch; b++)
        for (int h = 0; h < heads; h++)
        for (int r = 0; r < rounds; r++)
        {
            long[] qb = Enumerable.Range(0, (int)T).Select(t => queryBuckets[b, h, r, t].item<long>()).ToArray();
            long[] kb = Enumerable.Range(0, (int)T).Select(t => keyBuckets[b, h, r, t].item<long>()).ToArray();
            bool[] real = Enumerable.Range(0, (int)T).Select(t => keyMask is null || keyMask[b, t].item<bool>()).ToArray();
            var realPos = Enumerable.Range(0, (int)T).Where(t => real[t]).ToList();
            bool Allowed(int i, int j)
            {
                if (!real[i] || !real[j] || (causal && j > i) || (sharedQk && i == j)) return false;
                if ((!acrossBuckets || causal) && qb[i] != kb[j]) return false;
                if (!causal)
                {
                    var qOrder = realPos.OrderBy(t => qb[t]).ThenBy(t => t).ToList();
                    var kOrder = realPos.OrderBy(t => kb[t]).ThenBy(t => t).ToList();
                    int qc = qOrder.IndexOf(i) / w, kc = kOrder.IndexOf(j) / w;
                    return kc == qc || kc == qc - 1;
                }
                // Causal: chunks per bucket by rank among earlier keys; the query sits in the chunk of the latest key ≤ i.
                int n = realPos.Count(t => t <= i && kb[t] == qb[i]);
                if (n == 0) return false;
                int chunk = (n - 1) / w, keyChunk = realPos.Count(t => t < j && kb[t] == kb[j]) / w;
                return keyChunk == chunk || keyChunk == chunk - 1;
            }
            for (int i = 0; i < T; i++)
                for (int j = 0; j < T; j++)
                    if (Allowed(i, j)) counts[((b * heads + h) * T + i) * T + j] += 1;
        }
        var result = tensor(counts, new long[] { batch, heads, T, T }, dtype: ScalarType.Float64);
        return dedup ? result.clamp_max(1) : result;
    }

    /// <summary>The oracle: one dense softmax over the implied multiset (score + log count), self as the last resort.</summary>
    internal static Tensor Oracle(Tensor q, Tensor k, Tensor v, Tensor counts, Tensor? keyMask, bool sharedQk)
    {
        long batch = q.shape[0], T = q.shape[2];
        var mask = counts.gt(0);                                                         // (B, H, T, T)
        if (sharedQk)
        {
            var alone = mask.any(-1).logical_not();                                      // (B, H, T)
            if (keyMask is not null) alone = alone.logical_and(keyMask.view(batch, 1, T));
            mask = mask.logical_or(alone.unsqueeze(-1).logical_and(eye(T, dtype: ScalarType.Bool)));
        }
        var bias = counts.clamp_min(1).log().to(q.dtype);
        return ReferenceAttention.Attention(q, k, v, mask, keyMask: keyMask, bias: bias);
    }

    /// <summary>Output and gradients (for q, k if used, v) of sum(output · upstream).</summary>
    internal static (Tensor Output, Tensor Dq, Tensor? Dk, Tensor Dv) Run(Func<Tensor, Tensor, Tensor, Tensor> attention,
        Tensor q, Tensor k, Tensor v, Tensor upstream)
    {
        var (q2, k2, v2) = (q.detach().clone().requires_grad_(true), k.detach().clone().requires_grad_(true), v.detach().clone().requires_grad_(true));
        var output = attention(q2, k2, v2);
        (output * upstream).sum().backward();
        return (output.detach(), q2.grad!.detach(), k2.grad?.detach(), v2.grad!.detach());
    }

    public static TheoryData<bool, int, bool, bool, int, int, int, int, bool> Cases => new()
    {
        // causal, nHashes, dedup, across, T, bucketSize, batch, heads, padded
        { false, 1, false, true, 13, 4, 2, 2, false },
        { true, 1, false, true, 13, 4, 2, 2, true },
        { false, 3, false, true, 17, 4, 2, 2, true },
        { false, 3, true, true, 17, 4, 1, 2, false },
        { true, 3, true, false, 18, 4, 2, 1, true },
        { true, 2, false, true, 11, 3, 2, 2, false },
        { false, 2, false, false, 10, 3, 2, 2, true },
        { false, 2, true, false, 9, 4, 1, 1, false },
        { true, 2, true, true, 1, 4, 2, 2, false },
        { false, 2, false, true, 1, 4, 1, 1, false },
        { false, 1, false, true, 6, 8, 2, 1, false },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void SharedQkEqualsOracleWithImpliedMask(bool causal, int nHashes, bool dedup, bool across, int T, int bucketSize, int batch, int heads, bool padded)
    {
        var module = new LshAttention(heads, Dim, maxSeqLen: 32, bucketSize, nHashes, nBuckets: 4, causal: causal,
            attendAcrossBuckets: across, dedup: dedup, seed: 7) { Kernel = AttentionKernel.Ops };
        module.to(ScalarType.Float64);
        var (q, _, v) = TestSupport.RandomQkv(batch, heads, T, Dim, seed: 11 + T);
        var keyMask = PaddingMask(batch, T, padded);
        var result = module.forward(q, null, v, keyMask);
        var counts = ImpliedCounts(result.QueryBuckets, result.KeyBuckets, keyMask, bucketSize, causal, sharedQk: true, across, dedup);
        var upstream = randn(new long[] { batch, heads, T, Dim }, dtype: ScalarType.Float64, generator: new Generator(5));
        var actual = Run((q2, _, v2) => module.forward(q2, null, v2, keyMask).Output, q, q, v, upstream);
        var expected = Run((q2, _, v2) =>
        {
            var keys = q2 / q2.norm(-1, keepdim: true).clamp_min(1e-6);
            var o = Oracle(q2, keys, v2, counts, keyMask, sharedQk: true);
            return keyMask is null ? o : o.masked_fill(keyMask.logical_not().view(batch, 1, T, 1), 0);
        }, q, q, v, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
        if (T > 4 && !padded) Assert.True(counts.gt(0).sum().item<long>() < batch * heads * T * T, "the pattern should be sparse");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void FusedKernelEqualsOpsKernel(bool causal, int nHashes, bool dedup, bool across, int T, int bucketSize, int batch, int heads, bool padded)
    {
        LshAttention Make(AttentionKernel kernel) => new(heads, Dim, maxSeqLen: 32, bucketSize, nHashes, nBuckets: 4, causal: causal,
            attendAcrossBuckets: across, dedup: dedup, seed: 7) { Kernel = kernel };
        var fused = Make(AttentionKernel.Fused);
        var ops = Make(AttentionKernel.Ops);
        var (q, _, v) = TestSupport.RandomQkv(batch, heads, T, Dim, seed: 21 + T, dtype: ScalarType.Float32);
        var keyMask = PaddingMask(batch, T, padded);
        if (keyMask is not null)                                                          // NaN in padding must not leak
            v = v.detach().masked_fill(keyMask.logical_not().view(batch, 1, T, 1), double.NaN).requires_grad_(true);
        var upstream = randn(new long[] { batch, heads, T, Dim }, generator: new Generator(5));
        var expected = Run((q2, _, v2) => ops.forward(q2, null, v2, keyMask).Output, q, q, v, upstream);
        var actual = Run((q2, _, v2) => fused.forward(q2, null, v2, keyMask).Output, q, q, v, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        if (keyMask is null) TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
        else TestSupport.AssertClose(expected.Dv.masked_fill(keyMask.logical_not().view(batch, 1, T, 1), 0),
                                     actual.Dv.nan_to_num().masked_fill(keyMask.logical_not().view(batch, 1, T, 1), 0), "dv");
    }

    [Theory]
    [InlineData(AlshTransform.SimpleLsh, false, false, 2, false, AttentionKernel.Ops)]
    [InlineData(AlshTransform.Xbox, true, true, 2, true, AttentionKernel.Ops)]
    [InlineData(AlshTransform.SignAlsh, false, true, 3, true, AttentionKernel.Ops)]
    [InlineData(AlshTransform.SignAlsh, true, false, 1, false, AttentionKernel.Ops)]
    [InlineData(AlshTransform.Xbox, false, false, 3, true, AttentionKernel.Fused)]
    [InlineData(AlshTransform.SimpleLsh, true, true, 2, false, AttentionKernel.Fused)]
    public void AlshEqualsOracleWithImpliedMask(AlshTransform transform, bool causal, bool dedup, int nHashes, bool across, AttentionKernel kernel)
    {
        const int batch = 2, heads = 2, T = 15, bucketSize = 4;
        var module = new LshAttention(heads, Dim, maxSeqLen: 32, bucketSize, nHashes, nBuckets: 4, causal: causal,
            attendAcrossBuckets: across, dedup: dedup, alsh: transform, queryNormalizedFirst: causal, seed: 9) { Kernel = kernel };
        var dtype = kernel == AttentionKernel.Fused ? ScalarType.Float32 : ScalarType.Float64;
        module.to(dtype);
        var (q, k, v) = TestSupport.RandomQkv(batch, heads, T, Dim, seed: 31, dtype: dtype);
        var keyMask = PaddingMask(batch, T, true);
        var result = module.forward(q, k, v, keyMask);
        Assert.False(result.QueryBuckets.equal(result.KeyBuckets).all().item<bool>(), "queries and keys are hashed separately");
        var counts = ImpliedCounts(result.QueryBuckets, result.KeyBuckets, keyMask, bucketSize, causal, sharedQk: false, across, dedup);
        var upstream = randn(new long[] { batch, heads, T, Dim }, dtype: dtype, generator: new Generator(5));
        var actual = Run((q2, k2, v2) => module.forward(q2, k2, v2, keyMask).Output, q, k, v, upstream);
        var expected = Run((q2, k2, v2) => Oracle(q2, k2, v2, counts, keyMask, sharedQk: false)
            .masked_fill(keyMask!.logical_not().view(batch, 1, T, 1), 0), q, k, v, upstream);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        TestSupport.AssertClose(expected.Dq, actual.Dq, "dq");
        TestSupport.AssertClose(expected.Dk!, actual.Dk!, "dk");
        TestSupport.AssertClose(expected.Dv, actual.Dv, "dv");
    }

    [Fact]
    public void RoundsMergeEqualsOneSoftmaxOverTheUnion()
    {
        // Each round alone (its own dense mask, oracle), merged by log-sum-exp weights, equals the module's output,
        // which in turn equals one softmax over the multiset union (the Oracle used above).
        const int batch = 1, heads = 2, T = 16, rounds = 3, bucketSize = 4;
        var module = new LshAttention(heads, Dim, maxSeqLen: 32, bucketSize, rounds, nBuckets: 4, seed: 4) { Kernel = AttentionKernel.Ops };
        module.to(ScalarType.Float64);
        var (q, _, v) = TestSupport.RandomQkv(batch, heads, T, Dim, seed: 8);
        var result = module.forward(q, null, v);
        var keys = q / q.norm(-1, keepdim: true).clamp_min(1e-6);
        var outputs = new List<Tensor>();
        var lses = new List<Tensor>();
        for (int r = 0; r < rounds; r++)
        {
            var qb = result.QueryBuckets.narrow(2, r, 1);
            var mask = ImpliedCounts(qb, qb, null, bucketSize, false, true, true, false).gt(0);   // (B, H, T, T)
            Assert.True(mask.any(-1).all().item<bool>(), "every token has a key in every round here");
            var scores = matmul(q, keys.transpose(-1, -2)) / Math.Sqrt(Dim);
            lses.Add(scores.masked_fill(mask.logical_not(), double.NegativeInfinity).logsumexp(-1));   // (B, H, T)
            outputs.Add(ReferenceAttention.Attention(q, keys, v, mask));
        }
        var lse = stack(lses, 0);                                                         // (R, B, H, T)
        var weights = (lse - lse.logsumexp(0, keepdim: true)).exp().unsqueeze(-1);       // (R, B, H, T, 1)
        var merged = (weights * stack(outputs, 0)).sum(0L);                              // (B, H, T, D)
        TestSupport.AssertClose(merged, result.Output, "LSE merge of the rounds vs module");
        var counts = ImpliedCounts(result.QueryBuckets, result.KeyBuckets, null, bucketSize, false, true, true, false);
        Assert.True(counts.gt(1).any().item<bool>(), "some pair should be attended in several rounds");
        TestSupport.AssertClose(Oracle(q, keys, v, counts, null, true), merged, "one softmax over the union vs LSE merge");
    }

    [Theory]
    [InlineData(1, false, AttentionKernel.Ops)]
    [InlineData(3, true, AttentionKernel.Fused)]
    [InlineData(2, false, AttentionKernel.Fused)]
    public void CausalOutputsDoNotDependOnLaterTokens(int nHashes, bool dedup, AttentionKernel kernel)
    {
        const int batch = 2, heads = 2, T = 24, bucketSize = 3;
        var module = new LshAttention(heads, Dim, maxSeqLen: 32, bucketSize, nHashes, nBuckets: 4, causal: true, dedup: dedup, seed: 2) { Kernel = kernel };
        var (q, _, v) = TestSupport.RandomQkv(batch, heads, T, Dim, seed: 3, dtype: ScalarType.Float32);
        var baseline = module.forward(q.detach(), null, v.detach()).Output;
        var gen = new Generator(77);
        foreach (int t in new[] { 0, 5, 11, 22 })
        {
            var q2 = q.detach().clone();
            var v2 = v.detach().clone();
            q2[.., .., (t + 1)..] = randn(new long[] { batch, heads, T - t - 1, Dim }, generator: gen) * 3;
            v2[.., .., (t + 1)..] = randn(new long[] { batch, heads, T - t - 1, Dim }, generator: gen);
            var changed = module.forward(q2, null, v2);
            TestSupport.AssertClose(baseline.narrow(2, 0, t + 1), changed.Output.narrow(2, 0, t + 1), $"outputs ≤ {t}");
            Assert.False(changed.Output.narrow(2, t + 1, T - t - 1).allclose(baseline.narrow(2, t + 1, T - t - 1)), "the perturbation must change later outputs");
        }
    }

    [Fact]
    public void AngularCollisionRateGrowsWithCosineSimilarity()
    {
        // Pairs of unit vectors at a fixed cosine similarity; one rotation per pair-set, 8 buckets.
        const int pairs = 2000, dim = 16;
        var gen = new Generator(123);
        var rotations = AngularLsh.Rotations(1, 1, dim, 8, gen);
        var rates = new List<double>();
        foreach (double cos in new[] { 0.0, 0.5, 0.8, 0.95 })
        {
            var a = nn.functional.normalize(randn(new long[] { pairs, dim }, generator: gen), p: 2, dim: -1);
            var noise = randn(new long[] { pairs, dim }, generator: gen);
            noise = nn.functional.normalize(noise - (noise * a).sum(-1, keepdim: true) * a, p: 2, dim: -1);   // ⟂ a
            var b = a * cos + noise * Math.Sqrt(1 - cos * cos);
            var buckets = AngularLsh.Buckets(stack([a, b], 0).unsqueeze(0), rotations);  // (1, 2, 1, pairs)
            rates.Add(buckets[0, 0, 0].eq(buckets[0, 1, 0]).to(ScalarType.Float64).mean().item<double>());
        }
        for (int i = 1; i < rates.Count; i++)
            Assert.True(rates[i] > rates[i - 1] + 0.05, $"collision rates should grow with similarity: {string.Join(", ", rates.Select(r => r.ToString("F3")))}");
        Assert.InRange(rates[0], 0.0, 0.3);   // orthogonal vectors rarely share one of 8 buckets
    }

    [Fact]
    public void RotationsAreFixedUnderASeedAndFreshOnlyWhenAsked()
    {
        var (q, _, v) = TestSupport.RandomQkv(1, 2, 12, Dim, seed: 1, dtype: ScalarType.Float32);
        var a = new LshAttention(2, Dim, 32, 4, 2, seed: 5);
        var b = new LshAttention(2, Dim, 32, 4, 2, seed: 5);
        Assert.True(a.Rotations.equal(b.Rotations).all().item<bool>());
        Assert.True(a.forward(q, null, v).QueryBuckets.equal(a.forward(q, null, v).QueryBuckets).all().item<bool>());
        var fresh = new LshAttention(2, Dim, 32, 4, 2, nBuckets: 8, freshRotations: true, seed: 5);
        fresh.train();
        var first = fresh.forward(q, null, v).QueryBuckets;
        Assert.False(first.equal(fresh.forward(q, null, v).QueryBuckets).all().item<bool>(), "training forwards draw new rotations");
        fresh.eval();
        Assert.True(fresh.forward(q, null, v).QueryBuckets.equal(fresh.forward(q, null, v).QueryBuckets).all().item<bool>());
        var shared = new LshAttention(3, Dim, 32, 4, 2, perHeadRotations: false);
        Assert.Equal(1, shared.Rotations.shape[0]);
    }

    [Fact]
    public void BadArgumentsAreRejected()
    {
        Assert.Throws<ArgumentException>(() => new LshAttention(2, Dim, 32, 4, nBuckets: 5));
        Assert.Throws<ArgumentException>(() => new LshAttention(2, Dim, 32, 4, nBuckets: 6, alsh: AlshTransform.Xbox));
        Assert.Throws<ArgumentException>(() => new LshAttention(2, Dim, 32, 0));
        Assert.Throws<ArgumentException>(() => new LshAttention(2, Dim, 32, 4, queryNormalizedFirst: true));
        var module = new LshAttention(2, Dim, 8, 4);
        var (q, k, v) = TestSupport.RandomQkv(1, 2, 12, Dim, seed: 1, dtype: ScalarType.Float32);
        var e = Assert.Throws<ArgumentException>(() => module.forward(q, null, v));
        Assert.Equal("q", e.ParamName);
        var short_ = q.narrow(2, 0, 8);
        Assert.Throws<ArgumentException>(() => module.forward(short_, k.narrow(2, 0, 8), v.narrow(2, 0, 8)));
    }

    [Theory]
    [InlineData(false, true, null)]
    [InlineData(true, true, null)]
    [InlineData(false, false, null)]
    [InlineData(false, false, AlshTransform.SignAlsh)]
    [InlineData(true, true, AlshTransform.SimpleLsh)]
    public void AttendedMaskMatchesTheImpliedMask(bool causal, bool across, AlshTransform? alsh)
    {
        const int batch = 2, heads = 2, T = 19, bucketSize = 4;
        var module = new LshAttention(heads, Dim, 32, bucketSize, 2, nBuckets: 4, causal: causal, attendAcrossBuckets: across, alsh: alsh, seed: 12);
        var (q, k, v) = TestSupport.RandomQkv(batch, heads, T, Dim, seed: 6, dtype: ScalarType.Float32);
        var keyMask = PaddingMask(batch, T, true);
        var result = module.forward(q, alsh is null ? null : k, v, keyMask);
        var counts = ImpliedCounts(result.QueryBuckets, result.KeyBuckets, keyMask, bucketSize, causal, alsh is null, across, false);
        var expected = counts.gt(0);
        if (alsh is null)
        {
            var alone = expected.any(-1).logical_not().logical_and(keyMask!.view(batch, 1, T));
            expected = expected.logical_or(alone.unsqueeze(-1).logical_and(eye(T, dtype: ScalarType.Bool)));
        }
        Assert.True(expected.equal(module.AttendedMask(result, keyMask)).all().item<bool>());
    }

    [Fact]
    public void PatternCommandShowsLshBucketsAndTheImpliedMask()
    {
        var (code, stdout, stderr) = CliRunner.Run("pattern", "--kind", "lsh", "--seq-len", "24", "--block", "4", "--n-hashes", "2", "--seed", "1");
        Assert.True(code == 0, stderr);
        Assert.Contains("head 0 round 1 buckets: ", stdout);
        Assert.Contains("token-level mask", stdout);
        var row = stdout.Split('\n').First(l => l.StartsWith("head 0 round 0 buckets: "))["head 0 round 0 buckets: ".Length..].Trim();
        Assert.Equal(24, row.Length);
        string png = Path.Combine(Path.GetTempPath(), $"lsh-{Guid.NewGuid():N}.png");
        try
        {
            (code, stdout, stderr) = CliRunner.Run("pattern", "--kind", "lsh", "--seq-len", "64", "--alsh", "Xbox", "--bidirectional", "--format", "png", "--out", png);
            Assert.True(code == 0, stderr);
            Assert.True(new FileInfo(png).Length > 1000);
        }
        finally { File.Delete(png); }
        (code, _, stderr) = CliRunner.Run("pattern", "--kind", "lsh", "--alsh", "Nope");
        Assert.NotEqual(0, code);
        Assert.Contains("--alsh", stderr);
        (code, _, stderr) = CliRunner.Run("pattern", "--kind", "local", "--n-hashes", "2");
        Assert.NotEqual(0, code);
        Assert.Contains("--n-hashes does not apply", stderr);
    }
}
