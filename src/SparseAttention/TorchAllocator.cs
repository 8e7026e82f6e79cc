using System.Runtime.InteropServices;

namespace SparseAttention;

/// <summary>
/// Settings of libtorch's CPU allocator, which must be made before the process allocates its first tensor.
/// </summary>
public static partial class TorchAllocator
{
    /// <summary>The C environment variable libtorch reads to back large CPU allocations with transparent huge pages.</summary>
    public const string HugePagesVariable = "THP_MEM_ALLOC_ENABLE";

    /// <summary>
    /// Makes libtorch back CPU tensors of 2 MiB and more with transparent huge pages: sets
    /// <c>THP_MEM_ALLOC_ENABLE=1</c> in the process's C environment (with libc <c>setenv</c>; .NET's
    /// <see cref="Environment.SetEnvironmentVariable(string, string)"/> does not reach native <c>getenv</c>),
    /// unless the variable is already set — a value the user chose, such as 0, is kept.
    /// <para><b>Call it before the first tensor allocation</b> (first thing in <c>Main</c>): libtorch reads the
    /// variable once, at its first CPU allocation, and a later call changes nothing for this process.</para>
    /// </summary>
    /// <remarks>
    /// Why: every large tensor is a fresh memory mapping, and the first touch of each 4 KiB page costs a page
    /// fault (~14 µs on the 2-core VM this was measured on). 2 MiB pages take 512× fewer faults: local attention
    /// at T = 16384 ran its forward in half the time and its forward+backward ~2.7× faster. Linux only (a no-op
    /// elsewhere); it has an effect when <c>/sys/kernel/mm/transparent_hugepage/enabled</c> is <c>always</c> or
    /// <c>madvise</c>. Sets the variable in .NET's environment too, so child processes inherit it.
    /// </remarks>
    /// <returns>True when the variable is <c>1</c> in the C environment afterwards (set now or before).</returns>
    public static bool EnableTransparentHugePages()
    {
        if (!OperatingSystem.IsLinux()) return false;
        return SetNativeDefault(HugePagesVariable, "1") == "1";
    }

    /// <summary>The variable that turns <see cref="RetainFreedMemory"/> off when set to <c>0</c>.</summary>
    public const string RetainFreedMemoryVariable = "SPARSE_ATTN_RETAIN_FREED_MEMORY";

    /// <summary>
    /// Keeps the memory of freed tensors in the process for the next allocation instead of returning it to the
    /// operating system: glibc's <c>malloc</c> serves every allocation from one heap (<c>mallopt(M_MMAP_MAX, 0)</c>,
    /// <c>M_ARENA_MAX</c> 1: the per-thread heaps are unmapped whenever they empty) and does not trim it
    /// (<c>M_TRIM_THRESHOLD</c> 2 GiB). A training step allocates and frees the same
    /// sizes every step, so from the second step on its tensors land on pages that are already mapped — the
    /// caching-allocator behaviour PyTorch has on GPUs, here for libtorch's CPU allocator (which calls
    /// <c>malloc</c>/<c>free</c> directly).
    /// <para>Without it, tensors of more than 32 MiB are fresh memory mappings and the heap top above 2× that is
    /// returned after every step, so each step pays the first touch of its pages again (page zeroing and faults
    /// were ~20 % of the CPU samples of a routing LM step at T = 8192 on the 2-core VM this was measured on).</para>
    /// <para>The cost: the process's resident memory stays at its peak (freed memory is reused, not returned).
    /// Call it early (it governs allocations made afterwards). Linux with glibc only; does nothing when
    /// <c>SPARSE_ATTN_RETAIN_FREED_MEMORY=0</c> or when the user tunes malloc through <c>GLIBC_TUNABLES</c>.</para>
    /// </summary>
    /// <returns>True when both settings were applied.</returns>
    public static bool RetainFreedMemory() => FreedMemoryRetained = TryRetainFreedMemory();

    /// <summary>Whether <see cref="RetainFreedMemory"/> has been applied in this process.</summary>
    public static bool FreedMemoryRetained { get; private set; }

    private static bool TryRetainFreedMemory()
    {
        if (!OperatingSystem.IsLinux()) return false;
        if (NativeVariable(RetainFreedMemoryVariable) == "0") return false;
        if (NativeVariable("GLIBC_TUNABLES") is string tunables && tunables.Contains("glibc.malloc.", StringComparison.Ordinal)) return false;
        try
        {
            // mallopt returns 1 on success, 0 when the C library refuses (or, as musl does, ignores) the parameter.
            return MallOpt(MallocMmapMax, 0) == 1 && MallOpt(MallocTrimThreshold, int.MaxValue) == 1 && MallOpt(MallocArenaMax, 1) == 1;
        }
        catch (EntryPointNotFoundException) { return false; }
    }

    private const int MallocTrimThreshold = -1;   // M_TRIM_THRESHOLD in glibc's malloc.h
    private const int MallocMmapMax = -4;         // M_MMAP_MAX
    private const int MallocArenaMax = -8;        // M_ARENA_MAX

    [LibraryImport("libc", EntryPoint = "mallopt")]
    private static partial int MallOpt(int parameter, int value);

    /// <summary>Sets <paramref name="name"/> to <paramref name="value"/> in the C environment (and .NET's, for child
    /// processes) unless it is set already; returns the value in force afterwards, or null where setting failed.</summary>
    internal static string? SetNativeDefault(string name, string value)
    {
        string? current = NativeVariable(name);
        if (current is not null) return current;                  // the user's choice is kept
        if (SetEnv(name, value, overwrite: 0) != 0) return null;
        Environment.SetEnvironmentVariable(name, value);
        return value;
    }

    /// <summary>The value of <paramref name="name"/> in the process's C environment (what native code sees), or null.</summary>
    public static string? NativeVariable(string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (!OperatingSystem.IsLinux()) return Environment.GetEnvironmentVariable(name);
        return Marshal.PtrToStringUTF8(GetEnv(name));
    }

    /// <summary>Bytes of this process's memory backed by transparent huge pages (<c>AnonHugePages</c> of
    /// <c>/proc/self/smaps_rollup</c>), or null where that file does not exist.</summary>
    public static long? AnonHugePagesBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/smaps_rollup"))
                if (line.StartsWith("AnonHugePages:", StringComparison.Ordinal))
                    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;   // "AnonHugePages:  4096 kB"
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        return null;
    }

    [LibraryImport("libc", EntryPoint = "setenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int SetEnv(string name, string value, int overwrite);

    [LibraryImport("libc", EntryPoint = "getenv", StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint GetEnv(string name);
}
