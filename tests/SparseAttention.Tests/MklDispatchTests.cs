using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics.X86;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// <see cref="MklDispatch.UseCpuFeatures"/>: the tests run on the same MKL kernels as the CLI (set first thing, below);
/// on an AVX-512 Linux x64 machine the switch is recognised and made, products on the switched kernels match float64,
/// and a user's opt-out reaches the CLI.
/// </summary>
public sealed class MklDispatchTests
{
    [ModuleInitializer]
    internal static void RunTestsOnTheCliKernels() => MklDispatch.UseCpuFeatures();

    private static bool Applicable => OperatingSystem.IsLinux() && RuntimeInformation.ProcessArchitecture == Architecture.X64 && Avx512F.IsSupported;

    [Fact]
    public void OnAnAvx512MachineMklChoosesByFeatures()
    {
        Assert.SkipUnless(Applicable, "the switch applies to Linux x64 CPUs with AVX-512");
        // Unrecognised here means the libtorch build changed and the speed-up is silently lost: that must fail.
        Assert.Contains(MklDispatch.UseCpuFeatures(), new[] { MklDispatchStatus.Applied, MklDispatchStatus.AlreadyByFeatures });
        Assert.Equal(MklDispatch.Status, MklDispatch.UseCpuFeatures());   // idempotent
    }

    [Theory]
    [InlineData(1, 1, 1)]
    [InlineData(333, 257, 771)]     // awkward sizes: no kernel tile divides them
    [InlineData(2048, 256, 768)]    // a projection of the bench model
    [InlineData(768, 2048, 256)]    // its weight gradient: long reduction
    public void ProductsMatchFloat64(int m, int k, int n)
    {
        var gen = new Generator(7);
        var a = randn(new long[] { m, k }, generator: gen);
        var b = randn(new long[] { n, k }, generator: gen);
        foreach (var (x, y) in new[] { (a, b.t()), (a.t().contiguous().t(), b.t().contiguous()) })   // row- and column-major A
        {
            var product = x.matmul(y);
            var exact = x.to(ScalarType.Float64).matmul(y.to(ScalarType.Float64));
            // float32 rounding of k products: error grows like sqrt(k) times the magnitude of the terms.
            double tolerance = 1e-6 * Math.Sqrt(k) * 8;
            double error = (product.to(ScalarType.Float64) - exact).abs().max().item<double>();
            Assert.True(error <= tolerance, $"({m}×{k})·({k}×{n}): max error {error} > {tolerance}");
        }
    }

    [Fact]
    public void TheCliSwitchesAndAUserCanOptOut()
    {
        Assert.SkipUnless(Applicable, "the switch applies to Linux x64 CPUs with AVX-512");
        var on = TorchAllocatorTests.BenchInChild(new Dictionary<string, string?> { [MklDispatch.OptOutVariable] = null });
        Assert.Equal(nameof(MklDispatchStatus.Applied), on.GetProperty("mkl_dispatch_by_features").GetString());
        var off = TorchAllocatorTests.BenchInChild(new Dictionary<string, string?> { [MklDispatch.OptOutVariable] = "1" });
        Assert.Equal(nameof(MklDispatchStatus.OptedOut), off.GetProperty("mkl_dispatch_by_features").GetString());
    }
}
