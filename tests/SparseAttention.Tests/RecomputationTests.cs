using SparseAttention.Kernels;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// <see cref="Recomputation"/> (keep the inputs, recompute in the backward) against the same function differentiated
/// directly: equal outputs and gradients, for inputs that need gradients, inputs that do not (an index, a mask) and
/// absent ones; and a backward that runs after every handle of the forward's tensors has been disposed, as in a model.
/// </summary>
public sealed class RecomputationTests
{
    // y = softmax(a·bᵀ masked) · b + c[idx] — a few ops with saved intermediates, an int64 index and a bool mask.
    private static Tensor Function(Tensor?[] x)
    {
        var scores = matmul(x[0]!, x[1]!.transpose(-1, -2)).masked_fill(x[3]!.logical_not(), -1e9);
        var output = matmul(scores.softmax(-1), x[1]!) + x[2]!.index_select(0, x[4]!);
        return x[5] is null ? output : output * x[5]!;
    }

    [Fact]
    public void GradientsEqualTheDirectFunctions()
    {
        var gen = new Generator(3);
        var a = randn(new long[] { 2, 5, 4 }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true);
        var b = randn(new long[] { 2, 6, 4 }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true);
        var c = randn(new long[] { 7, 4 }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true);
        var mask = rand(new long[] { 2, 5, 6 }, generator: gen).gt(0.3);
        var index = tensor(new long[] { 6, 0, 2, 2, 1 });
        var upstream = randn(new long[] { 2, 5, 4 }, dtype: ScalarType.Float64, generator: gen);
        Tensor?[] inputs = [a, b, c, mask, index, null];
        var direct = Function(inputs);
        var expected = autograd.grad([direct], [a, b, c], [upstream]);
        var recomputed = Recomputation.Of(Function, inputs);
        var actual = autograd.grad([recomputed], [a, b, c], [upstream]);
        Assert.True(recomputed.requires_grad, "the recomputed output is part of the graph");
        Assert.True(allclose(direct, recomputed, 0, 0), "outputs");
        string[] names = ["da", "db", "dc"];
        for (int n = 0; n < 3; n++) Assert.True(allclose(expected[n], actual[n], 0, 0), names[n]);
    }

    [Fact]
    public void BackwardRunsAfterTheForwardsHandlesAreDisposed()
    {
        var gen = new Generator(4);
        var a = randn(new long[] { 3, 4 }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true);
        var weight = randn(new long[] { 3, 4 }, dtype: ScalarType.Float64, generator: gen).requires_grad_(true);
        Tensor loss;
        using (var scope = NewDisposeScope())
        {
            var scaled = a * 2;                                                        // a non-leaf input, disposed with the scope
            var mask = a.detach().gt(0);                                               // a non-differentiable one
            var output = Recomputation.Of(x => (x[0]! * x[1]!).masked_fill(x[2]!, 0).exp(), scaled, weight, mask);
            loss = output.sum().MoveToOuterDisposeScope();
        }
        loss.backward();
        var expected = (2 * a * weight).detach().masked_fill(a.detach().gt(0), 0).exp().masked_fill(a.detach().gt(0), 0);
        TestSupport.AssertClose(expected * 2 * weight.detach(), a.grad!, "da");
        TestSupport.AssertClose(expected * 2 * a.detach(), weight.grad!, "dweight");
    }
}
