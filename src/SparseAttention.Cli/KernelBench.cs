using System.Diagnostics;
using SparseAttention.Kernels;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// The kernel rows of <c>sparse-attn bench</c>: each attention kind and implementation timed (median of several runs
/// after a warm-up until timings settle) beside dense <c>scaled_dot_product_attention</c> at the same length, with its
/// useful FLOP/s as a fraction of the run's GEMM rate and FMA peak.
/// </summary>
internal static class KernelBench
{
    /// <summary>Attention kinds the bench knows, with the pattern each stands for.</summary>
    public static readonly string[] Attentions = ["dense", "local", "strided", "fixed", "bigbird", "routing", "lsh"];
    public static readonly string[] Impls = ["sdpa", "reference", "ops", "fused"];
    public static readonly string[] Passes = ["forward", "forward_backward"];

    /// <summary>One measured figure; field names are the JSON schema of the issue.</summary>
    /// <remarks><c>efficiency</c> = GFLOP/s ÷ the float32 GEMM rate; <c>peak_efficiency</c> = GFLOP/s ÷ the float32 FMA peak.</remarks>
    internal sealed record Result(string attention, string impl, string pass, long seq_len, long batch, long heads, long head_dim,
        long window, bool causal, double ms, double gflops, double efficiency, double peak_efficiency, double? speedup_vs_dense, double peak_rss_mb,
        int warmup_calls);

    /// <summary>Times every (T, pass, attention, impl) row; dense SDPA first at each (T, pass), as every sparse figure is a
    /// ratio against it. Returns the rows and the most AnonHugePages seen while the rows' inputs were resident.</summary>
    public static (List<Result> Results, long HugePagesBytes) Run(long[] seqLens, string[] attentions, string[] impls, string[] passes,
        int batch, int heads, int dim, int window, int nHashes, bool causal, int runs, long maxDense, double maxGatherBytes,
        Dictionary<(long, string), BlockMask> masks, BenchLimits limits, Device device, TextWriter stderr)
    {
        var results = new List<Result>();
        var denseMs = new Dictionary<(long, string), double>();
        long hugePagesBytes = 0;
        int total = seqLens.Length * passes.Length * (1 + attentions.Count(a => a != "dense") * impls.Length), step = 0;
        foreach (long seqLen in seqLens)
            foreach (string pass in passes)
            {
                bool backward = pass == "forward_backward";
                double flopFactor = backward ? 3.5 : 1.0;   // backward = 5 matmuls to the forward's 2 (FlashAttention's count)
                using var scope = NewDisposeScope();
                var gen = new Generator(1);
                var q = randn(new long[] { batch, heads, seqLen, dim }, generator: gen).to(device);
                var k = randn(new long[] { batch, heads, seqLen, dim }, generator: gen).to(device);
                var v = randn(new long[] { batch, heads, seqLen, dim }, generator: gen).to(device);
                var upstream = randn(new long[] { batch, heads, seqLen, dim }, generator: gen).to(device);
                hugePagesBytes = Math.Max(hugePagesBytes, TorchAllocator.AnonHugePagesBytes() ?? 0);   // with q, k, v, upstream resident

                // Dense SDPA first: every sparse figure is reported as a ratio against it.
                step++;
                if (seqLen <= maxDense)
                {
                    stderr.WriteLine($"[{step}/{total}] dense sdpa {pass} T={seqLen}");
                    double pairs = (double)heads * (causal ? seqLen * (seqLen + 1) / 2.0 : (double)seqLen * seqLen);
                    var timing = Time((a, b, c) => nn.functional.scaled_dot_product_attention(a, b, c, is_casual: causal), q, k, v, upstream, backward, runs);
                    denseMs[(seqLen, pass)] = timing.Ms;
                    results.Add(Make("dense", "sdpa", pass, seqLen, batch, heads, dim, seqLen, causal, timing, 4 * pairs * dim * batch * flopFactor, limits, 1.0));
                }
                else stderr.WriteLine($"[{step}/{total}] dense sdpa {pass} T={seqLen}: skipped (above --max-dense-len {maxDense})");

                foreach (string attention in attentions.Where(a => a != "dense"))
                {
                    if (attention is "lsh" or "routing")
                    {
                        // Content-based groupings time their module with the ops or fused kernel: no reference row.
                        foreach (string impl in impls.Where(i => i != "reference"))
                        {
                            step++;
                            stderr.WriteLine($"[{step}/{total}] {attention} {impl} {pass} T={seqLen}");
                            var kernel = impl == "ops" ? AttentionKernel.Ops : AttentionKernel.Fused;
                            var (timing, groupPairs) = attention == "lsh"
                                ? TimeLsh(q, v, upstream, window, nHashes, causal, kernel, backward, runs)
                                : TimeRouting(q, k, v, upstream, window, causal, kernel, backward, runs);
                            double? speedup = denseMs.TryGetValue((seqLen, pass), out double d) ? d / timing.Ms : null;
                            results.Add(Make(attention, impl, pass, seqLen, batch, heads, dim, window, causal, timing, 4 * groupPairs * dim * flopFactor, limits, speedup));
                        }
                        if (impls.Contains("reference")) step++;
                        continue;
                    }
                    var mask = masks[(seqLen, attention)];
                    double pairs = mask.Density * heads * (double)seqLen * seqLen;
                    foreach (string impl in impls)
                    {
                        step++;
                        double gatherBytes = impl switch
                        {
                            // gathered keys and values (K·b rows of D per query block) plus scores, probabilities and mask
                            "ops" => 4.0 * batch * heads * seqLen * mask.MaxKeyBlocksPerRow * (2.0 * dim + 3.0 * mask.BlockSize) * (backward ? 2 : 1),
                            "reference" => 4.0 * batch * heads * (double)seqLen * seqLen * (backward ? 4 : 3),
                            _ => 0,
                        };
                        if (gatherBytes > maxGatherBytes)
                        {
                            stderr.WriteLine($"[{step}/{total}] {attention} {impl} {pass} T={seqLen}: skipped (needs ~{gatherBytes / 1e9:F1} GB > --max-gather-gb)");
                            continue;
                        }
                        stderr.WriteLine($"[{step}/{total}] {attention} {impl} {pass} T={seqLen}");
                        var kernel = impl switch { "ops" => AttentionKernel.Ops, "reference" => AttentionKernel.Reference, _ => AttentionKernel.Fused };
                        var timing = Time((a, b, c) => BlockSparseAttention.Attention(a, b, c, mask, kernel: kernel), q, k, v, upstream, backward, runs);
                        double? speedup = denseMs.TryGetValue((seqLen, pass), out double d) ? d / timing.Ms : null;
                        results.Add(Make(attention, impl, pass, seqLen, batch, heads, dim, window, causal, timing, 4 * pairs * dim * batch * flopFactor, limits, speedup));
                    }
                }
            }
        return (results, hugePagesBytes);
    }

    public static AttentionPattern PatternFor(string attention, int window, bool causal) => attention switch
    {
        "local" => new WindowPattern(window, 1, causal ? 0 : 1, exactWindowSize: false, causal),
        "strided" => new StridedPattern(window, causal, FactorizedCombine.Merged),
        "fixed" => new FixedPattern(window, Math.Max(1, window / 16), 1, causal, FactorizedCombine.Merged),
        "bigbird" => new BigBirdPattern(window, causal, numRandomBlocks: 1, numSlidingWindowBlocks: 3, numGlobalBlocks: 1),
        "dense" => new DensePattern(causal),
        _ => throw new CliUsageException($"--attention: unknown kind '{attention}'."),
    };

    private static Result Make(string attention, string impl, string pass, long seqLen, int batch, int heads, int dim, long window,
        bool causal, (double Ms, double Rss, int WarmUp) timing, double usefulFlops, BenchLimits limits, double? speedup)
    {
        double gflops = usefulFlops / (timing.Ms * 1e6);
        return new Result(attention, impl, pass, seqLen, batch, heads, dim, window, causal, Math.Round(timing.Ms, 3), Math.Round(gflops, 2),
            Math.Round(gflops / limits.Gemm, 4), Math.Round(gflops / limits.Peak, 4), speedup is double s ? Math.Round(s, 2) : null,
            Math.Round(timing.Rss, 1), timing.WarmUp);
    }

    /// <summary>Median wall time of <paramref name="runs"/> calls after a warm-up that lasts until timings settle
    /// (<see cref="Timing.WarmUp"/>), the peak RSS of the timed calls and the number of warm-up calls.</summary>
    private static (double Ms, double Rss, int WarmUp) Time(Func<Tensor, Tensor, Tensor, Tensor> attention, Tensor q, Tensor k, Tensor v,
        Tensor upstream, bool backward, int runs)
    {
        void Once()
        {
            Run();
            if (q.device.type == DeviceType.CUDA) cuda.synchronize();                   // GPU work is asynchronous: time its end
        }
        void Run()
        {
            using var scope = NewDisposeScope();
            if (!backward)
            {
                using var _ = no_grad();
                attention(q, k, v);
                return;
            }
            var (q2, k2, v2) = (q.detach().requires_grad_(true), k.detach().requires_grad_(true), v.detach().requires_grad_(true));
            // The gradients come back as a model's q, k, v projections would receive them: no loss tensor to keep and no
            // leaf-gradient accumulation (libtorch copies a custom function's gradients into .grad, as a .NET wrapper
            // still references them), so the peak RSS is the kernel's: inputs, output, upstream and the three gradients.
            // allow_unused: LSH's shared-QK keys are the queries, so k has no gradient there.
            autograd.grad([attention(q2, k2, v2)], [q2, k2, v2], [upstream], allow_unused: true);
        }
        int warmUp = Timing.WarmUp(Once);
        ProcessMemory.ResetPeakRss();
        var times = new double[runs];
        for (int i = 0; i < runs; i++)
        {
            var sw = Stopwatch.StartNew();
            Once();
            times[i] = sw.Elapsed.TotalMilliseconds;
        }
        Array.Sort(times);
        return (times[runs / 2], ProcessMemory.PeakRssMb(), warmUp);
    }

    /// <summary>
    /// Routing attention with the clustering included (k-means assignment, balanced top-k or causal
    /// chunking, grouped attention), clusters = T / window; the k-means is initialised in the warm-up.
    /// Useful work = the allowed (query, key) pairs inside the groups it formed, summed over batch.
    /// </summary>
    private static ((double Ms, double Rss, int WarmUp) Timing, double Pairs) TimeRouting(Tensor q, Tensor k, Tensor v, Tensor upstream,
        int window, bool causal, AttentionKernel kernel, bool backward, int runs)
    {
        long heads = q.shape[1], seqLen = q.shape[2], dim = q.shape[3];
        using var routing = new SparseAttention.Modules.RoutingAttention((int)heads, (int)dim, (int)seqLen, Math.Min(window, (int)seqLen), causal) { Kernel = kernel };
        if (q.device.type != DeviceType.CPU) routing.to(q.device);
        double pairs = 0;
        var timing = Time((a, b, c) =>
        {
            var result = routing.forward(a, b, c);
            if (pairs == 0) pairs = GroupPairs(result.QueryIndices, result.KeyIndices, causal);
            return result.Output;
        }, q, k, v, upstream, backward, runs);
        return (timing, pairs);
    }

    /// <summary>
    /// LSH attention (shared QK, bucket size = window, buckets = ⌈T / window⌉ rounded up to even) with the hashing,
    /// sorting and chunking included. Useful work = the (query, key) slot pairs the chunks hold (own chunk + previous
    /// chunk, causal where asked), summed over rounds and batch.
    /// </summary>
    private static ((double Ms, double Rss, int WarmUp) Timing, double Pairs) TimeLsh(Tensor q, Tensor v, Tensor upstream,
        int window, int nHashes, bool causal, AttentionKernel kernel, bool backward, int runs)
    {
        long heads = q.shape[1], seqLen = q.shape[2], dim = q.shape[3];
        using var lsh = new SparseAttention.Modules.LshAttention((int)heads, (int)dim, (int)seqLen, Math.Min(window, (int)seqLen), nHashes, causal: causal) { Kernel = kernel };
        if (q.device.type != DeviceType.CPU) lsh.to(q.device);
        double pairs = 0;
        var timing = Time((a, _, c) =>
        {
            var result = lsh.forward(a, null, c);
            if (pairs == 0)
            {
                using var scope = NewDisposeScope();
                var g = result.Groups;
                long b = g.KeyIndices.shape[0], h = g.KeyIndices.shape[1], groups = g.KeyIndices.shape[2], wk = g.KeyIndices.shape[3];
                var previous = g.KeyIndices.gather(2, g.PreviousGroup.clamp_min(0).unsqueeze(-1).expand(b, h, groups, wk))
                                .masked_fill(g.PreviousGroup.lt(0).unsqueeze(-1), -1);            // (B, H, G, Wk)
                pairs = GroupPairs(g.QueryIndices, cat([previous, g.KeyIndices], 3), causal);
            }
            return result.Output;
        }, q, q, v, upstream, backward, runs);
        return (timing, pairs);
    }

    /// <summary>Allowed (query, key) slot pairs of a grouping: both slots filled and, when causal, key ≤ query.</summary>
    private static double GroupPairs(Tensor queryIndices, Tensor keyIndices, bool causal)
    {
        using var scope = NewDisposeScope();
        var qi = queryIndices.unsqueeze(-1); var ki = keyIndices.unsqueeze(-2);       // (B, H, G, Wq, 1), (B, H, G, 1, Wk)
        var allowed = qi.ge(0).logical_and(ki.ge(0));
        if (causal) allowed = allowed.logical_and(ki.le(qi));
        return allowed.sum().to(ScalarType.Float64).item<double>();
    }
}
