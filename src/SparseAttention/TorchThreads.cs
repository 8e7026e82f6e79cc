namespace SparseAttention;

/// <summary>
/// How long libtorch's OpenMP worker threads spin before they sleep between parallel regions — a setting that must be
/// made before libtorch loads, since its OpenMP runtime (GNU libgomp) reads it once at start-up.
/// </summary>
public static class TorchThreads
{
    /// <summary>libgomp's spin count: busy-wait iterations of an idle worker before it sleeps.</summary>
    public const string SpinCountVariable = "GOMP_SPINCOUNT";

    /// <summary>The standard OpenMP wait policy; when the user set it, it is left to decide.</summary>
    public const string WaitPolicyVariable = "OMP_WAIT_POLICY";

    /// <summary>The spin count set by <see cref="LimitSpinWaits"/>: 20,000 iterations (libgomp's default is 300,000).</summary>
    public const string ShortSpinCount = "20000";

    /// <summary>
    /// Makes libtorch's idle OpenMP workers spin briefly (<c>GOMP_SPINCOUNT=20000</c>) before sleeping, unless the user set
    /// <c>GOMP_SPINCOUNT</c> or <c>OMP_WAIT_POLICY</c> (their choice is kept). <b>Call it before the first TorchSharp call</b>
    /// (first thing in <c>Main</c>); later it changes nothing for this process.
    /// </summary>
    /// <remarks>
    /// Why: with libgomp's default spin, idle workers hold their cores while the attention kernels' .NET worker threads
    /// (and every other process) want them; sleeping at once instead costs a wake-up per parallel region. Measured with
    /// <c>sparse-attn bench --model --model-kinds dense,routing --runs 5</c> (T = 8192) on a 2-core AMD EPYC VM,
    /// 2026-12-02: idle, the routing step took 700–750 ms with the default spin, 740–840 ms with
    /// <c>OMP_WAIT_POLICY=PASSIVE</c> and 697 ms with this short spin (dense 1760–1970, 1530–1610 and 1409 ms); with
    /// other jobs loading the machine (load ≈ 10) the routing step took 3.5–3.7 s by default, 1.75 s passive and
    /// 1.9–2.5 s with a 10,000 spin. Sets the variable in .NET's environment too, so child processes inherit it.
    /// </remarks>
    /// <returns>The spin count in force afterwards, or null when the user chose a wait policy instead.</returns>
    public static string? LimitSpinWaits()
    {
        if (TorchAllocator.NativeVariable(WaitPolicyVariable) is not null) return TorchAllocator.NativeVariable(SpinCountVariable);
        return TorchAllocator.SetNativeDefault(SpinCountVariable, ShortSpinCount);
    }
}
