using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using SparseAttention.Kernels;
using SparseAttention.Kernels.Fused;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Clustering;

/// <summary>Result of <see cref="FusedKMeansAssign.Assign"/> for one (B, H, T, D) input.</summary>
/// <param name="Squared">Scalar Σ over real tokens of |x̂_t − μ_{a(t)}|² (x̂ = normalised x), differentiable with
/// respect to x (the Jacobian of the normalisation is applied in the backward); x's dtype.</param>
/// <param name="Nearest">(B, H, T) int64 nearest centroid, −1 at padding.</param>
/// <param name="Sums">(H, C, D) float64 sums of the normalised real tokens per nearest centroid (no gradient).</param>
/// <param name="Counts">(H, C) float64 real tokens per nearest centroid.</param>
internal sealed record FusedAssignment(Tensor Squared, Tensor Nearest, Tensor Sums, Tensor Counts);

/// <summary>
/// The k-means forward of <see cref="OnlineKMeans"/> for float32 CPU tensors in one pass over the input: normalise
/// each token in registers, find its nearest centroid, and gather the per-cluster sums, counts and the commitment
/// distance — without materialising the normalised (B, H, T, D) tensor or any (B, H, T, C) similarities. Fresh large
/// tensors are slow on CPU (page faults), and the ops path made several per input, forward and backward.
/// </summary>
/// <remarks>
/// <para>Nearest = argmax over centroids of x̂·μ_c, first index on exact ties (like <c>argmax</c>); the dot products
/// are summed in a different order than the ops path's matrix multiply, so a token whose two best centroids agree to
/// float32 rounding may pick the other one. A token with non-finite values (NaN similarities) goes to its best
/// non-NaN centroid, or centroid 0 (argmax would pick the first NaN); padding is never read. Per-cluster sums and the distance are accumulated in float64 in a fixed
/// partition of tokens, so results do not depend on the thread count.</para>
/// <para>The backward gives ∂Squared/∂x_t = Jᵀ · 2 (x̂_t − μ_{a(t)}), J the Jacobian of the normalisation at x_t
/// (L2: (I − x̂x̂ᵀ)/|x|, or I/ε when |x| &lt; ε; LayerNorm: r (I − 1/D − x̂x̂ᵀ/D)); zero at padding.</para>
/// </remarks>
internal static unsafe class FusedKMeansAssign
{
    private const float L2Eps = 1e-12f;      // nn.functional.normalize's eps, as OnlineKMeans.Normalize uses
    private const float LayerNormEps = 1e-5f;
    private const int TokenTile = TokenProjection.Rows;
    private const int TaskTokens = 1024;      // tokens per task along T (fixed: the partition must not depend on threads)

    /// <summary>True for float32 CPU inputs, at any vector width: unlike the attention kernels' Auto rule, the assignment
    /// stays fused on the scalar path too, because the ops path of <see cref="OnlineKMeans"/> differs in behaviour
    /// (NaN written into padding is not kept out of its results: FusedKMeansAssignTests.NaNInPaddingStaysHidden fails
    /// there), not only in speed.</summary>
    public static bool Supports(Tensor x) => x.dtype == ScalarType.Float32 && x.device.type == DeviceType.CPU;

    /// <param name="x">(B, H, T, D) float32 CPU.</param>
    /// <param name="keyMask">Optional (B, T) bool, true = real.</param>
    /// <param name="centroids">(H, C, D) float32 CPU, detached.</param>
    /// <param name="norm">The normalisation.</param>
    /// <param name="threads">Worker threads (results do not depend on it).</param>
    public static FusedAssignment Assign(Tensor x, Tensor? keyMask, Tensor centroids, KMeansNorm norm, int threads)
    {
        Check.That(Supports(x) && Supports(centroids), nameof(x), $"needs float32 CPU tensors, got {x.dtype} on {x.device}.");
        var holder = new Holder(keyMask?.to(ScalarType.Bool).contiguous(), centroids.detach().contiguous(), norm, Math.Max(1, threads));
        if (is_grad_enabled() && x.requires_grad)
        {
            var squared = AssignFunction.apply(x, holder);
            return new FusedAssignment(squared, holder.Nearest!, holder.Sums!, holder.Counts!);
        }
        var (sq, nearest, sums, counts) = Forward(x.detach().contiguous(), holder);
        return new FusedAssignment(sq, nearest, sums, counts);
    }

    /// <summary>Carries the non-tensor settings into the autograd function and its side outputs back out.</summary>
    private sealed class Holder(Tensor? mask, Tensor centroids, KMeansNorm norm, int threads)
    {
        public readonly Tensor? Mask = mask;
        public readonly Tensor Centroids = centroids;   // (H, C, D)
        public readonly KMeansNorm Norm = norm;
        public readonly int Threads = threads;
        public Tensor? Nearest, Sums, Counts;
    }

    private sealed class AssignFunction : autograd.SingleTensorFunction<AssignFunction>
    {
        public override string Name => "FusedKMeansAssign";

        public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var x = ((Tensor)vars[0]).contiguous();
            var holder = (Holder)vars[1];
            var (squared, nearest, sums, counts) = Forward(x, holder);
            (holder.Nearest, holder.Sums, holder.Counts) = (nearest, sums, counts);
            // Tensors the backward needs are saved (the caller's dispose scope may free its own handles before then).
            ctx.save_for_backward([x, nearest, holder.Centroids, holder.Mask ?? empty(0, dtype: ScalarType.Bool)]);
            ctx.save_data("norm", holder.Norm);
            ctx.save_data("threads", holder.Threads);
            return squared;
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor gradOutput)
        {
            var saved = ctx.get_saved_variables();
            var holder = new Holder(saved[3].numel() == 0 ? null : saved[3], saved[2], (KMeansNorm)ctx.get_data("norm"), (int)ctx.get_data("threads"));
            var dx = Backward(saved[0], saved[1], holder, gradOutput.to(ScalarType.Float32).item<float>());
            GC.KeepAlive(saved);
            return [dx, null!];
        }
    }

    private struct Args
    {
        public int Batch, Heads, SeqLen, Dim, Clusters, PaddedClusters, Threads;
        public bool LayerNorm;
        public float* X;           // (B, H, T, D)
        public byte* Mask;         // (B, T) or null
        public float* Centroids;   // (H, C, D)
        public float* Transposed;  // (H, D, Cp), zero columns beyond C
        public long* Nearest;      // (B, H, T)
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static (Tensor Squared, Tensor Nearest, Tensor Sums, Tensor Counts) Forward(Tensor x, Holder h)
    {
        int batch = (int)x.shape[0], heads = (int)x.shape[1], seqLen = (int)x.shape[2], dim = (int)x.shape[3];
        int clusters = (int)h.Centroids.shape[1];
        int padded = TokenProjection.PaddedColumns(clusters, SimdWidth.Bits / 32);
        var transposed = ArrayPool<float>.Shared.Rent(heads * dim * padded);    // (H, D, Cp); pooled: no large-object churn
        var nearest = empty(new long[] { batch, heads, seqLen }, dtype: ScalarType.Int64);   // (B, H, T)
        int chunks = (seqLen + TaskTokens - 1) / TaskTokens, tasks = heads * chunks;
        int statsPerTask = clusters * dim + clusters + 1;                       // sums, counts, squared distance
        var partial = ArrayPool<double>.Shared.Rent(tasks * statsPerTask);
        try
        {
            fixed (float* tp = transposed)
            fixed (double* pp = partial)
            {
                var a = new Args
                {
                    Batch = batch, Heads = heads, SeqLen = seqLen, Dim = dim, Clusters = clusters, PaddedClusters = padded,
                    Threads = h.Threads, LayerNorm = h.Norm == KMeansNorm.LayerNorm,
                    X = (float*)FusedBlockSparseAttention.Pointer(x),
                    Mask = h.Mask is null ? null : (byte*)FusedBlockSparseAttention.Pointer(h.Mask),
                    Centroids = (float*)FusedBlockSparseAttention.Pointer(h.Centroids),
                    Transposed = tp,
                    Nearest = (long*)FusedBlockSparseAttention.Pointer(nearest),
                };
                new Span<float>(tp, heads * dim * padded).Clear();                 // padding columns must be 0
                for (int hd = 0; hd < heads; hd++)
                    for (int c = 0; c < clusters; c++)
                        for (int d = 0; d < dim; d++)
                            tp[((long)hd * dim + d) * padded + c] = a.Centroids[((long)hd * clusters + c) * dim + d];
                double* partialBase = pp;
                var options = new ParallelOptions { MaxDegreeOfParallelism = a.Threads };
                Parallel.For(0, tasks, options, task =>
                {
                    double* stats = partialBase + (long)task * statsPerTask;
                    new Span<double>(stats, statsPerTask).Clear();
                    var call = new AssignCall(a, task / chunks, task % chunks, stats);
                    SimdWidth.Run(ref call);
                });
                // Reduce the task partials per head in task order (deterministic).
                var sums = zeros(new long[] { heads, clusters, dim }, dtype: ScalarType.Float64);   // (H, C, D)
                var counts = zeros(new long[] { heads, clusters }, dtype: ScalarType.Float64);      // (H, C)
                double* sp = (double*)FusedBlockSparseAttention.Pointer(sums), cp = (double*)FusedBlockSparseAttention.Pointer(counts);
                double squared = 0;
                for (int task = 0; task < tasks; task++)
                {
                    double* stats = pp + (long)task * statsPerTask;
                    int hd = task / chunks;
                    double* s = sp + (long)hd * clusters * dim, n = cp + (long)hd * clusters;
                    for (int i = 0; i < clusters * dim; i++) s[i] += stats[i];
                    for (int c = 0; c < clusters; c++) n[c] += stats[clusters * dim + c];
                    squared += stats[clusters * dim + clusters];
                }
                GC.KeepAlive(x); GC.KeepAlive(h.Mask); GC.KeepAlive(h.Centroids); GC.KeepAlive(nearest);
                GC.KeepAlive(sums); GC.KeepAlive(counts);
                return (tensor(squared, dtype: x.dtype), nearest, sums, counts);
            }
        }
        finally
        {
            ArrayPool<double>.Shared.Return(partial);
            ArrayPool<float>.Shared.Return(transposed);
        }
    }

    /// <summary>Normalises x (D floats) into y; returns the per-token scale used by the backward:
    /// L2 → 1 / max(|x|, ε) (negative when |x| &lt; ε, marking the clamped case); LayerNorm → 1/σ.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float NormalizeRow<TS, TV>(float* x, float* y, int dim, bool layerNorm) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int w = TS.Width, d;
        if (!layerNorm)
        {
            float norm = MathF.Sqrt(Tile<TS, TV>.Dot(x, x, dim));
            bool clamped = !(norm >= L2Eps);
            float denom = clamped ? L2Eps : norm;
            var dv = TS.Broadcast(denom);
            for (d = 0; d + w <= dim; d += w) TS.Store(y + d, TS.Div(TS.Load(x + d), dv));
            for (; d < dim; d++) y[d] = x[d] / denom;
            return clamped ? -1f / L2Eps : 1f / denom;
        }
        float mean = Tile<TS, TV>.Sum(x, dim) / dim;
        var mv = TS.Broadcast(mean);
        var acc = TS.Zero;
        for (d = 0; d + w <= dim; d += w) { var c = TS.Sub(TS.Load(x + d), mv); acc = TS.MulAdd(c, c, acc); }
        float variance = TS.ReduceSum(acc);
        for (; d < dim; d++) { float c = x[d] - mean; variance += c * c; }
        variance /= dim;
        float rstd = 1f / MathF.Sqrt(variance + LayerNormEps);
        var rv = TS.Broadcast(rstd);
        for (d = 0; d + w <= dim; d += w) TS.Store(y + d, TS.Mul(TS.Sub(TS.Load(x + d), mv), rv));
        for (; d < dim; d++) y[d] = (x[d] - mean) * rstd;
        return rstd;
    }

    /// <summary>First index of the largest of s[0..n) (like argmax on exact ties); 0 when every value is NaN.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int ArgMax<TS, TV>(float* s, int n) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int w = TS.Width, c = 0;
        float best = s[0];
        if (n >= w)
        {
            var mv = TS.Load(s);
            for (c = w; c + w <= n; c += w) mv = TS.Max(mv, TS.Load(s + c));
            best = TS.ReduceMax(mv);
        }
        for (; c < n; c++) if (s[c] > best) best = s[c];
        for (c = 0; c < n; c++) if (s[c] == best) return c;
        return 0;
    }

    private readonly struct AssignCall(Args a, int head, int chunk, double* stats) : ISimdKernel
    {
        public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged => AssignTask<TS, TV>(a, head, chunk, stats);
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AssignTask<TS, TV>(Args a, int head, int chunk, double* stats)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int dim = a.Dim, clusters = a.Clusters, cp = a.PaddedClusters;
        int t0 = chunk * TaskTokens, t1 = Math.Min(a.SeqLen, t0 + TaskTokens);
        // Heap (pooled), not stack: 4·C floats overflow a thread-pool stack for large cluster counts.
        var buffer = ArrayPool<float>.Shared.Rent(TokenTile * (dim + cp));
        int* token = stackalloc int[TokenTile];
        fixed (float* xhat = buffer)
        {
            float* sims = xhat + TokenTile * dim;
            float* ct = a.Transposed + (long)head * dim * cp;
            float* mu = a.Centroids + (long)head * clusters * dim;
            double* sums = stats, counts = stats + clusters * dim;
            double squared = 0;
            for (int b = 0; b < a.Batch; b++)
            {
                long row = (long)b * a.Heads + head;
                float* x = a.X + row * a.SeqLen * dim;
                long* nearest = a.Nearest + row * a.SeqLen;
                byte* mask = a.Mask is null ? null : a.Mask + (long)b * a.SeqLen;
                int t = t0;
                while (t < t1)
                {
                    // Gather up to TokenTile real tokens; padding gets −1 and no work.
                    int n = 0;
                    for (; t < t1 && n < TokenTile; t++)
                    {
                        if (mask is not null && mask[t] == 0) { nearest[t] = -1; continue; }
                        NormalizeRow<TS, TV>(x + (long)t * dim, xhat + n * dim, dim, a.LayerNorm);
                        token[n++] = t;
                    }
                    if (n == 0) continue;
                    for (int i = n; i < TokenTile; i++) new Span<float>(xhat + i * dim, dim).Clear();
                    TokenProjection.Project4<TS, TV>(xhat, dim, ct, cp, sims);                // similarities to every centroid
                    for (int i = 0; i < n; i++)
                    {
                        int best = ArgMax<TS, TV>(sims + i * cp, clusters);
                        nearest[token[i]] = best;
                        float* y = xhat + i * dim;
                        float* m = mu + (long)best * dim;
                        double* sum = sums + (long)best * dim;
                        AddWidened(sum, y, dim);                                                 // per element: any order is exact
                        var distance = TS.Zero;
                        int dd = 0;
                        for (; dd + TS.Width <= dim; dd += TS.Width)
                        {
                            var e = TS.Sub(TS.Load(y + dd), TS.Load(m + dd));
                            distance = TS.MulAdd(e, e, distance);
                        }
                        double tail = TS.ReduceSum(distance);
                        for (; dd < dim; dd++)
                        {
                            double e = (double)y[dd] - m[dd];
                            tail += e * e;
                        }
                        counts[best] += 1;
                        squared += tail;
                    }
                }
            }
            stats[clusters * dim + clusters] = squared;
        }
        ArrayPool<float>.Shared.Return(buffer);
    }

    /// <summary>sum[d] += (double)y[d] for d &lt; n, 8 elements per step where the vectors are hardware-accelerated
    /// (each element gets the same double addition as the scalar loop).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddWidened(double* sum, float* y, int n)
    {
        int d = 0;
        if (Vector256.IsHardwareAccelerated)
            for (; d + 8 <= n; d += 8)
            {
                var (lower, upper) = Vector256.Widen(Vector256.Load(y + d));
                Vector256.Store(Vector256.Load(sum + d) + lower, sum + d);
                Vector256.Store(Vector256.Load(sum + d + 4) + upper, sum + d + 4);
            }
        for (; d < n; d++) sum[d] += y[d];
    }

    /// <summary>∂(scale · Squared)/∂x, (B, H, T, D) float32.</summary>
    private static Tensor Backward(Tensor x, Tensor nearest, Holder h, float scale)
    {
        int batch = (int)x.shape[0], heads = (int)x.shape[1], seqLen = (int)x.shape[2], dim = (int)x.shape[3];
        int clusters = (int)h.Centroids.shape[1];
        var dx = empty_like(x);                                                  // (B, H, T, D)
        var a = new Args
        {
            Batch = batch, Heads = heads, SeqLen = seqLen, Dim = dim, Clusters = clusters, Threads = h.Threads,
            LayerNorm = h.Norm == KMeansNorm.LayerNorm,
            X = (float*)FusedBlockSparseAttention.Pointer(x),
            Mask = h.Mask is null ? null : (byte*)FusedBlockSparseAttention.Pointer(h.Mask),
            Centroids = (float*)FusedBlockSparseAttention.Pointer(h.Centroids),
            Nearest = (long*)FusedBlockSparseAttention.Pointer(nearest),
        };
        float* grad = (float*)FusedBlockSparseAttention.Pointer(dx);
        int chunks = (seqLen + TaskTokens - 1) / TaskTokens;
        Parallel.For(0, batch * heads * chunks, new ParallelOptions { MaxDegreeOfParallelism = a.Threads }, task =>
        {
            var call = new BackwardCall(a, task, chunks, grad, scale);
            SimdWidth.Run(ref call);
        });
        GC.KeepAlive(x); GC.KeepAlive(nearest); GC.KeepAlive(h.Mask); GC.KeepAlive(h.Centroids); GC.KeepAlive(dx);
        return dx;
    }

    private readonly struct BackwardCall(Args a, int task, int chunks, float* grad, float scale) : ISimdKernel
    {
        public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged => BackwardTask<TS, TV>(a, task, chunks, grad, scale);
    }

    /// <summary>dx of one task's tokens (one (batch, head) row, one chunk along T).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void BackwardTask<TS, TV>(Args a, int task, int chunks, float* grad, float scale) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int heads = a.Heads, seqLen = a.SeqLen, dim = a.Dim, clusters = a.Clusters, w = TS.Width;
        int row = task / chunks, chunk = task % chunks, b = row / heads, head = row % heads;
        int t0 = chunk * TaskTokens, t1 = Math.Min(seqLen, t0 + TaskTokens);
        float* y = stackalloc float[dim];
        float* u = stackalloc float[dim];
        for (int t = t0; t < t1; t++)
        {
            long at = ((long)row * seqLen + t) * dim;
            float* g = grad + at;
            long c = a.Nearest[(long)row * seqLen + t];
            if (c < 0 || (a.Mask is not null && a.Mask[(long)b * seqLen + t] == 0))
            {
                new Span<float>(g, dim).Clear();
                continue;
            }
            float* xt = a.X + at;
            float r = NormalizeRow<TS, TV>(xt, y, dim, a.LayerNorm);
            float* m = a.Centroids + ((long)head * clusters + c) * dim;
            int d;
            var twoScale = TS.Broadcast(2 * scale);
            for (d = 0; d + w <= dim; d += w) TS.Store(u + d, TS.Mul(TS.Sub(TS.Load(y + d), TS.Load(m + d)), twoScale));
            for (; d < dim; d++) u[d] = 2 * scale * (y[d] - m[d]);                    // ∂/∂x̂
            if (!a.LayerNorm && r < 0)
            {
                for (d = 0; d < dim; d++) g[d] = u[d] * -r;                            // |x| < ε: x̂ = x / ε
                continue;
            }
            // L2: g = (u − x̂ (x̂·u)) r;  LayerNorm: g = (u − mean(u) − x̂ mean(x̂ u)) r.
            float yu = Tile<TS, TV>.Dot(y, u, dim), shift = 0;
            if (a.LayerNorm) { yu /= dim; shift = Tile<TS, TV>.Sum(u, dim) / dim; }
            var (yuv, sv, rv) = (TS.Broadcast(yu), TS.Broadcast(shift), TS.Broadcast(r));
            for (d = 0; d + w <= dim; d += w)
                TS.Store(g + d, TS.Mul(TS.Sub(TS.Sub(TS.Load(u + d), sv), TS.Mul(TS.Load(y + d), yuv)), rv));
            for (; d < dim; d++) g[d] = (u[d] - shift - y[d] * yu) * r;
        }
    }
}
