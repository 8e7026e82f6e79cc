using System.CommandLine;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn plot curves</c> (learning curves from a run's log.jsonl), <c>sparse-attn plot attention</c>
/// (which keys each query may attend, per layer and head, on a given text; routing clusters as colours) and
/// <c>sparse-attn plot positions</c> (bpc by position in the window from eval --json outputs).
/// </summary>
internal static class PlotCommand
{
    public static Command Create()
    {
        var command = new Command("plot", "Pictures of a training run (curves), of a trained model's attention on a text (attention) and of bpc by position in the window (positions).");
        command.Add(CurvesCommand.Create());
        command.Add(AttentionPlotCommand.Create());
        command.Add(PositionsPlotCommand.Create());
        return command;
    }
}
