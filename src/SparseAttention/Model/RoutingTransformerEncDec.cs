using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// Encoder-decoder: an encoder <see cref="RoutingTransformerLM"/> (its output layer unused) reads the
/// source tokens; a decoder <see cref="RoutingTransformerLM"/> with ReceivesContext cross-attends to
/// the encoder's hidden states (B, S, encoder Dim), masked by the source mask. The auxiliary loss is
/// the sum of both.
/// </summary>
public sealed class RoutingTransformerEncDec : nn.Module<Tensor, Tensor, Tensor?, Tensor?, (Tensor Logits, Tensor AuxLoss)>
{
    private readonly RoutingTransformerLM encoder, decoder;

    /// <param name="encoderConfig">Encoder configuration; ReceivesContext must be false.</param>
    /// <param name="decoderConfig">Decoder configuration; ReceivesContext must be true and the context
    /// width (ContextDim, default Dim) must equal the encoder's Dim.</param>
    /// <param name="name">Module name.</param>
    public RoutingTransformerEncDec(TransformerConfig encoderConfig, TransformerConfig decoderConfig, string name = "routing_transformer_enc_dec")
        : base(name)
    {
        ArgumentNullException.ThrowIfNull(encoderConfig);
        ArgumentNullException.ThrowIfNull(decoderConfig);
        Check.That(!encoderConfig.ReceivesContext, nameof(encoderConfig), "the encoder must not receive context (ReceivesContext = false).");
        Check.That(decoderConfig.ReceivesContext, nameof(decoderConfig), "the decoder must receive context (ReceivesContext = true).");
        Check.That(decoderConfig.ResolvedContextDim == encoderConfig.Dim, nameof(decoderConfig),
            $"the decoder's ContextDim ({decoderConfig.ResolvedContextDim}) must equal the encoder's Dim ({encoderConfig.Dim}).");
        encoder = new RoutingTransformerLM(encoderConfig);
        decoder = new RoutingTransformerLM(decoderConfig);
        RegisterComponents();
    }

    public RoutingTransformerLM Encoder => encoder;

    public RoutingTransformerLM Decoder => decoder;

    /// <param name="source">(B, S) int64 source tokens.</param>
    /// <param name="target">(B, T) int64 target tokens.</param>
    /// <param name="sourceMask">Optional (B, S) bool; true = real source token.</param>
    /// <param name="targetMask">Optional (B, T) bool; true = real target token.</param>
    /// <returns>Decoder logits (B, T, decoder NumTokens) and the summed auxiliary loss.</returns>
    public override (Tensor Logits, Tensor AuxLoss) forward(Tensor source, Tensor target, Tensor? sourceMask = null, Tensor? targetMask = null)
    {
        using var scope = NewDisposeScope();
        var (context, encAux) = encoder.forward(source, sourceMask, returnEmbeddings: true);                    // (B, S, encoder Dim)
        var (logits, decAux) = decoder.forward(target, targetMask, context, sourceMask);  // (B, T, V)
        return (logits.MoveToOuterDisposeScope(), (encAux + decAux).MoveToOuterDisposeScope());
    }

    /// <summary>Encodes <paramref name="source"/> once, then samples the decoder — incrementally when it supports it (a causal
    /// decoder whose head groups all decode; see <see cref="RoutingTransformerLM.SupportsCachedDecoding"/>), else by re-encoding the target
    /// per token; both give the same tokens. See <see cref="Sampling.Generate"/>.</summary>
    public Tensor Generate(Tensor source, Tensor prompt, int maxNewTokens, Tensor? sourceMask = null, double temperature = 1.0,
        int? topK = null, double? topP = null, long? eos = null, ulong seed = 0, bool useCache = true)
    {
        bool wasTraining = training;
        eval();
        try
        {
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            var (context, _) = encoder.forward(source, sourceMask, returnEmbeddings: true);                     // (B, S, encoder Dim)
            if (useCache && decoder.SupportsCachedDecoding)
                return Sampling.GenerateCached(decoder, prompt, maxNewTokens, temperature, topK, topP, eos, seed,
                    context: context, contextMask: sourceMask).MoveToOuterDisposeScope();
            return Sampling.Generate(this, prompt, maxNewTokens, decoder.Config.MaxSeqLen,
                window => decoder.forward(window, null, context, sourceMask).Logits,
                temperature, topK, topP, eos, seed).MoveToOuterDisposeScope();
        }
        finally
        {
            train(wasTraining);
        }
    }
}
