using SparseAttention.Clustering;
using SparseAttention.Model;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>Result of one optimizer step.</summary>
/// <param name="Step">Optimizer steps done after this one.</param>
/// <param name="Loss">Mean next-token cross-entropy (nats per token) over the step's micro-batches, without the auxiliary loss.</param>
/// <param name="LearningRate">Learning rate used by this step.</param>
/// <param name="Tokens">Tokens processed by this step.</param>
/// <param name="GradNorm">Global L2 norm of the gradient before clipping.</param>
/// <param name="Skipped">True when the loss or the gradient norm was not finite: no update was applied (weights,
/// optimizer state and k-means centroids are unchanged; the batch sampler moved on).</param>
/// <param name="BytesPerToken">Original bytes covered by the step's predicted tokens per predicted token (exactly 1 for bytes):
/// Loss / ln 2 / BytesPerToken is the step's training loss in bits per byte.</param>
public readonly record struct StepResult(long Step, double Loss, double LearningRate, long Tokens, double GradNorm = 0, bool Skipped = false, double BytesPerToken = 1);

/// <summary>A validation result: summed next-token cross-entropy over the predicted tokens and the original bytes they cover.</summary>
/// <param name="Nats">Summed cross-entropy (nats) over the predicted tokens.</param>
/// <param name="Tokens">Tokens predicted.</param>
/// <param name="Bytes">Original UTF-8 bytes those tokens stand for (= Tokens for bytes).</param>
public readonly record struct ValidationResult(double Nats, long Tokens, long Bytes)
{
    /// <summary>Mean cross-entropy per predicted token (nats).</summary>
    public double LossPerToken => Nats / Tokens;
    /// <summary>Bits per byte of the original text: Nats / (ln 2 · Bytes). For bytes, the bits per character of earlier versions.</summary>
    public double BitsPerByte => Nats / Bytes / Math.Log(2);
}

/// <summary>
/// Trains a <see cref="RoutingTransformerLM"/> on tokenized text (bytes or a BPE vocabulary, <see cref="TransformerConfig.Tokenizer"/>):
/// random windows of the training tokens (a seeded
/// SplitMix64 sampler), AdamW, warm-up + cosine learning rate, gradient accumulation and clipping, and
/// <see cref="OnlineKMeans.UpdateAll"/> after every optimizer step (routing heads' centroids).
/// Everything needed to continue bit-for-bit is saved by <see cref="Checkpoint"/>.
/// </summary>
public sealed partial class Trainer : IDisposable
{
    private readonly TokenText train, validation;
    private readonly TrainingStep trainingStep;

    /// <summary>The model being trained.</summary>
    public RoutingTransformerLM Model { get; }
    /// <summary>The model's configuration (num_tokens = the tokenizer's vocabulary size).</summary>
    public TransformerConfig Config { get; }
    /// <summary>The device of the model, its optimizer state and the batches.</summary>
    public Device Device { get; }
    /// <summary>The configuration's tokenizer, which produced the training and validation tokens.</summary>
    public TextTokenizer Tokenizer { get; }
    /// <summary>The run's hyperparameters.</summary>
    public TrainingOptions Options { get; }
    /// <summary>Optimizer steps done.</summary>
    public long Step { get; internal set; }
    /// <summary>State of the batch sampler: the data position (which windows come next).</summary>
    public ulong SamplerState { get; internal set; }
    /// <summary>Training tokens processed so far.</summary>
    public long TokensSeen { get; internal set; }
    /// <summary>Training time accumulated over all sessions of this run (seconds), as saved in checkpoints.</summary>
    public double ElapsedSeconds { get; set; }
    /// <summary>Steps skipped in this session because their loss or gradient norm was not finite.</summary>
    public long SkippedSteps { get; private set; }
    /// <summary>Skipped steps in a row (0 after an applied step).</summary>
    public int ConsecutiveSkippedSteps { get; private set; }

    internal AdamW Optimizer => trainingStep.Optimizer;

    /// <summary>A fresh run: seeds libtorch's global generator with Options.Seed, then builds the model and optimizer.
    /// <paramref name="train"/> and <paramref name="validation"/> must come from the configuration's tokenizer
    /// (a byte array or <see cref="ByteText"/> for bytes; <see cref="TextTokenizer.Tokenize"/> otherwise).</summary>
    /// <param name="config">The model configuration.</param>
    /// <param name="options">Training options.</param>
    /// <param name="train">Training tokens.</param>
    /// <param name="validation">Validation tokens.</param>
    /// <param name="device">Where the model, its optimizer state and the batches live; default the CPU.</param>
    public Trainer(TransformerConfig config, TrainingOptions options, TokenText train, TokenText validation, Device? device = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(train);
        ArgumentNullException.ThrowIfNull(validation);
        options.Validate();
        config.Validate();
        var tokenizer = TextTokenizer.For(config);
        Check.That(config.NumTokens == tokenizer.VocabularySize, nameof(config.NumTokens),
            $"training with tokenizer = {tokenizer.Name} needs num_tokens = {tokenizer.VocabularySize} (its vocabulary), got {config.NumTokens}.");
        Check.That(train.Tokenizer == tokenizer && validation.Tokenizer == tokenizer, nameof(train),
            $"the data was tokenized with {train.Tokenizer.Name} / {validation.Tokenizer.Name}, but the configuration says tokenizer = {tokenizer.Name}.");
        Check.That(config.Causal, nameof(config.Causal), "a language model must be causal (causal = true).");
        Check.That(options.SeqLen <= config.MaxSeqLen, nameof(options.SeqLen), $"must be at most max_seq_len = {config.MaxSeqLen}, got {options.SeqLen}.");
        bool routing = Enumerable.Range(0, config.Depth).Any(l => config.HeadGroupsForLayer(l).Any(g => g.Kind == HeadGroupKind.Routing));
        Check.That(!routing || options.SeqLen == config.MaxSeqLen, nameof(options.SeqLen),
            $"models with routing heads train on windows of exactly max_seq_len = {config.MaxSeqLen} tokens (clusters are fixed by max_seq_len), got {options.SeqLen}.");
        Check.That(train.Length > options.SeqLen && validation.Length > options.SeqLen, nameof(train),
            $"both training ({train.Length} tokens) and validation ({validation.Length} tokens) data need more than seq_len = {options.SeqLen} tokens.");
        this.train = train;
        this.validation = validation;
        Config = config;
        Tokenizer = tokenizer;
        Options = options;
        random.manual_seed(options.Seed);
        Device = device ?? CPU;
        Model = new RoutingTransformerLM(config);
        if (Device.type != DeviceType.CPU) Model.to(Device);                          // before the optimizer sees the parameters
        trainingStep = new TrainingStep(Model, options.LearningRate, options.WeightDecay);
        SamplerState = (ulong)options.Seed ^ 0x9E3779B97F4A7C15UL;
    }

    /// <summary>One optimizer step over Options.Accumulation micro-batches. When the loss (with the auxiliary loss)
    /// or the gradient norm is not finite, nothing is updated and the result says <c>Skipped</c>: a NaN never reaches
    /// the weights, the optimizer moments or the k-means centroids.</summary>
    public StepResult TrainStep()
    {
        using var quiet = NoGcSection.Enter();                                         // see NoGcSection: no collection mid-step
        trainingStep.Begin();
        Parallel?.ReseedReplica(Options.Seed, Step);
        double lossSum = 0, totalSum = 0;
        long tokens = 0, predicted = 0, bytes = 0;
        for (int micro = 0; micro < Options.Accumulation; micro++)
        {
            using var scope = NewDisposeScope();
            var batch = NextBatch();                                                   // (B, T)
            var (_, lm, total) = trainingStep.Backward(batch, accumulation: Options.Accumulation);
            lossSum += lm.item<float>();
            totalSum += total.item<float>();
            tokens += batch.numel();
            var targets = batch.narrow(1, 1, batch.shape[1] - 1);                      // (B, T − 1)
            predicted += targets.numel();
            bytes += CoveredBytes(targets);
        }
        if (Parallel is not null) (lossSum, totalSum, tokens) = AverageOverRanks(lossSum, totalSum, tokens);
        double bytesPerToken = (double)bytes / predicted;                              // this rank's batches
        double lr = Options.LearningRateAt(Step);
        var (gradNorm, skipped) = trainingStep.Apply(lr, Options.ClipNorm, skipNonFinite: true, totalSum);
        TokensSeen += tokens;
        if (skipped)
        {
            SkippedSteps++;
            ConsecutiveSkippedSteps++;
            return new StepResult(Step, lossSum / Options.Accumulation, lr, tokens, gradNorm, Skipped: true, bytesPerToken);
        }
        ConsecutiveSkippedSteps = 0;
        Step++;
        return new StepResult(Step, lossSum / Options.Accumulation, lr, tokens, gradNorm, BytesPerToken: bytesPerToken);
    }

    /// <summary>Original bytes the token ids in <paramref name="ids"/> stand for (its element count for bytes).</summary>
    private long CoveredBytes(Tensor ids)
    {
        if (Tokenizer.Kind == TokenizerKind.Bytes) return ids.numel();
        long sum = 0;
        foreach (long id in ids.cpu().contiguous().data<long>()) sum += Tokenizer.ByteLength((int)id);
        return sum;
    }

    /// <summary>Validation loss over up to Options.EvalBatches batches of non-overlapping windows from the start of the
    /// validation tokens (the same windows every time): summed next-token cross-entropy, tokens predicted and the original
    /// bytes they cover, so that <see cref="ValidationResult.BitsPerByte"/> compares models of any tokenizer on one scale.</summary>
    public ValidationResult ValidationLoss() => NextTokenEvaluation.Run(Model, validation, ValidationWindows(), Options.BatchSize);

    /// <summary>Validation bits per byte of the original text (<see cref="ValidationLoss"/>); for a byte-level model the bits per
    /// character (mean next-byte cross-entropy / ln 2) of earlier versions, bit for bit.</summary>
    public double ValidationBitsPerCharacter() => ValidationLoss().BitsPerByte;

    /// <summary>Validation bits per byte by position in the window, on the same windows as <see cref="ValidationLoss"/>:
    /// the SeqLen − 1 predicted positions 1..SeqLen−1 are cut into <paramref name="buckets"/> contiguous buckets
    /// (position t goes to bucket ⌊t·buckets / SeqLen⌋) and each bucket's summed next-token cross-entropy / (ln 2 · the
    /// bytes its tokens cover) is returned, with the number of predictions in it. Late buckets predict from a long
    /// context: a model that uses long context gains there.</summary>
    public (double[] Bits, long[] Counts) ValidationBitsByPosition(int buckets)
    {
        Check.That(buckets >= 1 && buckets <= Options.SeqLen - 1, nameof(buckets), $"must be in [1, seq_len − 1 = {Options.SeqLen - 1}], got {buckets}.");
        var nats = new double[Options.SeqLen - 1];
        var bytes = new long[Options.SeqLen - 1];
        var windows = ValidationWindows();
        NextTokenEvaluation.Run(Model, validation, windows, Options.BatchSize, nats, bytes);
        var bits = new double[buckets];
        var counts = new long[buckets];
        var bucketBytes = new long[buckets];
        for (int i = 0; i < nats.Length; i++)
        {
            int bucket = (int)((long)(i + 1) * buckets / Options.SeqLen);                                             // position of the predicted token
            bits[bucket] += nats[i];
            counts[bucket] += windows.Count;
            bucketBytes[bucket] += bytes[i];
        }
        for (int k = 0; k < buckets; k++) bits[k] = bits[k] / bucketBytes[k] / Math.Log(2);
        return (bits, counts);
    }

    /// <summary>The validation windows: up to Options.EvalBatches × Options.BatchSize non-overlapping windows of SeqLen
    /// tokens from the start of the validation tokens (at least one).</summary>
    private List<(long Start, int Length)> ValidationWindows()
    {
        int seqLen = Options.SeqLen;
        long windows = Math.Max(1, Math.Min((long)Options.EvalBatches * Options.BatchSize, (validation.Length - 1) / seqLen));
        var list = new List<(long Start, int Length)>();
        for (long w = 0; w < windows; w++) list.Add((w * seqLen, seqLen));
        return list;
    }

    /// <summary>Whether the model's logits on the first validation window are all finite (one forward pass, no
    /// gradient): finite weights can still be so large that every output overflows, and such a model must not be saved.</summary>
    public bool OutputsAreFinite()
    {
        Model.eval();
        try
        {
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            var ids = new long[Options.SeqLen];
            for (int t = 0; t < ids.Length; t++) ids[t] = validation[t];
            var window = tensor(ids, new long[] { 1, Options.SeqLen }, device: Device);                               // (1, T)
            return Model.forward(window, null).Logits.isfinite().all().item<bool>();
        }
        finally { Model.train(); }
    }

    /// <summary>(BatchSize, L) int64 windows at random offsets of the training tokens, L = SeqLen or, with probability
    /// Options.RandomTruncate, uniform in [2, SeqLen]; advances <see cref="SamplerState"/>. Data-parallel: every rank
    /// draws the same BatchSize × ranks windows and keeps windows [rank·BatchSize, (rank+1)·BatchSize).</summary>
    internal Tensor NextBatch()
    {
        int b = Options.BatchSize, seqLen = Options.SeqLen, first = b * (Parallel?.Rank ?? 0);
        var data = new long[b * seqLen];
        ulong range = (ulong)(train.Length - seqLen + 1);
        for (int i = 0; i < b * (Parallel?.Size ?? 1); i++)
        {
            long offset = (long)(NextRandom() % range);
            if (i < first || i >= first + b) continue;                                  // another rank's window
            for (int t = 0; t < seqLen; t++) data[(i - first) * seqLen + t] = train[offset + t];
        }
        int length = seqLen;
        // Only draws when truncation is on, so runs without it keep their sampler stream.
        if (Options.RandomTruncate > 0 && (NextRandom() >> 11) * (1.0 / (1UL << 53)) < Options.RandomTruncate)
            length = 2 + (int)(NextRandom() % (ulong)(seqLen - 1));
        var batch = tensor(data, new long[] { b, seqLen }, device: Device);             // (B, SeqLen)
        return length == seqLen ? batch : batch.narrow(1, 0, length).contiguous();     // (B, L)
    }

    private ulong NextRandom()
    {
        // SplitMix64: the whole sampler state is one ulong, saved in checkpoints.
        ulong z = SamplerState += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    public void Dispose()
    {
        trainingStep.Dispose();
        Model.Dispose();
    }
}
