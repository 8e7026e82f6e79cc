using System.Collections.Concurrent;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// Rotary position embeddings: feature pairs (i, i + D/2) of every query and key are rotated by the
/// angle position·θ<sub>i</sub>, θ<sub>i</sub> = base<sup>−2i/D</sup>, so that q·k after rotation depends on
/// the two positions only through their difference. No parameters. The cos/sin tables are computed once in
/// float64 per (D, base, dtype, device), for positions 0 … L − 1, L growing (doubling) when a call reaches
/// further, and rounded to the input's dtype; every call slices them, so a cached call equals a fresh
/// computation.
/// </summary>
/// <remarks>Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (arXiv 2104.09864).
/// This uses the "rotate half" pairing; any fixed pairing has the same relative property.</remarks>
public static class RotaryEmbedding
{
    private sealed record Tables(long Length, Tensor Cos, Tensor SignedSin);   // (L, D) each, never disposed (shared)
    private static readonly ConcurrentDictionary<(long Dim, double Theta, ScalarType Dtype, DeviceType Device, int Index), Tables> cache = new();

    /// <summary>Rotates <paramref name="x"/> (..., T, D), D even, for positions offset … offset + T − 1.</summary>
    /// <param name="x">(..., T, D), e.g. (B, H, T, D).</param>
    /// <param name="offset">Position of the first row (≥ 0); incremental decoding passes the token's position with T = 1.</param>
    /// <param name="theta">The base of the frequencies.</param>
    /// <returns>(..., T, D), same dtype, contiguous.</returns>
    public static Tensor Apply(Tensor x, long offset = 0, double theta = 10000)
    {
        Check.That(x.dim() >= 2, nameof(x), $"must have shape (..., T, D), got {Check.ShapeOf(x)}.");
        long seqLen = x.shape[^2], dim = x.shape[^1];
        Check.That(dim % 2 == 0, nameof(x), $"rotary embeddings need an even feature size, got D = {dim}.");
        Check.That(offset >= 0, nameof(offset), $"must be >= 0, got {offset}.");
        using var scope = NewDisposeScope();
        var tables = TablesFor(offset + seqLen, dim, theta, x.dtype, x.device);
        var cos = tables.Cos.narrow(0, offset, seqLen);                                            // (T, D)
        var signedSin = tables.SignedSin.narrow(0, offset, seqLen);                                // (T, D): (−sin, sin)
        long half = dim / 2;
        var swapped = cat([x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);                 // (..., T, D), contiguous
        // rotate_half(x)·sin = swapped·(−sin, sin). The contiguous operand goes first so the result is contiguous
        // even when x is a strided view (e.g. q and k sliced out of a fused projection).
        return (swapped * signedSin).addcmul(x, cos, 1).MoveToOuterDisposeScope();                // (..., T, D)
    }

    private static Tables TablesFor(long length, long dim, double theta, ScalarType dtype, Device device)
    {
        var key = (dim, theta, dtype, device.type, device.index);
        if (cache.TryGetValue(key, out var tables) && tables.Length >= length) return tables;
        lock (cache)
        {
            if (cache.TryGetValue(key, out tables) && tables.Length >= length) return tables;
            // Grow geometrically so decoding one position at a time rebuilds the tables O(log T) times. A replaced
            // table is not disposed: another thread may still be reading a slice of it.
            long size = Math.Max(length, 2 * (tables?.Length ?? 0));
            using var scope = NewDisposeScope();
            long half = dim / 2;
            var invFreq = pow(theta, -arange(half, dtype: ScalarType.Float64, device: device) / half);   // (D/2)
            var angles = outer(arange(size, dtype: ScalarType.Float64, device: device), invFreq);         // (L, D/2)
            var (c, s) = (angles.cos(), angles.sin());
            var fresh = new Tables(size, cat([c, c], -1).to(dtype).DetachFromDisposeScope(),                // (L, D)
                                         cat([-s, s], -1).to(dtype).DetachFromDisposeScope());              // (L, D)
            cache[key] = fresh;
            return fresh;
        }
    }
}

/// <summary>
/// The sinusoidal timing signal of the Transformer (Vaswani et al. 2017) as tensor2tensor's <c>add_timing_signal_1d</c>
/// builds it (what the Routing Transformer authors' <c>add_timing_signal</c> adds to the embeddings): with
/// n = ⌊channels / 2⌋ timescales τ<sub>i</sub> = 10000<sup>−i/max(n − 1, 1)</sup>, channel i holds sin(p·τ<sub>i</sub>)
/// and channel n + i holds cos(p·τ<sub>i</sub>) for position p; an odd last channel is 0. No parameters.
/// </summary>
public static class TimingSignal
{
    /// <param name="positions">(B, T) int64 positions (≥ 0).</param>
    /// <param name="channels">Feature size of the signal.</param>
    /// <param name="dtype">Result dtype (computed in float64, then rounded).</param>
    /// <returns>(B, T, channels).</returns>
    public static Tensor Of(Tensor positions, int channels, ScalarType dtype = ScalarType.Float32)
    {
        Check.Shape(positions, nameof(positions), "(B, T)", -1, -1);
        Check.Positive(channels, nameof(channels));
        using var scope = NewDisposeScope();
        long n = channels / 2;
        var scales = exp(arange(n, dtype: ScalarType.Float64, device: positions.device) * (-Math.Log(1e4) / Math.Max(n - 1, 1)));   // (n)
        var angles = positions.to(ScalarType.Float64).unsqueeze(-1) * scales;              // (B, T, n)
        var signal = cat([angles.sin(), angles.cos()], -1);                                // (B, T, 2n)
        if (channels % 2 == 1) signal = nn.functional.pad(signal, [0, 1]);                 // (B, T, channels)
        return signal.to(dtype).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Token shift: some feature slices of each token are replaced by the same slices of a neighbouring
/// token, a cheap way to mix in local context. With shifts (s₀, …, s<sub>n−1</sub>) the features are cut
/// into n slices of ⌊dim/n⌋ (the remainder is left alone) and slice i at position t takes the value at
/// position t − s<sub>i</sub> (zero outside the sequence). Causal models use (0, 1): the second half
/// comes from the previous token. Bidirectional models use (−1, 0, 1): the first third comes from the
/// next token, the last third from the previous token. Padded positions are zeroed before shifting so
/// that they cannot reach real tokens. This is the variant of the PyTorch routing-transformer.
/// </summary>
public static class TokenShift
{
    /// <summary>The shifts used for a causal or bidirectional model.</summary>
    public static int[] ShiftsFor(bool causal) => causal ? [0, 1] : [-1, 0, 1];

    /// <param name="x">(B, T, dim).</param>
    /// <param name="shifts">Shift per slice; positive = take from an earlier token.</param>
    /// <param name="mask">Optional (B, T) bool; true = real token.</param>
    /// <returns>(B, T, dim).</returns>
    public static Tensor Apply(Tensor x, int[] shifts, Tensor? mask = null)
    {
        Check.Shape(x, nameof(x), "(B, T, dim)", -1, -1, -1);
        Check.KeyMask(mask, x.shape[0], x.shape[1]);
        using var scope = NewDisposeScope();
        long seqLen = x.shape[1], slice = x.shape[2] / shifts.Length;
        if (slice == 0) return x.alias().MoveToOuterDisposeScope();
        var parts = new List<Tensor>();
        for (int i = 0; i < shifts.Length; i++)
        {
            var part = x.narrow(2, i * slice, slice);                                     // (B, T, slice)
            int s = shifts[i];
            if (s != 0)
            {
                if (mask is not null) part = part.masked_fill(mask.logical_not().unsqueeze(-1), 0);
                long n = Math.Min(Math.Abs(s), seqLen);
                part = s > 0
                    ? nn.functional.pad(part.narrow(1, 0, seqLen - n), [0, 0, n, 0])       // (B, T, slice): from t − s
                    : nn.functional.pad(part.narrow(1, n, seqLen - n), [0, 0, 0, n]);      // (B, T, slice): from t + |s|
            }
            parts.Add(part);
        }
        long rest = x.shape[2] - slice * shifts.Length;
        if (rest > 0) parts.Add(x.narrow(2, slice * shifts.Length, rest));
        return cat(parts, 2).MoveToOuterDisposeScope();                                   // (B, T, dim)
    }
}

/// <summary>ScaleNorm: g · x / max(‖x‖, eps) over the last dimension, one learned scalar g (init √dim).</summary>
/// <remarks>Nguyen and Salazar 2019, "Transformers without Tears" (arXiv 1910.05895).</remarks>
public sealed class ScaleNorm : nn.Module<Tensor, Tensor>
{
    private readonly Parameter g;
    private readonly double eps;

    public ScaleNorm(int dim, double eps = 1e-5, string name = "scale_norm") : base(name)
    {
        Check.Positive(dim, nameof(dim));
        this.eps = eps;
        g = new Parameter(ones(1) * Math.Sqrt(dim));
        RegisterComponents();
    }

    /// <param name="x">(..., dim).</param>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var norm = x.norm(-1, keepdim: true).clamp_min(eps);                              // (..., 1)
        return (x / norm * g).MoveToOuterDisposeScope();
    }
}

/// <summary>ReZero gate: multiplies a residual branch by a learned scalar initialised to 0, so every
/// layer starts as the identity.</summary>
/// <remarks>Bachlechner et al. 2020, "ReZero is All You Need" (arXiv 2003.04887).</remarks>
public sealed class ReZero : nn.Module<Tensor, Tensor>
{
    private readonly Parameter g;

    public ReZero(string name = "rezero") : base(name)
    {
        g = new Parameter(zeros(1));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        return (x * g).MoveToOuterDisposeScope();
    }
}

/// <summary>The feed-forward nonlinearity (<c>ff_activation</c>; the PyTorch library's default is GELU).</summary>
public enum FeedForwardActivation
{
    /// <summary>Gaussian error linear unit (exact, erf form).</summary>
    Gelu,
    /// <summary>max(0, x).</summary>
    Relu,
    /// <summary>x · sigmoid(x) (also called Swish).</summary>
    Silu,
    /// <summary>Squared ReLU, max(0, x)² (So et al. 2021, Primer).</summary>
    ReluSquared,
}

/// <summary>
/// Position-wise feed-forward: Linear(dim → mult·dim) → activation (GELU by default) → dropout → Linear(mult·dim → dim),
/// or with GLU the gated variant act(x·W) ⊙ (x·V) (GEGLU with GELU). With chunks &gt; 1 the sequence is processed in that
/// many pieces along T (the Reformer's chunking): the result is the same, the widest intermediate is
/// (B, T/chunks, mult·dim) at a time when gradients are not recorded.
/// With <see cref="ComputeDtype.BFloat16"/> both matmuls, the activation and the dropout run in bfloat16 (the
/// float32 weights are cast at each matmul) and the output is cast back to the input's dtype.
/// </summary>
/// <remarks>GLU variants: Shazeer 2020 (arXiv 2002.05202). Chunking: Kitaev et al. 2020 (Reformer).</remarks>
public sealed class FeedForward : nn.Module<Tensor, Tensor>
{
    private readonly Linear w1, w2;
    private readonly bool glu;
    private readonly int chunks;
    private readonly double dropout;
    private readonly ComputeDtype computeDtype;
    private readonly FeedForwardActivation activation;

    public FeedForward(int dim, int mult = 4, bool glu = false, double dropout = 0, int chunks = 1, string name = "feed_forward",
        ComputeDtype computeDtype = ComputeDtype.Float32, FeedForwardActivation activation = FeedForwardActivation.Gelu) : base(name)
    {
        Check.That(Enum.IsDefined(activation), nameof(activation), $"unknown activation {activation}.");
        this.activation = activation;
        Check.That(Enum.IsDefined(computeDtype), nameof(computeDtype), $"expected Float32 or BFloat16, got {computeDtype}.");
        this.computeDtype = computeDtype;
        Check.Positive(dim, nameof(dim));
        Check.Positive(mult, nameof(mult));
        Check.Positive(chunks, nameof(chunks));
        Check.That(dropout >= 0 && dropout < 1, nameof(dropout), $"must be in [0, 1), got {dropout}.");
        this.glu = glu;
        this.chunks = chunks;
        this.dropout = dropout;
        int hidden = dim * mult;
        w1 = nn.Linear(dim, glu ? 2 * hidden : hidden);
        w2 = nn.Linear(hidden, dim);
        RegisterComponents();
    }

    /// <param name="x">(B, T, dim).</param>
    /// <returns>(B, T, dim).</returns>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var output = chunks <= 1 || x.dim() < 2 || x.shape[1] <= 1
            ? Apply(x)
            : cat(x.chunk(chunks, 1).Select(Apply).ToArray(), 1);                          // (B, T, dim)
        return output.MoveToOuterDisposeScope();
    }

    private Tensor Apply(Tensor x)
    {
        var h = MixedPrecision.Linear(x, w1.weight!, w1.bias, computeDtype);                // (B, t, hidden or 2·hidden)
        if (glu)
        {
            var parts = h.chunk(2, -1);                                                     // 2 × (B, t, hidden)
            h = Activate(parts[0]) * parts[1];
        }
        else h = Activate(h);
        h = nn.functional.dropout(h, dropout, training);
        return MixedPrecision.Linear(h, w2.weight!, w2.bias, computeDtype).to(x.dtype);     // (B, t, dim)
    }

    private Tensor Activate(Tensor h) => activation switch
    {
        FeedForwardActivation.Relu => nn.functional.relu(h),
        FeedForwardActivation.Silu => nn.functional.silu(h),
        FeedForwardActivation.ReluSquared => nn.functional.relu(h).square(),
        _ => nn.functional.gelu(h),
    };
}
