namespace SparseAttention.Cli;

/// <summary>One point of a run's log: <c>loss</c> (nats per token, training) with <c>bpc</c> (its bits per byte; absent in
/// logs of earlier versions, which trained bytes only: then loss / ln 2), or <c>val_bpc</c> (bits per byte) at a step.</summary>
internal readonly record struct LogPoint(long Step, double? Loss, double? ValBpc, double? Bpc = null)
{
    /// <summary>Training loss in bits per byte of the text.</summary>
    public double? TrainBits => Bpc ?? Loss / Math.Log(2);
}
