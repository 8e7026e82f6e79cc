using System.CommandLine;
using System.Diagnostics;
using System.Text.Json;
using SparseAttention.Model;
using SparseAttention.Training;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn bench --generate</c>: time per generated token of incremental decoding (a
/// <see cref="RoutingTransformerLM.DecodingState"/>) against re-encoding the context per token, for a preset at several
/// positions, in one process; optionally the resident memory while generating many tokens. The model is randomly
/// initialised (its k-means centroids set from one batch of random tokens, as training would); decoding cost does not
/// depend on what the weights learned.
/// </summary>
internal sealed class GenerateBench
{
    private readonly Option<bool> generateOption = new("--generate") { Description = "Time text generation instead of kernels: cached (incremental) vs uncached (re-encode per token) decoding of a preset, and memory over a long generation." };
    private readonly Option<string> presetOption = new("--preset") { HelpName = "NAME|FILE", Description = "--generate: the model configuration.", DefaultValueFactory = _ => "small-routing" };
    private readonly Option<string[]> setOption = new("--set") { HelpName = "KEY=VALUE", Description = "--generate: override one configuration key (e.g. --set max_seq_len=2048); repeatable." };
    private readonly Option<string> positionsOption = new("--positions") { HelpName = "P,P,...", Description = "--generate: context lengths (prompt tokens) at which decoding is timed; each + --tokens must fit in max_seq_len.", DefaultValueFactory = _ => "500,2000" };
    private readonly Option<int> tokensOption = new("--tokens") { HelpName = "N", Description = "--generate: cached steps timed per position (median reported).", DefaultValueFactory = _ => 32 };
    private readonly Option<int> uncachedTokensOption = new("--uncached-tokens") { HelpName = "N", Description = "--generate: uncached steps timed per position (0 = skip the uncached column).", DefaultValueFactory = _ => 3 };
    private readonly Option<int> rssTokensOption = new("--rss-tokens") { HelpName = "N", Description = "--generate: also generate N tokens with the cache from a 16-token prompt and report resident memory along the way (0 = skip).", DefaultValueFactory = _ => 0 };

    /// <summary>Whether --generate was given.</summary>
    public bool Requested(ParseResult parse) => parse.GetValue(generateOption);

    /// <summary>Adds the --generate options to the bench command.</summary>
    public void AddTo(Command command)
    {
        foreach (var o in new Option[] { generateOption, presetOption, setOption, positionsOption, tokensOption, uncachedTokensOption, rssTokensOption })
            command.Add(o);
    }

    private sealed record Row(int Position, double PrefillMs, double CachedMsPerToken, double? UncachedMsPerToken, double PeakRssMb);

    public int Execute(ParseResult parse, string? jsonPath)
    {
        var stdout = parse.InvocationConfiguration.Output;
        var config = ConfigCommand.Effective(parse.GetValue(presetOption)!, parse.GetValue(setOption) ?? []);
        if (!config.Causal) throw new CliUsageException($"--preset: generation needs a causal model; {parse.GetValue(presetOption)} has causal = false.");
        int tokens = parse.GetValue(tokensOption), uncachedTokens = parse.GetValue(uncachedTokensOption), rssTokens = parse.GetValue(rssTokensOption);
        if (tokens < 1 || tokens > 100_000) throw new CliUsageException($"--tokens must be in [1, 100000], got {tokens}.");
        if (uncachedTokens < 0 || uncachedTokens > 1000) throw new CliUsageException($"--uncached-tokens must be in [0, 1000], got {uncachedTokens}.");
        if (rssTokens < 0 || rssTokens > Sampling.MaxNewTokensLimit) throw new CliUsageException($"--rss-tokens must be in [0, {Sampling.MaxNewTokensLimit}], got {rssTokens}.");
        var positions = parse.GetValue(positionsOption)!.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
            .Select(s => int.TryParse(s, out int p) && p >= 1 ? p : throw new CliUsageException($"--positions: '{s}' is not a positive integer.")).ToArray();
        if (positions.Length == 0) throw new CliUsageException("--positions: give at least one position.");
        foreach (int p in positions)
            if ((long)p + tokens + 2 > config.MaxSeqLen)
                throw new CliUsageException($"--positions: {p} + --tokens {tokens} (+ 2 warm-up steps) exceeds max_seq_len = {config.MaxSeqLen}; raise it with --set max_seq_len=N.");

        random.manual_seed(0);
        using var model = new RoutingTransformerLM(config);
        if (!model.SupportsCachedDecoding)
            throw new CliUsageException($"--preset: this configuration cannot decode incrementally (e.g. cross-attention); nothing to compare.");
        using (no_grad())
        {
            model.train();   // one training forward sets the k-means centroids from data, as training would
            using (NewDisposeScope()) model.forward(randint(0, config.NumTokens, new long[] { 1, Math.Min(config.MaxSeqLen, 1024) }, generator: new Generator(1)));
            model.eval();
        }
        var generator = new Generator(2);
        var rows = new List<Row>();
        foreach (int position in positions)
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var sequence = randint(0, config.NumTokens, new long[] { 1, position + tokens + 2 }, generator: generator);
            ProcessMemory.ResetPeakRss();
            var watch = Stopwatch.StartNew();
            using var state = model.StartDecoding(sequence.narrow(1, 0, position));
            double prefill = watch.Elapsed.TotalMilliseconds;
            var times = new List<double>();
            for (int i = 0; i < tokens + 2; i++)
            {
                watch.Restart();
                using (NewDisposeScope()) state.Append(sequence.select(1, position + i));
                if (i >= 2) times.Add(watch.Elapsed.TotalMilliseconds);   // the first two steps warm up
            }
            double peak = ProcessMemory.PeakRssMb();
            times.Sort();
            double? uncached = null;
            if (uncachedTokens > 0)
            {
                var full = new List<double>();
                for (int i = 0; i < uncachedTokens + 1; i++)
                {
                    watch.Restart();
                    using (NewDisposeScope()) model.forward(sequence.narrow(1, 0, position + 1 + i)).Logits.select(1, -1);
                    if (i >= 1) full.Add(watch.Elapsed.TotalMilliseconds);
                }
                full.Sort();
                uncached = full[full.Count / 2];
            }
            rows.Add(new Row(position, prefill, times[times.Count / 2], uncached, peak));
        }

        (double AfterPromptMb, double PeakMb, List<(int Tokens, double RssMb)> Samples)? rss = null;
        if (rssTokens > 0)
        {
            using var noGrad = no_grad();
            var samples = new List<(int, double)>();
            using var state = model.StartDecoding(randint(0, config.NumTokens, new long[] { 1, 16 }, generator: generator));
            GC.Collect();
            double afterPrompt = ProcessMemory.CurrentRssMb();
            ProcessMemory.ResetPeakRss();
            var next = zeros(1, dtype: ScalarType.Int64);
            for (int i = 1; i <= rssTokens; i++)
            {
                using (NewDisposeScope())
                {
                    var logits = state.Append(next);
                    next.copy_(logits.argmax(-1));
                }
                if (i % Math.Max(1, rssTokens / 10) == 0 || i == rssTokens) samples.Add((i, ProcessMemory.CurrentRssMb()));
            }
            rss = (afterPrompt, ProcessMemory.PeakRssMb(), samples);
        }

        int threads = get_num_threads();
        stdout.WriteLine($"generation: preset {parse.GetValue(presetOption)}, max_seq_len {config.MaxSeqLen}, dim {config.Dim}, depth {config.Depth}, {threads} threads; " +
                         $"median ms per token over {tokens} cached steps and {uncachedTokens} uncached steps (uncached = one full forward of the context)");
        stdout.WriteLine($"{"position",9} {"prefill ms",11} {"cached ms/tok",14} {"uncached ms/tok",16} {"speed-up",9} {"peak RSS MB",12}");
        foreach (var r in rows)
            stdout.WriteLine($"{r.Position,9} {r.PrefillMs,11:F1} {r.CachedMsPerToken,14:F2} {(r.UncachedMsPerToken is double u ? u.ToString("F1") : "-"),16} " +
                             $"{(r.UncachedMsPerToken is double v ? (v / r.CachedMsPerToken).ToString("F0") + "×" : "-"),9} {r.PeakRssMb,12:F0}");
        if (rss is var (after, peakMb, list))
            stdout.WriteLine($"memory over {rssTokens} cached tokens (context slides at {config.MaxSeqLen}): RSS after the prompt {after:F0} MB, peak {peakMb:F0} MB; " +
                             string.Join(", ", list.Select(s => $"{s.Tokens}: {s.RssMb:F0}")));
        if (jsonPath is not null)
        {
            var json = new
            {
                preset = parse.GetValue(presetOption),
                config = JsonDocument.Parse(ConfigBinding.ToJson(config)).RootElement,
                threads,
                tokens,
                uncached_tokens = uncachedTokens,
                rows = rows.Select(r => new
                {
                    position = r.Position, prefill_ms = r.PrefillMs, cached_ms_per_token = r.CachedMsPerToken,
                    uncached_ms_per_token = r.UncachedMsPerToken, speedup = r.UncachedMsPerToken / r.CachedMsPerToken, peak_rss_mb = r.PeakRssMb,
                }),
                rss = rss is var (a, p, s) ? new { tokens = rssTokens, after_prompt_mb = a, peak_mb = p, samples = s.Select(x => new { tokens = x.Tokens, rss_mb = x.RssMb }) } : null,
            };
            AtomicFile.WriteAllText(jsonPath, JsonSerializer.Serialize(json, new JsonSerializerOptions { WriteIndented = true }));
            stdout.WriteLine($"wrote {jsonPath}");
        }
        return CliApp.Ok;
    }
}
