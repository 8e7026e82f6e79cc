using SparseAttention.Kernels;
using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Modules;

public sealed partial class SynthesizerAttention
{
    /// <summary>A decoder for causal synthesizer heads (null when bidirectional). Their rows are indexed by position, so
    /// they keep every value (and every key when mixed with dot products) of the context.</summary>
    public HeadGroupDecoder? CreateDecoder(long batch, ScalarType dtype, Device device) =>
        Causal ? new Decoder(this, new KeyValueCache(batch, Heads, MaxLen, DimHead, DimHead, dtype, device)) : null;

    /// <summary>The scores (before masking) of one new query per row over keys 0 … L − 1, L = max(positions) + 1:
    /// row positions[b] of the synthetic logits, mixed as in <see cref="Scores"/>.</summary>
    /// <param name="q">(B, H, 1, D) the new tokens' queries / features.</param>
    /// <param name="keys">(B, H, L, D) cached keys (used when Mix ≠ None).</param>
    /// <param name="positions">Position of each row's new token.</param>
    /// <returns>(B, H, L).</returns>
    private Tensor ScoresAt(Tensor q, Tensor keys, int[] positions)
    {
        long batch = q.shape[0];
        int width = positions.Max() + 1;
        var rows = tensor(positions.Select(p => (long)p).ToArray(), device: q.device);   // (B)
        Tensor synthetic;
        switch (Kind)
        {
            case SynthesizerKind.Dense:
            {
                var hidden = Hidden(q);                                                        // (B, H, 1, D)
                var w = w2!.to(q.dtype).narrow(2, 0, width);                                   // (H, D, L)
                synthetic = (matmul(hidden, w) + b2!.to(q.dtype).narrow(1, 0, width).unsqueeze(1)).squeeze(2);   // (B, H, L)
                break;
            }
            case SynthesizerKind.FactorizedDense:
            {
                var hidden = Hidden(q);                                                        // (B, H, 1, D)
                var a = matmul(hidden, w_a!.to(q.dtype)) + b_a!.to(q.dtype).unsqueeze(1);       // (B, H, 1, a)
                var b = matmul(hidden, w_b!.to(q.dtype)) + b_b!.to(q.dtype).unsqueeze(1);       // (B, H, 1, b)
                synthetic = (b.unsqueeze(-1) * a.unsqueeze(-2)).flatten(-2).narrow(-1, 0, width).squeeze(2);   // (B, H, L)
                break;
            }
            case SynthesizerKind.Random:
                synthetic = random_logits!.index_select(1, rows).narrow(2, 0, width).transpose(0, 1);   // (B, H, L)
                break;
            default:
            {
                var left = r1!.index_select(1, rows);                                         // (H, B, k)
                var right = r2!.narrow(1, 0, width);                                           // (H, L, k)
                synthetic = matmul(left, right.transpose(1, 2)).transpose(0, 1);              // (B, H, L)
                break;
            }
        }
        synthetic = synthetic.to(q.dtype);
        if (Mix == SynthesizerMix.None) return synthetic;
        var dot = matmul(q, keys.transpose(-1, -2)).squeeze(2) / Math.Sqrt(DimHead);          // (B, H, L)
        if (Mix == SynthesizerMix.Sum) return synthetic + dot;
        var alpha = mix_weights!.to(q.dtype).softmax(-1);                                      // (H, 2)
        return alpha[.., 0].view(1, Heads, 1) * synthetic + alpha[.., 1].view(1, Heads, 1) * dot;
    }

    private sealed class Decoder(SynthesizerAttention synthesizer, KeyValueCache cache) : HeadGroupDecoder
    {
        public override Tensor Prefill(Tensor q, Tensor k, Tensor v, Tensor? keyMask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            var output = synthesizer.forward(q, k, v, keyMask);                             // (B, H, T, D)
            cache.WritePrompt(k, v, lengths);
            return output.MoveToOuterDisposeScope();
        }

        public override Tensor Step(Tensor q, Tensor k, Tensor v, int[] positions)
        {
            using var scope = NewDisposeScope();
            cache.Write(k, v, positions);
            long batch = q.shape[0];
            int width = positions.Max() + 1;
            var keys = cache.Keys.narrow(1, 0, width).permute(0, 2, 1, 3);                   // (B, H, L, D)
            var values = cache.Values.narrow(1, 0, width).permute(0, 2, 1, 3);               // (B, H, L, D)
            var scores = synthesizer.ScoresAt(q, keys, positions);                           // (B, H, L)
            var allowed = arange(width, device: q.device).view(1, 1, width)
                          .le(tensor(positions.Select(p => (long)p).ToArray(), device: q.device).view(batch, 1, 1));   // (B, 1, L): j ≤ t
            var probs = ReferenceAttention.MaskedSoftmax(scores, allowed.expand_as(scores));
            return matmul(probs.unsqueeze(2), values).MoveToOuterDisposeScope();             // (B, H, 1, D)
        }

        public override void Dispose() => cache.Dispose();
    }
}
