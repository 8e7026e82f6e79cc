using System.Diagnostics;
using System.Globalization;

namespace SparseAttention.Cli;

/// <summary>
/// One writer per run folder: <c>train.lock</c> created exclusively (<see cref="FileMode.CreateNew"/>), holding the
/// owner's PID and process start time. A lock whose process is gone (or whose PID now belongs to a process started
/// at another time) is stale and is taken over; a live one makes <see cref="Acquire"/> refuse. Disposing removes it.
/// </summary>
internal sealed class RunLock : IDisposable
{
    /// <summary>Name of the lock file in the run folder.</summary>
    public const string FileName = "train.lock";

    private readonly FileStream stream;
    private readonly string path;

    private RunLock(FileStream stream, string path)
    {
        this.stream = stream;
        this.path = path;
    }

    /// <summary>Takes the lock of <paramref name="runDir"/> (which must exist); throws <see cref="CliFailureException"/>
    /// naming the owner when another live process holds it. <paramref name="onStale"/> hears about a removed stale lock.</summary>
    public static RunLock Acquire(string runDir, Action<string>? onStale = null)
    {
        string path = Path.Combine(runDir, FileName);
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                var stream = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.Read);
                using var self = Process.GetCurrentProcess();
                var text = $"{Environment.ProcessId}\n{StartTicks(self).ToString(CultureInfo.InvariantCulture)}\n{Environment.MachineName}\n";
                stream.Write(System.Text.Encoding.UTF8.GetBytes(text));
                stream.Flush(flushToDisk: true);
                return new RunLock(stream, path);
            }
            catch (IOException) when (File.Exists(path) && attempt < 3)
            {
                var (pid, ticks, host) = ReadOwner(path);
                if (pid is null && attempt == 0) { Thread.Sleep(200); continue; }      // being written right now
                if (pid is int p && IsAlive(p, ticks, host))
                    throw new CliFailureException($"--out: {runDir} is in use by another train run (PID {p}, {path}); " +
                                                  "wait for it to finish or choose another folder.");
                try { File.Delete(path); } catch (IOException) { }
                onStale?.Invoke($"removed a stale lock {path} (PID {(pid?.ToString(CultureInfo.InvariantCulture) ?? "unreadable")} is not running)");
            }
        }
    }

    private static long StartTicks(Process p)
    {
        try { return p.StartTime.ToUniversalTime().Ticks; }
        catch (Exception e) when (e is InvalidOperationException or NotSupportedException or System.ComponentModel.Win32Exception) { return 0; }
    }

    private static (int? Pid, long Ticks, string Host) ReadOwner(string path)
    {
        try
        {
            var lines = File.ReadAllLines(path);
            int? pid = lines.Length > 0 && int.TryParse(lines[0], NumberStyles.Integer, CultureInfo.InvariantCulture, out int n) ? n : null;
            long ticks = lines.Length > 1 && long.TryParse(lines[1], NumberStyles.Integer, CultureInfo.InvariantCulture, out long t) ? t : 0;
            return (pid, ticks, lines.Length > 2 ? lines[2] : "");
        }
        catch (IOException) { return (null, 0, ""); }
    }

    /// <summary>Whether the process that wrote the lock still runs: same PID and (when recorded) the same start time.
    /// A lock from another machine (shared folder) is taken as live: its process cannot be checked from here.</summary>
    private static bool IsAlive(int pid, long ticks, string host)
    {
        if (host.Length > 0 && host != Environment.MachineName) return true;
        try
        {
            using var p = Process.GetProcessById(pid);
            if (p.HasExited) return false;
            long now = StartTicks(p);
            // Start times read back may differ by rounding; a reused PID differs by far more than a second.
            return ticks == 0 || now == 0 || Math.Abs(now - ticks) < TimeSpan.TicksPerSecond;
        }
        catch (ArgumentException) { return false; }           // no such process
        catch (InvalidOperationException) { return false; }
    }

    public void Dispose()
    {
        stream.Dispose();
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
