using ScottPlot;
using SkiaSharp;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>The demo's two PNGs: learning curves, and the routing clusters over one sequence.</summary>
internal static class DemoPictures
{
    private const int HeaderHeight = 64;
    /// <summary>A sans-serif family installed here (the platform default is often a serif face).</summary>
    private static readonly string SansSerif =
        new[] { "DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica" }
            .FirstOrDefault(f => SKFontManager.Default.MatchFamily(f)?.FamilyName == f) ?? Fonts.Default;

    private static readonly Color LocalColor = new(0x1f, 0x77, 0xb4);     // blue
    private static readonly Color RoutingColor = new(0xd6, 0x27, 0x28);   // red

    /// <summary>
    /// Two panels: training loss on the answers (nats) and answer accuracy on each step's fresh batch, for both
    /// models, smoothed by a moving average; chance level (ln V and 1/V) dashed.
    /// </summary>
    public static void LearningCurves(string path, IReadOnlyList<DemoModel> models, double chance, string subtitle)
    {
        int steps = models.Max(m => m.Losses.Count);
        int window = Math.Max(1, steps / 40);
        var multiplot = new Multiplot();
        multiplot.AddPlots(2);
        var plots = multiplot.GetPlots();
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Grid(1, 2);
        var series = new (string Title, string YLabel, Func<DemoModel, List<double>> Values, double Chance)[]
        {
            ("loss on the answers", "cross-entropy (nats)", m => m.Losses, -Math.Log(chance)),
            ("answer accuracy (each batch before training on it)", "accuracy", m => m.Accuracies, chance),
        };
        for (int p = 0; p < 2; p++)
        {
            var plot = plots[p];
            var (title, yLabel, values, chanceLevel) = series[p];
            foreach (var m in models)
            {
                var ys = MovingAverage(values(m), window);
                var xs = Enumerable.Range(1, ys.Length).Select(i => (double)i).ToArray();
                var line = plot.Add.ScatterLine(xs, ys, m.Name == "routing" ? RoutingColor : LocalColor);
                line.LineWidth = 2;
                line.LegendText = $"{m.Name} ({m.Parameters:N0} params)";
            }
            var chanceLine = plot.Add.HorizontalLine(chanceLevel, 1.5f, Colors.Gray, LinePattern.Dashed);
            chanceLine.LegendText = p == 0 ? "chance (ln V)" : "chance (1/V)";
            chanceLine.LabelText = "";
            if (p == 1) plot.Axes.SetLimitsY(0, 1.02);
            plot.Axes.SetLimitsX(0, Math.Max(1, steps));
            plot.Title(title, 14);
            plot.XLabel($"training step (moving average of {window})", 13);
            plot.YLabel(yLabel, 13);
            plot.ShowLegend(p == 0 ? Alignment.UpperRight : Alignment.MiddleRight);   // clear of both curves
        }
        Save(multiplot, path, 1200, 480, "Learning curves: local attention vs routing attention", subtitle);
    }

    /// <summary>
    /// One panel per routing head: every position of the sequence drawn at the cluster it joined (x = position,
    /// y = cluster), filler grey, stored values and keys coloured, each question's key joined by a line to the
    /// stored key it needs — solid when the two share a routing group (the question can attend it), dotted when not.
    /// </summary>
    /// <param name="clusters">[head][position] cluster of each position (−1 = none).</param>
    /// <param name="groups">[head][position] routing group of each position (−1 = none).</param>
    public static void Clusters(string path, RecallTask task, RecallExample example, int[][] clusters, int[][] groups, int clusterCount, string subtitle)
    {
        int heads = clusters.Length, seqLen = example.Tokens.Length;
        var multiplot = new Multiplot();
        multiplot.AddPlots(heads);
        var plots = multiplot.GetPlots();
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Grid(heads, 1);
        var stored = new HashSet<int>(example.RecordPositions);
        var asked = new HashSet<int>(example.AnswerPositions);
        for (int h = 0; h < heads; h++)
        {
            var plot = plots[h];
            void Points(Func<int, bool> which, Color color, MarkerShape shape, float size, string legend)
            {
                var xs = new List<double>();
                var ys = new List<double>();
                for (int t = 0; t < seqLen; t++)
                    if (clusters[h][t] >= 0 && which(t)) { xs.Add(t); ys.Add(clusters[h][t]); }
                if (xs.Count == 0) return;
                var markers = plot.Add.Markers(xs.ToArray(), ys.ToArray(), shape, size, color);
                markers.LegendText = legend;
            }
            long Token(int t) => example.Tokens[t];
            bool IsKey(long token) => token >= RecallTask.FirstKey && token < task.FirstValue;
            bool IsValue(long token) => token >= task.FirstValue;
            Points(t => Token(t) == RecallTask.Filler, Colors.LightGray, MarkerShape.FilledCircle, 4, "filler");
            Points(t => IsValue(Token(t)), new Color(0xff, 0x7f, 0x0e), MarkerShape.FilledCircle, 6, "value");
            Points(t => IsKey(Token(t)) && !stored.Contains(t) && !asked.Contains(t), new Color(0x94, 0x67, 0xbd), MarkerShape.FilledCircle, 6, "stored key (not asked)");
            Points(t => Token(t) == RecallTask.Marker, Colors.Black, MarkerShape.Cross, 6, "?");
            Points(t => stored.Contains(t), LocalColor, MarkerShape.FilledSquare, 8, "stored key (asked later)");
            Points(t => asked.Contains(t), RoutingColor, MarkerShape.FilledTriangleUp, 9, "question key");
            for (int i = 0; i < example.AnswerPositions.Length; i++)
            {
                int a = example.AnswerPositions[i], r = example.RecordPositions[i];
                bool together = groups[h][a] >= 0 && groups[h][a] == groups[h][r];
                var link = plot.Add.Line(r, clusters[h][r], a, clusters[h][a]);
                link.LineColor = together ? new Color(0x2c, 0xa0, 0x2c) : Colors.Gray.WithAlpha(140);
                link.LineWidth = together ? 1.5f : 1;
                link.LinePattern = together ? LinePattern.Solid : LinePattern.Dotted;
                link.MarkerSize = 0;
            }
            int shared = Enumerable.Range(0, example.AnswerPositions.Length)
                .Count(i => groups[h][example.AnswerPositions[i]] >= 0 && groups[h][example.AnswerPositions[i]] == groups[h][example.RecordPositions[i]]);
            plot.Axes.SetLimits(-2, seqLen + 1, -0.7, clusterCount - 0.3);
            plot.Title($"routing head {h}: {shared} of {example.AnswerPositions.Length} questions share a group with their stored key (green lines)", 13);
            plot.XLabel("position", 12);
            plot.YLabel("cluster", 12);
            plot.ShowLegend(Edge.Bottom);
        }
        Save(multiplot, path, 1200, 40 + 380 * heads, "Routing clusters over one held-out sequence", subtitle);
    }

    private static double[] MovingAverage(List<double> values, int window)
    {
        var result = new double[values.Count];
        double sum = 0;
        for (int i = 0; i < values.Count; i++)
        {
            sum += values[i];
            if (i >= window) sum -= values[i - window];
            result[i] = sum / Math.Min(i + 1, window);
        }
        return result;
    }

    /// <summary>Renders the panels under a two-line header and writes the PNG atomically.</summary>
    internal static void Save(Multiplot multiplot, string path, int width, int plotsHeight, string title, string subtitle)
    {
        foreach (var plot in multiplot.GetPlots()) plot.Font.Set(SansSerif);
        int height = HeaderHeight + plotsHeight;
        using var surface = SKSurface.Create(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        var canvas = surface.Canvas;
        canvas.Clear(SKColors.White);
        using (var panels = SKSurface.Create(new SKImageInfo(width, plotsHeight, SKColorType.Rgba8888, SKAlphaType.Premul)))
        {
            multiplot.Render(panels);
            using var image = panels.Snapshot();
            canvas.DrawImage(image, 0, HeaderHeight);
        }
        using var paint = new SKPaint { Color = SKColors.Black, IsAntialias = true };
        foreach (var (text, y, size) in new[] { (title, 28f, 20f), (subtitle, 52f, 14f) })
        {
            using var font = new SKFont(SKTypeface.FromFamilyName(SansSerif) ?? SKTypeface.Default, size);
            while (font.Size > 8 && font.MeasureText(text) > width - 24) font.Size -= 1;   // shrink until it fits
            canvas.DrawText(text, 12, y, SKTextAlign.Left, font, paint);
        }
        using var snapshot = surface.Snapshot();
        using var png = snapshot.Encode(SKEncodedImageFormat.Png, 100);
        AtomicFile.WriteAllBytes(path, png.ToArray());
    }
}
