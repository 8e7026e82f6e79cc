using ScottPlot;

namespace SparseAttention.Cli;

internal static class AttentionRendering
{
    private const int PanelSize = 360;

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
            ClusterHeatmap(plot, values, clusters);
            plot.Axes.SetLimits(0, t, t, 0);
            plot.Axes.SquareUnits();
            double density = h.Allowed.Count(a => a) / (double)(t * (t + 1) / 2);
            PlotStyle.Label(plot, $"layer {h.Layer} head {h.Head} ({h.Kind.ToString().ToLowerInvariant()}, {density:P0} of causal pairs)", "key", "query", 12, 11);
        }
        PngPicture.Save(multiplot, path, columns * PanelSize, layers * PanelSize, title,
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
        ClusterHeatmap(plot, values, clusters);
        plot.Axes.SetLimits(0, t, rows, 0);
        plot.Axes.Left.SetTicks(Enumerable.Range(0, rows).Select(r => r + 0.5).ToArray(),
                                routing.Select(h => $"L{h.Layer} H{h.Head}").ToArray());
        if (t <= 160)
        {
            var characters = tokens.Select(s => string.Concat(s.Select(c => c is >= ' ' and < '\x7f' ? c : '·'))).ToArray();
            plot.Axes.Bottom.SetTicks(Enumerable.Range(0, t).Select(i => i + 0.5).ToArray(), characters);
        }
        plot.XLabel("position (text below)", 12);
        int width = Math.Max(900, Math.Min(2400, 12 * t + 120)), height = 120 + 36 * rows;
        PngPicture.Save(multiplot, path, width, height, title, $"T = {t}; colour = cluster of the group the position's query joined ({clusters} clusters per head), white = none");
    }

    /// <summary>Draws <paramref name="values"/> (cluster + 1 per cell, NaN = not attended) with one colour per cluster.</summary>
    private static void ClusterHeatmap(Plot plot, double[,] values, int clusters)
    {
        var heatmap = plot.Add.Heatmap(values);
        heatmap.Colormap = new ClusterColormap(clusters);
        heatmap.ManualRange = new ScottPlot.Range(0, clusters);
        heatmap.NaNCellColor = Colors.White;
        heatmap.CellAlignment = Alignment.LowerLeft;
        plot.HideGrid();
    }
}
