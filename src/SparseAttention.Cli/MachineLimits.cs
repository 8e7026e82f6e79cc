using System.Diagnostics;
using SparseAttention.Kernels.Fused;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// What this machine can do at most, measured in the bench's own process: libtorch's matrix-multiply rate
/// (float32 and bfloat16) and the float32 FMA peak of the vector width the fused kernels use
/// (cores × clock × FMA units × lanes × 2, measured as a whole by an FMA-throughput loop, not guessed).
/// </summary>
internal static class MachineLimits
{
    /// <summary>The vector width (bits) of the fused kernels' floats on this machine: 512, 256, 128 or 32 (scalar).</summary>
    public static int VectorBits => SimdWidth.Bits;

    /// <summary>Median rate (GFLOP/s) of a 2048×2048 by 2048×2048 matmul in <paramref name="dtype"/>, after a warm-up.</summary>
    public static double MatmulGflops(ScalarType dtype, int runs)
    {
        using var scope = NewDisposeScope();
        var a = randn(2048, 2048).to(dtype); var b = randn(2048, 2048).to(dtype);
        var times = new double[runs];
        Timing.WarmUp(() => { using (matmul(a, b)) { } });
        for (int i = 0; i < runs; i++)
        {
            var sw = Stopwatch.StartNew();
            using (matmul(a, b)) { }
            times[i] = sw.Elapsed.TotalSeconds;
        }
        Array.Sort(times);
        return 2.0 * 2048 * 2048 * 2048 / times[runs / 2] / 1e9;
    }

    /// <summary>
    /// The float32 FMA peak (GFLOP/s) on <paramref name="threads"/> threads at <see cref="VectorBits"/>: every thread runs
    /// 12 independent FMA chains (enough to hide the FMA latency on every unit) for a fixed count; the best of
    /// <paramref name="repeats"/> runs is reported, since other load on the machine can only lower it.
    /// </summary>
    public static double FmaPeakGflops(int threads, int repeats = 5)
    {
        const long iterations = 20_000_000;
        int lanes = VectorBits / 32;
        Fma(1000);                                                                 // JIT the loop at full optimisation first
        double best = 0;
        for (int r = 0; r < repeats; r++)
        {
            using var start = new Barrier(threads + 1);
            var workers = Enumerable.Range(0, threads).Select(_ => new Thread(() => { start.SignalAndWait(); Sink(Fma(iterations)); })).ToArray();
            foreach (var w in workers) w.Start();
            start.SignalAndWait();
            var sw = Stopwatch.StartNew();
            foreach (var w in workers) w.Join();
            double flops = 2.0 * 12 * lanes * iterations * threads;
            best = Math.Max(best, flops / sw.Elapsed.TotalSeconds / 1e9);
        }
        return best;
    }

    private static volatile float sink;
    private static void Sink(float value) => sink = value;

    private static float Fma(long iterations) => FmaProbe.Run(iterations);
}
