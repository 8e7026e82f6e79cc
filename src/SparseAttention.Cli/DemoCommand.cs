using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using SparseAttention.Model;
using Spectre.Console;
using static TorchSharp.torch;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn demo</c>: the Routing Transformer's claim, live. Two causal models of the same size — local
/// attention only, and local + routing heads — learn the associative-recall task of <see cref="RecallTask"/>
/// side by side on the same batches; then both answer held-out sequences. Prints the accuracy table (with
/// chance), worked examples, and writes a PNG of the learning curves and one of the routing clusters.
/// </summary>
internal sealed class DemoCommand
{
    private readonly Option<int> stepsOption = new("--steps") { HelpName = "N", Description = "Training steps per model.", DefaultValueFactory = _ => 300 };
    private readonly Option<int> seqLenOption = new("--seq-len") { HelpName = "T", Description = "Tokens per sequence (a multiple of 8: the routing heads have 8 clusters of T/8 tokens).", DefaultValueFactory = _ => 512 };
    private readonly Option<int> batchOption = new("--batch") { HelpName = "B", Description = "Sequences per training step.", DefaultValueFactory = _ => 16 };
    private readonly Option<int> evalOption = new("--eval-sequences") { HelpName = "N", Description = "Held-out sequences scored at the end.", DefaultValueFactory = _ => 256 };
    private readonly Option<long> seedOption = new("--seed") { HelpName = "N", Description = "Seed of the weights and the data.", DefaultValueFactory = _ => 1 };
    private readonly Option<string> outOption = new("--out") { HelpName = "DIR", Description = "Folder for the pictures (demo-curves.png, demo-clusters.png).", DefaultValueFactory = _ => "demo-output" };
    private readonly Option<string?> jsonOption = new("--json") { HelpName = "FILE", Description = "Also write the results as JSON (atomically)." };

    public static Command Create()
    {
        var self = new DemoCommand();
        var command = new Command("demo", "Local attention vs routing attention on a long-range lookup task: train both, compare, draw (no data needed; about 75 s on an idle 2-core machine).");
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

        var settings = new DemoSettings(seqLen, steps, batch, seed, evalSequences);
        if (seqLen % settings.Clusters != 0)
            throw new CliUsageException($"--seq-len must be a multiple of {settings.Clusters} (the routing heads' clusters), got {seqLen}.");
        RecallTask task;
        try { task = settings.Task.Validate(); }
        catch (ArgumentException e) { throw new CliUsageException($"--seq-len: {ConfigCommand.Plain(e)}"); }

        output.WriteLine($"task: associative recall — {task.Pairs} records \"value key\" scattered in {seqLen} tokens, then {task.Queries} questions \"? key\" → value; " +
                         $"every record is at least {task.MinDistance} tokens before its question, beyond the local model's reach of {settings.LocalReach}; " +
                         $"{task.NumValues} values, chance {task.Chance:P1}");

        using var local = new DemoModel("local", routing: false, settings);
        using var routing = new DemoModel("routing", routing: true, settings);
        var models = new[] { local, routing };
        output.WriteLine($"models: causal LM, dim {settings.Dim}, depth {settings.Depth}, {settings.Heads} heads × {settings.Dim / settings.Heads}, token shift, " +
                         $"{(settings.Positions == PositionalEncoding.None ? "no position encoding" : settings.Positions + " positions")}; " +
                         $"local = {settings.Heads} local heads per layer (window {settings.LocalWindow}, radius 1), {local.Parameters:N0} parameters; " +
                         $"routing = {settings.Heads / 2} local + {settings.Heads - settings.Heads / 2} routing heads per layer{(settings.SkipFirst > 0 ? $" after {settings.SkipFirst} local layer(s)" : "")} ({settings.Clusters} clusters of {seqLen / settings.Clusters}), {routing.Parameters:N0} parameters");
        output.WriteLine($"training: {steps} steps × {batch} sequences, each step both models learn from the same batch; " +
                         $"AdamW lr {settings.LearningRate.ToString(CultureInfo.InvariantCulture)}, k-means EMA decay {settings.KmeansDecay.ToString(CultureInfo.InvariantCulture)}; loss on the answers only");

        var wall = Stopwatch.StartNew();
        bool interactive = ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
        Train(models, task, settings, output, interactive);

        using var evalScope = NewDisposeScope();
        var evalBatch = task.Batch(evalSequences, new Random(unchecked((int)(seed * 7919 + 104729))));   // held out: another stream
        var result = Evaluate(models, task, evalBatch.Tokens, evalBatch.Targets, evalBatch.Examples);
        var accuracy = result.Correct.Select(c => (double)c / result.Answers).ToArray();
        var example = evalBatch.Examples[0];
        PrintTable(output, models, accuracy, result.Answers, task.Chance);
        double coGrouped = (double)result.CoGrouped / result.Answers;
        output.WriteLine($"routing model, first layer: {coGrouped:P1} of the questions shared a routing group with their stored key (either head); " +
                         $"accuracy on those {Ratio(result.CoGroupedCorrect, result.CoGrouped)}, on the others {Ratio(result.Correct[1] - result.CoGroupedCorrect, result.Answers - result.CoGrouped)}");
        PrintExamples(output, task, example, result.FirstPredictions, result.FirstGroups);

        Directory.CreateDirectory(outDir);
        string curvesPath = Path.Combine(outDir, "demo-curves.png"), clustersPath = Path.Combine(outDir, "demo-clusters.png");
        string subtitle = $"seq_len {seqLen}, {task.Pairs} records, {task.Queries} questions, {task.NumValues} values; {steps} steps × {batch} sequences; " +
                          $"held-out accuracy: local {accuracy[0]:P1}, routing {accuracy[1]:P1} (chance {task.Chance:P1})";
        DemoPictures.LearningCurves(curvesPath, models, task.Chance, subtitle);
        DemoPictures.Clusters(clustersPath, task, example, result.FirstClusters, result.FirstGroups, settings.Clusters,
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
        return CliApp.Ok;
    }

    /// <summary>
    /// Trains both models side by side on one thread: each step draws one batch and both models take a step on it.
    /// libtorch's intra-op threads are set to 1 for the run (OpenMP barriers between two threads are slow when other
    /// processes share the two cores). Everything that calls TorchSharp runs on this one thread: with a second
    /// managed thread allocating (training the models on two threads was tried), a garbage collection can finalize a
    /// temporary TorchSharp Scalar while a native call still uses it; the demo crashed once that way.
    /// Progress: two live bars on an interactive console (redrawn from this thread), otherwise a line per model every
    /// tenth of the steps.
    /// </summary>
    private static void Train(DemoModel[] models, RecallTask task, DemoSettings settings, TextWriter output, bool interactive)
    {
        int reportEvery = Math.Max(1, settings.Steps / 10);
        string Status(DemoModel m)
        {
            var (steps, loss, accuracy) = m.Recent(reportEvery);
            if (steps == 0) return $"{m.Name,-7} step {0,5}/{settings.Steps}  starting";
            return $"{m.Name,-7} step {steps,5}/{settings.Steps}  loss {loss:F3}  acc {accuracy,4:P0}  {m.TrainSeconds,4:F0} s";
        }
        void Run(Action afterStep)
        {
            var rng = new Random(unchecked((int)settings.Seed));
            for (int step = 0; step < settings.Steps; step++)
            {
                using var scope = NewDisposeScope();
                var (tokens, targets, _) = task.Batch(settings.Batch, rng);
                foreach (var m in models) m.TrainStep(tokens, targets, step);
                afterStep();
            }
        }

        int threadsBefore = get_num_threads();
        set_num_threads(1);
        try
        {
            if (interactive)
            {
                AnsiConsole.Progress().AutoClear(false).AutoRefresh(false)
                    .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var bars = models.Select(m => ctx.AddTask(Markup.Escape(Status(m)), maxValue: settings.Steps)).ToArray();
                        ctx.Refresh();
                        Run(() =>
                        {
                            for (int i = 0; i < models.Length; i++)
                            {
                                bars[i].Description = Markup.Escape(Status(models[i]));
                                bars[i].Value = models[i].Steps;
                            }
                            ctx.Refresh();
                        });
                    });
            }
            else
                Run(() =>
                {
                    if (models[0].Steps % reportEvery == 0 || models[0].Steps == settings.Steps)
                        foreach (var m in models) output.WriteLine(Status(m));
                });
        }
        finally { set_num_threads(threadsBefore); }
    }

    private static void PrintTable(TextWriter output, DemoModel[] models, double[] accuracy, long total, double chance)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output), Ansi = AnsiSupport.No, ColorSystem = ColorSystemSupport.NoColors });
        console.Profile.Width = 120;
        var table = new Table().Title($"held-out accuracy ({total} answers)");
        table.AddColumn("model");
        foreach (var c in new[] { "parameters", "train s", "accuracy", "chance" }) table.AddColumn(new TableColumn(c).RightAligned());
        for (int i = 0; i < models.Length; i++)
            table.AddRow(models[i].Name, models[i].Parameters.ToString("N0", CultureInfo.InvariantCulture), models[i].TrainSeconds.ToString("F0"),
                accuracy[i].ToString("P1", CultureInfo.InvariantCulture), chance.ToString("P1", CultureInfo.InvariantCulture));
        console.Write(table);
    }

    private static string Ratio(long part, long whole) => whole == 0 ? "–" : ((double)part / whole).ToString("P1", CultureInfo.InvariantCulture);

    private static void PrintExamples(TextWriter output, RecallTask task, RecallExample example, long[][] predictions, int[][] groups)
    {
        output.WriteLine("worked examples (first held-out sequence; \"same group\" = which routing heads put the question and the stored key in one group):");
        long[] local = predictions[0], routed = predictions[1];
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

    /// <summary>Held-out scores. Predictions are next-token argmaxes at the question keys.</summary>
    /// <param name="Correct">Correct answers per model.</param>
    /// <param name="Answers">Questions scored.</param>
    /// <param name="CoGrouped">Questions whose key shared a routing group with the stored key in the routing model's
    /// first routing layer (either head).</param>
    /// <param name="CoGroupedCorrect">Of those, answered correctly by the routing model.</param>
    /// <param name="FirstPredictions">[model][position] predicted next token on the first sequence.</param>
    /// <param name="FirstClusters">[head][position] cluster in the first routing layer on the first sequence (−1 = none).</param>
    /// <param name="FirstGroups">[head][position] routing group there (−1 = none).</param>
    private sealed record Evaluation(long[] Correct, long Answers, long CoGrouped, long CoGroupedCorrect,
        long[][] FirstPredictions, int[][] FirstClusters, int[][] FirstGroups);

    private static Evaluation Evaluate(DemoModel[] models, RecallTask task, Tensor tokens, Tensor targets, RecallExample[] examples)
    {
        int count = examples.Length, seqLen = task.SeqLen;
        var correct = new long[models.Length];
        long answers = 0, coGrouped = 0, coGroupedCorrect = 0;
        var firstPredictions = new long[models.Length][];
        int[][] firstClusters = [], firstGroups = [];
        var routingGroup = models[1].RoutingGroups[0];
        const int Chunk = 32;
        int threadsBefore = get_num_threads();
        set_num_threads(1);                                                               // see Train
        try
        {
            for (int start = 0; start < count; start += Chunk)
            {
                using var scope = NewDisposeScope();
                int n = Math.Min(Chunk, count - start);
                var chunk = tokens.narrow(0, start, n);                                   // (n, T)
                var predictions = new long[models.Length][];
                using var capture = RoutingCapture.Start();
                for (int m = 0; m < models.Length; m++)
                    predictions[m] = models[m].Predict(chunk).data<long>().ToArray();     // (n, T) flattened
                var record = capture.Records.First(r => ReferenceEquals(r.Group, routingGroup));
                var (clusters, groups) = Memberships(record, seqLen);                    // [n][head][position]
                for (int b = 0; b < n; b++)
                {
                    var e = examples[start + b];
                    for (int i = 0; i < e.AnswerPositions.Length; i++)
                    {
                        int a = e.AnswerPositions[i], r = e.RecordPositions[i];
                        bool together = groups[b].Any(g => g[a] >= 0 && g[a] == g[r]);
                        answers++;
                        for (int m = 0; m < models.Length; m++)
                            if (predictions[m][(long)b * seqLen + a] == e.Answer(i)) correct[m]++;
                        if (together)
                        {
                            coGrouped++;
                            if (predictions[1][(long)b * seqLen + a] == e.Answer(i)) coGroupedCorrect++;
                        }
                    }
                }
                if (start == 0)
                {
                    for (int m = 0; m < models.Length; m++) firstPredictions[m] = predictions[m][..seqLen];
                    (firstClusters, firstGroups) = (clusters[0], groups[0]);
                }
            }
        }
        finally
        {
            set_num_threads(threadsBefore);
        }
        return new Evaluation(correct, answers, coGrouped, coGroupedCorrect, firstPredictions, firstClusters, firstGroups);
    }

    /// <summary>Cluster and routing group of every position from one captured routing forward:
    /// [sequence][head][position], −1 = none.</summary>
    private static (int[][][] Clusters, int[][][] Groups) Memberships(RoutingRecord record, int seqLen)
    {
        var queryIndices = record.QueryIndices;                                           // (B, Hg, G, W)
        var groupClusters = record.GroupClusters;                                         // (B, Hg, G)
        int batch = (int)queryIndices.shape[0], heads = (int)queryIndices.shape[1];
        int count = (int)queryIndices.shape[2], width = (int)queryIndices.shape[3];
        var qi = queryIndices.data<long>().ToArray();
        var gc = groupClusters.data<long>().ToArray();
        var clusters = new int[batch][][];
        var groups = new int[batch][][];
        for (int b = 0; b < batch; b++)
        {
            clusters[b] = new int[heads][];
            groups[b] = new int[heads][];
            for (int h = 0; h < heads; h++)
            {
                var c = clusters[b][h] = Enumerable.Repeat(-1, seqLen).ToArray();
                var g = groups[b][h] = Enumerable.Repeat(-1, seqLen).ToArray();
                long row = (long)b * heads + h;
                for (int j = 0; j < count; j++)
                    for (int w = 0; w < width; w++)
                    {
                        long position = qi[(row * count + j) * width + w];
                        if (position < 0) continue;
                        c[position] = (int)gc[row * count + j];
                        g[position] = j;
                    }
            }
        }
        return (clusters, groups);
    }
}
