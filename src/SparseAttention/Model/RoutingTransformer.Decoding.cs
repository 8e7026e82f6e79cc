using static TorchSharp.torch;

namespace SparseAttention.Model;

public sealed partial class RoutingTransformer
{
    /// <summary>
    /// Decoders for every depth (weight-tied layers get one per depth: the weights are shared, the caches are not),
    /// or null when the model cannot decode incrementally (see <see cref="SupportsDecoding"/>) or the context is missing
    /// for a model that cross-attends.
    /// </summary>
    internal TransformerDecoder? CreateDecoder(long batch, ScalarType dtype, Device device, Tensor? context = null, Tensor? contextMask = null)
    {
        if (!SupportsDecoding || config.ReceivesContext != (context is not null)) return null;
        var decoders = new List<TransformerBlock.BlockDecoder>();
        foreach (int index in schedule)
        {
            var decoder = layers[index].CreateDecoder(batch, config.MaxSeqLen, dtype, device, context, contextMask);
            if (decoder is null)
            {
                foreach (var d in decoders) d.Dispose();
                return null;
            }
            decoders.Add(decoder);
        }
        return new TransformerDecoder(this, decoders);
    }

    /// <summary>Causal, every head group of every layer can decode incrementally, and so can the cross-attention (if any).</summary>
    internal bool SupportsDecoding => config.Causal && layers.All(block => block.SupportsDecoding);

    /// <summary>The layer stack run over a prompt (filling caches) or over one new token per row; the same sequential
    /// or reversible residual math as <see cref="forward"/> in evaluation mode (no dropout, no LayerDrop).</summary>
    internal sealed class TransformerDecoder(RoutingTransformer model, List<TransformerBlock.BlockDecoder> blocks) : IDisposable
    {
        /// <param name="x">(B, T, Dim) prompt embeddings, rows right-padded.</param>
        /// <param name="mask">Null or (B, T) bool.</param>
        /// <param name="lengths">Real tokens per row.</param>
        /// <returns>(B, T, Dim), the final-normed hidden states.</returns>
        public Tensor Prefill(Tensor x, Tensor? mask, int[] lengths) =>
            Run(x, (block, h) => block.AttentionPrefill(h, mask, lengths), (block, h) => block.FeedForwardPrefill(h, mask, lengths));

        /// <param name="x">(B, 1, Dim) embeddings of the new tokens.</param>
        /// <param name="positions">Position of each row's new token.</param>
        /// <returns>(B, 1, Dim).</returns>
        public Tensor Step(Tensor x, int[] positions) =>
            Run(x, (block, h) => block.AttentionStep(h, positions), (block, h) => block.FeedForwardStep(h));

        private Tensor Run(Tensor x, Func<TransformerBlock.BlockDecoder, Tensor, Tensor> f, Func<TransformerBlock.BlockDecoder, Tensor, Tensor> g)
        {
            using var scope = NewDisposeScope();
            Tensor x1 = x, x2 = x;                                                          // reversible halves, each (B, T, Dim)
            foreach (var block in blocks)
            {
                if (model.config.Reversible)
                {
                    var y1 = x1 + f(block, x2);
                    (x1, x2) = (y1, x2 + g(block, y1));
                }
                else
                {
                    x1 = x1 + f(block, x1);
                    x1 = x1 + g(block, x1);
                }
            }
            var output = model.config.Reversible ? (x1 + x2) / 2 : x1;                     // (B, T, Dim)
            return model.norm.forward(output).MoveToOuterDisposeScope();
        }

        public void Dispose()
        {
            foreach (var b in blocks) b.Dispose();
        }
    }
}

public sealed partial class RoutingTransformerLM
{
    /// <summary>True when <see cref="StartDecoding"/> can decode incrementally (a causal model whose every head group has a
    /// decoder; cross-attention, dense or routing, always decodes in a causal model); otherwise <see cref="Generate"/> re-encodes the context per token.</summary>
    public bool SupportsCachedDecoding => transformer.SupportsDecoding;

    /// <summary>
    /// Starts incremental decoding: encodes <paramref name="prompt"/> in one forward, keeping per layer and head group
    /// what later tokens can still attend. Then <see cref="DecodingState.Append"/> adds one token per row at a cost
    /// that does not grow with the position (apart from attention over the keys a token may see). The model must be in
    /// evaluation mode (k-means centroids are the snapshot at this call).
    /// </summary>
    /// <param name="prompt">(B, Tp) int64 token ids.</param>
    /// <param name="promptMask">Optional (B, Tp) bool, true = real token: rows of different lengths, padded on either
    /// side (each row's real tokens, in order, are its prompt); every row needs at least one.</param>
    /// <param name="contextKeep">Tokens kept when the context is full (see <see cref="DecodingState"/>); null = MaxSeqLen / 2.</param>
    /// <exception cref="NotSupportedException">When <see cref="SupportsCachedDecoding"/> is false.</exception>
    /// <param name="context">(B, S, ContextDim) sequence to cross-attend to (e.g. an encoder's output); required iff ReceivesContext.</param>
    /// <param name="contextMask">Optional (B, S) bool, true = real context token.</param>
    public DecodingState StartDecoding(Tensor prompt, Tensor? promptMask = null, int? contextKeep = null, Tensor? context = null, Tensor? contextMask = null)
    {
        Check.Shape(prompt, nameof(prompt), "(B, Tp)", -1, -1);
        Check.That(prompt.dtype == ScalarType.Int64, nameof(prompt), $"must be int64 token ids, got {prompt.dtype}.");
        Check.That(prompt.shape[0] >= 1 && prompt.shape[1] >= 1, nameof(prompt), $"needs at least one row and one token, got {Check.ShapeOf(prompt)}.");
        Check.That(!training, nameof(prompt), "decoding needs the model in evaluation mode (call model.eval()): training mode would update the k-means centroids and apply dropout.");
        if (promptMask is not null)
        {
            Check.Shape(promptMask, nameof(promptMask), "(B, Tp)", prompt.shape[0], prompt.shape[1]);
            Check.Bool(promptMask, nameof(promptMask));
        }
        Check.That(config.ReceivesContext == (context is not null), nameof(context),
            config.ReceivesContext ? "this model cross-attends; pass the context sequence (B, S, ContextDim)." : "this model does not receive context.");
        if (context is not null)
        {
            Check.Shape(context, nameof(context), "(B, S, ContextDim)", prompt.shape[0], -1, config.ResolvedContextDim);
            Check.KeyMask(contextMask, context.shape[0], context.shape[1]);
        }
        int keep = contextKeep ?? config.MaxSeqLen / 2;
        Check.That(keep >= 0 && keep < config.MaxSeqLen, nameof(contextKeep), $"must be in [0, MaxSeqLen = {config.MaxSeqLen}), got {keep}.");
        long batch = prompt.shape[0], width = prompt.shape[1];
        long[] ids;
        bool[]? real;
        using (NewDisposeScope())
        {
            ids = prompt.cpu().contiguous().data<long>().ToArray();
            real = promptMask?.cpu().contiguous().data<bool>().ToArray();
        }
        var rows = new List<long>[batch];
        for (long b = 0; b < batch; b++)
        {
            rows[b] = new List<long>();
            for (long t = 0; t < width; t++)
                if (real is null || real[b * width + t]) rows[b].Add(ids[b * width + t]);
            Check.That(rows[b].Count > 0, nameof(promptMask), $"row {b} has no real token.");
        }
        foreach (var id in rows.SelectMany(r => r))
            Check.That(id >= 0 && id < config.NumTokens, nameof(prompt), $"token ids must be in [0, NumTokens = {config.NumTokens}), got {id}.");
        return new DecodingState(this, rows, keep, token_emb.weight!.dtype, token_emb.weight!.device, context, contextMask);
    }

    /// <summary>Token embedding plus, with UseAbsolutePosEmb, the learned position embedding and, with AddTimingSignal, the
    /// sinusoidal timing signal; then (training only) the input or target dropout; projected to Dim: tokens (B, T) → (B, T, Dim).</summary>
    /// <param name="positions">(B, T) int64 positions of the tokens; null = 0..T−1 in every row.</param>
    private Tensor Embed(Tensor tokens, Tensor? positions = null)
    {
        var x = token_emb.forward(tokens);                                                 // (B, T, EmbDim)
        if (pos_emb is not null || config.AddTimingSignal)
        {
            positions ??= arange(tokens.shape[1], dtype: ScalarType.Int64, device: tokens.device).unsqueeze(0);   // (1 or B, T)
            if (pos_emb is not null) x = x + pos_emb.forward(positions);
            if (config.AddTimingSignal) x = x + TimingSignal.Of(positions, (int)x.shape[2], x.dtype);
        }
        x = nn.functional.dropout(x, config.Causal ? config.TargetDropout : config.InputDropout, training);
        return project_in is null ? x : project_in.forward(x);                             // (B, T, Dim)
    }

    /// <summary>Logits of hidden states: (…, Dim) → (…, NumTokens).</summary>
    private Tensor ToLogits(Tensor hidden)
    {
        if (project_out is not null) hidden = project_out.forward(hidden);                 // (…, EmbDim)
        return to_logits is not null ? to_logits.forward(hidden) : matmul(hidden, token_emb.weight!.t());
    }

    /// <summary>
    /// Incremental decoding of a <see cref="RoutingTransformerLM"/> (see <see cref="StartDecoding"/>). Holds, per depth
    /// and head group, the keys and values later queries can still reach, in tensors allocated once; each
    /// <see cref="Append"/> runs one token per row through the layers in its own dispose scope.
    /// </summary>
    /// <remarks>
    /// <para><b>Past the context.</b> The model attends at most MaxSeqLen = M tokens. When a row would exceed M, its
    /// oldest tokens are dropped so that K = contextKeep remain, and the kept tokens are re-encoded in one forward
    /// (block boundaries, routing chunks and positions restart with the kept window, exactly as a full forward over
    /// that window sees them). So the context of a row holding n tokens in all is tokens [s(n), n) with s(n) = 0 for
    /// n ≤ M and s(n) = ⌈(n − M) / (M − K)⌉·(M − K) beyond; <see cref="Sampling.Generate"/> without a cache uses the
    /// same window, so both give the same tokens. A re-encode costs one forward over K tokens every M − K tokens.</para>
    /// </remarks>
    public sealed class DecodingState : IDisposable
    {
        private readonly RoutingTransformerLM model;
        private readonly List<long>[] history;             // every row's tokens since the context start (host)
        private readonly long[] total;                     // tokens seen per row in all
        private readonly long[] start;                     // absolute index of each row's context start
        private readonly int keep;
        private readonly ScalarType dtype;
        private readonly Device device;
        private readonly Tensor? context, contextMask;       // cross-attention input, owned by the caller
        private RoutingTransformer.TransformerDecoder? decoder;
        private Tensor logits;                             // (B, V)

        internal DecodingState(RoutingTransformerLM model, List<long>[] prompts, int keep, ScalarType dtype, Device device,
            Tensor? context, Tensor? contextMask)
        {
            this.model = model;
            this.context = context;
            this.contextMask = contextMask;
            this.keep = keep;
            this.dtype = dtype;
            this.device = device;
            Batch = prompts.Length;
            total = prompts.Select(p => (long)p.Count).ToArray();
            start = total.Select(n => ContextStart(n)).ToArray();
            history = prompts.Select((p, b) => p.Skip((int)start[b]).ToList()).ToArray();
            logits = Encode();
        }

        /// <summary>Rows B.</summary>
        public long Batch { get; }

        /// <summary>Logits (B, NumTokens) for the next token of each row (owned by the state; valid until the next call).</summary>
        public Tensor Logits => logits;

        /// <summary>Tokens each row's context holds now (≤ MaxSeqLen).</summary>
        public int[] ContextLengths => history.Select(h => h.Count).ToArray();

        /// <summary>Re-encodes happened so far (context full → the last contextKeep tokens encoded again).</summary>
        public int ReEncodes { get; private set; }

        /// <summary>First absolute token index of the context of a row holding <paramref name="n"/> tokens in all.</summary>
        public static long ContextStart(long n, int maxSeqLen, int keep)
        {
            if (n <= maxSeqLen) return 0;
            long stride = maxSeqLen - keep;
            return (n - maxSeqLen + stride - 1) / stride * stride;
        }

        private long ContextStart(long n) => ContextStart(n, model.config.MaxSeqLen, keep);

        /// <summary>Appends one token per row and returns the logits (B, NumTokens) for the token after it.</summary>
        /// <param name="tokens">(B) int64 token ids.</param>
        public Tensor Append(Tensor tokens)
        {
            Check.Shape(tokens, nameof(tokens), "(B)", Batch);
            Check.That(tokens.dtype == ScalarType.Int64, nameof(tokens), $"must be int64 token ids, got {tokens.dtype}.");
            ObjectDisposedException.ThrowIf(decoder is null, this);
            long[] ids;
            using (NewDisposeScope()) ids = tokens.cpu().contiguous().data<long>().ToArray();
            foreach (var id in ids)
                Check.That(id >= 0 && id < model.config.NumTokens, nameof(tokens), $"token ids must be in [0, NumTokens = {model.config.NumTokens}), got {id}.");
            bool slide = false;
            for (int b = 0; b < Batch; b++)
            {
                total[b]++;
                history[b].Add(ids[b]);
                long s = ContextStart(total[b]);
                if (s != start[b])
                {
                    history[b].RemoveRange(0, (int)(s - start[b]));
                    start[b] = s;
                    slide = true;
                }
            }
            Tensor next;
            if (slide)
            {
                ReEncodes++;
                next = Encode();
            }
            else
            {
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var positions = history.Select(h => h.Count - 1).ToArray();
                var x = model.Embed(tensor(ids, new long[] { Batch, 1 }, device: device),
                    tensor(positions.Select(p => (long)p).ToArray(), new long[] { Batch, 1 }, device: device));   // (B, 1, Dim)
                var hidden = decoder!.Step(x, positions);                                     // (B, 1, Dim)
                next = model.ToLogits(hidden.squeeze(1)).MoveToOuterDisposeScope();           // (B, V)
                next.DetachFromDisposeScope();
            }
            logits.Dispose();
            logits = next;
            return logits;
        }

        /// <summary>Encodes every row's context in one forward with fresh caches; returns the last logits (B, V).</summary>
        private Tensor Encode()
        {
            decoder?.Dispose();
            decoder = model.transformer.CreateDecoder(Batch, dtype, device, context, contextMask)
                      ?? throw new NotSupportedException("this model cannot decode incrementally (see RoutingTransformerLM.SupportsCachedDecoding); use Sampling.Generate, which re-encodes.");
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var lengths = history.Select(h => h.Count).ToArray();
            int width = lengths.Max();
            var ids = new long[Batch * width];
            var real = new bool[Batch * width];
            for (int b = 0; b < Batch; b++)
                for (int t = 0; t < lengths[b]; t++) { ids[b * width + t] = history[b][t]; real[b * width + t] = true; }
            var tokens = tensor(ids, new long[] { Batch, width }, device: device);            // (B, T), right-padded
            var mask = lengths.All(n => n == width) ? null : tensor(real, new long[] { Batch, width }, device: device);
            var hidden = decoder.Prefill(model.Embed(tokens), mask, lengths);                // (B, T, Dim)
            var last = tensor(lengths.Select(n => (long)n - 1).ToArray(), device: device)
                       .view(Batch, 1, 1).expand(Batch, 1, hidden.shape[2]);
            var result = model.ToLogits(hidden.gather(1, last).squeeze(1));                   // (B, V)
            return result.MoveToOuterDisposeScope().DetachFromDisposeScope();
        }

        public void Dispose()
        {
            decoder?.Dispose();
            decoder = null;
            logits.Dispose();
        }
    }
}
