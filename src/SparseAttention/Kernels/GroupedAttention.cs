using SparseAttention.Kernels.Fused;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Attention inside content-based groups (routing clusters, LSH chunks) with TorchSharp ops only: gather the rows of
/// each group by index, attend inside the group, scatter the outputs back to their positions and average over the
/// groups each query joined. Runs on any device and dtype; gradients come from autograd.
/// </summary>
/// <remarks>
/// <para>Rules, all on the tokens' ORIGINAL positions (never on slot order inside a group):</para>
/// <list type="bullet">
/// <item>A query slot attends the key slots of its own group (and, with <c>lookBackward</c>, those of the previous
/// group in G order; group 0 has none — no wrap-around) plus the group's memory key/values, if given.</item>
/// <item><c>causal</c>: query at position i may attend key at position j iff j ≤ i. Memory is always allowed.</item>
/// <item><c>keyMask</c>: padded keys are never attended (and their k, v are zeroed first, so NaN there cannot leak).</item>
/// <item><c>sharedQk</c>: a query may attend a key slot holding its own position only when no other key slot
/// (memory included) is allowed for it — exactly that rule, not a large negative score.</item>
/// <item>Index −1 marks an empty slot. Each slot is a separate key: a position listed twice in one group's key list
/// is attended twice.</item>
/// <item>Output at position i = mean over the query slots holding i of that slot's attention output (a slot with no
/// allowed key contributes zeros and still counts); a position in no query slot gets zeros.</item>
/// </list>
/// <para>Used by routing attention (Roy et al., arXiv 2003.05997) and LSH attention (Kitaev et al., arXiv 2001.04451).</para>
/// </remarks>
public static class GroupedAttention
{
    /// <summary>
    /// Also check index VALUES (positions in range, at most one slot per round, look-back links of the same round) for
    /// tensors off the CPU. Those checks read results back to the host (a device sync per check), so by default they
    /// run only on CPU tensors — where the fused kernels read memory by these indices and a sync costs nothing; shapes
    /// and dtypes are always checked. Turn on while debugging a GPU pipeline.
    /// </summary>
    public static bool DebugChecks { get; set; }

    /// <summary>Whether the value checks that need host reads run for this tensor (see <see cref="DebugChecks"/>).</summary>
    private static bool CheckValues(Tensor t) => DebugChecks || t.device.type == DeviceType.CPU;

    /// <param name="q">Queries (B, H, Tq, D).</param>
    /// <param name="k">Keys (B, H, Tk, D).</param>
    /// <param name="v">Values (B, H, Tk, Dv).</param>
    /// <param name="queryIndices">(B, H, G, Wq) int64: positions in [0, Tq) of each group's query slots, −1 = empty.</param>
    /// <param name="keyIndices">(B, H, G, Wk) int64: positions in [0, Tk) of each group's key slots, −1 = empty.</param>
    /// <param name="causal">Query i may attend key j only if j ≤ i (needs Tq = Tk).</param>
    /// <param name="sharedQk">Self-attention (query i vs key i) only when nothing else is allowed (needs Tq = Tk).</param>
    /// <param name="keyMask">Optional (B, Tk) bool; true = a real key, false = padding (never attended).</param>
    /// <param name="lookBackward">Each group also attends the key slots of the previous group (G order; none for group 0).</param>
    /// <param name="memoryKeys">Optional (B or 1, H, G, M, D) memory keys per group, always allowed.</param>
    /// <param name="memoryValues">Optional (B or 1, H, G, M, Dv) memory values; given iff <paramref name="memoryKeys"/> is.</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <returns>(B, H, Tq, Dv); never NaN from masking (rows with no allowed key are zeros).</returns>
    /// <param name="kernel">Auto: the fused kernel for float32 CPU self-attention (Tq = Tk) without memory key/values, with
    /// no relative terms or Shaw (float32 tables) or ALiBi ones, when the machine has a hardware-accelerated vector width
    /// (<see cref="AttentionKernel.Auto"/>), else Ops.</param>
    /// <param name="relative">Optional terms of the distance j − i between the original positions of each attended pair
    /// (self-attention only; memory key/values have no position and get none). The fused kernel evaluates Shaw and ALiBi
    /// inside its tiles; other terms need the Ops kernel.</param>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices,
        bool causal = false, bool sharedQk = false, Tensor? keyMask = null, bool lookBackward = false,
        Tensor? memoryKeys = null, Tensor? memoryValues = null, double? scale = null, AttentionKernel kernel = AttentionKernel.Auto,
        RelativePositionTerms? relative = null)
    {
        CheckArguments(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, memoryKeys, memoryValues);
        if (relative is not null)
        {
            Check.That(k.shape[2] == q.shape[2], nameof(relative), $"relative positions need self-attention (Tq = Tk), got Tq = {q.shape[2]}, Tk = {k.shape[2]}.");
            relative.CheckFits(q.shape[1], q.shape[3], v.shape[3], nameof(relative));
        }
        switch (kernel)
        {
            case AttentionKernel.Fused:
                Check.That(memoryKeys is null, nameof(memoryKeys), "the fused grouped kernel does not take memory key/values; use the Ops kernel.");
                return FusedGroupedAttention.AttentionChecked(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, scale, null, relative);
            case AttentionKernel.Auto when (relative is null || FusedGroupedAttention.Handles(relative)) && SimdWidth.Vectorised
                                           && FusedGroupedAttention.Supports(q, memoryKeys) && k.shape[2] == q.shape[2]:
                return FusedGroupedAttention.AttentionChecked(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, scale, null, relative);
            case AttentionKernel.Reference:
                throw new ArgumentException("kernel: grouped attention has Ops and Fused kernels; its oracle is ReferenceAttention with the implied mask.", nameof(kernel));
        }
        if (relative is null)
            return OpsAttention(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, memoryKeys, memoryValues, scale, null);
        // Score-sized intermediates (scores, gathered distances, probabilities) exist only while the layer runs.
        return Recomputation.Of(x => OpsAttention(x[0]!, x[1]!, x[2]!, x[3]!, x[4]!, causal, sharedQk, x[5], lookBackward, x[6], x[7], scale,
            relative.With(x[8..]!)), [q, k, v, queryIndices, keyIndices, keyMask, memoryKeys, memoryValues, .. relative.Tensors]);
    }

    /// <summary>Argument checks shared by the Ops and fused grouped kernels.</summary>
    internal static void CheckArguments(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices,
        bool causal, bool sharedQk, Tensor? keyMask, Tensor? memoryKeys, Tensor? memoryValues)
    {
        Check.QueryKeyValue(q, k, v);
        long batch = q.shape[0], heads = q.shape[1], tq = q.shape[2], dim = q.shape[3], tk = k.shape[2], dimV = v.shape[3];
        Check.That(!(causal || sharedQk) || tq == tk, nameof(k),
            $"causal or shared-QK attention compares query and key positions, so k must have T = {tq} like q, got {tk}.");
        Check.KeyMask(keyMask, batch, tk);
        CheckIndices(queryIndices, nameof(queryIndices), batch, heads, -1, tq);
        long groups = queryIndices.shape[2], wq = queryIndices.shape[3];
        CheckIndices(keyIndices, nameof(keyIndices), batch, heads, groups, tk);
        Check.That((memoryKeys is null) == (memoryValues is null), memoryKeys is null ? nameof(memoryKeys) : nameof(memoryValues),
            "memoryKeys and memoryValues must be given together.");
        if (memoryKeys is not null && memoryValues is not null)
        {
            Check.Shape(memoryKeys, nameof(memoryKeys), "(B or 1, H, G, M, D)", -1, heads, groups, -1, dim);
            Check.That(memoryKeys.shape[0] == 1 || memoryKeys.shape[0] == batch, nameof(memoryKeys),
                $"first dimension must be 1 or B = {batch}, got {Check.ShapeOf(memoryKeys)}.");
            Check.Shape(memoryValues, nameof(memoryValues), "(B or 1, H, G, M, Dv)", -1, heads, groups, memoryKeys.shape[3], dimV);
            Check.That(memoryValues.shape[0] == 1 || memoryValues.shape[0] == batch, nameof(memoryValues),
                $"first dimension must be 1 or B = {batch}, got {Check.ShapeOf(memoryValues)}.");
            Check.SameDtype(q, nameof(q), memoryKeys, nameof(memoryKeys));
            Check.SameDtype(q, nameof(q), memoryValues, nameof(memoryValues));
        }
    }

    private static Tensor OpsAttention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices,
        bool causal, bool sharedQk, Tensor? keyMask, bool lookBackward, Tensor? memoryKeys, Tensor? memoryValues, double? scale,
        RelativePositionTerms? relative)
    {
        long batch = q.shape[0], heads = q.shape[1], tq = q.shape[2], dim = q.shape[3], tk = k.shape[2], dimV = v.shape[3];
        long groups = queryIndices.shape[2], wq = queryIndices.shape[3];
        long mem = memoryKeys?.shape[3] ?? 0;

        using var scope = NewDisposeScope();
        var keyIdx = keyIndices;                                                         // (B, H, G, Wk)
        if (lookBackward && groups > 0)
        {
            var previousGroup = (arange(groups, dtype: ScalarType.Int64, device: keyIndices.device) - 1)
                                .view(1, 1, groups).expand(batch, heads, groups);        // group g sees g − 1 (none for 0)
            keyIdx = WithPreviousKeys(keyIndices, previousGroup);                        // (B, H, G, 2·Wk)
        }
        long wk = keyIdx.shape[3];
        var queryValid = queryIndices.ge(0);                                             // (B, H, G, Wq)
        var keyValid = keyIdx.ge(0);                                                     // (B, H, G, Wk)
        var (querySafe, keySafe, qg, kg, vg) = GatherGroups(q, k, v, queryIndices, keyIdx, keyMask);

        var allowed = queryValid.unsqueeze(-1).logical_and(keyValid.unsqueeze(-2));      // (B, H, G, Wq, Wk)
        if (keyMask is not null)
        {
            var realKey = keyMask.view(batch, 1, tk).expand(batch, heads, tk)            // (B, H, Tk)
                                 .gather(2, keySafe)                                     // (B, H, G·Wk)
                                 .view(batch, heads, groups, 1, wk);                     // (B, H, G, 1, Wk)
            allowed = allowed.logical_and(realKey);
        }
        var queryPos = queryIndices.unsqueeze(-1);                                       // (B, H, G, Wq, 1)
        var keyPos = keyIdx.unsqueeze(-2);                                               // (B, H, G, 1, Wk)
        if (causal) allowed = allowed.logical_and(keyPos.le(queryPos));
        var self = sharedQk ? keyPos.eq(queryPos) : null;                               // (B, H, G, Wq, Wk)

        double s = scale ?? 1.0 / Math.Sqrt(dim);
        var scores = matmul(qg, kg.transpose(-1, -2)) * s;                               // (B, H, G, Wq, Wk)
        var distance = relative is null ? null : keyPos - queryPos;                      // (B, H, G, Wq, Wk): j − i
        if (relative is not null) scores = relative.AddToScores(scores, qg, distance!, s);
        var values = vg;
        if (memoryKeys is not null && memoryValues is not null)
        {
            var memScores = matmul(qg, memoryKeys.transpose(-1, -2)) * s;                // (B, H, G, Wq, M)
            scores = cat([scores, memScores], -1);                                       // (B, H, G, Wq, Wk + M)
            allowed = cat([allowed, queryValid.unsqueeze(-1).expand(batch, heads, groups, wq, mem)], -1);
            values = cat([vg, memoryValues.expand(batch, heads, groups, mem, dimV)], 3); // (B, H, G, Wk + M, Dv)
            if (self is not null)
                self = cat([self.expand(batch, heads, groups, wq, wk),
                            zeros(new long[] { batch, heads, groups, wq, mem }, dtype: ScalarType.Bool, device: q.device)], -1);
        }
        if (self is not null)
        {
            var other = allowed.logical_and(self.logical_not()).any(-1, keepdim: true);   // (B, H, G, Wq, 1)
            allowed = allowed.logical_and(self.logical_and(other).logical_not());
        }
        var probs = ReferenceAttention.MaskedSoftmax(scores, allowed);                   // (B, H, G, Wq, Wk [+ M])
        var grouped = matmul(probs, values);                                             // (B, H, G, Wq, Dv)
        if (relative is not null) grouped = relative.AddToOutput(grouped, probs.narrow(-1, 0, wk), distance!);
        grouped = grouped.masked_fill(queryValid.unsqueeze(-1).logical_not(), 0)
                      .view(batch, heads, groups * wq, dimV);                            // (B, H, G·Wq, Dv)
        return ScatterMeanRows(grouped, querySafe, queryValid.view(batch, heads, groups * wq), tq)
               .MoveToOuterDisposeScope();                                               // (B, H, Tq, Dv)
    }

    /// <summary>
    /// Multi-round grouped attention (LSH rounds): R rounds of groups over the same tokens, each group's queries
    /// attending its own key slots and those of its <paramref name="previousGroup"/>; the output at position i is ONE
    /// softmax over every (round, key) pair allowed for i — the log-sum-exp merge of the rounds' results.
    /// </summary>
    /// <remarks>
    /// <para>Rules, all on original positions: a pair (i, j) is attended in round r when i is in a query slot of a
    /// group g of round r and j in a key slot of g or of previousGroup[g]; j is a real key (keyMask); j ≤ i when
    /// <paramref name="causal"/>; j ≠ i when <paramref name="sharedQk"/>; and, with labels, queryLabels[r, i] =
    /// keyLabels[r, j] (e.g. the same hash bucket). Without <paramref name="dedup"/>, a key attended in c rounds counts
    /// c times (its score enters the softmax c times); with it, once (score − log c in every round it is attended,
    /// the Reformer's de-duplication made exact: c counts the rounds in which the pair is allowed by all of the rules above).</para>
    /// <para>Shared QK: a real position with no allowed pair in any round attends only itself (output v_i), the
    /// "self only when nothing else is allowed" rule applied to the union of the rounds. Otherwise such a position,
    /// and any position in no query slot, gets zeros.</para>
    /// <para>Each position may occupy at most one query slot and at most one key slot per round.</para>
    /// <para>Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer", ICLR 2020, arXiv 2001.04451.</para>
    /// </remarks>
    /// <param name="q">Queries (B, H, T, D).</param>
    /// <param name="k">Keys (B, H, T, D).</param>
    /// <param name="v">Values (B, H, T, Dv).</param>
    /// <param name="queryIndices">(B, H, G, Wq) int64 query positions, −1 = empty; round r owns groups [r·G/R, (r+1)·G/R).</param>
    /// <param name="keyIndices">(B, H, G, Wk) int64 key positions, −1 = empty.</param>
    /// <param name="previousGroup">(B, H, G) int64 group (of the same round) whose keys each group also attends, −1 = none.</param>
    /// <param name="rounds">R ≥ 1; G must be a multiple of R.</param>
    /// <param name="causal">Query i attends keys j ≤ i only.</param>
    /// <param name="sharedQk">Keys are the queries' own tokens: self only as a last resort (see remarks).</param>
    /// <param name="keyMask">Optional (B, T) bool; true = real key.</param>
    /// <param name="queryLabels">Optional (B, H, R, T) int64 label of each query per round; given iff <paramref name="keyLabels"/> is.</param>
    /// <param name="keyLabels">Optional (B, H, R, T) int64 label of each key per round; a pair needs equal labels.</param>
    /// <param name="dedup">Count a pair attended in several rounds once.</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <param name="kernel">Auto: fused for float32 CPU tensors on a machine with a hardware-accelerated vector width
    /// (<see cref="AttentionKernel.Auto"/>), else Ops.</param>
    /// <returns>(B, H, T, Dv).</returns>
    public static Tensor MergedAttention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, bool causal = false, bool sharedQk = false, Tensor? keyMask = null, Tensor? queryLabels = null,
        Tensor? keyLabels = null, bool dedup = false, double? scale = null, AttentionKernel kernel = AttentionKernel.Auto) =>
        MergedAttention(q, k, v, queryIndices, keyIndices, previousGroup, rounds, causal, sharedQk, keyMask, queryLabels, keyLabels, dedup,
            scale, kernel, builtGroups: false);

    /// <summary>Merged grouped attention with optional <paramref name="relative"/> terms of the distance j − i between
    /// the original positions of every attended pair (the fused kernel takes Shaw and ALiBi, the Ops kernel any term);
    /// the shared-QK last resort (a token alone with itself) gets the distance-0 terms, as attending itself would.</summary>
    internal static Tensor MergedAttention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, bool causal, bool sharedQk, Tensor? keyMask, Tensor? queryLabels, Tensor? keyLabels, bool dedup, double? scale,
        AttentionKernel kernel, bool builtGroups, RelativePositionTerms? relative)
    {
        if (relative is null)
            return MergedAttention(q, k, v, queryIndices, keyIndices, previousGroup, rounds, causal, sharedQk, keyMask, queryLabels, keyLabels,
                dedup, scale, kernel, builtGroups);
        CheckMergedArguments(q, k, v, queryIndices, keyIndices, previousGroup, rounds, keyMask, queryLabels, keyLabels, values: !builtGroups);
        relative.CheckFits(q.shape[1], q.shape[3], v.shape[3], nameof(relative));
        switch (kernel)
        {
            case AttentionKernel.Fused:
            case AttentionKernel.Auto when FusedGroupedAttention.Handles(relative) && SimdWidth.Vectorised && FusedGroupedAttention.Supports(q, null):
                return FusedGroupedAttention.MergedAttentionChecked(q, k, v, queryIndices, keyIndices, previousGroup, rounds, causal, sharedQk,
                    keyMask, queryLabels, keyLabels, dedup, scale, null, relative);
            case AttentionKernel.Reference:
                throw new ArgumentException("kernel: merged grouped attention has Ops and Fused kernels; its oracle is ReferenceAttention with the implied mask.", nameof(kernel));
        }
        // Score-sized intermediates (scores, gathered distances, probabilities) exist only while the layer runs.
        return Recomputation.Of(x => MergedOps(x[0]!, x[1]!, x[2]!, x[3]!, x[4]!, x[5]!, rounds, causal, sharedQk, x[6], x[7], x[8], dedup,
            scale, relative.With(x[9..]!)), [q, k, v, queryIndices, keyIndices, previousGroup, keyMask, queryLabels, keyLabels, .. relative.Tensors]);
    }

    /// <summary><see cref="MergedAttention(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, bool, bool, Tensor?, Tensor?, Tensor?, bool, double?, AttentionKernel)"/>;
    /// with <paramref name="builtGroups"/> the indices come from this library's own grouping (valid by construction), so
    /// only shapes and dtypes are checked — the value checks are a few tensor passes per call.</summary>
    internal static Tensor MergedAttention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, bool causal, bool sharedQk, Tensor? keyMask, Tensor? queryLabels, Tensor? keyLabels, bool dedup, double? scale,
        AttentionKernel kernel, bool builtGroups)
    {
        CheckMergedArguments(q, k, v, queryIndices, keyIndices, previousGroup, rounds, keyMask, queryLabels, keyLabels, values: !builtGroups);
        switch (kernel)
        {
            case AttentionKernel.Fused:
            case AttentionKernel.Auto when SimdWidth.Vectorised && FusedGroupedAttention.Supports(q, null):
                return FusedGroupedAttention.MergedAttentionChecked(q, k, v, queryIndices, keyIndices, previousGroup, rounds, causal, sharedQk,
                    keyMask, queryLabels, keyLabels, dedup, scale, null);
            case AttentionKernel.Reference:
                throw new ArgumentException("kernel: merged grouped attention has Ops and Fused kernels; its oracle is ReferenceAttention with the implied mask.", nameof(kernel));
        }
        return MergedOps(q, k, v, queryIndices, keyIndices, previousGroup, rounds, causal, sharedQk, keyMask, queryLabels, keyLabels, dedup, scale, null);
    }

    internal static void CheckMergedArguments(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, Tensor? keyMask, Tensor? queryLabels, Tensor? keyLabels, bool values = true)
    {
        Check.QueryKeyValue(q, k, v);
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2];
        Check.That(k.shape[2] == seqLen, nameof(k), $"merged attention groups one sequence's tokens, so k must have T = {seqLen} like q, got {k.shape[2]}.");
        Check.KeyMask(keyMask, batch, seqLen);
        Check.Positive(rounds, nameof(rounds));
        CheckIndices(queryIndices, nameof(queryIndices), batch, heads, -1, seqLen, values);
        long groups = queryIndices.shape[2];
        CheckIndices(keyIndices, nameof(keyIndices), batch, heads, groups, seqLen, values);
        Check.That(groups % rounds == 0, nameof(rounds), $"the G = {groups} groups must split evenly into {rounds} rounds.");
        Check.Shape(previousGroup, nameof(previousGroup), "(B, H, G)", batch, heads, groups);
        Check.That(previousGroup.dtype == ScalarType.Int64, nameof(previousGroup), $"must be int64, got {previousGroup.dtype}.");
        if (previousGroup.numel() > 0 && values && CheckValues(previousGroup))
        {
            long perRound = groups / rounds;
            var own = arange(groups, device: previousGroup.device).div(perRound, rounding_mode: RoundingMode.floor);   // (G) round of each group
            var theirs = previousGroup.clamp_min(0).div(perRound, rounding_mode: RoundingMode.floor);                  // (B, H, G)
            bool ok = previousGroup.ge(-1).all().item<bool>() && previousGroup.lt(groups).all().item<bool>()
                      && previousGroup.lt(0).logical_or(theirs.eq(own)).all().item<bool>();
            Check.That(ok, nameof(previousGroup), "entries must be −1 or a group of the same round.");
        }
        Check.That((queryLabels is null) == (keyLabels is null), queryLabels is null ? nameof(queryLabels) : nameof(keyLabels),
            "queryLabels and keyLabels must be given together.");
        if (queryLabels is not null && keyLabels is not null)
        {
            Check.Shape(queryLabels, nameof(queryLabels), "(B, H, R, T)", batch, heads, rounds, seqLen);
            Check.Shape(keyLabels, nameof(keyLabels), "(B, H, R, T)", batch, heads, rounds, seqLen);
            Check.That(queryLabels.dtype == ScalarType.Int64 && keyLabels.dtype == ScalarType.Int64, nameof(queryLabels), "labels must be int64.");
        }
        if (!values || !CheckValues(queryIndices)) return;
        using var scope = NewDisposeScope();
        Check.That(SlotsPerRound(queryIndices, rounds, seqLen).le(1).all().item<bool>(), nameof(queryIndices),
            "a position may occupy at most one query slot per round.");
        Check.That(SlotsPerRound(keyIndices, rounds, seqLen).le(1).all().item<bool>(), nameof(keyIndices),
            "a position may occupy at most one key slot per round.");
    }

    /// <summary>(B, H, R, T): how many slots of each round hold each position.</summary>
    private static Tensor SlotsPerRound(Tensor indices, int rounds, long seqLen) =>
        GroupOfPosition(indices, rounds, seqLen, count: true);

    /// <summary>(B, H, R, T) group holding each position in each round (−1 = none), from slot indices (B, H, G, W);
    /// with <paramref name="count"/>, how many slots hold it instead.</summary>
    internal static Tensor GroupOfPosition(Tensor indices, int rounds, long seqLen, bool count = false)
    {
        long batch = indices.shape[0], heads = indices.shape[1], groups = indices.shape[2], width = indices.shape[3];
        long perRound = groups / rounds;
        var group = arange(groups, device: indices.device).view(1, 1, groups, 1).expand(batch, heads, groups, width);     // (B, H, G, W)
        var round = group.div(perRound, rounding_mode: RoundingMode.floor);
        var valid = indices.ge(0);
        var flat = (round * seqLen + indices).masked_fill(valid.logical_not(), rounds * seqLen)                         // dummy column for empties
                   .reshape(batch, heads, groups * width);                                                              // (B, H, G·W)
        Tensor result;
        if (count)
            result = zeros(new long[] { batch, heads, rounds * seqLen + 1 }, dtype: ScalarType.Int64, device: indices.device)
                     .scatter_add(2, flat, ones_like(flat));
        else
            result = full(new long[] { batch, heads, rounds * seqLen + 1 }, -1L, dtype: ScalarType.Int64, device: indices.device)
                     .scatter(2, flat, group.reshape(batch, heads, groups * width));
        return result.narrow(2, 0, rounds * seqLen).view(batch, heads, rounds, seqLen);                                  // (B, H, R, T)
    }

    /// <summary>Key slots of each group followed by those of its previous group's: (B, H, G, 2·Wk), −1 = empty.</summary>
    internal static Tensor WithPreviousKeys(Tensor keyIndices, Tensor previousGroup)
    {
        long batch = keyIndices.shape[0], heads = keyIndices.shape[1], groups = keyIndices.shape[2], wk = keyIndices.shape[3];
        var previous = keyIndices.gather(2, previousGroup.clamp_min(0).unsqueeze(-1).expand(batch, heads, groups, wk))  // (B, H, G, Wk)
                                 .masked_fill(previousGroup.lt(0).unsqueeze(-1), -1);
        return cat([previous, keyIndices], 3);                                                                          // (B, H, G, 2·Wk)
    }

    private static Tensor MergedOps(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor previousGroup,
        int rounds, bool causal, bool sharedQk, Tensor? keyMask, Tensor? queryLabels, Tensor? keyLabels, bool dedup, double? scale,
        RelativePositionTerms? relative)
    {
        long batch = q.shape[0], heads = q.shape[1], seqLen = q.shape[2], dim = q.shape[3], dimV = v.shape[3];
        long groups = queryIndices.shape[2], wq = queryIndices.shape[3];
        using var scope = NewDisposeScope();
        var keyIdx = WithPreviousKeys(keyIndices, previousGroup);                       // (B, H, G, Wk2)
        long wk = keyIdx.shape[3];
        var queryValid = queryIndices.ge(0);                                             // (B, H, G, Wq)
        var (querySafe, keySafe, qg, kg, vg) = GatherGroups(q, k, v, queryIndices, keyIdx, keyMask);

        var allowed = queryValid.unsqueeze(-1).logical_and(keyIdx.ge(0).unsqueeze(-2));  // (B, H, G, Wq, Wk2)
        if (keyMask is not null)
            allowed = allowed.logical_and(keyMask.view(batch, 1, seqLen).expand(batch, heads, seqLen)
                                                 .gather(2, keySafe).view(batch, heads, groups, 1, wk));
        var queryPos = queryIndices.unsqueeze(-1);                                       // (B, H, G, Wq, 1)
        var keyPos = keyIdx.unsqueeze(-2);                                               // (B, H, G, 1, Wk2)
        if (causal) allowed = allowed.logical_and(keyPos.le(queryPos));
        if (sharedQk) allowed = allowed.logical_and(keyPos.ne(queryPos));
        Tensor? queryLabelsPerRound = null, keyLabelsPerRound = null;                    // (B, H, G·W, R)
        if (queryLabels is not null && keyLabels is not null)
        {
            queryLabelsPerRound = GatherRows(queryLabels.transpose(2, 3), querySafe);   // (B, H, G·Wq, R)
            keyLabelsPerRound = GatherRows(keyLabels.transpose(2, 3), keySafe);         // (B, H, G·Wk2, R)
            var roundOfGroup = arange(groups, device: q.device).div(groups / rounds, rounding_mode: RoundingMode.floor)   // (G)
                               .view(1, 1, groups, 1, 1);
            var ql = queryLabelsPerRound.view(batch, heads, groups, wq, rounds)
                     .gather(-1, roundOfGroup.expand(batch, heads, groups, wq, 1));     // (B, H, G, Wq, 1)
            var kl = keyLabelsPerRound.view(batch, heads, groups, wk, rounds)
                     .gather(-1, roundOfGroup.expand(batch, heads, groups, wk, 1))
                     .view(batch, heads, groups, 1, wk);                                  // (B, H, G, 1, Wk2)
            allowed = allowed.logical_and(ql.eq(kl));
        }
        double s = scale ?? 1.0 / Math.Sqrt(dim);
        var scores = matmul(qg, kg.transpose(-1, -2)) * s;                               // (B, H, G, Wq, Wk2)
        var distance = relative is null ? null : keyPos - queryPos;                      // (B, H, G, Wq, Wk2): j − i
        if (relative is not null) scores = relative.AddToScores(scores, qg, distance!, s);
        if (dedup)
        {
            // Rounds in which each pair is allowed: key's group is the query's group or its previous group (+ labels).
            var queryGroup = GatherRows(GroupOfPosition(queryIndices, rounds, seqLen).transpose(2, 3), querySafe)
                             .view(batch, heads, groups, wq, 1, rounds);                 // (B, H, G, Wq, 1, R)
            var keyGroup = GatherRows(GroupOfPosition(keyIndices, rounds, seqLen).transpose(2, 3), keySafe)
                           .view(batch, heads, groups, 1, wk, rounds);                   // (B, H, G, 1, Wk2, R)
            var previousOfQuery = previousGroup.view(batch, heads, groups)
                                  .gather(2, queryGroup.clamp_min(0).view(batch, heads, -1))
                                  .view(batch, heads, groups, wq, 1, rounds)
                                  .masked_fill(queryGroup.lt(0), -1);                    // (B, H, G, Wq, 1, R)
            var together = keyGroup.ge(0).logical_and(keyGroup.eq(queryGroup).logical_or(keyGroup.eq(previousOfQuery)));
            if (queryLabelsPerRound is not null && keyLabelsPerRound is not null)
                together = together.logical_and(queryLabelsPerRound.view(batch, heads, groups, wq, 1, rounds)
                                                .eq(keyLabelsPerRound.view(batch, heads, groups, 1, wk, rounds)));
            var count = together.sum(-1L).clamp_min(1).to(scores.dtype);                // (B, H, G, Wq, Wk2)
            scores = scores - count.log();
        }
        // One softmax per position over all its slots' allowed keys: shift by the position's max, sum, divide.
        var masked = scores.masked_fill(allowed.logical_not(), double.NegativeInfinity);  // (B, H, G, Wq, Wk2)
        var rowMax = masked.amax(new long[] { -1 }).detach().reshape(batch, heads, groups * wq);          // (B, H, G·Wq)
        // Each position holds at most one query slot per round: scatter per round, then the max over rounds.
        var round = arange(groups, device: q.device).div(groups / rounds, rounding_mode: RoundingMode.floor)
                    .view(1, 1, groups, 1).expand(batch, heads, groups, wq);                             // (B, H, G, Wq)
        var perRoundIndex = (round * seqLen + queryIndices).masked_fill(queryValid.logical_not(), rounds * seqLen)
                            .reshape(batch, heads, groups * wq);                                         // (B, H, G·Wq)
        var positionMax = full(new long[] { batch, heads, rounds * seqLen + 1 }, double.NegativeInfinity, dtype: q.dtype, device: q.device)
                          .scatter(2, perRoundIndex, rowMax)
                          .narrow(2, 0, rounds * seqLen).view(batch, heads, rounds, seqLen)               // (B, H, R, T)
                          .amax(new long[] { 2 });                                                       // (B, H, T)
        positionMax = positionMax.masked_fill(positionMax.isinf(), 0);
        var shift = positionMax.gather(2, querySafe).view(batch, heads, groups, wq, 1);                   // (B, H, G, Wq, 1)
        var weights = (masked - shift).exp();                                            // (B, H, G, Wq, Wk2), 0 where not allowed
        var total = zeros(new long[] { batch, heads, seqLen }, dtype: q.dtype, device: q.device)
                    .scatter_add(2, querySafe, weights.sum(-1L).reshape(batch, heads, groups * wq));      // (B, H, T)
        var attended = matmul(weights, vg);                                              // (B, H, G, Wq, Dv)
        if (relative is not null) attended = relative.AddToOutput(attended, weights, distance!);   // linear in the weights
        var numerator = zeros(new long[] { batch, heads, seqLen, dimV }, dtype: q.dtype, device: q.device)
                        .scatter_add(2, querySafe.unsqueeze(-1).expand(batch, heads, groups * wq, dimV),
                                     attended.reshape(batch, heads, groups * wq, dimV));                  // (B, H, T, Dv)
        // total is 0 (nothing allowed) or ≥ 1 (the maximum contributes exp(0)), so clamping at 1 is exact.
        var output = numerator / total.clamp_min(1).unsqueeze(-1);                       // (B, H, T, Dv)
        if (sharedQk)
        {
            var alone = total.eq(0);                                                     // (B, H, T)
            if (keyMask is not null) alone = alone.logical_and(keyMask.view(batch, 1, seqLen));
            var self = v;                                                                // (B, H, T, Dv): the softmax over itself alone
            if (relative is not null)
            {
                self = relative.AddToOutput(v.unsqueeze(-2), ones(new long[] { batch, heads, seqLen, 1, 1 }, dtype: v.dtype, device: v.device),
                    zeros(new long[] { 1, 1, 1, 1, 1 }, dtype: ScalarType.Int64, device: v.device)).squeeze(-2);
            }
            output = where(alone.unsqueeze(-1), self, output);                           // self as the last resort
        }
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The rows of each group's slots: padded keys' k and v zeroed first (NaN there must not leak via 0·x), empty
    /// slots (−1) read row 0 (callers mask them). Returns the clamped indices flattened per (b, h) — QuerySafe
    /// (B, H, G·Wq), KeySafe (B, H, G·Wk) — and Qg (B, H, G, Wq, D), Kg (B, H, G, Wk, D), Vg (B, H, G, Wk, Dv).
    /// </summary>
    private static (Tensor QuerySafe, Tensor KeySafe, Tensor Qg, Tensor Kg, Tensor Vg) GatherGroups(
        Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices, Tensor? keyMask)
    {
        long batch = q.shape[0], heads = q.shape[1], dim = q.shape[3], tk = k.shape[2], dimV = v.shape[3];
        long groups = queryIndices.shape[2], wq = queryIndices.shape[3], wk = keyIndices.shape[3];
        var querySafe = queryIndices.clamp_min(0).reshape(batch, heads, groups * wq);    // (B, H, G·Wq)
        var keySafe = keyIndices.clamp_min(0).reshape(batch, heads, groups * wk);        // (B, H, G·Wk)
        if (keyMask is not null)
        {
            var drop = keyMask.logical_not().view(batch, 1, tk, 1);                     // (B, 1, Tk, 1)
            k = k.masked_fill(drop, 0);
            v = v.masked_fill(drop, 0);
        }
        return (querySafe, keySafe,
            GatherRows(q, querySafe).view(batch, heads, groups, wq, dim),                // (B, H, G, Wq, D)
            GatherRows(k, keySafe).view(batch, heads, groups, wk, dim),                  // (B, H, G, Wk, D)
            GatherRows(v, keySafe).view(batch, heads, groups, wk, dimV));                // (B, H, G, Wk, Dv)
    }

    /// <summary>Batched row gather: x (B, H, T, D), index (B, H, N) int64 in [0, T) → (B, H, N, D).</summary>
    internal static Tensor GatherRows(Tensor x, Tensor index)
    {
        long batch = index.shape[0], heads = index.shape[1], n = index.shape[2], d = x.shape[3];
        return x.gather(2, index.unsqueeze(-1).expand(batch, heads, n, d));            // (B, H, N, D)
    }

    /// <summary>Inverse of <see cref="GatherRows"/> with averaging: rows (B, H, N, D) are summed into position
    /// index (B, H, N) of a (B, H, T, D) result and divided by how many valid rows landed there; rows where
    /// <paramref name="valid"/> (B, H, N) is false are ignored (they must already be zero); positions no valid row
    /// reaches are zero.</summary>
    internal static Tensor ScatterMeanRows(Tensor rows, Tensor index, Tensor valid, long length)
    {
        long batch = rows.shape[0], heads = rows.shape[1], n = rows.shape[2], d = rows.shape[3];
        var summed = zeros(new long[] { batch, heads, length, d }, dtype: rows.dtype, device: rows.device)
                     .scatter_add(2, index.unsqueeze(-1).expand(batch, heads, n, d), rows);    // (B, H, T, D)
        var counts = zeros(new long[] { batch, heads, length }, dtype: rows.dtype, device: rows.device)
                     .scatter_add(2, index, valid.to(rows.dtype));                              // (B, H, T)
        return summed / counts.clamp_min(1).unsqueeze(-1);
    }

    private static void CheckIndices(Tensor indices, string name, long batch, long heads, long groups, long length, bool values = true)
    {
        Check.Shape(indices, name, "(B, H, G, W)", batch, heads, groups, -1);
        Check.That(indices.dtype == ScalarType.Int64, name, $"must be an int64 tensor of positions, got {indices.dtype}.");
        if (indices.numel() == 0 || !values || !CheckValues(indices)) return;
        long min = indices.min().item<long>(), max = indices.max().item<long>();
        Check.That(min >= -1 && max < length, name,
            $"entries must be positions in [0, {length}) or −1 for an empty slot, got values in [{min}, {max}].");
    }
}
