using SparseAttention.Kernels;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>The yardsticks of one bench run, measured in the same process as its figures: libtorch's float32 and
/// bfloat16 GEMM rates and the float32 FMA peak (GFLOP/s), with the threads and vector width they were measured at.</summary>
internal sealed record BenchLimits(int Threads, double Gemm, double Bf16, double Peak, int VectorBits)
{
    /// <summary>Measures the limits with libtorch's current thread count (which the fused kernels then use too).</summary>
    public static BenchLimits Measure(int runs, TextWriter stderr)
    {
        int threads = get_num_threads();
        FusedBlockSparseAttention.DefaultThreads = threads;
        stderr.WriteLine($"bench: {threads} threads; measuring the GEMM rates and the FMA peak ...");
        double gemm = MachineLimits.MatmulGflops(ScalarType.Float32, runs);
        double bf16 = MachineLimits.MatmulGflops(ScalarType.BFloat16, runs);
        double peak = MachineLimits.FmaPeakGflops(threads);
        int vectorBits = MachineLimits.VectorBits;
        stderr.WriteLine($"bench: GEMM {gemm:F1} GFLOP/s (2048×2048 float32 matmul, median of {runs}); bf16 GEMM {bf16:F1} GFLOP/s; "
            + $"float32 FMA peak {peak:F1} GFLOP/s ({threads} threads × {vectorBits}-bit FMA loop, best of 5)");
        return new BenchLimits(threads, gemm, bf16, peak, vectorBits);
    }

    public override string ToString() => $"{Threads} threads, GEMM {Gemm:F1} GFLOP/s (bf16 {Bf16:F1}), FMA peak {Peak:F1} GFLOP/s ({VectorBits}-bit)";
}
