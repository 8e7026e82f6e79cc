using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>Decoding state of one attention sublayer (self- or cross-attention): the prompt through the ordinary
/// forward (filling caches), then one token per row.</summary>
public abstract class SublayerDecoder : IDisposable
{
    /// <param name="x">(B, T, dim) normalised prompt inputs, rows right-padded.</param>
    /// <param name="mask">Null or (B, T) bool, true for the first lengths[b] positions.</param>
    /// <param name="lengths">Real tokens per row.</param>
    /// <returns>(B, T, dim), the sublayer's forward output.</returns>
    public abstract Tensor Prefill(Tensor x, Tensor? mask, int[] lengths);

    /// <param name="x">(B, 1, dim) normalised input of the new token of each row.</param>
    /// <param name="positions">Its position in each row.</param>
    /// <returns>(B, 1, dim).</returns>
    public abstract Tensor Step(Tensor x, int[] positions);

    public abstract void Dispose();
}

public sealed partial class CrossAttentionLayer
{
    /// <summary>A decoder for cross-attention to <paramref name="context"/> (B, S, contextDim): the context's keys and values
    /// are projected once and, for routing cross-attention, every cluster's context keys chosen once
    /// (<see cref="Modules.RoutingAttention.CrossContextGroups"/>); each new query then attends what the full forward gives it.
    /// Null for non-causal routing cross-attention (its balanced query groups depend on every query).</summary>
    public SublayerDecoder? CreateDecoder(Tensor context, Tensor? contextMask) =>
        routing is null || routing.Causal ? new Decoder(this, context, contextMask) : null;

    /// <summary>Whether <see cref="CreateDecoder"/> gives a decoder.</summary>
    internal bool SupportsDecoding => routing is null || routing.Causal;

    private sealed class Decoder : SublayerDecoder
    {
        private readonly CrossAttentionLayer layer;
        private readonly Tensor context, k, v;    // (B, S, contextDim), (B, H, S, Dh) × 2
        private readonly Tensor? contextMask;     // (B, S)
        private readonly Tensor? contextGroups;   // routing: (B, H, C, Wc) context positions per cluster

        public Decoder(CrossAttentionLayer layer, Tensor context, Tensor? contextMask)
        {
            this.layer = layer;
            this.context = context;
            this.contextMask = contextMask;
            long batch = context.shape[0], ctxLen = context.shape[1];
            using var scope = NewDisposeScope();
            using var noGrad = no_grad();
            k = layer.ContextKeys(context).contiguous().DetachFromDisposeScope();                // (B, H, S, Dh)
            v = layer.to_v.forward(context).view(batch, ctxLen, layer.heads, layer.dimHead).transpose(1, 2)
                     .contiguous().DetachFromDisposeScope();
            contextGroups = layer.routing?.CrossContextGroups(k, contextMask, layer.contextWindowSize).DetachFromDisposeScope();
        }

        public override Tensor Prefill(Tensor x, Tensor? mask, int[] lengths) => layer.Forward(x, mask, context, contextMask).Output;

        public override Tensor Step(Tensor x, int[] positions)
        {
            using var scope = NewDisposeScope();
            long batch = x.shape[0];
            var q = layer.to_q.forward(x).view(batch, 1, layer.heads, layer.dimHead).transpose(1, 2);   // (B, H, 1, Dh)
            var attended = layer.routing is null
                ? Kernels.ReferenceAttention.Attention(q, k, v, keyMask: contextMask)                     // (B, H, 1, Dh)
                : layer.routing.CrossStep(q, k, v, contextGroups!, contextMask);
            var merged = attended.transpose(1, 2).reshape(batch, 1, layer.heads * layer.dimHead);        // (B, 1, H·Dh)
            return layer.to_out.forward(merged).MoveToOuterDisposeScope();                               // (B, 1, dim)
        }

        public override void Dispose()
        {
            k.Dispose();
            v.Dispose();
            contextGroups?.Dispose();
        }
    }
}

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
    public sealed class AttentionLayerDecoder : SublayerDecoder
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

        public override Tensor Prefill(Tensor x, Tensor? mask, int[] lengths)
        {
            using var scope = NewDisposeScope();
            var (q, k, v) = layer.ProjectQkv(x, 0, fusedWeight);                             // (B, H, T, Dh) each
            return PerGroup(q, k, v, (d, qg, kg, vg) => d.Prefill(qg, kg, vg, mask, lengths)).MoveToOuterDisposeScope();   // (B, T, dim)
        }

        public override Tensor Step(Tensor x, int[] positions)
        {
            using var scope = NewDisposeScope();
            var (q, k, v) = layer.ProjectQkvAt(x, positions, fusedWeight);                  // (B, H, 1, Dh) each
            return PerGroup(q, k, v, (d, qg, kg, vg) => d.Step(qg, kg, vg, positions)).MoveToOuterDisposeScope();   // (B, 1, dim)
        }

        /// <summary>Each group's decoder on its heads' slice of q, k, v; the outputs merged and projected (eval: no dropout).</summary>
        private Tensor PerGroup(Tensor q, Tensor k, Tensor v, Func<HeadGroupDecoder, Tensor, Tensor, Tensor, Tensor> run)
        {
            var outputs = new List<Tensor>();
            long first = 0;
            for (int g = 0; g < decoders.Count; g++)
            {
                int hg = layer.groups[g].Heads;
                outputs.Add(run(decoders[g], q.narrow(1, first, hg), k.narrow(1, first, hg), v.narrow(1, first, hg)));   // (B, Hg, T, Dh)
                first += hg;
            }
            return layer.ProjectOut(outputs);
        }

        public override void Dispose()
        {
            foreach (var d in decoders) d.Dispose();
            fusedWeight.Dispose();
        }
    }
}
