using System.Runtime.InteropServices;
using System.Runtime.Intrinsics.X86;
using TorchSharp;

namespace SparseAttention;

/// <summary>What <see cref="MklDispatch.UseCpuFeatures"/> found and did.</summary>
public enum MklDispatchStatus
{
    /// <summary>MKL now picks its kernels by the CPU's instruction sets (AVX-512 here) instead of by vendor.</summary>
    Applied,
    /// <summary>MKL already did (an Intel CPU, or an earlier call).</summary>
    AlreadyByFeatures,
    /// <summary>Nothing to gain: not Linux x64, or the CPU has no AVX-512 (MKL's own AVX2 kernels are then the right choice).</summary>
    NotApplicable,
    /// <summary>This libtorch has no MKL, or its vendor check is not the code this method knows; nothing was changed.</summary>
    Unrecognised,
    /// <summary>The user kept MKL's vendor dispatch (<see cref="MklDispatch.OptOutVariable"/> = 1).</summary>
    OptedOut,
}

/// <summary>
/// MKL, which libtorch's CPU build uses for float32 matrix products, chooses its kernels by CPU <em>vendor</em>: on
/// an AMD CPU with AVX-512 it still runs its AVX2 kernels, at about half the speed its AVX-512 kernels reach on the
/// same machine (measured: 8192×256 by 256×768 products 62–75 → 142–149 GFLOP/s on a 2-core AMD EPYC VM, the
/// weight-gradient shape 134 → 228–242). Projections, feed-forward and logits are most of a training step.
/// </summary>
/// <remarks>
/// MKL keeps its "is this a GenuineIntel CPU?" answer in a one-word cache that its check fills on first use
/// (<c>mkl_serv_intel_cpu_true</c>). <see cref="UseCpuFeatures"/> fills that cache with "yes" so that MKL's
/// dispatcher goes on to choose by the instruction sets the CPU reports — the effect of the well-known
/// <c>mkl_serv_intel_cpu_true</c> override, without replacing code. It changes nothing unless the exported check's
/// machine code is exactly the shape it knows (load cache, test, return), so another libtorch build is left alone.
/// Results stay float32-exact up to the summation order of a different kernel.
/// </remarks>
public static partial class MklDispatch
{
    /// <summary>Set this environment variable to <c>1</c> to keep MKL's vendor-based choice.</summary>
    public const string OptOutVariable = "SPARSE_ATTN_MKL_VENDOR_DISPATCH";

    private static MklDispatchStatus? done;

    /// <summary>
    /// Makes MKL choose its kernels by CPU features (see the class remarks). <b>Call it before the first matrix
    /// product</b> (first thing in <c>Main</c>, after <see cref="TorchAllocator.EnableTransparentHugePages"/>):
    /// MKL also caches the kernel family it picked. Idempotent; loads libtorch if it is not loaded yet.
    /// </summary>
    public static MklDispatchStatus UseCpuFeatures()
    {
        lock (typeof(MklDispatch))
            return done ??= Apply();
    }

    /// <summary>The status of the last <see cref="UseCpuFeatures"/> call, or null when it was never called.</summary>
    public static MklDispatchStatus? Status => done;

    private static unsafe MklDispatchStatus Apply()
    {
        if (Environment.GetEnvironmentVariable(OptOutVariable) == "1") return MklDispatchStatus.OptedOut;
        if (!OperatingSystem.IsLinux() || RuntimeInformation.ProcessArchitecture != Architecture.X64 || !Avx512F.IsSupported)
            return MklDispatchStatus.NotApplicable;
        torch.InitializeDeviceType(DeviceType.CPU);   // loads libtorch_cpu.so, where MKL lives (no tensor is allocated)
        nint library = DlOpen("libtorch_cpu.so", RtldNow | RtldNoLoad);
        if (library == 0) return MklDispatchStatus.Unrecognised;
        byte* check = (byte*)DlSym(library, "mkl_serv_intel_cpu_true");
        if (check == null) return MklDispatchStatus.Unrecognised;
        // mov eax, [rip + d]; test eax, eax; js <compute>; ret — the cache is the 32-bit word at (next instruction + d).
        ReadOnlySpan<byte> head = new(check, 11);
        if (head[0] != 0x8B || head[1] != 0x05 || !head[6..].SequenceEqual((ReadOnlySpan<byte>)[0x85, 0xC0, 0x78, 0x01, 0xC3]))
            return MklDispatchStatus.Unrecognised;
        int* cache = (int*)(check + 6 + *(int*)(check + 2));
        if (*cache == 1) return MklDispatchStatus.AlreadyByFeatures;
        if (*cache != -1 && *cache != 0) return MklDispatchStatus.Unrecognised;   // -1 = not asked yet, 0 = not Intel
        *cache = 1;
        return MklDispatchStatus.Applied;
    }

    private const int RtldNow = 2, RtldNoLoad = 4;

    [LibraryImport("libc", EntryPoint = "dlopen", StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint DlOpen(string file, int flags);

    [LibraryImport("libc", EntryPoint = "dlsym", StringMarshalling = StringMarshalling.Utf8)]
    private static partial nint DlSym(nint library, string symbol);
}
