using System.CommandLine;
using System.Text.Json;
using ScottPlot;

namespace SparseAttention.Cli;

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
        if (train.Count > 0)
            PlotStyle.Line(plot, train.Select(p => (double)p.Step).ToArray(), train.Select(p => p.TrainBits!.Value).ToArray(), Colors.SteelBlue,
                "training loss (bits/byte)", lineWidth: 1.5f);
        if (val.Count > 0)
            PlotStyle.Line(plot, val.Select(p => (double)p.Step).ToArray(), val.Select(p => p.ValBpc!.Value).ToArray(), Colors.OrangeRed,
                "validation bits/byte", markerSize: 6);
        PlotStyle.Label(plot, "", "optimizer step", "bits per byte of text");
        plot.ShowLegend(Alignment.UpperRight);
        string outPath = parse.GetValue(outOption)!;
        string runName = Path.GetFileName(Path.GetDirectoryName(Path.GetFullPath(log)))!;
        PngPicture.Save(plot, outPath, 900, 540 - PngPicture.HeaderHeight, $"Learning curves — {runName}",
            $"{log}: {train.Count} training points, {val.Count} validation points");
        output.WriteLine($"wrote {outPath}: {train.Count} training points, {val.Count} validation points" +
                         (val.Count > 0 ? $" (val_bpc {val[0].ValBpc:F3} at step {val[0].Step} → {val[^1].ValBpc:F3} at step {val[^1].Step})" : ""));
        return CliApp.Ok;
    }
}
