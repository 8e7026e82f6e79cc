using ScottPlot;

namespace SparseAttention.Cli;

/// <summary>compare.png: validation bpc against training time and against tokens, and bpc by position in the window.</summary>
internal static class ComparePictures
{
    private static readonly Color[] Palette =
    [
        new(0x1f, 0x77, 0xb4), new(0xd6, 0x27, 0x28), new(0x2c, 0xa0, 0x2c), new(0xff, 0x7f, 0x0e),
        new(0x94, 0x67, 0xbd), new(0x8c, 0x56, 0x4b), new(0xe3, 0x77, 0xc2), new(0x7f, 0x7f, 0x7f),
    ];

    public static void Curves(string path, IReadOnlyList<(string Name, List<CompareCommand.Point> Log, CompareCommand.Result Result)> runs, CompareCommand.Plan plan)
    {
        var multiplot = new Multiplot();
        multiplot.AddPlots(3);
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Grid(1, 3);
        var plots = multiplot.GetPlots();
        var panels = new (string Title, string XLabel, Func<CompareCommand.Point, double> X)[]
        {
            plan.BudgetCpuMinutes is null
                ? ("val bpc against training time", "training time (minutes; evaluation excluded)", p => p.TrainSeconds / 60)
                : ("val bpc against CPU time", "CPU time of training steps (minutes)", p => (p.CpuSeconds ?? double.NaN) / 60),
            ("val bpc against tokens", "training tokens (millions)", p => p.Tokens / 1e6),
        };
        // The first evaluation (untrained, ~8 bpc) would squash the interesting part of the curves.
        double top = runs.SelectMany(r => r.Log.Where(p => p.Step > 0).Select(p => p.ValBpc)).DefaultIfEmpty(8).Max();
        double bottom = runs.SelectMany(r => r.Log.Select(p => p.ValBpc).Concat(r.Result.BpcByPosition)).Min();
        for (int i = 0; i < 2; i++)
        {
            var (title, xLabel, x) = panels[i];
            for (int r = 0; r < runs.Count; r++)
            {
                var line = plots[i].Add.ScatterLine(runs[r].Log.Select(x).ToArray(), runs[r].Log.Select(p => p.ValBpc).ToArray(), Palette[r % Palette.Length]);
                line.LineWidth = 2;
                line.MarkerSize = 4;
                line.LegendText = $"{runs[r].Name} ({runs[r].Result.Parameters:N0} params)";
            }
            plots[i].Axes.SetLimitsY(bottom - 0.05, top + 0.05);
            plots[i].Title(title, 14);
            plots[i].XLabel(xLabel, 13);
            plots[i].YLabel("validation bits per byte", 13);
            plots[i].ShowLegend(Alignment.UpperRight);
        }
        var byPos = plots[2];
        for (int r = 0; r < runs.Count; r++)
        {
            var bits = runs[r].Result.BpcByPosition;
            int size = runs[r].Result.BucketSize;
            var xs = Enumerable.Range(0, bits.Length).Select(k => (k + 0.5) * size).ToArray();
            var line = byPos.Add.ScatterLine(xs, bits, Palette[r % Palette.Length]);
            line.LineWidth = 2;
            line.MarkerSize = 6;
            line.LegendText = runs[r].Name;
        }
        byPos.Title("bpc by position in the window (final models)", 14);
        byPos.XLabel($"position of the predicted byte (buckets of {runs[0].Result.BucketSize})", 13);
        byPos.YLabel("bits per byte", 13);
        byPos.ShowLegend(Alignment.UpperRight);
        DemoPictures.Save(multiplot, path, 1800, 520, $"compare: {plan.Describe()} each",
            $"{Path.GetFileName(plan.Data)}, seq_len {plan.Options.SeqLen}, batch {plan.Options.BatchSize}, seed {plan.Options.Seed}, " +
            $"{plan.Options.EvalBatches * plan.Options.BatchSize} held-out windows; {DateTime.UtcNow:yyyy-MM-dd}");
    }
}
