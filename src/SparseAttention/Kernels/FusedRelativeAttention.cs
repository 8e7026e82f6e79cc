using System.Runtime.CompilerServices;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Block-sparse attention with relative-position terms for float32 CPU tensors, with the fused block kernel doing the
/// bulk of the work and its inner loops unchanged. The allowed pairs are split into parts whose relative term the
/// kernel can carry, each part gives its normalised output and row log-sum-exp, and the parts are merged into one
/// softmax over their union by log-sum-exp (differentiably: each part's log-sum-exp has a gradient).
/// <list type="bullet">
/// <item>Shaw with clipping distance R: a key with j − i ≤ −R has the row's constant score term s·qᵢ·aᴷ₋R and value
/// term aⱽ₋R (likewise j − i ≥ R with aᴷ₊R, aⱽ₊R), so the far pairs are the fused kernel on the pattern restricted to
/// them, its log-sum-exp shifted by that constant and its output by that value row; the near band |j − i| &lt; R is
/// attended with tensor ops over (T, a few R) scores carrying the full terms.</item>
/// <item>ALiBi: on keys j ≤ i the bias −m·(i − j) is the key term m·j plus the row constant −m·i, which a softmax
/// ignores; the key term rides on one extra feature (qᵢ gets 1, kⱼ gets m·j/s). Keys j &gt; i (bidirectional patterns)
/// are a second part with −m·j and row constant +m·i. Causal ALiBi is thus one fused call (two over alternate row
/// segments when the pattern's reach is bounded, see remarks).</item>
/// </list>
/// Memory stays O(T·W). <see cref="BlockSparseAttention.Attention"/> uses it under <see cref="AttentionKernel.Auto"/>
/// and <see cref="AttentionKernel.Fused"/>; <see cref="BlockSparseOpsAttention"/> is its oracle.
/// </summary>
/// <remarks>ALiBi's key feature grows with the position, so float32 rounding of a score grows like m·T·2⁻²⁴ where the
/// Ops path computes m·(i − j) exactly. Causal patterns with a bounded reach ρ (local windows) keep it at m·2(ρ + 1)·2⁻²⁴
/// whatever T: rows of alternate segments of ρ + 1 positions are two fused calls, each with positions counted from the
/// start of the two segments its rows can see. Unbounded or bidirectional patterns keep m·T (about 3·10⁻⁴ in the
/// outputs at T = 8192 with the steepest standard slope ½).</remarks>
internal static class FusedRelativeAttention
{
    private static readonly ConditionalWeakTable<BlockMask, Dictionary<int, Plan>> Plans = new();

    /// <summary>True when <paramref name="relative"/> is a term this path knows and <paramref name="mask"/> still knows
    /// the pattern it was compiled from (to restrict it to the far pairs).</summary>
    public static bool Handles(BlockMask mask, RelativePositionTerms relative) =>
        mask.Pattern is not null && relative is ShawRelativePositions or AlibiPositions;

    /// <summary>The parts of a mask for one relative term: far masks (Shaw) or the sides of the diagonal (ALiBi), and
    /// Shaw's near band.</summary>
    private sealed class Plan
    {
        public BlockMask? Below;          // Shaw: j − i ≤ −R; ALiBi: j ≤ i (the mask itself when causal, or see Segment)
        public BlockMask? Above;          // Shaw: j − i ≥ R; ALiBi: j > i; null when the mask is causal (unless Segment)
        public int Band;                  // Shaw: the near band's block w ≥ R (keys of block n come from blocks n − 1 … n + 1)
        public int Slots;                 // Shaw: key blocks per query block in the band: 2 causal, 3 otherwise
        public Tensor? NearAllowed;       // Shaw: (1, H, nb, w, Slots·w) bool, the pattern on the near pairs
        public int Segment;               // causal ALiBi with a bounded reach: rows of even segments in Below, odd in Above

        public static Plan ForShaw(BlockMask mask, int r)
        {
            var pattern = mask.Pattern!;
            int seqLen = mask.SeqLen, block = mask.BlockSize, heads = mask.Heads;
            var plan = new Plan
            {
                Below = pattern.And(AttentionPattern.FromPredicate($"j − i ≤ −{r}", true, true, (_, i, j, _) => i - j >= r))
                               .Compile(seqLen, block, heads),
                Above = mask.IsCausal ? null
                    : pattern.And(AttentionPattern.FromPredicate($"j − i ≥ {r}", false, true, (_, i, j, _) => j - i >= r))
                             .Compile(seqLen, block, heads),
                Band = Math.Max(16, r),                                    // at least 16 rows: fewer, larger matmuls
                Slots = mask.IsCausal ? 2 : 3,
            };
            int w = plan.Band, slots = plan.Slots, nb = (seqLen + w - 1) / w, width = slots * w;
            var near = new bool[(long)heads * nb * w * width];
            for (int h = 0; h < heads; h++)
                for (int i = 0; i < seqLen; i++)
                {
                    int n = i / w, ii = i % w;
                    long rowBase = (((long)h * nb + n) * w + ii) * width;
                    for (int slot = 0; slot < width; slot++)
                    {
                        int j = (n - 1) * w + slot;
                        near[rowBase + slot] = Math.Abs(j - i) < r && mask.Allows(h, i, j);
                    }
                }
            using (var flat = tensor(near))
                plan.NearAllowed = flat.view(1, heads, nb, w, width).DetachFromDisposeScope();   // cached with the mask: outlives any scope
            return plan;
        }

        public static Plan ForAlibi(BlockMask mask)
        {
            var pattern = mask.Pattern!;
            int seqLen = mask.SeqLen, block = mask.BlockSize, heads = mask.Heads;
            if (mask.IsCausal)
            {
                // A bounded reach ρ: the rows of segment g (Sg = ρ + 1 positions) see keys of segments g − 1 and g only, so
                // rows of even and of odd segments each take positions from the start of their segment pair.
                if (pattern.CausalReach is not int reach || seqLen <= 2 * (reach + 1)) return new Plan { Below = mask };
                int segment = reach + 1;
                BlockMask Rows(int parity) => pattern.And(AttentionPattern.FromPredicate($"segment of {segment} rows, parity {parity}", true, true,
                    (_, i, _, _) => i / segment % 2 == parity)).Compile(seqLen, block, heads);
                return new Plan { Below = Rows(0), Above = Rows(1), Segment = segment };
            }
            return new Plan
            {
                Below = pattern.And(AttentionPattern.FromPredicate("j ≤ i", true, true, (_, i, j, _) => j <= i)).Compile(seqLen, block, heads),
                Above = pattern.And(AttentionPattern.FromPredicate("j > i", false, true, (_, i, j, _) => j > i)).Compile(seqLen, block, heads),
            };
        }
    }

    private static Plan PlanFor(BlockMask mask, RelativePositionTerms relative)
    {
        int key = relative is ShawRelativePositions shaw ? shaw.MaxDistance : -1;
        var plans = Plans.GetValue(mask, _ => []);
        lock (plans)
        {
            if (!plans.TryGetValue(key, out var plan))
                plans[key] = plan = key >= 0 ? Plan.ForShaw(mask, key) : Plan.ForAlibi(mask);
            return plan;
        }
    }

    /// <inheritdoc cref="BlockSparseOpsAttention.Attention"/>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask, double? scale,
        RelativePositionTerms relative)
    {
        BlockSparseOpsAttention.CheckArguments(q, k, v, mask, keyMask);
        relative.CheckFits(q.shape[1], q.shape[3], v.shape[3], nameof(relative));
        Check.That(FusedBlockSparseAttention.Supports(q), nameof(q), $"the fused kernels need float32 CPU tensors, got {q.dtype} on {q.device}.");
        Check.That(Handles(mask, relative), nameof(mask),
            $"the fused kernels take Shaw or ALiBi terms on a mask compiled from a pattern; got {relative.GetType().Name} on {mask.Name}.");
        double s = scale ?? 1.0 / Math.Sqrt(q.shape[3]);
        var plan = PlanFor(mask, relative);
        using var scope = NewDisposeScope();
        var result = relative is ShawRelativePositions shaw
            ? Shaw(q, k, v, plan, keyMask, s, shaw)
            : Alibi(q, k, v, mask, plan, keyMask, s, (AlibiPositions)relative);
        return result.MoveToOuterDisposeScope();
    }

    private static Tensor Shaw(Tensor q, Tensor k, Tensor v, Plan plan, Tensor? keyMask, double s, ShawRelativePositions shaw)
    {
        int r = shaw.MaxDistance;
        var near = Near(q, k, v, plan, keyMask, s, shaw);                              // (B, H, T, Dv + 1)
        var below = plan.Below is null ? null : PartWithLse(q, k, v, plan.Below, keyMask, s);   // (B, H, T, Dv + 1)
        var above = plan.Above is null ? null : PartWithLse(q, k, v, plan.Above, keyMask, s);
        var parts = new List<(Tensor Output, Tensor Lse, Tensor? Shift)> { Part(near) };
        foreach (var (far, row) in new[] { (below, 0), (above, 2 * r) })
        {
            if (far is null) continue;
            var (output, lse, _) = Part(far);
            var rowTerm = matmul(q, shaw.KeyTable[row].to(q.dtype)) * s;                 // (B, H, T): s·qᵢ·aᴷ
            parts.Add((output, lse + rowTerm, shaw.ValueTable[row].to(q.dtype)));
        }
        return Merge(parts);
    }

    private static Tensor Alibi(Tensor q, Tensor k, Tensor v, BlockMask mask, Plan plan, Tensor? keyMask, double s, AlibiPositions alibi)
    {
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2];
        var slopes = tensor(alibi.Slopes.ToArray(), dtype: ScalarType.Float32).view(1, heads, 1, 1);   // (1, H, 1, 1)
        var position = arange(seqLen, dtype: ScalarType.Float32).view(1, 1, seqLen, 1);                 // (1, 1, T, 1)
        var qx = cat([q, ones(batch, heads, seqLen, 1)], 3);                           // (B, H, T, D + 1)
        Tensor KeysWith(double sign) =>
            cat([k, (slopes * position * (sign / s)).expand(batch, heads, seqLen, 1)], 3);   // (B, H, T, D + 1): ±m·j/s
        if (plan.Above is null)
            return FusedBlockSparseAttention.Attention(qx, KeysWith(1), v, mask, keyMask, s);
        if (plan.Segment > 0)
        {
            // Keys from the start of the segment pair their rows see: magnitudes stay below 2·m·Sg instead of m·T.
            long sg = plan.Segment;
            var j = arange(seqLen, dtype: ScalarType.Int64);
            Tensor KeysFrom(Tensor start) =>
                cat([k, (slopes * (j - start).to(ScalarType.Float32).view(1, 1, seqLen, 1) / s).expand(batch, heads, seqLen, 1)], 3);
            var evenStart = (j + sg).div(2 * sg, rounding_mode: RoundingMode.floor) * (2 * sg) - sg;   // pair (2t − 1, 2t)
            var oddStart = j.div(2 * sg, rounding_mode: RoundingMode.floor) * (2 * sg);                 // pair (2t, 2t + 1)
            return FusedBlockSparseAttention.Attention(qx, KeysFrom(evenStart), v, plan.Below!, keyMask, s)
                 + FusedBlockSparseAttention.Attention(qx, KeysFrom(oddStart), v, plan.Above, keyMask, s);   // disjoint rows
        }
        var rowTerm = (slopes * position).squeeze(-1);                                 // (1, H, T): m·i
        var (below, lseBelow, _) = Part(PartWithLse(qx, KeysWith(1), v, plan.Below!, keyMask, s));
        var (above, lseAbove, _) = Part(PartWithLse(qx, KeysWith(-1), v, plan.Above, keyMask, s));
        return Merge([(below, lseBelow - rowTerm, null), (above, lseAbove + rowTerm, null)]);
    }

    /// <summary>Shaw's near band |j − i| &lt; R with tensor ops: query block n of w rows against key blocks n − 1 … n
    /// (+ 1), the full terms on every pair. Returns (B, H, T, Dv + 1): the output, then the row log-sum-exp (−∞ for
    /// no key).</summary>
    /// <remarks>The (B, H, blocks) axes are flattened into one axis of blocks, cut into chunks of about 2²⁰ scores; each
    /// chunk is one <see cref="Recomputation"/>, so its score-sized intermediates exist only while that chunk runs,
    /// forward or backward. The keys of block b + δ are the flattened keys shifted by δ: a chunk needs only the key
    /// blocks next to its own. Pairs that cross into another head's blocks (a head's first block's previous one, its
    /// last block's next one) lie outside the sequence, so the plan never allows them.</remarks>
    /// <summary>Scores per chunk of the near band (tests make it small to cross chunk boundaries).</summary>
    internal static int NearChunkScores { get; set; } = 1 << 20;

    private static Tensor Near(Tensor q, Tensor k, Tensor v, Plan plan, Tensor? keyMask, double s, ShawRelativePositions shaw)
    {
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dimV = v.shape[3];
        int w = plan.Band, slots = plan.Slots, width = slots * w;
        long nb = (seqLen + w - 1) / w, pad = nb * w - seqLen, blocks = batch * heads * nb;
        var allowed = plan.NearAllowed!;                                               // (1, H, nb, w, slots·w)
        if (keyMask is not null)
        {
            var drop = keyMask.logical_not().view(batch, 1, seqLen, 1);                // (B, 1, T, 1)
            k = k.masked_fill(drop, 0);                                                // NaN in padding must not leak via 0·x
            v = v.masked_fill(drop, 0);
            var km = nn.functional.pad(keyMask, [w, pad + (slots == 3 ? w : 0)], value: 0).view(batch, nb + slots - 1, w);
            var around = cat(Enumerable.Range(0, slots).Select(o => km.narrow(1, o, nb)).ToArray(), 2);  // (B, nb, slots·w)
            allowed = allowed.logical_and(around.view(batch, 1, nb, 1, width));        // (B, H, nb, w, slots·w)
        }
        var allowedFlat = allowed.expand(batch, heads, nb, w, width).reshape(blocks, w, width);   // (B·H·nb, w, slots·w)
        Tensor Blocks(Tensor x) =>                                                     // (B, H, T, ·) → (B·H·nb, w, ·)
            (pad == 0 ? x : nn.functional.pad(x, [0, 0, 0, pad])).reshape(blocks, w, x.shape[3]);
        var qf = Blocks(q);
        var kf = Blocks(k);
        var vf = Blocks(v);
        long chunk = Math.Max(1, NearChunkScores / (w * width));
        var chunks = new List<Tensor>();
        for (long b0 = 0; b0 < blocks; b0 += chunk)
        {
            long n = Math.Min(chunk, blocks - b0);
            long k0 = Math.Max(0, b0 - 1), k1 = Math.Min(blocks, b0 + n + slots - 2);  // key blocks [b0 − 1, b0 + n (+ 1)) that exist
            int lead = (int)(k0 - (b0 - 1)), trail = (int)(b0 + n + slots - 2 - k1);
            chunks.Add(Recomputation.Of(x => NearChunk(x[0]!, x[1]!, x[2]!, x[3]!, new ShawRelativePositions(x[4]!, x[5]!), s, lead, trail),
                qf.narrow(0, b0, n), kf.narrow(0, k0, k1 - k0), vf.narrow(0, k0, k1 - k0), allowedFlat.narrow(0, b0, n),
                shaw.KeyTable, shaw.ValueTable));
        }
        var both = cat(chunks, 0).view(batch, heads, nb * w, dimV + 1);               // (B, H, nb·w, Dv + 1)
        return pad == 0 ? both : both.narrow(2, 0, seqLen);
    }

    /// <summary>The near band of n query blocks.</summary>
    /// <param name="qc">(n, w, D) the query blocks b.</param>
    /// <param name="kc">(m, w, D) the existing key blocks among b − 1 … b (+ 1); <paramref name="lead"/> missing before
    /// them, <paramref name="trail"/> after.</param>
    /// <param name="vc">(m, w, Dv) their values.</param>
    /// <param name="allowedC">(n, w, slots·w) bool: the allowed near pairs, slot o = key block b − 1 + o.</param>
    /// <returns>(n, w, Dv + 1): output, then the row log-sum-exp (−∞ for no key).</returns>
    private static Tensor NearChunk(Tensor qc, Tensor kc, Tensor vc, Tensor allowedC, ShawRelativePositions shaw, double s, int lead, int trail)
    {
        long n = qc.shape[0], w = qc.shape[1], width = allowedC.shape[2];
        int slots = (int)(width / w);
        Tensor Extend(Tensor x) => lead + trail == 0 ? x : cat([                     // (n + slots − 1, w, ·): zeros for missing blocks
            .. Enumerable.Repeat(zeros(1, w, x.shape[2], dtype: x.dtype, device: x.device), lead), x,
            .. Enumerable.Repeat(zeros(1, w, x.shape[2], dtype: x.dtype, device: x.device), trail)], 0);
        var kx = Extend(kc);
        var vx = Extend(vc);
        var qk = cat(Enumerable.Range(0, slots).Select(o => bmm(qc, kx.narrow(0, o, n).transpose(1, 2))).ToArray(), 2);   // (n, w, slots·w)
        var distance = (arange(width, device: qc.device).view(1, width) - w - arange(w, device: qc.device).view(w, 1))
                       .view(1, w, width);                                             // (1, w, slots·w): j − i
        var scores = shaw.AddToScores(qk * s, qc, distance, s);                        // (n, w, slots·w)
        var refused = allowedC.logical_not();
        var empty = refused.all(-1, keepdim: true);                                    // (n, w, 1): no key at all
        var masked = scores.masked_fill(refused, double.NegativeInfinity).masked_fill(empty, 0);   // finite on empty rows
        var lse = masked.logsumexp(-1, keepdim: true);                                 // (n, w, 1)
        var probs = (masked - lse).exp().masked_fill(empty, 0);                        // (n, w, slots·w)
        Tensor output = null!;
        for (int o = 0; o < slots; o++)
        {
            var term = bmm(probs.narrow(2, o * w, w), vx.narrow(0, o, n));            // (n, w, Dv)
            output = o == 0 ? term : output + term;
        }
        output = shaw.AddToOutput(output, probs, distance);                            // (n, w, Dv)
        return cat([output, lse.masked_fill(empty, double.NegativeInfinity)], 2);      // (n, w, Dv + 1)
    }

    /// <summary>The fused kernel over <paramref name="mask"/>: (B, H, T, Dv + 1), the output, then the row log-sum-exp
    /// (+∞ for a row with no key).</summary>
    private static Tensor PartWithLse(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask, double s) =>
        PartFunction.apply(q, k, v, keyMask,
            new FusedBlockSparseAttention.Settings(mask, (float)s, FusedBlockSparseAttention.DefaultThreads, 0));

    /// <summary>A part for <see cref="Merge"/> from (B, H, T, Dv + 1) output and log-sum-exp: the output (B, H, T, Dv),
    /// the log-sum-exp (B, H, T) with −∞ for a row with no key, no shift.</summary>
    private static (Tensor Output, Tensor Lse, Tensor? Shift) Part(Tensor both)
    {
        long dimV = both.shape[3] - 1;
        var lse = both.select(3, dimV);
        return (both.narrow(3, 0, dimV), lse.masked_fill(lse.isposinf(), double.NegativeInfinity), null);
    }

    /// <summary>One softmax over the union of the parts' keys: weights softmax(lse) across parts; a row with no key in
    /// any part gets zeros. A part's shift (Dv) is added to its output (every key of the part carries that value term),
    /// as weight·shift after the sum, so no shifted copy of a part's output is formed and kept for the backward.</summary>
    private static Tensor Merge(List<(Tensor Output, Tensor Lse, Tensor? Shift)> parts)
    {
        var lse = stack(parts.Select(p => p.Lse).ToArray(), -1);                       // (B, H, T, P)
        var none = lse.isfinite().any(-1, keepdim: true).logical_not();                // (B, H, T, 1)
        var weights = lse.masked_fill(none, 0).softmax(-1);                            // (B, H, T, P)
        Tensor output = null!;
        for (int p = 0; p < parts.Count; p++)
        {
            var term = parts[p].Output * weights.narrow(3, p, 1);                      // (B, H, T, Dv)
            output = p == 0 ? term : output + term;
        }
        for (int p = 0; p < parts.Count; p++)
            if (parts[p].Shift is Tensor shift)
                output = output + weights.narrow(3, p, 1) * shift;                     // (B, H, T, Dv)
        return output.masked_fill(none, 0);
    }

    /// <summary>The fused forward returning [output, lse] as (B, H, T, Dv + 1), and a backward that takes the
    /// log-sum-exp's gradient too: d lseᵢ adds d lseᵢ·Pᵢⱼ to dSᵢⱼ, which is the kernel's dS = P ∘ (dP − Δ) with Δ lowered
    /// by d lseᵢ — given to the kernel as its Δ.</summary>
    private sealed class PartFunction : autograd.SingleTensorFunction<PartFunction>
    {
        public override string Name => "FusedBlockSparseAttentionPart";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var q = ((Tensor)vars[0]).contiguous();
            var (k, v, keyBias) = FusedBlockSparseAttention.MaskKeys(((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous(), vars[3] as Tensor);
            var settings = (FusedBlockSparseAttention.Settings)vars[4];
            var (output, lse) = FusedBlockSparseAttention.ForwardKernel(settings.Mask, q, k, v, keyBias, settings.Scale, settings.Threads);
            var both = cat([output, lse.unsqueeze(-1)], 3);                            // (B, H, T, Dv + 1)
            ctx.save_for_backward([q, k, v, both, keyBias ?? empty(0)]);               // the result, not a second copy of the output
            ctx.save_data("settings", settings);
            output.Dispose();
            lse.Dispose();
            return both;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, both, keyBias) = (saved[0], saved[1], saved[2], saved[3], saved[4]);
            var settings = (FusedBlockSparseAttention.Settings)ctx.get_data("settings");
            long dimV = v.shape[3];
            using var scope = NewDisposeScope();
            var output = both.narrow(3, 0, dimV).contiguous();                         // (B, H, T, Dv)
            var lse = both.select(3, dimV).contiguous();                               // (B, H, T)
            var dO = grad.narrow(3, 0, dimV).contiguous();                             // (B, H, T, Dv)
            var delta = ((dO * output).sum(-1) - grad.select(3, dimV).nan_to_num(0)).contiguous();   // (B, H, T): Δ − d lse
            var (dq, dk, dv) = FusedBlockSparseAttention.BackwardKernel(settings.Mask, q, k, v, keyBias.numel() == 0 ? null : keyBias,
                output, lse, dO, settings.Scale, settings.Threads, settings.BackwardChunks, delta);
            return [dq.MoveToOuterDisposeScope(), dk.MoveToOuterDisposeScope(), dv.MoveToOuterDisposeScope(), null!, null!];
        }
    }
}
