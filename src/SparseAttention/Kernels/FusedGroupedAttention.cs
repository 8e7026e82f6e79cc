using SparseAttention.Kernels.Fused;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Fused grouped attention (routing clusters, LSH chunks) for float32 CPU tensors: the rules of
/// <see cref="GroupedAttention"/> computed by C# SIMD kernels that read q/k/v rows by index, forward
/// and backward, wrapped as a TorchSharp autograd function. Memory key/values are not supported here
/// (<see cref="GroupedAttention"/> falls back to its Ops path for them). <see cref="MergedAttention"/> is the
/// multi-round (LSH) form: one softmax per position over all rounds, computed online across groups.
/// </summary>
public static class FusedGroupedAttention
{
    /// <summary>True when the fused kernel can run (float32 CPU tensors, no memory key/values).</summary>
    public static bool Supports(Tensor q, Tensor? memoryKeys) => FusedBlockSparseAttention.Supports(q) && memoryKeys is null;

    /// <inheritdoc cref="GroupedAttention.Attention"/>
    /// <param name="threads">Worker threads (results do not depend on it); default <see cref="FusedBlockSparseAttention.DefaultThreads"/>.</param>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices,
        bool causal = false, bool sharedQk = false, Tensor? keyMask = null, bool lookBackward = false,
        double? scale = null, int? threads = null)
    {
        GroupedAttention.CheckArguments(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, null, null);
        return AttentionChecked(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, scale, threads, null);
    }

    /// <summary>True when the fused kernels evaluate <paramref name="relative"/> themselves: Shaw with float32 tables
    /// (on the CPU) or ALiBi.</summary>
    internal static bool Handles(RelativePositionTerms relative) => relative switch
    {
        ShawRelativePositions shaw => FusedBlockSparseAttention.Supports(shaw.KeyTable) && FusedBlockSparseAttention.Supports(shaw.ValueTable),
        AlibiPositions => true,
        _ => false,
    };

    /// <summary><see cref="Attention"/> after <see cref="GroupedAttention.CheckArguments"/> (and, with
    /// <paramref name="relative"/>, its relative checks) has run; <paramref name="relative"/> must be one <see cref="Handles"/>.</summary>
    internal static Tensor AttentionChecked(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices,
        bool causal, bool sharedQk, Tensor? keyMask, bool lookBackward, double? scale, int? threads, RelativePositionTerms? relative)
    {
        Check.That(FusedBlockSparseAttention.Supports(q), nameof(q), $"the fused kernels need float32 CPU tensors, got {q.dtype} on {q.device}.");
        Check.That(k.shape[2] == q.shape[2], nameof(k),
            $"the fused grouped kernel needs as many keys as queries (self-attention), got Tk = {k.shape[2]}, Tq = {q.shape[2]}; use the Ops kernel.");
        if (threads is int t) Check.Positive(t, nameof(threads));
        var settings = new Settings(causal, sharedQk, lookBackward, (float)(scale ?? 1.0 / Math.Sqrt(q.shape[3])),
            threads ?? FusedBlockSparseAttention.DefaultThreads, Slopes(relative));
        var shaw = relative as ShawRelativePositions;
        return GroupedFunction.apply(q, k, v, queryIndices, keyIndices, keyMask, shaw?.KeyTable, shaw?.ValueTable, settings);
    }

    /// <summary>ALiBi's slopes as float32 for the kernel, or null.</summary>
    private static float[]? Slopes(RelativePositionTerms? relative)
    {
        Check.That(relative is null || Handles(relative), nameof(relative),
            $"the fused grouped kernel takes Shaw terms with float32 CPU tables or ALiBi, got {relative?.GetType().Name}; use the Ops kernel.");
        return relative is AlibiPositions alibi ? alibi.Slopes.Select(m => (float)m).ToArray() : null;
    }

    /// <summary>Sets the relative-position fields of the kernel's arguments (Shaw tables or ALiBi slopes; both pinned
    /// by the caller for the kernel's duration), and for the backward the tables' per-head gradient buffers.</summary>
    private static void SetRelative(ref GroupedArgs args, Tensor? relK, Tensor? relV, Tensor? slopes, Tensor? dRelK = null, Tensor? dRelV = null)
    {
        if (relK is not null && relV is not null)
        {
            args.RelKey = FusedBlockSparseAttention.Pointer(relK);
            args.RelValue = FusedBlockSparseAttention.Pointer(relV);
            args.RelRows = (int)relK.shape[0];
        }
        if (slopes is not null) args.AlibiSlopes = FusedBlockSparseAttention.Pointer(slopes);
        if (dRelK is not null && dRelV is not null)
        {
            args.DRelKey = FusedBlockSparseAttention.Pointer(dRelK);
            args.DRelValue = FusedBlockSparseAttention.Pointer(dRelV);
        }
    }

    /// <summary>The tables' gradients from the kernel's per-(batch, head) buffers (B·H, rows, ·): summed over heads.</summary>
    private static (Tensor? DRelK, Tensor? DRelV) TableGradients(Tensor? dRelK, Tensor? dRelV) =>
        dRelK is null || dRelV is null ? (null, null) : (dRelK.sum(dim: 0), dRelV.sum(dim: 0));

    /// <summary>Per-(batch, head) gradient buffers for the Shaw tables, or nulls without them.</summary>
    private static (Tensor? DRelK, Tensor? DRelV) TableGradientBuffers(Tensor q, Tensor? relK, Tensor? relV) =>
        relK is null || relV is null ? (null, null)
        : (empty(new[] { q.shape[0] * q.shape[1], relK.shape[0], relK.shape[1] }),                // (B·H, 2R + 1, D)
           empty(new[] { q.shape[0] * q.shape[1], relV.shape[0], relV.shape[1] }));               // (B·H, 2R + 1, Dv)

    /// <inheritdoc cref="GroupedAttention.MergedAttention(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, bool, bool, Tensor?, Tensor?, Tensor?, bool, double?, AttentionKernel)"/>
    /// <param name="threads">Worker threads (results do not depend on it); default <see cref="FusedBlockSparseAttention.DefaultThreads"/>.</param>
    public static Tensor MergedAttention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, bool causal = false, bool sharedQk = false, Tensor? keyMask = null, Tensor? queryLabels = null,
        Tensor? keyLabels = null, bool dedup = false, double? scale = null, int? threads = null)
    {
        GroupedAttention.CheckMergedArguments(q, k, v, queryIndices, keyIndices, previousGroup, rounds, keyMask, queryLabels, keyLabels);
        return MergedAttentionChecked(q, k, v, queryIndices, keyIndices, previousGroup, rounds, causal, sharedQk, keyMask, queryLabels,
            keyLabels, dedup, scale, threads);
    }

    /// <summary><see cref="MergedAttention"/> after <see cref="GroupedAttention.CheckMergedArguments"/> has run.</summary>
    internal static Tensor MergedAttentionChecked(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, bool causal, bool sharedQk, Tensor? keyMask, Tensor? queryLabels, Tensor? keyLabels, bool dedup, double? scale, int? threads,
        RelativePositionTerms? relative = null)
    {
        Check.That(FusedBlockSparseAttention.Supports(q), nameof(q), $"the fused kernels need float32 CPU tensors, got {q.dtype} on {q.device}.");
        if (threads is int t) Check.Positive(t, nameof(threads));
        var settings = new MergedSettings(rounds, causal, sharedQk, dedup, (float)(scale ?? 1.0 / Math.Sqrt(q.shape[3])),
            threads ?? FusedBlockSparseAttention.DefaultThreads, Slopes(relative));
        var shaw = relative as ShawRelativePositions;
        return MergedFunction.apply(q, k, v, queryIndices, keyIndices, previousGroup, keyMask, queryLabels, keyLabels,
            shaw?.KeyTable, shaw?.ValueTable, settings);
    }

    private sealed record MergedSettings(int Rounds, bool Causal, bool SharedQk, bool Dedup, float Scale, int Threads, float[]? AlibiSlopes);

    private sealed class MergedFunction : autograd.SingleTensorFunction<MergedFunction>
    {
        public override string Name => "FusedMergedGroupedAttention";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (q, k, v) = (((Tensor)vars[0]).contiguous(), ((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous());
            var (queryIndex, keyIndex, previous) = (((Tensor)vars[3]).contiguous(), ((Tensor)vars[4]).contiguous(), ((Tensor)vars[5]).contiguous());
            var keyMask = (vars[6] as Tensor)?.contiguous();
            var queryLabels = (vars[7] as Tensor)?.contiguous();
            var keyLabels = (vars[8] as Tensor)?.contiguous();
            var (relK, relV) = ((vars[9] as Tensor)?.contiguous(), (vars[10] as Tensor)?.contiguous());
            var settings = (MergedSettings)vars[11];
            var slopes = settings.AlibiSlopes is null ? null : tensor(settings.AlibiSlopes);
            // Padded keys (keyMask false) are never read by the kernel, so NaN there cannot leak and k, v need no masked copy.
            long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dimV = v.shape[3];
            var output = empty(new[] { batch, heads, seqLen, dimV });                      // (B, H, T, Dv)
            var lse = empty(new[] { batch, heads, seqLen });                               // (B, H, T)
            var args = Arguments(q, k, v, queryIndex, keyIndex, previous, keyMask, queryLabels, keyLabels, output, lse, settings);
            SetRelative(ref args, relK, relV, slopes);
            GroupedKernel.Forward(args);
            GC.KeepAlive(q); GC.KeepAlive(k); GC.KeepAlive(v); GC.KeepAlive(queryIndex); GC.KeepAlive(keyIndex); GC.KeepAlive(previous);
            GC.KeepAlive(keyMask); GC.KeepAlive(queryLabels); GC.KeepAlive(keyLabels); GC.KeepAlive(output); GC.KeepAlive(lse);
            GC.KeepAlive(relK); GC.KeepAlive(relV); GC.KeepAlive(slopes);
            var none = empty(0, dtype: ScalarType.Int64);
            ctx.save_for_backward([q, k, v, queryIndex, keyIndex, previous, keyMask ?? empty(0, dtype: ScalarType.Bool),
                                   queryLabels ?? none, keyLabels ?? none, output, lse, relK ?? empty(0), relV ?? empty(0)]);
            ctx.save_data("settings", settings);
            return output;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var keyMask = saved[6].numel() == 0 ? null : saved[6];
            var queryLabels = saved[7].numel() == 0 ? null : saved[7];
            var keyLabels = saved[8].numel() == 0 ? null : saved[8];
            var (relK, relV) = saved[11].numel() == 0 ? (null, null) : (saved[11], saved[12]);
            var settings = (MergedSettings)ctx.get_data("settings");
            var slopes = settings.AlibiSlopes is null ? null : tensor(settings.AlibiSlopes);
            var dO = gradOutput.contiguous();
            var (dq, dk, dv) = (empty_like(saved[0]), empty_like(saved[1]), empty_like(saved[2]));
            var (dRelK, dRelV) = TableGradientBuffers(saved[0], relK, relV);
            var args = Arguments(saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], keyMask, queryLabels, keyLabels, saved[9], saved[10], settings);
            SetRelative(ref args, relK, relV, slopes, dRelK, dRelV);
            args.DO = FusedBlockSparseAttention.Pointer(dO);
            args.DQ = FusedBlockSparseAttention.Pointer(dq);
            args.DK = FusedBlockSparseAttention.Pointer(dk);
            args.DV = FusedBlockSparseAttention.Pointer(dv);
            GroupedKernel.Backward(args);
            // Raw pointers only: keep every tensor the kernel used reachable until it is done.
            GC.KeepAlive(saved); GC.KeepAlive(dO); GC.KeepAlive(dq); GC.KeepAlive(dk); GC.KeepAlive(dv);
            GC.KeepAlive(slopes); GC.KeepAlive(dRelK); GC.KeepAlive(dRelV);
            var (dTableK, dTableV) = TableGradients(dRelK, dRelV);
            return [dq, dk, dv, null!, null!, null!, null!, null!, null!, dTableK!, dTableV!, null!];
        }

        private static GroupedArgs Arguments(Tensor q, Tensor k, Tensor v, Tensor queryIndex, Tensor keyIndex, Tensor previous, Tensor? keyMask,
            Tensor? queryLabels, Tensor? keyLabels, Tensor output, Tensor lse, MergedSettings s) => new()
        {
            Batch = (int)q.shape[0], Heads = (int)q.shape[1], SeqLen = (int)q.shape[2], Dim = (int)q.shape[3], DimV = (int)v.shape[3],
            Groups = (int)queryIndex.shape[2], QuerySlots = (int)queryIndex.shape[3], KeySlots = (int)keyIndex.shape[3],
            Threads = s.Threads, Causal = s.Causal, SharedQk = s.SharedQk, LookBackward = true, Scale = s.Scale,
            Rounds = s.Rounds, Dedup = s.Dedup,
            Q = FusedBlockSparseAttention.Pointer(q), K = FusedBlockSparseAttention.Pointer(k), V = FusedBlockSparseAttention.Pointer(v),
            QueryIndex = FusedBlockSparseAttention.Pointer(queryIndex), KeyIndex = FusedBlockSparseAttention.Pointer(keyIndex),
            PreviousGroup = FusedBlockSparseAttention.Pointer(previous),
            KeyMask = keyMask is null ? 0 : FusedBlockSparseAttention.Pointer(keyMask),
            QueryLabels = queryLabels is null ? 0 : FusedBlockSparseAttention.Pointer(queryLabels),
            KeyLabels = keyLabels is null ? 0 : FusedBlockSparseAttention.Pointer(keyLabels),
            O = FusedBlockSparseAttention.Pointer(output), PositionLse = FusedBlockSparseAttention.Pointer(lse),
        };
    }

    private sealed record Settings(bool Causal, bool SharedQk, bool LookBackward, float Scale, int Threads, float[]? AlibiSlopes);

    private sealed class GroupedFunction : autograd.SingleTensorFunction<GroupedFunction>
    {
        public override string Name => "FusedGroupedAttention";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var (q, k, v) = (((Tensor)vars[0]).contiguous(), ((Tensor)vars[1]).contiguous(), ((Tensor)vars[2]).contiguous());
            var (queryIndex, keyIndex) = (((Tensor)vars[3]).contiguous(), ((Tensor)vars[4]).contiguous());
            var keyMask = (vars[5] as Tensor)?.contiguous();
            var (relK, relV) = ((vars[6] as Tensor)?.contiguous(), (vars[7] as Tensor)?.contiguous());
            var settings = (Settings)vars[8];
            var slopes = settings.AlibiSlopes is null ? null : tensor(settings.AlibiSlopes);
            long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dimV = v.shape[3];
            long groups = queryIndex.shape[2], wq = queryIndex.shape[3];
            // Padded keys (keyMask false) are never read by the kernel, so NaN there cannot leak and k, v need no masked copy.
            var output = empty(new[] { batch, heads, seqLen, dimV });                      // (B, H, T, Dv)
            var lse = empty(new[] { batch, heads, groups, wq });                           // (B, H, G, Wq)
            var args = Arguments(q, k, v, queryIndex, keyIndex, keyMask, settings);
            SetRelative(ref args, relK, relV, slopes);
            args.O = FusedBlockSparseAttention.Pointer(output);
            args.Lse = FusedBlockSparseAttention.Pointer(lse);                            // per-slot outputs are not kept:
            GroupedKernel.Forward(args);                                                   // the backward recomputes them (G·Wq·Dv floats, often ≫ T·Dv)
            GC.KeepAlive(q); GC.KeepAlive(k); GC.KeepAlive(v); GC.KeepAlive(queryIndex); GC.KeepAlive(keyIndex); GC.KeepAlive(keyMask);
            GC.KeepAlive(relK); GC.KeepAlive(relV); GC.KeepAlive(slopes);
            var none = empty(0);
            ctx.save_for_backward([q, k, v, queryIndex, keyIndex, keyMask ?? empty(0, dtype: ScalarType.Bool), lse, relK ?? none, relV ?? none]);
            ctx.save_data("settings", settings);
            return output;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var (q, k, v, queryIndex, keyIndex) = (saved[0], saved[1], saved[2], saved[3], saved[4]);
            var keyMask = saved[5].numel() == 0 ? null : saved[5];
            var lse = saved[6];
            var (relK, relV) = saved[7].numel() == 0 ? (null, null) : (saved[7], saved[8]);
            var settings = (Settings)ctx.get_data("settings");
            var slopes = settings.AlibiSlopes is null ? null : tensor(settings.AlibiSlopes);
            var dO = gradOutput.contiguous();
            var (dq, dk, dv) = (empty_like(q), empty_like(k), empty_like(v));
            var (dRelK, dRelV) = TableGradientBuffers(q, relK, relV);
            var args = Arguments(q, k, v, queryIndex, keyIndex, keyMask, settings);
            SetRelative(ref args, relK, relV, slopes, dRelK, dRelV);
            args.Lse = FusedBlockSparseAttention.Pointer(lse);
            args.DO = FusedBlockSparseAttention.Pointer(dO);
            args.DQ = FusedBlockSparseAttention.Pointer(dq);
            args.DK = FusedBlockSparseAttention.Pointer(dk);
            args.DV = FusedBlockSparseAttention.Pointer(dv);
            GroupedKernel.Backward(args);
            // Raw pointers only: keep every tensor the kernel used reachable until it is done.
            GC.KeepAlive(saved); GC.KeepAlive(dO); GC.KeepAlive(slopes); GC.KeepAlive(dRelK); GC.KeepAlive(dRelV);
            var (dTableK, dTableV) = TableGradients(dRelK, dRelV);
            return [dq, dk, dv, null!, null!, null!, dTableK!, dTableV!, null!];
        }

        private static GroupedArgs Arguments(Tensor q, Tensor k, Tensor v, Tensor queryIndex, Tensor keyIndex, Tensor? keyMask, Settings s) => new()
        {
            Batch = (int)q.shape[0], Heads = (int)q.shape[1], SeqLen = (int)q.shape[2], Dim = (int)q.shape[3], DimV = (int)v.shape[3],
            Groups = (int)queryIndex.shape[2], QuerySlots = (int)queryIndex.shape[3], KeySlots = (int)keyIndex.shape[3],
            Threads = s.Threads, Causal = s.Causal, SharedQk = s.SharedQk, LookBackward = s.LookBackward, Scale = s.Scale,
            Q = FusedBlockSparseAttention.Pointer(q), K = FusedBlockSparseAttention.Pointer(k), V = FusedBlockSparseAttention.Pointer(v),
            QueryIndex = FusedBlockSparseAttention.Pointer(queryIndex), KeyIndex = FusedBlockSparseAttention.Pointer(keyIndex),
            KeyMask = keyMask is null ? 0 : FusedBlockSparseAttention.Pointer(keyMask),
        };
    }
}
