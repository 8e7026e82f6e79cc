using ScottPlot;
using SkiaSharp;

namespace SparseAttention.Cli;

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
