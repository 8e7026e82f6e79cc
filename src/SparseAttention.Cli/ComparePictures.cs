using ScottPlot;

namespace SparseAttention.Cli;

/// <summary>compare.png: validation bpc against training time and against tokens, and bpc by position in the window.</summary>
internal static class ComparePictures
{
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
                PlotStyle.Line(plots[i], runs[r].Log.Select(x).ToArray(), runs[r].Log.Select(p => p.ValBpc).ToArray(), PlotStyle.Series(r),
                    $"{runs[r].Name} ({runs[r].Result.Parameters:N0} params)", markerSize: 4);
            }
            plots[i].Axes.SetLimitsY(bottom - 0.05, top + 0.05);
            PlotStyle.Label(plots[i], title, xLabel, "validation bits per byte");
            plots[i].ShowLegend(Alignment.UpperRight);
        }
        var byPos = plots[2];
        for (int r = 0; r < runs.Count; r++)
        {
            var bits = runs[r].Result.BpcByPosition;
            int size = runs[r].Result.BucketSize;
            var xs = Enumerable.Range(0, bits.Length).Select(k => (k + 0.5) * size).ToArray();
            PlotStyle.Line(byPos, xs, bits, PlotStyle.Series(r), runs[r].Name, markerSize: 6);
        }
        PlotStyle.Label(byPos, "bpc by position in the window (final models)", $"position of the predicted byte (buckets of {runs[0].Result.BucketSize})", "bits per byte");
        byPos.ShowLegend(Alignment.UpperRight);
        PngPicture.Save(multiplot, path, 1800, 520, $"compare: {plan.Describe()} each",
            $"{Path.GetFileName(plan.Data)}, seq_len {plan.Options.SeqLen}, batch {plan.Options.BatchSize}, seed {plan.Options.Seed}, " +
            $"{plan.Options.EvalBatches * plan.Options.BatchSize} held-out windows; {DateTime.UtcNow:yyyy-MM-dd}");
    }
}
