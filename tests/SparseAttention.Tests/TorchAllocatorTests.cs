using SparseAttention.Kernels;
using TorchSharp;
using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace SparseAttention.Tests;

/// <summary>
/// <see cref="TorchAllocator.EnableTransparentHugePages"/>: the variable reaches the C environment (what libtorch reads),
/// a user's value is kept, and — in a child process, since this one allocated tensors long ago — the CLI that calls it
/// first thing gets its tensors on huge pages (AnonHugePages), while a user's 0 turns that off.
/// </summary>
public sealed class TorchAllocatorTests
{
    [Fact]
    public void SetsTheVariableInTheCEnvironmentUnlessTheUserSetIt()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux(), "libtorch reads THP_MEM_ALLOC_ENABLE on Linux only");
        string? before = TorchAllocator.NativeVariable(TorchAllocator.HugePagesVariable);
        bool enabled = TorchAllocator.EnableTransparentHugePages();
        string? after = TorchAllocator.NativeVariable(TorchAllocator.HugePagesVariable);
        if (before is null)
        {
            Assert.True(enabled);
            Assert.Equal("1", after);
            Assert.Equal("1", Environment.GetEnvironmentVariable(TorchAllocator.HugePagesVariable));   // children inherit it
        }
        else
        {
            Assert.Equal(before, after);                 // a user's choice is kept
            Assert.Equal(before == "1", enabled);
        }
        Assert.True(TorchAllocator.EnableTransparentHugePages() == (after == "1"));   // idempotent
    }

    [Fact]
    public unsafe void AFreedTensorsMemoryIsReusedWithoutPageFaultsOnceRetained()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux(), "mallopt and /proc/thread-self are Linux (glibc) features");
        Assert.SkipWhen(TorchAllocator.NativeVariable(TorchAllocator.RetainFreedMemoryVariable) == "0"
            || (TorchAllocator.NativeVariable("GLIBC_TUNABLES") ?? "").Contains("glibc.malloc."), "retention turned off by the environment");
        Assert.True(TorchAllocator.RetainFreedMemory(), "mallopt refused the settings");

        // 48 MiB: above glibc's largest mmap threshold (32 MiB), so without retention every allocation is a fresh mapping.
        const long floats = 12L << 20;
        long pages = floats * sizeof(float) / Environment.SystemPageSize;
        long fewest = long.MaxValue;
        for (int attempt = 0; attempt < 4; attempt++)
        {
            using var tensor = torch.empty(floats);
            long before = ThreadMinorFaults();
            byte* data = (byte*)FusedBlockSparseAttention.Pointer(tensor);
            for (long page = 0; page < pages; page++) data[page * Environment.SystemPageSize] = 1;   // first touch, on this thread
            long faults = ThreadMinorFaults() - before;
            if (attempt > 0) fewest = Math.Min(fewest, faults);   // attempt 0 maps the memory; later ones should reuse it
        }
        // Another test thread can take the freed block between two attempts, hence the best of three.
        Assert.True(fewest < pages / 100, $"{fewest} minor page faults touching a re-allocated {pages}-page tensor (expected ~0)");
    }

    /// <summary>Minor page faults of the calling thread (field 10 of /proc/thread-self/stat).</summary>
    private static long ThreadMinorFaults()
    {
        string stat = File.ReadAllText("/proc/thread-self/stat");
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');   // fields after "pid (comm) ": state is field 3
        return long.Parse(fields[10 - 3]);
    }

    [Fact]
    public void TheCliPutsLargeTensorsOnHugePagesUnlessTheUserSaysNo()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux(), "transparent huge pages are a Linux feature");
        string mode = File.Exists("/sys/kernel/mm/transparent_hugepage/enabled") ? File.ReadAllText("/sys/kernel/mm/transparent_hugepage/enabled") : "";
        Assert.SkipWhen(!mode.Contains("[always]") && !mode.Contains("[madvise]"), $"transparent huge pages are off on this machine ({mode.Trim()})");

        var (onVariable, onMb) = BenchInChild(userValue: null);
        Assert.Equal("1", onVariable);
        // q, k, v and the upstream gradient are 4 MiB each (1 × 8 × 2048 × 64 float32): on huge pages they add ≥ 16 MiB.
        Assert.True(onMb >= 16, $"AnonHugePages {onMb} MiB with THP_MEM_ALLOC_ENABLE=1");
        if (mode.Contains("[madvise]"))
        {
            // Only regions that ask for huge pages get them in this mode: a user's 0 must leave libtorch's tensors on 4 KiB pages.
            var (offVariable, offMb) = BenchInChild(userValue: "0");
            Assert.Equal("0", offVariable);
            Assert.True(offMb < onMb, $"AnonHugePages {offMb} MiB with THP_MEM_ALLOC_ENABLE=0 vs {onMb} MiB with 1");
        }
    }

    [Fact]
    public void TheCliShortensOpenMpSpinWaitsUnlessTheUserChoseOtherwise()
    {
        var none = new Dictionary<string, string?> { [TorchThreads.SpinCountVariable] = null, [TorchThreads.WaitPolicyVariable] = null };
        Assert.Equal(TorchThreads.ShortSpinCount, BenchInChild(none).GetProperty("gomp_spincount").GetString());
        var spin = BenchInChild(new Dictionary<string, string?>(none) { [TorchThreads.SpinCountVariable] = "300000" });
        Assert.Equal("300000", spin.GetProperty("gomp_spincount").GetString());
        var policy = BenchInChild(new Dictionary<string, string?>(none) { [TorchThreads.WaitPolicyVariable] = "ACTIVE" });
        Assert.Equal("ACTIVE", policy.GetProperty("omp_wait_policy").GetString());
        Assert.Equal("unset", policy.GetProperty("gomp_spincount").GetString());      // the user's policy decides
    }

    /// <summary>Runs <c>sparse-attn bench</c> (built beside the tests) in a child process, with <paramref name="environment"/>
    /// applied (null = variable removed), and returns the root of its JSON.</summary>
    internal static JsonElement BenchInChild(IReadOnlyDictionary<string, string?> environment)
    {
        string json = Path.Combine(Path.GetTempPath(), $"bench-child-{Guid.NewGuid():N}.json");
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var arg in new[] { Path.Combine(AppContext.BaseDirectory, "sparse-attn.dll"), "bench", "--seq-lens", "2048", "--attention", "dense",
                     "--pass", "forward", "--runs", "1", "--json", json })
            start.ArgumentList.Add(arg);
        foreach (var (name, value) in environment)
            if (value is null) start.Environment.Remove(name);
            else start.Environment[name] = value;
        try
        {
            using var child = Process.Start(start)!;
            var stderr = child.StandardError.ReadToEndAsync();
            child.StandardOutput.ReadToEnd();
            child.WaitForExit();
            Assert.True(child.ExitCode == 0, $"sparse-attn bench exited {child.ExitCode}:\n{stderr.Result}");
            using var doc = JsonDocument.Parse(File.ReadAllText(json));
            return doc.RootElement.Clone();
        }
        finally { File.Delete(json); }
    }

    private static (string Variable, double HugePagesMb) BenchInChild(string? userValue)
    {
        var root = BenchInChild(new Dictionary<string, string?> { [TorchAllocator.HugePagesVariable] = userValue });
        return (root.GetProperty("thp_mem_alloc_enable").GetString()!, root.GetProperty("anon_huge_pages_mb").GetDouble());
    }
}
