using ScottPlot;

namespace SparseAttention.Cli;

/// <summary>The demo's two PNGs: learning curves, and the routing clusters over one sequence.</summary>
internal static class DemoPictures
{
    private static readonly Color LocalColor = PlotStyle.Series(0);       // blue
    private static readonly Color RoutingColor = PlotStyle.Series(1);     // red

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
                PlotStyle.Line(plot, xs, ys, m.Name == "routing" ? RoutingColor : LocalColor, $"{m.Name} ({m.Parameters:N0} params)");
            }
            var chanceLine = plot.Add.HorizontalLine(chanceLevel, 1.5f, Colors.Gray, LinePattern.Dashed);
            chanceLine.LegendText = p == 0 ? "chance (ln V)" : "chance (1/V)";
            chanceLine.LabelText = "";
            if (p == 1) plot.Axes.SetLimitsY(0, 1.02);
            plot.Axes.SetLimitsX(0, Math.Max(1, steps));
            PlotStyle.Label(plot, title, $"training step (moving average of {window})", yLabel);
            plot.ShowLegend(p == 0 ? Alignment.UpperRight : Alignment.MiddleRight);   // clear of both curves
        }
        PngPicture.Save(multiplot, path, 1200, 480, "Learning curves: local attention vs routing attention", subtitle);
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
            Points(t => IsValue(Token(t)), PlotStyle.Series(3), MarkerShape.FilledCircle, 6, "value");
            Points(t => IsKey(Token(t)) && !stored.Contains(t) && !asked.Contains(t), PlotStyle.Series(4), MarkerShape.FilledCircle, 6, "stored key (not asked)");
            Points(t => Token(t) == RecallTask.Marker, Colors.Black, MarkerShape.Cross, 6, "?");
            Points(t => stored.Contains(t), LocalColor, MarkerShape.FilledSquare, 8, "stored key (asked later)");
            Points(t => asked.Contains(t), RoutingColor, MarkerShape.FilledTriangleUp, 9, "question key");
            for (int i = 0; i < example.AnswerPositions.Length; i++)
            {
                int a = example.AnswerPositions[i], r = example.RecordPositions[i];
                bool together = groups[h][a] >= 0 && groups[h][a] == groups[h][r];
                var link = plot.Add.Line(r, clusters[h][r], a, clusters[h][a]);
                link.LineColor = together ? PlotStyle.Series(2) : Colors.Gray.WithAlpha(140);
                link.LineWidth = together ? 1.5f : 1;
                link.LinePattern = together ? LinePattern.Solid : LinePattern.Dotted;
                link.MarkerSize = 0;
            }
            int shared = Enumerable.Range(0, example.AnswerPositions.Length)
                .Count(i => groups[h][example.AnswerPositions[i]] >= 0 && groups[h][example.AnswerPositions[i]] == groups[h][example.RecordPositions[i]]);
            plot.Axes.SetLimits(-2, seqLen + 1, -0.7, clusterCount - 0.3);
            PlotStyle.Label(plot, $"routing head {h}: {shared} of {example.AnswerPositions.Length} questions share a group with their stored key (green lines)",
                "position", "cluster", 13, 12);
            plot.ShowLegend(Edge.Bottom);
        }
        PngPicture.Save(multiplot, path, 1200, 40 + 380 * heads, "Routing clusters over one held-out sequence", subtitle);
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
}
