using System.Text;
using SparseAttention.Clustering;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Distributed;

/// <summary>A data-parallel run whose ranks disagree (configuration, data, model layout, checkpoint): thrown on every
/// rank, before anything is trained.</summary>
public sealed class DataParallelMismatchException(string message) : Exception(message);

/// <summary>
/// Data-parallel training over a process group (MPI): every rank holds a full replica of the model, trains on its own
/// shard of each global batch, and the replicas stay identical because they start from rank 0's state and apply the
/// same averaged gradients and the same k-means steps.
/// </summary>
/// <remarks>
/// <para>Use in a custom loop (see the README section "Data-parallel training over MPI"):
/// <code>
/// using var dp = DataParallel.FromEnvironment();        // null unless started by mpirun
/// dp?.Attach(model);                                     // rank 0's parameters and buffers everywhere; k-means reduced
/// // each step: every rank builds the same global batch (shared seed), takes its rows, trains:
/// var batch = dp?.Shard(globalBatch) ?? globalBatch;     // (B/N, T)
/// loss.backward();
/// dp?.AverageGradients(model.parameters());              // one flattened all-reduce
/// optimizer.step(); OnlineKMeans.UpdateAll(model);       // statistics summed over the ranks first
/// </code></para>
/// <para>Sharding rule: global batch = N·b rows drawn identically on every rank; rank r trains rows [r·b, (r+1)·b). With
/// equal b and a mean loss per rank, the average of the ranks' gradients is the gradient of the mean loss over the N·b
/// rows, so N ranks with batch b follow one process with batch N·b (up to float rounding).</para>
/// </remarks>
public sealed class DataParallel : IStatisticsReducer, IDisposable
{
    private const int SpanChunk = 1 << 30;

    /// <param name="communicator">The process group; disposed with this object.</param>
    public DataParallel(ICommunicator communicator)
    {
        ArgumentNullException.ThrowIfNull(communicator);
        Communicator = communicator;
    }

    /// <summary>The data-parallel group of a process started by Open MPI's <c>mpirun</c>; null (nothing loaded) otherwise,
    /// so the same program runs single-process without MPI installed.</summary>
    public static DataParallel? FromEnvironment() => MpiCommunicator.FromEnvironment() is { } c ? new DataParallel(c) : null;

    /// <summary>The process group.</summary>
    public ICommunicator Communicator { get; }
    /// <summary>This replica's rank.</summary>
    public int Rank => Communicator.Rank;
    /// <summary>Number of replicas.</summary>
    public int Size => Communicator.Size;
    /// <summary>Rank 0: the one that writes checkpoints, logs and progress.</summary>
    public bool IsRoot => Rank == 0;

    /// <summary>Makes <paramref name="model"/> a replica: checks that every rank has the same state layout, copies rank
    /// 0's parameters and buffers to every rank and routes the k-means statistics through this group.</summary>
    public void Attach(nn.Module model)
    {
        ArgumentNullException.ThrowIfNull(model);
        RequireSame("model state (names, shapes, dtypes)", string.Join("\n",
            model.state_dict().OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Key} {kv.Value.dtype} [{string.Join(", ", kv.Value.shape)}]")));
        BroadcastState(model);
        OnlineKMeans.SetStatisticsReducer(model, this);
    }

    /// <summary>Copies every parameter and buffer of rank <paramref name="root"/>'s <paramref name="model"/> into the other
    /// ranks' (one broadcast of all their bytes, in state-dict name order).</summary>
    public unsafe void BroadcastState(nn.Module model, int root = 0)
    {
        ArgumentNullException.ThrowIfNull(model);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var state = model.state_dict().OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => kv.Value).ToList();
        var host = state.Select(t => t.detach().cpu().contiguous().clone()).ToList();   // any dtype, copied as bytes
        var sizes = host.Select(t => t.numel() * t.ElementSize).ToList();
        var bucket = empty(sizes.Sum(), dtype: ScalarType.Byte);                       // (Σ bytes)
        byte* start = (byte*)Pointer(bucket);
        long offset = 0;
        for (int i = 0; i < host.Count; offset += sizes[i], i++)
            Buffer.MemoryCopy((void*)Pointer(host[i]), start + offset, sizes[i], sizes[i]);
        for (long chunk = 0; chunk < offset; chunk += SpanChunk)
            Communicator.Broadcast(new Span<byte>(start + chunk, (int)Math.Min(SpanChunk, offset - chunk)), root);
        offset = 0;
        for (int i = 0; i < host.Count; offset += sizes[i], i++)
        {
            Buffer.MemoryCopy(start + offset, (void*)Pointer(host[i]), sizes[i], sizes[i]);
            state[i].copy_(host[i]);
        }
        GC.KeepAlive(bucket);
        GC.KeepAlive(host);
    }

    private static nint Pointer(Tensor t) => Kernels.FusedBlockSparseAttention.Pointer(t);

    /// <summary>
    /// Replaces the gradient of every trainable parameter by its mean over the ranks, with one all-reduce of one
    /// flattened float32 bucket (plus one small float64 all-reduce for <paramref name="sums"/> and the has-gradient flags).
    /// A parameter without a gradient on this rank counts as zero; it gets a gradient when any rank has one, so every
    /// rank's optimizer sees the same set.
    /// </summary>
    /// <param name="parameters">The model's parameters, in the same order on every rank.</param>
    /// <param name="sums">Optional values to sum (not average) over the ranks in the same call, e.g. losses and token
    /// counts; replaced in place.</param>
    public void AverageGradients(IEnumerable<Tensor> parameters, Span<double> sums = default)
    {
        ArgumentNullException.ThrowIfNull(parameters);
        var trainable = parameters.Where(p => p.requires_grad).ToList();
        var header = new double[trainable.Count + sums.Length];
        for (int i = 0; i < trainable.Count; i++) header[i] = trainable[i].grad is null ? 0 : 1;
        sums.CopyTo(header.AsSpan(trainable.Count));
        Communicator.AllReduceSum(header);
        header.AsSpan(trainable.Count).CopyTo(sums);

        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var members = new List<Tensor>();
        for (int i = 0; i < trainable.Count; i++)
        {
            if (header[i] == 0) continue;                                          // no rank has a gradient: stays null
            var p = trainable[i];
            if (p.grad is null) p.grad = zeros_like(p).DetachFromDisposeScope();
            members.Add(p.grad!);
        }
        if (members.Count == 0) return;
        var bucket = cat(members.Select(g => g.detach().to(ScalarType.Float32, CPU).flatten()).ToArray());   // (Σ numel)
        SumInPlace(bucket);
        bucket.div_(Size);
        long offset = 0;
        foreach (var g in members)
        {
            g.copy_(bucket.narrow(0, offset, g.numel()).view_as(g));
            offset += g.numel();
        }
    }

    /// <summary>This rank's rows of a global batch: rows [Rank·b, (Rank+1)·b) of <paramref name="globalBatch"/>
    /// (N·b, …), where every rank passes the same global batch.</summary>
    public Tensor Shard(Tensor globalBatch)
    {
        ArgumentNullException.ThrowIfNull(globalBatch);
        long rows = globalBatch.shape[0];
        Check.That(rows % Size == 0, nameof(globalBatch), $"dimension 0 must be a multiple of the {Size} ranks, got {rows}.");
        long b = rows / Size;
        return globalBatch.narrow(0, Rank * b, b);
    }

    /// <summary>Whether <paramref name="local"/> is true on any rank (every rank gets the same answer): for decisions
    /// such as stopping that must not differ between ranks.</summary>
    public bool Any(bool local)
    {
        Span<double> flag = [local ? 1 : 0];
        Communicator.AllReduceSum(flag);
        return flag[0] > 0;
    }

    /// <summary>Reseeds libtorch's global generator on ranks other than 0 from (<paramref name="seed"/>, <paramref name="step"/>,
    /// rank), so dropout masks differ across ranks and repeat after a resume; rank 0 keeps its own stream (the one its
    /// checkpoints save), so a 1-rank run is unchanged.</summary>
    public void ReseedReplica(long seed, long step)
    {
        if (Rank == 0) return;
        ulong z = (ulong)seed * 0x9E3779B97F4A7C15UL ^ (ulong)step * 0xBF58476D1CE4E5B9UL ^ (ulong)Rank * 0x94D049BB133111EBUL;
        z = (z ^ (z >> 31)) * 0xD6E8FEB86659FD93UL;
        random.manual_seed((long)(z >> 1));
    }

    /// <summary>Rank <paramref name="root"/>'s <paramref name="text"/> on every rank (other ranks' argument is ignored).</summary>
    public string Broadcast(string text, int root = 0)
    {
        ArgumentNullException.ThrowIfNull(text);
        var mine = Encoding.UTF8.GetBytes(text);
        var length = BitConverter.GetBytes((long)mine.Length);
        Communicator.Broadcast(length, root);
        var bytes = Rank == root ? mine : new byte[BitConverter.ToInt64(length)];
        Communicator.Broadcast(bytes, root);
        return Encoding.UTF8.GetString(bytes);
    }

    /// <summary>
    /// Checks that <paramref name="description"/> (lines of "key value") is identical on every rank; otherwise throws
    /// <see cref="DataParallelMismatchException"/> on every rank — a rank that differs names its first differing line and
    /// rank 0's version of it. Call it before training so mismatched configurations never train.
    /// </summary>
    /// <param name="what">What is compared, for the message (e.g. "configuration").</param>
    /// <param name="description">This rank's description.</param>
    public void RequireSame(string what, string description)
    {
        ArgumentNullException.ThrowIfNull(description);
        string rootText = Broadcast(description);
        bool differs = rootText != description;
        Span<double> count = [differs ? 1 : 0];
        Communicator.AllReduceSum(count);
        if (count[0] == 0) return;
        if (!differs)
            throw new DataParallelMismatchException($"{count[0]} of {Size} ranks have a different {what} than rank 0 (each of them names the difference); " +
                                                    "every rank must be started with the same arguments and the same data.");
        var ours = description.Split('\n');
        var theirs = rootText.Split('\n');
        int first = Enumerable.Range(0, Math.Max(ours.Length, theirs.Length))
            .First(i => i >= ours.Length || i >= theirs.Length || ours[i] != theirs[i]);
        string Line(string[] lines) => first < lines.Length ? $"'{lines[first]}'" : "(nothing)";
        throw new DataParallelMismatchException($"rank {Rank}'s {what} differs from rank 0's: {Line(ours)} here, {Line(theirs)} on rank 0; " +
                                                "every rank must be started with the same arguments and the same data.");
    }

    /// <inheritdoc/>
    public void SumInPlace(IReadOnlyList<Tensor> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        if (values.Count == 0) return;
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var bucket = cat(values.Select(v => v.detach().to(ScalarType.Float64, CPU).flatten()).ToArray());   // (Σ numel)
        SumInPlace(bucket);
        long offset = 0;
        foreach (var v in values)
        {
            v.copy_(bucket.narrow(0, offset, v.numel()).view_as(v));
            offset += v.numel();
        }
    }

    /// <inheritdoc/>
    public Tensor Concatenate(Tensor local)
    {
        ArgumentNullException.ThrowIfNull(local);
        Check.That(local.dim() >= 1, nameof(local), $"needs at least one dimension, got a scalar.");
        var wide = local.dtype == ScalarType.Float64 ? ScalarType.Float64 : ScalarType.Float32;
        Check.That(local.dtype is ScalarType.Float32 or ScalarType.Float64 or ScalarType.Bool, nameof(local), $"must be float32, float64 or bool, got {local.dtype}.");
        // Rows of every rank and, to catch disagreeing shapes, each rank's trailing dimensions summed.
        var shape = local.shape;
        var header = new double[Size + shape.Length - 1];
        header[Rank] = shape[0];
        for (int d = 1; d < shape.Length; d++) header[Size + d - 1] = shape[d];
        Communicator.AllReduceSum(header);
        for (int d = 1; d < shape.Length; d++)
            Check.That(header[Size + d - 1] == (double)shape[d] * Size, nameof(local), $"dimension {d} must agree on every rank, got {shape[d]} on rank {Rank}.");
        long total = (long)header.Take(Size).Sum(), offset = (long)header.Take(Rank).Sum();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // Zeros everywhere but this rank's rows: the sum over the ranks is the concatenation, exactly.
        var all = zeros([total, .. shape[1..]], dtype: wide);                     // (ΣN, …)
        all.narrow(0, offset, shape[0]).copy_(local.detach().to(wide, CPU));
        SumInPlace(all);
        return all.to(local.dtype, local.device).MoveToOuterDisposeScope();
    }

    /// <summary>All-reduce (sum) of a contiguous float32 or float64 CPU tensor, in place, in chunks of at most 2^30 elements.</summary>
    private unsafe void SumInPlace(Tensor hostTensor)
    {
        long n = hostTensor.numel();
        for (long start = 0; start < n; start += SpanChunk)
        {
            int count = (int)Math.Min(SpanChunk, n - start);
            if (hostTensor.dtype == ScalarType.Float32)
                Communicator.AllReduceSum(new Span<float>((float*)Pointer(hostTensor) + start, count));
            else
                Communicator.AllReduceSum(new Span<double>((double*)Pointer(hostTensor) + start, count));
        }
        GC.KeepAlive(hostTensor);
    }

    /// <summary>Disposes the communicator (MPI: finalises).</summary>
    public void Dispose() => Communicator.Dispose();
}
