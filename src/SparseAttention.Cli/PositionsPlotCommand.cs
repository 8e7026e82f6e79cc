using System.CommandLine;
using System.Text.Json;
using ScottPlot;

namespace SparseAttention.Cli;

/// <summary><c>sparse-attn plot positions</c>: bpc by position in the window, one line per <c>eval --json</c> output —
/// whether a model predicts late positions of its window better than early ones, i.e. uses long context.</summary>
internal sealed class PositionsPlotCommand
{
    private readonly Option<string[]> evalOption = new("--eval") { HelpName = "FILE.json", Description = "Output of eval --json (repeat for several models; each line is named after its file).", Required = true };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.png", Description = "PNG to write.", Required = true };

    public static Command Create()
    {
        var self = new PositionsPlotCommand();
        var command = new Command("positions", "bpc by position in the context window from eval --json outputs (one line per model): lower bpc at later positions means the model uses long context.");
        command.Add(self.evalOption);
        command.Add(self.outOption);
        command.SetAction(self.Execute);
        return command;
    }

    /// <summary>Bucket size and bpc per bucket of an eval --json output; errors name --eval and the file.</summary>
    internal static (int BucketSize, double?[] Bpc) Read(string path)
    {
        if (!File.Exists(path)) throw new CliUsageException($"--eval: no such file: {path} (give the output of eval --json).");
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var root = doc.RootElement;
            int bucketSize = root.GetProperty("bucket_size").GetInt32();
            var bpc = root.GetProperty("bpc_by_position").EnumerateArray()
                          .Select(e => e.ValueKind == JsonValueKind.Number ? e.GetDouble() : (double?)null).ToArray();
            if (bucketSize <= 0 || bpc.Length == 0) throw new FormatException("bucket_size must be > 0 and bpc_by_position not empty");
            return (bucketSize, bpc);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            throw new CliUsageException($"--eval: {path} is not an output of eval --json with bpc_by_position ({e.Message}).");
        }
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        var files = parse.GetValue(evalOption)!;
        var plot = new Plot();
        for (int i = 0; i < files.Length; i++)
        {
            var (bucketSize, bpc) = Read(files[i]);
            var points = bpc.Select((b, k) => (Start: (double)k * bucketSize, Bpc: b)).Where(p => p.Bpc is not null).ToArray();
            PlotStyle.Line(plot, [.. points.Select(p => p.Start)], [.. points.Select(p => p.Bpc!.Value)], PlotStyle.Series(i),
                Path.GetFileNameWithoutExtension(files[i]), markerSize: 6);
        }
        PlotStyle.Label(plot, "", "position in the window (start of the bucket)", "bits per byte of text");
        plot.ShowLegend(Alignment.UpperRight);
        string outPath = parse.GetValue(outOption)!;
        PngPicture.Save(plot, outPath, 900, 540 - PngPicture.HeaderHeight, "bpc by position in the context window",
            string.Join(", ", files.Select(Path.GetFileName)));
        output.WriteLine($"wrote {outPath}: {files.Length} model(s)");
        return CliApp.Ok;
    }
}
