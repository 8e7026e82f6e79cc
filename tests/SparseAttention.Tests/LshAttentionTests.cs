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
}
