using SparseAttention.Kernels;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// The grouped-attention rules written a different way: per group, a dense (Tq, Tk) mask built from one-hot
/// memberships and arange comparisons, run through the dense oracle; the per-group outputs are summed and divided
/// by the number of groups each query joined.
/// </summary>
internal static class GroupedOracle
{
    /// <summary>(B, H, G, W) index lists (−1 ignored) → (B, H, G, T) bool membership.</summary>
    public static Tensor Membership(Tensor indices, long length) =>
        nn.functional.one_hot(indices.clamp_min(0), length)                 // (B, H, G, W, T)
            .logical_and(indices.ge(0).unsqueeze(-1))
            .any(3);                                                         // (B, H, G, T)

    public static Tensor Attention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, bool causal,
        bool sharedQk, Tensor? keyMask = null, bool lookBackward = false, Tensor? memoryKeys = null, Tensor? memoryValues = null)
    {
        long batch = q.shape[0], heads = q.shape[1], tq = q.shape[2], tk = k.shape[2], dim = q.shape[3], dimV = v.shape[3];
        long groups = queryIndices.shape[2];
        var queries = Membership(queryIndices, tq);                           // (B, H, G, Tq)
        var keys = Membership(keyIndices, tk);                                // (B, H, G, Tk)
        if (lookBackward)
            keys = keys.logical_or(cat([zeros(new long[] { batch, heads, 1, tk }, dtype: ScalarType.Bool), keys.narrow(2, 0, groups - 1)], 2));
        var i = arange(tq).view(tq, 1);
        var j = arange(tk).view(1, tk);
        var real = keyMask ?? ones(batch, tk, dtype: ScalarType.Bool);
        var sum = zeros(new long[] { batch, heads, tq, dimV }, dtype: q.dtype);
        for (long g = 0; g < groups; g++)
        {
            var inGroup = queries.select(2, g).unsqueeze(-1);                 // (B, H, Tq, 1)
            var allowed = inGroup.logical_and(keys.select(2, g).unsqueeze(-2));  // (B, H, Tq, Tk)
            if (causal) allowed = allowed.logical_and(j.le(i));
            var kk = k; var vv = v; var km = real;
            if (sharedQk)
            {
                var self = i.eq(j);
                var others = allowed.logical_and(self.logical_not()).logical_and(real.view(batch, 1, 1, tk)).any(-1, keepdim: true);
                if (memoryKeys is not null) others = others.logical_or(inGroup);
                allowed = allowed.logical_and(self.logical_and(others).logical_not());
            }
            if (memoryKeys is not null && memoryValues is not null)
            {
                long m = memoryKeys.shape[3];
                kk = cat([k, memoryKeys.select(2, g).expand(batch, heads, m, dim)], 2);      // (B, H, Tk + M, D)
                vv = cat([v, memoryValues.select(2, g).expand(batch, heads, m, dimV)], 2);   // (B, H, Tk + M, Dv)
                allowed = cat([allowed, inGroup.expand(batch, heads, tq, m)], -1);
                km = cat([real, ones(batch, m, dtype: ScalarType.Bool)], 1);
            }
            sum = sum + ReferenceAttention.Attention(q, kk, vv, mask: allowed, keyMask: km);
        }
        var joined = queries.sum(2).to(q.dtype);                              // (B, H, Tq)
        return sum / joined.clamp_min(1).unsqueeze(-1);
    }
}

public class GroupedAttentionTests
{
    /// <summary>Random index lists: each group takes up to <paramref name="width"/> distinct positions not used by
    /// the previous group (so look-back never sees a position twice), about a fifth of the slots emptied.
    /// In (0, 0) the last position joins no group and position 0 joins groups 0 and 2.</summary>
    internal static Tensor RandomIndices(int seed, long batch, long heads, long groups, int width, long length)
    {
        var rng = new Random(seed);
        var data = new long[batch * heads * groups * width];
        int at = 0;
        for (long b = 0; b < batch; b++)
            for (long h = 0; h < heads; h++)
            {
                var previous = new HashSet<long>();
                for (long g = 0; g < groups; g++)
                {
                    var chosen = Enumerable.Range(0, (int)length).Select(p => (long)p).Where(p => !previous.Contains(p))
                                           .OrderBy(_ => rng.Next()).Take(width).ToArray();
                    var slots = new long[width];
                    for (int s = 0; s < width; s++)
                    {
                        slots[s] = s < chosen.Length && rng.NextDouble() > 0.2 ? chosen[s] : -1;
                        if (b == 0 && h == 0 && slots[s] == length - 1) slots[s] = -1;
                    }
                    if (b == 0 && h == 0 && (g == 0 || g == 2) && !slots.Contains(0) && !previous.Contains(0)) slots[0] = 0;
                    slots.CopyTo(data, at);
                    at += width;
                    previous = slots.Where(p => p >= 0).ToHashSet();
                }
            }
        return tensor(data, new long[] { batch, heads, groups, width });
    }

    /// <summary>Output and gradients of every input for the loss sum(output · upstream).</summary>
    internal static (Tensor Output, Tensor[] Grads) Grad(Func<Tensor[], Tensor> f, Tensor upstream, params Tensor[] inputs)
    {
        var leaves = inputs.Select(t => t.detach().clone().requires_grad_(true)).ToArray();
        var output = f(leaves);
        var grads = autograd.grad([(output * upstream).sum()], leaves, allow_unused: true);
        return (output.detach(), grads.Select((g, n) => g is null || g.IsInvalid ? zeros_like(leaves[n]) : g.detach()).ToArray());
    }

    public static TheoryData<bool, bool, bool, bool, bool> Cases()
    {
        var data = new TheoryData<bool, bool, bool, bool, bool>();
        foreach (bool causal in new[] { false, true })
            foreach (bool sharedQk in new[] { false, true })
                foreach (bool lookBackward in new[] { false, true })
                    foreach (bool memory in new[] { false, true })
                        foreach (bool padded in new[] { false, true })
                            data.Add(causal, sharedQk, lookBackward, memory, padded);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void EqualsPerGroupOracleInOutputsAndGradients(bool causal, bool sharedQk, bool lookBackward, bool memory, bool padded)
    {
        const long batch = 2, heads = 2, seqLen = 11, groups = 4, dim = 3, dimV = 4, mem = 2;
        int seed = (causal ? 1 : 0) + (sharedQk ? 2 : 0) + (lookBackward ? 4 : 0) + (memory ? 8 : 0) + (padded ? 16 : 0);
        var gen = new Generator((ulong)seed + 1);
        var q = randn(new long[] { batch, heads, seqLen, dim }, dtype: ScalarType.Float64, generator: gen);
        var k = sharedQk ? nn.functional.normalize(q, 2, -1) : randn(new long[] { batch, heads, seqLen, dim }, dtype: ScalarType.Float64, generator: gen);
        var v = randn(new long[] { batch, heads, seqLen, dimV }, dtype: ScalarType.Float64, generator: gen);
        var qIdx = RandomIndices(seed, batch, heads, groups, 5, seqLen);
        var kIdx = sharedQk ? qIdx : RandomIndices(seed + 100, batch, heads, groups, 6, seqLen);
        var memK = memory ? randn(new long[] { 1, heads, groups, mem, dim }, dtype: ScalarType.Float64, generator: gen) : null;
        var memV = memory ? randn(new long[] { batch, heads, groups, mem, dimV }, dtype: ScalarType.Float64, generator: gen) : null;
        Tensor? keyMask = null;
        if (padded)
        {
            keyMask = ones(batch, seqLen, dtype: ScalarType.Bool);
            keyMask[1, 8..] = tensor(false);
            keyMask[0, 3] = tensor(false);
        }
        var upstream = randn(new long[] { batch, heads, seqLen, dimV }, dtype: ScalarType.Float64, generator: gen);

        // The case exercises a token in several groups and a token in none.
        var joined = GroupedOracle.Membership(qIdx, seqLen).sum(2);
        Assert.True(joined.max().item<long>() >= 2);
        Assert.True(joined.min().item<long>() == 0);

        var inputs = memory ? new[] { q, k, v, memK!, memV! } : new[] { q, k, v };
        var expected = Grad(x => GroupedOracle.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward,
            memory ? x[3] : null, memory ? x[4] : null), upstream, inputs);
        var actual = Grad(x => GroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx, causal, sharedQk, keyMask, lookBackward,
            memory ? x[3] : null, memory ? x[4] : null), upstream, inputs);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        string[] names = ["dq", "dk", "dv", "dmemK", "dmemV"];
        for (int n = 0; n < inputs.Length; n++) TestSupport.AssertClose(expected.Grads[n], actual.Grads[n], names[n]);
        // Tokens in no group: zero output.
        var none = joined.eq(0).unsqueeze(-1).expand_as(actual.Output);
        Assert.Equal(0.0, actual.Output.masked_select(none).abs().sum().item<double>());
    }

    [Fact]
    public void CrossAttentionWithDifferentKeyLengthMatchesOracle()
    {
        var gen = new Generator(4);
        var q = randn(new long[] { 2, 1, 7, 3 }, dtype: ScalarType.Float64, generator: gen);
        var k = randn(new long[] { 2, 1, 12, 3 }, dtype: ScalarType.Float64, generator: gen);
        var v = randn(new long[] { 2, 1, 12, 2 }, dtype: ScalarType.Float64, generator: gen);
        var qIdx = RandomIndices(5, 2, 1, 3, 4, 7);
        var kIdx = RandomIndices(6, 2, 1, 3, 5, 12);
        var upstream = randn(new long[] { 2, 1, 7, 2 }, dtype: ScalarType.Float64, generator: gen);
        var expected = Grad(x => GroupedOracle.Attention(x[0], x[1], x[2], qIdx, kIdx, false, false), upstream, q, k, v);
        var actual = Grad(x => GroupedAttention.Attention(x[0], x[1], x[2], qIdx, kIdx), upstream, q, k, v);
        TestSupport.AssertClose(expected.Output, actual.Output, "output");
        for (int n = 0; n < 3; n++) TestSupport.AssertClose(expected.Grads[n], actual.Grads[n], $"grad {n}");
    }

    [Fact]
    public void SharedQkAttendsSelfOnlyWhenNothingElseIsAllowed()
    {
        // One causal group [0, 1, 2]: token 0 can only see itself; token 1 sees token 0 and NOT itself; token 2
        // sees tokens 0 and 1 with the plain softmax over those two (its own score plays no part).
        var q = tensor(new double[] { 1, 0, 0.6, 0.8, 0, 1 }, new long[] { 1, 1, 3, 2 });
        var v = tensor(new double[] { 1, 2, 3, 4, 5, 6 }, new long[] { 1, 1, 3, 2 });
        var idx = tensor(new long[] { 0, 1, 2 }, new long[] { 1, 1, 1, 3 });
        var output = GroupedAttention.Attention(q, q, v, idx, idx, causal: true, sharedQk: true);
        TestSupport.AssertClose(v[0, 0, 0], output[0, 0, 0], "token 0 = itself");
        TestSupport.AssertClose(v[0, 0, 0], output[0, 0, 1], "token 1 = token 0 only");
        double s0 = Math.Exp(0 * 1 / Math.Sqrt(2)), s1 = Math.Exp(1 * 0.8 / Math.Sqrt(2));  // q2 = (0, 1)
        var expected = (v[0, 0, 0] * s0 + v[0, 0, 1] * s1) / (s0 + s1);
        TestSupport.AssertClose(expected, output[0, 0, 2], "token 2 ignores itself");
        // With a memory slot, nobody attends to itself: token 0 then sees only the memory.
        var memK = tensor(new double[] { 0.3, -0.2 }, new long[] { 1, 1, 1, 1, 2 });
        var memV = tensor(new double[] { 7, 8 }, new long[] { 1, 1, 1, 1, 2 });
        var withMemory = GroupedAttention.Attention(q, q, v, idx, idx, causal: true, sharedQk: true, memoryKeys: memK, memoryValues: memV);
        TestSupport.AssertClose(memV[0, 0, 0, 0], withMemory[0, 0, 0], "token 0 = memory");
    }

    [Fact]
    public void NaNInPaddingAndUngroupedTokensNeverLeak()
    {
        var gen = new Generator(12);
        var q = randn(new long[] { 1, 2, 9, 4 }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true);
        var k = randn(new long[] { 1, 2, 9, 4 }, dtype: ScalarType.Float64, generator: gen);
        var v = randn(new long[] { 1, 2, 9, 4 }, dtype: ScalarType.Float64, generator: gen);
        var keyMask = ones(1, 9, dtype: ScalarType.Bool);
        keyMask[0, 0] = tensor(false); keyMask[0, 5] = tensor(false);
        var pad = keyMask.logical_not().view(1, 1, 9, 1).expand_as(k);
        var kNan = k.masked_fill(pad, double.NaN).requires_grad_(true);
        var vNan = v.masked_fill(pad, double.NaN).requires_grad_(true);
        // Token 8 is in no group; slot −1 gathers row 0 (padding, NaN) and must still not leak.
        var qIdx = tensor(new long[] { 0, 1, 2, -1, 3, 4, 5, 6, 7, 1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1 }, new long[] { 1, 2, 2, 6 });
        var output = GroupedAttention.Attention(q, kNan, vNan, qIdx, qIdx, causal: true, keyMask: keyMask, lookBackward: true);
        output.sum().backward();
        Assert.False(output.isnan().any().item<bool>());
        Assert.False(q.grad!.isnan().any().item<bool>());
        Assert.Equal(0.0, output.select(2, 8).abs().sum().item<double>());
        Assert.Equal(0.0, q.grad!.select(2, 8).abs().sum().item<double>());
        Assert.Equal(0.0, kNan.grad!.masked_select(pad).abs().sum().item<double>());
    }

    [Fact]
    public void BadInputNamesTheArgument()
    {
        var x = zeros(1, 2, 6, 4);
        var idx = zeros(new long[] { 1, 2, 3, 2 }, dtype: ScalarType.Int64);
        string Param(Action a) => Assert.Throws<ArgumentException>(a).ParamName!;
        Assert.Equal("queryIndices", Param(() => GroupedAttention.Attention(x, x, x, idx.to(ScalarType.Int32), idx)));
        Assert.Equal("queryIndices", Param(() => GroupedAttention.Attention(x, x, x, zeros(new long[] { 1, 2, 3 }, dtype: ScalarType.Int64), idx)));
        Assert.Equal("queryIndices", Param(() => GroupedAttention.Attention(x, x, x, idx + 6, idx)));
        Assert.Equal("queryIndices", Param(() => GroupedAttention.Attention(x, x, x, idx - 2, idx)));
        Assert.Equal("keyIndices", Param(() => GroupedAttention.Attention(x, x, x, idx, zeros(new long[] { 1, 2, 4, 2 }, dtype: ScalarType.Int64))));
        Assert.Equal("keyIndices", Param(() => GroupedAttention.Attention(x, zeros(1, 2, 3, 4), zeros(1, 2, 3, 4), idx, idx + 3)));
        Assert.Equal("k", Param(() => GroupedAttention.Attention(x, zeros(1, 2, 5, 4), zeros(1, 2, 5, 4), idx, idx, causal: true)));
        Assert.Equal("k", Param(() => GroupedAttention.Attention(x, zeros(1, 2, 6, 3), x, idx, idx)));
        Assert.Equal("keyMask", Param(() => GroupedAttention.Attention(x, x, x, idx, idx, keyMask: ones(1, 5, dtype: ScalarType.Bool))));
        Assert.Equal("memoryValues", Param(() => GroupedAttention.Attention(x, x, x, idx, idx, memoryKeys: zeros(new long[] { 1, 2, 3, 1, 4 }))));
        Assert.Equal("memoryKeys", Param(() => GroupedAttention.Attention(x, x, x, idx, idx, memoryValues: zeros(new long[] { 1, 2, 3, 1, 4 }))));
        Assert.Equal("memoryKeys", Param(() => GroupedAttention.Attention(x, x, x, idx, idx, memoryKeys: zeros(new long[] { 1, 2, 2, 1, 4 }), memoryValues: zeros(new long[] { 1, 2, 2, 1, 4 }))));
        Assert.Equal("memoryValues", Param(() => GroupedAttention.Attention(x, x, x, idx, idx, memoryKeys: zeros(new long[] { 1, 2, 3, 1, 4 }), memoryValues: zeros(new long[] { 1, 2, 3, 2, 4 }))));
    }
}
