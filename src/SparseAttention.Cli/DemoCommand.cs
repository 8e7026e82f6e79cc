using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using SparseAttention.Model;
using Spectre.Console;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn demo</c>: the Routing Transformer's claim, live. Two causal models of the same size — local
/// attention only, and local + routing heads — learn the associative-recall task of <see cref="RecallTask"/>
/// side by side on the same batches; then both answer held-out sequences. Prints the accuracy table (with
/// chance), worked examples, and writes a PNG of the learning curves and one of the routing clusters.
/// </summary>
internal sealed class DemoCommand
{
    private readonly Option<int> stepsOption = new("--steps") { HelpName = "N", Description = "Training steps per model.", DefaultValueFactory = _ => 400 };
    private readonly Option<int> seqLenOption = new("--seq-len") { HelpName = "T", Description = "Tokens per sequence (a multiple of 8: the routing heads have 8 clusters of T/8 tokens).", DefaultValueFactory = _ => 512 };
    private readonly Option<int> batchOption = new("--batch") { HelpName = "B", Description = "Sequences per training step.", DefaultValueFactory = _ => 16 };
    private readonly Option<int> evalOption = new("--eval-sequences") { HelpName = "N", Description = "Held-out sequences scored at the end.", DefaultValueFactory = _ => 256 };
    private readonly Option<long> seedOption = new("--seed") { HelpName = "N", Description = "Seed of the weights and the data.", DefaultValueFactory = _ => 1 };
    private readonly Option<string> outOption = new("--out") { HelpName = "DIR", Description = "Folder for the pictures (demo-curves.png, demo-clusters.png).", DefaultValueFactory = _ => "demo-output" };
    private readonly Option<string?> jsonOption = new("--json") { HelpName = "FILE", Description = "Also write the results as JSON (atomically)." };

    public static Command Create()
    {
        var self = new DemoCommand();
        var command = new Command("demo", "Local attention vs routing attention on a long-range lookup task: train both, compare, draw (about 3 minutes, no data needed).");
        foreach (var o in new Option[] { self.stepsOption, self.seqLenOption, self.batchOption, self.evalOption, self.seedOption, self.outOption, self.jsonOption })
            command.Add(o);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        int steps = parse.GetValue(stepsOption), seqLen = parse.GetValue(seqLenOption), batch = parse.GetValue(batchOption);
        int evalSequences = parse.GetValue(evalOption);
        long seed = parse.GetValue(seedOption);
        string outDir = parse.GetValue(outOption)!;
        string? jsonPath = parse.GetValue(jsonOption);
        foreach (var (value, option) in new[] { (steps, stepsOption), (seqLen, seqLenOption), (batch, batchOption), (evalSequences, evalOption) })
            if (value <= 0) throw new CliUsageException($"{option.Name} must be > 0, got {value}.");
        if (string.IsNullOrWhiteSpace(outDir)) throw new CliUsageException("--out must name a folder.");

        var settings = Experiment.Apply(new DemoSettings(seqLen, steps, batch, seed, evalSequences));
        if (seqLen % settings.Clusters != 0)
            throw new CliUsageException($"--seq-len must be a multiple of {settings.Clusters} (the routing heads' clusters), got {seqLen}.");
        RecallTask task;
        try { task = settings.Task.Validate(); }
        catch (ArgumentException e) { throw new CliUsageException($"--seq-len: {e.Message.Replace($" (Parameter '{e.ParamName}')", "")}"); }

        output.WriteLine($"task: associative recall — {task.Pairs} records \"value key\" scattered in {seqLen} tokens, then {task.Queries} questions \"? key\" → value; " +
                         $"every record is at least {task.MinDistance} tokens before its question, beyond the local model's reach of {settings.LocalReach}; " +
                         $"{task.NumValues} values, chance {task.Chance:P1}");

        using var local = new DemoModel("local", routing: false, settings);
        using var routing = new DemoModel("routing", routing: true, settings);
        var models = new[] { local, routing };
        output.WriteLine($"models: causal LM, dim {settings.Dim}, depth {settings.Depth}, {settings.Heads} heads × {settings.Dim / settings.Heads}, token shift, {settings.Positions}; " +
                         $"local = {settings.Heads} local heads per layer (window {settings.LocalWindow}, radius 1), {local.Parameters:N0} parameters; " +
                         $"routing = {settings.Heads / 2} local + {settings.Heads - settings.Heads / 2} routing heads per layer{(settings.SkipFirst > 0 ? $" after {settings.SkipFirst} local layer(s)" : "")} ({settings.Clusters} clusters of {seqLen / settings.Clusters}), {routing.Parameters:N0} parameters");
        output.WriteLine($"training: {steps} steps × {batch} sequences each, AdamW lr {settings.LearningRate}, the same batches for both models");

        var wall = Stopwatch.StartNew();
        bool interactive = ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        Train(models, task, settings, output, interactive);

        // ---- held-out evaluation ----
        var evalRng = new Random(unchecked((int)(seed * 7919 + 104729)));
        var evalBatch = task.Batch(evalSequences, evalRng);
        var correct = new long[2];
        long total = 0;
        var firstPredictions = new Tensor[2];
        const int EvalChunk = 32;
        for (int start = 0; start < evalSequences; start += EvalChunk)
        {
            using var scope = NewDisposeScope();
            int n = Math.Min(EvalChunk, evalSequences - start);
            var tokens = evalBatch.Tokens.narrow(0, start, n);
            var targets = evalBatch.Targets.narrow(0, start, n);
            var scored = targets.narrow(1, 1, seqLen - 1).ne(-100);
            for (int m = 0; m < 2; m++)
            {
                var predicted = models[m].Predict(tokens);                                    // (n, T)
                correct[m] += predicted.narrow(1, 0, seqLen - 1).eq(targets.narrow(1, 1, seqLen - 1)).logical_and(scored).sum().item<long>();
                if (start == 0) firstPredictions[m] = predicted.narrow(0, 0, 1).clone().DetachFromDisposeScope();
            }
            total += scored.sum().item<long>();
        }
        var accuracy = correct.Select(c => (double)c / total).ToArray();

        var example = evalBatch.Examples[0];
        var (clusters, groups) = Memberships(routing, example);
        PrintTable(output, models, accuracy, total, task.Chance);
        PrintExamples(output, task, example, firstPredictions, groups);

        Directory.CreateDirectory(outDir);
        string curvesPath = Path.Combine(outDir, "demo-curves.png"), clustersPath = Path.Combine(outDir, "demo-clusters.png");
        string subtitle = $"seq_len {seqLen}, {task.Pairs} records, {task.Queries} questions, {task.NumValues} values; {steps} steps × {batch} sequences; " +
                          $"held-out accuracy: local {accuracy[0]:P1}, routing {accuracy[1]:P1} (chance {task.Chance:P1})";
        DemoPictures.LearningCurves(curvesPath, models, task.Chance, subtitle);
        DemoPictures.Clusters(clustersPath, task, example, clusters, groups, settings.Clusters,
            $"first routing layer of the routing model; causal routing: each position joins its nearest centroid, a cluster's members are cut into groups of {seqLen / settings.Clusters} in position order; a question attends only earlier members of its group");
        output.WriteLine($"wrote {curvesPath} and {clustersPath}");

        if (jsonPath is not null)
        {
            var document = new
            {
                task = $"associative recall: {task.Pairs} key-value records in {seqLen} tokens, {task.Queries} questions, each record at least {task.MinDistance} tokens before its question, {task.NumValues} values",
                seq_len = seqLen,
                models = models.Select((m, i) => new
                {
                    name = m.Name, @params = m.Parameters, train_seconds = Math.Round(m.TrainSeconds, 2),
                    accuracy = Math.Round(accuracy[i], 4), chance = Math.Round(task.Chance, 4),
                }).ToArray(),
            };
            AtomicFile.WriteAllText(jsonPath, JsonSerializer.Serialize(document, new JsonSerializerOptions { WriteIndented = true }) + "\n");
            output.WriteLine($"wrote {jsonPath}");
        }
        output.WriteLine($"wall time {wall.Elapsed.TotalSeconds:F0} s");
        foreach (var t in firstPredictions) t?.Dispose();
        return CliApp.Ok;
    }

    /// <summary>
    /// Trains both models at once, each on its own thread with libtorch's intra-op threads set to 1 (two models on
    /// two cores without OpenMP barriers between them, which are slow when other processes share the cores). Both see
    /// the same batches (each thread draws them from its own copy of the seeded generator). Progress: two live bars on
    /// an interactive console, otherwise a line per model every tenth of the steps.
    /// </summary>
    private static void Train(DemoModel[] models, RecallTask task, DemoSettings settings, TextWriter output, bool interactive)
    {
        int threadsBefore = get_num_threads();
        set_num_threads(1);
        try
        {
            var workers = models.Select(m => System.Threading.Tasks.Task.Factory.StartNew(() =>
            {
                var rng = new Random(unchecked((int)settings.Seed));
                for (int step = 0; step < settings.Steps; step++)
                {
                    using var scope = NewDisposeScope();
                    var (tokens, targets, _) = task.Batch(settings.Batch, rng);
                    m.TrainStep(tokens, targets, step);
                }
            }, System.Threading.Tasks.TaskCreationOptions.LongRunning)).ToArray();

            int reportEvery = Math.Max(1, settings.Steps / 10);
            string Status(DemoModel m)
            {
                var (steps, loss, accuracy) = m.Recent(reportEvery);
                return $"{m.Name,-7} step {steps,5}/{settings.Steps}  loss {loss:F3}  acc {accuracy,4:P0}  {m.TrainSeconds,4:F0} s";
            }
            if (interactive)
            {
                AnsiConsole.Progress().AutoClear(false)
                    .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var bars = models.Select(m => ctx.AddTask(Markup.Escape(Status(m)), maxValue: settings.Steps)).ToArray();
                        while (true)
                        {
                            bool done = System.Threading.Tasks.Task.WaitAll(workers, 250);
                            for (int i = 0; i < models.Length; i++)
                            {
                                bars[i].Description = Markup.Escape(Status(models[i]));
                                bars[i].Value = models[i].Steps;
                            }
                            if (done) break;
                        }
                    });
            }
            else
            {
                var printed = new int[models.Length];
                while (true)
                {
                    bool done = System.Threading.Tasks.Task.WaitAll(workers, 250);
                    for (int i = 0; i < models.Length; i++)
                    {
                        int steps = models[i].Steps;
                        if (steps != printed[i] && (steps / reportEvery > printed[i] / reportEvery || steps == settings.Steps))
                        {
                            output.WriteLine(Status(models[i]));
                            printed[i] = steps;
                        }
                    }
                    if (done) break;
                }
            }
        }
        catch (AggregateException e) when (e.InnerExceptions.Count == 1)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
        }
        finally { set_num_threads(threadsBefore); }
    }

    private static void PrintTable(TextWriter output, DemoModel[] models, double[] accuracy, long total, double chance)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 120;
        var table = new Table().Title($"held-out accuracy ({total} answers)");
        foreach (var c in new[] { "model", "parameters", "train s", "accuracy", "chance" }) table.AddColumn(c);
        for (int i = 0; i < models.Length; i++)
            table.AddRow(models[i].Name, models[i].Parameters.ToString("N0", CultureInfo.InvariantCulture), models[i].TrainSeconds.ToString("F0"),
                accuracy[i].ToString("P1", CultureInfo.InvariantCulture), chance.ToString("P1", CultureInfo.InvariantCulture));
        console.Write(table);
    }

    private static void PrintExamples(TextWriter output, RecallTask task, RecallExample example, Tensor[] predictions, int[][] groups)
    {
        output.WriteLine("worked examples (first held-out sequence; \"same group\" = which routing heads put the question and the stored key in one group):");
        var local = predictions[0].data<long>().ToArray();
        var routed = predictions[1].data<long>().ToArray();
        int shown = Math.Min(4, example.AnswerPositions.Length);
        for (int i = 0; i < shown; i++)
        {
            int a = example.AnswerPositions[i], r = example.RecordPositions[i];
            long expected = example.Answer(i);
            string Mark(long p) => $"{task.Name(p)} {(p == expected ? "✓" : "✗")}";
            var heads = Enumerable.Range(0, groups.Length).Where(h => groups[h][a] >= 0 && groups[h][a] == groups[h][r]).ToArray();
            output.WriteLine($"  \"? {task.Name(example.Tokens[a])}\" at {a}: stored at {r - 1} as \"{task.Name(example.Tokens[r - 1])} {task.Name(example.Tokens[r])}\" " +
                             $"({a - r} tokens back) → local {Mark(local[a])}, routing {Mark(routed[a])}; " +
                             $"same group: {(heads.Length == 0 ? "none" : string.Join(", ", heads.Select(h => $"head {h}")))}");
        }
    }

    /// <summary>Cluster and routing group of every position, per head of the routing model's first routing layer,
    /// on <paramref name="example"/> (eval mode): [head][position], −1 = none.</summary>
    private static (int[][] Clusters, int[][] Groups) Memberships(DemoModel routing, RecallExample example)
    {
        var group = routing.RoutingGroups[0];
        int seqLen = example.Tokens.Length;
        group.CaptureMemberships = true;
        try
        {
            using var scope = NewDisposeScope();
            routing.Predict(tensor(example.Tokens, new long[] { 1, seqLen }));
            var queryIndices = group.LastQueryIndices!;                                   // (1, Hg, G, W)
            var groupClusters = group.LastGroupClusters!;                                 // (1, Hg, G)
            int heads = (int)queryIndices.shape[1], count = (int)queryIndices.shape[2], width = (int)queryIndices.shape[3];
            var qi = queryIndices.data<long>().ToArray();
            var gc = groupClusters.data<long>().ToArray();
            var clusters = new int[heads][];
            var groups = new int[heads][];
            for (int h = 0; h < heads; h++)
            {
                clusters[h] = Enumerable.Repeat(-1, seqLen).ToArray();
                groups[h] = Enumerable.Repeat(-1, seqLen).ToArray();
                for (int g = 0; g < count; g++)
                    for (int w = 0; w < width; w++)
                    {
                        long position = qi[((long)h * count + g) * width + w];
                        if (position < 0) continue;
                        clusters[h][position] = (int)gc[(long)h * count + g];
                        groups[h][position] = g;
                    }
            }
            return (clusters, groups);
        }
        finally { group.CaptureMemberships = false; }
    }
}

/// <summary>TEMPORARY: experiment overrides from DEMO_EXP="key=value;...".</summary>
internal static class Experiment
{
    public static DemoSettings Apply(DemoSettings s)
    {
        var spec = Environment.GetEnvironmentVariable("DEMO_EXP");
        if (string.IsNullOrEmpty(spec)) return s;
        foreach (var part in spec.Split(';', StringSplitOptions.RemoveEmptyEntries))
        {
            var kv = part.Split('=');
            string k = kv[0], v = kv[1];
            s = k switch
            {
                "lr" => s with { LearningRate = double.Parse(v, CultureInfo.InvariantCulture) },
                "decay" => s with { KmeansDecay = double.Parse(v, CultureInfo.InvariantCulture) },
                "dim" => s with { Dim = int.Parse(v) },
                "heads" => s with { Heads = int.Parse(v) },
                "depth" => s with { Depth = int.Parse(v) },
                "window" => s with { LocalWindow = int.Parse(v) },
                "clusters" => s with { Clusters = int.Parse(v) },
                "keys" => s with { NumKeys = int.Parse(v) },
                "values" => s with { NumValues = int.Parse(v) },
                "pairs" => s with { Pairs = int.Parse(v) },
                "queries" => s with { Queries = int.Parse(v) },
                "skip" => s with { SkipFirst = int.Parse(v) },
                "pos" => s with { Positions = Enum.Parse<PositionalEncoding>(v) },
                _ => throw new CliUsageException($"DEMO_EXP: unknown {k}"),
            };
        }
        return s;
    }
}
