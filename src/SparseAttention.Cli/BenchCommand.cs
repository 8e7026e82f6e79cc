using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using SparseAttention.Kernels;
using SparseAttention.Model;
using SparseAttention.Patterns;
using Spectre.Console;
using TorchSharp;
using static TorchSharp.torch;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn bench</c>: times attention kernels (median of several runs after a warm-up until timings settle) beside
/// dense <c>scaled_dot_product_attention</c> and the machine's matrix-multiply rate, all measured in
/// the same process run, and reports ratios. With <c>--model</c> it times full training steps of a small
/// byte-level <see cref="RoutingTransformerLM"/> (dense vs local vs routing heads) instead; the kernel rows
/// then run only when <c>--attention</c>, <c>--impl</c> or <c>--pass</c> is given explicitly.
/// </summary>
internal sealed class BenchCommand
{
    /// <summary>Attention kinds the bench knows, with the pattern each stands for.</summary>
    public static readonly string[] Attentions = ["dense", "local", "strided", "fixed", "bigbird", "routing", "lsh"];
    public static readonly string[] Impls = ["sdpa", "reference", "ops", "fused"];
    public static readonly string[] Passes = ["forward", "forward_backward"];

    private readonly Option<string> seqLensOption = new("--seq-lens") { HelpName = "T,T,...", Description = "Sequence lengths.", DefaultValueFactory = _ => "1024,4096,16384" };
    private readonly Option<string> attentionOption = new("--attention") { HelpName = "KIND,...", Description = "Attention kinds: " + string.Join(", ", Attentions) + ".", DefaultValueFactory = _ => "dense,local,strided,fixed,bigbird,routing,lsh" };
    private readonly Option<string> implOption = new("--impl") { HelpName = "IMPL,...", Description = "Implementations of the sparse kinds: reference, ops, fused (dense always runs as sdpa).", DefaultValueFactory = _ => "ops,fused" };
    private readonly Option<string> passOption = new("--pass") { HelpName = "PASS,...", Description = "forward, forward_backward.", DefaultValueFactory = _ => "forward,forward_backward" };
    private readonly Option<int> batchOption = new("--batch") { Description = "Batch size B.", DefaultValueFactory = _ => 1 };
    private readonly Option<int> headsOption = new("--heads") { Description = "Heads H.", DefaultValueFactory = _ => 8 };
    private readonly Option<int> headDimOption = new("--head-dim") { Description = "Head width D.", DefaultValueFactory = _ => 64 };
    private readonly Option<int> windowOption = new("--window") { Description = "Window / block / stride size w.", DefaultValueFactory = _ => 128 };
    private readonly Option<bool> bidirectionalOption = new("--bidirectional") { Description = "Bidirectional attention (default causal)." };
    private readonly Option<int> nHashesOption = new("--n-hashes") { Description = "lsh rows: hash rounds (bucket size = --window, shared QK).", DefaultValueFactory = _ => 2 };
    private readonly Option<int> runsOption = new("--runs") { Description = "Timed runs per figure (the median is reported).", DefaultValueFactory = _ => 5 };
    private readonly Option<bool> quickOption = new("--quick") { Description = "T ∈ {1024, 4096}, 3 runs: a fast smoke run." };
    private readonly Option<long> maxDenseLenOption = new("--max-dense-len") { Description = "Skip dense SDPA above this length (its time grows as T²).", DefaultValueFactory = _ => 16384 };
    private readonly Option<double> maxGatherGbOption = new("--max-gather-gb") { Description = "Skip the ops/reference paths when their intermediates would exceed this many GB.", DefaultValueFactory = _ => 4.0 };
    private readonly Option<string?> jsonOption = new("--json") { HelpName = "FILE", Description = "Also write the results as JSON (atomically)." };
    private readonly Option<bool> modelOption = new("--model") { Description = "Time a full training step (forward, next-token + aux loss, backward, AdamW, k-means update) of a small byte-level LM with dense, local and routing heads; T defaults to 8192. Kernel rows then run only if --attention, --impl or --pass is given." };
    private readonly Option<int> modelDimOption = new("--model-dim") { Description = "--model: model width.", DefaultValueFactory = _ => 256 };
    private readonly Option<int> modelHeadsOption = new("--model-heads") { Description = "--model: heads per layer (head width = dim / heads; routing = half local, half routing).", DefaultValueFactory = _ => 4 };
    private readonly Option<int?> modelDimHeadOption = new("--model-dim-head") { Description = "--model: head width (default dim / heads; must be even)." };
    private readonly Option<int> modelDepthOption = new("--model-depth") { Description = "--model: layers.", DefaultValueFactory = _ => 2 };
    private readonly Option<string> deviceOption = CliDevice.CreateOption();
    private readonly Option<string> modelKindsOption = new("--model-kinds") { HelpName = "KIND,...", Description = "--model: configurations: " + string.Join(", ", Models) + " (-reversible: RevNet layers that recompute activations in the backward; -bf16: compute_dtype = BFloat16; -shaw / -alibi: positional_encoding = RelativeShaw / Alibi instead of rotary). The × dense column needs dense.", DefaultValueFactory = _ => "dense,local,routing" };

    public static Command Create()
    {
        var self = new BenchCommand();
        var command = new Command("bench", "Time attention kernels against dense SDPA and the GEMM rate, in one run.");
        foreach (var o in new Option[] { self.seqLensOption, self.attentionOption, self.implOption, self.passOption, self.batchOption,
                     self.headsOption, self.headDimOption, self.windowOption, self.nHashesOption, self.bidirectionalOption, self.runsOption,
                     self.quickOption, self.maxDenseLenOption, self.maxGatherGbOption, self.jsonOption, self.deviceOption,
                     self.modelOption, self.modelDimOption, self.modelHeadsOption, self.modelDimHeadOption, self.modelDepthOption, self.modelKindsOption })
            command.Add(o);
        self.generate.AddTo(command);
        command.SetAction(self.Execute);
        return command;
    }

    private static string[] List(ParseResult parse, Option<string> option, string[] allowed)
    {
        var items = parse.GetValue(option)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        foreach (var item in items)
            if (!allowed.Contains(item))
                throw new CliUsageException($"{option.Name}: unknown value '{item}'; expected one of: {string.Join(", ", allowed)}.");
        if (items.Length == 0) throw new CliUsageException($"{option.Name}: give at least one of: {string.Join(", ", allowed)}.");
        return items;
    }

    /// <summary>One measured figure; field names are the JSON schema of the issue.</summary>
    /// <remarks><c>efficiency</c> = GFLOP/s ÷ the float32 GEMM rate; <c>peak_efficiency</c> = GFLOP/s ÷ the float32 FMA peak.</remarks>
    internal sealed record Result(string attention, string impl, string pass, long seq_len, long batch, long heads, long head_dim,
        long window, bool causal, double ms, double gflops, double efficiency, double peak_efficiency, double? speedup_vs_dense, double peak_rss_mb,
        int warmup_calls);

    /// <summary>The run's two yardsticks (GFLOP/s): libtorch's float32 GEMM and the float32 FMA peak.</summary>
    private sealed record Limits(double Gemm, double Peak);

    /// <summary>One model training-step figure (the <c>"model_results"</c> JSON rows).</summary>
    internal sealed record ModelResult(string model, long seq_len, long batch, long dim, long heads, long depth,
        double ms_per_step, double tokens_per_s, double? speedup_vs_dense, double peak_rss_mb);

    public static readonly string[] Models = [.. new[] { "dense", "local", "routing", "dense-reversible", "local-reversible", "routing-reversible" }
                                              .SelectMany(m => new[] { m, m + "-bf16" }),
                                              .. new[] { "local", "routing" }.SelectMany(m => new[] { m + "-shaw", m + "-alibi" })];

    private readonly GenerateBench generate = new();

    private int Execute(ParseResult parse)
    {
        if (generate.Requested(parse)) return generate.Execute(parse, parse.GetValue(jsonOption));
        var stdout = parse.InvocationConfiguration.Output;
        var stderr = parse.InvocationConfiguration.Error;
        bool quick = parse.GetValue(quickOption);
        bool model = parse.GetValue(modelOption);
        static bool Given(ParseResult p, Option o) => p.GetResult(o) is { Implicit: false };
        bool kernels = !model || Given(parse, attentionOption) || Given(parse, implOption) || Given(parse, passOption);
        long[] seqLens = !Given(parse, seqLensOption) && model
            ? [8192]
            : quick && !Given(parse, seqLensOption)
            ? [1024, 4096]
            : parse.GetValue(seqLensOption)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(s => long.TryParse(s, out long t) && t > 0 ? t : throw new CliUsageException($"--seq-lens: '{s}' is not a positive integer.")).ToArray();
        if (seqLens.Length == 0) throw new CliUsageException("--seq-lens: give at least one sequence length, e.g. --seq-lens 1024,4096.");
        var attentions = List(parse, attentionOption, Attentions);
        var impls = List(parse, implOption, Impls.Where(i => i != "sdpa").ToArray());
        var passes = List(parse, passOption, Passes);
        var device = CliDevice.Parse(parse.GetValue(deviceOption)!);
        if (device.type != DeviceType.CPU)
        {
            // The fused kernels are C# code over CPU memory; elsewhere the TorchSharp-ops kernels are the fast path.
            impls = impls.Where(i => i != "fused").ToArray();
            if (kernels && impls.Length == 0) throw new CliUsageException($"--impl: the fused kernels run on the CPU only; with --device {device} use --impl ops.");
        }
        int batch = parse.GetValue(batchOption), heads = parse.GetValue(headsOption), dim = parse.GetValue(headDimOption), window = parse.GetValue(windowOption);
        int runs = quick && parse.GetResult(runsOption) is null or { Implicit: true } ? 3 : parse.GetValue(runsOption);
        int nHashes = parse.GetValue(nHashesOption);
        int modelDim = parse.GetValue(modelDimOption), modelHeads = parse.GetValue(modelHeadsOption), modelDepth = parse.GetValue(modelDepthOption);
        var modelKinds = List(parse, modelKindsOption, Models);
        foreach (var (value, name) in new[] { (batch, "--batch"), (heads, "--heads"), (dim, "--head-dim"), (window, "--window"), (runs, "--runs"), (nHashes, "--n-hashes"),
                     (modelDim, "--model-dim"), (modelHeads, "--model-heads"), (modelDepth, "--model-depth") })
            if (value <= 0) throw new CliUsageException($"{name} must be > 0, got {value}.");
        int? modelDimHeadGiven = parse.GetValue(modelDimHeadOption);
        if (modelDimHeadGiven is int dh && (dh <= 0 || dh % 2 != 0))
            throw new CliUsageException($"--model-dim-head must be a positive even number (rotary embeddings), got {dh}.");
        if (model && modelDimHeadGiven is null && (modelDim % modelHeads != 0 || modelDim / modelHeads % 2 != 0))
            throw new CliUsageException($"--model-dim ({modelDim}) / --model-heads ({modelHeads}) must be a whole, even head width (rotary embeddings); or give --model-dim-head.");
        int modelDimHead = modelDimHeadGiven ?? modelDim / modelHeads;
        if (model && modelHeads < 2)
            throw new CliUsageException("--model-heads must be >= 2 (the routing model has half local, half routing heads).");
        bool causal = !parse.GetValue(bidirectionalOption);
        long maxDense = parse.GetValue(maxDenseLenOption);
        double maxGatherBytes = parse.GetValue(maxGatherGbOption) * 1e9;
        var masks = Validate(seqLens, kernels ? attentions : [], kernels ? passes : [], batch, heads, dim, window, nHashes, causal,
            model ? modelKinds : [], modelDim, modelHeads, modelDimHead, modelDepth);

        int threads = get_num_threads();
        FusedBlockSparseAttention.DefaultThreads = threads;
        stderr.WriteLine($"bench: {threads} threads; measuring the GEMM rates and the FMA peak ...");
        double gemm = MachineLimits.MatmulGflops(ScalarType.Float32, runs);
        double bf16 = MachineLimits.MatmulGflops(ScalarType.BFloat16, runs);
        double peak = MachineLimits.FmaPeakGflops(threads);
        int vectorBits = MachineLimits.VectorBits;
        stderr.WriteLine($"bench: GEMM {gemm:F1} GFLOP/s (2048×2048 float32 matmul, median of {runs}); bf16 GEMM {bf16:F1} GFLOP/s; "
            + $"float32 FMA peak {peak:F1} GFLOP/s ({threads} threads × {vectorBits}-bit FMA loop, best of 5)");
        var limits = new Limits(gemm, peak);

        var results = new List<Result>();
        var denseMs = new Dictionary<(long, string), double>();
        long hugePagesBytes = 0;
        int total = seqLens.Length * passes.Length * (1 + attentions.Count(a => a != "dense") * impls.Length), step = 0;
        foreach (long seqLen in kernels ? seqLens : [])
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
                    if (attention == "lsh")
                    {
                        foreach (string impl in impls.Where(i => i != "reference"))
                        {
                            step++;
                            stderr.WriteLine($"[{step}/{total}] lsh {impl} {pass} T={seqLen}");
                            var (timing, lshPairs) = TimeLsh(q, v, upstream, window, nHashes, causal, impl == "ops" ? AttentionKernel.Ops : AttentionKernel.Fused, backward, runs);
                            double? speedup = denseMs.TryGetValue((seqLen, pass), out double d) ? d / timing.Ms : null;
                            results.Add(Make("lsh", impl, pass, seqLen, batch, heads, dim, window, causal, timing, 4 * lshPairs * dim * flopFactor, limits, speedup));
                        }
                        if (impls.Contains("reference")) step++;
                        continue;
                    }
                    if (attention == "routing")
                    {
                        foreach (string impl in impls.Where(i => i != "reference"))
                        {
                            step++;
                            stderr.WriteLine($"[{step}/{total}] routing {impl} {pass} T={seqLen}");
                            var (timing, groupPairs) = TimeRouting(q, k, v, upstream, window, causal, impl == "ops" ? AttentionKernel.Ops : AttentionKernel.Fused, backward, runs);
                            double? speedup = denseMs.TryGetValue((seqLen, pass), out double d) ? d / timing.Ms : null;
                            results.Add(Make("routing", impl, pass, seqLen, batch, heads, dim, window, causal, timing, 4 * groupPairs * dim * flopFactor, limits, speedup));
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

        var modelResults = new List<ModelResult>();
        string modelConfig = "";
        if (model)
        {
            modelConfig = $"byte-level LM (vocab 256), dim {modelDim}, heads {modelHeads} × {modelDimHead}, depth {modelDepth}, "
                + $"ff ×4, rotary, causal, batch {batch}, window {window}; dense = {modelHeads} dense heads, local = {modelHeads} local heads "
                + $"(window {window}, radius 1), routing = {modelHeads / 2} local + {modelHeads - modelHeads / 2} routing heads (clusters = T / {window}); "
                + $"step = forward + next-token/aux loss + backward + AdamW + k-means update; median of {runs} after 1 warm-up, configurations interleaved; peak RSS from one more step each";
            stderr.WriteLine($"bench: model {modelConfig}");
            // One process-wide warm-up first, so the C# kernels every configuration uses are past tiered JIT before
            // any figure is timed (otherwise whichever configuration runs first pays for it).
            int warmLen = 2 * window;
            stderr.WriteLine($"bench: model JIT warm-up (steps of each configuration at T={warmLen} until their times settle) ...");
            foreach (string kind in modelKinds)
            {
                using var warm = new ModelStep(ModelConfig(kind, warmLen, modelDim, modelHeads, modelDimHead, modelDepth, window), 1, device);
                int calls = Timing.WarmUp(warm.Run);
                stderr.WriteLine($"bench: model {kind} warm-up: {calls} steps at T={warmLen}");
            }
            foreach (long seqLen in seqLens)
            {
                // The three configurations step in turn (dense, local, routing, dense, ...) so a change of load on
                // the machine during the run hits all of them alike; each gets one warm-up step (k-means init) first.
                var kinds = modelKinds.Where(kind => !kind.StartsWith("routing") || seqLen % window == 0).ToArray();
                if (kinds.Length < modelKinds.Length)
                    stderr.WriteLine($"bench: model routing T={seqLen}: skipped (T must be a multiple of --window {window} to fix the number of clusters)");
                var steps = kinds.Select(kind => new ModelStep(ModelConfig(kind, (int)seqLen, modelDim, modelHeads, modelDimHead, modelDepth, window), batch, device)).ToArray();
                try
                {
                    var times = kinds.Select(_ => new double[runs]).ToArray();
                    for (int r = -1; r < runs; r++)
                        for (int i = 0; i < kinds.Length; i++)
                        {
                            stderr.WriteLine(r < 0 ? $"model {kinds[i]} T={seqLen}: warm-up step" : $"model {kinds[i]} T={seqLen}: step {r + 1}/{runs}");
                            var sw = Stopwatch.StartNew();
                            steps[i].Run();
                            if (r >= 0) times[i][r] = sw.Elapsed.TotalMilliseconds;
                        }
                    // Peak memory in a separate step per configuration, after giving back what the others left: the timed
                    // steps run as training does (memory freed by one step is reused by the next, no trim in between),
                    // and a trim before each timed step would charge every step the first touch of all its memory.
                    var rss = new double[kinds.Length];
                    for (int i = 0; i < kinds.Length; i++)
                    {
                        stderr.WriteLine($"model {kinds[i]} T={seqLen}: memory step");
                        ResetPeakRss();
                        steps[i].Run();
                        rss[i] = PeakRssMb();
                    }
                    var medians = times.Select(t => { Array.Sort(t); return t[runs / 2]; }).ToArray();
                    int dense = Array.IndexOf(kinds, "dense");
                    for (int i = 0; i < kinds.Length; i++)
                    {
                        double ms = medians[i];
                        modelResults.Add(new ModelResult(kinds[i], seqLen, batch, modelDim, modelHeads, modelDepth, Math.Round(ms, 3),
                            Math.Round(batch * seqLen / (ms / 1000.0), 1), dense >= 0 ? Math.Round(medians[dense] / ms, 2) : null, Math.Round(rss[i], 1)));
                    }
                }
                finally
                {
                    foreach (var modelStep in steps) modelStep.Dispose();
                }
            }
        }

        string limitsText = $"{threads} threads, GEMM {gemm:F1} GFLOP/s (bf16 {bf16:F1}), FMA peak {peak:F1} GFLOP/s ({vectorBits}-bit)";
        if (kernels) Print(stdout, results, limitsText);
        if (model) PrintModel(stdout, modelResults, limitsText, modelConfig);
        // Whether libtorch's large tensors were on transparent huge pages (the CLI asks for them unless the user set the variable):
        // the most AnonHugePages seen while the kernel rows' inputs were resident.
        string hugePages = TorchAllocator.NativeVariable(TorchAllocator.HugePagesVariable) ?? "unset";
        double hugePagesMb = Math.Round(hugePagesBytes / 1048576.0, 1);
        // Which MKL kernels the GEMM rows (ours and dense attention's) ran on: see MklDispatch.
        string mklDispatch = MklDispatch.Status?.ToString() ?? "not requested";
        string waitPolicy = TorchAllocator.NativeVariable(TorchThreads.WaitPolicyVariable) ?? "unset";
        string spinCount = TorchAllocator.NativeVariable(TorchThreads.SpinCountVariable) ?? "unset";
        stderr.WriteLine($"bench: {TorchAllocator.HugePagesVariable}={hugePages}; AnonHugePages up to {hugePagesMb:F0} MB; MKL dispatch by CPU features: {mklDispatch}; {TorchThreads.WaitPolicyVariable}={waitPolicy}; {TorchThreads.SpinCountVariable}={spinCount}; freed memory retained: {(TorchAllocator.FreedMemoryRetained ? "yes" : "no")}");
        if (parse.GetValue(jsonOption) is string jsonPath)
        {
            var document = new Dictionary<string, object?>
            {
                ["threads"] = threads, ["gemm_gflops"] = Math.Round(gemm, 2), ["bf16_gemm_gflops"] = Math.Round(bf16, 2),
                ["fma_peak_gflops"] = Math.Round(peak, 2), ["fma_vector_bits"] = vectorBits,
                ["thp_mem_alloc_enable"] = hugePages, ["anon_huge_pages_mb"] = hugePagesMb, ["mkl_dispatch_by_features"] = mklDispatch, ["omp_wait_policy"] = waitPolicy, ["gomp_spincount"] = spinCount, ["retain_freed_memory"] = TorchAllocator.FreedMemoryRetained,
                ["results"] = results,
            };
            if (model) document["model_results"] = modelResults;
            AtomicFile.WriteAllText(jsonPath, JsonSerializer.Serialize(document, new JsonSerializerOptions { WriteIndented = true }));
            stderr.WriteLine($"bench: wrote {jsonPath}");
        }
        return CliApp.Ok;
    }

    /// <summary>
    /// Checks every configuration before any is timed, so a bad one fails at once with one line naming its option
    /// instead of after minutes of other figures: lengths within the kernels' int range, memory (overflow-checked, against
    /// what the machine has available, before anything is allocated), and each pattern, module and model configuration at
    /// each length. Returns the compiled masks of the pattern rows by (T, attention kind).
    /// </summary>
    private static Dictionary<(long, string), BlockMask> Validate(long[] seqLens, string[] attentions, string[] passes, int batch, int heads,
        int dim, int window, int nHashes, bool causal, string[] modelKinds, int modelDim, int modelHeads, int modelDimHead, int modelDepth)
    {
        double available = AvailableMemoryBytes();
        foreach (long seqLen in seqLens)
        {
            if (seqLen > int.MaxValue)
                throw new CliUsageException($"--seq-lens: T = {seqLen} is above the kernels' limit of {int.MaxValue} tokens.");
            // Kernel rows hold q, k, v, the upstream gradient, outputs, gradients and the kernels' copies: ~16 (B, H, T, D)
            // float32 tensors with a backward, ~10 without. Model rows: activations of every layer plus logits.
            int tensors = passes.Contains("forward_backward") ? 16 : 10;
            string what = $"--batch {batch} × --heads {heads} × --head-dim {dim}";   // the options the estimate grows with
            long perToken = 0;
            try
            {
                if (attentions.Length > 0) perToken = checked((long)batch * heads * dim * sizeof(float) * tensors);
                if (modelKinds.Length > 0)
                {
                    long modelPerToken = checked((long)batch * (256 * 3 + (long)modelDepth * modelDim * 32) * sizeof(float));
                    if (modelPerToken > perToken) (perToken, what) = (modelPerToken, $"--batch {batch}, --model-dim {modelDim}, --model-depth {modelDepth}");
                }
            }
            catch (OverflowException)
            {
                throw new CliUsageException($"{what} needs more memory per token than a 64-bit size can count.");
            }
            if (perToken > available)
                throw new CliUsageException($"{what} needs ~{perToken / 1e9:F1} GB per token, more than the {available / 1e9:F1} GB available.");
            if (perToken > 0 && seqLen > available / perToken)   // perToken · T > available, without overflow
                throw new CliUsageException($"--seq-lens: T = {seqLen} needs ~{(double)perToken * seqLen / 1e9:F1} GB ({what}), more than the "
                    + $"{available / 1e9:F1} GB available; the limit here is T ≤ {(long)(available / perToken)}.");
        }

        var masks = new Dictionary<(long, string), BlockMask>();
        foreach (long seqLen in seqLens)
        {
            int t = (int)seqLen;
            foreach (string attention in attentions.Where(a => a != "dense"))
            {
                try
                {
                    switch (attention)
                    {
                        case "routing":
                            new SparseAttention.Modules.RoutingAttention(heads, dim, t, Math.Min(window, t), causal).Dispose();
                            break;
                        case "lsh":
                            new SparseAttention.Modules.LshAttention(heads, dim, t, Math.Min(window, t), nHashes, causal: causal).Dispose();
                            break;
                        default:
                            masks[(seqLen, attention)] = PatternFor(attention, window, causal).Compile(t, Math.Min(window, t), heads);
                            break;
                    }
                }
                catch (ArgumentException e)
                {
                    throw new CliUsageException($"--seq-lens: T = {seqLen} does not fit --attention {attention} with --window {window} "
                        + $"({WithoutParameterName(e)}).");
                }
            }
            foreach (string kind in modelKinds)
            {
                try { ModelConfig(kind, t, modelDim, modelHeads, modelDimHead, modelDepth, window); }
                catch (ArgumentException e)
                {
                    throw new CliUsageException($"--seq-lens: T = {seqLen} does not fit --model-kinds {kind} ({WithoutParameterName(e)}).");
                }
            }
        }
        return masks;
    }

    /// <summary>A library message without its internal parameter name ("numSlidingWindowBlocks: …", "(Parameter '…')").</summary>
    private static string WithoutParameterName(ArgumentException e)
    {
        string message = e.Message;
        if (e.ParamName is not string name) return message.TrimEnd('.');
        message = message.Replace($" (Parameter '{name}')", "");
        if (message.StartsWith(name + ": ", StringComparison.Ordinal)) message = message[(name.Length + 2)..];
        return message.TrimEnd('.');
    }

    /// <summary>Memory this process can still take: MemAvailable of /proc/meminfo, else the GC's view of the machine.</summary>
    private static double AvailableMemoryBytes()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/meminfo"))
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
                    return double.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;   // "MemAvailable: 123 kB"
        }
        catch (IOException) { }
        return GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
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

    /// <summary>
    /// The three model configurations of one size, causal, vocab 256, MaxSeqLen = T: <c>dense</c> = every head in a
    /// Dense static group; <c>local</c> = every head local (window <paramref name="window"/>, radius 1);
    /// <c>routing</c> = half local heads, the rest routing heads (WindowSize = window, so clusters = T / window).
    /// A <c>-reversible</c> suffix gives the same configuration with reversible layers, a <c>-bf16</c> suffix (last) with bfloat16
    /// projections and feed-forward, <c>-shaw</c> / <c>-alibi</c> relative positions (Shaw tables clipped at ±16, ALiBi) instead of rotary.
    /// </summary>
    internal static TransformerConfig ModelConfig(string kind, int seqLen, int dim, int heads, int dimHead, int depth, int window)
    {
        var config = new TransformerConfig
        {
            NumTokens = 256, Dim = dim, Heads = heads, DimHead = dimHead, Depth = depth, MaxSeqLen = seqLen, Causal = true,
            WindowSize = Math.Min(window, seqLen), LocalAttnWindowSize = window, LocalAttnRadiusBlocks = 1, SparsitySkipFirst = 0,
            Reversible = kind.Contains("-reversible"), ComputeDtype = kind.EndsWith("-bf16") ? ComputeDtype.BFloat16 : ComputeDtype.Float32,
            PositionalEncoding = kind.EndsWith("-shaw") ? PositionalEncoding.RelativeShaw : kind.EndsWith("-alibi") ? PositionalEncoding.Alibi : PositionalEncoding.Rotary,
        };
        config = kind.Replace("-bf16", "").Replace("-reversible", "").Replace("-shaw", "").Replace("-alibi", "") switch
        {
            "dense" => config with { NLocalAttnHeads = [0], StaticHeadGroups = [new StaticHeadGroup(new StaticPatternSpec(StaticPatternKind.Dense), heads)] },
            "local" => config with { NLocalAttnHeads = [heads] },
            "routing" => config with { NLocalAttnHeads = [heads / 2] },
            _ => throw new CliUsageException($"unknown model kind '{kind}'."),
        };
        return config.Validate();
    }

    /// <summary>One configuration's training step: forward, next-token + aux loss, backward, AdamW step, k-means
    /// UpdateAll, on a fixed batch of random bytes. The first step also initialises the k-means.</summary>
    private sealed class ModelStep : IDisposable
    {
        private const double LearningRate = 1e-4;
        private readonly RoutingTransformerLM lm;
        private readonly TrainingStep step;
        private readonly Tensor tokens;

        public ModelStep(TransformerConfig config, int batch, Device device)
        {
            random.manual_seed(1);
            lm = new RoutingTransformerLM(config);
            if (device.type != DeviceType.CPU) lm.to(device);
            step = new TrainingStep(lm, LearningRate, weightDecay: 0);   // AdamW's own default
            tokens = randint(0, config.NumTokens, new long[] { batch, config.MaxSeqLen }, dtype: ScalarType.Int64, generator: new Generator(2)).to(device);
        }

        public void Run()
        {
            using var scope = NewDisposeScope();
            step.Run(tokens, null, LearningRate, clipNorm: 0);
            if (tokens.device.type == DeviceType.CUDA) cuda.synchronize();             // time the GPU's work, not its queueing
        }

        public void Dispose()
        {
            step.Dispose();
            tokens.Dispose();
            lm.Dispose();
        }
    }

    private static Result Make(string attention, string impl, string pass, long seqLen, int batch, int heads, int dim, long window,
        bool causal, (double Ms, double Rss, int WarmUp) timing, double usefulFlops, Limits limits, double? speedup)
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
        ResetPeakRss();
        var times = new double[runs];
        for (int i = 0; i < runs; i++)
        {
            var sw = Stopwatch.StartNew();
            Once();
            times[i] = sw.Elapsed.TotalMilliseconds;
        }
        Array.Sort(times);
        return (times[runs / 2], PeakRssMb(), warmUp);
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

    // Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) so each figure gets its own peak. Memory freed before
    // (the .NET wrappers of earlier tensors, heap pages glibc kept after earlier rows) is given back first, so a figure
    // is the measured code's peak on top of the process's base, not what earlier rows left behind.
    internal static void ResetPeakRss()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        if (OperatingSystem.IsLinux()) MallocTrim(0);
        try { File.WriteAllText("/proc/self/clear_refs", "5"); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "malloc_trim")]
    private static extern int MallocTrim(nuint pad);

    internal static double PeakRssMb() => StatusMb("VmHWM:") ?? Process.GetCurrentProcess().PeakWorkingSet64 / 1048576.0;

    /// <summary>Resident memory now (VmRSS), MB.</summary>
    internal static double CurrentRssMb() => StatusMb("VmRSS:") ?? Process.GetCurrentProcess().WorkingSet64 / 1048576.0;

    /// <summary>A kB field of /proc/self/status in MB; null where there is none (not Linux).</summary>
    private static double? StatusMb(string field)
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith(field, StringComparison.Ordinal))
                    return double.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) / 1024.0;
        }
        catch (IOException) { }
        return null;
    }

    private static void Print(TextWriter stdout, List<Result> results, string limits)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stdout), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 140;
        var table = new Table().Title($"attention bench — {limits}");
        foreach (var c in new[] { "attention", "impl", "pass", "T", "ms", "GFLOP/s", "% of GEMM", "% of peak", "× dense", "peak RSS MB" }) table.AddColumn(c);
        foreach (var r in results)
            table.AddRow(r.attention, r.impl, r.pass, r.seq_len.ToString(), r.ms.ToString("F1"), r.gflops.ToString("F1"),
                (r.efficiency * 100).ToString("F0"), (r.peak_efficiency * 100).ToString("F0"), r.speedup_vs_dense is double s ? s.ToString("F1") : "–",
                r.peak_rss_mb.ToString("F0"));
        console.Write(table);
    }

    private static void PrintModel(TextWriter stdout, List<ModelResult> results, string limits, string config)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(stdout), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 140;
        var table = new Table().Title($"model training step — {limits}");
        foreach (var c in new[] { "model", "T", "B", "dim", "heads", "depth", "ms/step", "tokens/s", "× dense", "peak RSS MB" }) table.AddColumn(c);
        foreach (var r in results)
            table.AddRow(r.model, r.seq_len.ToString(), r.batch.ToString(), r.dim.ToString(), r.heads.ToString(), r.depth.ToString(),
                r.ms_per_step.ToString("F1"), r.tokens_per_s.ToString("F0"), r.speedup_vs_dense is double s ? s.ToString("F2") : "–", r.peak_rss_mb.ToString("F0"));
        console.Write(table);
        stdout.WriteLine("model: " + config);
    }
}
