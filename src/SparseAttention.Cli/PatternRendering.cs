using System.Text;
using System.Text.Json;
using ScottPlot;
using SparseAttention.Patterns;

namespace SparseAttention.Cli;

/// <summary>Renders a compiled <see cref="BlockMask"/> as text (ASCII), JSON or a PNG image.</summary>
internal static class PatternRendering
{
    /// <summary>
    /// Every drawn head's block layout, one row per query block: '█' all pairs allowed, '▒' some,
    /// '·' none. Unlike <see cref="BlockMask.ToAscii"/>, identical heads are drawn out rather than
    /// collapsed into "same as head h", so each head is always NumBlocks rows.
    /// </summary>
    public static string Ascii(BlockMask mask, int maxHeads)
    {
        var sb = new StringBuilder();
        sb.AppendLine($"{mask.Name}: seq_len={mask.SeqLen} block={mask.BlockSize} heads={mask.Heads} " +
                      $"sparsity={mask.Sparsity:F3} visited blocks={mask.BlockDensity:P1}");
        sb.AppendLine("rows = query blocks, columns = key blocks; █ all pairs allowed, ▒ some allowed, · none");
        int drawn = Math.Min(mask.Heads, maxHeads);
        for (int h = 0; h < drawn; h++)
        {
            sb.AppendLine($"head {h}:");
            var row = new char[mask.NumBlocks];
            for (int qb = 0; qb < mask.NumBlocks; qb++)
            {
                Array.Fill(row, '·');
                var keyBlocks = mask.KeyBlocks(h, qb);
                for (int i = 0; i < keyBlocks.Length; i++) row[keyBlocks[i]] = mask.IsPartial(h, qb, i) ? '▒' : '█';
                sb.Append("  ").Append(row).AppendLine();
            }
        }
        if (drawn < mask.Heads) sb.AppendLine($"({mask.Heads - drawn} more heads not drawn; see --max-heads)");
        return sb.ToString();
    }

    /// <summary>
    /// <c>{"kind", "seq_len", "block", "heads", "causal", "sparsity", "layout", "mask"}</c>: layout is
    /// [head][query block][key block] from <see cref="BlockMask.Layout"/>, mask is [head][query][key] from
    /// <see cref="BlockMask.ToDense"/>, both as 0/1.
    /// </summary>
    public static string Json(BlockMask mask, string kind)
    {
        using var stream = new MemoryStream();
        using (var w = new Utf8JsonWriter(stream))
        {
            w.WriteStartObject();
            w.WriteString("kind", kind);
            w.WriteNumber("seq_len", mask.SeqLen);
            w.WriteNumber("block", mask.BlockSize);
            w.WriteNumber("heads", mask.Heads);
            w.WriteBoolean("causal", mask.IsCausal);
            w.WriteNumber("sparsity", mask.Sparsity);

            w.WriteStartArray("layout");
            for (int h = 0; h < mask.Heads; h++)
            {
                var layout = mask.Layout(h);                 // (NumBlocks, NumBlocks)
                w.WriteStartArray();
                for (int qb = 0; qb < mask.NumBlocks; qb++)
                {
                    w.WriteStartArray();
                    for (int kb = 0; kb < mask.NumBlocks; kb++) w.WriteNumberValue(layout[qb, kb] ? 1 : 0);
                    w.WriteEndArray();
                }
                w.WriteEndArray();
            }
            w.WriteEndArray();

            var dense = DenseMask(mask);                     // (H, T, T) flattened
            int t = mask.SeqLen;
            w.WriteStartArray("mask");
            for (int h = 0; h < mask.Heads; h++)
            {
                w.WriteStartArray();
                for (int q = 0; q < t; q++)
                {
                    w.WriteStartArray();
                    long row = ((long)h * t + q) * t;
                    for (int k = 0; k < t; k++) w.WriteNumberValue(dense[row + k] ? 1 : 0);
                    w.WriteEndArray();
                }
                w.WriteEndArray();
            }
            w.WriteEndArray();
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.GetBuffer(), 0, (int)stream.Length) + Environment.NewLine;
    }

    /// <summary>The token-level mask <see cref="BlockMask.ToDense"/>, (H, T, T) flattened, true = may attend.</summary>
    public static bool[] DenseMask(BlockMask mask)
    {
        using var dense = mask.ToDense();
        return dense.data<bool>().ToArray();
    }

    /// <summary>Most cells drawn per axis; longer sequences are pooled (a cell's shade = fraction allowed).</summary>
    private const int MaxCellsPerAxis = 1024;
    private const int PanelSize = 440;

    /// <summary>
    /// Saves the token-level mask as a PNG, one panel per head (at most <paramref name="maxHeads"/>):
    /// x = key, y = query with query 0 at the top, allowed cells dark.
    /// </summary>
    public static void Png(BlockMask mask, string path, int maxHeads)
    {
        int t = mask.SeqLen;
        int panels = Math.Min(mask.Heads, maxHeads);
        int columns = Math.Min(panels, 4), rows = (panels + columns - 1) / columns;
        int pool = (t + MaxCellsPerAxis - 1) / MaxCellsPerAxis;   // tokens per drawn cell
        int cells = (t + pool - 1) / pool;
        var dense = DenseMask(mask);

        var multiplot = new Multiplot();
        multiplot.AddPlots(panels);
        var plots = multiplot.GetPlots();
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Grid(rows, columns);
        for (int h = 0; h < panels; h++)
        {
            var intensities = new double[cells, cells];          // [query cell, key cell] = fraction allowed
            for (int q = 0; q < t; q++)
            {
                long row = ((long)h * t + q) * t;
                for (int k = 0; k < t; k++)
                    if (dense[row + k]) intensities[q / pool, k / pool] += 1;
            }
            for (int i = 0; i < cells; i++)
                for (int j = 0; j < cells; j++)
                {
                    int qs = Math.Min(t, (i + 1) * pool) - i * pool, ks = Math.Min(t, (j + 1) * pool) - j * pool;
                    intensities[i, j] /= qs * ks;
                }

            var plot = plots[h];
            var heatmap = plot.Add.Heatmap(intensities);
            heatmap.Colormap = new ScottPlot.Colormaps.GrayscaleReversed(); // 0 = white, 1 = black
            heatmap.ManualRange = new ScottPlot.Range(0, 1);
            heatmap.CellAlignment = Alignment.LowerLeft;                   // cell i spans [i·pool, (i+1)·pool)
            heatmap.CellWidth = pool;
            heatmap.CellHeight = pool;
            if (mask.NumBlocks > 1 && mask.NumBlocks <= 32)
            {
                var gridColor = Colors.SteelBlue.WithAlpha(90);
                for (int b = 1; b < mask.NumBlocks; b++)
                {
                    var v = plot.Add.VerticalLine(b * mask.BlockSize, 1, gridColor);
                    var hl = plot.Add.HorizontalLine(b * mask.BlockSize, 1, gridColor);
                    v.LabelText = hl.LabelText = "";
                }
            }
            plot.Axes.SetLimits(0, t, t, 0);                               // bottom = t, top = 0: query 0 at the top
            plot.Axes.SquareUnits();
            plot.HideGrid();
            PlotStyle.Label(plot, $"head {h}", "key", "query");
        }

        string subtitle = $"seq_len={t}  block={mask.BlockSize}  heads={mask.Heads}  sparsity={mask.Sparsity:F3}  " +
                          $"visited blocks={mask.BlockDensity:P1}  (dark = may attend" +
                          (pool > 1 ? $"; {pool}×{pool} tokens per cell" : "") +
                          (panels < mask.Heads ? $"; {panels} of {mask.Heads} heads drawn" : "") + ")";
        PngPicture.Save(multiplot, path, columns * PanelSize, rows * PanelSize, mask.Name, subtitle);
    }
}
