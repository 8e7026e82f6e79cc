using System.CommandLine;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn plot curves</c> (learning curves from a run's log.jsonl) and <c>sparse-attn plot attention</c>
/// (which keys each query may attend, per layer and head, on a given text; routing clusters as colours).
/// </summary>
internal static class PlotCommand
{
    public static Command Create()
    {
        var command = new Command("plot", "Pictures of a training run (curves) and of a trained model's attention on a text (attention).");
        command.Add(CurvesCommand.Create());
        command.Add(AttentionPlotCommand.Create());
        return command;
    }
}
