using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>
/// Next-token cross-entropy of a language model over held-out tokens: the one evaluation behind the trainer's
/// validation loss (<see cref="Trainer.ValidationLoss"/>, <see cref="Trainer.ValidationBitsByPosition"/>) and the CLI's
/// <c>eval</c>. Each window predicts its tokens 1..Length−1 from the tokens before them in the window.
/// </summary>
internal static class NextTokenEvaluation
{
    /// <summary>
    /// Runs <paramref name="model"/> (eval mode, no gradient; its mode is restored afterwards) on the
    /// <paramref name="windows"/> of <paramref name="data"/>, windows of one length together in batches of up to
    /// <paramref name="batchSize"/>, and sums the cross-entropy (float64) of every predicted token with the original
    /// bytes those tokens stand for.
    /// </summary>
    /// <param name="model">The model; batches go to the device of its parameters.</param>
    /// <param name="data">The held-out tokens.</param>
    /// <param name="windows">(start, length ≥ 2) of each window, in order.</param>
    /// <param name="batchSize">Most windows per forward pass.</param>
    /// <param name="natsByPosition">When given: nats added per predicted position (index t − 1 for position t).</param>
    /// <param name="bytesByPosition">When given: covered bytes added per predicted position (index t − 1).</param>
    public static ValidationResult Run(RoutingTransformerLM model, TokenText data, IReadOnlyList<(long Start, int Length)> windows, int batchSize,
        double[]? natsByPosition = null, long[]? bytesByPosition = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(windows);
        Check.Positive(batchSize, nameof(batchSize));
        foreach (var (start, length) in windows)
            Check.That(length >= 2 && start >= 0 && start + length <= data.Length, nameof(windows),
                $"each window needs length >= 2 inside the {data.Length} tokens, got start {start}, length {length}.");
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var noGrad = no_grad();
            var device = model.parameters().First().device;
            double nats = 0;
            long tokens = 0, bytes = 0;
            foreach (var sameLength in windows.GroupBy(w => w.Length))
            {
                var list = sameLength.ToList();
                int length = sameLength.Key;
                for (int first = 0; first < list.Count; first += batchSize)
                {
                    using var quiet = NoGcSection.Enter();                              // see NoGcSection: no collection mid-batch
                    using var scope = NewDisposeScope();
                    int b = Math.Min(batchSize, list.Count - first);
                    var ids = new long[b * length];
                    for (int i = 0; i < b; i++)
                        for (int t = 0; t < length; t++)
                        {
                            long at = list[first + i].Start + t;
                            ids[i * length + t] = data[at];
                            if (t == 0) continue;                                                  // predicted: positions 1..length−1
                            int covered = data.ByteLength(at);
                            bytes += covered;
                            if (bytesByPosition is not null) bytesByPosition[t - 1] += covered;
                        }
                    var batch = tensor(ids, new long[] { b, length }, device: device);                  // (B, T)
                    var logits = model.forward(batch, null).Logits;                                      // (B, T, V)
                    var predictions = logits.narrow(1, 0, length - 1).reshape(-1, logits.shape[2]).to(ScalarType.Float64);   // (B·(T−1), V)
                    var targets = batch.narrow(1, 1, length - 1).reshape(-1);                            // (B·(T−1))
                    var perPosition = nn.functional.cross_entropy(predictions, targets, reduction: nn.Reduction.None)
                        .reshape(b, length - 1).sum(0L);                                                 // (T−1)
                    var values = perPosition.cpu().data<double>().ToArray();
                    for (int i = 0; i < values.Length; i++)
                    {
                        nats += values[i];
                        if (natsByPosition is not null) natsByPosition[i] += values[i];
                    }
                    tokens += (long)b * (length - 1);
                }
            }
            return new ValidationResult(nats, tokens, bytes);
        }
        finally { model.train(wasTraining); }
    }
}
