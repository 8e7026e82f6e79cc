using System.CommandLine;
using System.Text;
using System.Text.Json;
using ScottPlot;
using SkiaSharp;
using SparseAttention.Model;
using SparseAttention.Training;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn plot curves</c> (learning curves from a run's log.jsonl) and <c>sparse-attn plot attention</c>
/// (which keys each query may attend, per layer and head, on a given text; routing clusters as colours).
/// </summary>
internal static class PlotCommand
{
    public static Command Create()
    {
        var command = new Command("plot", "Pictures of a training run (curves) and of a trained model's attention on a text (attention).");
        command.Add(CurvesCommand.Create());
        command.Add(AttentionPlotCommand.Create());
        return command;
    }
}

/// <summary>One point of a run's log: <c>loss</c> (nats per token, training) with <c>bpc</c> (its bits per byte; absent in
/// logs of earlier versions, which trained bytes only: then loss / ln 2), or <c>val_bpc</c> (bits per byte) at a step.</summary>
internal readonly record struct LogPoint(long Step, double? Loss, double? ValBpc, double? Bpc = null)
{
    /// <summary>Training loss in bits per byte of the text.</summary>
    public double? TrainBits => Bpc ?? Loss / Math.Log(2);
}

internal sealed class CurvesCommand
{
    private readonly Option<string> runOption = new("--run") { HelpName = "DIR|FILE", Description = "Run folder written by train (reads its log.jsonl), or a log.jsonl file.", Required = true };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.png", Description = "PNG to write.", Required = true };

    public static Command Create()
    {
        var self = new CurvesCommand();
        var command = new Command("curves", "Learning curves: training loss and validation loss in bits per byte of the text (any tokenizer) against step.");
        command.Add(self.runOption);
        command.Add(self.outOption);
        command.SetAction(self.Execute);
        return command;
    }

    /// <summary>The points of a log.jsonl file; lines that are not JSON objects with a step are refused with their line number.</summary>
    internal static List<LogPoint> ReadLog(string path)
    {
        var points = new List<LogPoint>();
        int number = 0;
        foreach (var line in File.ReadLines(path))
        {
            number++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            try
            {
                using var doc = JsonDocument.Parse(line);
                var root = doc.RootElement;
                static double? Number(JsonElement e, string name) =>
                    e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetDouble() : null;
                points.Add(new LogPoint(root.GetProperty("step").GetInt64(), Number(root, "loss"), Number(root, "val_bpc"), Number(root, "bpc")));
            }
            catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
            {
                throw new CliUsageException($"--run: {path} line {number} is not a log line of train ({e.Message}).");
            }
        }
        return points;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string run = parse.GetValue(runOption)!;
        string log = Directory.Exists(run) ? Path.Combine(run, "log.jsonl") : run;
        if (!File.Exists(log)) throw new CliUsageException($"--run: no such log: {log} (give a run folder written by train, or its log.jsonl).");
        var points = ReadLog(log);
        var train = points.Where(p => p.Loss is not null).ToList();
        var val = points.Where(p => p.ValBpc is not null).ToList();
        if (train.Count == 0 && val.Count == 0) throw new CliUsageException($"--run: {log} holds no loss or val_bpc values yet.");

        var plot = new Plot();
        plot.Font.Set(PlotStyle.SansSerif);
        if (train.Count > 0)
        {
            var s = plot.Add.ScatterLine(train.Select(p => (double)p.Step).ToArray(), train.Select(p => p.TrainBits!.Value).ToArray());
            s.LegendText = "training loss (bits/byte)";
            s.LineWidth = 1.5f;
            s.Color = Colors.SteelBlue;
        }
        if (val.Count > 0)
        {
            var s = plot.Add.Scatter(val.Select(p => (double)p.Step).ToArray(), val.Select(p => p.ValBpc!.Value).ToArray());
            s.LegendText = "validation bits/byte";
            s.LineWidth = 2;
            s.MarkerSize = 6;
            s.Color = Colors.OrangeRed;
        }
        plot.Title($"Learning curves — {Path.GetFileName(Path.GetDirectoryName(Path.GetFullPath(log)))}");
        plot.XLabel("optimizer step");
        plot.YLabel("bits per byte of text");
        plot.ShowLegend(Alignment.UpperRight);
        string outPath = parse.GetValue(outOption)!;
        AtomicFile.WriteAllBytes(outPath, plot.GetImageBytes(900, 540, ImageFormat.Png));
        output.WriteLine($"wrote {outPath}: {train.Count} training points, {val.Count} validation points" +
                         (val.Count > 0 ? $" (val_bpc {val[0].ValBpc:F3} at step {val[0].Step} → {val[^1].ValBpc:F3} at step {val[^1].Step})" : ""));
        return CliApp.Ok;
    }
}

/// <summary>What one head of one layer may attend on a text: <c>Allowed[q·T + k]</c>; for routing heads
/// <c>Cluster[q]</c> is the cluster of the group query q was routed to (−1 = none), for static heads null.</summary>
internal sealed record HeadAttention(int Layer, int Head, HeadGroupKind Kind, bool[] Allowed, int[]? Cluster);

internal sealed class AttentionPlotCommand
{
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat), run folder (its newest checkpoint), .safetensors file or exported folder.", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON for safetensors weights that carry none." };
    private readonly Option<string?> textOption = new("--text") { HelpName = "TEXT", Description = "The text to run the model on (encoded with the checkpoint's tokenizer)." };
    private readonly Option<string?> dataOption = new("--data") { HelpName = "PATH", Description = "Take the text from this file instead, starting at --offset." };
    private readonly Option<long> offsetOption = new("--offset") { HelpName = "N", Description = "First byte of the text within --data.", DefaultValueFactory = _ => 0 };
    private readonly Option<int?> lengthOption = new("--length") { HelpName = "T", Description = "Tokens of text to use (bytes for a byte-level model; default and maximum: the model's max_seq_len)." };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.png", Description = "PNG of the attention masks; with routing heads also FILE-clusters.png.", Required = true };

    public static Command Create()
    {
        var self = new AttentionPlotCommand();
        var command = new Command("attention",
            "For each layer and head, which keys each query may attend on a text: local/static heads from their pattern, routing heads from the " +
            "clusters the model chose on that text (cells coloured by cluster; memory key/values not drawn), LSH heads from the buckets they chose " +
            "(coloured by first-round bucket), synthesizer heads as every (earlier) key; plus a picture of the clusters / buckets over positions.");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.textOption, self.dataOption, self.offsetOption, self.lengthOption, self.outOption })
            command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string? text = parse.GetValue(textOption), data = parse.GetValue(dataOption);
        if ((text is null) == (data is null)) throw new CliUsageException("--text / --data: give exactly one of them.");
        long offset = parse.GetValue(offsetOption);
        if (offset < 0) throw new CliUsageException($"--offset must be >= 0, got {offset}.");
        if (text is not null && offset != 0) throw new CliUsageException("--offset applies to --data only.");
        int? length = parse.GetValue(lengthOption);
        if (length is < 1) throw new CliUsageException($"--length must be >= 1, got {length}.");
        byte[] source = text is not null ? Encoding.UTF8.GetBytes(text) : TextData.Read(data!, "--data", minBytes: 1);
        if (source.Length == 0) throw new CliUsageException("--text: the text is empty.");
        if (offset >= source.Length) throw new CliUsageException($"--offset: {offset} is past the end of {data} ({source.Length} bytes).");

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        int maxLen = loaded.Config.MaxSeqLen;
        if (length is int l && l > maxLen) throw new CliUsageException($"--length: {l} is longer than the model's context (max_seq_len = {maxLen}).");
        var tokenizer = CliTokenizer.Of(loaded);
        int want = length ?? maxLen;
        // A token covers at most a few dozen bytes: encode only a generous prefix of a long file.
        var ids = tokenizer.Encode(source.AsSpan((int)offset, (int)Math.Min(source.Length - offset, (long)want * 256)));
        string unit = CliTokenizer.Unit(tokenizer);
        if (text is not null && length is null && ids.Length > maxLen)
            throw new CliUsageException($"--text: {ids.Length} {unit} is longer than the model's context (max_seq_len = {maxLen}); shorten it or pass --length.");
        if (ids.Length == 0) throw new CliUsageException("--text / --data: the text gives no tokens.");
        int t = Math.Min(want, ids.Length);
        var window = ids[..t];
        var labels = window.Select(id => tokenizer.Kind == TokenizerKind.Bytes
            ? Encoding.Latin1.GetString([(byte)id])                                   // one character per byte, as before
            : tokenizer.Decode([id])).ToArray();

        var heads = Compute(loaded.Model, window);
        string outPath = parse.GetValue(outOption)!;
        int clusters = Math.Max(1, (maxLen + loaded.Config.WindowSize - 1) / loaded.Config.WindowSize);
        clusters = Math.Max(clusters, heads.Where(h => h.Cluster is not null).SelectMany(h => h.Cluster!).DefaultIfEmpty(0).Max() + 1);   // LSH buckets
        AttentionRendering.MasksPng(heads, labels, clusters, outPath, $"{loaded.Describe()}: attention on {t} {unit}");
        output.WriteLine($"wrote {outPath}: {heads.Select(h => h.Layer).Distinct().Count()} layers × {loaded.Config.Heads} heads on {t} {unit}");
        if (heads.Any(h => h.Cluster is not null))
        {
            string clustersPath = Path.Combine(Path.GetDirectoryName(outPath) ?? "", Path.GetFileNameWithoutExtension(outPath) + "-clusters.png");
            AttentionRendering.ClustersPng(heads, labels, clusters, clustersPath, $"{loaded.Describe()}: routing clusters / LSH buckets over positions");
            output.WriteLine($"wrote {clustersPath}: {heads.Count(h => h.Kind == HeadGroupKind.Routing)} routing heads (colour = cluster of the query's group), " +
                             $"{heads.Count(h => h.Kind == HeadGroupKind.Lsh)} LSH heads (colour = bucket in the first hash round)");
        }
        return CliApp.Ok;
    }

    /// <summary>Runs <paramref name="model"/> on <paramref name="text"/> (one window, T ≤ max_seq_len) and returns, per layer
    /// and head in order, the keys each query may attend: static/local heads from their compiled pattern, routing
    /// heads from the groups recorded by <see cref="RoutingCapture"/> (causal rule on positions; with shared QK a
    /// token attends itself only when its group offers nothing else, as the kernel does).</summary>
    internal static List<HeadAttention> Compute(RoutingTransformerLM model, byte[] text) => Compute(model, text.Select(b => (int)b).ToArray());

    /// <summary>As <see cref="Compute(RoutingTransformerLM, byte[])"/>, on token ids of the model's tokenizer.</summary>
    internal static List<HeadAttention> Compute(RoutingTransformerLM model, int[] tokens)
    {
        var config = model.Config;
        int t = tokens.Length;
        using var capture = RoutingCapture.Start();
        using (no_grad())
        using (var scope = NewDisposeScope())
        {
            model.eval();
            model.forward(tensor(tokens.Select(id => (long)id).ToArray(), new long[] { 1, t }), null);   // (1, T) → routing recorded
        }
        var attentionLayers = model.Transformer.Blocks.Select(b => b.Attention).OfType<AttentionLayer>().ToList();
        var result = new List<HeadAttention>();
        int record = 0, lshRecord = 0;
        for (int layer = 0; layer < config.Depth; layer++)
        {
            var attention = attentionLayers[config.WeightTie ? 0 : layer];
            var plans = config.HeadGroupsForLayer(layer);              // same order as attention.Groups
            int head = 0;
            for (int gi = 0; gi < attention.Groups.Count; gi++)
            {
                var group = attention.Groups[gi];
                if (group is StaticPatternAttention staticGroup)
                {
                    using var dense = staticGroup.MaskFor(t).ToDense();                     // (Hg, T, T)
                    var all = dense.data<bool>().ToArray();
                    var kind = plans[gi].Kind;
                    for (int h = 0; h < group.Heads; h++)
                        result.Add(new HeadAttention(layer, head + h, kind, all.AsSpan(h * t * t, t * t).ToArray(), null));
                }
                else if (group is RoutingHeadGroup routing)
                {
                    if (record >= capture.Records.Count || !ReferenceEquals(capture.Records[record].Group, routing))
                        throw new InvalidOperationException($"routing of layer {layer} was not recorded.");
                    var r = capture.Records[record++];
                    for (int h = 0; h < group.Heads; h++)
                        result.Add(RoutingMask(layer, head + h, r, h, t, routing.Routing.Causal, routing.Routing.SharedQk));
                }
                else if (group is LshHeadGroup lsh)
                {
                    if (lshRecord >= capture.LshRecords.Count || !ReferenceEquals(capture.LshRecords[lshRecord].Group, lsh))
                        throw new InvalidOperationException($"LSH buckets of layer {layer} were not recorded.");
                    var r = capture.LshRecords[lshRecord++];
                    for (int h = 0; h < group.Heads; h++)
                        result.Add(new HeadAttention(layer, head + h, HeadGroupKind.Lsh, r.Allowed[0, h].data<bool>().ToArray(),
                            r.Buckets[0, h].data<long>().ToArray().Select(b => (int)b).ToArray()));
                }
                else if (group is SynthesizerHeadGroup)
                {
                    // Synthesizer heads weight every key (every earlier key when causal); their weights do not depend on a pattern.
                    var allowed = new bool[t * t];
                    for (int q = 0; q < t; q++)
                        for (int k = 0; k < t; k++) allowed[q * t + k] = !config.Causal || k <= q;
                    for (int h = 0; h < group.Heads; h++) result.Add(new HeadAttention(layer, head + h, HeadGroupKind.Synthesizer, allowed, null));
                }
                else throw new InvalidOperationException($"layer {layer}: cannot draw a head group of type {group.GetType().Name}.");
                head += group.Heads;
            }
        }
        return result;
    }

    private static HeadAttention RoutingMask(int layer, int head, RoutingRecord r, int h, int t, bool causal, bool sharedQk)
    {
        var queries = r.QueryIndices[0, h].data<long>().ToArray();      // (G, W) flattened
        var keys = r.KeyIndices[0, h].data<long>().ToArray();          // (G, W) flattened
        var clusters = r.GroupClusters[0, h].data<long>().ToArray();   // (G)
        int groups = clusters.Length, width = (int)r.QueryIndices.shape[3];
        var allowed = new bool[t * t];
        var cluster = Enumerable.Repeat(-1, t).ToArray();
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < width; i++)
            {
                long q = queries[g * width + i];
                if (q < 0) continue;
                cluster[q] = (int)clusters[g];
                bool other = false;
                for (int j = 0; j < width; j++)
                {
                    long k = keys[g * width + j];
                    if (k < 0 || (causal && k > q) || (sharedQk && k == q)) continue;
                    allowed[q * t + k] = true;
                    other = true;
                }
                if (sharedQk && !other) allowed[q * t + q] = true;           // self only when nothing else
            }
        return new HeadAttention(layer, head, HeadGroupKind.Routing, allowed, cluster);
    }
}

/// <summary>Fonts and colours shared by the plots.</summary>
internal static class PlotStyle
{
    /// <summary>A sans-serif family installed here (the platform default is often a serif face).</summary>
    public static readonly string SansSerif =
        new[] { "DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica" }
            .FirstOrDefault(f => SKFontManager.Default.MatchFamily(f)?.FamilyName == f) ?? Fonts.Default;

    /// <summary>Colour of cluster <paramref name="c"/> (20 distinct colours, then repeating).</summary>
    public static Color Cluster(int c) => new ScottPlot.Palettes.Category20().GetColor(c);
}

/// <summary>Maps heatmap values to colours: 0 → black (static pattern), c + 1 → the colour of cluster c.</summary>
internal sealed class ClusterColormap(int clusters) : IColormap
{
    public string Name => "clusters";

    public Color GetColor(double normalizedIntensity)
    {
        int index = (int)Math.Round(normalizedIntensity * clusters);      // the heatmap's range is [0, clusters]
        return index <= 0 ? Colors.Black : PlotStyle.Cluster(index - 1);
    }
}

internal static class AttentionRendering
{
    private const int PanelSize = 360, HeaderHeight = 56;

    /// <summary>One panel per (layer, head): x = key, y = query (0 at the top); allowed cells black for static heads,
    /// coloured by the group's cluster for routing heads; white = not attended.</summary>
    public static void MasksPng(IReadOnlyList<HeadAttention> heads, IReadOnlyList<string> tokens, int clusters, string path, string title)
    {
        int t = tokens.Count;
        int layers = heads.Max(h => h.Layer) + 1, columns = heads.Count / layers;
        var multiplot = new Multiplot();
        multiplot.AddPlots(heads.Count);
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Grid(layers, columns);
        var plots = multiplot.GetPlots();
        for (int i = 0; i < heads.Count; i++)
        {
            var h = heads[i];
            var values = new double[t, t];
            for (int q = 0; q < t; q++)
                for (int k = 0; k < t; k++)
                    values[q, k] = !h.Allowed[q * t + k] ? double.NaN : h.Cluster is null ? 0 : h.Cluster[q] + 1;
            var plot = plots[i];
            var heatmap = plot.Add.Heatmap(values);
            heatmap.Colormap = new ClusterColormap(clusters);
            heatmap.ManualRange = new ScottPlot.Range(0, clusters);
            heatmap.NaNCellColor = Colors.White;
            heatmap.CellAlignment = Alignment.LowerLeft;
            plot.Axes.SetLimits(0, t, t, 0);
            plot.Axes.SquareUnits();
            plot.HideGrid();
            plot.Font.Set(PlotStyle.SansSerif);
            double density = h.Allowed.Count(a => a) / (double)(t * (t + 1) / 2);
            plot.Title($"layer {h.Layer} head {h.Head} ({h.Kind.ToString().ToLowerInvariant()}, {density:P0} of causal pairs)", 12);
            plot.XLabel("key", 11);
            plot.YLabel("query", 11);
        }
        Save(multiplot, columns * PanelSize, layers * PanelSize, path, title,
             $"T = {t}; black = static/local pattern, colour = routing cluster of the query's group or LSH bucket of the query (first round), white = not attended");
    }

    /// <summary>One row per routing (layer, head): the cluster of each position's group as a colour (white = none),
    /// with the text of each token (a character for bytes) along the bottom when they fit.</summary>
    public static void ClustersPng(IReadOnlyList<HeadAttention> heads, IReadOnlyList<string> tokens, int clusters, string path, string title)
    {
        var routing = heads.Where(h => h.Cluster is not null).ToList();
        int t = tokens.Count, rows = routing.Count;
        var values = new double[rows, t];
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < t; i++)
                values[r, i] = routing[r].Cluster![i] < 0 ? double.NaN : routing[r].Cluster![i] + 1;
        var multiplot = new Multiplot();
        multiplot.AddPlots(1);
        var plot = multiplot.GetPlots()[0];
        var heatmap = plot.Add.Heatmap(values);
        heatmap.Colormap = new ClusterColormap(clusters);
        heatmap.ManualRange = new ScottPlot.Range(0, clusters);
        heatmap.NaNCellColor = Colors.White;
        heatmap.CellAlignment = Alignment.LowerLeft;
        plot.Axes.SetLimits(0, t, rows, 0);
        plot.HideGrid();
        plot.Font.Set(PlotStyle.SansSerif);
        plot.Axes.Left.SetTicks(Enumerable.Range(0, rows).Select(r => r + 0.5).ToArray(),
                                routing.Select(h => $"L{h.Layer} H{h.Head}").ToArray());
        if (t <= 160)
        {
            var characters = tokens.Select(s => string.Concat(s.Select(c => c is >= ' ' and < '\x7f' ? c : '·'))).ToArray();
            plot.Axes.Bottom.SetTicks(Enumerable.Range(0, t).Select(i => i + 0.5).ToArray(), characters);
        }
        plot.XLabel("position (text below)", 12);
        int width = Math.Max(900, Math.Min(2400, 12 * t + 120)), height = 120 + 36 * rows;
        Save(multiplot, width, height, path, title, $"T = {t}; colour = cluster of the group the position's query joined ({clusters} clusters per head), white = none");
    }

    private static void Save(Multiplot multiplot, int plotsWidth, int plotsHeight, string path, string title, string subtitle)
    {
        int width = Math.Max(plotsWidth, 720), height = HeaderHeight + plotsHeight;
        using var surface = SKSurface.Create(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        var canvas = surface.Canvas;
        canvas.Clear(SKColors.White);
        using (var panels = SKSurface.Create(new SKImageInfo(plotsWidth, plotsHeight, SKColorType.Rgba8888, SKAlphaType.Premul)))
        {
            multiplot.Render(panels);
            using var image = panels.Snapshot();
            canvas.DrawImage(image, (width - plotsWidth) / 2f, HeaderHeight);
        }
        using var paint = new SKPaint { Color = SKColors.Black, IsAntialias = true };
        using var typeface = SKTypeface.FromFamilyName(PlotStyle.SansSerif) ?? SKTypeface.Default;
        using (var big = new SKFont(typeface, 18)) canvas.DrawText(title, 12, 24, SKTextAlign.Left, big, paint);
        using (var small = new SKFont(typeface, 13)) canvas.DrawText(subtitle, 12, 46, SKTextAlign.Left, small, paint);
        using var snapshot = surface.Snapshot();
        using var png = snapshot.Encode(SKEncodedImageFormat.Png, 100);
        AtomicFile.WriteAllBytes(path, png.ToArray());
    }
}
