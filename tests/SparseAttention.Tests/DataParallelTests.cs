using SparseAttention.Clustering;
using SparseAttention.Distributed;
using SparseAttention.Model;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// <see cref="DataParallel"/> in one process: N ranks on N threads joined by <see cref="ThreadGroup"/> (collectives
/// written independently of MPI: every rank's contribution summed in rank order). The oracle is one model trained on
/// the whole batch. The MPI path itself is tested end to end in <see cref="MpiTrainTests"/>.
/// </summary>
public sealed class DataParallelTests
{
    private static readonly TransformerConfig Config = new()
    {
        NumTokens = 256, Dim = 16, Depth = 2, Heads = 2, MaxSeqLen = 16, Causal = true, WindowSize = 8,
        NLocalAttnHeads = [1], FfMult = 2, BlockSize = 8, KmeansEmaDecay = 0.5,
    };

    private static Tensor Batch(int step) => randint(0, 256, [4, 16], generator: new Generator((ulong)(100 + step)));   // (4, T)

    /// <summary>One forward/backward of the LM loss plus the auxiliary loss on <paramref name="batch"/>.</summary>
    private static void Backward(RoutingTransformerLM model, Tensor batch)
    {
        using var scope = NewDisposeScope();
        var (logits, aux) = model.forward(batch, null);                                 // (B, T, 256)
        (LanguageModelLoss.NextToken(logits, batch) + aux).backward();
    }

    /// <param name="ranks">Replicas, each training 4 / ranks rows of every batch.</param>
    /// <param name="explicitUpdate">true: <see cref="OnlineKMeans.UpdateAll"/> after each step; false: the automatic EMA
    /// step at the next training forward (<see cref="OnlineKMeans.AutoUpdate"/>) must reduce over the ranks too.</param>
    [Theory]
    [InlineData(2, true)]
    [InlineData(4, true)]
    [InlineData(2, false)]
    public void Ranks_average_to_the_whole_batch_gradient_and_keep_its_centroids(int ranks, bool explicitUpdate)
    {
        random.manual_seed(11);
        using var whole = new RoutingTransformerLM(Config);
        var replicas = Enumerable.Range(0, ranks).Select(r =>
        {
            random.manual_seed(r == 0 ? 11 : 50 + r);                                   // other ranks start elsewhere: Attach must fix that
            return new RoutingTransformerLM(Config);
        }).ToArray();
        var group = new ThreadGroup(ranks);
        var parallel = Enumerable.Range(0, ranks).Select(r => new DataParallel(group.Member(r))).ToArray();
        group.Run(r => parallel[r].Attach(replicas[r]));

        for (int step = 0; step < 3; step++)
        {
            var batch = Batch(step);
            whole.zero_grad();
            Backward(whole, batch);
            foreach (var m in replicas) m.zero_grad();
            group.Run(r =>
            {
                Backward(replicas[r], parallel[r].Shard(batch));                       // (4/N, T)
                parallel[r].AverageGradients(replicas[r].parameters());
            });
            var expected = whole.named_parameters().ToDictionary(p => p.name, p => p.parameter.grad!);
            foreach (var replica in replicas)
                foreach (var (name, p) in replica.named_parameters())
                    Assert.True(p.grad!.allclose(expected[name], rtol: 1e-4, atol: 1e-6),
                        $"step {step}, {name}: max |Δgrad| {(p.grad! - expected[name]).abs().max().item<float>():E2}");

            if (explicitUpdate)
            {
                OnlineKMeans.UpdateAll(whole);
                group.Run(r => OnlineKMeans.UpdateAll(replicas[r]));
            }
            var means = OnlineKMeans.All(whole).Select(k => k.Means).ToArray();
            Assert.All(OnlineKMeans.All(whole), k => Assert.True(k.IsInitialized));
            foreach (var replica in replicas)
            {
                var theirs = OnlineKMeans.All(replica).Select(k => k.Means).ToArray();
                for (int i = 0; i < means.Length; i++)
                    Assert.True(theirs[i].allclose(means[i], rtol: 1e-4, atol: 1e-5), $"step {step}, k-means {i}: max |Δ| {(theirs[i] - means[i]).abs().max().item<float>():E2}");
            }
        }
    }

    [Fact]
    public void Attach_copies_rank_0_state_and_refuses_different_layouts()
    {
        var group = new ThreadGroup(2);
        random.manual_seed(1);
        using var a = new RoutingTransformerLM(Config);
        random.manual_seed(2);
        using var b = new RoutingTransformerLM(Config);
        group.Run(r => new DataParallel(group.Member(r)).Attach(r == 0 ? a : b));
        foreach (var (name, t) in a.state_dict()) Assert.True(t.equal(b.state_dict()[name]).all().item<bool>(), name);

        using var wider = new RoutingTransformerLM(Config with { Dim = 32 });
        var errors = new string[2];
        group.Run(r =>
        {
            var e = Assert.Throws<DataParallelMismatchException>(() => new DataParallel(group.Member(r)).Attach(r == 0 ? a : wider));
            errors[r] = e.Message;
        });
        Assert.Contains("1 of 2 ranks have a different model state", errors[0]);
        Assert.Contains("rank 1's model state (names, shapes, dtypes) differs from rank 0's", errors[1]);
        Assert.Contains("[256, 32]' here, ", errors[1]);
    }

    [Fact]
    public void Concatenate_and_shard_follow_rank_order()
    {
        var group = new ThreadGroup(3);
        var results = new Tensor[3];
        group.Run(r =>
        {
            var dp = new DataParallel(group.Member(r));
            results[r] = dp.Concatenate(full(new long[] { r + 1, 2 }, 10f * r));      // rank r contributes r+1 rows
            Assert.True(dp.Any(r == 1));                                     // one rank true: true everywhere
            Assert.False(dp.Any(false));
            Assert.Equal([2L, 5], dp.Shard(arange(30).view(6, 5)).shape);
        });
        var expected = tensor(new float[] { 0, 0, 10, 10, 10, 10, 20, 20, 20, 20, 20, 20 }).view(6, 2);
        Assert.All(results, t => Assert.True(t.equal(expected).all().item<bool>()));
        Assert.Throws<ArgumentException>(() => new DataParallel(group.Member(0)).Shard(zeros(4, 2)));
    }
}

/// <summary>N ranks on N threads of this process; each collective is a rendezvous of all ranks.</summary>
internal sealed class ThreadGroup(int size)
{
    public int Size => size;
    private readonly Barrier barrier = new(size);
    private readonly double[][] slots = new double[size][];
    private byte[] shared = [];

    public ICommunicator Member(int rank) => new GroupMember(this, rank);

    /// <summary>Runs <paramref name="body"/>(rank) on one thread per rank and rethrows the first failure.</summary>
    public void Run(Action<int> body)
    {
        var errors = new Exception?[size];
        var threads = Enumerable.Range(0, size).Select(r => new Thread(() =>
        {
            try { body(r); }
            catch (Exception e) { errors[r] = e; barrier.RemoveParticipant(); }
        })).ToArray();
        foreach (var t in threads) t.Start();
        foreach (var t in threads) t.Join();
        if (errors.Any(e => e is not null)) throw new AggregateException("a rank failed", errors.OfType<Exception>());
    }

    private double[] Sum(int rank, double[] mine)
    {
        slots[rank] = mine;
        barrier.SignalAndWait();
        var total = new double[mine.Length];
        foreach (var slot in slots)                                                     // rank order, the same on every rank
            for (int i = 0; i < total.Length; i++) total[i] += slot[i];
        barrier.SignalAndWait();
        return total;
    }

    private sealed class GroupMember(ThreadGroup group, int rank) : ICommunicator
    {
        public int Rank => rank;
        public int Size => group.Size;

        public void AllReduceSum(Span<float> values)
        {
            var total = group.Sum(rank, values.ToArray().Select(v => (double)v).ToArray());
            for (int i = 0; i < values.Length; i++) values[i] = (float)total[i];
        }

        public void AllReduceSum(Span<double> values) => group.Sum(rank, values.ToArray()).CopyTo(values);

        public void Broadcast(Span<byte> data, int root)
        {
            if (rank == root) group.shared = data.ToArray();
            group.barrier.SignalAndWait();
            group.shared.CopyTo(data);
            group.barrier.SignalAndWait();
        }

        public void Barrier() => group.barrier.SignalAndWait();
        [System.Diagnostics.CodeAnalysis.DoesNotReturn] public void Abort(int exitCode) => throw new InvalidOperationException($"rank {rank} aborted with {exitCode}");
        public void Dispose() { }
    }
}
