using System.Diagnostics.CodeAnalysis;
using System.Runtime.InteropServices;
using System.Text;

namespace SparseAttention.Distributed;

/// <summary>
/// MPI's world communicator for a process started by Open MPI's <c>mpirun</c>, bound directly to Open MPI's
/// <c>libmpi.so.40</c> (Open MPI 4.x and 5.x) with function pointers: MPI_Init_thread, MPI_Comm_rank/size,
/// MPI_Allreduce, MPI_Bcast, MPI_Barrier, MPI_Abort, MPI_Finalize(d) and MPI_Error_string, nothing else.
/// </summary>
/// <remarks>
/// <para>Why not the MPI.NET package: MPI.NET 1.4.0 calls <c>msmpi.dll</c> with Microsoft MPI's integer handles
/// (<c>MPI_COMM_WORLD = 0x44000000</c>); Open MPI's handles are addresses of its predefined objects, so MPI.NET
/// mapped onto libmpi.so.40 crashes in its first call. Here the handles are those addresses, read from the library's
/// exports (<c>ompi_mpi_comm_world</c>, <c>ompi_mpi_float</c>, …).</para>
/// <para>libmpi is only loaded when Open MPI's launcher variables are present (<see cref="LaunchedByMpirun"/>), so a
/// machine without MPI never touches it. MPI can be initialised once per process: <see cref="FromEnvironment"/>
/// returns the same instance until it is disposed (which finalises MPI).</para>
/// </remarks>
public sealed unsafe class MpiCommunicator : ICommunicator
{
    /// <summary>The shared library bound to.</summary>
    public const string LibraryName = "libmpi.so.40";

    private const int ThreadSerialized = 2;          // MPI_THREAD_SERIALIZED in Open MPI's mpi.h
    private const int MaxChunk = 1 << 30;            // elements per call: MPI counts are int

    private static readonly object Gate = new();
    private static MpiCommunicator? current;

    private readonly IntPtr world, floatType, doubleType, byteType, sumOp;
    private readonly delegate* unmanaged<int*, IntPtr, int, int*, int> initThread;
    private readonly delegate* unmanaged<IntPtr, int*, int> commRank, commSize;
    private readonly delegate* unmanaged<void*, void*, int, IntPtr, IntPtr, IntPtr, int> allreduce;
    private readonly delegate* unmanaged<void*, int, IntPtr, int, IntPtr, int> bcast;
    private readonly delegate* unmanaged<IntPtr, int> barrier;
    private readonly delegate* unmanaged<IntPtr, int, int> abort;
    private readonly delegate* unmanaged<int> finalize;
    private readonly delegate* unmanaged<int*, int> finalized;
    private readonly delegate* unmanaged<int, byte*, int*, int> errorString;
    private bool disposed;

    /// <summary>Whether Open MPI's launcher (<c>mpirun</c>/<c>mpiexec</c>) started this process: its
    /// <c>OMPI_COMM_WORLD_SIZE</c> variable is set. Reads the environment only.</summary>
    public static bool LaunchedByMpirun => Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_SIZE") is not null;

    /// <summary>
    /// The world communicator when this process was started by Open MPI's <c>mpirun</c> (MPI initialised on first
    /// call), else null without loading anything. Throws <see cref="InvalidOperationException"/> when another MPI's
    /// launcher started the process (MPICH / Intel MPI set <c>PMI_RANK</c>) or libmpi.so.40 cannot be loaded —
    /// running N independent copies of a training job would be worse than stopping.
    /// </summary>
    public static MpiCommunicator? FromEnvironment()
    {
        if (!LaunchedByMpirun)
        {
            if (Environment.GetEnvironmentVariable("PMI_RANK") is not null || Environment.GetEnvironmentVariable("PMI_SIZE") is not null)
                throw new InvalidOperationException("this process was started by an MPI launcher other than Open MPI's (PMI_RANK/PMI_SIZE are set, " +
                                                    "OMPI_COMM_WORLD_SIZE is not); data-parallel training binds to Open MPI's libmpi.so.40: launch with Open MPI's mpirun.");
            return null;
        }
        lock (Gate)
        {
            if (current is { disposed: false }) return current;
            if (current is not null) throw new InvalidOperationException("MPI was already finalised in this process; it can be initialised only once.");
            if (!NativeLibrary.TryLoad(LibraryName, out var library))
                throw new InvalidOperationException($"this process was started by mpirun (OMPI_COMM_WORLD_SIZE is set) but {LibraryName} cannot be loaded; " +
                                                    "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev, or scripts/ensure-openmpi.sh).");
            return current = new MpiCommunicator(library);
        }
    }

    private MpiCommunicator(IntPtr library)
    {
        IntPtr Export(string name) => NativeLibrary.TryGetExport(library, name, out var address) ? address
            : throw new InvalidOperationException($"{LibraryName} has no export '{name}': not Open MPI 4.x/5.x.");
        world = Export("ompi_mpi_comm_world");
        floatType = Export("ompi_mpi_float");
        doubleType = Export("ompi_mpi_double");
        byteType = Export("ompi_mpi_byte");
        sumOp = Export("ompi_mpi_op_sum");
        initThread = (delegate* unmanaged<int*, IntPtr, int, int*, int>)Export("MPI_Init_thread");
        commRank = (delegate* unmanaged<IntPtr, int*, int>)Export("MPI_Comm_rank");
        commSize = (delegate* unmanaged<IntPtr, int*, int>)Export("MPI_Comm_size");
        allreduce = (delegate* unmanaged<void*, void*, int, IntPtr, IntPtr, IntPtr, int>)Export("MPI_Allreduce");
        bcast = (delegate* unmanaged<void*, int, IntPtr, int, IntPtr, int>)Export("MPI_Bcast");
        barrier = (delegate* unmanaged<IntPtr, int>)Export("MPI_Barrier");
        abort = (delegate* unmanaged<IntPtr, int, int>)Export("MPI_Abort");
        finalize = (delegate* unmanaged<int>)Export("MPI_Finalize");
        finalized = (delegate* unmanaged<int*, int>)Export("MPI_Finalized");
        errorString = (delegate* unmanaged<int, byte*, int*, int>)Export("MPI_Error_string");

        int provided, rank, size;
        Checked(initThread(null, IntPtr.Zero, ThreadSerialized, &provided), "MPI_Init_thread");
        Checked(commRank(world, &rank), "MPI_Comm_rank");
        Checked(commSize(world, &size), "MPI_Comm_size");
        Rank = rank;
        Size = size;
    }

    /// <inheritdoc/>
    public int Rank { get; }

    /// <inheritdoc/>
    public int Size { get; }

    /// <inheritdoc/>
    public void AllReduceSum(Span<float> values)
    {
        fixed (float* p = values) AllReduce(p, values.Length, sizeof(float), floatType);
    }

    /// <inheritdoc/>
    public void AllReduceSum(Span<double> values)
    {
        fixed (double* p = values) AllReduce(p, values.Length, sizeof(double), doubleType);
    }

    private void AllReduce(void* data, int length, int elementSize, IntPtr type)
    {
        ThrowIfDisposed();
        var inPlace = (void*)1;                                                  // MPI_IN_PLACE in Open MPI's mpi.h
        for (long start = 0; start < length; start += MaxChunk)
        {
            int count = (int)Math.Min(MaxChunk, length - start);
            Checked(allreduce(inPlace, (byte*)data + start * elementSize, count, type, sumOp, world), "MPI_Allreduce");
        }
    }

    /// <inheritdoc/>
    public void Broadcast(Span<byte> data, int root)
    {
        ThrowIfDisposed();
        Check.That(root >= 0 && root < Size, nameof(root), $"must be a rank in [0, {Size}), got {root}.");
        fixed (byte* p = data)
            for (long start = 0; start < data.Length; start += MaxChunk)
                Checked(bcast(p + start, (int)Math.Min(MaxChunk, data.Length - start), byteType, root, world), "MPI_Bcast");
    }

    /// <inheritdoc/>
    public void Barrier()
    {
        ThrowIfDisposed();
        Checked(barrier(world), "MPI_Barrier");
    }

    /// <inheritdoc/>
    [DoesNotReturn]
    public void Abort(int exitCode)
    {
        Console.Out.Flush();
        Console.Error.Flush();
        if (!disposed) abort(world, exitCode);
        Environment.Exit(exitCode);                                              // MPI_Abort returned (it should not)
    }

    /// <summary>Finalises MPI (every rank must call it); MPI cannot be initialised again in this process.</summary>
    public void Dispose()
    {
        lock (Gate)
        {
            if (disposed) return;
            disposed = true;
            int done;
            if (finalized(&done) == 0 && done == 0) finalize();
        }
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(disposed, this);

    private void Checked(int code, string call)
    {
        if (code == 0) return;
        var text = new byte[512];                                                // MPI_MAX_ERROR_STRING is 256
        int length = 0;
        fixed (byte* p = text)
            if (errorString(code, p, &length) != 0) length = 0;
        throw new InvalidOperationException($"{call} failed with MPI error {code}: {Encoding.ASCII.GetString(text, 0, Math.Clamp(length, 0, text.Length))}");
    }
}
