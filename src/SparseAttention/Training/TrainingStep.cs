using SparseAttention.Clustering;
using SparseAttention.Model;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>
/// The optimizer step of a <see cref="RoutingTransformerLM"/>, shared by every training loop (the <see cref="Trainer"/>,
/// the CLI's demo and its model bench): forward → next-token loss + auxiliary loss → backward → (optionally) a finite
/// check of the loss and gradient norm → gradient clipping → learning rate → AdamW step → k-means update
/// (<see cref="OnlineKMeans.UpdateAll"/>). Owns the AdamW optimizer, not the model.
/// </summary>
/// <remarks>One micro-batch per step: <see cref="Run"/>. Gradient accumulation: <see cref="Begin"/>, then
/// <see cref="Backward"/> once per micro-batch, then <see cref="Apply"/>.</remarks>
internal sealed class TrainingStep : IDisposable
{
    private readonly RoutingTransformerLM model;

    /// <summary>AdamW over all the model's parameters (its state is saved in checkpoints).</summary>
    public AdamW Optimizer { get; }

    /// <param name="model">The model to train (its parameters must already be on their device).</param>
    /// <param name="learningRate">AdamW's initial learning rate (each <see cref="Apply"/> sets the step's own).</param>
    /// <param name="weightDecay">AdamW weight decay, applied to every parameter.</param>
    public TrainingStep(RoutingTransformerLM model, double learningRate, double weightDecay)
    {
        this.model = model;
        Optimizer = optim.AdamW(model.parameters(), learningRate, weight_decay: weightDecay);
    }

    /// <summary>Starts a step: training mode, gradients cleared.</summary>
    public void Begin()
    {
        model.train();
        Optimizer.zero_grad();
    }

    /// <summary>One micro-batch: forward of <paramref name="tokens"/> (B, T), next-token cross-entropy against
    /// <paramref name="targets"/> (B, T) (default the tokens; −100 = not scored), plus the auxiliary loss, and the
    /// backward of that total ÷ <paramref name="accumulation"/>. The tensors returned belong to the caller's dispose scope.</summary>
    /// <returns>Logits (B, T, V), the next-token loss (scalar) and the total backpropagated before the division (scalar).</returns>
    public (Tensor Logits, Tensor Loss, Tensor Total) Backward(Tensor tokens, Tensor? targets = null, int accumulation = 1)
    {
        var (logits, aux) = model.forward(tokens, null);                                  // (B, T, V)
        var loss = LanguageModelLoss.NextToken(logits, targets ?? tokens);
        var total = loss + aux;
        (total / accumulation).backward();
        return (logits, loss, total);
    }

    /// <summary>
    /// Ends a step. With <paramref name="skipNonFinite"/>, when <paramref name="total"/> (the summed total loss) or the
    /// gradient norm is not finite, the gradients and the pending k-means statistics are discarded and nothing is updated.
    /// Otherwise: clipping to a global norm of <paramref name="clipNorm"/> (0 = none), the learning rate, the AdamW step
    /// and the k-means update.
    /// </summary>
    /// <returns>The global gradient norm before clipping (only measured with <paramref name="skipNonFinite"/>; NaN
    /// otherwise) and whether the step was skipped.</returns>
    public (double GradNorm, bool Skipped) Apply(double learningRate, double clipNorm, bool skipNonFinite = false, double total = 0)
    {
        double gradNorm = double.NaN;
        if (skipNonFinite)
        {
            gradNorm = GradientNorm();
            if (!double.IsFinite(total) || !double.IsFinite(gradNorm))
            {
                Optimizer.zero_grad();
                foreach (var kmeans in OnlineKMeans.All(model)) kmeans.DiscardPendingStatistics();
                return (gradNorm, true);
            }
        }
        if (clipNorm > 0) nn.utils.clip_grad_norm_(model.parameters(), clipNorm);
        foreach (var group in Optimizer.ParamGroups) group.LearningRate = learningRate;
        Optimizer.step();
        OnlineKMeans.UpdateAll(model);
        return (gradNorm, false);
    }

    /// <summary>A whole step on one micro-batch (<see cref="Begin"/>, <see cref="Backward"/>, <see cref="Apply"/>
    /// without the finite check); returns the logits (B, T, V) and the next-token loss, in the caller's dispose scope.</summary>
    public (Tensor Logits, Tensor Loss) Run(Tensor tokens, Tensor? targets, double learningRate, double clipNorm)
    {
        using var quiet = NoGcSection.Enter();                                         // see NoGcSection: no collection mid-step
        Begin();
        var (logits, loss, _) = Backward(tokens, targets);
        Apply(learningRate, clipNorm);
        return (logits, loss);
    }

    /// <summary>Global L2 norm of the parameters' gradients (float64 accumulation; NaN/∞ propagate).</summary>
    private double GradientNorm()
    {
        using var scope = NewDisposeScope();
        double sumSquares = 0;
        foreach (var p in model.parameters())
            if (p.grad is Tensor g) sumSquares += g.to(ScalarType.Float64).pow(2).sum().item<double>();
        return Math.Sqrt(sumSquares);
    }

    public void Dispose() => Optimizer.Dispose();
}
