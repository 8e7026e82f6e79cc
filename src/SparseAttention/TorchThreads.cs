namespace SparseAttention;

/// <summary>
/// How libtorch's OpenMP worker threads wait between parallel regions — a setting that must be made before libtorch
/// loads, since its OpenMP runtime reads it once at start-up.
/// </summary>
public static class TorchThreads
{
    /// <summary>The OpenMP variable that selects how idle worker threads wait.</summary>
    public const string WaitPolicyVariable = "OMP_WAIT_POLICY";

    /// <summary>
    /// Makes libtorch's OpenMP workers sleep when they run out of work (<c>OMP_WAIT_POLICY=PASSIVE</c>) instead of
    /// spinning for a while first, unless the variable is already set (a user's value is kept). <b>Call it before the
    /// first TorchSharp call</b> (first thing in <c>Main</c>); later it changes nothing for this process.
    /// </summary>
    /// <remarks>
    /// Why: the spinning workers hold their cores while the attention kernels' .NET worker threads (and every other
    /// process) want them. A training step of the bench's routing LM (T = 8192) on a 2-core VM that other jobs loaded
    /// (load ≈ 10) took 3.5–3.7 s with the default and 1.75 s passive; libgomp's spin was 41 % of the step's CPU
    /// samples. Sets the variable in .NET's environment too, so child processes inherit it.
    /// </remarks>
    /// <returns>True when the variable is <c>PASSIVE</c> afterwards (set now or before).</returns>
    public static bool UsePassiveWaits() =>
        string.Equals(TorchAllocator.SetNativeDefault(WaitPolicyVariable, "PASSIVE"), "PASSIVE", StringComparison.OrdinalIgnoreCase);
}
