using static TorchSharp.torch;

namespace SparseAttention.Model;

public sealed partial class AttentionLayer
{
    /// <summary>A decoder for this layer (one per head group), or null when some group cannot decode incrementally.</summary>
    public AttentionLayerDecoder? CreateDecoder(long batch, int maxSeqLen, ScalarType dtype, Device device)
    {
        var decoders = new List<HeadGroupDecoder>();
        foreach (var group in groups)
        {
            var decoder = group.CreateDecoder(batch, maxSeqLen, dtype, device);
            if (decoder is null)
            {
                foreach (var d in decoders) d.Dispose();
                return null;
            }
            decoders.Add(decoder);
        }
        return new AttentionLayerDecoder(this, decoders);
    }

    /// <summary>q, k, v of <paramref name="x"/> (B, T, dim) split into heads, (B, H, T, Dh) each, rotary applied for
    /// positions offset … offset + T − 1 of every row, or <paramref name="positions"/>[b] for row b when T = 1.</summary>
    private (Tensor Q, Tensor K, Tensor V) DecodingProjections(Tensor x, int[]? positions)
    {
        long batch = x.shape[0], seqLen = x.shape[1];
        Tensor SplitHeads(Tensor t) => t.view(batch, seqLen, heads, dimHead).transpose(1, 2);   // (B, H, T, Dh)
        var q = SplitHeads(to_q.forward(x));
        var k = SplitHeads(to_k.forward(x));
        var v = SplitHeads(to_v.forward(x));
        if (rotary)
        {
            q = RotaryAt(q, positions);
            k = RotaryAt(k, positions);
        }
        return (q, k, v);
    }

    private static Tensor RotaryAt(Tensor x, int[]? positions)
    {
        if (positions is null || positions.All(p => p == positions[0]))
            return RotaryEmbedding.Apply(x, positions?[0] ?? 0);                                  // (B, H, T, Dh)
        return cat(positions.Select((p, b) => RotaryEmbedding.Apply(x.narrow(0, b, 1), p)).ToArray(), 0);   // rows at their own positions
    }

    /// <summary>The groups' outputs (B, H, T, Dh) merged and projected: (B, T, dim).</summary>
    private Tensor MergeHeads(List<Tensor> outputs, long batch, long seqLen)
    {
        var attended = outputs.Count == 1 ? outputs[0] : cat(outputs, 1);                    // (B, H, T, Dh)
        var merged = attended.transpose(1, 2).reshape(batch, seqLen, heads * dimHead);         // (B, T, H·Dh)
        return to_out.forward(merged);                                                          // (B, T, dim); eval: no dropout
    }

    /// <summary>Decoding state of one <see cref="AttentionLayer"/>: one <see cref="HeadGroupDecoder"/> per head group.</summary>
    public sealed class AttentionLayerDecoder : IDisposable
    {
        private readonly AttentionLayer layer;
        private readonly List<HeadGroupDecoder> decoders;

        internal AttentionLayerDecoder(AttentionLayer layer, List<HeadGroupDecoder> decoders)
        {
            this.layer = layer;
            this.decoders = decoders;
        }

        /// <param name="x">(B, T, dim) normalised prompt inputs, rows right-padded.</param>
        /// <param name="mask">Null or (B, T) bool, true for the first lengths[b] positions.</param>
        /// <param name="lengths">Real tokens per row.</param>
        /// <returns>(B, T, dim), the layer's forward output.</returns>
        public Tensor Prefill(Tensor x, Tensor? mask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            var (q, k, v) = layer.DecodingProjections(x, null);
            var outputs = new List<Tensor>();
            long first = 0;
            for (int g = 0; g < decoders.Count; g++)
            {
                int hg = layer.groups[g].Heads;
                outputs.Add(decoders[g].Prefill(q.narrow(1, first, hg), k.narrow(1, first, hg), v.narrow(1, first, hg), mask, lengths));
                first += hg;
            }
            return layer.MergeHeads(outputs, x.shape[0], x.shape[1]).MoveToOuterDisposeScope();
        }

        /// <param name="x">(B, 1, dim) normalised input of the new token of each row.</param>
        /// <param name="positions">Its position in each row.</param>
        /// <returns>(B, 1, dim).</returns>
        public Tensor Step(Tensor x, int[] positions)
        {
            using var scope = NewDisposeScope();
            var (q, k, v) = layer.DecodingProjections(x, positions);                          // (B, H, 1, Dh) each
            var outputs = new List<Tensor>();
            long first = 0;
            for (int g = 0; g < decoders.Count; g++)
            {
                int hg = layer.groups[g].Heads;
                outputs.Add(decoders[g].Step(q.narrow(1, first, hg), k.narrow(1, first, hg), v.narrow(1, first, hg), positions));
                first += hg;
            }
            return layer.MergeHeads(outputs, x.shape[0], 1).MoveToOuterDisposeScope();
        }

        public void Dispose()
        {
            foreach (var d in decoders) d.Dispose();
        }
    }
}
