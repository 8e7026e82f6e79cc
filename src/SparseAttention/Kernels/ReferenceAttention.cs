using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// The oracle: dense attention <c>softmax(q·kᵀ·scale + bias)·v</c> over the full score matrix with an
/// explicit boolean mask. Slow and obviously right; every other kernel is tested against it.
/// </summary>
public static class ReferenceAttention
{
    /// <summary>
    /// Dense masked attention.
    /// </summary>
    /// <param name="q">Queries (B, H, Tq, D).</param>
    /// <param name="k">Keys (B, H, Tk, D).</param>
    /// <param name="v">Values (B, H, Tk, Dv).</param>
    /// <param name="mask">Optional bool mask broadcastable to (B, H, Tq, Tk); true = may attend.</param>
    /// <param name="causal">Also require key ≤ query (needs Tq = Tk).</param>
    /// <param name="keyMask">Optional (B, Tk) bool; true = a real key, false = padding (never attended).</param>
    /// <param name="bias">Optional additive score bias broadcastable to (B, H, Tq, Tk).</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <param name="relative">Optional terms of the distance j − i between key and query positions (needs Tq = Tk).</param>
    /// <returns>(B, H, Tq, Dv). A query with no allowed key gets zeros (and zero gradients), never NaN.</returns>
    public static Tensor Attention(Tensor q, Tensor k, Tensor v, Tensor? mask = null, bool causal = false,
        Tensor? keyMask = null, Tensor? bias = null, double? scale = null, RelativePositionTerms? relative = null)
    {
        Check.QueryKeyValue(q, k, v);
        long batch = q.shape[0], heads = q.shape[1], tq = q.shape[2], tk = k.shape[2];
        Check.KeyMask(keyMask, batch, tk);
        if (mask is not null)
        {
            Check.Bool(mask, nameof(mask));
            Check.That(mask.dim() <= 4 && Broadcasts(mask.shape, [batch, heads, tq, tk]), nameof(mask),
                $"must broadcast to (B, H, Tq, Tk) = ({batch}, {heads}, {tq}, {tk}), got {Check.ShapeOf(mask)}.");
        }
        if (bias is not null)
            Check.That(bias.dim() <= 4 && Broadcasts(bias.shape, [batch, heads, tq, tk]), nameof(bias),
                $"must broadcast to (B, H, Tq, Tk) = ({batch}, {heads}, {tq}, {tk}), got {Check.ShapeOf(bias)}.");
        Check.That(!causal || tq == tk, nameof(causal), $"causal attention needs as many queries as keys, got Tq = {tq}, Tk = {tk}.");
        Check.That(relative is null || tq == tk, nameof(relative), $"relative positions need self-attention (Tq = Tk), got Tq = {tq}, Tk = {tk}.");
        relative?.CheckFits(heads, q.shape[3], v.shape[3], nameof(relative));

        using var scope = NewDisposeScope();
        var allowed = ones(new long[] { batch, heads, tq, tk }, dtype: ScalarType.Bool, device: q.device);
        if (mask is not null) allowed = allowed.logical_and(mask);
        if (causal) allowed = allowed.logical_and(ones(tq, tk, dtype: ScalarType.Bool, device: q.device).tril());
        if (keyMask is not null)
        {
            allowed = allowed.logical_and(keyMask.view(batch, 1, 1, tk));        // (B, 1, 1, Tk)
            // Zero padded keys/values so that garbage (even NaN) there cannot leak through 0·x.
            var keep = keyMask.view(batch, 1, tk, 1);                              // (B, 1, Tk, 1)
            k = k.masked_fill(keep.logical_not(), 0);
            v = v.masked_fill(keep.logical_not(), 0);
        }
        double s = scale ?? 1.0 / Math.Sqrt(q.shape[3]);
        var scores = matmul(q, k.transpose(-1, -2)) * s;                           // (B, H, Tq, Tk)
        if (bias is not null) scores = scores + bias;
        var distance = relative is null ? null : RelativePositionTerms.DenseDistance(tq, q.device);   // (T, T): j − i
        if (relative is not null) scores = relative.AddToScores(scores, q, distance!, s);
        var probs = MaskedSoftmax(scores, allowed);
        var output = matmul(probs, v);                                             // (B, H, Tq, Dv)
        if (relative is not null) output = relative.AddToOutput(output, probs, distance!);
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>Softmax over the last dimension restricted to <paramref name="allowed"/>; rows with no
    /// allowed entry give all zeros (not NaN) and pass no gradient.</summary>
    public static Tensor MaskedSoftmax(Tensor scores, Tensor allowed)
    {
        var rowHasAny = allowed.any(-1, keepdim: true);
        var masked = scores.masked_fill(allowed.logical_not(), double.NegativeInfinity)
                           .masked_fill(rowHasAny.logical_not(), 0);               // empty rows: finite, then zeroed below
        return masked.softmax(-1) * allowed;
    }

    private static bool Broadcasts(long[] shape, long[] target)
    {
        for (int i = 1; i <= shape.Length; i++)
        {
            long s = shape[^i], t = target[^i];
            if (s != 1 && s != t) return false;
        }
        return true;
    }
}
