using SparseAttention.Kernels;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public class ReferenceAttentionTests
{
    [Fact]
    public void MatchesHandComputedSoftmax()
    {
        // One head, two queries, three keys, D = 1: scores are plain products.
        var q = tensor(new double[] { 1, 2 }).view(1, 1, 2, 1);
        var k = tensor(new double[] { 0, 1, -1 }).view(1, 1, 3, 1);
        var v = tensor(new double[] { 10, 20, 30 }).view(1, 1, 3, 1);
        var output = ReferenceAttention.Attention(q, k, v, scale: 1.0);
        double[] Expected(double qi)
        {
            var w = new[] { 0.0, qi, -qi }.Select(Math.Exp).ToArray();
            return [(10 * w[0] + 20 * w[1] + 30 * w[2]) / w.Sum()];
        }
        TestSupport.AssertClose(tensor(Expected(1).Concat(Expected(2)).ToArray()).view(1, 1, 2, 1), output, "output");
    }

    [Fact]
    public void CausalEqualsExplicitLowerTriangleAndMaskedPairsGetNoWeight()
    {
        var (q, k, v) = TestSupport.RandomQkv(2, 3, 7, 5, seed: 1);
        var lower = arange(7).unsqueeze(1).ge(arange(7).unsqueeze(0));               // (T, T): i >= j
        TestSupport.AssertClose(ReferenceAttention.Attention(q, k, v, mask: lower), ReferenceAttention.Attention(q, k, v, causal: true), "causal");
        // Changing a value the mask hides changes nothing.
        var v2 = v.detach().clone();
        v2[.., .., 6] = tensor(1e6, dtype: ScalarType.Float64);
        var first = ReferenceAttention.Attention(q, k, v, causal: true).narrow(2, 0, 6);
        var second = ReferenceAttention.Attention(q, k, v2, causal: true).narrow(2, 0, 6);
        TestSupport.AssertClose(first, second, "hidden value changed output");
    }

    [Fact]
    public void RowWithoutAllowedKeyGivesZerosAndZeroGradient()
    {
        var (q, k, v) = TestSupport.RandomQkv(1, 2, 4, 3, seed: 2);
        var mask = ones(4, 4, dtype: ScalarType.Bool);
        mask[2] = tensor(false);                                                     // query 2 sees nothing
        var output = ReferenceAttention.Attention(q, k, v, mask: mask);
        output.sum().backward();
        Assert.False(output.isnan().any().item<bool>());
        Assert.Equal(0.0, output[.., .., 2].abs().sum().item<double>());
        Assert.Equal(0.0, q.grad![.., .., 2].abs().sum().item<double>());
    }

    [Fact]
    public void KeyMaskHidesPaddingEvenWhenItHoldsNaN()
    {
        var (q, k, v) = TestSupport.RandomQkv(2, 2, 6, 4, seed: 3);
        var keyMask = tensor(new[] { true, true, true, true, false, false, true, true, true, true, true, true }).view(2, 6);
        var kNan = k.detach().clone(); var vNan = v.detach().clone();
        kNan[0, .., 4..] = tensor(double.NaN); vNan[0, .., 4..] = tensor(double.NaN);
        var clean = ReferenceAttention.Attention(q, k, v, mask: ones(6, 6, dtype: ScalarType.Bool).logical_and(keyMask.view(2, 1, 1, 6)));
        var withNan = ReferenceAttention.Attention(q, kNan, vNan, keyMask: keyMask);
        TestSupport.AssertClose(clean, withNan, "padding with NaN");
    }

    [Fact]
    public void DifferentQueryAndKeyLengthsWithBias()
    {
        var gen = new Generator(4);
        var q = randn(new long[] { 2, 2, 3, 4 }, dtype: ScalarType.Float64, generator: gen);
        var k = randn(new long[] { 2, 2, 5, 4 }, dtype: ScalarType.Float64, generator: gen);
        var v = randn(new long[] { 2, 2, 5, 6 }, dtype: ScalarType.Float64, generator: gen);
        var bias = randn(new long[] { 1, 2, 3, 5 }, dtype: ScalarType.Float64, generator: gen);
        var output = ReferenceAttention.Attention(q, k, v, bias: bias);
        var manual = (matmul(q, k.transpose(-1, -2)) / 2.0 + bias).softmax(-1).matmul(v);
        TestSupport.AssertClose(manual, output, "bias");
        Assert.Equal(new long[] { 2, 2, 3, 6 }, output.shape);
    }

    [Fact]
    public void BadInputNamesTheArgument()
    {
        var q = zeros(1, 2, 4, 8);
        Assert.Equal("k", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, zeros(1, 2, 4, 7), zeros(1, 2, 4, 8))).ParamName);
        Assert.Equal("v", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, q, zeros(1, 2, 4, 8, dtype: ScalarType.Float64))).ParamName);
        Assert.Equal("q", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(zeros(2, 4, 8), q, q)).ParamName);
        Assert.Equal("mask", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, q, q, mask: ones(4, 4))).ParamName);
        Assert.Equal("mask", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, q, q, mask: ones(new long[] { 3, 4 }, dtype: ScalarType.Bool))).ParamName);
        Assert.Equal("keyMask", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, q, q, keyMask: ones(1, 5, dtype: ScalarType.Bool))).ParamName);
        Assert.Equal("causal", Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, zeros(1, 2, 5, 8), zeros(1, 2, 5, 8), causal: true)).ParamName);
        var ex = Assert.Throws<ArgumentException>(() => ReferenceAttention.Attention(q, zeros(1, 2, 4, 7), zeros(1, 2, 4, 8)));
        Assert.Contains("(1, 2, 4, 7)", ex.Message);
    }
}
