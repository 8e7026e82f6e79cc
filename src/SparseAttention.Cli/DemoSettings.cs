using SparseAttention.Model;

namespace SparseAttention.Cli;

/// <summary>Everything that shapes one demo run (the models, the task and the training).</summary>
/// <param name="SeqLen">Tokens per sequence T (max_seq_len of both models).</param>
/// <param name="Steps">Optimizer steps per model.</param>
/// <param name="Batch">Sequences per step.</param>
/// <param name="Seed">Seed of the weights (both models start from the same seed) and of the data.</param>
/// <param name="EvalSequences">Held-out sequences scored at the end.</param>
public sealed record DemoSettings(int SeqLen, int Steps, int Batch, long Seed, int EvalSequences)
{
    /// <summary>Model width.</summary>
    public int Dim { get; init; } = 64;
    /// <summary>Heads per layer (the routing model: half local, half routing in the routing layers).</summary>
    public int Heads { get; init; } = 4;
    /// <summary>Layers.</summary>
    public int Depth { get; init; } = 2;
    /// <summary>Local heads' window w (radius 1 block back: a query sees at most 2w − 1 tokens back).</summary>
    public int LocalWindow { get; init; } = 16;
    /// <summary>Routing clusters per head (window_size = T / clusters).</summary>
    public int Clusters { get; init; } = 8;
    /// <summary>Peak learning rate (AdamW; linear warm-up, then cosine to a tenth).</summary>
    public double LearningRate { get; init; } = 3e-3;
    /// <summary>k-means EMA decay. The library default (0.999) suits long runs; a few hundred steps need centroids that
    /// follow the changing queries (measured at T = 512, 300 steps: 0.99 → 70 % held-out accuracy and still climbing;
    /// 0.9 → 97 % training accuracy by step 150).</summary>
    public double KmeansDecay { get; init; } = 0.9;
    /// <summary>Distinct key tokens in the vocabulary.</summary>
    public int NumKeys { get; init; } = 32;
    /// <summary>Distinct value tokens (chance = 1 / this).</summary>
    public int NumValues { get; init; } = 16;
    /// <summary>Records per sequence.</summary>
    public int Pairs { get; init; } = 16;
    /// <summary>Questions at the end of each sequence.</summary>
    public int Queries { get; init; } = 8;
    /// <summary>Local-only layers at the start of the routing model (sparsity_skip_first). 0: routing from layer 1.
    /// Measured here: with 1, the only routing layer (layer 2) put every position into one cluster from the first steps
    /// to the last (the residual stream after a layer at initialisation has a large direction shared by all positions,
    /// and cosine k-means follows it), so its groups were plain position blocks and the model stayed at chance (T = 256,
    /// decay 0.99, 300 steps; and T = 512, decay 0.9, 300 steps: 6.5 % held-out); with 0, layer-1 routing on the token
    /// embeddings learns the task.</summary>
    public int SkipFirst { get; init; } = 0;
    /// <summary>How positions enter attention. None: the task needs no positions (token shift supplies the previous
    /// token), and rotary embeddings turn the same token at distant positions into different directions, which
    /// cosine k-means then separates (measured at T = 512: with rotary, few questions shared a cluster with their record,
    /// and the routing model was still at chance after 160 steps with decay 0.99 and after 270 steps with decay 0.9).</summary>
    public PositionalEncoding Positions { get; init; } = PositionalEncoding.None;

    /// <summary>
    /// How far information can travel in the local-only model: per layer, token shift in front of each of the two
    /// sublayers moves it 1 token, and a local head reaches 2w − 1 tokens back; so depth · (2w + 1).
    /// </summary>
    public int LocalReach => Depth * (2 * LocalWindow + 1);

    /// <summary>The task: records at least LocalReach + 1 tokens before every question.</summary>
    public RecallTask Task => new(SeqLen, NumKeys, NumValues, Pairs, Queries, LocalReach + 1);

    /// <summary>The shared configuration; <paramref name="routing"/> = half the heads route in layers after the first.</summary>
    public TransformerConfig Config(bool routing) => new TransformerConfig
    {
        NumTokens = Task.Vocab, Dim = Dim, Depth = Depth, Heads = Heads, MaxSeqLen = SeqLen, Causal = true,
        WindowSize = SeqLen / Clusters, LocalAttnWindowSize = LocalWindow, LocalAttnRadiusBlocks = 1,
        NLocalAttnHeads = [routing ? Heads / 2 : Heads], SparsitySkipFirst = SkipFirst,
        ShiftTokens = true, FfMult = 2, KmeansEmaDecay = KmeansDecay, BlockSize = LocalWindow,
        PositionalEncoding = Positions,
    }.Validate();
}
