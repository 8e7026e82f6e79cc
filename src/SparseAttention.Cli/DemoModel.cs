using System.Diagnostics;
using SparseAttention.Model;
using SparseAttention.Training;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>One of the two demo models with its optimizer, timings and learning curve.</summary>
internal sealed class DemoModel : IDisposable
{
    private readonly TrainingStep trainingStep;
    private readonly DemoSettings settings;
    private readonly Stopwatch clock = new();

    public string Name { get; }
    public RoutingTransformerLM Model { get; }
    public long Parameters { get; }
    /// <summary>Training loss (answers only, nats) of every step.</summary>
    public List<double> Losses { get; } = [];
    /// <summary>Answer accuracy on every step's batch, measured before the step learns from it (fresh sequences).</summary>
    public List<double> Accuracies { get; } = [];
    public double TrainSeconds => clock.Elapsed.TotalSeconds;
    /// <summary>Steps done.</summary>
    public int Steps => Losses.Count;

    /// <summary>Steps done and the mean loss and accuracy of the last <paramref name="n"/> steps.</summary>
    public (int Steps, double Loss, double Accuracy) Recent(int n)
    {
        if (Losses.Count == 0) return (0, double.NaN, double.NaN);
        int from = Math.Max(0, Losses.Count - n);
        return (Losses.Count, Losses.Skip(from).Average(), Accuracies.Skip(from).Average());
    }

    public DemoModel(string name, bool routing, DemoSettings settings)
    {
        Name = name;
        this.settings = settings;
        random.manual_seed(settings.Seed);          // same seed: both models start from comparable weights
        Model = new RoutingTransformerLM(settings.Config(routing));
        Parameters = Model.parameters().Sum(p => p.numel());
        trainingStep = new TrainingStep(Model, settings.LearningRate, weightDecay: 0.01);
    }

    /// <summary>The routing head groups (empty for the local model).</summary>
    public IReadOnlyList<RoutingHeadGroup> RoutingGroups => Model.modules().OfType<RoutingHeadGroup>().ToList();

    /// <summary>Learning rate at <paramref name="step"/>: linear warm-up over 5 % of the steps, then cosine to a tenth.</summary>
    public double LearningRateAt(int step)
    {
        int warmup = Math.Max(1, settings.Steps / 20);
        if (step < warmup) return settings.LearningRate * (step + 1) / warmup;
        double progress = (double)(step - warmup) / Math.Max(1, settings.Steps - warmup);
        return settings.LearningRate * (0.1 + 0.9 * 0.5 * (1 + Math.Cos(Math.PI * Math.Min(1, progress))));
    }

    /// <summary>One optimizer step on (tokens, targets); then the k-means centroids move (one EMA step).</summary>
    public void TrainStep(Tensor tokens, Tensor targets, int step)
    {
        clock.Start();
        try
        {
            using var scope = NewDisposeScope();
            var (logits, loss) = trainingStep.Run(tokens, targets, LearningRateAt(step), clipNorm: 1.0);   // (B, T, V), scalar
            double l = loss.item<float>();
            if (!double.IsFinite(l)) throw new InvalidOperationException($"{Name}: training loss became {l} at step {step + 1}.");
            var (correct, total) = Accuracy(logits.detach(), targets);
            Losses.Add(l);
            Accuracies.Add(correct / (double)Math.Max(1, total));
        }
        finally { clock.Stop(); }
    }

    /// <summary>Argmax predictions scored at the positions whose target is not −100: (correct, scored).</summary>
    public static (long Correct, long Total) Accuracy(Tensor logits, Tensor targets)
    {
        using var scope = NewDisposeScope();
        long seqLen = logits.shape[1];
        var predicted = logits.narrow(1, 0, seqLen - 1).argmax(-1);                      // (B, T − 1)
        var expected = targets.narrow(1, 1, seqLen - 1);                                 // (B, T − 1)
        var scored = expected.ne(-100);
        long correct = predicted.eq(expected).logical_and(scored).sum().item<long>();
        return (correct, scored.sum().item<long>());
    }

    /// <summary>Predicted next tokens (B, T) in eval mode, no gradients.</summary>
    public Tensor Predict(Tensor tokens)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        Model.eval();
        var (logits, _) = Model.forward(tokens);                                          // (B, T, V)
        return logits.argmax(-1).MoveToOuterDisposeScope();                              // (B, T)
    }

    public void Dispose()
    {
        trainingStep.Dispose();
        Model.Dispose();
    }
}
