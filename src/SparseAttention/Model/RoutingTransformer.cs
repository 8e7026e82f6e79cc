using SparseAttention.Clustering;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// The Transformer body on embeddings: (B, T, Dim) → (B, T, Dim) plus the summed auxiliary loss of all
/// head groups (add it to the main loss before backpropagating). Depth pre-norm layers (see
/// <see cref="TransformerBlock"/>) — with ReceivesContext each followed by a cross-attention layer — then
/// a final norm. Encoder (Causal = false) or decoder (Causal = true); any T ≤ MaxSeqLen.
/// </summary>
/// <remarks>
/// Sequential layers: x ← x + f(x); x ← x + g(x). Reversible layers (Gomez et al. 2017, as in the
/// Reformer): the stream is duplicated into (x1, x2), each layer computes y1 = x1 + f(x2),
/// y2 = x2 + g(y1), and the output is (x1 + x2) / 2; when gradients are recorded the layers' activations
/// are not kept but recomputed in the backward (<see cref="ReversibleRecompute"/>). LayerDrop (Fan et al. 2020): in training each layer is
/// skipped with probability LayerDropout (drawn from the global torch generator); in evaluation all run.
/// </remarks>
public sealed partial class RoutingTransformer : nn.Module<Tensor, Tensor?, Tensor?, Tensor?, (Tensor Output, Tensor AuxLoss)>
{
    private readonly ModuleList<TransformerBlock> layers;
    private readonly nn.Module<Tensor, Tensor> norm;
    private readonly int[] schedule;   // blocks run in order (indices into layers; repeats with WeightTie)
    private readonly TransformerConfig config;

    public RoutingTransformer(TransformerConfig config, string name = "routing_transformer") : base(name)
    {
        ArgumentNullException.ThrowIfNull(config);
        this.config = config.Validate();
        int unique = config.WeightTie ? 1 : config.Depth;
        var blocks = new List<TransformerBlock>();
        for (int layer = 0; layer < unique; layer++)
        {
            blocks.Add(new TransformerBlock(config, new AttentionLayer(config, layer), positionwise: config.PositionwiseKindForLayer(layer)));
            if (config.ReceivesContext) blocks.Add(new TransformerBlock(config, new CrossAttentionLayer(config, layer)));
        }
        int perLayer = config.ReceivesContext ? 2 : 1;
        schedule = Enumerable.Range(0, config.Depth)
                             .SelectMany(l => Enumerable.Range((config.WeightTie ? 0 : l) * perLayer, perLayer)).ToArray();
        layers = nn.ModuleList(blocks.ToArray());
        norm = TransformerBlock.Norm(config);
        RegisterComponents();
    }

    public TransformerConfig Config => config;

    /// <summary>
    /// true (default) — with <see cref="TransformerConfig.Reversible"/>, a forward that records gradients keeps no
    /// per-layer activations and the backward recomputes them layer by layer (see <see cref="ReversibleStack"/>).
    /// false — the same reversible math through ordinary autograd (stores every layer's activations); the oracle the
    /// recomputing path is tested against.
    /// </summary>
    public bool ReversibleRecompute { get; set; } = true;

    /// <summary>The distinct blocks (one per layer, or one in total with WeightTie; cross-attention blocks interleaved).</summary>
    public IReadOnlyList<TransformerBlock> Blocks => layers.ToList();

    /// <param name="x">(B, T, Dim) embeddings, T ≤ MaxSeqLen.</param>
    /// <param name="inputMask">Optional (B, T) bool; true = real token, false = padding (never attended).</param>
    /// <param name="context">(B, S, ContextDim) sequence to cross-attend to; required iff ReceivesContext.</param>
    /// <param name="contextMask">Optional (B, S) bool; true = real context token.</param>
    /// <returns>(B, T, Dim) and the scalar auxiliary loss.</returns>
    public override (Tensor Output, Tensor AuxLoss) forward(Tensor x, Tensor? inputMask = null, Tensor? context = null, Tensor? contextMask = null)
    {
        Check.Shape(x, nameof(x), "(B, T, Dim)", -1, -1, config.Dim);
        Check.FloatingPoint(x, nameof(x));
        Check.That(x.shape[1] >= 1 && x.shape[1] <= config.MaxSeqLen, nameof(x), $"sequence length T must be in [1, MaxSeqLen = {config.MaxSeqLen}], got {x.shape[1]}.");
        Check.KeyMask(inputMask, x.shape[0], x.shape[1]);
        Check.That(config.ReceivesContext || context is null, nameof(context), "this model does not receive context (ReceivesContext = false).");
        Check.That(!config.ReceivesContext || context is not null, nameof(context), "this model receives context (ReceivesContext = true); pass the context sequence.");

        using var scope = NewDisposeScope();
        // Every layer of this forward routes with the centroids it began with (weight-tied layers share one k-means),
        // and statistics of the previous optimizer step are applied first (OnlineKMeans.AutoUpdate).
        using var kmeansForward = OnlineKMeans.BeginModelForward(this);
        if (config.Reversible && ReversibleRecompute && is_grad_enabled())
        {
            // The recompute replays dropout by restoring the CPU generator; TorchSharp 0.107 exposes no CUDA generator
            // state, so on another device the replayed masks would differ and the gradients would be wrong.
            if (training && x.device.type != DeviceType.CPU && config.AttnDropout + config.AttnLayerDropout + config.FfDropout > 0)
                throw new NotSupportedException($"Reversible layers with dropout train on the CPU only (input on {x.device}): the "
                    + "backward replays dropout masks from the CPU generator's state, and TorchSharp exposes no CUDA generator state. "
                    + "Set attn_dropout, attn_layer_dropout and ff_dropout to 0, or reversible = false.");
            var plan = new ReversibleStack.Plan(Blocks, schedule, config.LayerDropout, training, inputMask, contextMask, 0);
            var trainable = layers.parameters().Where(p => p.requires_grad).Cast<Tensor>().ToList();
            var (y1, y2, loss) = ReversibleStack.Run(plan, x, context, trainable);                // (B, T, Dim) each
            return (kmeansForward.Watch(norm.forward((y1 + y2) / 2)).MoveToOuterDisposeScope(), loss.MoveToOuterDisposeScope());
        }
        var aux = zeros(Array.Empty<long>(), dtype: x.dtype, device: x.device);
        Tensor x1 = x, x2 = x;                                                          // reversible halves, each (B, T, Dim)
        foreach (int index in schedule)
        {
            if (training && config.LayerDropout > 0 && rand(1).item<float>() < config.LayerDropout) continue;
            var block = layers[index];
            if (config.Reversible)
            {
                var (f, loss) = block.AttentionBranch(x2, inputMask, context, contextMask);
                var y1 = x1 + f;
                var (g, gLoss) = block.FeedForwardBranch(y1, inputMask);
                (x1, x2, aux) = (y1, x2 + g, aux + loss + gLoss);
            }
            else
            {
                var (f, loss) = block.AttentionBranch(x1, inputMask, context, contextMask);
                x1 = x1 + f;
                var (g, gLoss) = block.FeedForwardBranch(x1, inputMask);
                x1 = x1 + g;
                aux = aux + loss + gLoss;
            }
        }
        var output = config.Reversible ? (x1 + x2) / 2 : x1;                             // (B, T, Dim)
        return (kmeansForward.Watch(norm.forward(output)).MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }
}

/// <summary>
/// Language model: token ids (B, T) int64 → logits (B, T, NumTokens) plus the auxiliary loss. Token
/// embedding (EmbDim wide; projected to Dim and back when EmbDim ≠ Dim), a <see cref="RoutingTransformer"/>,
/// then the output layer (or the embedding matrix transposed with TieEmbedding). Positions enter through
/// the attention layers (<see cref="TransformerConfig.PositionalEncoding"/>) and, when asked, through the embedding
/// (<see cref="TransformerConfig.UseAbsolutePosEmb"/>, <see cref="TransformerConfig.AddTimingSignal"/>).
/// </summary>
public sealed partial class RoutingTransformerLM : nn.Module<Tensor, Tensor?, Tensor?, Tensor?, bool, (Tensor Logits, Tensor AuxLoss)>
{
    private readonly Embedding token_emb;
    private readonly Embedding? pos_emb;        // (MaxSeqLen, EmbDim) with UseAbsolutePosEmb
    private readonly Linear? project_in, project_out, to_logits;
    private readonly RoutingTransformer transformer;
    private readonly TransformerConfig config;

    public RoutingTransformerLM(TransformerConfig config, string name = "routing_transformer_lm") : base(name)
    {
        ArgumentNullException.ThrowIfNull(config);
        this.config = config.Validate();
        int embDim = config.ResolvedEmbDim;
        token_emb = nn.Embedding(config.NumTokens, embDim);
        using (no_grad()) nn.init.normal_(token_emb.weight!, 0, 0.02);
        if (config.UseAbsolutePosEmb)
        {
            pos_emb = nn.Embedding(config.MaxSeqLen, embDim);
            using (no_grad()) nn.init.normal_(pos_emb.weight!, 0, 0.02);
        }
        if (embDim != config.Dim)
        {
            project_in = nn.Linear(embDim, config.Dim);
            project_out = nn.Linear(config.Dim, embDim);
        }
        transformer = new RoutingTransformer(config);
        if (!config.TieEmbedding) to_logits = nn.Linear(embDim, config.NumTokens);
        RegisterComponents();
    }

    public TransformerConfig Config => config;

    public RoutingTransformer Transformer => transformer;

    /// <param name="tokens">(B, T) int64 token ids in [0, NumTokens), T ≤ MaxSeqLen.</param>
    /// <param name="inputMask">Optional (B, T) bool; true = real token, false = padding (never attended).</param>
    /// <param name="context">(B, S, ContextDim) sequence to cross-attend to; required iff ReceivesContext.</param>
    /// <param name="contextMask">Optional (B, S) bool; true = real context token.</param>
    /// <param name="returnEmbeddings">false (default): logits. true: the transformer's final hidden states (B, T, Dim)
    /// instead — after the final norm, before the output layer (and before the EmbDim projection): what an encoder hands
    /// to a decoder; the PyTorch library's <c>return_embeddings</c>.</param>
    /// <returns>Logits (B, T, NumTokens), or the hidden states (B, T, Dim) with <paramref name="returnEmbeddings"/>, and
    /// the scalar auxiliary loss.</returns>
    public override (Tensor Logits, Tensor AuxLoss) forward(Tensor tokens, Tensor? inputMask = null, Tensor? context = null,
        Tensor? contextMask = null, bool returnEmbeddings = false)
    {
        Check.Shape(tokens, nameof(tokens), "(B, T)", -1, -1);
        Check.That(tokens.dtype == ScalarType.Int64, nameof(tokens), $"must be int64 token ids, got {tokens.dtype}.");
        Check.That(tokens.shape[1] >= 1 && tokens.shape[1] <= config.MaxSeqLen, nameof(tokens),
            $"sequence length T must be in [1, MaxSeqLen = {config.MaxSeqLen}], got {tokens.shape[1]}.");
        if (tokens.numel() > 0)
        {
            long min = tokens.min().item<long>(), max = tokens.max().item<long>();
            Check.That(min >= 0 && max < config.NumTokens, nameof(tokens), $"token ids must be in [0, NumTokens = {config.NumTokens}), got [{min}, {max}].");
        }
        using var scope = NewDisposeScope();
        var (hidden, aux) = transformer.forward(Embed(tokens), inputMask, context, contextMask);   // (B, T, Dim)
        var output = returnEmbeddings ? hidden : ToLogits(hidden);                       // (B, T, Dim) or (B, T, NumTokens)
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <summary>
    /// Samples a continuation of <paramref name="prompt"/>: incrementally from a <see cref="DecodingState"/> when
    /// <paramref name="useCache"/> and <see cref="SupportsCachedDecoding"/>, otherwise by
    /// re-encoding the context per token; both give the same tokens. See <see cref="Sampling.Generate"/>.
    /// </summary>
    public Tensor Generate(Tensor prompt, int maxNewTokens, double temperature = 1.0, int? topK = null, double? topP = null,
        long? eos = null, ulong seed = 0, Tensor? context = null, Tensor? contextMask = null, bool useCache = true, Action<Tensor>? onToken = null)
    {
        if (useCache && SupportsCachedDecoding)
            return Sampling.GenerateCached(this, prompt, maxNewTokens, temperature, topK, topP, eos, seed, onToken,
                context: context, contextMask: contextMask);
        return Sampling.Generate(this, prompt, maxNewTokens, config.MaxSeqLen,
            window => forward(window, null, context, contextMask).Logits,
            temperature, topK, topP, eos, seed, onToken);
    }
}
