using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// What this machine can do at most, measured in the bench's own process: libtorch's matrix-multiply rate
/// (float32 and bfloat16) and the float32 FMA peak of the vector width the fused kernels use
/// (cores × clock × FMA units × lanes × 2, measured as a whole by an FMA-throughput loop, not guessed).
/// </summary>
internal static class MachineLimits
{
    /// <summary>The vector width (bits) of the fused kernels' floats on this machine: 512, 256 or 32 (scalar).</summary>
    public static int VectorBits => Vector512.IsHardwareAccelerated ? 512 : Vector256.IsHardwareAccelerated ? 256 : 32;

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

    private static float Fma(long iterations) =>
        Vector512.IsHardwareAccelerated ? Fma512(iterations) : Vector256.IsHardwareAccelerated ? Fma256(iterations) : FmaScalar(iterations);

    // Twelve chains a = a·m + c per iteration; the result is summed so the loop cannot be dropped.
    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float Fma512(long iterations)
    {
        var m = Vector512.Create(0.9999999f); var c = Vector512.Create(1e-7f);
        Vector512<float> a0 = Vector512.Create(0.1f), a1 = a0 + c, a2 = a1 + c, a3 = a2 + c, a4 = a3 + c, a5 = a4 + c,
                         a6 = a5 + c, a7 = a6 + c, a8 = a7 + c, a9 = a8 + c, a10 = a9 + c, a11 = a10 + c;
        for (long i = 0; i < iterations; i++)
        {
            a0 = Vector512.FusedMultiplyAdd(a0, m, c); a1 = Vector512.FusedMultiplyAdd(a1, m, c); a2 = Vector512.FusedMultiplyAdd(a2, m, c);
            a3 = Vector512.FusedMultiplyAdd(a3, m, c); a4 = Vector512.FusedMultiplyAdd(a4, m, c); a5 = Vector512.FusedMultiplyAdd(a5, m, c);
            a6 = Vector512.FusedMultiplyAdd(a6, m, c); a7 = Vector512.FusedMultiplyAdd(a7, m, c); a8 = Vector512.FusedMultiplyAdd(a8, m, c);
            a9 = Vector512.FusedMultiplyAdd(a9, m, c); a10 = Vector512.FusedMultiplyAdd(a10, m, c); a11 = Vector512.FusedMultiplyAdd(a11, m, c);
        }
        return Vector512.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float Fma256(long iterations)
    {
        var m = Vector256.Create(0.9999999f); var c = Vector256.Create(1e-7f);
        Vector256<float> a0 = Vector256.Create(0.1f), a1 = a0 + c, a2 = a1 + c, a3 = a2 + c, a4 = a3 + c, a5 = a4 + c,
                         a6 = a5 + c, a7 = a6 + c, a8 = a7 + c, a9 = a8 + c, a10 = a9 + c, a11 = a10 + c;
        for (long i = 0; i < iterations; i++)
        {
            a0 = Vector256.FusedMultiplyAdd(a0, m, c); a1 = Vector256.FusedMultiplyAdd(a1, m, c); a2 = Vector256.FusedMultiplyAdd(a2, m, c);
            a3 = Vector256.FusedMultiplyAdd(a3, m, c); a4 = Vector256.FusedMultiplyAdd(a4, m, c); a5 = Vector256.FusedMultiplyAdd(a5, m, c);
            a6 = Vector256.FusedMultiplyAdd(a6, m, c); a7 = Vector256.FusedMultiplyAdd(a7, m, c); a8 = Vector256.FusedMultiplyAdd(a8, m, c);
            a9 = Vector256.FusedMultiplyAdd(a9, m, c); a10 = Vector256.FusedMultiplyAdd(a10, m, c); a11 = Vector256.FusedMultiplyAdd(a11, m, c);
        }
        return Vector256.Sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float FmaScalar(long iterations)
    {
        float m = 0.9999999f, c = 1e-7f;
        float a0 = 0.1f, a1 = a0 + c, a2 = a1 + c, a3 = a2 + c, a4 = a3 + c, a5 = a4 + c, a6 = a5 + c, a7 = a6 + c, a8 = a7 + c, a9 = a8 + c, a10 = a9 + c, a11 = a10 + c;
        for (long i = 0; i < iterations; i++)
        {
            a0 = MathF.FusedMultiplyAdd(a0, m, c); a1 = MathF.FusedMultiplyAdd(a1, m, c); a2 = MathF.FusedMultiplyAdd(a2, m, c);
            a3 = MathF.FusedMultiplyAdd(a3, m, c); a4 = MathF.FusedMultiplyAdd(a4, m, c); a5 = MathF.FusedMultiplyAdd(a5, m, c);
            a6 = MathF.FusedMultiplyAdd(a6, m, c); a7 = MathF.FusedMultiplyAdd(a7, m, c); a8 = MathF.FusedMultiplyAdd(a8, m, c);
            a9 = MathF.FusedMultiplyAdd(a9, m, c); a10 = MathF.FusedMultiplyAdd(a10, m, c); a11 = MathF.FusedMultiplyAdd(a11, m, c);
        }
        return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    }
}

/// <summary>Warm-up for timed calls.</summary>
internal static class Timing
{
    /// <summary>
    /// Calls <paramref name="once"/> until its timings settle — the last three within 10 % of each other, so
    /// tiered JIT compilation and first-touch effects are over — or until <paramref name="budgetSeconds"/> have
    /// passed (a call that long is past JIT effects after one run), at most <paramref name="maxCalls"/> calls.
    /// Returns the number of warm-up calls.
    /// </summary>
    public static int WarmUp(Action once, double budgetSeconds = 3, int maxCalls = 30)
    {
        var times = new List<double>();
        var total = Stopwatch.StartNew();
        while (true)
        {
            var sw = Stopwatch.StartNew();
            once();
            times.Add(sw.Elapsed.TotalSeconds);
            if (times.Count >= 3 && times[^3..].Max() <= 1.1 * times[^3..].Min()) break;
            if (total.Elapsed.TotalSeconds >= budgetSeconds || times.Count >= maxCalls) break;
        }
        return times.Count;
    }
}
