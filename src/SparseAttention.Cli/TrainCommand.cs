using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using SparseAttention.Distributed;
using SparseAttention.Model;
using SparseAttention.Training;
using Spectre.Console;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn train</c>: trains a language model (bytes or a BPE vocabulary, --tokenizer) on a text file or folder,
/// with periodic validation in bits per byte of the original text, a JSONL log and atomic, resumable checkpoints in the run folder.
/// </summary>
internal sealed class TrainCommand
{
    private readonly Option<string> dataOption = new("--data") { HelpName = "PATH", Description = "Training text: a file, or a folder whose files are concatenated (ordinal path order).", Required = true };
    private readonly Option<string> outOption = new("--out") { HelpName = "DIR", Description = "Run folder: checkpoints (ckpt-STEP.sat), log.jsonl, config.json.", Required = true };
    private readonly Option<string> presetOption = new("--preset") { HelpName = "NAME|FILE", Description = $"Model preset: {string.Join(", ", Presets.Names)}, or a JSON file with the configuration's snake_case keys.", DefaultValueFactory = _ => "tiny" };
    private readonly Option<string[]> setOption = new("--set") { HelpName = "KEY=VALUE", Description = "Override one configuration key (snake_case, e.g. --set dim=128 --set n_local_attn_heads=[2]); repeatable." };
    private readonly Option<int?> maxStepsOption = new("--max-steps") { HelpName = "N", Description = "Stop after N optimizer steps in total (counting resumed steps)." };
    private readonly Option<double?> maxMinutesOption = new("--max-minutes") { HelpName = "M", Description = "Stop after M minutes of this session." };
    private readonly Option<bool> resumeOption = new("--resume") { Description = "Continue from the newest checkpoint in --out (its configuration and hyperparameters)." };
    private readonly Option<int?> seqLenOption = new("--seq-len") { HelpName = "T", Description = "Tokens per training window (default: the preset's max_seq_len; routing heads need exactly max_seq_len)." };
    private readonly Option<int> batchSizeOption = new("--batch-size") { HelpName = "B", Description = "Windows per micro-batch (per rank under mpirun).", DefaultValueFactory = _ => 16 };
    private readonly Option<int> accumOption = new("--accum") { HelpName = "N", Description = "Micro-batches accumulated per optimizer step.", DefaultValueFactory = _ => 1 };
    private readonly Option<double> lrOption = new("--lr") { HelpName = "LR", Description = "Peak learning rate (AdamW).", DefaultValueFactory = _ => 1e-3 };
    private readonly Option<int> warmupOption = new("--warmup") { HelpName = "N", Description = "Linear warm-up steps.", DefaultValueFactory = _ => 100 };
    private readonly Option<int?> decayStepsOption = new("--decay-steps") { HelpName = "N", Description = "Step where the cosine decay reaches 0.1·LR (default: --max-steps, else 5000)." };
    private readonly Option<double> weightDecayOption = new("--weight-decay") { HelpName = "W", Description = "AdamW weight decay.", DefaultValueFactory = _ => 0.01 };
    private readonly Option<double> clipOption = new("--clip") { HelpName = "NORM", Description = "Clip the global gradient norm to this (0 = off).", DefaultValueFactory = _ => 1.0 };
    private readonly Option<double> valFractionOption = new("--val-fraction") { HelpName = "F", Description = "Last fraction of the corpus held out for validation.", DefaultValueFactory = _ => 0.05 };
    private readonly Option<int> evalBatchesOption = new("--eval-batches") { HelpName = "N", Description = "Validation batches per evaluation.", DefaultValueFactory = _ => 8 };
    private readonly Option<long> seedOption = new("--seed") { HelpName = "N", Description = "Seed of initialisation, dropout and batch sampling.", DefaultValueFactory = _ => 0 };
    private readonly Option<int> evalEveryOption = new("--eval-every") { HelpName = "N", Description = "Validate every N steps.", DefaultValueFactory = _ => 100 };
    private readonly Option<int> logEveryOption = new("--log-every") { HelpName = "N", Description = "Log a line every N steps.", DefaultValueFactory = _ => 10 };
    private readonly Option<int> checkpointEveryOption = new("--checkpoint-every") { HelpName = "N", Description = "Save a checkpoint every N steps (and always at the end).", DefaultValueFactory = _ => 500 };
    private readonly Option<int> keepLastOption = new("--keep-last") { HelpName = "N", Description = "Keep the newest N checkpoints.", DefaultValueFactory = _ => 3 };
    private readonly Option<double> randomTruncateOption = new("--random-truncate") { HelpName = "P", Description = "Probability that a micro-batch is cut to a random length in [2, seq_len] (for decoding from short prompts).", DefaultValueFactory = _ => 0.0 };
    private readonly Option<int?> threadsOption = new("--threads") { HelpName = "N", Description = "libtorch intra-op threads (default: libtorch's choice)." };
    private readonly Option<string> deviceOption = CliDevice.CreateOption();
    private readonly Option<int> maxSkippedOption = new("--max-skipped-steps") { HelpName = "N", Description = "Stop (exit 1, no checkpoint) after N steps in a row skipped because their loss or gradient norm was NaN or infinite.", DefaultValueFactory = _ => 5 };
    private readonly Option<string?> tokenizerOption = new("--tokenizer") { HelpName = "NAME", Description = $"Vocabulary: {string.Join(", ", TextTokenizer.Names)} (default: the configuration's tokenizer key, bytes). Sets num_tokens to its vocabulary size and is recorded in every checkpoint." };
    private readonly Option<bool> fromIntactOption = new("--from-intact") { Description = "With --resume: when the newest checkpoint is damaged, continue from the newest intact one (damaged newer ones are renamed *.damaged)." };

    /// <summary>Set to request a clean stop (as Ctrl-C does); checked between steps. For tests.</summary>
    internal static volatile bool StopRequested;

    public static Command Create()
    {
        var self = new TrainCommand();
        var command = new Command("train", "Train a language model on text (bytes, or GPT-2 / cl100k BPE tokens with --tokenizer); checkpoints, validation bits per byte, resumable. Under Open MPI's mpirun: data-parallel, --batch-size per rank.");
        foreach (var option in new Option[] { self.dataOption, self.outOption, self.presetOption, self.setOption, self.maxStepsOption, self.maxMinutesOption,
                     self.resumeOption, self.seqLenOption, self.batchSizeOption, self.accumOption, self.lrOption, self.warmupOption, self.decayStepsOption,
                     self.weightDecayOption, self.clipOption, self.valFractionOption, self.evalBatchesOption, self.seedOption, self.evalEveryOption,
                     self.logEveryOption, self.checkpointEveryOption, self.keepLastOption, self.randomTruncateOption, self.threadsOption, self.deviceOption,
                     self.maxSkippedOption, self.fromIntactOption, self.tokenizerOption })
            command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private bool Given(ParseResult parse, Option option) => parse.GetResult(option) is { Implicit: false };

    /// <summary>Single process, or one rank of <c>mpirun -np N sparse-attn train …</c> (data-parallel over MPI): then
    /// a failure on any rank aborts every rank (no rank waits forever in a collective).</summary>
    private int Execute(ParseResult parse)
    {
        DataParallel? group;
        try { group = DataParallel.FromEnvironment(); }
        catch (InvalidOperationException e) { throw new CliFailureException(e.Message); }
        if (group is null) return Execute(parse, null);
        using (group)
        {
            try { return Execute(parse, group); }
            catch (Exception e)
            {
                var (code, message) = CliApp.Classify(e, parse.CommandResult.Command, parse.GetValue(CliApp.VerboseOption));
                parse.InvocationConfiguration.Error.WriteLine($"error: rank {group.Rank} of {group.Size}: {message}");
                group.Communicator.Abort(code);
                return code;                                                        // not reached: Abort ends the process
            }
        }
    }

    private int Execute(ParseResult parse, DataParallel? group)
    {
        bool root = group?.IsRoot ?? true;                                          // only rank 0 writes files and prints
        var output = root ? parse.InvocationConfiguration.Output : TextWriter.Null;
        var error = parse.InvocationConfiguration.Error;
        string outDir = parse.GetValue(outOption)!;
        int? maxSteps = parse.GetValue(maxStepsOption);
        double? maxMinutes = parse.GetValue(maxMinutesOption);
        if (maxSteps is null && maxMinutes is null) throw new CliUsageException("--max-steps / --max-minutes: give at least one (when to stop).");
        if (maxSteps is <= 0) throw new CliUsageException($"--max-steps must be > 0, got {maxSteps}.");
        if (maxMinutes is double mm && !(mm > 0)) throw new CliUsageException($"--max-minutes must be > 0, got {mm}.");
        foreach (var o in new[] { evalEveryOption, logEveryOption, checkpointEveryOption, keepLastOption, maxSkippedOption })
            if (parse.GetValue(o) <= 0) throw new CliUsageException($"{o.Name} must be > 0, got {parse.GetValue(o)}.");
        var device = CliDevice.Parse(parse.GetValue(deviceOption)!);
        if (parse.GetValue(threadsOption) is int threads)
        {
            if (threads <= 0) throw new CliUsageException($"--threads must be > 0, got {threads}.");
            TorchSharp.torch.set_num_threads(threads);
        }

        bool resume = parse.GetValue(resumeOption), fromIntact = parse.GetValue(fromIntactOption);
        if (fromIntact && !resume) throw new CliUsageException("--from-intact only applies with --resume.");
        var existing = Checkpoint.List(outDir);
        RunLock? runLock = null;
        Trainer? trainer = null;
        TokenCorpus? corpus = null;
        try
        {
            if (resume)
            {
                if (existing.Count == 0) throw new CliUsageException($"--resume: no checkpoint ({Checkpoint.Prefix}*{Checkpoint.Extension}) in {outDir}.");
                if (root) runLock = RunLock.Acquire(outDir, output.WriteLine);
                existing = Checkpoint.List(outDir);                                 // as of holding the lock
                string latest = !root ? "" : fromIntact ? SetAsideDamaged(outDir, output) : existing[^1].Path;
                if (group is not null) latest = group.Broadcast(latest);          // every rank resumes from rank 0's choice
                TransformerConfig storedConfig;
                TrainingOptions storedOptions;
                long storedStep;
                try { (storedConfig, storedOptions, storedStep) = Checkpoint.ReadHeader(latest); }
                catch (CheckpointException e) { throw WithIntactHint(e, outDir, latest); }
                if (maxSteps is int ms && storedStep >= ms)
                    throw new CliUsageException($"--max-steps {ms}: {Path.GetFileName(latest)} is already at step {storedStep}, so there is nothing to train; " +
                                                $"give --max-steps above {storedStep} (or --max-minutes) to continue.");
                if (parse.GetValue(tokenizerOption) is string tn && ParseTokenizer(tn) != storedConfig.Tokenizer)
                    throw new CliUsageException($"--resume: {latest} was trained with tokenizer {TextTokenizer.NameOf(storedConfig.Tokenizer)}; drop --tokenizer or start a new --out.");
                if (Given(parse, presetOption) || Given(parse, setOption))
                {
                    var requested = BuildConfig(parse);
                    var diff = ConfigBinding.Differences(storedConfig, requested);
                    if (diff.Count > 0)
                        throw new CliUsageException($"--resume: {latest} was trained with a different configuration ({string.Join(", ", diff)} differ); drop --preset/--set or start a new --out.");
                }
                var requestedOptions = BuildOptions(parse, storedConfig, maxSteps, storedOptions);
                if (requestedOptions != storedOptions)
                    throw new CliUsageException($"--resume: hyperparameters differ from {latest}: {DescribeOptionDiff(storedOptions, requestedOptions)}; drop those options to continue the run as it was.");
                corpus = LoadCorpus(parse, storedOptions, storedConfig);
                try { trainer = Checkpoint.Load(latest, corpus.Train, corpus.Validation, device); }
                catch (CheckpointException e) { throw WithIntactHint(e, outDir, latest); }
                if (group is not null) trainer.JoinDataParallel(group);
                int dropped = root ? TrimLog(Path.Combine(outDir, "log.jsonl"), trainer.Step) : 0;
                if (dropped > 0) output.WriteLine($"log.jsonl: dropped {dropped} line(s) after step {trainer.Step} (written after the newest checkpoint; those steps run again)");
                output.WriteLine($"resumed {latest} at step {trainer.Step} ({trainer.TokensSeen:N0} tokens, {Format((trainer.ElapsedSeconds))} trained)");
            }
            else
            {
                if (existing.Count > 0)
                    throw new CliUsageException($"--out: {outDir} already holds checkpoints (newest {Path.GetFileName(existing[^1].Path)}); give --resume to continue it or choose another folder.");
                if (File.Exists(outDir)) throw new CliUsageException($"--out: {outDir} is a file; the run folder must be a folder.");
                // Everything is checked before the run folder is touched: a refused run leaves nothing behind.
                var config = BuildConfig(parse);
                Limits.RequireTrainableModel(config, Given(parse, setOption) ? "--set" : "--preset");
                var options = BuildOptions(parse, config, maxSteps, null);
                Limits.RequireBatchFits(config, options.BatchSize, options.SeqLen, "--batch-size", "--seq-len");
                corpus = LoadCorpus(parse, options, config);
                try { trainer = new Trainer(config, options, corpus.Train, corpus.Validation, device); }
                catch (ArgumentException e) { throw new CliUsageException(DescribeConfigError(e)); }
                if (group is not null) trainer.JoinDataParallel(group);                // ranks compared before the run folder is touched
                if (root)
                {
                    Directory.CreateDirectory(outDir);
                    runLock = RunLock.Acquire(outDir, output.WriteLine);
                    if (Checkpoint.List(outDir).Count > 0)
                        throw new CliUsageException($"--out: {outDir} received checkpoints from another run meanwhile; choose another folder.");
                    AtomicFile.WriteAllText(Path.Combine(outDir, "config.json"), ConfigBinding.ToJson(config));
                }
            }
            long parameters = trainer.Model.parameters().Sum(p => p.numel());
            string tokens = corpus.Tokenizer.Kind == TokenizerKind.Bytes ? "" :
                $" → {corpus.Tokenizer.Name}: {corpus.Train.Length:N0} + {corpus.Validation.Length:N0} tokens " +
                $"({(double)(corpus.Train.ByteCount + corpus.Validation.ByteCount) / (corpus.Train.Length + corpus.Validation.Length):F2} bytes/token, tokenized in {corpus.TokenizeSeconds:F1} s)";
            output.WriteLine($"data: {corpus.Files} file(s), {corpus.Bytes.Train.Length:N0} training + {corpus.Bytes.Validation.Length:N0} validation bytes{tokens}; " +
                             $"model: {parameters:N0} parameters (dim {trainer.Config.Dim}, depth {trainer.Config.Depth}, heads {trainer.Config.Heads}), " +
                             $"seq_len {trainer.Options.SeqLen}, batch {trainer.Options.BatchSize}×{trainer.Options.Accumulation}");
            if (group is not null)
                output.WriteLine($"data-parallel over MPI: {group.Size} rank(s), each trains {trainer.Options.BatchSize} of every " +
                                 $"{trainer.Options.BatchSize * group.Size} windows; rank 0 validates, logs and saves");
            return Loop(parse, trainer, outDir, maxSteps, maxMinutes, output);
        }
        finally
        {
            trainer?.Dispose();
            corpus?.Dispose();
            runLock?.Dispose();
        }
    }

    /// <summary>--from-intact: renames checkpoints newer than the newest intact one to <c>*.damaged</c> (kept, but no
    /// longer the newest) and returns the intact one.</summary>
    private static string SetAsideDamaged(string runDir, TextWriter output)
    {
        string intact = Checkpoint.NewestIntact(runDir) ?? throw new CliFailureException($"--from-intact: no checkpoint in {runDir} reads back intact.");
        foreach (var (_, path) in Checkpoint.List(runDir).Where(c => string.CompareOrdinal(c.Path, intact) > 0))
        {
            File.Move(path, path + ".damaged", overwrite: true);
            output.WriteLine($"--from-intact: {Path.GetFileName(path)} is damaged; renamed to {Path.GetFileName(path)}.damaged");
        }
        return intact;
    }

    /// <summary>The checkpoint error, plus which older checkpoint is intact and how to continue from it.</summary>
    private static CheckpointException WithIntactHint(CheckpointException e, string runDir, string failed)
    {
        string? intact = Checkpoint.NewestIntact(runDir);
        if (intact is null || intact == failed) return e;
        return new CheckpointException($"{e.Message} The newest intact checkpoint is {Path.GetFileName(intact)}; continue from it with --resume --from-intact.", e);
    }

    /// <summary>Removes log lines of steps after <paramref name="step"/> (a run that stopped without saving them); returns how many.</summary>
    private static int TrimLog(string logPath, long step)
    {
        if (!File.Exists(logPath)) return 0;
        var lines = File.ReadAllLines(logPath);
        var kept = lines.Where(line =>
        {
            try { using var doc = JsonDocument.Parse(line); return doc.RootElement.GetProperty("step").GetInt64() <= step; }
            catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException) { return false; }
        }).ToArray();
        if (kept.Length != lines.Length) AtomicFile.WriteAllText(logPath, string.Concat(kept.Select(l => l + "\n")));
        return lines.Length - kept.Length;
    }

    private static TokenizerKind ParseTokenizer(string name)
    {
        try { return TextTokenizer.Parse(name, "--tokenizer"); }
        catch (ArgumentException e) { throw new CliUsageException(ConfigCommand.Plain(e)); }
    }

    /// <summary>The preset with --set overrides, then the tokenizer (--tokenizer, else the configuration's) with num_tokens
    /// set to its vocabulary size; a --set num_tokens or --set tokenizer that disagrees is refused.</summary>
    private TransformerConfig BuildConfig(ParseResult parse)
    {
        var assignments = parse.GetValue(setOption) ?? [];
        var config = ConfigCommand.Effective(parse.GetValue(presetOption)!, assignments, OptionOf);
        bool Sets(string key) => assignments.Any(a => a.Split('=', 2)[0].Trim() == key);
        if (parse.GetValue(tokenizerOption) is string name)
        {
            var kind = ParseTokenizer(name);
            if (Sets("tokenizer") && config.Tokenizer != kind)
                throw new CliUsageException($"--tokenizer {TextTokenizer.NameOf(kind)} disagrees with --set tokenizer={TextTokenizer.NameOf(config.Tokenizer)}; give one of them.");
            config = config with { Tokenizer = kind };
        }
        var tokenizer = TextTokenizer.For(config);
        if (Sets("num_tokens") && config.NumTokens != tokenizer.VocabularySize)
            throw new CliUsageException($"--set num_tokens={config.NumTokens} disagrees with the tokenizer {tokenizer.Name}, whose vocabulary has {tokenizer.VocabularySize} tokens; " +
                                        "drop --set num_tokens (train sets it from the tokenizer).");
        return config with { NumTokens = tokenizer.VocabularySize };
    }

    private static string DescribeConfigError(ArgumentException e) => ConfigCommand.DescribeConfigError(e, OptionOf);

    /// <summary>The run's hyperparameters: <paramref name="stored"/> (resume) with explicitly given options applied, or defaults and options.</summary>
    private TrainingOptions BuildOptions(ParseResult parse, TransformerConfig config, int? maxSteps, TrainingOptions? stored)
    {
        bool fresh = stored is null;
        var o = stored ?? new TrainingOptions();
        T Pick<T>(Option<T> option, T current) => fresh || Given(parse, option) ? parse.GetValue(option)! : current;
        o = o with
        {
            SeqLen = (fresh || Given(parse, seqLenOption)) ? parse.GetValue(seqLenOption) ?? config.MaxSeqLen : o.SeqLen,
            BatchSize = Pick(batchSizeOption, o.BatchSize),
            Accumulation = Pick(accumOption, o.Accumulation),
            LearningRate = Pick(lrOption, o.LearningRate),
            WarmupSteps = Pick(warmupOption, o.WarmupSteps),
            DecaySteps = (fresh || Given(parse, decayStepsOption)) ? parse.GetValue(decayStepsOption) ?? maxSteps ?? 5000 : o.DecaySteps,
            WeightDecay = Pick(weightDecayOption, o.WeightDecay),
            ClipNorm = Pick(clipOption, o.ClipNorm),
            ValFraction = Pick(valFractionOption, o.ValFraction),
            EvalBatches = Pick(evalBatchesOption, o.EvalBatches),
            Seed = Pick(seedOption, o.Seed),
            RandomTruncate = Pick(randomTruncateOption, o.RandomTruncate),
        };
        try { return o.Validate(); }
        catch (ArgumentException e) when (e.ParamName == nameof(TrainingOptions.SeqLen) && fresh && !Given(parse, seqLenOption))
        {
            // The window length was not given: it came from the configuration, so blame that.
            throw new CliUsageException($"configuration: max_seq_len = {config.MaxSeqLen} is too short to train: the training window " +
                                        "(--seq-len, default max_seq_len) needs at least 2 tokens; set max_seq_len >= 2.");
        }
        catch (ArgumentException e) { throw new CliUsageException(DescribeOptionError(e)); }
    }

    private static readonly Dictionary<string, string> OptionOf = new()
    {
        ["SeqLen"] = "--seq-len", ["BatchSize"] = "--batch-size", ["Accumulation"] = "--accum", ["LearningRate"] = "--lr",
        ["MinLrRatio"] = "min_lr_ratio", ["WarmupSteps"] = "--warmup", ["DecaySteps"] = "--decay-steps", ["WeightDecay"] = "--weight-decay",
        ["ClipNorm"] = "--clip", ["Seed"] = "--seed", ["ValFraction"] = "--val-fraction", ["EvalBatches"] = "--eval-batches",
        ["RandomTruncate"] = "--random-truncate",
    };

    private static string DescribeOptionError(ArgumentException e) => DescribeConfigError(e);

    private static string DescribeOptionDiff(TrainingOptions a, TrainingOptions b) => string.Join(", ",
        typeof(TrainingOptions).GetProperties().Where(p => !Equals(p.GetValue(a), p.GetValue(b)))
            .Select(p => $"{(OptionOf.TryGetValue(p.Name, out var o) ? o : p.Name)} {p.GetValue(a)} in the checkpoint vs {p.GetValue(b)}"));

    private TokenCorpus LoadCorpus(ParseResult parse, TrainingOptions options, TransformerConfig config) =>
        LoadCorpus(parse.GetValue(dataOption)!, options, TextTokenizer.For(config));

    /// <summary>The corpus at <paramref name="data"/> split as <paramref name="options"/> say and tokenized with
    /// <paramref name="tokenizer"/>; bad input names its option.</summary>
    internal static TokenCorpus LoadCorpus(string data, TrainingOptions options, TextTokenizer tokenizer)
    {
        try { return TokenCorpus.Load(data, options.ValFraction, options.SeqLen, tokenizer); }
        catch (ArgumentException e) { throw new CliUsageException("--" + ConfigCommand.Plain(e)); }
    }

    private sealed record LogLine(
        [property: System.Text.Json.Serialization.JsonPropertyName("step")] long Step,
        [property: System.Text.Json.Serialization.JsonPropertyName("loss")] double? Loss,
        [property: System.Text.Json.Serialization.JsonPropertyName("val_bpc")] double? ValBpc,
        [property: System.Text.Json.Serialization.JsonPropertyName("val_loss")] double? ValLoss,
        [property: System.Text.Json.Serialization.JsonPropertyName("bpc")] double? Bpc,
        [property: System.Text.Json.Serialization.JsonPropertyName("tokens_per_s")] double? TokensPerSecond,
        [property: System.Text.Json.Serialization.JsonPropertyName("lr")] double? LearningRate,
        [property: System.Text.Json.Serialization.JsonPropertyName("elapsed")] double Elapsed);

    private int Loop(ParseResult parse, Trainer trainer, string outDir, int? maxSteps, double? maxMinutes, TextWriter output)
    {
        int evalEvery = parse.GetValue(evalEveryOption), logEvery = parse.GetValue(logEveryOption), maxSkipped = parse.GetValue(maxSkippedOption);
        int checkpointEvery = parse.GetValue(checkpointEveryOption), keepLast = parse.GetValue(keepLastOption);
        string logPath = Path.Combine(outDir, "log.jsonl");
        var session = Stopwatch.StartNew();
        double startElapsed = trainer.ElapsedSeconds;
        StopRequested = false;
        void OnCancel(object? sender, ConsoleCancelEventArgs e)
        {
            if (StopRequested) return;          // a second Ctrl-C ends the process at once
            e.Cancel = true;
            StopRequested = true;
        }
        Console.CancelKeyPress += OnCancel;
        bool interactive = ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;

        bool root = trainer.Parallel?.IsRoot ?? true;                                // data-parallel: rank 0 validates, logs and saves
        void Log(LogLine line)
        {
            if (root) File.AppendAllText(logPath, JsonSerializer.Serialize(line) + "\n");
        }
        string Newest() => Checkpoint.List(outDir) is { Count: > 0 } list ? $"the newest checkpoint is {Path.GetFileName(list[^1].Path)}" : "no checkpoint was saved";
        void Print(string line)
        {
            if (interactive) AnsiConsole.WriteLine(line);
            else output.WriteLine(line);
        }
        double Elapsed() => startElapsed + session.Elapsed.TotalSeconds;
        bool Done()
        {
            bool done = StopRequested || (maxSteps is int ms && trainer.Step >= ms) || (maxMinutes is double m && session.Elapsed.TotalMinutes >= m);
            return trainer.Parallel?.Any(done) ?? done;                                // ranks stop at the same step
        }
        double lastBpc = double.NaN;
        void Validate()
        {
            if (!root) return;
            var result = trainer.ValidationLoss();
            lastBpc = result.BitsPerByte;
            trainer.ElapsedSeconds = Elapsed();
            Print($"step {trainer.Step,7}  val_bpc {lastBpc:F4}  val_loss {result.LossPerToken:F4}");
            Log(new LogLine(trainer.Step, null, Limits.FiniteOrNull(lastBpc, $"val_bpc at step {trainer.Step}", output),
                Limits.FiniteOrNull(result.LossPerToken, $"val_loss at step {trainer.Step}", output), null, null, null, Math.Round(trainer.ElapsedSeconds, 3)));
            if (!double.IsFinite(lastBpc))
                throw new CliFailureException($"training diverged: val_bpc is {lastBpc} at step {trainer.Step} (the model's outputs are not finite); " +
                                              $"stopped without saving; {Newest()}; try a lower --lr.");
        }
        void Save()
        {
            if (!root) return;
            if (!trainer.OutputsAreFinite())
                throw new CliFailureException($"training diverged: the model's outputs are NaN or infinite at step {trainer.Step}; " +
                                              $"stopped without saving; {Newest()}; try a lower --lr.");
            trainer.ElapsedSeconds = Elapsed();
            string path = Checkpoint.PathFor(outDir, trainer.Step);
            Checkpoint.Save(trainer, path);
            foreach (var (_, old) in Checkpoint.List(outDir).SkipLast(keepLast)) File.Delete(old);
            Print($"step {trainer.Step,7}  saved {path}");
        }

        try
        {
            if (trainer.Step == 0) Validate();
            long intervalTokens = 0;
            var interval = Stopwatch.StartNew();
            double lossSum = 0, bitsSum = 0;
            int lossCount = 0;
            string status = "";
            void RunSteps(Action<string, double>? report)
            {
                while (!Done())
                {
                    var r = trainer.TrainStep();
                    intervalTokens += r.Tokens;
                    if (r.Skipped)
                    {
                        Print($"warning: step {r.Step + 1} skipped: loss {r.Loss.ToString(CultureInfo.InvariantCulture)}, gradient norm " +
                              $"{r.GradNorm.ToString(CultureInfo.InvariantCulture)}; {trainer.ConsecutiveSkippedSteps} in a row (--max-skipped-steps {maxSkipped})");
                        if (trainer.ConsecutiveSkippedSteps >= maxSkipped)
                            throw new CliFailureException($"training diverged: {trainer.ConsecutiveSkippedSteps} steps in a row had a NaN or infinite loss or gradient norm " +
                                                          $"(after step {r.Step}); stopped without saving; {Newest()}; try a lower --lr.");
                        continue;
                    }
                    lossSum += r.Loss;
                    bitsSum += r.Loss / r.BytesPerToken;                          // nats per byte; = loss for bytes
                    lossCount++;
                    bool last = Done();
                    if ((r.Step % logEvery == 0 || last) && lossCount > 0)
                    {
                        double seconds = interval.Elapsed.TotalSeconds;
                        double tps = intervalTokens / Math.Max(seconds, 1e-9);
                        double loss = lossSum / lossCount, bpc = bitsSum / lossCount / Math.Log(2);
                        double secPerStep = seconds / lossCount;
                        double eta = double.PositiveInfinity;
                        if (maxSteps is int ms) eta = Math.Max(0, ms - r.Step) * secPerStep;
                        if (maxMinutes is double m) eta = Math.Min(eta, Math.Max(0, m * 60 - session.Elapsed.TotalSeconds));
                        status = $"step {r.Step,7}{(maxSteps is int mx ? $"/{mx}" : "")}  loss {loss:F4}  bpc {bpc:F4}  " +
                                 $"val_bpc {(double.IsNaN(lastBpc) ? "-" : lastBpc.ToString("F4", CultureInfo.InvariantCulture))}  lr {r.LearningRate:0.00e+0}  " +
                                 $"{tps:F0} tok/s  elapsed {Format((Elapsed()))}  eta {Format((eta))}";
                        if (report is null) Print(status);
                        else report($"step {r.Step}  loss {loss:F3}  val_bpc {(double.IsNaN(lastBpc) ? "-" : lastBpc.ToString("F3", CultureInfo.InvariantCulture))}  {tps:F0} tok/s",
                            ProgressFraction(trainer, maxSteps, maxMinutes, session));   // the bar's own columns show progress and time left
                        Log(new LogLine(r.Step, Math.Round(loss, 6), null, null, Math.Round(bpc, 6), Math.Round(tps, 1), r.LearningRate, Math.Round(Elapsed(), 3)));
                        intervalTokens = 0; lossSum = 0; bitsSum = 0; lossCount = 0; interval.Restart();
                    }
                    if (r.Step % evalEvery == 0 || last) Validate();
                    if (r.Step % checkpointEvery == 0 && !last) Save();
                }
            }
            if (interactive)
            {
                AnsiConsole.Progress().AutoClear(false)
                    .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var task = ctx.AddTask("starting", maxValue: 1.0);
                        RunSteps((s, fraction) => { task.Description = Markup.Escape(s); task.Value = fraction; });
                        task.Value = 1.0;
                    });
                Print(status);
            }
            else RunSteps(null);
            Save();
            if (StopRequested) Print($"stopped by Ctrl-C at step {trainer.Step}; continue with --resume.");
            Print($"done: step {trainer.Step}, val_bpc {lastBpc:F4}, {trainer.TokensSeen:N0} tokens, {Format((trainer.ElapsedSeconds))}; log {logPath}");
            return CliApp.Ok;
        }
        finally
        {
            Console.CancelKeyPress -= OnCancel;
        }
    }

    private static double ProgressFraction(Trainer trainer, int? maxSteps, double? maxMinutes, Stopwatch session)
    {
        double f = 0;
        if (maxSteps is int ms) f = Math.Max(f, (double)trainer.Step / ms);
        if (maxMinutes is double m) f = Math.Max(f, session.Elapsed.TotalMinutes / m);
        return Math.Min(1, f);
    }

    private static string Format(double seconds) => !double.IsFinite(seconds) || seconds > 99 * 86400 ? "?" : Format(TimeSpan.FromSeconds(seconds));

    private static string Format(TimeSpan t) =>
        t.TotalHours >= 1 ? $"{(int)t.TotalHours}:{t.Minutes:D2}:{t.Seconds:D2}" : $"{t.Minutes}:{t.Seconds:D2}";
}
