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

    private static Tensor Shaw(Tensor q, Tensor k, Tensor v, Plan plan, Tensor? keyMask, double s, ShawRelativePositions shaw) =>
        ShawFunction.apply(q, k, v, keyMask, shaw.KeyTable.to(q.dtype), shaw.ValueTable.to(q.dtype),
            new ShawSettings(plan, (float)s, FusedBlockSparseAttention.DefaultThreads));

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
        var (below, lseBelow) = Part(PartWithLse(qx, KeysWith(1), v, plan.Below!, keyMask, s));
        var (above, lseAbove) = Part(PartWithLse(qx, KeysWith(-1), v, plan.Above, keyMask, s));
        return Merge([(below, lseBelow - rowTerm), (above, lseAbove + rowTerm)]).Output;
    }

    /// <summary>Scores per chunk of the near band (tests make it small to cross chunk boundaries).</summary>
    internal static int NearChunkScores { get; set; } = 1 << 20;

    private sealed record ShawSettings(Plan Plan, float Scale, int Threads);

    /// <summary>
    /// Shaw's terms on a block-sparse mask as one autograd function that keeps only q, k, v, the output and the row
    /// log-sum-exp (as the plain fused kernel does):
    /// <list type="bullet">
    /// <item>Far pairs (j − i ≤ −R, and j − i ≥ R unless causal) all carry the same clipped table row, so qᵢ·(kⱼ + aᴷ) and
    /// vⱼ + aⱽ make them the plain fused kernel on shifted keys and values; the tables' gradients are the shifted
    /// keys' and values' gradients summed.</item>
    /// <item>The near band |j − i| &lt; R (query block n of w rows against key blocks n − 1 … n (+ 1)) runs on tensor ops
    /// in chunks of about <see cref="NearChunkScores"/> scores, forward and a hand-written backward.</item>
    /// </list>
    /// The parts are merged by log-sum-exp in the forward; the backward needs no part's own result: with the merged
    /// log-sum-exp L and Δ = rowsum(dO ∘ O), every pair's probability is exp(Sᵢⱼ − Lᵢ) and dSᵢⱼ = Pᵢⱼ·(dPᵢⱼ − Δᵢ) whichever
    /// part it belongs to, so each part's backward runs alone on (L, Δ).
    /// </summary>
    private sealed class ShawFunction : autograd.SingleTensorFunction<ShawFunction>
    {
        public override string Name => "FusedShawAttention";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var q = ((Tensor)vars[0]).contiguous();
            var keyMask = vars[3] as Tensor;
            var (k, v, keyBias) = FusedBlockSparseAttention.MaskKeys(((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous(), keyMask);
            var (keyTable, valueTable) = (((Tensor)vars[4]).contiguous(), ((Tensor)vars[5]).contiguous());
            var settings = (ShawSettings)vars[6];
            var plan = settings.Plan;
            int r = (int)keyTable.shape[0] / 2;
            Tensor[] kept = [q, k, v, keyBias ?? empty(0), keyMask ?? empty(0, dtype: ScalarType.Bool), keyTable, valueTable];   // made outside the scope below:
            using var scope = NewDisposeScope();                                       // saved after forward returns
            var near = new NearBand(q, k, v, keyMask, plan);
            var parts = new List<(Tensor Output, Tensor Lse)> { near.Forward(keyTable, valueTable, settings.Scale) };
            foreach (var (mask, row) in Far(plan, r))
            {
                var (output, lse) = FusedBlockSparseAttention.ForwardKernel(mask, q, (k + keyTable[row]).contiguous(), v + valueTable[row],
                    keyBias, settings.Scale, settings.Threads);
                parts.Add((output, lse.masked_fill(lse.isposinf(), double.NegativeInfinity)));
            }
            var (merged, total) = Merge(parts);
            ctx.save_for_backward([.. kept, merged, total]);
            ctx.save_data("settings", settings);
            total.MoveToOuterDisposeScope();
            return merged.MoveToOuterDisposeScope();
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, keyTable, valueTable, output, lse) = (saved[0], saved[1], saved[2], saved[5], saved[6], saved[7], saved[8]);
            var keyBias = saved[3].numel() == 0 ? null : saved[3];
            var keyMask = saved[4].numel() == 0 ? null : saved[4];
            var settings = (ShawSettings)ctx.get_data("settings");
            int r = (int)keyTable.shape[0] / 2;
            using var scope = NewDisposeScope();
            var dO = grad.contiguous();
            var delta = (dO * output).sum(-1).contiguous();                                // (B, H, T): Δ = rowsum(dO ∘ O)
            var (dq, dk, dv, dKeyTable, dValueTable) = new NearBand(q, k, v, keyMask, settings.Plan)
                .Backward(keyTable, valueTable, lse, dO, delta, settings.Scale);
            foreach (var (mask, row) in Far(settings.Plan, r))
            {
                var (dqFar, dkFar, dvFar) = FusedBlockSparseAttention.BackwardKernel(mask, q, (k + keyTable[row]).contiguous(),
                    (v + valueTable[row]).contiguous(), keyBias, output, lse, dO, settings.Scale, settings.Threads, delta: delta);
                dq.add_(dqFar);
                dk.add_(dkFar);
                dv.add_(dvFar);
                dKeyTable[row].add_(dkFar.sum([0, 1, 2]));                                 // the shifted keys' gradient, summed
                dValueTable[row].add_(dvFar.sum([0, 1, 2]));
            }
            return [dq.MoveToOuterDisposeScope(), dk.MoveToOuterDisposeScope(), dv.MoveToOuterDisposeScope(), null!,
                    dKeyTable.MoveToOuterDisposeScope(), dValueTable.MoveToOuterDisposeScope(), null!];
        }

        /// <summary>The far masks with the table row their pairs carry: below (row 0), above (row 2R) unless causal.</summary>
        private static IEnumerable<(BlockMask Mask, int Row)> Far(Plan plan, int r)
        {
            if (plan.Below is not null) yield return (plan.Below, 0);
            if (plan.Above is not null) yield return (plan.Above, 2 * r);
        }
    }

    /// <summary>
    /// Shaw's near band |j − i| &lt; R of one call, flattened: the (B, H, blocks) axes as one axis of nb·B·H blocks of w
    /// rows; query block b sees key blocks b − 1 … b (+ 1), which are the flattened keys shifted by a block, so a chunk
    /// of query blocks needs only its neighbours' key blocks. Pairs that cross into another head's blocks (a head's
    /// first block's previous one, its last block's next one) lie outside the sequence, so the plan never allows them.
    /// </summary>
    private sealed class NearBand
    {
        private readonly Tensor qf, kf, vf, allowed;                                   // (blocks, w, ·), allowed (blocks, w, slots·w)
        private readonly long batch, heads, seqLen, blocks, pad, chunk;
        private readonly int w, slots;

        public NearBand(Tensor q, Tensor k, Tensor v, Tensor? keyMask, Plan plan)
        {
            (batch, heads, seqLen) = (q.shape[0], q.shape[1], q.shape[2]);
            (w, slots) = (plan.Band, plan.Slots);
            int width = slots * w;
            long nb = (seqLen + w - 1) / w;
            (pad, blocks) = (nb * w - seqLen, batch * heads * nb);
            var near = plan.NearAllowed!;                                               // (1, H, nb, w, slots·w)
            if (keyMask is not null)
            {
                var km = nn.functional.pad(keyMask, [w, pad + (slots == 3 ? w : 0)], value: 0).view(batch, nb + slots - 1, w);
                var around = cat(Enumerable.Range(0, slots).Select(o => km.narrow(1, o, nb)).ToArray(), 2);  // (B, nb, slots·w)
                near = near.logical_and(around.view(batch, 1, nb, 1, width));          // (B, H, nb, w, slots·w)
            }
            allowed = near.expand(batch, heads, nb, w, width).reshape(blocks, w, width);   // (blocks, w, slots·w)
            qf = Blocks(q);
            kf = Blocks(k);
            vf = Blocks(v);
            chunk = Math.Max(1, NearChunkScores / (w * width));
        }

        private Tensor Blocks(Tensor x) =>                                             // (B, H, T, ·) → (blocks, w, ·)
            (pad == 0 ? x : nn.functional.pad(x, [0, 0, 0, pad])).reshape(blocks, w, x.shape[3]);

        private Tensor Unblocks(Tensor x) =>                                           // (blocks, w, ·) → (B, H, T, ·)
            pad == 0 ? x.view(batch, heads, seqLen, x.shape[2]) : x.view(batch, heads, blocks / batch / heads * w, x.shape[2]).narrow(2, 0, seqLen);

        /// <summary>Query blocks [b0, b0 + n) of every chunk.</summary>
        private IEnumerable<(long B0, long N)> Chunks()
        {
            for (long b0 = 0; b0 < blocks; b0 += chunk) yield return (b0, Math.Min(chunk, blocks - b0));
        }

        /// <summary>(n + slots − 1, w, ·): blocks b0 − 1 … b0 + n (+ 1) of x, zeros where they fall outside.</summary>
        private Tensor Around(Tensor x, long b0, long n)
        {
            long k0 = Math.Max(0, b0 - 1), k1 = Math.Min(blocks, b0 + n + slots - 2);
            long lead = k0 - (b0 - 1), trail = b0 + n + slots - 2 - k1;
            var inside = x.narrow(0, k0, k1 - k0);
            return lead + trail == 0 ? inside : nn.functional.pad(inside, [0, 0, 0, 0, lead, trail]);
        }

        /// <summary>Scaled scores with the Shaw term, −∞ where not allowed: (n, w, slots·w), and the table row of
        /// each pair (1, w, slots·w).</summary>
        private (Tensor Scores, Tensor Row) Scores(Tensor qc, Tensor kx, Tensor allowedC, Tensor keyTable, float s)
        {
            long n = qc.shape[0];
            int width = slots * w, r = (int)keyTable.shape[0] / 2;
            var qk = cat(Enumerable.Range(0, slots).Select(o => bmm(qc, kx.narrow(0, o, n).transpose(1, 2))).ToArray(), 2);   // (n, w, slots·w)
            var distance = arange(width).view(1, width) - w - arange(w).view(w, 1);   // (w, slots·w): j − i
            var row = (distance.clamp(-r, r) + r).view(1, w, width);
            var perRow = matmul(qc, keyTable.t());                                     // (n, w, 2R + 1): qᵢ·aᴷ
            var scores = (qk + perRow.gather(2, row.expand(n, w, width))) * s;
            return (scores.masked_fill(allowedC.logical_not(), double.NegativeInfinity), row);
        }

        /// <summary>x (n, w, slots·w) summed per table row: (n, w, 2R + 1).</summary>
        private static Tensor PerRow(Tensor x, Tensor row, long rows) =>
            zeros(x.shape[0], x.shape[1], rows).scatter_add(2, row.expand_as(x), x);

        /// <summary>The near band's normalised output (B, H, T, Dv) and row log-sum-exp (B, H, T), −∞ for no key.</summary>
        public (Tensor Output, Tensor Lse) Forward(Tensor keyTable, Tensor valueTable, float s)
        {
            var outputs = new List<Tensor>();
            var lses = new List<Tensor>();
            foreach (var (b0, n) in Chunks())
            {
                using var scope = NewDisposeScope();
                var qc = qf.narrow(0, b0, n);
                var (vx, allowedC) = (Around(vf, b0, n), allowed.narrow(0, b0, n));
                var (scores, row) = Scores(qc, Around(kf, b0, n), allowedC, keyTable, s);
                var lse = scores.logsumexp(-1, keepdim: true);                        // (n, w, 1): −∞ for no key
                var probs = (scores - lse.masked_fill(lse.isneginf(), 0)).exp();       // (n, w, slots·w): 0 on no-key rows
                var output = matmul(PerRow(probs, row, keyTable.shape[0]), valueTable);   // (n, w, Dv): Σ p·aⱽ
                for (int o = 0; o < slots; o++) output.add_(bmm(probs.narrow(2, o * w, w), vx.narrow(0, o, n)));
                outputs.Add(output.MoveToOuterDisposeScope());
                lses.Add(lse.MoveToOuterDisposeScope());
            }
            return (Unblocks(cat(outputs, 0)), Unblocks(cat(lses, 0)).squeeze(-1));
        }

        /// <summary>The near pairs' share of the gradients, given the merged softmax's row log-sum-exp L and
        /// Δ = rowsum(dO ∘ O): P = exp(S − L), dP = dO·(v + aⱽ), dS = P ∘ (dP − Δ); returns fresh dq, dk, dv and
        /// the tables' gradients for the far parts to add to.</summary>
        public (Tensor Dq, Tensor Dk, Tensor Dv, Tensor DKeyTable, Tensor DValueTable) Backward(Tensor keyTable, Tensor valueTable,
            Tensor lse, Tensor dO, Tensor delta, float s)
        {
            long rows = keyTable.shape[0], dim = qf.shape[2], dimV = vf.shape[2];
            var dq = zeros(blocks, w, dim);
            var dkAround = zeros(blocks + 2, w, dim);                                  // block b at b + 1: room for b − 1 and b + 1
            var dvAround = zeros(blocks + 2, w, dimV);
            var (dKeyTable, dValueTable) = (zeros_like(keyTable), zeros_like(valueTable));
            var lseF = Blocks(lse.unsqueeze(-1));                                      // (blocks, w, 1)
            var deltaF = Blocks(delta.unsqueeze(-1));
            var dOF = Blocks(dO);
            foreach (var (b0, n) in Chunks())
            {
                using var scope = NewDisposeScope();
                var (qc, dOc) = (qf.narrow(0, b0, n), dOF.narrow(0, b0, n));
                var (kx, vx) = (Around(kf, b0, n), Around(vf, b0, n));
                var (scores, row) = Scores(qc, kx, allowed.narrow(0, b0, n), keyTable, s);
                var probs = (scores - lseF.narrow(0, b0, n)).exp();                   // (n, w, slots·w); L = +∞ on no-key rows
                var dOValueRows = matmul(dOc, valueTable.t()).gather(2, row.expand_as(probs));   // dO·aⱽ per pair
                var dP = cat(Enumerable.Range(0, slots).Select(o => bmm(dOc, vx.narrow(0, o, n).transpose(1, 2))).ToArray(), 2) + dOValueRows;
                var dS = probs * (dP - deltaF.narrow(0, b0, n));                       // (n, w, slots·w)
                var dSRows = PerRow(dS, row, rows);                                    // (n, w, 2R + 1)
                var dqc = matmul(dSRows, keyTable);                                    // (n, w, D): dS·aᴷ
                for (int o = 0; o < slots; o++)
                {
                    var dSo = dS.narrow(2, o * w, w);                                   // (n, w, w): key block b − 1 + o
                    dqc.add_(bmm(dSo, kx.narrow(0, o, n)));
                    dkAround.narrow(0, b0 + o, n).add_(bmm(dSo.transpose(1, 2), qc), alpha: s);
                    dvAround.narrow(0, b0 + o, n).add_(bmm(probs.narrow(2, o * w, w).transpose(1, 2), dOc));
                }
                dq.narrow(0, b0, n).add_(dqc, alpha: s);
                dKeyTable.add_(matmul(dSRows.reshape(-1, rows).t(), qc.reshape(-1, dim)), alpha: s);
                dValueTable.add_(matmul(PerRow(probs, row, rows).reshape(-1, rows).t(), dOc.reshape(-1, dimV)));
            }
            return (Unblocks(dq).contiguous(), Unblocks(dkAround.narrow(0, 1, blocks)).contiguous(),
                    Unblocks(dvAround.narrow(0, 1, blocks)).contiguous(), dKeyTable, dValueTable);
        }
    }

    /// <summary>The fused kernel over <paramref name="mask"/>: (B, H, T, Dv + 1), the output, then the row log-sum-exp
    /// (+∞ for a row with no key).</summary>
    private static Tensor PartWithLse(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask, double s) =>
        PartFunction.apply(q, k, v, keyMask,
            new FusedBlockSparseAttention.Settings(mask, (float)s, FusedBlockSparseAttention.DefaultThreads, 0));

    /// <summary>A part for <see cref="Merge"/> from (B, H, T, Dv + 1) output and log-sum-exp: the output (B, H, T, Dv)
    /// and the log-sum-exp (B, H, T) with −∞ for a row with no key.</summary>
    private static (Tensor Output, Tensor Lse) Part(Tensor both)
    {
        long dimV = both.shape[3] - 1;
        var lse = both.select(3, dimV);
        return (both.narrow(3, 0, dimV), lse.masked_fill(lse.isposinf(), double.NegativeInfinity));
    }

    /// <summary>One softmax over the union of the parts' keys: weights softmax(lse) across parts, and the union's
    /// log-sum-exp (+∞ for a row with no key in any part, whose output is zeros — the kernels' convention).</summary>
    private static (Tensor Output, Tensor Lse) Merge(List<(Tensor Output, Tensor Lse)> parts)
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
        var total = lse.logsumexp(-1).masked_fill(none.squeeze(-1), double.PositiveInfinity);   // (B, H, T)
        return (output.masked_fill(none, 0), total);
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
