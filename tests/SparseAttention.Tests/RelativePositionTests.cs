using SparseAttention.Kernels;
using SparseAttention.Patterns;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// Relative-position terms (<see cref="ShawRelativePositions"/>, <see cref="AlibiPositions"/>): the dense reference
/// against per-pair loops written out here, then the O(T·W) kernels (block-sparse Ops, grouped Ops) against the dense
/// reference in outputs and in the gradients of q, k, v and the Shaw tables.
/// </summary>
public sealed class RelativePositionTests
{
    private const int MaxDistance = 2;

    private static (Tensor KeyTable, Tensor ValueTable) Tables(long dim, long dimV, long seed)
    {
        var gen = new Generator((ulong)seed);
        return (randn(new long[] { 2 * MaxDistance + 1, dim }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true),
                randn(new long[] { 2 * MaxDistance + 1, dimV }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true));
    }

    /// <summary>softmax over allowed j of (q_i·k_j·s + term(i, j)), times (v_j + valueTerm(j − i)), one pair at a time.</summary>
    private static double[,,,] Naive(Tensor q, Tensor k, Tensor v, bool[,] allowed, Func<int, int, double[], double> scoreTerm,
        Func<int, int, double[]>? valueTerm)
    {
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dim = q.shape[3], dimV = v.shape[3];
        double scale = 1 / Math.Sqrt(dim);
        var qa = q.detach().data<double>().ToArray(); var ka = k.detach().data<double>().ToArray(); var va = v.detach().data<double>().ToArray();
        var result = new double[batch, heads, seqLen, dimV];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < seqLen; i++)
                {
                    var qi = Enumerable.Range(0, (int)dim).Select(d => qa[((b * heads + h) * seqLen + i) * dim + d]).ToArray();
                    var scores = new List<(int J, double S)>();
                    for (int j = 0; j < seqLen; j++)
                    {
                        if (!allowed[i, j]) continue;
                        double dot = 0;
                        for (int d = 0; d < dim; d++) dot += qi[d] * ka[((b * heads + h) * seqLen + j) * dim + d];
                        scores.Add((j, dot * scale + scoreTerm(h, j - i, qi)));
                    }
                    if (scores.Count == 0) continue;
                    double max = scores.Max(x => x.S), total = scores.Sum(x => Math.Exp(x.S - max));
                    foreach (var (j, score) in scores)
                    {
                        double p = Math.Exp(score - max) / total;
                        var extra = valueTerm?.Invoke(j, i);
                        for (int e = 0; e < dimV; e++)
                            result[b, h, i, e] += p * (va[((b * heads + h) * seqLen + j) * dimV + e] + (extra?[e] ?? 0));
                    }
                }
        return result;
    }

    private static bool[,] CausalWindow(int seqLen, int window)
    {
        var allowed = new bool[seqLen, seqLen];
        for (int i = 0; i < seqLen; i++)
            for (int j = 0; j < seqLen; j++) allowed[i, j] = j <= i && i - j < window;
        return allowed;
    }

    private static Tensor ToMask(bool[,] allowed)
    {
        int n = allowed.GetLength(0);
        var flat = new bool[n * n];
        for (int i = 0; i < n; i++) for (int j = 0; j < n; j++) flat[i * n + j] = allowed[i, j];
        return tensor(flat).view(n, n);
    }

    private static void AssertEqualsNaive(double[,,,] expected, Tensor actual)
    {
        var a = actual.detach().data<double>().ToArray();
        int n = 0;
        foreach (double e in expected) { Assert.True(Math.Abs(e - a[n]) < 1e-10, $"element {n}: expected {e}, got {a[n]}"); n++; }
    }

    [Fact]
    public void DenseReferenceWithShawEqualsPerPairLoops()
    {
        const int seqLen = 9, window = 5;
        var (q, k, v) = TestSupport.RandomQkv(2, 3, seqLen, 4, seed: 1);
        var (keyTable, valueTable) = Tables(4, 4, seed: 2);
        var kt = keyTable.detach().data<double>().ToArray(); var vt = valueTable.detach().data<double>().ToArray();
        int Row(int distance) => Math.Clamp(distance, -MaxDistance, MaxDistance) + MaxDistance;
        var allowed = CausalWindow(seqLen, window);
        var expected = Naive(q, k, v, allowed,
            (_, distance, qi) => Enumerable.Range(0, 4).Sum(d => qi[d] * kt[Row(distance) * 4 + d]) / Math.Sqrt(4),
            (j, i) => Enumerable.Range(0, 4).Select(e => vt[Row(j - i) * 4 + e]).ToArray());
        var actual = ReferenceAttention.Attention(q, k, v, ToMask(allowed), relative: new ShawRelativePositions(keyTable, valueTable));
        AssertEqualsNaive(expected, actual);
    }

    [Fact]
    public void DenseReferenceWithAlibiEqualsPerPairLoops()
    {
        const int seqLen = 8;
        var (q, k, v) = TestSupport.RandomQkv(1, 3, seqLen, 4, seed: 3);
        double[] slopes = [0.5, 0.25, 0.125];
        var allowed = new bool[seqLen, seqLen];
        for (int i = 0; i < seqLen; i++) for (int j = 0; j < seqLen; j++) allowed[i, j] = (i + j) % 3 != 1;   // bidirectional, irregular
        var expected = Naive(q, k, v, allowed, (h, distance, _) => -slopes[h] * Math.Abs(distance), null);
        var actual = ReferenceAttention.Attention(q, k, v, ToMask(allowed), relative: new AlibiPositions(slopes));
        AssertEqualsNaive(expected, actual);
    }

    [Fact]
    public void AlibiStandardSlopesFollowThePaper()
    {
        Assert.Equal(Enumerable.Range(1, 8).Select(h => Math.Pow(2, -h)), AlibiPositions.StandardSlopes(8));
        // 6 heads: the 4-head sequence 2^-2, 2^-4, 2^-6, 2^-8, then every other slope of the 8-head one: 2^-1, 2^-3.
        Assert.Equal([0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125], AlibiPositions.StandardSlopes(6));
        Assert.Equal([Math.Pow(2, -8)], AlibiPositions.StandardSlopes(1));
    }

    public static TheoryData<string, int, int, int, int, bool> BlockCases() => new()
    {
        // terms, batch, heads, T, block, padded keys
        { "shaw", 2, 2, 13, 4, false },
        { "shaw", 1, 1, 13, 4, true },
        { "shaw", 1, 2, 1, 4, false },
        { "alibi", 2, 2, 13, 4, true },
        { "alibi", 1, 1, 7, 3, false },
        { "shaw+alibi-free", 2, 3, 10, 4, false },
    };

    /// <summary>Outputs and gradients (q, k, v, and the Shaw tables) of the block-sparse Ops kernel with relative terms equal
    /// the dense reference over the pattern's token mask.</summary>
    [Theory]
    [MemberData(nameof(BlockCases))]
    public void BlockSparseOpsEqualsDenseReference(string terms, int batch, int heads, int seqLen, int block, bool padded)
    {
        var (q, k, v) = TestSupport.RandomQkv(batch, heads, seqLen, 4, seed: seqLen + heads);
        var (keyTable, valueTable) = Tables(4, 4, seed: 5);
        AttentionPattern pattern = terms == "shaw+alibi-free"
            ? new StridedPattern(3, causal: true)
            : new WindowPattern(block, lookBackward: 1, lookForward: 0, exactWindowSize: false, causal: true);
        var mask = pattern.Compile(seqLen, Math.Min(block, seqLen), heads);
        Tensor? keyMask = null;
        if (padded)
        {
            keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
            keyMask[0, seqLen - 2] = tensor(false);
        }
        RelativePositionTerms Make(Tensor kt, Tensor vt) => terms == "alibi"
            ? new AlibiPositions(AlibiPositions.StandardSlopes(heads))
            : new ShawRelativePositions(kt, vt);
        var upstream = randn(new long[] { batch, heads, seqLen, 4 }, dtype: ScalarType.Float64, generator: new Generator(7));
        var expected = GradientsOf(x => BlockSparseAttention.Attention(x[0], x[1], x[2], mask, keyMask, kernel: AttentionKernel.Reference,
            relative: Make(x[3], x[4])), upstream, q, k, v, keyTable, valueTable);
        var actual = GradientsOf(x => BlockSparseAttention.Attention(x[0], x[1], x[2], mask, keyMask, kernel: AttentionKernel.Auto,
            relative: Make(x[3], x[4])), upstream, q, k, v, keyTable, valueTable);
        TestSupport.AssertClose(expected[0], actual[0], "output");
        string[] names = ["dq", "dk", "dv", "d key table", "d value table"];
        for (int n = 0; n < names.Length; n++) TestSupport.AssertClose(expected[n + 1], actual[n + 1], names[n]);
        // (With one token the softmax has one entry and the key-side term no gradient.)
        if (terms != "alibi" && seqLen > 1) Assert.True(actual[4].abs().sum().item<double>() > 0, "the key table gets a gradient");
    }

    /// <summary>Grouped Ops attention with relative terms, on a partition of positions into groups (every query in one
    /// group, keys = the group's members, optionally causal), equals the dense reference over the implied mask.</summary>
    [Theory]
    [InlineData("shaw", false)]
    [InlineData("shaw", true)]
    [InlineData("alibi", true)]
    public void GroupedOpsEqualsDenseReferenceOverTheImpliedMask(string terms, bool causal)
    {
        const int batch = 2, heads = 2, seqLen = 11, groups = 3, width = 4;
        var (q, k, v) = TestSupport.RandomQkv(batch, heads, seqLen, 4, seed: 11);
        var (keyTable, valueTable) = Tables(4, 4, seed: 12);
        // Each (b, h) splits a permutation of the positions into groups of 4 slots (the last one short: −1 = empty).
        var indices = full(new long[] { batch, heads, groups, width }, -1L);
        var allowed = zeros(new long[] { batch, heads, seqLen, seqLen }, dtype: ScalarType.Bool);
        var gen = new Generator(13);
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
            {
                var order = randperm(seqLen, generator: gen).data<long>().ToArray();
                for (int n = 0; n < seqLen; n++) indices[b, h, n / width, n % width] = tensor(order[n]);
                for (int n = 0; n < seqLen; n++)
                    for (int m = 0; m < seqLen; m++)
                        if (n / width == m / width && (!causal || order[m] <= order[n])) allowed[b, h, order[n], order[m]] = tensor(true);
            }
        RelativePositionTerms Make(Tensor kt, Tensor vt) => terms == "alibi" ? new AlibiPositions([0.7, 0.2]) : new ShawRelativePositions(kt, vt);
        var upstream = randn(new long[] { batch, heads, seqLen, 4 }, dtype: ScalarType.Float64, generator: gen);
        var expected = GradientsOf(x => ReferenceAttention.Attention(x[0], x[1], x[2], allowed, relative: Make(x[3], x[4])),
            upstream, q, k, v, keyTable, valueTable);
        var actual = GradientsOf(x => GroupedAttention.Attention(x[0], x[1], x[2], indices, indices, causal: causal, relative: Make(x[3], x[4])),
            upstream, q, k, v, keyTable, valueTable);
        TestSupport.AssertClose(expected[0], actual[0], "output");
        string[] names = ["dq", "dk", "dv", "d key table", "d value table"];
        for (int n = 0; n < names.Length; n++) TestSupport.AssertClose(expected[n + 1], actual[n + 1], names[n]);
    }

    /// <summary>A term the fused kernels do not know (a user subclass) is refused under Fused by name and runs on Ops under Auto.</summary>
    [Fact]
    public void FusedKernelsRefuseUnknownRelativeTermsByName()
    {
        var (q, k, v) = TestSupport.RandomQkv(1, 1, 8, 4, seed: 1, dtype: ScalarType.Float32);
        var mask = new WindowPattern(4, 1, 0, false, causal: true).Compile(8, 4, 1);
        var custom = new ConstantBias();
        var e = Assert.Throws<ArgumentException>(() => BlockSparseAttention.Attention(q, k, v, mask, kernel: AttentionKernel.Fused, relative: custom));
        Assert.Equal("kernel", e.ParamName);
        TestSupport.AssertClose(BlockSparseAttention.Attention(q, k, v, mask, kernel: AttentionKernel.Ops),
            BlockSparseAttention.Attention(q, k, v, mask, relative: custom), "a constant bias changes nothing");
        var wrongHeads = Assert.Throws<ArgumentException>(() => BlockSparseAttention.Attention(q, k, v, mask, relative: new AlibiPositions([0.5, 0.25])));
        Assert.Equal("relative", wrongHeads.ParamName);
    }

    private sealed class ConstantBias : RelativePositionTerms
    {
        public override int? Heads => null;
        public override Tensor AddToScores(Tensor scaledScores, Tensor q, Tensor distance, double scale) => scaledScores + 1;
    }

    /// <summary>Output and gradients of every input for the loss sum(output · upstream).</summary>
    internal static Tensor[] GradientsOf(Func<Tensor[], Tensor> attention, Tensor upstream, params Tensor[] inputs)
    {
        var leaves = inputs.Select(x => x.detach().clone().requires_grad_(true)).ToArray();
        var output = attention(leaves);
        var grads = autograd.grad([(output * upstream).sum()], leaves, allow_unused: true);
        return [output.detach(), .. grads.Select((g, n) => g is null || g.IsInvalid ? zeros_like(leaves[n]) : g.detach())];
    }
}
