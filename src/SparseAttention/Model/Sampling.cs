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
/// Autoregressive sampling. With a <see cref="RoutingTransformerLM"/> that supports it, <see cref="RoutingTransformerLM.Generate"/>
/// decodes incrementally from a <see cref="RoutingTransformerLM.DecodingState"/> (one forward over the prompt, then one
/// token per step); the general <see cref="Generate(nn.Module, Tensor, int, int, Func{Tensor, Tensor}, double, int?, double?, long?, ulong, Action{Tensor}?, int?)"/>
/// re-encodes the context for every token. Both use the same context window once the sequence outgrows MaxSeqLen
/// (see <see cref="RoutingTransformerLM.DecodingState"/>), so they give the same tokens.
/// </summary>
/// <remarks>Order of operations per step: logits are divided by the temperature (after subtracting their maximum, in
/// float64, so that tiny temperatures approach greedy instead of overflowing), then filtered by top-k and top-p — the
/// Hugging Face order (the PyTorch routing-transformer library filters first).</remarks>
public static class Sampling
{
    /// <summary>Most new tokens one call may generate.</summary>
    public const int MaxNewTokensLimit = 1_000_000;

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
    /// Samples up to <paramref name="maxNewTokens"/> tokens after <paramref name="prompt"/>, re-running
    /// <paramref name="logits"/> on the whole context window for every new token (no cache).
    /// </summary>
    /// <param name="model">The module (put in eval mode during sampling, its mode restored after).</param>
    /// <param name="prompt">(B, Tp) int64, Tp ≥ 1.</param>
    /// <param name="maxNewTokens">How many tokens to add at most, ≤ <see cref="MaxNewTokensLimit"/>.</param>
    /// <param name="maxSeqLen">The model sees at most this many tokens (M).</param>
    /// <param name="logits">(B, t) tokens → (B, t, V) logits.</param>
    /// <param name="temperature">Logits are divided by it; 0 = greedy (argmax).</param>
    /// <param name="topK">Keep only the k most likely tokens.</param>
    /// <param name="topP">Nucleus: keep the smallest set of most likely tokens with mass ≥ topP.</param>
    /// <param name="eos">End-of-sequence id: a row that produced it keeps producing it; sampling stops
    /// when every row has produced it.</param>
    /// <param name="seed">Seed of the sampling generator: the same seed gives the same tokens.</param>
    /// <param name="onToken">Called after each step with the (B) int64 tokens just chosen (for streaming output);
    /// the tensor is only valid during the call.</param>
    /// <param name="contextKeep">Tokens kept when the context is full (K, in [0, M)); null = M / 2. The window of a row
    /// holding n tokens is [s(n), n), see <see cref="RoutingTransformerLM.DecodingState"/>.</param>
    /// <returns>(B, n) int64, the new tokens only (n ≤ maxNewTokens; n &lt; maxNewTokens only when all rows ended with eos).</returns>
    public static Tensor Generate(nn.Module model, Tensor prompt, int maxNewTokens, int maxSeqLen, Func<Tensor, Tensor> logits,
        double temperature = 1.0, int? topK = null, double? topP = null, long? eos = null, ulong seed = 0, Action<Tensor>? onToken = null,
        int? contextKeep = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(logits);
        CheckPrompt(prompt);
        Check.Positive(maxSeqLen, nameof(maxSeqLen));
        int keep = contextKeep ?? maxSeqLen / 2;
        Check.That(keep >= 0 && keep < maxSeqLen, nameof(contextKeep), $"must be in [0, maxSeqLen = {maxSeqLen}), got {keep}.");
        CheckOptions(maxNewTokens, temperature, topK, topP);
        long batch = prompt.shape[0];
        List<long>[] rows;
        using (NewDisposeScope()) rows = Enumerable.Range(0, (int)batch).Select(b => prompt[b].cpu().data<long>().ToList()).ToArray();
        var device = prompt.device;
        Tensor Next(long[]? appended)
        {
            if (appended is not null)
                for (int b = 0; b < batch; b++) rows[b].Add(appended[b]);
            long n = rows[0].Count;                                                       // all rows have the same length
            long from = RoutingTransformerLM.DecodingState.ContextStart(n, maxSeqLen, keep);
            var window = tensor(rows.SelectMany(r => r.Skip((int)from)).ToArray(), new long[] { batch, n - from }, device: device);   // (B, ≤ M)
            return logits(window).select(1, -1);                                          // (B, V)
        }
        return Run(model, batch, device, Next, maxNewTokens, temperature, topK, topP, eos, seed, onToken);
    }

    /// <summary>
    /// Samples from <paramref name="model"/> with incremental decoding (see <see cref="RoutingTransformerLM.StartDecoding"/>).
    /// Same arguments and results as <see cref="Generate(nn.Module, Tensor, int, int, Func{Tensor, Tensor}, double, int?, double?, long?, ulong, Action{Tensor}?, int?)"/>,
    /// plus an optional <paramref name="promptMask"/> (B, Tp) for prompts of different lengths (each row's real tokens
    /// are its prompt; every row then continues from its own last token) and, for a model that cross-attends, the
    /// <paramref name="context"/> (B, S, ContextDim) with its optional <paramref name="contextMask"/> (B, S).
    /// </summary>
    public static Tensor GenerateCached(RoutingTransformerLM model, Tensor prompt, int maxNewTokens, double temperature = 1.0,
        int? topK = null, double? topP = null, long? eos = null, ulong seed = 0, Action<Tensor>? onToken = null,
        Tensor? promptMask = null, int? contextKeep = null, Tensor? context = null, Tensor? contextMask = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        CheckPrompt(prompt);
        CheckOptions(maxNewTokens, temperature, topK, topP);
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var state = model.StartDecoding(prompt, promptMask, contextKeep, context, contextMask);
            Tensor Next(long[]? appended) =>
                appended is null ? state.Logits : state.Append(tensor(appended, device: prompt.device));
            return Run(model, prompt.shape[0], prompt.device, Next, maxNewTokens, temperature, topK, topP, eos, seed, onToken);
        }
        finally
        {
            model.train(wasTraining);
        }
    }

    private static void CheckPrompt(Tensor prompt)
    {
        Check.Shape(prompt, nameof(prompt), "(B, Tp)", -1, -1);
        Check.That(prompt.dtype == ScalarType.Int64, nameof(prompt), $"must be int64 token ids, got {prompt.dtype}.");
        Check.That(prompt.shape[0] >= 1 && prompt.shape[1] >= 1, nameof(prompt), $"needs at least one row and one token, got {Check.ShapeOf(prompt)}.");
    }

    private static void CheckOptions(int maxNewTokens, double temperature, int? topK, double? topP)
    {
        Check.That(maxNewTokens >= 0 && maxNewTokens <= MaxNewTokensLimit, nameof(maxNewTokens), $"must be in [0, {MaxNewTokensLimit}], got {maxNewTokens}.");
        Check.That(temperature >= 0 && double.IsFinite(temperature), nameof(temperature), $"must be finite and >= 0, got {temperature}.");
        if (topK is int k) Check.Positive(k, nameof(topK));
        if (topP is double p) Check.That(p > 0 && p <= 1, nameof(topP), $"must be in (0, 1], got {p}.");
    }

    /// <summary>The sampling loop over a source of next-token logits: next(null) = logits after the prompt,
    /// next(tokens) = logits after appending one token per row. Each step runs in its own dispose scope and only the
    /// chosen ids are kept (on the host), so memory does not grow with the number of steps.</summary>
    private static Tensor Run(nn.Module model, long batch, Device device, Func<long[]?, Tensor> next, int maxNewTokens,
        double temperature, int? topK, double? topP, long? eos, ulong seed, Action<Tensor>? onToken)
    {
        bool wasTraining = model.training;
        model.eval();
        try
        {
            using var noGrad = no_grad();
            using var generator = new Generator(seed, device);
            var chosen = new List<long[]>();
            var finished = new bool[batch];
            long[]? appended = null;
            for (int step = 0; step < maxNewTokens; step++)
            {
                using var quiet = NoGcSection.Enter();                                  // see NoGcSection: no collection mid-token
                using var scope = NewDisposeScope();
                var last = next(appended);                                                // (B, V)
                if (!last.isfinite().all().item<bool>())
                    throw new InvalidOperationException($"the model produced non-finite logits (NaN or infinity) at generation step {step}; its weights may be corrupt.");
                Tensor pick;
                if (temperature == 0) pick = last.argmax(-1);                                // (B)
                else
                {
                    var wide = last.to(ScalarType.Float64);
                    var scaled = (wide - wide.amax(new long[] { -1 }, keepdim: true)) / temperature;   // ≤ 0: never overflows
                    var filtered = FilterLogits(scaled, topK, topP);
                    pick = filtered.softmax(-1).multinomial(1, generator: generator).squeeze(-1);      // (B)
                }
                var ids = pick.cpu().data<long>().ToArray();
                if (eos is long e)
                    for (int b = 0; b < batch; b++)
                    {
                        if (finished[b]) ids[b] = e;
                        finished[b] |= ids[b] == e;
                    }
                chosen.Add(ids);
                onToken?.Invoke(tensor(ids, device: device));
                appended = ids;
                if (eos is not null && finished.All(f => f)) break;
            }
            var result = new long[batch * chosen.Count];
            for (int t = 0; t < chosen.Count; t++)
                for (int b = 0; b < batch; b++) result[b * chosen.Count + t] = chosen[t][b];
            return tensor(result, new long[] { batch, chosen.Count }, device: device);     // (B, n)
        }
        finally
        {
            model.train(wasTraining);
        }
    }
}
