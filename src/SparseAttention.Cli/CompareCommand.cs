using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using SparseAttention.Model;
using SparseAttention.Training;
using Spectre.Console;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn compare</c>: trains several configurations on the same data with the same budget (equal training time or
/// equal tokens), the same batches and the same seed, evaluates each on the same held-out windows (val bpc, and bpc by
/// position in the window), and reports a table, JSON and a PNG. Each configuration has its own run folder under --out
/// (checkpoint, log.jsonl, result.json): a re-run skips finished configurations and resumes unfinished ones.
/// </summary>
/// <remarks>
/// Time counts training steps only (evaluation and checkpointing are excluded), so the curves' time axis is the same
/// quantity for every configuration. On a machine shared with other work, wall-clock time depends on the load;
/// <c>--budget-cpu-minutes</c> budgets the process's CPU time spent in training steps instead, which the load barely changes. Equal-token runs decay the learning rate (cosine) to the budget's step count;
/// equal-time runs, whose step count is not known in advance, keep the learning rate constant after warm-up.
/// With <c>--parallel N</c> the configurations run as N child processes at a time (each with --threads-per-run threads,
/// default 1): on a 2-core machine two one-thread runs side by side share the machine fairly during the whole budget.
/// </remarks>
internal sealed class CompareCommand
{
    private readonly Option<string> dataOption = new("--data") { HelpName = "PATH", Description = "Text: a file, or a folder whose files are concatenated (ordinal path order); the last 5 % is held out.", Required = true };
    private readonly Option<string> outOption = new("--out") { HelpName = "DIR", Description = "Comparison folder: one run folder per configuration, results.json, compare.png.", Required = true };
    private readonly Option<string[]> configOption = new("--config")
    {
        HelpName = "[NAME=]PRESET|FILE[:set k=v,...]",
        Description = "A configuration to train: a preset or JSON file, optionally with overrides (e.g. \"skip2=long-mixed:set sparsity_skip_first=2,window_size=128\"); repeatable, at least 2.",
        Required = true,
    };
    private readonly Option<double?> budgetMinutesOption = new("--budget-minutes") { HelpName = "M", Description = "Equal training time: each configuration trains M minutes (time of training steps, without evaluation)." };
    private readonly Option<double?> budgetCpuMinutesOption = new("--budget-cpu-minutes") { HelpName = "M", Description = "Equal CPU time: each configuration trains until its training steps used M minutes of its process's CPU time (fair on a loaded machine, where wall-clock is not; meant for one thread per run)." };
    private readonly Option<long?> budgetTokensOption = new("--budget-tokens") { HelpName = "N", Description = "Equal tokens: each configuration trains ⌈N / (batch · seq_len)⌉ steps (reproducible bit for bit)." };
    private readonly Option<int?> seqLenOption = new("--seq-len") { HelpName = "T", Description = "Tokens per training window (default: the first configuration's max_seq_len; routing heads need exactly max_seq_len)." };
    private readonly Option<int> batchSizeOption = new("--batch-size") { HelpName = "B", Description = "Windows per step.", DefaultValueFactory = _ => 4 };
    private readonly Option<int?> threadsOption = new("--threads-per-run") { HelpName = "N", Description = "libtorch threads of each run (default: libtorch's choice; 1 with --parallel)." };
    private readonly Option<int> parallelOption = new("--parallel") { HelpName = "N", Description = "Run up to N configurations at once, each in its own process (1 = one after another, in this process).", DefaultValueFactory = _ => 1 };
    private readonly Option<int> evalEveryOption = new("--eval-every") { HelpName = "N", Description = "Validate (and checkpoint) every N steps.", DefaultValueFactory = _ => 50 };
    private readonly Option<int> evalBatchesOption = new("--eval-batches") { HelpName = "N", Description = "Validation batches (of --batch-size windows) per evaluation.", DefaultValueFactory = _ => 8 };
    private readonly Option<int> bucketsOption = new("--position-buckets") { HelpName = "N", Description = "Buckets of the bpc-by-position evaluation at the end.", DefaultValueFactory = _ => 8 };
    private readonly Option<double> lrOption = new("--lr") { HelpName = "LR", Description = "Peak learning rate (AdamW).", DefaultValueFactory = _ => 1e-3 };
    private readonly Option<int> warmupOption = new("--warmup") { HelpName = "N", Description = "Linear warm-up steps.", DefaultValueFactory = _ => 50 };
    private readonly Option<long> seedOption = new("--seed") { HelpName = "N", Description = "Seed of initialisation and batch sampling (the same for every configuration).", DefaultValueFactory = _ => 0 };
    private readonly Option<bool> jsonOption = new("--json") { Description = "Print the results as JSON instead of a table." };
    private readonly Option<string?> onlyOption = new("--only") { Description = "Internal: train only this configuration (used by --parallel's child processes).", Hidden = true };

    /// <summary>Set to request a clean stop (as Ctrl-C does): the current configuration saves a checkpoint and the command ends.</summary>
    internal static volatile bool StopRequested;

    /// <summary>For tests: called after every step with (configuration, step); returning true stops as Ctrl-C does.</summary>
    internal static Func<string, long, bool>? StopAfterStep;

    public static Command Create()
    {
        var self = new CompareCommand();
        var command = new Command("compare", "Train several configurations on the same data and budget (equal time or equal tokens); table, JSON and PNG of val bpc against time, tokens and position.");
        foreach (var option in new Option[] { self.dataOption, self.outOption, self.configOption, self.budgetMinutesOption, self.budgetCpuMinutesOption, self.budgetTokensOption, self.seqLenOption,
                     self.batchSizeOption, self.threadsOption, self.parallelOption, self.evalEveryOption, self.evalBatchesOption, self.bucketsOption, self.lrOption,
                     self.warmupOption, self.seedOption, self.jsonOption, self.onlyOption })
            command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    /// <summary>Everything that must be equal across configurations and sessions of one comparison (compare.json).</summary>
    internal sealed record Plan(
        [property: JsonPropertyName("data")] string Data,
        [property: JsonPropertyName("budget_minutes")] double? BudgetMinutes,
        [property: JsonPropertyName("budget_tokens")] long? BudgetTokens,
        [property: JsonPropertyName("options")] TrainingOptions Options,
        [property: JsonPropertyName("eval_every")] int EvalEvery,
        [property: JsonPropertyName("position_buckets")] int Buckets,
        [property: JsonPropertyName("budget_cpu_minutes")] double? BudgetCpuMinutes = null)
    {
        /// <summary>Fraction of the budget spent at <paramref name="step"/> after <paramref name="seconds"/> of training and <paramref name="cpuSeconds"/> of CPU time.</summary>
        public double Spent(long step, double seconds, double cpuSeconds) =>
            MaxSteps is long ms ? (double)step / ms : BudgetCpuMinutes is double c ? cpuSeconds / (c * 60) : seconds / (BudgetMinutes!.Value * 60);

        /// <summary>"20 minutes of training", "20 CPU minutes of training" or "1,000 tokens (N steps)".</summary>
        public string Describe() => MaxSteps is long ms ? $"{BudgetTokens:N0} tokens ({ms} steps)" :
            BudgetCpuMinutes is double c ? $"{c} CPU minutes of training" : $"{BudgetMinutes} minutes of training";

        /// <summary>Steps of the equal-token budget; null for equal time.</summary>
        [JsonIgnore] public long? MaxSteps => BudgetTokens is long n ? (n + (long)Options.BatchSize * Options.SeqLen - 1) / ((long)Options.BatchSize * Options.SeqLen) : null;
    }

    /// <summary>One --config: its name (run folder), the text given, and the configuration it builds.</summary>
    internal sealed record Entry(string Name, string Spec, TransformerConfig Config);

    /// <summary>A finished configuration (result.json).</summary>
    internal sealed record Result(
        [property: JsonPropertyName("name")] string Name,
        [property: JsonPropertyName("config")] string Spec,
        [property: JsonPropertyName("parameters")] long Parameters,
        [property: JsonPropertyName("steps")] long Steps,
        [property: JsonPropertyName("tokens")] long Tokens,
        [property: JsonPropertyName("train_seconds")] double TrainSeconds,
        [property: JsonPropertyName("cpu_seconds")] double? CpuSeconds,
        [property: JsonPropertyName("tokens_per_s")] double TokensPerSecond,
        [property: JsonPropertyName("val_bpc")] double ValBpc,
        [property: JsonPropertyName("bpc_by_position")] double[] BpcByPosition,
        [property: JsonPropertyName("position_bucket_size")] int BucketSize,
        [property: JsonPropertyName("peak_rss_mb")] double PeakRssMb,
        [property: JsonPropertyName("threads")] int Threads);

    /// <summary>One evaluation in a run's log.jsonl.</summary>
    internal sealed record Point(
        [property: JsonPropertyName("step")] long Step,
        [property: JsonPropertyName("tokens")] long Tokens,
        [property: JsonPropertyName("train_seconds")] double TrainSeconds,
        [property: JsonPropertyName("loss")] double? Loss,
        [property: JsonPropertyName("val_bpc")] double ValBpc,
        [property: JsonPropertyName("tokens_per_s")] double? TokensPerSecond,
        [property: JsonPropertyName("peak_rss_mb")] double PeakRssMb,
        [property: JsonPropertyName("cpu_seconds")] double? CpuSeconds = null);

    private static readonly JsonSerializerOptions Json = new() { WriteIndented = true };
    private static readonly JsonSerializerOptions Line = new();

    private int Execute(ParseResult parse)
    {
        // With --json, standard output carries only the report; progress goes to standard error.
        var output = parse.GetValue(jsonOption) ? parse.InvocationConfiguration.Error : parse.InvocationConfiguration.Output;
        string outDir = parse.GetValue(outOption)!;
        double? minutes = parse.GetValue(budgetMinutesOption), cpuMinutes = parse.GetValue(budgetCpuMinutesOption);
        long? tokens = parse.GetValue(budgetTokensOption);
        if (new object?[] { minutes, cpuMinutes, tokens }.Count(b => b is not null) != 1)
            throw new CliUsageException("--budget-minutes / --budget-cpu-minutes / --budget-tokens: give exactly one (equal training time, CPU time or tokens).");
        foreach (var (name, value) in new[] { ("--budget-minutes", minutes), ("--budget-cpu-minutes", cpuMinutes) })
            if (value is double m && !(m > 0 && double.IsFinite(m))) throw new CliUsageException($"{name} must be > 0, got {m}.");
        if (tokens is <= 0) throw new CliUsageException($"--budget-tokens must be > 0, got {tokens}.");
        foreach (var o in new[] { batchSizeOption, parallelOption, evalEveryOption, evalBatchesOption, bucketsOption, warmupOption })
            if (parse.GetValue(o) <= 0 && !(o == warmupOption && parse.GetValue(o) == 0)) throw new CliUsageException($"{o.Name} must be > 0, got {parse.GetValue(o)}.");
        int parallel = parse.GetValue(parallelOption);
        int? threads = parse.GetValue(threadsOption) ?? (parallel > 1 ? 1 : null);
        if (threads is <= 0) throw new CliUsageException($"--threads-per-run must be > 0, got {threads}.");
        if (File.Exists(outDir)) throw new CliUsageException($"--out: {outDir} is a file; the comparison folder must be a folder.");

        var entries = ParseEntries(parse.GetValue(configOption) ?? []);
        if (entries.Count < 2 && parse.GetValue(onlyOption) is null)
            throw new CliUsageException($"--config: give at least 2 configurations to compare, got {entries.Count}.");
        int seqLen = parse.GetValue(seqLenOption) ?? entries[0].Config.MaxSeqLen;
        var options = new TrainingOptions
        {
            SeqLen = seqLen, BatchSize = parse.GetValue(batchSizeOption), LearningRate = parse.GetValue(lrOption), WarmupSteps = parse.GetValue(warmupOption),
            EvalBatches = parse.GetValue(evalBatchesOption), Seed = parse.GetValue(seedOption),
        };
        var plan = new Plan(Path.GetFullPath(parse.GetValue(dataOption)!), minutes, tokens, options, parse.GetValue(evalEveryOption), parse.GetValue(bucketsOption), cpuMinutes);
        // Equal tokens: cosine decay to the budget's last step; equal time: constant after warm-up (the step count is unknown).
        plan = plan with { Options = plan.MaxSteps is long steps ? options with { DecaySteps = (int)Math.Min(int.MaxValue, steps) } : options with { DecaySteps = 1, MinLrRatio = 1 } };
        try { plan.Options.Validate(); }
        catch (ArgumentException e) { throw new CliUsageException($"--{ConfigBinding.KeyOf(e.ParamName).Replace('_', '-')}: {ConfigCommand.Plain(e)}"); }
        if (plan.Buckets > seqLen - 1) throw new CliUsageException($"--position-buckets must be at most seq_len − 1 = {seqLen - 1}, got {plan.Buckets}.");
        foreach (var e in entries)
        {
            Limits.RequireTrainableModel(e.Config, $"--config {e.Spec}");
            Limits.RequireBatchFits(e.Config, options.BatchSize, seqLen, "--batch-size", "--seq-len");
        }

        CheckPlan(outDir, plan, parse.GetValue(onlyOption) is not null);
        if (parse.GetValue(onlyOption) is string only)
        {
            var entry = entries.FirstOrDefault(e => e.Name == only) ?? throw new CliUsageException($"--only: no configuration named '{only}'.");
            CliThreads.Apply(threads);
            using var corpus = LoadCorpus(plan);
            return RunOne(entry, plan, corpus, outDir, threads, output, null) ? CliApp.Ok : CliApp.Failure;
        }

        var pending = entries.Where(e => ReadResult(outDir, e.Name) is null).ToList();
        foreach (var e in entries.Except(pending)) output.WriteLine($"{e.Name}: finished earlier, skipped");
        bool completed = parallel > 1 ? RunChildren(parse, pending, plan, outDir, parallel, threads, output) : RunInProcess(pending, plan, outDir, threads, output);
        if (!completed)
        {
            output.WriteLine("stopped before every configuration finished; run the same command again to continue.");
            return CliApp.Ok;
        }
        return Report(entries, plan, outDir, parse.GetValue(jsonOption), parse.InvocationConfiguration.Output);
    }

    /// <summary>Parses each --config: "[NAME=]PRESET|FILE[:set k=v,...]" (commas inside [...] or {...} belong to the value).</summary>
    internal static List<Entry> ParseEntries(IEnumerable<string> specs)
    {
        var entries = new List<Entry>();
        foreach (string spec in specs)
        {
            string body = spec.Trim(), name = "";
            int colon = body.IndexOf(":set ", StringComparison.Ordinal);
            string head = colon >= 0 ? body[..colon] : body;
            string sets = colon >= 0 ? body[(colon + 5)..] : "";
            int eq = head.IndexOf('=');
            if (eq >= 0) { name = head[..eq].Trim(); head = head[(eq + 1)..]; }
            head = head.Trim();
            if (head.Length == 0) throw new CliUsageException($"--config '{spec}': expected [NAME=]PRESET|FILE[:set k=v,...], got no preset or file.");
            var assignments = SplitTopLevel(sets);
            if (name.Length == 0)
                name = Path.GetFileNameWithoutExtension(head) + string.Concat(assignments.Select(a => "+" + a));
            name = string.Concat(name.Select(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-' or '+' or '=' ? c : '_'));
            if (name.Length == 0 || name.StartsWith('.'))
                throw new CliUsageException($"--config '{spec}': the name must be a folder name (letters, digits, . _ - + =) not starting with '.', got '{name}'.");
            if (entries.Any(e => e.Name == name))
                throw new CliUsageException($"--config: two configurations are named '{name}'; give one of them a name (NAME=PRESET...).");
            TransformerConfig config;
            try { config = ConfigCommand.Effective(head, assignments); }                  // the one preset + set + validate path
            catch (CliUsageException e) { throw new CliUsageException($"--config {spec}: {e.Message}"); }
            entries.Add(new Entry(name, spec, config));
        }
        return entries;
    }

    /// <summary>"a=1,b=[1,2]" → ["a=1", "b=[1,2]"]: splits at commas outside brackets and braces.</summary>
    private static List<string> SplitTopLevel(string text)
    {
        var parts = new List<string>();
        int depth = 0, start = 0;
        for (int i = 0; i <= text.Length; i++)
        {
            if (i < text.Length && text[i] is '[' or '{') depth++;
            else if (i < text.Length && text[i] is ']' or '}') depth--;
            else if (i == text.Length || (text[i] == ',' && depth == 0))
            {
                string part = text[start..i].Trim();
                if (part.Length > 0) parts.Add(part);
                start = i + 1;
            }
        }
        return parts;
    }

    /// <summary>Writes compare.json on the first run; later runs (and children) must use the same data, budget and options.</summary>
    private static void CheckPlan(string outDir, Plan plan, bool child)
    {
        string path = Path.Combine(outDir, "compare.json");
        if (File.Exists(path))
        {
            var stored = JsonSerializer.Deserialize<Plan>(File.ReadAllText(path));
            if (stored is not null && stored != plan)
                throw new CliUsageException($"--out: {outDir} holds a comparison with other settings ({File.ReadAllText(path).ReplaceLineEndings(" ")}); " +
                                            "give the same --data, budget and training options to continue it, or choose another folder.");
        }
        else if (!child) AtomicFile.WriteAllText(path, JsonSerializer.Serialize(plan, Json));
    }

    private static TokenCorpus LoadCorpus(Plan plan) => TrainCommand.LoadCorpus(plan.Data, plan.Options, TextTokenizer.For(TokenizerKind.Bytes));

    private static bool RunInProcess(List<Entry> pending, Plan plan, string outDir, int? threads, TextWriter output)
    {
        if (pending.Count == 0) return true;
        CliThreads.Apply(threads);
        using var corpus = LoadCorpus(plan);
        StopRequested = false;
        void OnCancel(object? sender, ConsoleCancelEventArgs e)
        {
            if (StopRequested) return;
            e.Cancel = true;
            StopRequested = true;
        }
        Console.CancelKeyPress += OnCancel;
        try
        {
            bool all = true;
            if (Interactive(output))
                AnsiConsole.Progress().AutoClear(false)
                    .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var tasks = pending.ToDictionary(e => e.Name, e => ctx.AddTask(Markup.Escape(e.Name), autoStart: false, maxValue: 1.0));
                        foreach (var e in pending)
                        {
                            var task = tasks[e.Name];
                            task.StartTask();
                            if (!RunOne(e, plan, corpus, outDir, threads, TextWriter.Null, (s, f) => { task.Description = Markup.Escape($"{e.Name}: {s}"); task.Value = f; })) { all = false; break; }
                            task.Value = 1.0;
                        }
                    });
            else
                foreach (var e in pending)
                    if (!RunOne(e, plan, corpus, outDir, threads, output, null)) { all = false; break; }
            return all;
        }
        finally { Console.CancelKeyPress -= OnCancel; }
    }

    /// <summary>Trains one configuration in its run folder (resuming its newest checkpoint) until the budget is spent, then
    /// writes result.json. Returns false when stopped early (Ctrl-C or <see cref="StopAfterStep"/>), after saving a checkpoint.</summary>
    private static bool RunOne(Entry entry, Plan plan, TokenCorpus corpus, string outDir, int? threads, TextWriter output, Action<string, double>? report)
    {
        string dir = Path.Combine(outDir, entry.Name);
        if (ReadResult(outDir, entry.Name) is not null) return true;
        Directory.CreateDirectory(dir);
        using var runLock = RunLock.Acquire(dir, output.WriteLine);
        string logPath = Path.Combine(dir, "log.jsonl");
        ProcessMemory.ResetPeakRss();                                       // this configuration's own peak (sequential runs share a process)
        Trainer trainer;
        double cpuSeconds = 0;                                             // CPU time of training steps over all sessions
        var existing = Checkpoint.List(dir);
        if (existing.Count > 0)
        {
            var (storedConfig, storedOptions, _) = Checkpoint.ReadHeader(existing[^1].Path);
            var diff = ConfigBinding.Differences(storedConfig, entry.Config);
            if (diff.Count > 0)
                throw new CliUsageException($"--config {entry.Spec}: {dir} was trained with a different configuration ({string.Join(", ", diff)} differ); give the same configuration or another --out.");
            if (storedOptions != plan.Options)
                throw new CliUsageException($"--out: {dir} was trained with other training options; give the same options or another --out.");
            trainer = Checkpoint.Load(existing[^1].Path, corpus.Train, corpus.Validation);
            TrimLog(logPath, trainer.Step);
            cpuSeconds = ReadLog(logPath).LastOrDefault()?.CpuSeconds ?? 0;     // checkpoints are saved right after an evaluation
            output.WriteLine($"{entry.Name}: resumed at step {trainer.Step} ({trainer.TokensSeen:N0} tokens, {trainer.ElapsedSeconds:F0} s trained)");
        }
        else
        {
            try { trainer = new Trainer(entry.Config, plan.Options, corpus.Train, corpus.Validation); }
            catch (ArgumentException e) { throw new CliUsageException($"--config {entry.Spec}: {ConfigCommand.Plain(e)}"); }
            AtomicFile.WriteAllText(Path.Combine(dir, "config.json"), ConfigBinding.ToJson(entry.Config));
            if (File.Exists(logPath)) File.Delete(logPath);                 // a log without a checkpoint belongs to nothing
        }
        using (trainer)
        {
            long parameters = trainer.Model.parameters().Sum(p => p.numel());
            output.WriteLine($"{entry.Name}: {parameters:N0} parameters, seq_len {plan.Options.SeqLen}, batch {plan.Options.BatchSize}, " +
                             plan.Describe());
            double Fraction() => Math.Min(1, plan.Spent(trainer.Step, trainer.ElapsedSeconds, cpuSeconds));
            bool Done() => Fraction() >= 1;
            double lossSum = 0;
            int lossCount = 0;
            long intervalTokens = 0;
            double intervalSeconds = 0;
            void Evaluate()
            {
                double bpc = trainer.ValidationBitsPerCharacter();
                if (!double.IsFinite(bpc))
                    throw new CliFailureException($"{entry.Name}: training diverged (val bpc {bpc} at step {trainer.Step}); try a lower --lr.");
                var point = new Point(trainer.Step, trainer.TokensSeen, Math.Round(trainer.ElapsedSeconds, 3), lossCount > 0 ? Math.Round(lossSum / lossCount, 6) : null,
                    Math.Round(bpc, 6), intervalSeconds > 0 ? Math.Round(intervalTokens / intervalSeconds, 1) : null, Math.Round(ProcessMemory.PeakRssMb(), 1),
                    Math.Round(cpuSeconds, 3));
                File.AppendAllText(logPath, JsonSerializer.Serialize(point, Line) + "\n");
                string line = $"step {trainer.Step}  val_bpc {bpc:F4}  {(point.TokensPerSecond is double t ? $"{t:F0} tok/s" : "")}";
                if (report is null) output.WriteLine($"{entry.Name}: {line}");
                else report(line, Fraction());
                lossSum = 0; lossCount = 0; intervalTokens = 0; intervalSeconds = 0;
            }
            void Save()
            {
                Checkpoint.Save(trainer, Checkpoint.PathFor(dir, trainer.Step));
                foreach (var (_, old) in Checkpoint.List(dir).SkipLast(1)) File.Delete(old);
            }
            if (trainer.Step == 0 && !File.Exists(logPath)) Evaluate();
            var watch = new Stopwatch();
            while (!Done())
            {
                var cpu = Environment.CpuUsage.TotalTime;
                watch.Restart();
                var r = trainer.TrainStep();
                watch.Stop();
                cpuSeconds += (Environment.CpuUsage.TotalTime - cpu).TotalSeconds;
                trainer.ElapsedSeconds += watch.Elapsed.TotalSeconds;     // training time only: evaluation and saving are not counted
                intervalSeconds += watch.Elapsed.TotalSeconds;
                intervalTokens += r.Tokens;
                if (r.Skipped)
                {
                    if (trainer.ConsecutiveSkippedSteps >= 5)
                        throw new CliFailureException($"{entry.Name}: training diverged: 5 steps in a row had a NaN or infinite loss or gradient norm (after step {r.Step}); try a lower --lr.");
                    continue;
                }
                lossSum += r.Loss;
                lossCount++;
                bool done = Done();
                if (r.Step % plan.EvalEvery == 0 || done)
                {
                    Evaluate();
                    if (!done) Save();
                }
                if (!done && (StopRequested || StopAfterStep?.Invoke(entry.Name, r.Step) == true))
                {
                    if (r.Step % plan.EvalEvery != 0) { Evaluate(); Save(); }
                    output.WriteLine($"{entry.Name}: stopped at step {r.Step}; the same command continues it.");
                    return false;
                }
            }
            if (Checkpoint.List(dir) is not { Count: > 0 } saved || saved[^1].Step != trainer.Step) Save();
            var (bits, _) = trainer.ValidationBitsByPosition(plan.Buckets);
            var points = ReadLog(logPath);
            var result = new Result(entry.Name, entry.Spec, parameters, trainer.Step, trainer.TokensSeen, Math.Round(trainer.ElapsedSeconds, 3), Math.Round(cpuSeconds, 3),
                Math.Round(trainer.TokensSeen / Math.Max(trainer.ElapsedSeconds, 1e-9), 1), points[^1].ValBpc, bits.Select(b => Math.Round(b, 6)).ToArray(),
                (int)Math.Ceiling((double)plan.Options.SeqLen / plan.Buckets), Math.Round(Math.Max(points.Max(p => p.PeakRssMb), ProcessMemory.PeakRssMb()), 1),
                threads ?? TorchSharp.torch.get_num_threads());
            AtomicFile.WriteAllText(Path.Combine(dir, "result.json"), JsonSerializer.Serialize(result, Json));
            output.WriteLine($"{entry.Name}: done, step {result.Steps}, val_bpc {result.ValBpc:F4}, {result.TokensPerSecond:F0} tok/s");
            return true;
        }
    }

    /// <summary>Drops log lines after <paramref name="step"/> (written after the newest checkpoint; those steps run again).</summary>
    private static void TrimLog(string logPath, long step)
    {
        if (!File.Exists(logPath)) return;
        var kept = File.ReadAllLines(logPath).Where(l => l.Length > 0 && JsonSerializer.Deserialize<Point>(l)!.Step <= step);
        AtomicFile.WriteAllText(logPath, string.Concat(kept.Select(l => l + "\n")));
    }

    internal static List<Point> ReadLog(string logPath) =>
        File.Exists(logPath) ? File.ReadAllLines(logPath).Where(l => l.Length > 0).Select(l => JsonSerializer.Deserialize<Point>(l)!).ToList() : [];

    internal static Result? ReadResult(string outDir, string name)
    {
        string path = Path.Combine(outDir, name, "result.json");
        return File.Exists(path) ? JsonSerializer.Deserialize<Result>(File.ReadAllText(path)) : null;
    }

    /// <summary>Runs the pending configurations as child processes (<c>compare ... --only NAME</c>), up to
    /// <paramref name="parallel"/> at a time; each child's output goes to NAME/run.txt, its progress is read from its
    /// log.jsonl. Returns whether all finished (false after Ctrl-C: the children save a checkpoint and stop).</summary>
    private bool RunChildren(ParseResult parse, List<Entry> pending, Plan plan, string outDir, int parallel, int? threads, TextWriter output)
    {
        var queue = new Queue<Entry>(pending);
        var running = new List<(Entry Entry, Process Process)>();
        bool failed = false, stopped = false;
        var baseArgs = new List<string> { "compare", "--data", parse.GetValue(dataOption)!, "--out", outDir };
        foreach (var spec in parse.GetValue(configOption)!) baseArgs.AddRange(["--config", spec]);
        foreach (Option o in new Option[] { budgetMinutesOption, budgetCpuMinutesOption, budgetTokensOption, seqLenOption, batchSizeOption, evalEveryOption, evalBatchesOption, bucketsOption, lrOption, warmupOption, seedOption })
            if (parse.GetResult(o) is { Implicit: false } given) baseArgs.AddRange([o.Name, .. given.Tokens.Select(t => t.Value)]);
        baseArgs.AddRange(["--threads-per-run", threads!.Value.ToString(CultureInfo.InvariantCulture)]);
        // Ctrl-C reaches the children too (same process group); this process waits for them to save and stop.
        void OnCancel(object? sender, ConsoleCancelEventArgs e) { e.Cancel = true; stopped = true; }
        Console.CancelKeyPress += OnCancel;
        void Loop(Action<string, string, double>? progress)
        {
            while (queue.Count > 0 || running.Count > 0)
            {
                while (running.Count < parallel && queue.Count > 0 && !failed && !stopped)
                {
                    var e = queue.Dequeue();
                    string log = Path.Combine(outDir, e.Name, "run.txt");
                    Directory.CreateDirectory(Path.Combine(outDir, e.Name));
                    running.Add((e, StartChild([.. baseArgs, "--only", e.Name], log)));
                    output.WriteLine($"{e.Name}: started (process {running[^1].Process.Id}, {threads} thread(s), output in {log})");
                }
                if (failed || stopped) queue.Clear();
                Thread.Sleep(500);
                foreach (var (e, _) in running)
                    if (progress is not null && ReadLog(Path.Combine(outDir, e.Name, "log.jsonl")) is { Count: > 0 } points)
                    {
                        var last = points[^1];
                        double fraction = plan.Spent(last.Step, last.TrainSeconds, last.CpuSeconds ?? 0);
                        progress(e.Name, $"step {last.Step}  val_bpc {last.ValBpc:F3}  {last.TokensPerSecond ?? 0:F0} tok/s", Math.Min(1, fraction));
                    }
                foreach (var (e, p) in running.Where(r => r.Process.HasExited).ToList())
                {
                    running.RemoveAll(r => r.Process == p);
                    var result = ReadResult(outDir, e.Name);
                    if (result is not null) output.WriteLine($"{e.Name}: done, step {result.Steps}, val_bpc {result.ValBpc:F4}, {result.TokensPerSecond:F0} tok/s");
                    else if (p.ExitCode == 0) { stopped = true; output.WriteLine($"{e.Name}: stopped; the same command continues it."); }
                    else
                    {
                        failed = true;
                        string log = Path.Combine(outDir, e.Name, "run.txt");
                        output.WriteLine($"{e.Name}: ended with exit code {p.ExitCode} without a result: {(File.Exists(log) ? File.ReadLines(log).LastOrDefault() : "")}");
                    }
                    progress?.Invoke(e.Name, result is null ? "stopped" : $"done  val_bpc {result.ValBpc:F3}", result is null ? 0 : 1);
                    p.Dispose();
                }
            }
        }
        try
        {
            if (Interactive(output))
                AnsiConsole.Progress().AutoClear(false)
                    .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var tasks = pending.ToDictionary(e => e.Name, e => ctx.AddTask(Markup.Escape(e.Name), maxValue: 1.0));
                        Loop((name, text, fraction) => { tasks[name].Description = Markup.Escape($"{name}: {text}"); tasks[name].Value = fraction; });
                    });
            else Loop(null);
        }
        finally
        {
            Console.CancelKeyPress -= OnCancel;
            foreach (var (_, p) in running) { try { p.Kill(); } catch (InvalidOperationException) { } p.Dispose(); }
        }
        if (failed) throw new CliFailureException("compare: a configuration failed; see its run.txt (finished configurations are kept; the same command continues).");
        return !stopped;
    }

    private static bool Interactive(TextWriter output) =>
        ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;

    /// <summary>Starts this tool again (the apphost when running as one, else <c>dotnet sparse-attn.dll</c>) with
    /// <paramref name="args"/>, standard output and error appended to <paramref name="logPath"/>.</summary>
    private static Process StartChild(IEnumerable<string> args, string logPath)
    {
        string? self = Environment.ProcessPath;
        var info = Path.GetFileNameWithoutExtension(self) == "sparse-attn"
            ? new ProcessStartInfo(self!)
            : new ProcessStartInfo("dotnet") { ArgumentList = { typeof(CompareCommand).Assembly.Location } };
        foreach (var a in args) info.ArgumentList.Add(a);
        info.RedirectStandardOutput = true;
        info.RedirectStandardError = true;
        info.UseShellExecute = false;
        var process = new Process { StartInfo = info };
        var log = new StreamWriter(logPath, append: true) { AutoFlush = true };
        var gate = new object();
        void Write(string? line) { if (line is not null) lock (gate) log.WriteLine(line); }
        process.OutputDataReceived += (_, e) => Write(e.Data);
        process.ErrorDataReceived += (_, e) => Write(e.Data);
        process.Exited += (_, _) => { process.WaitForExit(); lock (gate) log.Dispose(); };
        process.EnableRaisingEvents = true;
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    /// <summary>The table (or JSON), results.json and compare.png over every configuration's result.</summary>
    private static int Report(List<Entry> entries, Plan plan, string outDir, bool json, TextWriter output)
    {
        var results = entries.Select(e => ReadResult(outDir, e.Name)!).ToList();
        var report = new
        {
            data = plan.Data,
            budget_minutes = plan.BudgetMinutes,
            budget_cpu_minutes = plan.BudgetCpuMinutes,
            budget_tokens = plan.BudgetTokens,
            seq_len = plan.Options.SeqLen,
            batch_size = plan.Options.BatchSize,
            seed = plan.Options.Seed,
            results,
        };
        string text = JsonSerializer.Serialize(report, Json);
        AtomicFile.WriteAllText(Path.Combine(outDir, "results.json"), text);
        string png = Path.Combine(outDir, "compare.png");
        ComparePictures.Curves(png, results.Select(r => (r.Name, ReadLog(Path.Combine(outDir, r.Name, "log.jsonl")), r)).ToList(), plan);
        if (json)
        {
            output.WriteLine(text);
            return CliApp.Ok;
        }
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 160;
        var table = new Table().Title($"compare — {plan.Describe()} each, seq_len {plan.Options.SeqLen}, batch {plan.Options.BatchSize}");
        foreach (var c in new[] { "config", "parameters", "tokens/s", "steps", "tokens", "train time", "CPU time", "val bpc", "bpc first / last bucket", "peak RSS MB", "threads" }) table.AddColumn(c);
        foreach (var r in results)
            table.AddRow(Markup.Escape(r.Name), r.Parameters.ToString("N0"), r.TokensPerSecond.ToString("F0"), r.Steps.ToString(), r.Tokens.ToString("N0"),
                TimeSpan.FromSeconds(r.TrainSeconds).ToString(@"h\:mm\:ss"), r.CpuSeconds is double c ? TimeSpan.FromSeconds(c).ToString(@"h\:mm\:ss") : "–", r.ValBpc.ToString("F4"),
                $"{r.BpcByPosition[0]:F3} / {r.BpcByPosition[^1]:F3}", r.PeakRssMb.ToString("F0"), r.Threads.ToString());
        console.Write(table);
        output.WriteLine($"bpc by position (buckets of {results[0].BucketSize} positions; same {plan.Options.EvalBatches * plan.Options.BatchSize} held-out windows for every configuration):");
        foreach (var r in results) output.WriteLine($"  {r.Name}: {string.Join(" ", r.BpcByPosition.Select(b => b.ToString("F3", CultureInfo.InvariantCulture)))}");
        // The windows' own difficulty varies by position; the difference to the first configuration cancels it.
        foreach (var r in results.Skip(1).Where(r => r.BpcByPosition.Length == results[0].BpcByPosition.Length))
            output.WriteLine($"  {r.Name} − {results[0].Name}: {string.Join(" ", r.BpcByPosition.Zip(results[0].BpcByPosition, (x, y) => (x - y).ToString("+0.000;-0.000", CultureInfo.InvariantCulture)))}");
        output.WriteLine($"results: {Path.Combine(outDir, "results.json")}, picture: {png}");
        return CliApp.Ok;
    }
}
