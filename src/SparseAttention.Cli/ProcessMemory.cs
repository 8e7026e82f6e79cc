using System.Diagnostics;

namespace SparseAttention.Cli;

/// <summary>This process's resident memory (peak and current) and the memory the machine has left, for the bench and
/// compare figures.</summary>
internal static class ProcessMemory
{
    // Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) so each figure gets its own peak. Memory freed before
    // (the .NET wrappers of earlier tensors, heap pages glibc kept after earlier rows) is given back first, so a figure
    // is the measured code's peak on top of the process's base, not what earlier rows left behind.
    public static void ResetPeakRss()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        if (OperatingSystem.IsLinux()) MallocTrim(0);
        try { File.WriteAllText("/proc/self/clear_refs", "5"); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "malloc_trim")]
    private static extern int MallocTrim(nuint pad);

    /// <summary>Peak resident memory since the last <see cref="ResetPeakRss"/> (VmHWM), MB.</summary>
    public static double PeakRssMb() => KiloBytes("/proc/self/status", "VmHWM:") / 1024.0 ?? Process.GetCurrentProcess().PeakWorkingSet64 / 1048576.0;

    /// <summary>Resident memory now (VmRSS), MB.</summary>
    public static double CurrentRssMb() => KiloBytes("/proc/self/status", "VmRSS:") / 1024.0 ?? Process.GetCurrentProcess().WorkingSet64 / 1048576.0;

    /// <summary>A kB field (<c>"Name:   123 kB"</c>) of a /proc file; null where there is none (not Linux).</summary>
    private static double? KiloBytes(string path, string field)
    {
        try
        {
            foreach (var line in File.ReadLines(path))
                if (line.StartsWith(field, StringComparison.Ordinal))
                    return double.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]);
        }
        catch (IOException) { }
        return null;
    }

    /// <summary>Memory this process can still take: MemAvailable of /proc/meminfo, else the GC's view of the machine.</summary>
    public static double AvailableBytes() => KiloBytes("/proc/meminfo", "MemAvailable:") * 1024 ?? GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
}
