using System.Numerics;
using System.Runtime.CompilerServices;
using SparseAttention.Patterns;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// The Sparse Transformer's strided pattern (<see cref="StridedPattern"/>) for float32 CPU tensors, by
/// permutation. Its strided part links positions of one residue class (t mod stride), so after laying
/// the classes out back to back — class r holds r, r + s, r + 2s, … — it is a causal block-diagonal
/// (band) mask on the permuted sequence that touches a few key blocks per query block, where the
/// original layout touches every key block (one diagonal each). The local part runs on the original
/// layout, the strided part on the permuted one (both with the fused block kernel) and the two are
/// merged by their row log-sum-exp: one softmax over the union of keys, forward and backward.
/// <see cref="BlockSparseAttention.Attention"/> uses it under <see cref="AttentionKernel.Auto"/> and
/// <see cref="AttentionKernel.Fused"/> when <see cref="Handles"/> says so; the block kernel over the
/// original layout (<see cref="FusedBlockSparseAttention"/>) stays available and is the oracle's peer.
/// </summary>
/// <remarks>
/// Child, Gray, Radford and Sutskever 2019, "Generating Long Sequences with Sparse Transformers"
/// (arXiv 1904.10509). The permutation p(t) = (t mod s)·⌈T/s⌉ + ⌊t/s⌋ of a length padded to a multiple
/// of s is used here without the padding: classes have ⌈T/s⌉ or ⌊T/s⌋ members and start at
/// r·⌊T/s⌋ + min(r, T mod s), which equals p(t) when s divides T and leaves no padding rows to mask.
/// </remarks>
public static class FusedStridedAttention
{
    private static readonly ConditionalWeakTable<BlockMask, Plan> Plans = new();

    /// <summary>
    /// True when <paramref name="mask"/> was compiled from a <see cref="StridedPattern"/> with a strided part
    /// (merged, multi-head, or an odd interleaved layer) and the two permuted parts visit fewer key blocks than
    /// the mask itself; <see cref="BlockSparseAttention.Attention"/> then runs it here on float32 CPU tensors.
    /// </summary>
    public static bool Handles(BlockMask mask)
    {
        ArgumentNullException.ThrowIfNull(mask);
        return PlanFor(mask) is { Fewer: true };
    }

    /// <summary>
    /// Strided attention by permutation; the result equals block-sparse attention over <paramref name="mask"/>.
    /// </summary>
    /// <param name="q">Queries (B, H, T, D), float32 on the CPU.</param>
    /// <param name="k">Keys (B, H, T, D).</param>
    /// <param name="v">Values (B, H, T, Dv).</param>
    /// <param name="mask">A mask compiled from a <see cref="StridedPattern"/> with a strided part, for (T, block, H).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real key.</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <param name="threads">Worker threads (results do not depend on it); default <see cref="FusedBlockSparseAttention.DefaultThreads"/>.</param>
    /// <returns>(B, H, T, Dv).</returns>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, BlockMask mask, Tensor? keyMask = null,
        double? scale = null, int? threads = null)
    {
        BlockSparseOpsAttention.CheckArguments(q, k, v, mask, keyMask);
        Check.That(FusedBlockSparseAttention.Supports(q), nameof(q), $"the fused kernels need float32 CPU tensors, got {q.dtype} on {q.device}.");
        if (threads is int t) Check.Positive(t, nameof(threads));
        var plan = PlanFor(mask);
        Check.That(plan is not null, nameof(mask),
            $"needs a mask compiled from a strided pattern with a strided part (merged, multi-head or an odd interleaved layer), got {mask.Name}.");
        double s = scale ?? 1.0 / Math.Sqrt(q.shape[3]);
        return StridedFunction.apply(q, k, v, keyMask, new Settings(plan!, (float)s, threads ?? FusedBlockSparseAttention.DefaultThreads));
    }

    private static Plan? PlanFor(BlockMask mask) => Plans.GetValue(mask, m => Plan.Build(m) ?? Plan.None).Or();

    /// <summary>The two parts of a strided mask and the permutation between the layouts.</summary>
    private sealed class Plan
    {
        public static readonly Plan None = new();
        public BlockMask? Local;                 // part A on the original layout (null: no head has it)
        public BlockMask Strided = null!;        // part B on the permuted layout
        public int[] Order = null!;              // (T): original position of each permuted slot
        public int[] Inverse = null!;            // (T): permuted slot of each original position
        public bool Fewer;                       // the parts visit fewer key blocks than the original mask

        public Plan? Or() => ReferenceEquals(this, None) ? null : this;

        public static Plan? Build(BlockMask mask)
        {
            if (mask.Pattern is not StridedPattern p) return null;
            // Which heads have which part: −1 = all, 0 = even heads, 1 = odd heads, null = none.
            (int? local, int? strided, bool self) = p.Combine switch
            {
                FactorizedCombine.Merged => ((int?)-1, (int?)-1, false),   // the diagonal is in part A already
                FactorizedCombine.MultiHead => (0, 1, true),
                _ => p.Layer % 2 == 0 ? (-1, null, true) : (null, -1, true),
            };
            if (strided is null || (strided == 1 && mask.Heads == 1)) return null;   // no strided part to permute
            int seqLen = mask.SeqLen, block = mask.BlockSize, heads = mask.Heads;
            var classes = new ResidueClassPattern(p.Stride, seqLen, p.Causal, self);
            var plan = new Plan
            {
                Local = local is int lp ? OnHeads(new LocalBandPattern(p.Stride, p.Causal), lp).Compile(seqLen, block, heads) : null,
                Strided = OnHeads(classes, strided.Value).Compile(seqLen, block, heads),
            };
            plan.Order = new int[seqLen];
            plan.Inverse = new int[seqLen];
            for (int slot = 0; slot < seqLen; slot++)
            {
                int t = classes.Position(slot);
                plan.Order[slot] = t;
                plan.Inverse[t] = slot;
            }
            plan.Fewer = (plan.Local?.VisitedBlocks ?? 0) + plan.Strided.VisitedBlocks < mask.VisitedBlocks;
            return plan;
        }

        private static AttentionPattern OnHeads(AttentionPattern pattern, int parity) =>
            parity < 0 ? pattern : new HeadParityPattern(pattern, parity);
    }

    private sealed record Settings(Plan Plan, float Scale, int Threads);

    private sealed class StridedFunction : autograd.SingleTensorFunction<StridedFunction>
    {
        public override string Name => "FusedStridedAttention";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var q = ((Tensor)vars[0]).contiguous();
            var (k, v, keyBias) = FusedBlockSparseAttention.MaskKeys(((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous(), vars[3] as Tensor);
            var (plan, scale, threads) = (Settings)vars[4];
            var noBias = keyBias is null ? empty(0) : null;                                    // placeholder, made outside the scope below
            using var scope = NewDisposeScope();
            var (qp, kp, vp, biasP) = Permute(plan, q, k, v, keyBias, threads);               // (B, H, T, ·) in class order
            var (outP, lseP) = FusedBlockSparseAttention.ForwardKernel(plan.Strided, qp, kp, vp, biasP, scale, threads);
            Tensor output, lse;                                                                // (B, H, T, Dv), (B, H, T)
            if (plan.Local is null)
            {
                output = Gather(outP, plan.Inverse, threads);
                lse = Gather(lseP, plan.Inverse, threads);
            }
            else
            {
                var (outL, lseL) = FusedBlockSparseAttention.ForwardKernel(plan.Local, q, k, v, keyBias, scale, threads);
                (output, lse) = Merge(outL, lseL, outP, lseP, plan.Inverse, threads);
            }
            ctx.save_for_backward([q, k, v, output, lse, keyBias ?? noBias!]);
            ctx.save_data("settings", vars[4]);
            output.MoveToOuterDisposeScope(); lse.MoveToOuterDisposeScope();
            return output;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, output, lse) = (saved[0], saved[1], saved[2], saved[3], saved[4]);
            Tensor? keyBias = saved[5].numel() == 0 ? null : saved[5];
            var (plan, scale, threads) = (Settings)ctx.get_data("settings");
            var dO = gradOutput.contiguous();
            using var scope = NewDisposeScope();
            // Each part's backward with the merged output and log-sum-exp: P = exp(S − lse) and Δ = rowsum(dO ∘ O)
            // are then those of the one softmax over both parts, so the parts' gradients simply add up.
            var (qp, kp, vp, biasP) = Permute(plan, q, k, v, keyBias, threads);
            var (dqP, dkP, dvP) = FusedBlockSparseAttention.BackwardKernel(plan.Strided, qp, kp, vp, biasP,
                Gather(output, plan.Order, threads), Gather(lse, plan.Order, threads), Gather(dO, plan.Order, threads), scale, threads);
            Tensor dq, dk, dv;
            if (plan.Local is null)
                (dq, dk, dv) = (Gather(dqP, plan.Inverse, threads), Gather(dkP, plan.Inverse, threads), Gather(dvP, plan.Inverse, threads));
            else
            {
                (dq, dk, dv) = FusedBlockSparseAttention.BackwardKernel(plan.Local, q, k, v, keyBias, output, lse, dO, scale, threads);
                Gather(dqP, plan.Inverse, threads, addTo: dq); Gather(dkP, plan.Inverse, threads, addTo: dk); Gather(dvP, plan.Inverse, threads, addTo: dv);
            }
            return [dq.MoveToOuterDisposeScope(), dk.MoveToOuterDisposeScope(), dv.MoveToOuterDisposeScope(), null!, null!];
        }

        /// <summary>q, k, v (B, H, T, ·) and the key bias (B, T) in class order.</summary>
        private static (Tensor Q, Tensor K, Tensor V, Tensor? KeyBias) Permute(Plan plan, Tensor q, Tensor k, Tensor v, Tensor? keyBias, int threads) =>
            (Gather(q, plan.Order, threads), Gather(k, plan.Order, threads), Gather(v, plan.Order, threads),
             keyBias is null ? null : Gather(keyBias, plan.Order, threads));
    }

    /// <summary>
    /// dst[n, i, :] = src[n, rowOf[i], :] for a contiguous float32 src seen as (N, T, W) with T = rowOf.Length:
    /// (B, H, T, D) rows or (B, H, T) / (B, T) scalars along T; with <paramref name="addTo"/>, added to it in place
    /// instead of written to a new tensor. (libtorch's index_select along a middle dimension ran many times slower here.)
    /// </summary>
    private static unsafe Tensor Gather(Tensor src, int[] rowOf, int threads, Tensor? addTo = null)
    {
        int seqLen = rowOf.Length;
        var dst = addTo ?? empty_like(src);
        long width = src.dim() == 4 ? src.shape[3] : 1;                                     // D, or 1 for scalars
        long sequences = src.numel() / (seqLen * width);
        const int chunk = 512;
        int chunks = (seqLen + chunk - 1) / chunk;
        float* from = (float*)FusedBlockSparseAttention.Pointer(src), to = (float*)FusedBlockSparseAttention.Pointer(dst);
        Parallel.For(0, sequences * chunks, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, threads) }, task =>
        {
            long n = task / chunks;
            int i0 = (int)(task % chunks) * chunk, i1 = Math.Min(seqLen, i0 + chunk);
            float* a = from + n * seqLen * width, b = to + n * seqLen * width;
            if (addTo is not null)
                for (int i = i0; i < i1; i++) WeightedSum(b + i * width, 1f, a + rowOf[i] * width, 1f, b + i * width, (int)width);
            else if (width == 1)
                for (int i = i0; i < i1; i++) b[i] = a[rowOf[i]];
            else
                for (int i = i0; i < i1; i++)
                    Buffer.MemoryCopy(a + rowOf[i] * width, b + i * width, width * sizeof(float), width * sizeof(float));
        });
        GC.KeepAlive(src);   // read through a raw pointer above
        return dst;
    }

    /// <summary>
    /// One softmax over the keys of both parts from each part's normalised output and row log-sum-exp:
    /// lse = log(e^a + e^b), out = e^(a − lse)·outA + e^(b − lse)·outB, written over part A's tensors (a fresh
    /// tensor would pay the first touch of its pages again). Part B is read in class order (row t at slot
    /// <paramref name="slotOf"/>[t]); +∞ marks a part with no allowed key in that row.
    /// </summary>
    private static unsafe (Tensor Output, Tensor Lse) Merge(Tensor outA, Tensor lseA, Tensor outB, Tensor lseB, int[] slotOf, int threads)
    {
        long rowsTotal = lseA.numel();
        int seqLen = (int)lseA.shape[2], dimV = (int)outA.shape[3];
        float* oa = (float*)FusedBlockSparseAttention.Pointer(outA), ob = (float*)FusedBlockSparseAttention.Pointer(outB);
        float* la = (float*)FusedBlockSparseAttention.Pointer(lseA), lb = (float*)FusedBlockSparseAttention.Pointer(lseB);
        float* o = oa, l = la;
        int sequences = (int)(rowsTotal / seqLen);
        Parallel.For(0, sequences, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, threads) }, bh =>
        {
            long baseRow = (long)bh * seqLen;
            for (int t = 0; t < seqLen; t++)
            {
                long rowA = baseRow + t, rowB = baseRow + slotOf[t];
                float a = la[rowA], b = lb[rowB];
                float* dst = o + rowA * dimV;
                if (float.IsPositiveInfinity(a) && float.IsPositiveInfinity(b))
                {
                    new Span<float>(dst, dimV).Clear();
                    l[rowA] = float.PositiveInfinity;
                    continue;
                }
                if (float.IsPositiveInfinity(a)) a = float.NegativeInfinity;
                if (float.IsPositiveInfinity(b)) b = float.NegativeInfinity;
                float m = MathF.Max(a, b), ea = MathF.Exp(a - m), eb = MathF.Exp(b - m), sum = ea + eb;
                l[rowA] = m + MathF.Log(sum);
                WeightedSum(oa + rowA * dimV, ea / sum, ob + rowB * dimV, eb / sum, dst, dimV);
            }
        });
        GC.KeepAlive(outA); GC.KeepAlive(outB); GC.KeepAlive(lseA); GC.KeepAlive(lseB);   // read through raw pointers above
        return (outA, lseA);
    }

    /// <summary>dst = wa·a + wb·b over <paramref name="n"/> floats (dst may be a).</summary>
    private static unsafe void WeightedSum(float* a, float wa, float* b, float wb, float* dst, int n)
    {
        int i = 0;
        for (; i <= n - Vector<float>.Count; i += Vector<float>.Count)
        {
            var r = Vector.Load(a + i) * wa + Vector.Load(b + i) * wb;
            r.Store(dst + i);
        }
        for (; i < n; i++) dst[i] = wa * a[i] + wb * b[i];
    }
}

/// <summary>
/// Part B of a <see cref="StridedPattern"/> (stride s) on the permuted layout of <see cref="FusedStridedAttention"/>:
/// residue classes laid out back to back in increasing position; slot i may attend slot j of its own class at or
/// before it (causal; not itself unless <c>includeSelf</c>) or anywhere in its class (bidirectional).
/// </summary>
internal sealed class ResidueClassPattern : AttentionPattern
{
    private readonly int stride, seqLen, full, rem;
    private readonly bool causal, includeSelf;

    public ResidueClassPattern(int stride, int seqLen, bool causal, bool includeSelf)
        : base($"residue classes(stride={stride}, T={seqLen}{(includeSelf ? "" : ", not self")}{(causal ? ", causal" : "")})")
    {
        Check.Positive(stride, nameof(stride));
        Check.Positive(seqLen, nameof(seqLen));
        (this.stride, this.seqLen, this.causal, this.includeSelf) = (stride, seqLen, causal, includeSelf);
        (full, rem) = (seqLen / stride, seqLen % stride);   // the first rem classes have full + 1 members
    }

    public override bool IsCausal => causal;

    /// <summary>First slot of class r.</summary>
    private int Start(int r) => r * full + Math.Min(r, rem);

    private int ClassOf(int slot) => slot < rem * (full + 1) ? slot / (full + 1) : rem + (slot - rem * (full + 1)) / full;

    /// <summary>The original position held by permuted slot <paramref name="slot"/>.</summary>
    public int Position(int slot)
    {
        int r = ClassOf(slot);
        return r + (slot - Start(r)) * stride;
    }

    public override void Validate(int seqLen, int heads) =>
        Check.That(seqLen == this.seqLen, nameof(seqLen), $"this permuted layout is for T = {this.seqLen}, got {seqLen}.");

    public override bool Allows(int head, int query, int key, int seqLen)
    {
        if (ClassOf(query) != ClassOf(key)) return false;
        if (key == query) return includeSelf;
        return !causal || key < query;
    }

    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen)
    {
        int q0 = queryBlock * blockSize, q1 = Math.Min(q0 + blockSize, seqLen) - 1;
        int first = Start(ClassOf(q0));
        int last = causal ? q1 : Math.Min(seqLen, Start(ClassOf(q1) + 1)) - 1;
        for (int kb = first / blockSize; kb <= last / blockSize; kb++) yield return kb;
    }
}

/// <summary>A pattern on the heads of one parity only (even: 0, odd: 1); the other heads attend nothing.</summary>
internal sealed class HeadParityPattern(AttentionPattern inner, int parity)
    : AttentionPattern($"{inner.Name} on {(parity == 0 ? "even" : "odd")} heads")
{
    public override bool IsCausal => inner.IsCausal;
    public override bool SameForAllHeads => false;
    public override bool Allows(int head, int query, int key, int seqLen) => head % 2 == parity && inner.Allows(head, query, key, seqLen);
    public override IEnumerable<int> CandidateKeyBlocks(int head, int queryBlock, int blockSize, int seqLen) =>
        head % 2 == parity ? inner.CandidateKeyBlocks(head, queryBlock, blockSize, seqLen) : [];
    public override void Validate(int seqLen, int heads) => inner.Validate(seqLen, heads);
}
