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
    /// <param name="kernel">Auto: the fused kernel for float32 CPU self-attention (Tq = Tk) without memory key/values, else Ops.</param>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, Tensor queryIndices, Tensor keyIndices,
        bool causal = false, bool sharedQk = false, Tensor? keyMask = null, bool lookBackward = false,
        Tensor? memoryKeys = null, Tensor? memoryValues = null, double? scale = null, AttentionKernel kernel = AttentionKernel.Auto)
    {
        CheckArguments(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, memoryKeys, memoryValues);
        switch (kernel)
        {
            case AttentionKernel.Fused:
                Check.That(memoryKeys is null, nameof(memoryKeys), "the fused grouped kernel does not take memory key/values; use the Ops kernel.");
                return FusedGroupedAttention.Attention(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, scale);
            case AttentionKernel.Auto when FusedGroupedAttention.Supports(q, memoryKeys) && k.shape[2] == q.shape[2]:
                return FusedGroupedAttention.Attention(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, scale);
            case AttentionKernel.Reference:
                throw new ArgumentException("kernel: grouped attention has Ops and Fused kernels; its oracle is ReferenceAttention with the implied mask.", nameof(kernel));
        }
        return OpsAttention(q, k, v, queryIndices, keyIndices, causal, sharedQk, keyMask, lookBackward, memoryKeys, memoryValues, scale);
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
        bool causal, bool sharedQk, Tensor? keyMask, bool lookBackward, Tensor? memoryKeys, Tensor? memoryValues, double? scale)
    {
        long batch = q.shape[0], heads = q.shape[1], tq = q.shape[2], dim = q.shape[3], tk = k.shape[2], dimV = v.shape[3];
        long groups = queryIndices.shape[2], wq = queryIndices.shape[3];
        long mem = memoryKeys?.shape[3] ?? 0;

        using var scope = NewDisposeScope();
        var keyIdx = keyIndices;                                                         // (B, H, G, Wk)
        if (lookBackward && groups > 0)
        {
            var none = full(new long[] { batch, heads, 1, keyIndices.shape[3] }, -1L, dtype: ScalarType.Int64, device: keyIndices.device);
            var previous = cat([none, keyIndices.narrow(2, 0, groups - 1)], 2);          // (B, H, G, Wk): group g sees g − 1
            keyIdx = cat([previous, keyIndices], 3);                                     // (B, H, G, 2·Wk)
        }
        long wk = keyIdx.shape[3];
        var queryValid = queryIndices.ge(0);                                             // (B, H, G, Wq)
        var keyValid = keyIdx.ge(0);                                                     // (B, H, G, Wk)
        var querySafe = queryIndices.clamp_min(0).reshape(batch, heads, groups * wq);    // (B, H, G·Wq)
        var keySafe = keyIdx.clamp_min(0).reshape(batch, heads, groups * wk);            // (B, H, G·Wk)
        if (keyMask is not null)
        {
            var drop = keyMask.logical_not().view(batch, 1, tk, 1);                     // (B, 1, Tk, 1)
            k = k.masked_fill(drop, 0);
            v = v.masked_fill(drop, 0);
        }
        var qg = GatherRows(q, querySafe).view(batch, heads, groups, wq, dim);           // (B, H, G, Wq, D)
        var kg = GatherRows(k, keySafe).view(batch, heads, groups, wk, dim);             // (B, H, G, Wk, D)
        var vg = GatherRows(v, keySafe).view(batch, heads, groups, wk, dimV);            // (B, H, G, Wk, Dv)

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
        var grouped = matmul(probs, values)                                              // (B, H, G, Wq, Dv)
                      .masked_fill(queryValid.unsqueeze(-1).logical_not(), 0)
                      .view(batch, heads, groups * wq, dimV);                            // (B, H, G·Wq, Dv)
        return ScatterMeanRows(grouped, querySafe, queryValid.view(batch, heads, groups * wq), tq)
               .MoveToOuterDisposeScope();                                               // (B, H, Tq, Dv)
    }

    /// <summary>Batched row gather: x (B, H, T, D), index (B, H, N) int64 in [0, T) → (B, H, N, D).</summary>
    public static Tensor GatherRows(Tensor x, Tensor index)
    {
        long batch = index.shape[0], heads = index.shape[1], n = index.shape[2], d = x.shape[3];
        return x.gather(2, index.unsqueeze(-1).expand(batch, heads, n, d));            // (B, H, N, D)
    }

    /// <summary>Inverse of <see cref="GatherRows"/> with averaging: rows (B, H, N, D) are summed into position
    /// index (B, H, N) of a (B, H, T, D) result and divided by how many valid rows landed there; rows where
    /// <paramref name="valid"/> (B, H, N) is false are ignored (they must already be zero); positions no valid row
    /// reaches are zero.</summary>
    public static Tensor ScatterMeanRows(Tensor rows, Tensor index, Tensor valid, long length)
    {
        long batch = rows.shape[0], heads = rows.shape[1], n = rows.shape[2], d = rows.shape[3];
        var summed = zeros(new long[] { batch, heads, length, d }, dtype: rows.dtype, device: rows.device)
                     .scatter_add(2, index.unsqueeze(-1).expand(batch, heads, n, d), rows);    // (B, H, T, D)
        var counts = zeros(new long[] { batch, heads, length }, dtype: rows.dtype, device: rows.device)
                     .scatter_add(2, index, valid.to(rows.dtype));                              // (B, H, T)
        return summed / counts.clamp_min(1).unsqueeze(-1);
    }

    private static void CheckIndices(Tensor indices, string name, long batch, long heads, long groups, long length)
    {
        Check.Shape(indices, name, "(B, H, G, W)", batch, heads, groups, -1);
        Check.That(indices.dtype == ScalarType.Int64, name, $"must be an int64 tensor of positions, got {indices.dtype}.");
        if (indices.numel() == 0) return;
        long min = indices.min().item<long>(), max = indices.max().item<long>();
        Check.That(min >= -1 && max < length, name,
            $"entries must be positions in [0, {length}) or −1 for an empty slot, got values in [{min}, {max}].");
    }
}
