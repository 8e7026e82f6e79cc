using System.Text.Json.Serialization;

namespace SparseAttention.Training;

/// <summary>Hyperparameters of a training run (everything that shapes the loss curve besides the model configuration).</summary>
public sealed record TrainingOptions
{
    /// <summary>256 — tokens per training window (≤ the model's max_seq_len).</summary>
    [JsonPropertyName("seq_len")] public int SeqLen { get; init; } = 256;
    /// <summary>16 — windows per micro-batch.</summary>
    [JsonPropertyName("batch_size")] public int BatchSize { get; init; } = 16;
    /// <summary>1 — micro-batches whose gradients are accumulated into one optimizer step.</summary>
    [JsonPropertyName("accumulation")] public int Accumulation { get; init; } = 1;
    /// <summary>1e-3 — peak learning rate (AdamW).</summary>
    [JsonPropertyName("lr")] public double LearningRate { get; init; } = 1e-3;
    /// <summary>0.1 — the cosine schedule ends at this fraction of the peak learning rate.</summary>
    [JsonPropertyName("min_lr_ratio")] public double MinLrRatio { get; init; } = 0.1;
    /// <summary>100 — steps of linear warm-up from 0 to the peak learning rate.</summary>
    [JsonPropertyName("warmup_steps")] public int WarmupSteps { get; init; } = 100;
    /// <summary>5000 — step at which the cosine decay reaches its floor (stays there afterwards).</summary>
    [JsonPropertyName("decay_steps")] public int DecaySteps { get; init; } = 5000;
    /// <summary>0.01 — AdamW weight decay (applied to every parameter).</summary>
    [JsonPropertyName("weight_decay")] public double WeightDecay { get; init; } = 0.01;
    /// <summary>1.0 — gradient clipping: maximum global L2 norm; 0 = no clipping.</summary>
    [JsonPropertyName("clip_norm")] public double ClipNorm { get; init; } = 1.0;
    /// <summary>0 — seed of the model initialisation, dropout and batch sampling.</summary>
    [JsonPropertyName("seed")] public long Seed { get; init; }
    /// <summary>0.05 — the last fraction of the corpus used for validation.</summary>
    [JsonPropertyName("val_fraction")] public double ValFraction { get; init; } = 0.05;
    /// <summary>8 — validation batches (of BatchSize windows, non-overlapping from the validation start) per evaluation.</summary>
    [JsonPropertyName("eval_batches")] public int EvalBatches { get; init; } = 8;
    /// <summary>0 — probability that a micro-batch is cut to a random length, uniform in [2, SeqLen], so the model also
    /// learns from short contexts as it will see them when decoding from a short prompt (the PyTorch library's
    /// <c>randomly_truncate_sequence</c>). Drawn from the checkpointed batch sampler, so resuming stays exact.</summary>
    [JsonPropertyName("random_truncate")] public double RandomTruncate { get; init; }

    /// <summary>Throws <see cref="ArgumentException"/> naming the field when a value is out of range.</summary>
    public TrainingOptions Validate()
    {
        Check.That(SeqLen >= 2, nameof(SeqLen), $"must be >= 2, got {SeqLen}.");
        Check.Positive(BatchSize, nameof(BatchSize));
        Check.Positive(Accumulation, nameof(Accumulation));
        Check.That(LearningRate > 0 && double.IsFinite(LearningRate), nameof(LearningRate), $"must be > 0, got {LearningRate}.");
        Check.That(MinLrRatio >= 0 && MinLrRatio <= 1, nameof(MinLrRatio), $"must be in [0, 1], got {MinLrRatio}.");
        Check.NonNegative(WarmupSteps, nameof(WarmupSteps));
        Check.Positive(DecaySteps, nameof(DecaySteps));
        Check.That(WeightDecay >= 0, nameof(WeightDecay), $"must be >= 0, got {WeightDecay}.");
        Check.That(ClipNorm >= 0, nameof(ClipNorm), $"must be >= 0, got {ClipNorm}.");
        Check.That(ValFraction > 0 && ValFraction < 1, nameof(ValFraction), $"must be in (0, 1), got {ValFraction}.");
        Check.Positive(EvalBatches, nameof(EvalBatches));
        Check.That(RandomTruncate >= 0 && RandomTruncate <= 1, nameof(RandomTruncate), $"must be in [0, 1], got {RandomTruncate}.");
        return this;
    }

    /// <summary>Learning rate at optimizer step <paramref name="step"/> (0-based): linear warm-up, then
    /// cosine decay from the peak to MinLrRatio·peak at DecaySteps, constant afterwards.</summary>
    public double LearningRateAt(long step)
    {
        if (step < WarmupSteps) return LearningRate * (step + 1) / WarmupSteps;
        if (step >= DecaySteps) return LearningRate * MinLrRatio;
        double progress = (double)(step - WarmupSteps) / Math.Max(1, DecaySteps - WarmupSteps);
        double cosine = 0.5 * (1 + Math.Cos(Math.PI * progress));
        return LearningRate * (MinLrRatio + (1 - MinLrRatio) * cosine);
    }
}
