using System.Runtime.CompilerServices;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// An FMA-throughput loop at the fused kernels' vector width (<see cref="SimdWidth"/>), with the kernels' own multiply-add:
/// twelve independent chains a = a·m + c (enough to hide the FMA latency on every unit), summed so the loop cannot be
/// dropped. <c>bench</c> times it on every thread for the machine's float32 peak: 2 · 12 · lanes FLOPs per iteration.
/// </summary>
internal struct FmaProbe : ISimdKernel
{
    private long iterations;
    private float result;

    /// <summary>Runs <paramref name="iterations"/> iterations on this thread; returns the chains' sum.</summary>
    public static float Run(long iterations)
    {
        var probe = new FmaProbe { iterations = iterations };
        SimdWidth.Run(ref probe);
        return probe.result;
    }

    public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged => result = Loop<TS, TV>(iterations);

    [MethodImpl(MethodImplOptions.AggressiveOptimization | MethodImplOptions.NoInlining)]
    private static float Loop<TS, TV>(long iterations) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        TV m = TS.Broadcast(0.9999999f), c = TS.Broadcast(1e-7f);
        TV a0 = TS.Broadcast(0.1f), a1 = TS.Add(a0, c), a2 = TS.Add(a1, c), a3 = TS.Add(a2, c), a4 = TS.Add(a3, c), a5 = TS.Add(a4, c),
           a6 = TS.Add(a5, c), a7 = TS.Add(a6, c), a8 = TS.Add(a7, c), a9 = TS.Add(a8, c), a10 = TS.Add(a9, c), a11 = TS.Add(a10, c);
        for (long i = 0; i < iterations; i++)
        {
            a0 = TS.MulAdd(a0, m, c); a1 = TS.MulAdd(a1, m, c); a2 = TS.MulAdd(a2, m, c); a3 = TS.MulAdd(a3, m, c);
            a4 = TS.MulAdd(a4, m, c); a5 = TS.MulAdd(a5, m, c); a6 = TS.MulAdd(a6, m, c); a7 = TS.MulAdd(a7, m, c);
            a8 = TS.MulAdd(a8, m, c); a9 = TS.MulAdd(a9, m, c); a10 = TS.MulAdd(a10, m, c); a11 = TS.MulAdd(a11, m, c);
        }
        return TS.ReduceSum(TS.Add(TS.Add(TS.Add(TS.Add(a0, a1), TS.Add(a2, a3)), TS.Add(TS.Add(a4, a5), TS.Add(a6, a7))),
                                   TS.Add(TS.Add(a8, a9), TS.Add(a10, a11))));
    }
}
