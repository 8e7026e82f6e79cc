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
        var keyTable = shaw.KeyTable.to(q.dtype);                                      // (2R+1, D)
        var valueTable = shaw.ValueTable.to(q.dtype);                                  // (2R+1, Dv)
        var near = NearFunction.apply(q, k, v, shaw.KeyTable, shaw.ValueTable, keyMask, new NearSettings(plan, s));   // (B, H, T, Dv + 1)
        long dimV = v.shape[3];
        var parts = new List<(Tensor Output, Tensor Lse)> { (near.narrow(3, 0, dimV), near.select(3, dimV)) };
        foreach (var (far, row) in new[] { (plan.Below, 0), (plan.Above, 2 * r) })
        {
            if (far is null) continue;
            var (output, lse) = Part(q, k, v, far, keyMask, s);
            var rowTerm = matmul(q, keyTable[row]) * s;                                // (B, H, T): s·qᵢ·aᴷ
            parts.Add((output + valueTable[row], lse + rowTerm));
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
        var (below, lseBelow) = Part(qx, KeysWith(1), v, plan.Below!, keyMask, s);
        var (above, lseAbove) = Part(qx, KeysWith(-1), v, plan.Above, keyMask, s);
        return Merge([(below, lseBelow - rowTerm), (above, lseAbove + rowTerm)]);
    }

    /// <summary>Shaw's near band |j − i| &lt; R with tensor ops: query block n of w rows against key blocks n − 1 … n
    /// (+ 1), the full terms on every pair. Output (B, H, T, Dv) and row log-sum-exp (B, H, T), −∞ for no key.</summary>
    /// <remarks>The (B, H, blocks) axes are flattened into one batch of blocks, so the keys of block n + δ are the same
    /// tensor shifted by δ along it: no gathered copy of k or v. Pairs that cross into another head's blocks (the first
    /// block's previous one, the last block's next one) lie outside the sequence, so the plan never allows them.</remarks>
    private static (Tensor Output, Tensor Lse) Near(Tensor q, Tensor k, Tensor v, Plan plan, Tensor? keyMask, double s,
        ShawRelativePositions shaw)
    {
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dim = q.shape[3], dimV = v.shape[3];
        int w = plan.Band, slots = plan.Slots;
        long nb = (seqLen + w - 1) / w, pad = nb * w - seqLen, blocks = batch * heads * nb;
        if (keyMask is not null)
        {
            var drop = keyMask.logical_not().view(batch, 1, seqLen, 1);                // (B, 1, T, 1)
            k = k.masked_fill(drop, 0);                                                // NaN in padding must not leak via 0·x
            v = v.masked_fill(drop, 0);
        }
        Tensor Blocks(Tensor x) =>                                                     // (B, H, T, ·) → (B·H·nb, w, ·)
            (pad == 0 ? x : nn.functional.pad(x, [0, 0, 0, pad])).reshape(blocks, w, x.shape[3]);
        var qf = Blocks(q);                                                            // (B·H·nb, w, D)
        var kf = Blocks(k);                                                            // (B·H·nb, w, D)
        var vf = Blocks(v);                                                            // (B·H·nb, w, Dv)
        int[] offsets = slots == 2 ? [-1, 0] : [-1, 0, 1];                             // slot o: key block n + offsets[o]

        // (B·H·nb, w, ·): block n of a times block n + δ of b (zeros where n + δ falls off the flattened axis).
        Tensor Shifted(Tensor a, Tensor b, int delta, Func<Tensor, Tensor, Tensor> product, long width)
        {
            if (delta == 0) return product(a, b);
            long n = blocks - 1;
            var none = zeros(1, w, width, dtype: a.dtype, device: a.device);
            return delta < 0 ? cat([none, product(a.narrow(0, 1, n), b.narrow(0, 0, n))], 0)
                             : cat([product(a.narrow(0, 0, n), b.narrow(0, 1, n)), none], 0);
        }
        var qk = cat(offsets.Select(o => Shifted(qf, kf, o, (a, b) => bmm(a, b.transpose(1, 2)), w)).ToArray(), 2)
                 .view(batch, heads, nb, w, slots * w);                                // (B, H, nb, w, slots·w)
        var qb = qf.view(batch, heads, nb, w, dim);                                    // (B, H, nb, w, D)
        var distance = (arange(slots * w).view(1, slots * w) - w - arange(w).view(w, 1))   // (w, slots·w): j − i
                       .view(1, 1, 1, w, slots * w);
        var scores = shaw.AddToScores(qk * s, qb, distance, s);                        // (B, H, nb, w, slots·w)
        var allowed = plan.NearAllowed!;                                               // (1, H, nb, w, slots·w)
        if (keyMask is not null)
        {
            var km = nn.functional.pad(keyMask, [w, pad + (slots == 3 ? w : 0)], value: 0).view(batch, nb + slots - 1, w);
            var around = cat(Enumerable.Range(0, slots).Select(o => km.narrow(1, o, nb)).ToArray(), 2);  // (B, nb, slots·w)
            allowed = allowed.logical_and(around.view(batch, 1, nb, 1, slots * w));    // (B, H, nb, w, slots·w)
        }
        var refused = allowed.logical_not();
        var empty = refused.all(-1, keepdim: true);                                    // (·, H, nb, w, 1): no key at all
        var masked = scores.masked_fill(refused, double.NegativeInfinity).masked_fill(empty, 0);   // finite on empty rows
        var lse = masked.logsumexp(-1, keepdim: true);                                 // (B, H, nb, w, 1)
        var probs = (masked - lse).exp().masked_fill(empty, 0);                        // (B, H, nb, w, slots·w)
        var pf = probs.view(blocks, w, slots * w);
        Tensor output = null!;
        for (int o = 0; o < slots; o++)
        {
            var term = Shifted(pf.narrow(2, o * w, w), vf, offsets[o], bmm, dimV);      // (B·H·nb, w, Dv)
            output = o == 0 ? term : output + term;
        }
        output = shaw.AddToOutput(output.view(batch, heads, nb, w, dimV), probs, distance)   // (B, H, nb, w, Dv)
                     .view(batch, heads, nb * w, dimV);
        var rowLse = lse.masked_fill(empty, double.NegativeInfinity)
                        .expand(batch, heads, nb, w, 1).reshape(batch, heads, nb * w);  // (B, H, nb·w)
        return pad == 0 ? (output, rowLse) : (output.narrow(2, 0, seqLen), rowLse.narrow(2, 0, seqLen));
    }

    private sealed record NearSettings(Plan Plan, double Scale);

    /// <summary>Shaw's near band as one autograd node that keeps only its inputs: the band's score-sized intermediates
    /// (scores, probabilities, gathered keys and values, distance indices: tens of MB per layer at T = 8192) live only
    /// while the forward runs, and the backward recomputes them (the same <see cref="Near"/>, differentiated by autograd)
    /// one layer at a time, instead of every layer's being kept from the forward to the backward.</summary>
    private sealed class NearFunction : autograd.SingleTensorFunction<NearFunction>
    {
        public override string Name => "ShawNearBand";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var inputs = vars.Take(5).Cast<Tensor>().ToArray();                       // q, k, v, key table, value table
            var keyMask = vars[5] as Tensor;
            var settings = (NearSettings)vars[6];
            ctx.save_for_backward([.. inputs, keyMask ?? empty(0)]);
            ctx.save_data("settings", settings);
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            var (output, lse) = Near(inputs[0], inputs[1], inputs[2], settings.Plan, keyMask, settings.Scale,
                new ShawRelativePositions(inputs[3], inputs[4]));
            return cat([output, lse.unsqueeze(-1)], 3).MoveToOuterDisposeScope();    // (B, H, T, Dv + 1)
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var saved = ctx.get_saved_variables();
            var settings = (NearSettings)ctx.get_data("settings");
            var keyMask = saved[5].numel() == 0 ? null : saved[5];
            using var scope = NewDisposeScope();
            var leaves = saved.Take(5).Select(t => t.detach().requires_grad_(true)).ToArray();
            long dimV = leaves[2].shape[3];
            var dOutput = grad.narrow(3, 0, dimV);                                     // (B, H, T, Dv)
            var dLse = grad.select(3, dimV).nan_to_num(0);                             // (B, H, T)
            IList<Tensor> grads;
            using (enable_grad())
            {
                var (output, lse) = Near(leaves[0], leaves[1], leaves[2], settings.Plan, keyMask, settings.Scale,
                    new ShawRelativePositions(leaves[3], leaves[4]));
                grads = autograd.grad([output, lse], leaves, [dOutput, dLse], allow_unused: true);
            }
            var result = grads.Select((g, i) => (g ?? zeros_like(leaves[i])).MoveToOuterDisposeScope()).ToList();
            result.Add(null!);                                                         // key mask
            result.Add(null!);                                                         // settings
            return result;
        }
    }

    /// <summary>The fused kernel over <paramref name="mask"/>: normalised output (B, H, T, Dv) and row log-sum-exp
    /// (B, H, T), −∞ for a row with no key; both carry gradients.</summary>
    private static (Tensor Output, Tensor Lse) Part(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask, double s)
    {
        var both = PartFunction.apply(q, k, v, keyMask,
            new FusedBlockSparseAttention.Settings(mask, (float)s, FusedBlockSparseAttention.DefaultThreads, 0));   // (B, H, T, Dv + 1)
        long dimV = v.shape[3];
        var lse = both.select(3, dimV);                                                // (B, H, T), +∞ for no key
        return (both.narrow(3, 0, dimV), lse.masked_fill(lse.isposinf(), double.NegativeInfinity));
    }

    /// <summary>One softmax over the union of the parts' keys: weights softmax(lse) across parts; a row with no key in
    /// any part gets zeros.</summary>
    private static Tensor Merge(List<(Tensor Output, Tensor Lse)> parts)
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
            ctx.save_for_backward([q, k, v, output, lse, keyBias ?? empty(0)]);
            ctx.save_data("settings", settings);
            return cat([output, lse.unsqueeze(-1)], 3);                                // (B, H, T, Dv + 1)
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, output, lse, keyBias) = (saved[0], saved[1], saved[2], saved[3], saved[4], saved[5]);
            var settings = (FusedBlockSparseAttention.Settings)ctx.get_data("settings");
            long dimV = v.shape[3];
            using var scope = NewDisposeScope();
            var dO = grad.narrow(3, 0, dimV).contiguous();                             // (B, H, T, Dv)
            var delta = ((dO * output).sum(-1) - grad.select(3, dimV).nan_to_num(0)).contiguous();   // (B, H, T): Δ − d lse
            var (dq, dk, dv) = FusedBlockSparseAttention.BackwardKernel(settings.Mask, q, k, v, keyBias.numel() == 0 ? null : keyBias,
                output, lse, dO, settings.Scale, settings.Threads, settings.BackwardChunks, delta);
            return [dq.MoveToOuterDisposeScope(), dk.MoveToOuterDisposeScope(), dv.MoveToOuterDisposeScope(), null!, null!];
        }
    }
}
