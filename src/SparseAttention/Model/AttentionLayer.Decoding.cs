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

    /// <summary><see cref="ProjectQkv"/> with every row at its own position: (B, 1, dim) → q, k, v (B, H, 1, Dh).</summary>
    private (Tensor Q, Tensor K, Tensor V) ProjectQkvAt(Tensor x, int[] positions, Tensor fusedWeight)
    {
        if (positions.All(p => p == positions[0])) return ProjectQkv(x, positions[0], fusedWeight);
        var rows = positions.Select((p, b) => ProjectQkv(x.narrow(0, b, 1), p, fusedWeight)).ToArray();   // rows at their own positions
        return (cat(rows.Select(r => r.Q).ToArray(), 0), cat(rows.Select(r => r.K).ToArray(), 0), cat(rows.Select(r => r.V).ToArray(), 0));
    }

    /// <summary>Decoding state of one <see cref="AttentionLayer"/>: one <see cref="HeadGroupDecoder"/> per head group.</summary>
    public sealed class AttentionLayerDecoder : IDisposable
    {
        private readonly AttentionLayer layer;
        private readonly List<HeadGroupDecoder> decoders;
        private readonly Tensor fusedWeight;   // (3·H·Dh, dim), concatenated once: the weights are fixed while decoding

        internal AttentionLayerDecoder(AttentionLayer layer, List<HeadGroupDecoder> decoders)
        {
            this.layer = layer;
            this.decoders = decoders;
            using (no_grad()) fusedWeight = layer.FusedQkvWeight().DetachFromDisposeScope();
        }

        /// <param name="x">(B, T, dim) normalised prompt inputs, rows right-padded.</param>
        /// <param name="mask">Null or (B, T) bool, true for the first lengths[b] positions.</param>
        /// <param name="lengths">Real tokens per row.</param>
        /// <returns>(B, T, dim), the layer's forward output.</returns>
        public Tensor Prefill(Tensor x, Tensor? mask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            var (q, k, v) = layer.ProjectQkv(x, 0, fusedWeight);
            var outputs = new List<Tensor>();
            long first = 0;
            for (int g = 0; g < decoders.Count; g++)
            {
                int hg = layer.groups[g].Heads;
                outputs.Add(decoders[g].Prefill(q.narrow(1, first, hg), k.narrow(1, first, hg), v.narrow(1, first, hg), mask, lengths));
                first += hg;
            }
            return layer.ProjectOut(outputs).MoveToOuterDisposeScope();                      // (B, T, dim); eval: no dropout
        }

        /// <param name="x">(B, 1, dim) normalised input of the new token of each row.</param>
        /// <param name="positions">Its position in each row.</param>
        /// <returns>(B, 1, dim).</returns>
        public Tensor Step(Tensor x, int[] positions)
        {
            using var scope = NewDisposeScope();
            var (q, k, v) = layer.ProjectQkvAt(x, positions, fusedWeight);                                  // (B, H, 1, Dh) each
            var outputs = new List<Tensor>();
            long first = 0;
            for (int g = 0; g < decoders.Count; g++)
            {
                int hg = layer.groups[g].Heads;
                outputs.Add(decoders[g].Step(q.narrow(1, first, hg), k.narrow(1, first, hg), v.narrow(1, first, hg), positions));
                first += hg;
            }
            return layer.ProjectOut(outputs).MoveToOuterDisposeScope();                      // (B, 1, dim)
        }

        public void Dispose()
        {
            foreach (var d in decoders) d.Dispose();
            fusedWeight.Dispose();
        }
    }
}
