using static TorchSharp.torch;

namespace SparseAttention.Model;

public sealed partial class TransformerBlock
{
    /// <summary>A decoder for this block, or null when its attention cannot decode incrementally (non-causal
    /// routing cross-attention, head groups without a decoder).</summary>
    /// <param name="batch">Rows B.</param>
    /// <param name="maxSeqLen">The model's context.</param>
    /// <param name="dtype">Cache element type.</param>
    /// <param name="device">Cache device.</param>
    /// <param name="context">(B, S, contextDim) for cross-attention blocks, else null.</param>
    /// <param name="contextMask">Optional (B, S) bool, true = real context token.</param>
    public BlockDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device, Tensor? context = null, Tensor? contextMask = null)
    {
        SublayerDecoder? attention = attn switch
        {
            AttentionLayer self => self.CreateDecoder(batch, maxSeqLen, dtype, device),
            CrossAttentionLayer cross when context is not null => cross.CreateDecoder(context, contextMask),
            _ => null,
        };
        return attention is null ? null : new BlockDecoder(this, attention);
    }

    /// <summary>Whether <see cref="CreateDecoder"/> gives a decoder (given the context for cross-attention blocks).</summary>
    internal bool SupportsDecoding => attn switch
    {
        AttentionLayer self => self.Groups.All(g => g.SupportsDecoding),
        CrossAttentionLayer cross => cross.SupportsDecoding,
        _ => false,
    };

    /// <summary>
    /// Decoding state of one block at one depth: the attention layer's decoder and, with token shift, the previous
    /// token's input of each branch (a causal shift only ever reads the token before).
    /// </summary>
    public sealed class BlockDecoder : IDisposable
    {
        private readonly TransformerBlock block;
        private readonly SublayerDecoder attention;
        private Tensor? prevAttn, prevFf;   // (B, 1, dim) branch inputs of each row's latest token (token shift only)

        internal BlockDecoder(TransformerBlock block, SublayerDecoder attention)
        {
            this.block = block;
            this.attention = attention;
            if (block.shifts is not null)
                Check.That(block.shifts.All(s => s is 0 or 1), nameof(block), "incremental decoding needs a causal token shift (shifts 0 and 1).");
        }

        /// <summary>The attention branch over a prompt: (B, T, dim) → (B, T, dim), filling the caches.</summary>
        public Tensor AttentionPrefill(Tensor x, Tensor? mask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            Remember(ref prevAttn, x, lengths);
            var output = attention.Prefill(block.Prepare(x, block.attn_norm, mask), mask, lengths);
            if (block.attn_rezero is not null) output = block.attn_rezero.forward(output);
            return output.MoveToOuterDisposeScope();
        }

        /// <summary>The position-wise branch over a prompt: (B, T, dim) → (B, T, dim) (its auxiliary loss is dropped).</summary>
        public Tensor FeedForwardPrefill(Tensor x, Tensor? mask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            Remember(ref prevFf, x, lengths);
            return block.FeedForwardBranch(x, mask).Output.MoveToOuterDisposeScope();
        }

        /// <summary>The attention branch of one new token per row: (B, 1, dim) → (B, 1, dim).</summary>
        public Tensor AttentionStep(Tensor x, int[] positions)
        {
            using var scope = NewDisposeScope();
            var shifted = Shift(ref prevAttn, x);
            var normed = block.attn_norm is null ? shifted : block.attn_norm.forward(shifted);
            var output = attention.Step(normed, positions);
            if (block.attn_rezero is not null) output = block.attn_rezero.forward(output);
            return output.MoveToOuterDisposeScope();
        }

        /// <summary>The feed-forward branch of one new token per row: (B, 1, dim) → (B, 1, dim).</summary>
        public Tensor FeedForwardStep(Tensor x)
        {
            using var scope = NewDisposeScope();
            var shifted = Shift(ref prevFf, x);
            var output = block.RunPositionwise(block.ff_norm is null ? shifted : block.ff_norm.forward(shifted), null).Output;
            if (block.ff_rezero is not null) output = block.ff_rezero.forward(output);
            return output.MoveToOuterDisposeScope();
        }

        /// <summary>With token shift, keeps each row's last real input (B, 1, dim) for the next step.</summary>
        private void Remember(ref Tensor? previous, Tensor x, int[] lengths)
        {
            if (block.shifts is null) return;
            long batch = x.shape[0], dim = x.shape[2];
            using var scope = NewDisposeScope();
            var last = tensor(lengths.Select(n => (long)n - 1).ToArray(), device: x.device).view(batch, 1, 1).expand(batch, 1, dim);
            var rows = x.detach().gather(1, last);                                           // (B, 1, dim)
            previous?.Dispose();
            previous = rows.contiguous().DetachFromDisposeScope();
        }

        /// <summary>Token shift of one token: <see cref="TokenShift.Apply"/> on (previous, new), last position — the
        /// slices with shift 1 come from the previous token's input.</summary>
        private Tensor Shift(ref Tensor? previous, Tensor x)
        {
            if (block.shifts is null) return x;
            var result = TokenShift.Apply(cat([previous!, x], 1), block.shifts).narrow(1, 1, 1);   // (B, 1, dim)
            previous!.copy_(x.detach());
            return result;
        }

        public void Dispose()
        {
            attention.Dispose();
            prevAttn?.Dispose();
            prevFf?.Dispose();
        }
    }
}
