using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// One layer: an attention sublayer and a position-wise sublayer (feed-forward, mixture of experts or product-key
/// memory; see <see cref="PositionwiseKind"/>), each wrapped as
/// token shift (optional) → pre-norm (LayerNorm or ScaleNorm; none with ReZero) → sublayer → ReZero gate
/// (optional). The block exposes the two residual branches f (attention) and g (feed-forward); the
/// layer stack adds them to the residual stream, either sequentially (x += f(x); x += g(x)) or as a
/// reversible coupling.
/// </summary>
public sealed partial class TransformerBlock : nn.Module
{
    private readonly AttentionSublayer attn;
    private readonly nn.Module ff;                  // FeedForward, MixtureOfExperts or ProductKeyMemory
    private readonly nn.Module<Tensor, Tensor>? attn_norm, ff_norm;
    private readonly ReZero? attn_rezero, ff_rezero;
    private readonly int[]? shifts;

    /// <summary>A block around <paramref name="attention"/> with a position-wise sublayer of kind <paramref name="positionwise"/>
    /// built from <paramref name="config"/>.</summary>
    public TransformerBlock(TransformerConfig config, AttentionSublayer attention, string name = "block",
        PositionwiseKind positionwise = PositionwiseKind.FeedForward) : base(name)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(attention);
        Check.That(Enum.IsDefined(positionwise), nameof(positionwise), $"unknown value {positionwise}.");
        attn = attention;
        FeedForward NewFeedForward() => new(config.Dim, config.FfMult, config.FfGlu, config.FfDropout, config.FfChunks,
            computeDtype: config.ComputeDtype, activation: config.FfActivation);
        ff = positionwise switch
        {
            PositionwiseKind.MixtureOfExperts => new MixtureOfExperts(config.Dim, config.MoeNumExperts, config.MoeLossCoef, NewFeedForward),
            PositionwiseKind.ProductKeyMemory => new ProductKeyMemory(config.Dim, config.PkmNumKeys, config.PkmTopK, config.PkmHeads, config.PkmDimHead),
            _ => NewFeedForward(),
        };
        if (config.UseRezero)
        {
            attn_rezero = new ReZero();
            ff_rezero = new ReZero();
        }
        else
        {
            attn_norm = Norm(config);
            ff_norm = Norm(config);
        }
        if (config.ShiftTokens) shifts = TokenShift.ShiftsFor(config.Causal);
        RegisterComponents();
    }

    /// <summary>The norm the configuration asks for: ScaleNorm or LayerNorm over Dim.</summary>
    public static nn.Module<Tensor, Tensor> Norm(TransformerConfig config) =>
        config.UseScaleNorm ? new ScaleNorm(config.Dim) : nn.LayerNorm(config.Dim);

    public AttentionSublayer Attention => attn;

    /// <summary>The position-wise sublayer: a <see cref="FeedForward"/>, <see cref="MixtureOfExperts"/> or <see cref="ProductKeyMemory"/>.</summary>
    public nn.Module Positionwise => ff;

    /// <summary>The attention branch f(x).</summary>
    /// <param name="x">(B, T, dim).</param>
    /// <param name="inputMask">Optional (B, T) bool; true = real token.</param>
    /// <param name="context">Optional (B, S, contextDim) for cross-attention blocks.</param>
    /// <param name="contextMask">Optional (B, S) bool; true = real context token.</param>
    /// <returns>(B, T, dim) and the scalar auxiliary loss.</returns>
    public (Tensor Output, Tensor AuxLoss) AttentionBranch(Tensor x, Tensor? inputMask, Tensor? context, Tensor? contextMask)
    {
        using var scope = NewDisposeScope();
        var (output, aux) = attn.Forward(Prepare(x, attn_norm, inputMask), inputMask, context, contextMask);
        if (attn_rezero is not null) output = attn_rezero.forward(output);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <summary>The position-wise branch g(x): (B, T, dim) → (B, T, dim), and its scalar auxiliary loss (the
    /// mixture of experts' load-balancing loss; zero otherwise).</summary>
    public (Tensor Output, Tensor AuxLoss) FeedForwardBranch(Tensor x, Tensor? inputMask)
    {
        using var scope = NewDisposeScope();
        var (output, aux) = RunPositionwise(Prepare(x, ff_norm, inputMask), inputMask);
        if (ff_rezero is not null) output = ff_rezero.forward(output);
        return (output.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope());
    }

    /// <summary>The position-wise sublayer on already prepared input (B, T, dim).</summary>
    private (Tensor Output, Tensor AuxLoss) RunPositionwise(Tensor x, Tensor? inputMask) => ff switch
    {
        MixtureOfExperts moe => moe.forward(x, inputMask),
        ProductKeyMemory pkm => (pkm.forward(x), zeros(Array.Empty<long>(), dtype: x.dtype, device: x.device)),
        FeedForward dense => (dense.forward(x), zeros(Array.Empty<long>(), dtype: x.dtype, device: x.device)),
        _ => throw new InvalidOperationException($"unexpected position-wise module {ff.GetType().Name}."),
    };

    private Tensor Prepare(Tensor x, nn.Module<Tensor, Tensor>? norm, Tensor? inputMask)
    {
        if (shifts is not null) x = TokenShift.Apply(x, shifts, inputMask);
        return norm is null ? x : norm.forward(x);
    }
}
