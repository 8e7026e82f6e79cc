using System.Text.Json.Serialization;
using static TorchSharp.torch;

namespace SparseAttention.Hashing;

/// <summary>Asymmetric transforms that turn maximum-inner-product search into angular nearest-neighbour search.</summary>
[JsonConverter(typeof(JsonStringEnumConverter<AlshTransform>))]
public enum AlshTransform
{
    /// <summary>SimpleLSH (Neyshabur &amp; Srebro, ICML 2015, arXiv 1410.5518): keys scaled by the largest key norm M,
    /// P(x) = [x/M; √(1 − ‖x/M‖²)]; queries normalised, Q(q) = [q/‖q‖; 0]. Both have norm 1 and
    /// P(x)·Q(q) = q·x / (M‖q‖).</summary>
    SimpleLsh,
    /// <summary>XBOX (Bachrach et al., RecSys 2014): φ = largest key norm, P(x) = [x; √(φ² − ‖x‖²)], Q(q) = [q; 0].
    /// Every key row has norm φ, so the angle to Q(q) orders keys by q·x.</summary>
    Xbox,
    /// <summary>Sign-ALSH (Shrivastava &amp; Li, UAI 2015, arXiv 1410.5410; m = 2, U = 0.75): x ← U·x/M,
    /// P(x) = [x; ½ − ‖x‖²; ½ − ‖x‖⁴], Q(q) = [q/‖q‖; 0; 0]. ‖P(x)‖² = m/4 + ‖x‖^(2^(m+1)), constant up to at most
    /// U⁸ ≈ 0.1, so the angle orders keys by q·x up to that term.</summary>
    SignAlsh,
}

/// <summary>
/// The key-side P and query-side Q transforms of <see cref="AlshTransform"/>, with optional query-normalised-first
/// (QNF) rescaling. The query is hashed with its OWN transformed vector Q(q) (and keys with P(k)); the attention
/// scores themselves still use the untransformed q·k.
/// </summary>
/// <remarks>
/// <para>QNF (Huang, Feng, Zhang, Fang, Ng, KDD 2018, "Accurate and Fast Asymmetric Locality-Sensitive Hashing Scheme
/// for Maximum Inner Product Search"): the query is normalised first and rescaled so that query and key rows share one
/// norm (here: the largest transformed key norm of the same batch row and head), which makes the Euclidean distance
/// ‖P(x) − Q(q)‖ a decreasing function of q·x. Angular hashes (sign random projections, random rotations) do not
/// depend on a vector's length, so with them QNF changes the transformed vectors but never a bucket.</para>
/// </remarks>
public static class MipsTransforms
{
    /// <summary>Sign-ALSH's U (scale of the largest key after normalisation).</summary>
    public const double SignAlshU = 0.75;

    /// <summary>Extra coordinates each transform appends (D → D + this).</summary>
    public static int ExtraDims(AlshTransform transform) => transform == AlshTransform.SignAlsh ? 2 : 1;

    /// <summary>Transforms keys and queries.</summary>
    /// <param name="keys">(B, H, T, D) keys.</param>
    /// <param name="queries">(B, H, Tq, D) queries.</param>
    /// <param name="transform">Which transform.</param>
    /// <param name="queryNormalizedFirst">QNF: rescale every Q(q) row to the largest P(x) row norm.</param>
    /// <param name="keyMask">Optional (B, T) bool, true = real key; padding does not count towards the largest norm.</param>
    /// <param name="causal">The largest norm (M, φ, and QNF's target) is a running maximum over the keys at positions
    /// ≤ t for the key (and query) at t, so no transformed vector depends on later tokens (needs Tq = T). Keys with the
    /// same running maximum keep the exact ordering; across a growth of the maximum the ordering is approximate.</param>
    /// <returns>P(keys) (B, H, T, D + e) and Q(queries) (B, H, Tq, D + e), detached (hashing has no gradient).</returns>
    public static (Tensor Keys, Tensor Queries) Apply(Tensor keys, Tensor queries, AlshTransform transform,
        bool queryNormalizedFirst = false, Tensor? keyMask = null, bool causal = false)
    {
        Check.Shape(keys, nameof(keys), "(B, H, T, D)", -1, -1, -1, -1);
        Check.Shape(queries, nameof(queries), "(B, H, Tq, D)", keys.shape[0], keys.shape[1], -1, keys.shape[3]);
        Check.FloatingPoint(keys, nameof(keys));
        Check.SameDtype(keys, nameof(keys), queries, nameof(queries));
        Check.KeyMask(keyMask, keys.shape[0], keys.shape[2]);
        Check.That(Enum.IsDefined(transform), nameof(transform), $"unknown value {transform}.");
        Check.That(!causal || queries.shape[2] == keys.shape[2], nameof(queries), $"causal transforms pair query t with key t, so Tq must equal T = {keys.shape[2]}, got {queries.shape[2]}.");
        using var scope = NewDisposeScope();
        long batch = keys.shape[0], seqLen = keys.shape[2];
        var x = keys.detach();
        var q = queries.detach();
        if (keyMask is not null) x = x.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), 0);   // (B, H, T, D)
        var keyNorm = x.norm(-1, keepdim: true);                                         // (B, H, T, 1)
        var maxNorm = (causal ? keyNorm.cummax(2).values : keyNorm.amax(new long[] { 2 }, keepdim: true))
                      .clamp_min(1e-12);                                                 // (B, H, T or 1, 1): M (or φ)
        var queryUnit = q / q.norm(-1, keepdim: true).clamp_min(1e-12);                 // (B, H, Tq, D)
        Tensor p, qq;
        switch (transform)
        {
            case AlshTransform.SimpleLsh:
            {
                var scaled = x / maxNorm;                                                // ‖·‖ ≤ 1
                var extra = (1 - scaled.square().sum(-1, keepdim: true)).clamp_min(0).sqrt();
                p = cat([scaled, extra], -1);                                            // (B, H, T, D + 1)
                qq = cat([queryUnit, zeros_like(queryUnit.narrow(-1, 0, 1))], -1);        // (B, H, Tq, D + 1)
                break;
            }
            case AlshTransform.Xbox:
            {
                var extra = (maxNorm.square() - keyNorm.square()).clamp_min(0).sqrt();  // (B, H, T, 1)
                p = cat([x, extra], -1);                                                 // (B, H, T, D + 1)
                qq = cat([q, zeros_like(q.narrow(-1, 0, 1))], -1);                        // (B, H, Tq, D + 1)
                break;
            }
            default:
            {
                var scaled = x * (SignAlshU / maxNorm);                                  // ‖·‖ ≤ U
                var sq = scaled.square().sum(-1, keepdim: true);                         // (B, H, T, 1)
                p = cat([scaled, 0.5 - sq, 0.5 - sq.square()], -1);                      // (B, H, T, D + 2)
                qq = cat([queryUnit, zeros_like(queryUnit.narrow(-1, 0, 2))], -1);        // (B, H, Tq, D + 2)
                break;
            }
        }
        if (keyMask is not null) p = p.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), 0);
        if (queryNormalizedFirst)
        {
            var pNorm = p.norm(-1, keepdim: true);                                       // (B, H, T, 1)
            if (keyMask is not null) pNorm = pNorm.masked_fill(keyMask.logical_not().view(batch, 1, seqLen, 1), 0);
            var target = causal ? pNorm.cummax(2).values : pNorm.amax(new long[] { 2 }, keepdim: true);   // (B, H, T or 1, 1)
            qq = qq / qq.norm(-1, keepdim: true).clamp_min(1e-12) * target;              // (B, H, Tq, D + e)
        }
        return (p.MoveToOuterDisposeScope(), qq.MoveToOuterDisposeScope());
    }
}
