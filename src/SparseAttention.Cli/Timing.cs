using System.Diagnostics;

namespace SparseAttention.Cli;

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
