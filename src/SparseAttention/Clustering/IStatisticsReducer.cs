using static TorchSharp.torch;

namespace SparseAttention.Clustering;

/// <summary>
/// Combines data-derived state across the replicas of a data-parallel run, so every replica takes the same
/// <see cref="OnlineKMeans"/> steps as one process that saw all replicas' batches (the Routing Transformer authors
/// sum the k-means statistics across replicas before the EMA update). Every replica must make the same calls in the
/// same order; <see cref="SparseAttention.Distributed.DataParallel"/> implements it over MPI.
/// </summary>
public interface IStatisticsReducer
{
    /// <summary>Replaces every element of every tensor of <paramref name="values"/> (float64, any device) by its sum over
    /// all replicas, in place, in one collective call.</summary>
    void SumInPlace(IReadOnlyList<Tensor> values);

    /// <summary>The concatenation along dimension 0 of every replica's <paramref name="local"/> (float32, float64 or
    /// bool), in replica order; the other dimensions must agree across replicas.</summary>
    Tensor Concatenate(Tensor local);
}
