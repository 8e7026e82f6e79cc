using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Attention of ONE new query per (batch row, head) over an explicit list of cached key slots — the inner step of
/// incremental decoding. Every head kind reduces to this: the decoder works out on the host which cached positions
/// the new query may see (local window, pattern row, routing chunk, LSH chunks, …) and this attends exactly those.
/// </summary>
/// <remarks>Each listed slot is a separate key: a slot listed twice is attended twice (as in
/// <see cref="GroupedAttention"/>, which is how several LSH rounds weigh a key seen in more than one round).
/// A query with no key and no memory gets zeros.</remarks>
public static class DecodeAttention
{
    /// <summary>Optional relative-position terms of the listed keys.</summary>
    /// <param name="Distance">Per listed slot, key position − query position; same layout as the slot list.</param>
    /// <param name="Terms">The terms (Shaw tables, ALiBi slopes) for the H heads.</param>
    public sealed record Relative(long[] Distance, RelativePositionTerms Terms);

    /// <param name="q">New queries (B, H, D).</param>
    /// <param name="keys">Cached keys (B, S, H, D), S slots per row.</param>
    /// <param name="values">Cached values (B, S, H, Dv).</param>
    /// <param name="slots">B·H·L slot numbers, row-major (b, h, l); −1 = no key.</param>
    /// <param name="width">L, listed slots per (b, h).</param>
    /// <param name="memoryKeys">Optional (B, H, M, D) keys every query may attend.</param>
    /// <param name="memoryValues">Optional (B, H, M, Dv).</param>
    /// <param name="relative">Optional relative-position terms (Shaw, ALiBi) of the listed keys.</param>
    /// <param name="scale">Score scale; default 1/√D.</param>
    /// <returns>(B, H, Dv).</returns>
    public static Tensor Attend(Tensor q, Tensor keys, Tensor values, long[] slots, int width,
        Tensor? memoryKeys = null, Tensor? memoryValues = null, Relative? relative = null, double? scale = null)
    {
        Check.Shape(q, nameof(q), "(B, H, D)", -1, -1, -1);
        long batch = q.shape[0], heads = q.shape[1], dim = q.shape[2];
        Check.Shape(keys, nameof(keys), "(B, S, H, D)", batch, -1, heads, dim);
        long capacity = keys.shape[1];
        Check.Shape(values, nameof(values), "(B, S, H, Dv)", batch, capacity, heads, -1);
        long dimV = values.shape[3];
        Check.NonNegative(width, nameof(width));
        Check.That(slots.LongLength == batch * heads * width, nameof(slots), $"must hold B·H·L = {batch * heads * width} entries, got {slots.LongLength}.");
        Check.That((memoryKeys is null) == (memoryValues is null), nameof(memoryKeys), "memoryKeys and memoryValues must be given together.");
        Check.That(relative is null || relative.Distance.LongLength == slots.LongLength, nameof(relative), "needs one distance per listed slot.");
        relative?.Terms.CheckFits(heads, dim, values.shape[3], nameof(relative));
        double s = scale ?? 1.0 / Math.Sqrt(dim);
        bool fused = q.device.type == DeviceType.CPU && q.dtype == ScalarType.Float32 && keys.dtype == ScalarType.Float32
                     && values.dtype == ScalarType.Float32 && (memoryKeys is null || memoryKeys.dtype == ScalarType.Float32)
                     && (memoryValues is null || memoryValues.dtype == ScalarType.Float32);
        return fused ? AttendCpu(q, keys, values, slots, width, memoryKeys, memoryValues, relative, (float)s)
                     : AttendOps(q, keys, values, slots, width, memoryKeys, memoryValues, relative, s);
    }

    /// <summary>The tensor-ops path (any device and dtype); the oracle of <see cref="AttendCpu"/>.</summary>
    internal static Tensor AttendOps(Tensor q, Tensor keys, Tensor values, long[] slots, int width,
        Tensor? memoryKeys, Tensor? memoryValues, Relative? relative, double s)
    {
        long batch = q.shape[0], heads = q.shape[1], dim = q.shape[2], capacity = keys.shape[1], dimV = values.shape[3];
        using var scope = NewDisposeScope();
        var device = q.device;
        var rows = new long[slots.LongLength];                                          // row of (B·S·H, D) per listed slot
        var valid = new bool[slots.LongLength];
        for (long i = 0; i < slots.LongLength; i++)
        {
            long b = i / (heads * width), h = i / width % heads;
            valid[i] = slots[i] >= 0;
            rows[i] = valid[i] ? (b * capacity + slots[i]) * heads + h : 0;
        }
        var index = tensor(rows, device: device);                                       // (B·H·L)
        var allowed = tensor(valid, device: device).view(batch, heads, width);          // (B, H, L)
        var k = keys.view(batch * capacity * heads, dim).index_select(0, index).view(batch, heads, width, dim);     // (B, H, L, D)
        var v = values.view(batch * capacity * heads, dimV).index_select(0, index).view(batch, heads, width, dimV); // (B, H, L, Dv)
        var query = q.unsqueeze(2);                                                     // (B, H, 1, D)
        var scores = matmul(query, k.transpose(-1, -2)).squeeze(2);                     // (B, H, L)
        scores = scores * s;
        var distance = relative is null ? null : tensor(relative.Distance, device: device).view(batch, heads, 1, width);   // (B, H, 1, L)
        if (relative is not null) scores = relative.Terms.AddToScores(scores.unsqueeze(2), query, distance!, s).squeeze(2);
        if (memoryKeys is not null && memoryValues is not null)
        {
            long mem = memoryKeys.shape[2];
            var memScores = matmul(query, memoryKeys.transpose(-1, -2)).squeeze(2) * s;  // (B, H, M)
            scores = cat([scores, memScores], -1);                                      // (B, H, L + M)
            allowed = cat([allowed, ones(new long[] { batch, heads, mem }, dtype: ScalarType.Bool, device: device)], -1);
        }
        var probs = ReferenceAttention.MaskedSoftmax(scores, allowed);                  // (B, H, L [+ M])
        var keyProbs = probs.narrow(-1, 0, width);                                      // (B, H, L)
        var output = matmul(keyProbs.unsqueeze(2), v).squeeze(2);                       // (B, H, Dv)
        if (memoryValues is not null)
            output = output + matmul(probs.narrow(-1, width, memoryValues.shape[2]).unsqueeze(2), memoryValues).squeeze(2);
        if (relative is not null)
            output = relative.Terms.AddToOutput(output.unsqueeze(2), keyProbs.unsqueeze(2), distance!).squeeze(2);   // (B, H, Dv)
        return output.MoveToOuterDisposeScope();
    }

    /// <summary>
    /// One pass over float32 CPU memory per (row, head): dot products with the listed keys (and memory), a softmax,
    /// and the weighted sum of values — what <see cref="AttendOps"/> does with ~25 tensor operations, without
    /// allocating anything but the output. For one query per head the work is tiny and per-op overhead dominated.
    /// </summary>
    internal static unsafe Tensor AttendCpu(Tensor q, Tensor keys, Tensor values, long[] slots, int width,
        Tensor? memoryKeys, Tensor? memoryValues, Relative? relative, float scale)
    {
        int batch = (int)q.shape[0], heads = (int)q.shape[1], dim = (int)q.shape[2];
        long capacity = keys.shape[1];
        int dimV = (int)values.shape[3];
        int mem = (int)(memoryKeys?.shape[2] ?? 0);
        using var scope = NewDisposeScope();
        var qc = q.contiguous();
        var kc = keys.contiguous();
        var vc = values.contiguous();
        var mk = memoryKeys?.contiguous();
        var mv = memoryValues?.contiguous();
        var shaw = relative?.Terms as ShawRelativePositions;
        var alibi = relative?.Terms as AlibiPositions;
        var rk = shaw?.KeyTable.detach().to(ScalarType.Float32).contiguous();
        var rv = shaw?.ValueTable.detach().to(ScalarType.Float32).contiguous();
        int reach = shaw?.MaxDistance ?? 0;
        var output = zeros(new long[] { batch, heads, dimV }, dtype: ScalarType.Float32);
        float* qp = (float*)FusedBlockSparseAttention.Pointer(qc), kp = (float*)FusedBlockSparseAttention.Pointer(kc), vp = (float*)FusedBlockSparseAttention.Pointer(vc), op = (float*)FusedBlockSparseAttention.Pointer(output);
        float* mkp = mk is null ? null : (float*)FusedBlockSparseAttention.Pointer(mk!), mvp = mv is null ? null : (float*)FusedBlockSparseAttention.Pointer(mv);
        float* rkp = rk is null ? null : (float*)FusedBlockSparseAttention.Pointer(rk), rvp = rv is null ? null : (float*)FusedBlockSparseAttention.Pointer(rv);
        int buckets = (int)(rk?.shape[0] ?? 0);
        var scores = new float[width + mem];
        var relScores = new float[buckets];
        for (int bh = 0; bh < batch * heads; bh++)
        {
            int b = bh / heads, h = bh % heads;
            float* query = qp + (long)bh * dim;
            for (int r = 0; r < buckets; r++) relScores[r] = Dot(query, rkp + (long)r * dim, dim);
            float max = float.NegativeInfinity;
            for (int l = 0; l < width; l++)
            {
                long slot = slots[(long)bh * width + l];
                if (slot < 0) { scores[l] = float.NegativeInfinity; continue; }
                float score = Dot(query, kp + ((b * capacity + slot) * heads + h) * dim, dim);
                long distance = relative?.Distance[(long)bh * width + l] ?? 0;
                if (shaw is not null) score += relScores[Math.Clamp(distance, -reach, reach) + reach];
                scores[l] = score * scale;
                if (alibi is not null) scores[l] -= (float)(alibi.Slopes[h] * Math.Abs(distance));
                max = Math.Max(max, scores[l]);
            }
            for (int m = 0; m < mem; m++)
            {
                scores[width + m] = Dot(query, mkp + ((long)bh * mem + m) * dim, dim) * scale;
                max = Math.Max(max, scores[width + m]);
            }
            if (float.IsNegativeInfinity(max)) continue;                                 // no key at all: zeros
            float sum = 0;
            for (int i = 0; i < width + mem; i++)
            {
                scores[i] = float.IsNegativeInfinity(scores[i]) ? 0 : MathF.Exp(scores[i] - max);
                sum += scores[i];
            }
            float* o = op + (long)bh * dimV;
            for (int l = 0; l < width; l++)
            {
                long slot = slots[(long)bh * width + l];
                if (slot < 0) continue;
                float p = scores[l] / sum;
                Axpy(p, vp + ((b * capacity + slot) * heads + h) * dimV, o, dimV);
                if (shaw is not null) Axpy(p, rvp + (Math.Clamp(relative!.Distance[(long)bh * width + l], -reach, reach) + reach) * dimV, o, dimV);
            }
            for (int m = 0; m < mem; m++) Axpy(scores[width + m] / sum, mvp + ((long)bh * mem + m) * dimV, o, dimV);
        }
        GC.KeepAlive(qc); GC.KeepAlive(kc); GC.KeepAlive(vc); GC.KeepAlive(mk); GC.KeepAlive(mv); GC.KeepAlive(rk); GC.KeepAlive(rv);
        return output.to(q.device).MoveToOuterDisposeScope();
    }

    private static unsafe float Dot(float* a, float* b, int n)
    {
        int i = 0;
        var acc = System.Numerics.Vector<float>.Zero;
        int lanes = System.Numerics.Vector<float>.Count;
        for (; i + lanes <= n; i += lanes)
            acc += System.Runtime.CompilerServices.Unsafe.ReadUnaligned<System.Numerics.Vector<float>>(a + i)
                   * System.Runtime.CompilerServices.Unsafe.ReadUnaligned<System.Numerics.Vector<float>>(b + i);
        float sum = System.Numerics.Vector.Sum(acc);
        for (; i < n; i++) sum += a[i] * b[i];
        return sum;
    }

    private static unsafe void Axpy(float alpha, float* x, float* y, int n)
    {
        for (int i = 0; i < n; i++) y[i] += alpha * x[i];
    }
}
