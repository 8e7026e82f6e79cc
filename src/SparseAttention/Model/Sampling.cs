using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>Next-token loss for language models.</summary>
public static class LanguageModelLoss
{
    /// <summary>
    /// Mean cross-entropy of predicting token t + 1 from position t: logits[:, :−1] against tokens[:, 1:].
    /// Targets equal to <paramref name="ignoreIndex"/> (e.g. a padding id) are left out; when every
    /// target is ignored the loss is 0 (not NaN).
    /// </summary>
    /// <param name="logits">(B, T, V).</param>
    /// <param name="tokens">(B, T) int64, the same sequence the logits were computed from.</param>
    /// <param name="ignoreIndex">Target id that contributes nothing.</param>
    /// <returns>A scalar.</returns>
    public static Tensor NextToken(Tensor logits, Tensor tokens, long ignoreIndex = -100)
    {
        Check.Shape(logits, nameof(logits), "(B, T, V)", -1, -1, -1);
        Check.Shape(tokens, nameof(tokens), "(B, T)", logits.shape[0], logits.shape[1]);
        Check.That(tokens.dtype == ScalarType.Int64, nameof(tokens), $"must be int64 token ids, got {tokens.dtype}.");
        using var scope = NewDisposeScope();
        long batch = logits.shape[0], seqLen = logits.shape[1], vocab = logits.shape[2];
        if (seqLen < 2) return zeros(Array.Empty<long>(), dtype: logits.dtype, device: logits.device).MoveToOuterDisposeScope();
        var predictions = logits.narrow(1, 0, seqLen - 1).reshape(-1, vocab);            // (B·(T−1), V)
        var targets = tokens.narrow(1, 1, seqLen - 1).reshape(-1);                        // (B·(T−1))
        var summed = nn.functional.cross_entropy(predictions, targets, ignore_index: ignoreIndex, reduction: nn.Reduction.Sum);
        var count = targets.ne(ignoreIndex).sum().clamp_min(1).to(logits.dtype);
        return (summed / count).MoveToOuterDisposeScope();
    }

    /// <summary><see cref="NextToken(Tensor, Tensor, long)"/> plus the model's auxiliary loss (the total to backpropagate).</summary>
    public static Tensor NextToken(Tensor logits, Tensor tokens, Tensor auxLoss, long ignoreIndex = -100)
    {
        ArgumentNullException.ThrowIfNull(auxLoss);
        using var scope = NewDisposeScope();
        return (NextToken(logits, tokens, ignoreIndex) + auxLoss).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Autoregressive sampling. There is no key/value cache: each new token re-runs the model on the
/// growing sequence, cropped to its last MaxSeqLen tokens (so the cost per token is a full forward).
/// </summary>
public static class Sampling
{
    /// <summary>
    /// Masks <paramref name="logits"/> (B, V) to −∞ outside the allowed set: with <paramref name="topK"/>,
    /// the k largest (ties with the k-th are kept); then with <paramref name="topP"/> (nucleus), the smallest
    /// set of most probable tokens whose probability mass (under softmax of the logits so far) is ≥ top_p.
    /// The most probable token is always kept.
    /// </summary>
    /// <returns>(B, V).</returns>
    public static Tensor FilterLogits(Tensor logits, int? topK = null, double? topP = null)
    {
        Check.Shape(logits, nameof(logits), "(B, V)", -1, -1);
        if (topK is int k) Check.Positive(k, nameof(topK));
        if (topP is double p) Check.That(p > 0 && p <= 1, nameof(topP), $"must be in (0, 1], got {p}.");
        using var scope = NewDisposeScope();
        if (topK is int kk && kk < logits.shape[1])
        {
            var kth = logits.topk(kk, -1).values.narrow(-1, kk - 1, 1);                  // (B, 1)
            logits = logits.masked_fill(logits.lt(kth), double.NegativeInfinity);
        }
        if (topP is double pp && pp < 1)
        {
            var (sorted, order) = logits.sort(-1, descending: true);                      // (B, V) each
            var probs = sorted.to(ScalarType.Float64).softmax(-1);
            var massBefore = probs.cumsum(-1) - probs;                                    // mass of strictly more probable tokens
            var dropSorted = massBefore.ge(pp);                                           // (B, V), in sorted order
            var drop = zeros_like(dropSorted).scatter(-1, order, dropSorted);             // (B, V), in vocabulary order
            logits = logits.masked_fill(drop, double.NegativeInfinity);
        }
        return logits.alias().MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Samples up to <paramref name="maxNewTokens"/> tokens after <paramref name="prompt"/>.
    /// </summary>
    /// <param name="model">The module (put in eval mode during sampling, its mode restored after).</param>
    /// <param name="prompt">(B, Tp) int64, Tp ≥ 1.</param>
    /// <param name="maxNewTokens">How many tokens to add at most.</param>
    /// <param name="maxSeqLen">The model sees at most the last this-many tokens.</param>
    /// <param name="logits">(B, t) tokens → (B, t, V) logits.</param>
    /// <param name="temperature">Logits are divided by it; 0 = greedy (argmax).</param>
    /// <param name="topK">Keep only the k most likely tokens.</param>
    /// <param name="topP">Nucleus: keep the smallest set of most likely tokens with mass ≥ topP.</param>
    /// <param name="eos">End-of-sequence id: a row that produced it keeps producing it; sampling stops
    /// when every row has produced it.</param>
    /// <param name="seed">Seed of the sampling generator: the same seed gives the same tokens.</param>
    /// <param name="onToken">Called after each step with the (B) int64 tokens just chosen (for streaming output);
    /// the tensor is only valid during the call.</param>
    /// <returns>(B, n) int64, the new tokens only (n ≤ maxNewTokens; n &lt; maxNewTokens only when all rows ended with eos).</returns>
    public static Tensor Generate(nn.Module model, Tensor prompt, int maxNewTokens, int maxSeqLen, Func<Tensor, Tensor> logits,
        double temperature = 1.0, int? topK = null, double? topP = null, long? eos = null, ulong seed = 0, Action<Tensor>? onToken = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(logits);
        Check.Shape(prompt, nameof(prompt), "(B, Tp)", -1, -1);
        Check.That(prompt.dtype == ScalarType.Int64, nameof(prompt), $"must be int64 token ids, got {prompt.dtype}.");
        Check.That(prompt.shape[0] >= 1 && prompt.shape[1] >= 1, nameof(prompt), $"needs at least one row and one token, got {Check.ShapeOf(prompt)}.");
        Check.NonNegative(maxNewTokens, nameof(maxNewTokens));
        Check.Positive(maxSeqLen, nameof(maxSeqLen));
        Check.That(temperature >= 0 && double.IsFinite(temperature), nameof(temperature), $"must be finite and >= 0, got {temperature}.");
        if (topK is int k) Check.Positive(k, nameof(topK));
        if (topP is double p) Check.That(p > 0 && p <= 1, nameof(topP), $"must be in (0, 1], got {p}.");

        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var generator = new Generator(seed, prompt.device);
            var sequence = prompt;
            long promptLen = prompt.shape[1];
            var finished = zeros(prompt.shape[0], dtype: ScalarType.Bool, device: prompt.device);     // (B)
            for (int step = 0; step < maxNewTokens; step++)
            {
                long len = sequence.shape[1];
                var window = len > maxSeqLen ? sequence.narrow(1, len - maxSeqLen, maxSeqLen) : sequence;   // (B, ≤ MaxSeqLen)
                var last = logits(window).select(1, -1).to(ScalarType.Float32);                 // (B, V)
                Tensor next;
                if (temperature == 0) next = last.argmax(-1);                                    // (B)
                else
                {
                    var filtered = FilterLogits(last / temperature, topK, topP);
                    next = filtered.softmax(-1).multinomial(1, generator: generator).squeeze(-1);   // (B)
                }
                if (eos is long e)
                {
                    next = next.masked_fill(finished, e);
                    finished = finished.logical_or(next.eq(e));
                }
                sequence = cat([sequence, next.unsqueeze(1)], 1);                                 // (B, len + 1)
                onToken?.Invoke(next);
                if (eos is not null && finished.all().item<bool>()) break;
            }
            return sequence.narrow(1, promptLen, sequence.shape[1] - promptLen).MoveToOuterDisposeScope();
        }
        finally
        {
            model.train(wasTraining);
        }
    }
}
