using System.Diagnostics.CodeAnalysis;

namespace SparseAttention.Distributed;

/// <summary>
/// The collective operations data-parallel training needs from a process group (MPI's world communicator, or a
/// test double). Every member of the group must make the same calls in the same order with the same lengths.
/// </summary>
public interface ICommunicator : IDisposable
{
    /// <summary>This process's index in the group, 0 … <see cref="Size"/> − 1.</summary>
    int Rank { get; }

    /// <summary>Number of processes in the group.</summary>
    int Size { get; }

    /// <summary>Replaces every element of <paramref name="values"/> by its sum over the group (in place).</summary>
    void AllReduceSum(Span<float> values);

    /// <summary>Replaces every element of <paramref name="values"/> by its sum over the group (in place).</summary>
    void AllReduceSum(Span<double> values);

    /// <summary>Copies <paramref name="data"/> of rank <paramref name="root"/> into <paramref name="data"/> of every
    /// other rank (same length everywhere).</summary>
    void Broadcast(Span<byte> data, int root);

    /// <summary>Returns once every rank has called it.</summary>
    void Barrier();

    /// <summary>Ends every process of the group with <paramref name="exitCode"/> (a rank that failed must not leave
    /// the others waiting in a collective). Does not return.</summary>
    [DoesNotReturn]
    void Abort(int exitCode);
}
