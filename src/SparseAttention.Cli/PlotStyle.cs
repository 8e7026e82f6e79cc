using ScottPlot;
using SkiaSharp;

namespace SparseAttention.Cli;

/// <summary>Fonts, colours, labels and legend entries shared by the plots.</summary>
internal static class PlotStyle
{
    /// <summary>A sans-serif family installed here (the platform default is often a serif face).</summary>
    public static readonly string SansSerif =
        new[] { "DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial", "Helvetica" }
            .FirstOrDefault(f => SKFontManager.Default.MatchFamily(f)?.FamilyName == f) ?? Fonts.Default;

    /// <summary>Colours of the data series in order (blue, red, green, orange, purple, brown, pink, grey).</summary>
    private static readonly Color[] SeriesColors =
    [
        new(0x1f, 0x77, 0xb4), new(0xd6, 0x27, 0x28), new(0x2c, 0xa0, 0x2c), new(0xff, 0x7f, 0x0e),
        new(0x94, 0x67, 0xbd), new(0x8c, 0x56, 0x4b), new(0xe3, 0x77, 0xc2), new(0x7f, 0x7f, 0x7f),
    ];

    /// <summary>Colour of data series <paramref name="i"/> (8 colours, then repeating).</summary>
    public static Color Series(int i) => SeriesColors[i % SeriesColors.Length];

    /// <summary>Colour of cluster <paramref name="c"/> (20 distinct colours, then repeating).</summary>
    public static Color Cluster(int c) => new ScottPlot.Palettes.Category20().GetColor(c);

    /// <summary>Title and axis labels of one panel.</summary>
    public static void Label(Plot plot, string title, string xLabel, string yLabel, float titleSize = 14, float labelSize = 13)
    {
        plot.Title(title, titleSize);
        plot.XLabel(xLabel, labelSize);
        plot.YLabel(yLabel, labelSize);
    }

    /// <summary>A line (with markers of <paramref name="markerSize"/>, 0 = none) named <paramref name="legend"/> in the legend.</summary>
    public static ScottPlot.Plottables.Scatter Line(Plot plot, double[] xs, double[] ys, Color color, string legend, float lineWidth = 2, float markerSize = 0)
    {
        var line = plot.Add.ScatterLine(xs, ys, color);
        line.LineWidth = lineWidth;
        line.MarkerSize = markerSize;
        line.LegendText = legend;
        return line;
    }
}
