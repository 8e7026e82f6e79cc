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

/// <summary>One point of a run's log: <c>loss</c> (nats per token, training) with <c>bpc</c> (its bits per byte; absent in
/// logs of earlier versions, which trained bytes only: then loss / ln 2), or <c>val_bpc</c> (bits per byte) at a step.</summary>
internal readonly record struct LogPoint(long Step, double? Loss, double? ValBpc, double? Bpc = null)
{
    /// <summary>Training loss in bits per byte of the text.</summary>
    public double? TrainBits => Bpc ?? Loss / Math.Log(2);
}
