using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace SparseAttention.Kernels.Fused;

/// <summary>Raw pointers and sizes of one fused call (pointers as nint so lambdas can carry them).</summary>
internal struct KernelArgs
{
    public int Batch, Heads, SeqLen, Dim, DimV, Threads;
    public float Scale;
    public nint Q, K, V;            // (B, H, T, D), (B, H, T, D), (B, H, T, Dv)
    public nint KeyBias;            // (B, T): 0 = real key, −∞ = padding; 0 when there is no key mask
    public nint O, Lse;             // forward outputs: (B, H, T, Dv), (B, H, T) natural log-sum-exp (+∞: row with no key)
    public nint DO;                 // backward: dO (B, H, T, Dv)
    public nint Delta;              // backward, optional: Δ (B, H, T) given by the caller instead of rowsum(dO ∘ O) (O then unused)
    public nint DQ, DK, DV;         // backward outputs
    /// <summary>Backward tasks per (batch, head); 0 = <see cref="BlockSparseKernel.BackwardChunks"/>.</summary>
    public int Chunks;
}

/// <summary>
/// Flash-style block-sparse attention on raw float32 CPU memory.
/// Forward, per query block: Qᵀ packed once (pre-scaled to log₂ units), then per visited key block
/// Sᵀ = K·Qᵀ read straight from K, a column-wise online softmax (no horizontal reductions) and
/// O += P·V from Pᵀ with the transposed-A GEMM; the per-row log-sum-exp is saved for the backward.
/// Backward, one pass, key-major (FlashAttention-2): a task owns a run of key blocks of one (batch,
/// head), packs each block's Kᵀ and Vᵀ once, and per visiting query block computes S, dP, P, dS and
/// dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K — 5 tile GEMMs and one exp per score. dQ rows get
/// contributions in a fixed key-block order; a head split into several tasks writes private dQ
/// partials, summed afterwards in task order. The split depends only on the shapes and the machine's
/// processor count, so results are bit-identical for any thread count.
/// Partial tiles: band tiles (the causal diagonal) are masked inline, other partial tiles by a bias
/// tile; a fully masked quadrant (queries before h, keys from h) is never computed.
/// </summary>
internal static unsafe class BlockSparseKernel
{
    private const MethodImplOptions Hot = MethodImplOptions.AggressiveOptimization;

    public static void Forward(FusedLayout layout, in KernelArgs args)
    {
        var call = new Call(layout, args, backward: false);
        SimdWidth.Run(ref call);
    }

    public static void Backward(FusedLayout layout, in KernelArgs args)
    {
        var call = new Call(layout, args, backward: true);
        SimdWidth.Run(ref call);
    }

    private readonly struct Call(FusedLayout layout, KernelArgs args, bool backward) : ISimdKernel
    {
        public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged
        {
            if (backward) Backward<TS, TV>(layout, args);
            else Forward<TS, TV>(layout, args);
        }
    }

    /// <summary>
    /// Backward tasks per (batch, head): enough that batch × heads × chunks covers the processors. It
    /// depends on the machine, never on the thread count asked for, so results do not depend on that.
    /// </summary>
    public static int BackwardChunks(int batchHeads, int numBlocks) =>
        Math.Clamp((Environment.ProcessorCount + batchHeads - 1) / batchHeads, 1, numBlocks);

    /// <summary>Row stride of the tiles: the block size rounded up to whole 512-bit vectors.</summary>
    private static int Stride(int blockSize) => (blockSize + 15) / 16 * 16;

    /// <summary>Per-thread scratch: one aligned allocation carved into tiles, freed when the thread's share is done.</summary>
    private sealed class Scratch : IDisposable
    {
        private readonly byte* memory;
        private long used;
        private readonly long size;

        public Scratch(long floats) { size = floats + 64; memory = (byte*)NativeMemory.AlignedAlloc((nuint)(size * sizeof(float)), 64); }

        /// <summary>The next <paramref name="count"/> floats, 64-byte aligned.</summary>
        public float* Take(long count)
        {
            float* p = (float*)memory + used;
            used += (count + 15) / 16 * 16;
            if (used > size) throw new InvalidOperationException("kernel scratch overflow");
            return p;
        }

        public static long Size(params long[] counts) => counts.Sum(c => (c + 15) / 16 * 16);

        public void Dispose() => NativeMemory.AlignedFree(memory);
    }

    private static void ParallelOver<TScratch>(int count, int threads, Func<TScratch> scratch, Action<int, TScratch> body)
        where TScratch : IDisposable =>
        Parallel.For(0, count, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, threads) },
            scratch, (task, _, s) => { body(task, s); return s; }, s => s.Dispose());

    /// <summary>The chosen rows of src (row r = idx[r]) copied contiguously.</summary>
    [MethodImpl(Hot)]
    private static float* Rows(float* src, int* idx, int count, int dim, float* scratch)
    {
        for (int i = 0; i < count; i++)
            new Span<float>(src + (long)idx[i] * dim, dim).CopyTo(new Span<float>(scratch + (long)i * dim, dim));
        return scratch;
    }

    [MethodImpl(Hot)]
    private static void FillNegativeInfinity(float* p, int count)
    {
        if (count > 0) new Span<float>(p, count).Fill(float.NegativeInfinity);
    }

    private sealed class ForwardScratch(long floats) : IDisposable
    {
        public readonly Scratch Memory = new(floats);
        public float* QT, S, M, L, Alpha, KRows, VRows;
        public void Dispose() => Memory.Dispose();
    }

    [MethodImpl(Hot)]
    private static void Forward<TS, TV>(FusedLayout L, KernelArgs a) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int nb = L.NumBlocks, bs = L.BlockSize, ld = Stride(bs), D = a.Dim;
        bool compacts = L.HasCompacted;
        long compactRows = compacts ? bs : 0;
        long floats = Scratch.Size((long)D * ld, (long)bs * ld, ld, ld, ld, compactRows * D, compactRows * a.DimV);
        ParallelOver(a.Batch * a.Heads * nb, a.Threads, () =>
        {
            var x = new ForwardScratch(floats);
            var s = x.Memory;
            x.QT = s.Take((long)D * ld); x.S = s.Take((long)bs * ld);
            x.M = s.Take(ld); x.L = s.Take(ld); x.Alpha = s.Take(ld);
            x.KRows = s.Take(compactRows * D); x.VRows = s.Take(compactRows * a.DimV);
            return x;
        }, [MethodImpl(Hot)] (task, x) => ForwardBlock<TS, TV>(L, a, task, x));
    }

    /// <summary>One query block of one (batch, head): the output rows and their log-sum-exp.</summary>
    [MethodImpl(Hot)]
    private static void ForwardBlock<TS, TV>(FusedLayout L, in KernelArgs a, int task, ForwardScratch x)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int nb = L.NumBlocks, bs = L.BlockSize, ld = Stride(bs), tile = bs * bs;
        int qb = task % nb, bh = task / nb, h = bh % a.Heads, b = bh / a.Heads;
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV;
        int q0 = qb * bs, rows = Math.Min(bs, T - q0);
        float* q = (float*)a.Q + ((long)bh * T + q0) * D;
        float* k = (float*)a.K + (long)bh * T * D;                                    // (T, D)
        float* v = (float*)a.V + (long)bh * T * Dv;                                   // (T, Dv)
        float* o = (float*)a.O + ((long)bh * T + q0) * Dv;                            // (rows, Dv), accumulated in place
        float* keyBias = a.KeyBias == 0 ? null : (float*)a.KeyBias + (long)b * T;
        float* st = x.S, m = x.M, l = x.L, alpha = x.Alpha;

        Tile<TS, TV>.Transpose(q, rows, D, D, x.QT, ld, a.Scale * FastExp.Log2E);   // Qᵀ (D, rows), scores in log₂ units
        new Span<float>(m, rows).Fill(-float.MaxValue);
        new Span<float>(l, rows).Clear();
        for (int i = 0; i < rows; i++) new Span<float>(o + (long)i * Dv, Dv).Clear();

        fixed (float* tileBiasT = L.TileBiasT, compactBiasT = L.CompactBiasT)
        fixed (int* active = L.ActiveColumns)
        {
            int row = h * nb + qb;
            for (int e = L.RowStart[row]; e < L.RowStart[row + 1]; e++)
            {
                int k0 = L.KeyBlock[e] * bs, n = Math.Min(bs, T - k0), t = L.TileIndex[e];
                float* kRows = k + (long)k0 * D, vRows = v + (long)k0 * Dv, biasT = null;
                int* idx = null;
                int split = 0;
                if (t >= 0 && L.ActiveStart[t] >= 0)
                {
                    // Compacted: only the active key columns, gathered; the bias tile is re-ordered to match.
                    idx = active + L.ActiveStart[t];
                    n = L.ActiveCount[t];
                    kRows = Rows(kRows, idx, n, D, x.KRows);
                    vRows = Rows(vRows, idx, n, Dv, x.VRows);
                    biasT = compactBiasT + (long)L.CompactTile[t] * tile;
                }
                else if (t >= 0)
                {
                    split = L.Split[t];
                    if (!L.IsBand[t]) biasT = tileBiasT + (long)t * tile;
                }
                // Keys before hk meet every query; keys from hk only queries from hq (the quadrant in between is masked).
                int hk = Math.Min(split, n), hq = Math.Min(split, rows);
                Tile<TS, TV>.Gemm(hk, rows, D, kRows, D, x.QT, ld, st, ld, accumulate: false);                     // Sᵀ = K·Qᵀ
                Tile<TS, TV>.Gemm(n - hk, rows - hq, D, kRows + (long)hk * D, D, x.QT + hq, ld, st + (long)hk * ld + hq, ld, accumulate: false);

                for (int j = 0; j < n; j++)
                {
                    int from = j < hk ? 0 : hq;
                    float* sj = st + (long)j * ld;
                    if (keyBias != null && float.IsNegativeInfinity(keyBias[k0 + (idx == null ? j : idx[j])]))
                        FillNegativeInfinity(sj + from, rows - from);
                    else if (biasT != null)
                        Tile<TS, TV>.AddTo(sj + from, biasT + (long)j * bs + from, rows - from);
                    else if (t >= 0)
                    {
                        // Band: key j may be seen by queries j − hi … j − lo.
                        int first = Math.Clamp(j - L.BandHi[t], from, rows), last = Math.Clamp(j - L.BandLo[t] + 1, first, rows);
                        FillNegativeInfinity(sj + from, first - from);
                        FillNegativeInfinity(sj + last, rows - last);
                    }
                }

                Tile<TS, TV>.ColumnSoftmax(st, ld, hk, 0, hq, m, l, alpha);
                Tile<TS, TV>.ColumnSoftmax(st, ld, n, hq, rows, m, l, alpha);
                for (int i = 0; i < rows; i++)
                    if (alpha[i] != 1f) Tile<TS, TV>.Scale(o + (long)i * Dv, Dv, alpha[i]);
                Tile<TS, TV>.GemmTransA(hq, Dv, hk, st, ld, vRows, Dv, o, Dv, accumulate: true);                   // O += P·V
                Tile<TS, TV>.GemmTransA(rows - hq, Dv, n, st + hq, ld, vRows, Dv, o + (long)hq * Dv, Dv, accumulate: true);
            }
        }
        float* lse = (float*)a.Lse + (long)bh * T + q0;
        for (int i = 0; i < rows; i++)
        {
            // A row with no allowed key: zero output, and +∞ log-sum-exp so the backward's 2^(S − lse) is 0.
            bool empty = l[i] == 0f;
            Tile<TS, TV>.Scale(o + (long)i * Dv, Dv, empty ? 0f : 1f / l[i]);
            lse[i] = empty ? float.PositiveInfinity : (m[i] + MathF.Log2(l[i])) * MathF.Log(2f);
        }
    }

    private sealed class BackwardScratch(long floats) : IDisposable
    {
        public readonly Scratch Memory = new(floats);
        public float* KT, VT, S, DP, Lse2, Delta, KRows, VRows, KTc, VTc, Part, KeyBias;
        public void Dispose() => Memory.Dispose();
    }

    /// <summary>Where one backward task accumulates dQ: the head's rows of dQ, or a private partial for query blocks lo … hi.</summary>
    private readonly record struct DqTarget(long Offset, int Lo, int Hi);

    [MethodImpl(Hot)]
    private static void Backward<TS, TV>(FusedLayout L, KernelArgs a) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int nb = L.NumBlocks, bs = L.BlockSize, ld = Stride(bs), D = a.Dim, Dv = a.DimV, T = a.SeqLen;
        int batchHeads = a.Batch * a.Heads;
        int chunks = a.Chunks > 0 ? Math.Min(a.Chunks, nb) : BackwardChunks(batchHeads, nb);

        // Key-block runs of each head, balanced by visits, and the query blocks each run reaches.
        var starts = new int[a.Heads, chunks + 1];
        var reach = new (int Lo, int Hi)[a.Heads, chunks];
        for (int h = 0; h < a.Heads; h++)
        {
            int col0 = h * nb;
            long total = L.ColStart[col0 + nb] - L.ColStart[col0];
            for (int c = 1; c <= chunks; c++)
            {
                int kb = starts[h, c - 1];
                while (kb < nb && (c == chunks || (L.ColStart[col0 + kb] - L.ColStart[col0]) * chunks < total * c)) kb++;
                starts[h, c] = kb;
                int lo = nb, hi = -1;
                for (int i = L.ColStart[col0 + starts[h, c - 1]]; i < L.ColStart[col0 + kb]; i++)
                    (lo, hi) = (Math.Min(lo, L.ColQueryBlock[i]), Math.Max(hi, L.ColQueryBlock[i]));
                reach[h, c - 1] = (lo, hi);
            }
        }
        // Chunk 0 writes the head's dQ rows; later chunks private zeroed partials (calloc: untouched pages cost nothing).
        var targets = new DqTarget[batchHeads, chunks];
        long partialFloats = 0;
        for (int bh = 0; bh < batchHeads; bh++)
            for (int c = 1; c < chunks; c++)
            {
                var (lo, hi) = reach[bh % a.Heads, c];
                targets[bh, c] = new DqTarget(partialFloats, lo, hi);
                if (hi >= lo) partialFloats += (long)(Math.Min(T, (hi + 1) * bs) - lo * bs) * D;
            }
        float* partials = partialFloats == 0 ? null : (float*)NativeMemory.AllocZeroed((nuint)(partialFloats * sizeof(float)));
        try
        {
            bool compacts = L.HasCompacted;
            long cr = compacts ? bs : 0, width = Math.Max(D, Dv);
            long floats = Scratch.Size((long)D * ld, (long)Dv * ld, (long)bs * ld, (long)bs * ld, ld, ld,
                cr * D, cr * Dv, cr * D * ld / bs, cr * Dv * ld / bs, cr * width, cr);
            nint partialBase = (nint)partials;
            ParallelOver(batchHeads * chunks, a.Threads, () =>
            {
                var x = new BackwardScratch(floats);
                var s = x.Memory;
                x.KT = s.Take((long)D * ld); x.VT = s.Take((long)Dv * ld);
                x.S = s.Take((long)bs * ld); x.DP = s.Take((long)bs * ld);
                x.Lse2 = s.Take(ld); x.Delta = s.Take(ld);
                x.KRows = s.Take(cr * D); x.VRows = s.Take(cr * Dv);
                x.KTc = s.Take(cr * D * ld / bs); x.VTc = s.Take(cr * Dv * ld / bs);
                x.Part = s.Take(cr * width); x.KeyBias = s.Take(cr);
                return x;
            }, [MethodImpl(Hot)] (task, x) =>
            {
                int bh = task / chunks, c = task % chunks;
                float* dq = (float*)a.DQ + (long)bh * T * D;                                       // (T, D)
                if (c == 0) for (int r = 0; r < T; r++) new Span<float>(dq + (long)r * D, D).Clear();
                else dq = (float*)partialBase + targets[bh, c].Offset - (long)targets[bh, c].Lo * bs * D;   // indexed by absolute row
                int h = bh % a.Heads;
                for (int kb = starts[h, c]; kb < starts[h, c + 1]; kb++) BackwardKeyBlock<TS, TV>(L, a, bh, kb, dq, x);
            });

            if (chunks > 1)
                ParallelOver(batchHeads * nb, a.Threads, () => new Scratch(0), [MethodImpl(Hot)] (task, _) =>
                {
                    int bh = task / nb, qb = task % nb, q0 = qb * bs, rows = Math.Min(bs, T - q0);
                    float* dq = (float*)a.DQ + ((long)bh * T + q0) * D;
                    for (int c = 1; c < chunks; c++)                                                 // fixed order: deterministic
                    {
                        var target = targets[bh, c];
                        if (qb < target.Lo || qb > target.Hi) continue;
                        Tile<TS, TV>.AddTo(dq, (float*)partialBase + target.Offset + (long)(q0 - target.Lo * bs) * D, rows * D);
                    }
                });
        }
        finally
        {
            NativeMemory.Free(partials);
        }
    }

    /// <summary>
    /// One key block of one (batch, head): dK and dV rows written in place; dQ contributions added to
    /// <paramref name="dq"/> (indexed by absolute query row) in the order of the visiting query blocks.
    /// </summary>
    [MethodImpl(Hot)]
    private static void BackwardKeyBlock<TS, TV>(FusedLayout L, in KernelArgs a, int bh, int kb, float* dq, BackwardScratch x)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int nb = L.NumBlocks, bs = L.BlockSize, ld = Stride(bs), tile = bs * bs;
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, h = bh % a.Heads, b = bh / a.Heads;
        int k0 = kb * bs, cols = Math.Min(bs, T - k0);
        float scale = a.Scale, toLog2 = a.Scale * FastExp.Log2E;
        float* kBlk = (float*)a.K + ((long)bh * T + k0) * D;                             // (cols, D)
        float* vBlk = (float*)a.V + ((long)bh * T + k0) * Dv;                            // (cols, Dv)
        float* dk = (float*)a.DK + ((long)bh * T + k0) * D;                              // owned: accumulated in place
        float* dv = (float*)a.DV + ((long)bh * T + k0) * Dv;
        float* keyBias = a.KeyBias == 0 ? null : (float*)a.KeyBias + (long)b * T + k0;
        for (int j = 0; j < cols; j++)
        {
            new Span<float>(dk + (long)j * D, D).Clear();
            new Span<float>(dv + (long)j * Dv, Dv).Clear();
        }
        int col = h * nb + kb;
        if (L.ColStart[col] == L.ColStart[col + 1]) return;                               // no query visits: zero gradients

        Tile<TS, TV>.Transpose(kBlk, cols, D, D, x.KT, ld, toLog2);                       // Kᵀ (D, cols), scores in log₂ units
        Tile<TS, TV>.Transpose(vBlk, cols, Dv, Dv, x.VT, ld, 1f);                         // Vᵀ (Dv, cols)
        float* s = x.S, dp = x.DP;
        fixed (float* tileBias = L.TileBias, compactBias = L.CompactBias)
        fixed (int* active = L.ActiveColumns)
        {
            for (int c = L.ColStart[col]; c < L.ColStart[col + 1]; c++)
            {
                int e = L.ColEntry[c], t = L.TileIndex[e], q0 = L.ColQueryBlock[c] * bs, rows = Math.Min(bs, T - q0);
                float* q = (float*)a.Q + ((long)bh * T + q0) * D;                          // (rows, D)
                float* dO = (float*)a.DO + ((long)bh * T + q0) * Dv;                       // (rows, Dv)
                float* o = (float*)a.O + ((long)bh * T + q0) * Dv;
                float* lse = (float*)a.Lse + (long)bh * T + q0;
                float* delta = a.Delta == 0 ? null : (float*)a.Delta + (long)bh * T + q0;
                for (int i = 0; i < rows; i++)
                {
                    x.Lse2[i] = lse[i] * FastExp.Log2E;
                    x.Delta[i] = delta != null ? delta[i] : Tile<TS, TV>.Dot(dO + (long)i * Dv, o + (long)i * Dv, Dv);  // Δ = rowsum(dO ∘ O)
                }
                if (t >= 0 && L.ActiveStart[t] >= 0)
                {
                    CompactedEntry<TS, TV>(L, a, t, q, dO, rows, kBlk, vBlk, keyBias, dq + (long)q0 * D, dk, dv, x, active, compactBias);
                    continue;
                }
                float* bias = t >= 0 && !L.IsBand[t] ? tileBias + (long)t * tile : null;
                int split = t >= 0 ? L.Split[t] : 0;
                // Queries before hq meet keys before hk only; queries from hq meet every key.
                int hk = Math.Min(split, cols), hq = Math.Min(split, rows);
                Tile<TS, TV>.Gemm(hq, hk, D, q, D, x.KT, ld, s, ld, accumulate: false);                            // S = Q·Kᵀ
                Tile<TS, TV>.Gemm(rows - hq, cols, D, q + (long)hq * D, D, x.KT, ld, s + (long)hq * ld, ld, accumulate: false);
                Tile<TS, TV>.Gemm(hq, hk, Dv, dO, Dv, x.VT, ld, dp, ld, accumulate: false);                        // dP = dO·Vᵀ
                Tile<TS, TV>.Gemm(rows - hq, cols, Dv, dO + (long)hq * Dv, Dv, x.VT, ld, dp + (long)hq * ld, ld, accumulate: false);
                for (int i = 0; i < rows; i++)
                {
                    int n = i < hq ? hk : cols;
                    float* si = s + (long)i * ld;
                    if (bias != null) Tile<TS, TV>.AddTo(si, bias + (long)i * bs, n);
                    else if (t >= 0)
                    {
                        // Band: query i may see keys i + lo … i + hi.
                        int first = Math.Clamp(i + L.BandLo[t], 0, n), last = Math.Clamp(i + L.BandHi[t] + 1, first, n);
                        FillNegativeInfinity(si, first);
                        FillNegativeInfinity(si + last, n - last);
                    }
                    if (keyBias != null) Tile<TS, TV>.AddTo(si, keyBias, n);
                    Tile<TS, TV>.ExpGrad(si, dp + (long)i * ld, n, x.Lse2[i], x.Delta[i], scale);                   // P in s, dS·scale in dp
                }
                // dV += Pᵀ·dO and dK += dSᵀ·Q: keys before hk take every query, keys from hk the queries from hq.
                Tile<TS, TV>.GemmTransA(hk, Dv, rows, s, ld, dO, Dv, dv, Dv, accumulate: true);
                Tile<TS, TV>.GemmTransA(cols - hk, Dv, rows - hq, s + (long)hq * ld + hk, ld, dO + (long)hq * Dv, Dv, dv + (long)hk * Dv, Dv, accumulate: true);
                Tile<TS, TV>.GemmTransA(hk, D, rows, dp, ld, q, D, dk, D, accumulate: true);
                Tile<TS, TV>.GemmTransA(cols - hk, D, rows - hq, dp + (long)hq * ld + hk, ld, q + (long)hq * D, D, dk + (long)hk * D, D, accumulate: true);
                // dQ += dS·K
                float* dqi = dq + (long)q0 * D;
                Tile<TS, TV>.Gemm(hq, D, hk, dp, ld, kBlk, D, dqi, D, accumulate: true);
                Tile<TS, TV>.Gemm(rows - hq, D, cols, dp + (long)hq * ld, ld, kBlk, D, dqi + (long)hq * D, D, accumulate: true);
            }
        }
    }

    /// <summary>A compacted entry in the backward: only its active key columns, gathered, with the
    /// re-ordered bias tile; their dK/dV shares are added to the right rows afterwards.</summary>
    [MethodImpl(Hot)]
    private static void CompactedEntry<TS, TV>(FusedLayout L, in KernelArgs a, int t, float* q, float* dO, int rows, float* kBlk,
        float* vBlk, float* keyBias, float* dqi, float* dk, float* dv, BackwardScratch x, int* active, float* compactBias)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int bs = L.BlockSize, ld = Stride(bs), D = a.Dim, Dv = a.DimV;
        int* idx = active + L.ActiveStart[t];
        int n = L.ActiveCount[t];
        float* bias = compactBias + (long)L.CompactTile[t] * bs * bs;
        float* kRows = Rows(kBlk, idx, n, D, x.KRows);                                                  // (n, D)
        float* vRows = Rows(vBlk, idx, n, Dv, x.VRows);                                                 // (n, Dv)
        Tile<TS, TV>.Transpose(kRows, n, D, D, x.KTc, ld, a.Scale * FastExp.Log2E);
        Tile<TS, TV>.Transpose(vRows, n, Dv, Dv, x.VTc, ld, 1f);
        float* s = x.S, dp = x.DP;
        Tile<TS, TV>.Gemm(rows, n, D, q, D, x.KTc, ld, s, ld, accumulate: false);
        Tile<TS, TV>.Gemm(rows, n, Dv, dO, Dv, x.VTc, ld, dp, ld, accumulate: false);
        if (keyBias != null)
            for (int j = 0; j < n; j++) x.KeyBias[j] = keyBias[idx[j]];
        for (int i = 0; i < rows; i++)
        {
            float* si = s + (long)i * ld;
            Tile<TS, TV>.AddTo(si, bias + (long)i * bs, n);
            if (keyBias != null) Tile<TS, TV>.AddTo(si, x.KeyBias, n);
            Tile<TS, TV>.ExpGrad(si, dp + (long)i * ld, n, x.Lse2[i], x.Delta[i], a.Scale);
        }
        Tile<TS, TV>.GemmTransA(n, Dv, rows, s, ld, dO, Dv, x.Part, Dv, accumulate: false);             // this entry's dV rows
        for (int j = 0; j < n; j++) Tile<TS, TV>.AddTo(dv + (long)idx[j] * Dv, x.Part + (long)j * Dv, Dv);
        Tile<TS, TV>.GemmTransA(n, D, rows, dp, ld, q, D, x.Part, D, accumulate: false);                // this entry's dK rows
        for (int j = 0; j < n; j++) Tile<TS, TV>.AddTo(dk + (long)idx[j] * D, x.Part + (long)j * D, D);
        Tile<TS, TV>.Gemm(rows, D, n, dp, ld, kRows, D, dqi, D, accumulate: true);
    }
}
