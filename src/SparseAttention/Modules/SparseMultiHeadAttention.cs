using System.Collections.Concurrent;
using SparseAttention.Kernels;
using SparseAttention.Patterns;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Modules;

/// <summary>
/// Multi-head self-attention with a static sparse pattern per head: projects (B, T, dim) to q, k, v,
/// attends with the pattern (use <see cref="AttentionPattern.HeadGroups"/> to give head groups
/// different patterns), and projects back to dim.
/// </summary>
public sealed class SparseMultiHeadAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly Linear to_q, to_k, to_v, to_out;
    private readonly int heads, dimHead, blockSize;
    private readonly AttentionPattern pattern;
    private readonly AttentionKernel kernel;
    // Compiled masks per sequence length: compiling is pure, so sharing across calls is safe.
    private readonly ConcurrentDictionary<int, BlockMask> masks = new();

    /// <param name="dim">Model width (input and output feature size).</param>
    /// <param name="heads">Number of heads; the pattern is evaluated for heads 0..heads−1.</param>
    /// <param name="pattern">Which keys each query may attend, per head.</param>
    /// <param name="dimHead">Width of one head; default dim / heads.</param>
    /// <param name="blockSize">Block size the pattern is compiled with (any length is padded internally).</param>
    /// <param name="kernel">Attention implementation.</param>
    public SparseMultiHeadAttention(int dim, int heads, AttentionPattern pattern, int? dimHead = null,
        int blockSize = 64, AttentionKernel kernel = AttentionKernel.Auto, string name = "sparse_attention") : base(name)
    {
        Check.Positive(dim, nameof(dim));
        Check.Positive(heads, nameof(heads));
        Check.Positive(blockSize, nameof(blockSize));
        ArgumentNullException.ThrowIfNull(pattern);
        Check.That(dimHead is not null || dim % heads == 0, nameof(heads), $"dim ({dim}) must be divisible by heads ({heads}) when dimHead is not given.");
        this.heads = heads;
        this.dimHead = dimHead ?? dim / heads;
        Check.Positive(this.dimHead, nameof(dimHead));
        this.blockSize = blockSize;
        this.pattern = pattern;
        this.kernel = kernel;
        int inner = heads * this.dimHead;
        to_q = nn.Linear(dim, inner, hasBias: false);
        to_k = nn.Linear(dim, inner, hasBias: false);
        to_v = nn.Linear(dim, inner, hasBias: false);
        to_out = nn.Linear(inner, dim);
        RegisterComponents();
    }

    public AttentionPattern Pattern => pattern;

    /// <summary>The compiled mask this module uses for sequences of length <paramref name="seqLen"/>.</summary>
    public BlockMask MaskFor(int seqLen) => masks.GetOrAdd(seqLen, t => pattern.Compile(t, Math.Min(blockSize, t), heads));

    /// <param name="x">Input (B, T, dim).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real token, false = padding (never attended).</param>
    /// <returns>(B, T, dim).</returns>
    public override Tensor forward(Tensor x, Tensor? keyMask = null)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, to_q.in_features);
        Check.FloatingPoint(x, nameof(x));
        using var scope = NewDisposeScope();
        long batch = x.shape[0], seqLen = x.shape[1];
        Tensor SplitHeads(Tensor t) => t.view(batch, seqLen, heads, dimHead).transpose(1, 2);  // (B, H, T, Dh)
        var q = SplitHeads(to_q.forward(x));
        var k = SplitHeads(to_k.forward(x));
        var v = SplitHeads(to_v.forward(x));
        var attended = BlockSparseAttention.Attention(q, k, v, MaskFor((int)seqLen), keyMask, kernel: kernel);  // (B, H, T, Dh)
        var merged = attended.transpose(1, 2).reshape(batch, seqLen, heads * dimHead);            // (B, T, H·Dh)
        return to_out.forward(merged).MoveToOuterDisposeScope();                                  // (B, T, dim)
    }
}
