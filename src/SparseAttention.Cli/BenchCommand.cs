using System.CommandLine;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn bench</c>: times attention kernels (median of several runs after a warm-up until timings settle) beside
/// dense <c>scaled_dot_product_attention</c> and the machine's matrix-multiply rate, all measured in
/// the same process run, and reports ratios. With <c>--model</c> it times full training steps of a small
/// byte-level <see cref="SparseAttention.Model.RoutingTransformerLM"/> (dense vs local vs routing heads) instead; the kernel rows
/// then run only when <c>--attention</c>, <c>--impl</c> or <c>--pass</c> is given explicitly. This class reads and checks
/// the options; <see cref="KernelBench"/> and <see cref="ModelBench"/> time the rows, <see cref="BenchReport"/> reports them
/// and <see cref="GenerateBench"/> serves <c>--generate</c>.
/// </summary>
internal sealed class BenchCommand
{
    private readonly GenerateBench generate = new();

    private readonly Option<string> seqLensOption = new("--seq-lens") { HelpName = "T,T,...", Description = "Sequence lengths.", DefaultValueFactory = _ => "1024,4096,16384" };
    private readonly Option<string> attentionOption = new("--attention") { HelpName = "KIND,...", Description = "Attention kinds: " + string.Join(", ", KernelBench.Attentions) + ".", DefaultValueFactory = _ => "dense,local,strided,fixed,bigbird,routing,lsh" };
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
    private readonly Option<string> modelKindsOption = new("--model-kinds") { HelpName = "KIND,...", Description = "--model: configurations: " + string.Join(", ", ModelBench.Models) + " (-reversible: RevNet layers that recompute activations in the backward; -bf16: compute_dtype = BFloat16; -shaw / -alibi: positional_encoding = RelativeShaw / Alibi instead of rotary). The × dense column needs dense.", DefaultValueFactory = _ => "dense,local,routing" };

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
        var attentions = List(parse, attentionOption, KernelBench.Attentions);
        var impls = List(parse, implOption, KernelBench.Impls.Where(i => i != "sdpa").ToArray());
        var passes = List(parse, passOption, KernelBench.Passes);
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
        var modelKinds = List(parse, modelKindsOption, ModelBench.Models);
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

        var limits = BenchLimits.Measure(runs, stderr);
        var (results, hugePagesBytes) = kernels
            ? KernelBench.Run(seqLens, attentions, impls, passes, batch, heads, dim, window, nHashes, causal, runs, maxDense, maxGatherBytes, masks, limits, device, stderr)
            : ([], 0);
        var (modelResults, modelConfig) = model
            ? ModelBench.Run(seqLens, modelKinds, modelDim, modelHeads, modelDimHead, modelDepth, batch, window, runs, device, stderr)
            : ([], "");
        BenchReport.Write(stdout, stderr, limits, kernels ? results : null, model ? modelResults : null, modelConfig, hugePagesBytes, parse.GetValue(jsonOption));
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
        double available = ProcessMemory.AvailableBytes();
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
                            masks[(seqLen, attention)] = KernelBench.PatternFor(attention, window, causal).Compile(t, Math.Min(window, t), heads);
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
                try { ModelBench.ModelConfig(kind, t, modelDim, modelHeads, modelDimHead, modelDepth, window); }
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
}
