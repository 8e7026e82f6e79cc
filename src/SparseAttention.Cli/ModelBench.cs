using System.Diagnostics;
using SparseAttention.Model;
using SparseAttention.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// The model rows of <c>sparse-attn bench --model</c>: full training steps (<see cref="TrainingStep"/>) of small byte-level
/// <see cref="RoutingTransformerLM"/> configurations (dense vs local vs routing heads, optionally reversible, bfloat16 or with
/// relative positions), interleaved so a change of load hits all alike, with each one's peak resident memory.
/// </summary>
internal static class ModelBench
{
    /// <summary>The configurations <c>--model-kinds</c> accepts (see <see cref="ModelConfig"/>).</summary>
    public static readonly string[] Models = [.. new[] { "dense", "local", "routing", "dense-reversible", "local-reversible", "routing-reversible" }
                                              .SelectMany(m => new[] { m, m + "-bf16" }),
                                              .. new[] { "local", "routing" }.SelectMany(m => new[] { m + "-shaw", m + "-alibi" }),
                                              .. Presets.Names.SelectMany(p => new[] { "preset:" + p, "preset:" + p + "-shaw", "preset:" + p + "-alibi" })];

    /// <summary>One model training-step figure (the <c>"model_results"</c> JSON rows).</summary>
    internal sealed record ModelResult(string model, long seq_len, long batch, long dim, long heads, long depth,
        double ms_per_step, double tokens_per_s, double? speedup_vs_dense, double peak_rss_mb);

    /// <summary>Times every configuration of <paramref name="modelKinds"/> at every length; returns the rows and a one-line
    /// description of the models for the report.</summary>
    public static (List<ModelResult> Results, string Config) Run(long[] seqLens, string[] modelKinds, int modelDim, int modelHeads,
        int modelDimHead, int modelDepth, int batch, int window, int runs, Device device, TextWriter stderr)
    {
        var modelResults = new List<ModelResult>();
        string modelConfig = $"byte-level LM (vocab 256), dim {modelDim}, heads {modelHeads} × {modelDimHead}, depth {modelDepth}, "
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
                    ProcessMemory.ResetPeakRss();
                    steps[i].Run();
                    rss[i] = ProcessMemory.PeakRssMb();
                }
                var medians = times.Select(t => { Array.Sort(t); return t[runs / 2]; }).ToArray();
                int dense = Array.IndexOf(kinds, "dense");
                for (int i = 0; i < kinds.Length; i++)
                {
                    double ms = medians[i];
                    var config = steps[i].Config;
                    modelResults.Add(new ModelResult(kinds[i], seqLen, batch, config.Dim, config.Heads, config.Depth, Math.Round(ms, 3),
                        Math.Round(batch * seqLen / (ms / 1000.0), 1), dense >= 0 ? Math.Round(medians[dense] / ms, 2) : null, Math.Round(rss[i], 1)));
                }
            }
            finally
            {
                foreach (var modelStep in steps) modelStep.Dispose();
            }
        }
        return (modelResults, modelConfig);
    }

    /// <summary>
    /// The three model configurations of one size, causal, vocab 256, MaxSeqLen = T: <c>dense</c> = every head in a
    /// Dense static group; <c>local</c> = every head local (window <paramref name="window"/>, radius 1);
    /// <c>routing</c> = half local heads, the rest routing heads (WindowSize = window, so clusters = T / window).
    /// A <c>-reversible</c> suffix gives the same configuration with reversible layers, a <c>-bf16</c> suffix (last) with bfloat16
    /// projections and feed-forward, <c>-shaw</c> / <c>-alibi</c> relative positions (Shaw tables clipped at ±16, ALiBi) instead of rotary.
    /// <c>preset:NAME</c> is a shipped preset as it is (its own size and heads, MaxSeqLen = T), with the same suffixes.
    /// </summary>
    internal static TransformerConfig ModelConfig(string kind, int seqLen, int dim, int heads, int dimHead, int depth, int window)
    {
        if (kind.StartsWith("preset:", StringComparison.Ordinal))
        {
            string name = kind["preset:".Length..].Replace("-bf16", "").Replace("-reversible", "").Replace("-shaw", "").Replace("-alibi", "");
            var preset = Presets.Load(name);
            return (preset with
            {
                MaxSeqLen = seqLen,
                Reversible = preset.Reversible || kind.Contains("-reversible"),
                ComputeDtype = kind.EndsWith("-bf16") ? ComputeDtype.BFloat16 : preset.ComputeDtype,
                PositionalEncoding = kind.EndsWith("-shaw") ? PositionalEncoding.RelativeShaw
                    : kind.EndsWith("-alibi") ? PositionalEncoding.Alibi : preset.PositionalEncoding,
            }).Validate();
        }
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

        public TransformerConfig Config { get; }

        public ModelStep(TransformerConfig config, int batch, Device device)
        {
            Config = config;
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
}
