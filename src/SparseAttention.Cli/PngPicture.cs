using ScottPlot;
using SkiaSharp;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// How every PNG of the CLI is composed: the plot panels rendered on their own (a multiplot clears the whole canvas
/// it is given), centred under a two-line header — a title and a subtitle saying what is drawn, each shrunk until it
/// fits — in the shared sans-serif face, and written atomically.
/// </summary>
internal static class PngPicture
{
    /// <summary>Height of the title and subtitle band above the panels (pixels).</summary>
    public const int HeaderHeight = 64;
    /// <summary>Narrowest picture: room for the header text.</summary>
    private const int MinWidth = 720;

    /// <summary>Writes the panels of <paramref name="multiplot"/> (<paramref name="plotsWidth"/> × <paramref name="plotsHeight"/>
    /// pixels) under the header to <paramref name="path"/>.</summary>
    public static void Save(Multiplot multiplot, string path, int plotsWidth, int plotsHeight, string title, string subtitle) =>
        Save(multiplot.GetPlots(), surface => multiplot.Render(surface), path, plotsWidth, plotsHeight, title, subtitle);

    /// <summary>Writes one plot (<paramref name="plotWidth"/> × <paramref name="plotHeight"/> pixels) under the header.</summary>
    public static void Save(Plot plot, string path, int plotWidth, int plotHeight, string title, string subtitle) =>
        Save([plot], surface => plot.Render(surface), path, plotWidth, plotHeight, title, subtitle);

    private static void Save(IEnumerable<Plot> plots, Action<SKSurface> render, string path, int plotsWidth, int plotsHeight,
        string title, string subtitle)
    {
        foreach (var plot in plots) plot.Font.Set(PlotStyle.SansSerif);
        int width = Math.Max(plotsWidth, MinWidth), height = HeaderHeight + plotsHeight;
        using var surface = SKSurface.Create(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        var canvas = surface.Canvas;
        canvas.Clear(SKColors.White);
        using (var panels = SKSurface.Create(new SKImageInfo(plotsWidth, plotsHeight, SKColorType.Rgba8888, SKAlphaType.Premul)))
        {
            render(panels);
            using var image = panels.Snapshot();
            canvas.DrawImage(image, (width - plotsWidth) / 2f, HeaderHeight);
        }
        using var paint = new SKPaint { Color = SKColors.Black, IsAntialias = true };
        using var typeface = SKTypeface.FromFamilyName(PlotStyle.SansSerif) ?? SKTypeface.Default;
        foreach (var (text, y, size) in new[] { (title, 28f, 20f), (subtitle, 52f, 14f) })
        {
            using var font = new SKFont(typeface, size);
            while (font.Size > 8 && font.MeasureText(text) > width - 24) font.Size -= 1;             // shrink until it fits
            canvas.DrawText(text, 12, y, SKTextAlign.Left, font, paint);
        }
        using var snapshot = surface.Snapshot();
        using var png = snapshot.Encode(SKEncodedImageFormat.Png, 100);
        AtomicFile.WriteAllBytes(path, png.ToArray());
    }
}
