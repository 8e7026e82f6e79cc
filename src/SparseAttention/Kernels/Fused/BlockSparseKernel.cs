using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace SparseAttention.Kernels.Fused;

/// <summary>Raw pointers and sizes of one fused call (pointers as nint so lambdas can carry them).</summary>
internal struct KernelArgs
{
    public int Batch, Heads, SeqLen, Dim, DimV, Threads;
    public float Scale;
    public nint Q, K, V;            // (B, H, T, D), (B, H, T, D), (B, H, T, Dv)
    public nint KeyBias;            // (B, T): 0 = real key, −∞ = padding; 0 when there is no key mask
    public nint O, Lse;             // forward outputs: (B, H, T, Dv), (B, H, T)
    public nint DO, Delta;          // backward: dO (B, H, T, Dv); Δ = rowsum(dO ∘ O) (B, H, T), written by pass 1
    public nint DQ, DK, DV;         // backward outputs
}

/// <summary>
/// Flash-style block-sparse attention on raw float32 CPU memory: per query block an online softmax
/// over the visited key blocks (no T×T scores), the per-row log-sum-exp saved for the backward;
/// the backward recomputes probabilities in two passes, query-major for dQ and key-major for dK/dV,
/// so no two threads ever write the same row and results do not depend on the thread count.
/// </summary>
internal static unsafe class BlockSparseKernel
{
    public static void Forward(FusedLayout layout, in KernelArgs args)
    {
        if (Vector512.IsHardwareAccelerated) Forward<Simd512, Vector512<float>>(layout, args);
        else if (Vector256.IsHardwareAccelerated) Forward<Simd256, Vector256<float>>(layout, args);
        else Forward<SimdScalar, float>(layout, args);
    }

    public static void Backward(FusedLayout layout, in KernelArgs args)
    {
        if (Vector512.IsHardwareAccelerated) Backward<Simd512, Vector512<float>>(layout, args);
        else if (Vector256.IsHardwareAccelerated) Backward<Simd256, Vector256<float>>(layout, args);
        else Backward<SimdScalar, float>(layout, args);
    }

    /// <summary>Per-thread scratch: a few block-sized tiles, freed when the thread's share is done.</summary>
    private sealed class Scratch : IDisposable
    {
        public readonly float* S, P, Acc, Acc2, T1, T2, T3, T4, KeyBias, RowMax, RowSum;
        private readonly void* memory;

        public Scratch(int block, int width)
        {
            long tile = (long)block * block, acc = (long)block * width;
            memory = NativeMemory.AlignedAlloc((nuint)((2 * tile + 6 * acc + 3 * block) * sizeof(float)), 64);
            S = (float*)memory; P = S + tile; Acc = P + tile; Acc2 = Acc + acc;
            T1 = Acc2 + acc; T2 = T1 + acc; T3 = T2 + acc; T4 = T3 + acc;
            KeyBias = T4 + acc; RowMax = KeyBias + block; RowSum = RowMax + block;
        }

        public void Dispose() => NativeMemory.AlignedFree(memory);
    }

    /// <summary>dst (dim × ldDst) = the chosen rows of src (row r = idx[r], or r when idx is null), transposed.
    /// The tile is then read with a short row stride, which keeps it in cache (a stride of T would not).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void GatherTransposed(float* src, int* idx, int count, int dim, float* dst, int ldDst)
    {
        for (int i = 0; i < count; i++)
        {
            float* row = src + (long)(idx == null ? i : idx[i]) * dim;
            for (int d = 0; d < dim; d++) dst[d * ldDst + i] = row[d];
        }
    }

    /// <summary>The chosen rows of src (row r = idx[r]) copied contiguously, or src itself when idx is null.</summary>
    private static float* Rows(float* src, int* idx, int count, int dim, float* scratch)
    {
        if (idx == null) return src;
        for (int i = 0; i < count; i++)
            new Span<float>(src + (long)idx[i] * dim, dim).CopyTo(new Span<float>(scratch + (long)i * dim, dim));
        return scratch;
    }

    /// <summary>The entry's key columns: all <paramref name="cols"/> of the block, or (compacted
    /// entries) only the active ones, with the bias tile re-ordered to match; returns their count.</summary>
    private static int KeyColumns(FusedLayout L, int e, int cols, int* active, float* tileBias, float* compactBias,
        out int* index, out float* bias)
    {
        long tile = (long)L.BlockSize * L.BlockSize;
        int t = L.TileIndex[e];
        if (t >= 0 && L.ActiveStart[t] >= 0)
        {
            index = active + L.ActiveStart[t];
            bias = compactBias + L.CompactTile[t] * tile;
            return L.ActiveCount[t];
        }
        index = null;
        bias = t < 0 ? null : tileBias + t * tile;
        return cols;
    }

    /// <summary>Key biases (0 / −∞ from the key mask) of the entry's columns, or null without a key mask.</summary>
    private static float* KeyBiasOf(float* keyBias, int k0, int* idx, int count, float* scratch)
    {
        if (keyBias == null) return null;
        if (idx == null) return keyBias + k0;
        for (int j = 0; j < count; j++) scratch[j] = keyBias[k0 + idx[j]];
        return scratch;
    }

    private static void ParallelOver(int count, int threads, int block, int width, Action<int, Scratch> body)
    {
        Parallel.For(0, count, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, threads) },
            () => new Scratch(block, width),
            (task, _, scratch) => { body(task, scratch); return scratch; },
            scratch => scratch.Dispose());
    }

    private static void Forward<TS, TV>(FusedLayout L, KernelArgs a) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int nb = L.NumBlocks, bs = L.BlockSize;
        ParallelOver(a.Batch * a.Heads * nb, a.Threads, bs, Math.Max(a.Dim, a.DimV), [MethodImpl(MethodImplOptions.AggressiveOptimization)] (task, scratch) =>
        {
            int qb = task % nb, bh = task / nb, h = bh % a.Heads, b = bh / a.Heads;
            int T = a.SeqLen, D = a.Dim, Dv = a.DimV;
            int q0 = qb * bs, rows = Math.Min(bs, T - q0);
            float* q = (float*)a.Q + ((long)bh * T + q0) * D;
            float* k = (float*)a.K + (long)bh * T * D;                            // (T, D)
            float* v = (float*)a.V + (long)bh * T * Dv;                           // (T, Dv)
            float* keyBias = a.KeyBias == 0 ? null : (float*)a.KeyBias + (long)b * T;
            float* s = scratch.S, acc = scratch.Acc, kt = scratch.T1, m = scratch.RowMax, l = scratch.RowSum;
            new Span<float>(acc, rows * Dv).Clear();
            new Span<float>(m, rows).Fill(float.NegativeInfinity);
            new Span<float>(l, rows).Clear();

            fixed (float* tileBias = L.TileBias, compactBias = L.CompactBias)
            fixed (int* active = L.ActiveColumns)
            {
                int row = h * nb + qb;
                for (int e = L.RowStart[row]; e < L.RowStart[row + 1]; e++)
                {
                    int k0 = L.KeyBlock[e] * bs;
                    int n = KeyColumns(L, e, Math.Min(bs, T - k0), active, tileBias, compactBias, out int* idx, out float* bias);
                    float* kb = KeyBiasOf(keyBias, k0, idx, n, scratch.KeyBias);
                    GatherTransposed(k + (long)k0 * D, idx, n, D, kt, bs);                                  // (D, n)
                    float* vRows = Rows(v + (long)k0 * Dv, idx, n, Dv, scratch.T2);                        // (n, Dv)
                    Tile<TS, TV>.Gemm(rows, n, D, q, D, kt, bs, s, bs, accumulate: false);                  // S = Q·Kᵀ (rows × n)
                    for (int i = 0; i < rows; i++)
                    {
                        float* si = s + i * bs;
                        Tile<TS, TV>.ScaleAddBias(si, n, a.Scale, bias == null ? null : bias + i * bs, 0f);
                        if (kb != null) Tile<TS, TV>.ScaleAddBias(si, n, 1f, kb, 0f);
                        float mNew = MathF.Max(m[i], Tile<TS, TV>.Max(si, n));
                        if (float.IsNegativeInfinity(mNew)) { new Span<float>(si, n).Clear(); continue; }  // nothing allowed yet
                        float alpha = MathF.Exp(m[i] - mNew);
                        l[i] = l[i] * alpha + Tile<TS, TV>.ExpShiftSum(si, n, mNew);
                        m[i] = mNew;
                        if (alpha != 1f) Tile<TS, TV>.Scale(acc + i * Dv, Dv, alpha);
                    }
                    Tile<TS, TV>.Gemm(rows, Dv, n, s, bs, vRows, Dv, acc, Dv, accumulate: true);            // acc += P·V
                }
            }
            float* o = (float*)a.O + ((long)bh * T + q0) * Dv;
            float* lse = (float*)a.Lse + (long)bh * T + q0;
            for (int i = 0; i < rows; i++)
            {
                // A row with no allowed key: zero output, and +∞ log-sum-exp so the backward's exp(S − lse) is 0.
                bool empty = l[i] == 0f;
                float inv = empty ? 0f : 1f / l[i];
                for (int d = 0; d < Dv; d++) o[(long)i * Dv + d] = acc[i * Dv + d] * inv;
                lse[i] = empty ? float.PositiveInfinity : m[i] + MathF.Log(l[i]);
            }
        });
    }

    private static void Backward<TS, TV>(FusedLayout L, KernelArgs a) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int nb = L.NumBlocks, bs = L.BlockSize, width = Math.Max(a.Dim, a.DimV);

        // Pass 1, query-major: dQ = scale · Σ_blocks dS·K with dS = P ∘ (dO·Vᵀ − Δ).
        ParallelOver(a.Batch * a.Heads * nb, a.Threads, bs, width, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (task, scratch) =>
        {
            int qb = task % nb, bh = task / nb, h = bh % a.Heads, b = bh / a.Heads;
            int T = a.SeqLen, D = a.Dim, Dv = a.DimV;
            int q0 = qb * bs, rows = Math.Min(bs, T - q0);
            float* q = (float*)a.Q + ((long)bh * T + q0) * D;
            float* k = (float*)a.K + (long)bh * T * D;                           // (T, D)
            float* v = (float*)a.V + (long)bh * T * Dv;                          // (T, Dv)
            float* dO = (float*)a.DO + ((long)bh * T + q0) * Dv;
            float* lse = (float*)a.Lse + (long)bh * T + q0;
            float* delta = (float*)a.Delta + (long)bh * T + q0;
            float* o = (float*)a.O + ((long)bh * T + q0) * Dv;
            for (int i = 0; i < rows; i++) delta[i] = Tile<TS, TV>.Dot(dO + (long)i * Dv, o + (long)i * Dv, Dv);
            float* keyBias = a.KeyBias == 0 ? null : (float*)a.KeyBias + (long)b * T;
            float* s = scratch.S, dp = scratch.P, dq = scratch.Acc, kt = scratch.T1, vt = scratch.T2;
            new Span<float>(dq, rows * D).Clear();
            fixed (float* tileBias = L.TileBias, compactBias = L.CompactBias)
            fixed (int* active = L.ActiveColumns)
            {
                int row = h * nb + qb;
                for (int e = L.RowStart[row]; e < L.RowStart[row + 1]; e++)
                {
                    int k0 = L.KeyBlock[e] * bs;
                    int n = KeyColumns(L, e, Math.Min(bs, T - k0), active, tileBias, compactBias, out int* idx, out float* bias);
                    float* kb = KeyBiasOf(keyBias, k0, idx, n, scratch.KeyBias);
                    GatherTransposed(k + (long)k0 * D, idx, n, D, kt, bs);                            // (D, n)
                    GatherTransposed(v + (long)k0 * Dv, idx, n, Dv, vt, bs);                          // (Dv, n)
                    Tile<TS, TV>.Gemm(rows, n, D, q, D, kt, bs, s, bs, accumulate: false);            // S
                    Tile<TS, TV>.Gemm(rows, n, Dv, dO, Dv, vt, bs, dp, bs, accumulate: false);        // dP = dO·Vᵀ
                    for (int i = 0; i < rows; i++)
                    {
                        float* si = s + i * bs;
                        Tile<TS, TV>.ScaleAddBias(si, n, a.Scale, bias == null ? null : bias + i * bs, -lse[i]);
                        if (kb != null) Tile<TS, TV>.ScaleAddBias(si, n, 1f, kb, 0f);
                        Tile<TS, TV>.ExpShiftSum(si, n, 0f);                                           // P = exp(S − lse)
                        Tile<TS, TV>.SoftmaxGrad(si, dp + i * bs, n, delta[i]);                        // dS
                    }
                    float* kRows = Rows(k + (long)k0 * D, idx, n, D, scratch.T3);                     // (n, D)
                    Tile<TS, TV>.Gemm(rows, D, n, dp, bs, kRows, D, dq, D, accumulate: true);         // dQ += dS·K
                }
            }
            float* dqOut = (float*)a.DQ + ((long)bh * T + q0) * D;
            for (int i = 0; i < rows * D; i++) dqOut[i] = dq[i] * a.Scale;
        });

        // Pass 2, key-major on transposed tiles: dV = Σ Pᵀ·dO, dK = scale · Σ dSᵀ·Q.
        ParallelOver(a.Batch * a.Heads * nb, a.Threads, bs, width, [MethodImpl(MethodImplOptions.AggressiveOptimization)] (task, scratch) =>
        {
            int kb = task % nb, bh = task / nb, h = bh % a.Heads, b = bh / a.Heads;
            int T = a.SeqLen, D = a.Dim, Dv = a.DimV;
            int k0 = kb * bs, cols = Math.Min(bs, T - k0);
            float* k = (float*)a.K + ((long)bh * T + k0) * D;
            float* v = (float*)a.V + ((long)bh * T + k0) * Dv;
            float* q = (float*)a.Q + (long)bh * T * D;
            float* dO = (float*)a.DO + (long)bh * T * Dv;
            float* lse = (float*)a.Lse + (long)bh * T;
            float* delta = (float*)a.Delta + (long)bh * T;
            float* keyBias = a.KeyBias == 0 ? null : (float*)a.KeyBias + (long)b * T + k0;
            float* st = scratch.S, dpt = scratch.P, dk = scratch.Acc, dv = scratch.Acc2, qt = scratch.T1, dOt = scratch.T2;
            new Span<float>(dk, cols * D).Clear();
            new Span<float>(dv, cols * Dv).Clear();
            fixed (float* tileBiasT = L.TileBiasT, compactBiasT = L.CompactBiasT)
            fixed (int* active = L.ActiveColumns)
            {
                int col = h * nb + kb;
                for (int c = L.ColStart[col]; c < L.ColStart[col + 1]; c++)
                {
                    int e = L.ColEntry[c], q0 = L.ColQueryBlock[c] * bs, rows = Math.Min(bs, T - q0);
                    // Key-major: the entry's (active) keys are the rows here, its queries the columns.
                    int n = KeyColumns(L, e, cols, active, tileBiasT, compactBiasT, out int* idx, out float* biasT);
                    float* kRows = Rows(k, idx, n, D, scratch.T3);                                     // (n, D)
                    float* vRows = Rows(v, idx, n, Dv, scratch.T4);                                    // (n, Dv)
                    GatherTransposed(q + (long)q0 * D, null, rows, D, qt, bs);                         // (D, rows)
                    GatherTransposed(dO + (long)q0 * Dv, null, rows, Dv, dOt, bs);                     // (Dv, rows)
                    Tile<TS, TV>.Gemm(n, rows, D, kRows, D, qt, bs, st, bs, accumulate: false);       // Sᵀ = K·Qᵀ
                    Tile<TS, TV>.Gemm(n, rows, Dv, vRows, Dv, dOt, bs, dpt, bs, accumulate: false);   // dPᵀ = V·dOᵀ
                    for (int j = 0; j < n; j++)
                    {
                        float* sj = st + j * bs;
                        float keyTerm = keyBias == null ? 0f : keyBias[idx == null ? j : idx[j]];
                        Tile<TS, TV>.ScaleAddBias(sj, rows, a.Scale, biasT == null ? null : biasT + j * bs, keyTerm);
                        Tile<TS, TV>.ExpShiftEach(sj, rows, lse + q0);                                    // Pᵀ
                        Tile<TS, TV>.SoftmaxGradEach(sj, dpt + j * bs, rows, delta + q0);                 // dSᵀ
                    }
                    if (idx == null)
                    {
                        Tile<TS, TV>.Gemm(n, Dv, rows, st, bs, dO + (long)q0 * Dv, Dv, dv, Dv, accumulate: true);  // dV += Pᵀ·dO
                        Tile<TS, TV>.Gemm(n, D, rows, dpt, bs, q + (long)q0 * D, D, dk, D, accumulate: true);      // dK += dSᵀ·Q
                        continue;
                    }
                    // Compacted entry: compute the active keys' share, then add it to their rows.
                    float* dvPart = scratch.T1, dkPart = scratch.T2;
                    Tile<TS, TV>.Gemm(n, Dv, rows, st, bs, dO + (long)q0 * Dv, Dv, dvPart, Dv, accumulate: false);
                    Tile<TS, TV>.Gemm(n, D, rows, dpt, bs, q + (long)q0 * D, D, dkPart, D, accumulate: false);
                    for (int j = 0; j < n; j++)
                    {
                        Tile<TS, TV>.AddTo(dv + (long)idx[j] * Dv, dvPart + (long)j * Dv, Dv);
                        Tile<TS, TV>.AddTo(dk + (long)idx[j] * D, dkPart + (long)j * D, D);
                    }
                }
            }
            float* dkOut = (float*)a.DK + ((long)bh * T + k0) * D;
            float* dvOut = (float*)a.DV + ((long)bh * T + k0) * Dv;
            for (int i = 0; i < cols * D; i++) dkOut[i] = dk[i] * a.Scale;
            new Span<float>(dv, cols * Dv).CopyTo(new Span<float>(dvOut, cols * Dv));
        });
    }
}
