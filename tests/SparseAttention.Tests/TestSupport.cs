using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Tolerances for comparing a fast path with the oracle, in one place.</summary>
public static class Tolerance
{
    // float64 comparisons: both paths compute the same sums in a different order.
    public const double Float64 = 1e-10;
    // float32 comparisons (summation order differs between kernels).
    public const double Float32Relative = 1e-4;
    public const double Float32Absolute = 1e-5;
}

public static class TestSupport
{
    /// <summary>Random (B, H, T, D) q, k, v that require grad, from a fixed seed.</summary>
    public static (Tensor Q, Tensor K, Tensor V) RandomQkv(long batch, long heads, long seqLen, long dim, long seed,
        ScalarType dtype = ScalarType.Float64)
    {
        var gen = new Generator((ulong)seed);
        Tensor Make() => randn(new[] { batch, heads, seqLen, dim }, dtype: dtype, generator: gen).requires_grad_(true);
        return (Make(), Make(), Make());
    }

    /// <summary>Output and gradients of q, k, v for the loss sum(output · upstream).</summary>
    public static (Tensor Output, Tensor Dq, Tensor Dk, Tensor Dv) ForwardBackward(
        Func<Tensor, Tensor, Tensor, Tensor> attention, Tensor q, Tensor k, Tensor v, Tensor upstream)
    {
        var (q2, k2, v2) = (q.detach().clone().requires_grad_(true), k.detach().clone().requires_grad_(true), v.detach().clone().requires_grad_(true));
        var output = attention(q2, k2, v2);
        (output * upstream).sum().backward();
        return (output.detach(), q2.grad!.detach(), k2.grad!.detach(), v2.grad!.detach());
    }

    public static void AssertClose(Tensor expected, Tensor actual, string what, double? atol = null, double? rtol = null)
    {
        Assert.Equal(expected.shape, actual.shape);
        bool f64 = expected.dtype == ScalarType.Float64;
        double a = atol ?? (f64 ? Tolerance.Float64 : Tolerance.Float32Absolute);
        double r = rtol ?? (f64 ? Tolerance.Float64 : Tolerance.Float32Relative);
        Assert.False(actual.isnan().any().item<bool>(), $"{what}: NaN in result");
        if (!allclose(actual, expected, r, a))
        {
            double maxDiff = (actual - expected).abs().max().to(ScalarType.Float64).item<double>();
            Assert.Fail($"{what}: max |diff| = {maxDiff:G4} exceeds atol {a:G2} / rtol {r:G2}");
        }
    }
}
