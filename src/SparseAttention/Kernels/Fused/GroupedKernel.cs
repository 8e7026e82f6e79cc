using System.Collections.Concurrent;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace SparseAttention.Kernels.Fused;

/// <summary>Raw pointers and sizes of one fused grouped-attention call.</summary>
internal struct GroupedArgs
{
    public int Batch, Heads, SeqLen, Dim, DimV, Groups, QuerySlots, KeySlots, Threads;
    public bool Causal, SharedQk, LookBackward;
    public float Scale;
    public nint Q, K, V;             // (B, H, T, D), (B, H, T, D), (B, H, T, Dv); padded keys are never read
    public nint QueryIndex, KeyIndex; // (B, H, G, Wq), (B, H, G, Wk) int64, −1 = empty slot
    public nint KeyMask;             // (B, T) bool as bytes, or 0
    public nint O, Lse;              // (B, H, T, Dv) and per slot (B, H, G, Wq); slot outputs are recomputed in the backward
    public nint DO, DQ, DK, DV;      // backward
    // Merged (multi-round, LSH) mode — Rounds > 0; see GroupedKernel.ForwardMerged. Unused (0) otherwise.
    public int Rounds;
    public bool Dedup;
    public nint PreviousGroup;       // (B, H, G) int64 look-back group, −1 = none (merged mode; LookBackward is then set)
    public nint QueryLabels, KeyLabels; // (B, H, R, T) int64 or 0: a pair needs equal labels in its round
    public nint PositionLse;         // (B, H, T) log-sum-exp of each position's merged softmax, +∞ = nothing attended
    // Relative-position terms of the distance j − i between original positions (either or none): Shaw tables, row
    // clip(j − i, ±R) + R of (RelRows = 2R + 1, D) and (RelRows, Dv); or ALiBi slopes (H) float32.
    public nint RelKey, RelValue, AlibiSlopes;
    public int RelRows;
    public nint DRelKey, DRelValue;  // backward, Shaw: per (batch, head) table gradients (B·H, 2R + 1, D), (B·H, 2R + 1, Dv)
}

/// <summary>
/// Fused attention inside content-based groups (routing clusters, LSH chunks) on raw float32 CPU memory, with the
/// rules of <see cref="GroupedAttention"/> (causal on original positions, shared-QK self-attention only as a last
/// resort, key mask, look-back to the previous group, mean over the groups a query joined).
/// </summary>
/// <remarks>
/// <para>Grouped attention as block-sparse attention: each (batch, head) is first permuted into group order — group
/// g's real query rows are contiguous in Qp, its real keys contiguous columns of Kᵀ (and rows of V), padded to the
/// vector width with sentinel keys (zero rows, position int.MaxValue, always masked) so no tile has a scalar tail.
/// Each group is then a dense tile (its own key block, plus the previous group's block with look-back — no copy, just a
/// second column range), masked by the rules on ORIGINAL positions; the un-permute is folded into the output write
/// (rows added at their positions). The backward accumulates dK, dV in the permuted key layout (a key used by its own
/// group and by the next one's look-back is written twice there, not scattered twice) and un-permutes once per head.</para>
/// <para>One task per (batch, head) walks its groups in order, so accumulation never races and results do not depend
/// on the thread count. Merged mode (<see cref="GroupedArgs.Rounds"/> &gt; 0, LSH rounds): instead of the mean over
/// groups, each position keeps a running max and sum over every row it gets in any group (a log-sum-exp merge across
/// groups and rounds), look-back follows explicit previous-group links, optional labels and exact de-duplication apply
/// per pair, and the backward uses the positions' final log-sum-exp.</para>
/// <para>Relative positions (Shaw, ALiBi) ride on the tiles: Shaw's score term s·qᵢ·aᴷ[c] is read per pair from a
/// (rows × 2R + 1) tile of qᵢ·aᴷ (one small GEMM per group), its value term Σⱼ pᵢⱼ·aⱽ[c] is the probabilities summed per
/// clipped distance c times aⱽ (another); the backward mirrors both (dO·aⱽ per distance into dP, dS summed per distance
/// into dQ and the key table's gradient, P summed per distance into the value table's). Memory stays O(T·W).</para>
/// </remarks>
internal static unsafe class GroupedKernel
{
    // Kernels are JIT-compiled fully optimised at once (no tier-0 pass over hot loops).
    private const MethodImplOptions Hot = MethodImplOptions.AggressiveOptimization;

    public static void Forward(in GroupedArgs args)
    {
        var call = new Call(args, backward: false);
        SimdWidth.Run(ref call);
    }

    public static void Backward(in GroupedArgs args)
    {
        var call = new Call(args, backward: true);
        SimdWidth.Run(ref call);
    }

    private readonly struct Call(GroupedArgs args, bool backward) : ISimdKernel
    {
        public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged => GroupedKernel.Run<TS, TV>(args, backward);
    }

    /// <summary>
    /// Per-thread memory for one (batch, head) at a time: the permuted layout and the tiles of one group. Pooled across
    /// calls (a fresh multi-MiB buffer costs a page fault per 4 KiB on its first touch, which rivalled the kernel itself).
    /// </summary>
    private sealed class Scratch : IDisposable
    {
        private const long MaxPooledBytes = 256L << 20;
        private static readonly ConcurrentBag<Scratch> Pool = [];

        private void* memory;
        private long capacity;

        // Permuted layout of the current (batch, head). Group g: query rows [QOff[g], QOff[g] + QCount[g]) of Qp (QPos =
        // original position, QSlot = slot in the group); key columns [KOff[g], KOff[g] + KCols[g]) of KT (row stride
        // KTotal), the same rows of Kp / Vp / DKp / DVp (KPos = position, int.MaxValue at sentinel columns).
        public float* Qp, KT, Kp, Vp, VT, DKp, DVp;
        public int* QPos, QSlot, KPos, QOff, QCount, KOff, KCols;
        public int KTotal;
        // One group's tiles: scores/probabilities S and P (Wq × n), the tile's key positions, dO rows and dQ rows.
        public float* S, P, DOg, DQ;
        public int* KeyKey;
        public float* Count, PosMax, PosSum;       // per position (T each)
        public int* QueryGroup, KeyGroup;          // merged mode with dedup: group of each position per round (R·T each)
        // Merged mode, set per (batch, head) and group: labels (R·T) or null, look-back links (G) or null, the group's round.
        public long* QueryLabels, KeyLabels, PreviousGroup;
        public int Round;
        // Shaw: the tables transposed (aᴷᵀ: D × rows, aⱽᵀ: Dv × rows) and three per-distance tiles (Wq × rows): q·aᴷ or
        // dO·aⱽ, probabilities summed per distance, dS summed per distance.
        public float* RelKT, RelVT, RelA, RelB, RelC;

        public static Scratch Rent(in GroupedArgs a, bool backward, int width)
        {
            var x = Pool.TryTake(out var pooled) ? pooled : new Scratch();
            x.Carve(a, backward, width);
            return x;
        }

        public static void Return(Scratch x)
        {
            if (x.capacity <= MaxPooledBytes && Pool.Count < Environment.ProcessorCount) Pool.Add(x);
            else x.Dispose();
        }

        private void Carve(in GroupedArgs a, bool backward, int width)
        {
            long groups = a.Groups, wkPadded = RoundUp(a.KeySlots, width);
            long nq = groups * a.QuerySlots, nk = groups * wkPadded, n = (a.LookBackward ? 2 : 1) * wkPadded;
            long D = a.Dim, Dv = a.DimV, T = a.SeqLen, rounds = Math.Max(0, a.Rounds);
            long bytes = 0;
            long Take(long count, int size) { long at = bytes; bytes += RoundUp(count * size, 64); return at; }
            long qp = Take(nq * D, 4), kt = Take(D * nk, 4), vp = Take(nk * Dv, 4);
            long kp = Take(nk * D, 4), vt = backward ? Take(Dv * nk, 4) : 0;
            long dkp = backward ? Take(nk * D, 4) : 0, dvp = backward ? Take(nk * Dv, 4) : 0;
            long s = Take(a.QuerySlots * n, 4), p = Take(a.QuerySlots * n, 4);
            long dog = Take(a.QuerySlots * Dv, 4), dq = Take(a.QuerySlots * Math.Max(D, Dv), 4);
            long count = Take(T, 4), posMax = Take(T, 4), posSum = Take(T, 4);
            long qpos = Take(nq, 4), qslot = Take(nq, 4), kpos = Take(nk, 4);
            long qoff = Take(groups, 4), qcount = Take(groups, 4), koff = Take(groups, 4), kcols = Take(groups, 4);
            long keyKey = Take(n, 4), queryGroup = Take(rounds * T, 4), keyGroup = Take(rounds * T, 4);
            long rows = a.RelKey != 0 ? a.RelRows : 0;
            long relKT = Take(D * rows, 4), relVT = Take(Dv * rows, 4);
            long relA = Take(a.QuerySlots * rows, 4), relB = Take(a.QuerySlots * rows, 4), relC = Take(a.QuerySlots * rows, 4);
            if (bytes > capacity)
            {
                if (memory != null) NativeMemory.AlignedFree(memory);
                memory = NativeMemory.AlignedAlloc((nuint)bytes, 64);
                capacity = bytes;
            }
            byte* m = (byte*)memory;
            Qp = (float*)(m + qp); KT = (float*)(m + kt); Vp = (float*)(m + vp);
            Kp = (float*)(m + kp); VT = backward ? (float*)(m + vt) : null;
            DKp = backward ? (float*)(m + dkp) : null; DVp = backward ? (float*)(m + dvp) : null;
            S = (float*)(m + s); P = (float*)(m + p); DOg = (float*)(m + dog); DQ = (float*)(m + dq);
            Count = (float*)(m + count); PosMax = (float*)(m + posMax); PosSum = (float*)(m + posSum);
            QPos = (int*)(m + qpos); QSlot = (int*)(m + qslot); KPos = (int*)(m + kpos);
            QOff = (int*)(m + qoff); QCount = (int*)(m + qcount); KOff = (int*)(m + koff); KCols = (int*)(m + kcols);
            KeyKey = (int*)(m + keyKey); QueryGroup = (int*)(m + queryGroup); KeyGroup = (int*)(m + keyGroup);
            QueryLabels = KeyLabels = PreviousGroup = null;
            Round = 0;
            RelKT = RelVT = RelA = RelB = RelC = null;
            if (rows == 0) return;
            RelKT = (float*)(m + relKT); RelVT = (float*)(m + relVT);
            RelA = (float*)(m + relA); RelB = (float*)(m + relB); RelC = (float*)(m + relC);
            for (int r = 0; r < rows; r++)                                                  // tiny: a scalar transpose
            {
                for (int d = 0; d < a.Dim; d++) RelKT[d * rows + r] = ((float*)a.RelKey)[r * a.Dim + d];
                for (int d = 0; d < a.DimV; d++) RelVT[d * rows + r] = ((float*)a.RelValue)[r * a.DimV + d];
            }
        }

        public void Dispose()
        {
            if (memory != null) NativeMemory.AlignedFree(memory);
            memory = null;
            capacity = 0;
        }
    }

    private static long RoundUp(long x, long multiple) => (x + multiple - 1) / multiple * multiple;

    private static void Run<TS, TV>(GroupedArgs a, bool backward) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        Parallel.For(0, a.Batch * a.Heads, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, a.Threads) },
            () => Scratch.Rent(a, backward, TS.Width),
            [MethodImpl(Hot)] (bh, _, scratch) =>
            {
                if (a.Rounds > 0)
                {
                    if (backward) BackwardMergedHead<TS, TV>(a, bh, scratch); else ForwardMergedHead<TS, TV>(a, bh, scratch);
                }
                else if (backward) BackwardHead<TS, TV>(a, bh, scratch); else ForwardHead<TS, TV>(a, bh, scratch);
                return scratch;
            },
            Scratch.Return);
    }

    /// <summary>How many valid query slots hold each position of this (batch, head).</summary>
    private static void CountSlots(in GroupedArgs a, long* queryIndex, float* count)
    {
        new Span<float>(count, a.SeqLen).Clear();
        long slots = (long)a.Groups * a.QuerySlots;
        for (long i = 0; i < slots; i++) if (queryIndex[i] >= 0) count[queryIndex[i]] += 1f;
    }

    // Rows are gathered from (and gradients added to) random positions of a head's tensors (megabytes: beyond L2), so
    // each copy would wait for memory; asking for the row a few slots ahead overlaps those waits.
    private const int PrefetchAhead = 8;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Prefetch(float* row, int width)
    {
        if (!System.Runtime.Intrinsics.X86.Sse.IsSupported) return;
        for (int b = 0; b < width * sizeof(float); b += 64) System.Runtime.Intrinsics.X86.Sse.Prefetch0((byte*)row + b);
    }

    /// <summary>dst[0..n) = src[0..n) in vector registers (a row is a few vectors: a call to memmove costs more).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyRow<TS, TV>(float* src, float* dst, int n) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int i = 0;
        for (; i + TS.Width <= n; i += TS.Width) TS.Store(dst + i, TS.Load(src + i));
        for (; i < n; i++) dst[i] = src[i];
    }

    /// <summary>
    /// Permutes one (batch, head) into group order (see the class remarks): real query rows and real, unpadded keys
    /// of each group packed in slot order, each group's key block padded to the vector width with sentinel keys;
    /// Kᵀ (and for the backward Vᵀ, K rows and zeroed dK, dV accumulators) in the same column order.
    /// </summary>
    [MethodImpl(Hot)]
    private static void Permute<TS, TV>(in GroupedArgs a, int bh, Scratch x, bool backward) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int D = a.Dim, Dv = a.DimV, wq = a.QuerySlots, wk = a.KeySlots, w = TS.Width;
        var h = new Head(a, bh);
        float* q = h.Q, k = h.K, v = h.V;
        long* queryIndex = h.QueryIndex, keyIndex = h.KeyIndex;
        byte* keyMask = h.KeyMask;
        int nq = 0, nk = 0;
        for (int g = 0; g < a.Groups; g++)
        {
            x.QOff[g] = nq;
            long* qi = queryIndex + (long)g * wq;
            for (int s = 0; s < wq; s++)
            {
                if (s + PrefetchAhead < wq && qi[s + PrefetchAhead] >= 0) Prefetch(q + qi[s + PrefetchAhead] * D, D);
                long p = qi[s];
                if (p < 0) continue;
                x.QPos[nq] = (int)p;
                x.QSlot[nq] = s;
                CopyRow<TS, TV>(q + p * D, x.Qp + (long)nq * D, D);
                nq++;
            }
            x.QCount[g] = nq - x.QOff[g];
            x.KOff[g] = nk;
            long* ki = keyIndex + (long)g * wk;
            for (int s = 0; s < wk; s++)
            {
                if (s + PrefetchAhead < wk && ki[s + PrefetchAhead] is long ahead and >= 0)
                {
                    Prefetch(k + ahead * D, D);
                    Prefetch(v + ahead * Dv, Dv);
                }
                long p = ki[s];
                if (p < 0 || (keyMask != null && keyMask[p] == 0)) continue;               // never attended: not in the tile
                x.KPos[nk] = (int)p;
                CopyRow<TS, TV>(v + p * Dv, x.Vp + (long)nk * Dv, Dv);
                CopyRow<TS, TV>(k + p * D, x.Kp + (long)nk * D, D);
                nk++;
            }
            for (; nk % w != 0; nk++)                                                      // sentinel keys up to the vector width
            {
                x.KPos[nk] = int.MaxValue;
                new Span<float>(x.Vp + (long)nk * Dv, Dv).Clear();
                new Span<float>(x.Kp + (long)nk * D, D).Clear();
            }
            x.KCols[g] = nk - x.KOff[g];
        }
        x.KTotal = nk;
        // Rows copied in order, then transposed in registers: cheaper than gathering columns from scattered rows.
        Tile<TS, TV>.Transpose(x.Kp, nk, D, D, x.KT, nk, 1f);                                 // (D, nk)
        if (!backward) return;
        Tile<TS, TV>.Transpose(x.Vp, nk, Dv, Dv, x.VT, nk, 1f);                               // (Dv, nk)
        new Span<float>(x.DKp, nk * D).Clear();
        new Span<float>(x.DVp, nk * Dv).Clear();
    }

    /// <summary>The look-back group of g (−1 = none): g − 1, or the explicit link in merged mode.</summary>
    private static int PreviousOf(in GroupedArgs a, Scratch x, int g) =>
        !a.LookBackward ? -1 : x.PreviousGroup != null ? (int)x.PreviousGroup[g] : g - 1;

    /// <summary>
    /// Scores of group g in the S tile (m × n, n = the previous group's key columns pn then the group's own): scale·q·k
    /// where allowed, −∞ elsewhere (sentinels, causal rule, shared-QK self unless nothing else is allowed, merged
    /// rules). Returns m = 0 when the group has no query or no key.
    /// </summary>
    [MethodImpl(Hot)]
    private static (int M, int N, int Prev, int PrevCols) ScoreTile<TS, TV>(in GroupedArgs a, Scratch x, int bh, int g, float* q, float* k)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int D = a.Dim, m = x.QCount[g], prev = PreviousOf(a, x, g);
        int pn = prev >= 0 ? x.KCols[prev] : 0, kn = x.KCols[g], n = pn + kn;
        if (m == 0 || n == 0) return (0, 0, -1, 0);
        float* qg = x.Qp + (long)x.QOff[g] * D;
        if (pn > 0) Tile<TS, TV>.Gemm(m, pn, D, qg, D, x.KT + x.KOff[prev], x.KTotal, x.S, n, accumulate: false);   // (m, pn)
        if (kn > 0) Tile<TS, TV>.Gemm(m, kn, D, qg, D, x.KT + x.KOff[g], x.KTotal, x.S + pn, n, accumulate: false);  // (m, kn)
        int* key = x.KeyKey;
        if (pn > 0) new Span<int>(x.KPos + x.KOff[prev], pn).CopyTo(new Span<int>(key, pn));
        new Span<int>(x.KPos + x.KOff[g], kn).CopyTo(new Span<int>(key + pn, kn));
        int* queryPos = x.QPos + x.QOff[g];
        for (int r = 0; r < m; r++)
        {
            float* si = x.S + (long)r * n;
            int qp = queryPos[r];
            bool other, self;
            if (Vector512.IsHardwareAccelerated) MaskRow512(si, key, n, qp, a.Causal, a.SharedQk, a.Scale, out other, out self);
            else MaskRowScalar(si, key, 0, n, qp, a.Causal, a.SharedQk, a.Scale, out other, out self);
            if (a.Rounds > 0) { MergedRules(a, si, key, n, qp, x); continue; }              // merged mode: self handled per position
            if (self && !other)
            {
                // Nothing else is allowed: the query may attend itself (score recomputed for those slots).
                float selfScore = Tile<TS, TV>.Dot(q + (long)qp * D, k + (long)qp * D, D) * a.Scale;
                for (int j = 0; j < n; j++) if (key[j] == qp) si[j] = selfScore;
            }
        }
        AddRelativeScores<TS, TV>(a, x, bh, qg, m, n, key, queryPos);
        return (m, n, prev, pn);
    }

    /// <summary>Row of the Shaw tables for a distance: clip(d, ±R) + R with rows = 2R + 1.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int TableRow(int distance, int rows) => Math.Clamp(distance, -(rows / 2), rows / 2) + rows / 2;

    /// <summary>Adds the relative score term to the allowed (finite) entries of a score tile (m × n) whose keys are at
    /// positions key[j] and rows at queryPos[r]: Shaw's scale·qᵢ·aᴷ[row(j − i)], ALiBi's −m·|j − i|.</summary>
    [MethodImpl(Hot)]
    private static void AddRelativeScores<TS, TV>(in GroupedArgs a, Scratch x, int bh, float* qg, int m, int n, int* key, int* queryPos)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        if (a.RelKey != 0)
        {
            int rows = a.RelRows;
            Tile<TS, TV>.Gemm(m, rows, a.Dim, qg, a.Dim, x.RelKT, rows, x.RelA, rows, accumulate: false);   // (m, rows): qᵢ·aᴷ
            for (int r = 0; r < m; r++)
            {
                float* si = x.S + (long)r * n, qa = x.RelA + (long)r * rows;
                int qp = queryPos[r];
                for (int j = 0; j < n; j++)
                    if (!float.IsNegativeInfinity(si[j])) si[j] += a.Scale * qa[TableRow(key[j] - qp, rows)];
            }
        }
        else if (a.AlibiSlopes != 0)
        {
            float slope = ((float*)a.AlibiSlopes)[bh % a.Heads];
            for (int r = 0; r < m; r++)
            {
                float* si = x.S + (long)r * n;
                int qp = queryPos[r];
                for (int j = 0; j < n; j++)
                    if (!float.IsNegativeInfinity(si[j])) si[j] -= slope * Math.Abs(key[j] - qp);
            }
        }
    }

    /// <summary>sums (m × rows) = a tile's entries (m × n, keys at key[j], rows at queryPos[r]) summed per Shaw table row
    /// of their distance; sentinel keys skipped.</summary>
    [MethodImpl(Hot)]
    private static void DistanceSums(float* tile, int m, int n, int* key, int* queryPos, int rows, float* sums)
    {
        new Span<float>(sums, m * rows).Clear();
        for (int r = 0; r < m; r++)
        {
            float* tr = tile + (long)r * n, sr = sums + (long)r * rows;
            int qp = queryPos[r];
            for (int j = 0; j < n; j++)
                if (key[j] != int.MaxValue) sr[TableRow(key[j] - qp, rows)] += tr[j];
        }
    }

    /// <summary>Shaw's value term for a tile of (normalised or running) probabilities: output rows (m × Dv) +=
    /// (probabilities summed per distance) · aⱽ.</summary>
    [MethodImpl(Hot)]
    private static void AddRelativeValues<TS, TV>(in GroupedArgs a, Scratch x, int m, int n, int* queryPos, float* output)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        if (a.RelValue == 0) return;
        DistanceSums(x.S, m, n, x.KeyKey, queryPos, a.RelRows, x.RelB);
        Tile<TS, TV>.Gemm(m, a.DimV, a.RelRows, x.RelB, a.RelRows, (float*)a.RelValue, a.DimV, output, a.DimV, accumulate: true);
    }

    /// <summary>dst (m × width) = tile (m × n) · rows, the tile's first pn columns against the previous group's key rows and
    /// the rest against group g's (both in the permuted layout, row stride width).</summary>
    [MethodImpl(Hot)]
    private static void TileTimesKeyRows<TS, TV>(Scratch x, float* tile, int m, int n, int prev, int pn, int g, float* rows, int width, float* dst)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        if (pn > 0) Tile<TS, TV>.Gemm(m, width, pn, tile, n, rows + (long)x.KOff[prev] * width, width, dst, width, accumulate: false);
        if (n > pn) Tile<TS, TV>.Gemm(m, width, n - pn, tile + pn, n, rows + (long)x.KOff[g] * width, width, dst, width, accumulate: pn > 0);
    }

    /// <summary>dst (m × n) = rows (m × width) · the tile's key columns of a transposed key-side matrix (width × KTotal).</summary>
    [MethodImpl(Hot)]
    private static void RowsTimesKeyColumns<TS, TV>(Scratch x, float* rows, int m, int width, float* transposed, int n, int prev, int pn, int g, float* dst)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        if (pn > 0) Tile<TS, TV>.Gemm(m, pn, width, rows, width, transposed + x.KOff[prev], x.KTotal, dst, n, accumulate: false);
        if (n > pn) Tile<TS, TV>.Gemm(m, n - pn, width, rows, width, transposed + x.KOff[g], x.KTotal, dst + pn, n, accumulate: false);
    }

    /// <summary>Key-side accumulators (permuted rows, stride width) += tileᵀ (n × m) · rows (m × width).</summary>
    [MethodImpl(Hot)]
    private static void AccumulateKeyRows<TS, TV>(Scratch x, float* tile, int m, int n, int prev, int pn, int g, float* rows, int width, float* target)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        // The tile is read where it lies (Tile.GemmTransA): the key-side products Pᵀ·dO and dSᵀ·Q without transposing it.
        if (pn > 0) Tile<TS, TV>.GemmTransA(pn, width, m, tile, n, rows, width, target + (long)x.KOff[prev] * width, width, accumulate: true);
        if (n > pn) Tile<TS, TV>.GemmTransA(n - pn, width, m, tile + pn, n, rows, width, target + (long)x.KOff[g] * width, width, accumulate: true);
    }

    /// <summary>
    /// Merged mode's extra pair rules on one score row (already −∞ where not allowed): with labels, the query's and
    /// the key's labels of this round must agree; with dedup, a pair allowed in c rounds gets score − log c, so it
    /// counts once in the merged softmax.
    /// </summary>
    private static void MergedRules(in GroupedArgs a, float* si, int* key, int nk, int qp, Scratch x)
    {
        if (x.QueryLabels == null && !a.Dedup) return;
        long T = a.SeqLen;
        for (int j = 0; j < nk; j++)
        {
            if (float.IsNegativeInfinity(si[j])) continue;
            int kp = key[j];
            if (x.QueryLabels != null && x.QueryLabels[x.Round * T + qp] != x.KeyLabels[x.Round * T + kp])
            {
                si[j] = float.NegativeInfinity;
                continue;
            }
            if (!a.Dedup) continue;
            int count = 0;
            for (int r = 0; r < a.Rounds; r++)
            {
                int gq = x.QueryGroup[r * T + qp], gk = x.KeyGroup[r * T + kp];
                if (gq < 0 || gk < 0) continue;
                if (gk != gq && gk != x.PreviousGroup[gq]) continue;
                if (x.QueryLabels != null && x.QueryLabels[r * T + qp] != x.KeyLabels[r * T + kp]) continue;
                count++;
            }
            if (count > 1) si[j] -= MathF.Log(count);
        }
    }

    /// <summary>One score row from slot <paramref name="from"/> on: allowed and not self → scale·s, else −∞;
    /// reports whether any other key is allowed and whether a self slot is.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void MaskRowScalar(float* si, int* key, int from, int n, int qp, bool causal, bool sharedQk, float scale,
        out bool other, out bool self)
    {
        other = false; self = false;
        for (int j = from; j < n; j++)
        {
            int kp = key[j];
            bool allowed = kp != int.MaxValue && (!causal || kp <= qp);
            bool isSelf = sharedQk && allowed && kp == qp;
            self |= isSelf;
            bool ok = allowed && !isSelf;
            other |= ok;
            si[j] = ok ? si[j] * scale : float.NegativeInfinity;
        }
    }

    [MethodImpl(Hot)]
    private static void MaskRow512(float* si, int* key, int n, int qp, bool causal, bool sharedQk, float scale,
        out bool other, out bool self)
    {
        var q = Vector512.Create(qp);
        var none = Vector512.Create(int.MaxValue);
        var s = Vector512.Create(scale);
        var negInf = Vector512.Create(float.NegativeInfinity);
        var anyOk = Vector512<int>.Zero;
        var anySelf = Vector512<int>.Zero;
        int j = 0;
        for (; j + 16 <= n; j += 16)
        {
            var kp = Vector512.Load(key + j);
            var allowed = causal ? Vector512.LessThanOrEqual(kp, q) : ~Vector512.Equals(kp, none);
            var ok = allowed;
            if (sharedQk)
            {
                var isSelf = Vector512.Equals(kp, q);       // MaxValue never equals a position
                anySelf |= isSelf;
                ok = Vector512.AndNot(allowed, isSelf);
            }
            anyOk |= ok;
            var v = Vector512.Load(si + j) * s;
            Vector512.ConditionalSelect(ok.AsSingle(), v, negInf).Store(si + j);
        }
        MaskRowScalar(si, key, j, n, qp, causal, sharedQk, scale, out other, out self);
        other |= anyOk != Vector512<int>.Zero;
        self |= anySelf != Vector512<int>.Zero;
    }

    /// <summary>Per-(batch, head) pointers of q, k, v, the indices and the key mask.</summary>
    private readonly struct Head(in GroupedArgs a, int bh)
    {
        public readonly float* Q = (float*)a.Q + (long)bh * a.SeqLen * a.Dim, K = (float*)a.K + (long)bh * a.SeqLen * a.Dim,
            V = (float*)a.V + (long)bh * a.SeqLen * a.DimV;
        public readonly long* QueryIndex = (long*)a.QueryIndex + (long)bh * a.Groups * a.QuerySlots,
            KeyIndex = (long*)a.KeyIndex + (long)bh * a.Groups * a.KeySlots;
        public readonly byte* KeyMask = a.KeyMask == 0 ? null : (byte*)a.KeyMask + (long)(bh / a.Heads) * a.SeqLen;
    }

    [MethodImpl(Hot)]
    private static void ForwardHead<TS, TV>(in GroupedArgs a, int bh, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, Dv = a.DimV, wq = a.QuerySlots;
        var h = new Head(a, bh);
        float* q = h.Q, k = h.K;
        long* queryIndex = h.QueryIndex;
        float* o = (float*)a.O + (long)bh * T * Dv;
        new Span<float>(o, T * Dv).Clear();
        CountSlots(a, queryIndex, x.Count);
        Permute<TS, TV>(a, bh, x, backward: false);
        for (int g = 0; g < a.Groups; g++)
        {
            float* lse = (float*)a.Lse + ((long)bh * a.Groups + g) * wq;
            new Span<float>(lse, wq).Fill(float.PositiveInfinity);                              // empty slots: no key, zero output
            var (m, n, prev, pn) = ScoreTile<TS, TV>(a, x, bh, g, q, k);
            if (m == 0) continue;
            int* slot = x.QSlot + x.QOff[g];
            for (int r = 0; r < m; r++)
            {
                float* si = x.S + (long)r * n;
                float mx = Tile<TS, TV>.Max(si, n);
                if (float.IsNegativeInfinity(mx)) { new Span<float>(si, n).Clear(); continue; }
                float sum = Tile<TS, TV>.ExpShiftSum(si, n, mx);
                Tile<TS, TV>.Scale(si, n, 1f / sum);
                lse[slot[r]] = mx + MathF.Log(sum);
            }
            TileTimesKeyRows<TS, TV>(x, x.S, m, n, prev, pn, g, x.Vp, Dv, x.DOg);                 // (m, Dv)
            int* queryPos = x.QPos + x.QOff[g];
            AddRelativeValues<TS, TV>(a, x, m, n, queryPos, x.DOg);
            for (int r = 0; r < m; r++)                                                        // un-permute
            {
                if (r + PrefetchAhead < m) Prefetch(o + (long)queryPos[r + PrefetchAhead] * Dv, Dv);
                Tile<TS, TV>.AddTo(o + (long)queryPos[r] * Dv, x.DOg + (long)r * Dv, Dv);
            }
        }
        for (int t = 0; t < T; t++)
            if (x.Count[t] > 1f) Tile<TS, TV>.Scale(o + (long)t * Dv, Dv, 1f / x.Count[t]);     // mean over groups
    }

    /// <summary>
    /// The backward of one group's tile after ScoreTile and with its dO rows in DOg (m × Dv): P = exp(S − lse) per row
    /// (lse = lse[lseIndex[r]]), dS = P ⊙ (dP − delta) with delta = Σ P·dP (or the given per-row delta),
    /// dQ rows added at their positions, dK and dV accumulated in the permuted key layout.
    /// </summary>
    [MethodImpl(Hot)]
    private static void BackwardTile<TS, TV>(in GroupedArgs a, Scratch x, int bh, int g, int m, int n, int prev, int pn, float* dq,
        float* lse, int* lseIndex, float* positionDelta) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int D = a.Dim, Dv = a.DimV, rows = a.RelRows;
        bool shaw = a.RelKey != 0;
        RowsTimesKeyColumns<TS, TV>(x, x.DOg, m, Dv, x.VT, n, prev, pn, g, x.P);                 // dP = dO·Vᵀ (m, n)
        if (shaw) Tile<TS, TV>.Gemm(m, rows, Dv, x.DOg, Dv, x.RelVT, rows, x.RelA, rows, accumulate: false);   // (m, rows): dO·aⱽ
        int* queryPos = x.QPos + x.QOff[g], key = x.KeyKey;
        for (int r = 0; r < m; r++)
        {
            float* pr = x.S + (long)r * n, dpr = x.P + (long)r * n;
            Tile<TS, TV>.ExpShiftSum(pr, n, lse[lseIndex[r]]);                                      // P = exp(S − lse), 0 if lse = +∞
            if (shaw)                                                                          // dP += dO·aⱽ[row(j − i)]
            {
                float* da = x.RelA + (long)r * rows;
                int qp = queryPos[r];
                for (int j = 0; j < n; j++) if (key[j] != int.MaxValue) dpr[j] += da[TableRow(key[j] - qp, rows)];
            }
            float delta = positionDelta != null ? positionDelta[queryPos[r]] : Tile<TS, TV>.Dot(pr, dpr, n);   // dO·O = Σ P·dP
            Tile<TS, TV>.SoftmaxGrad(pr, dpr, n, delta);                                    // dS in P
        }
        TileTimesKeyRows<TS, TV>(x, x.P, m, n, prev, pn, g, x.Kp, D, x.DQ);                      // dQ = dS·K (m, D)
        if (shaw)
        {
            DistanceSums(x.S, m, n, key, queryPos, rows, x.RelB);                              // P per distance (m, rows)
            DistanceSums(x.P, m, n, key, queryPos, rows, x.RelC);                              // dS per distance (m, rows)
            Tile<TS, TV>.Gemm(m, D, rows, x.RelC, rows, (float*)a.RelKey, D, x.DQ, D, accumulate: true);   // dQ += dS·aᴷ
            float* qg = x.Qp + (long)x.QOff[g] * D;
            Tile<TS, TV>.GemmTransA(rows, D, m, x.RelC, rows, qg, D, (float*)a.DRelKey + (long)bh * rows * D, D, accumulate: true);    // daᴷ += dSᵀ·Q (scaled later)
            Tile<TS, TV>.GemmTransA(rows, Dv, m, x.RelB, rows, x.DOg, Dv, (float*)a.DRelValue + (long)bh * rows * Dv, Dv, accumulate: true);   // daⱽ += Pᵀ·dO
        }
        for (int r = 0; r < m; r++)
        {
            if (r + PrefetchAhead < m) Prefetch(dq + (long)queryPos[r + PrefetchAhead] * D, D);
            Tile<TS, TV>.Scale(x.DQ + (long)r * D, D, a.Scale);
            Tile<TS, TV>.AddTo(dq + (long)queryPos[r] * D, x.DQ + (long)r * D, D);
        }
        AccumulateKeyRows<TS, TV>(x, x.S, m, n, prev, pn, g, x.DOg, Dv, x.DVp);                  // dV += Pᵀ·dO
        AccumulateKeyRows<TS, TV>(x, x.P, m, n, prev, pn, g, x.Qp + (long)x.QOff[g] * D, D, x.DKp);   // dK += dSᵀ·Q (scaled later)
    }

    /// <summary>Zeroes this (batch, head)'s share of the Shaw tables' gradients (each head accumulates its own, summed
    /// over heads afterwards in a fixed order, so results do not depend on the thread count).</summary>
    private static void ClearTableGradients(in GroupedArgs a, int bh)
    {
        if (a.DRelKey == 0) return;
        new Span<float>((float*)a.DRelKey + (long)bh * a.RelRows * a.Dim, a.RelRows * a.Dim).Clear();
        new Span<float>((float*)a.DRelValue + (long)bh * a.RelRows * a.DimV, a.RelRows * a.DimV).Clear();
    }

    /// <summary>Adds the permuted dK (times the score scale) and dV rows to their positions.</summary>
    [MethodImpl(Hot)]
    private static void UnpermuteKeyGradients<TS, TV>(in GroupedArgs a, Scratch x, float* dk, float* dv) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int D = a.Dim, Dv = a.DimV;
        for (int c = 0; c < x.KTotal; c++)
        {
            if (c + PrefetchAhead < x.KTotal && x.KPos[c + PrefetchAhead] is int ahead and not int.MaxValue)
            {
                Prefetch(dk + (long)ahead * D, D);
                Prefetch(dv + (long)ahead * Dv, Dv);
            }
            long p = x.KPos[c];
            if (p == int.MaxValue) continue;
            Tile<TS, TV>.Scale(x.DKp + (long)c * D, D, a.Scale);
            Tile<TS, TV>.AddTo(dk + p * D, x.DKp + (long)c * D, D);
            Tile<TS, TV>.AddTo(dv + p * Dv, x.DVp + (long)c * Dv, Dv);
        }
    }

    [MethodImpl(Hot)]
    private static void BackwardHead<TS, TV>(in GroupedArgs a, int bh, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, wq = a.QuerySlots;
        var h = new Head(a, bh);
        float* q = h.Q, k = h.K;
        long* queryIndex = h.QueryIndex;
        float* dOut = (float*)a.DO + (long)bh * T * Dv;
        float* dq = (float*)a.DQ + (long)bh * T * D, dk = (float*)a.DK + (long)bh * T * D, dv = (float*)a.DV + (long)bh * T * Dv;
        new Span<float>(dq, T * D).Clear();
        new Span<float>(dk, T * D).Clear();
        new Span<float>(dv, T * Dv).Clear();
        ClearTableGradients(a, bh);
        CountSlots(a, queryIndex, x.Count);
        Permute<TS, TV>(a, bh, x, backward: true);
        for (int g = 0; g < a.Groups; g++)
        {
            var (m, n, prev, pn) = ScoreTile<TS, TV>(a, x, bh, g, q, k);
            if (m == 0) continue;                                                             // no allowed pair: no gradient
            float* lse = (float*)a.Lse + ((long)bh * a.Groups + g) * wq;
            int* slot = x.QSlot + x.QOff[g], queryPos = x.QPos + x.QOff[g];
            // dO of each slot = dOut at its position / number of slots holding that position.
            for (int r = 0; r < m; r++)
            {
                long p = queryPos[r];
                new Span<float>(dOut + p * Dv, Dv).CopyTo(new Span<float>(x.DOg + (long)r * Dv, Dv));
                Tile<TS, TV>.Scale(x.DOg + (long)r * Dv, Dv, 1f / x.Count[p]);
            }
            BackwardTile<TS, TV>(a, x, bh, g, m, n, prev, pn, dq, lse, slot, null);
        }
        UnpermuteKeyGradients<TS, TV>(a, x, dk, dv);
        if (a.DRelKey != 0) Tile<TS, TV>.Scale((float*)a.DRelKey + (long)bh * a.RelRows * D, (long)a.RelRows * D, a.Scale);
    }

    /// <summary>Per-head pointers of merged mode in the scratch; with dedup, the group of each position per round.</summary>
    private static void PrepareMerged(in GroupedArgs a, int bh, long* queryIndex, long* keyIndex, Scratch x)
    {
        long T = a.SeqLen;
        x.PreviousGroup = (long*)a.PreviousGroup + (long)bh * a.Groups;
        x.QueryLabels = a.QueryLabels == 0 ? null : (long*)a.QueryLabels + (long)bh * a.Rounds * T;
        x.KeyLabels = a.KeyLabels == 0 ? null : (long*)a.KeyLabels + (long)bh * a.Rounds * T;
        if (!a.Dedup) return;
        int perRound = a.Groups / a.Rounds;
        new Span<int>(x.QueryGroup, (int)(a.Rounds * T)).Fill(-1);
        new Span<int>(x.KeyGroup, (int)(a.Rounds * T)).Fill(-1);
        for (int g = 0; g < a.Groups; g++)
        {
            long r = g / perRound;
            for (int s = 0; s < a.QuerySlots; s++) { long p = queryIndex[(long)g * a.QuerySlots + s]; if (p >= 0) x.QueryGroup[r * T + p] = g; }
            for (int s = 0; s < a.KeySlots; s++) { long p = keyIndex[(long)g * a.KeySlots + s]; if (p >= 0) x.KeyGroup[r * T + p] = g; }
        }
    }

    /// <summary>
    /// Merged mode forward for one (batch, head): every group's rows join their position's ONE softmax (online: running
    /// max and sum per position, rescaling the accumulated output when the max grows). Writes O and the per-position
    /// log-sum-exp; under shared QK a real position with nothing attended gets its own value.
    /// </summary>
    [MethodImpl(Hot)]
    private static void ForwardMergedHead<TS, TV>(in GroupedArgs a, int bh, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, Dv = a.DimV, perRound = a.Groups / a.Rounds;
        var h = new Head(a, bh);
        float* q = h.Q, k = h.K, v = h.V;
        long* queryIndex = h.QueryIndex, keyIndex = h.KeyIndex;
        byte* keyMask = h.KeyMask;
        float* o = (float*)a.O + (long)bh * T * Dv, lse = (float*)a.PositionLse + (long)bh * T;
        new Span<float>(o, T * Dv).Clear();
        new Span<float>(x.PosMax, T).Fill(float.NegativeInfinity);
        new Span<float>(x.PosSum, T).Clear();
        PrepareMerged(a, bh, queryIndex, keyIndex, x);
        Permute<TS, TV>(a, bh, x, backward: false);
        for (int g = 0; g < a.Groups; g++)
        {
            x.Round = g / perRound;
            var (m, n, prev, pn) = ScoreTile<TS, TV>(a, x, bh, g, q, k);
            if (m == 0) continue;
            int* queryPos = x.QPos + x.QOff[g];
            for (int r = 0; r < m; r++)
            {
                float* si = x.S + (long)r * n;
                long p = queryPos[r];
                float mx = Tile<TS, TV>.Max(si, n);
                if (float.IsNegativeInfinity(mx)) { new Span<float>(si, n).Clear(); continue; }
                float old = x.PosMax[p];
                if (mx > old)
                {
                    if (x.PosSum[p] > 0)
                    {
                        float alpha = FastExp.Exp(old - mx);
                        x.PosSum[p] *= alpha;
                        Tile<TS, TV>.Scale(o + p * Dv, Dv, alpha);
                    }
                    x.PosMax[p] = mx;
                }
                x.PosSum[p] += Tile<TS, TV>.ExpShiftSum(si, n, x.PosMax[p]);                    // row ← exp(s − max so far)
            }
            TileTimesKeyRows<TS, TV>(x, x.S, m, n, prev, pn, g, x.Vp, Dv, x.DOg);                 // (m, Dv)
            AddRelativeValues<TS, TV>(a, x, m, n, queryPos, x.DOg);                            // same running scale as the rows
            for (int r = 0; r < m; r++)
            {
                if (r + PrefetchAhead < m) Prefetch(o + (long)queryPos[r + PrefetchAhead] * Dv, Dv);
                Tile<TS, TV>.AddTo(o + (long)queryPos[r] * Dv, x.DOg + (long)r * Dv, Dv);
            }
        }
        for (int t = 0; t < T; t++)
        {
            float sum = x.PosSum[t];
            if (sum > 0)
            {
                Tile<TS, TV>.Scale(o + (long)t * Dv, Dv, 1f / sum);
                lse[t] = x.PosMax[t] + MathF.Log(sum);
            }
            else
            {
                lse[t] = float.PositiveInfinity;
                if (a.SharedQk && (keyMask == null || keyMask[t] != 0))
                {
                    new Span<float>(v + (long)t * Dv, Dv).CopyTo(new Span<float>(o + (long)t * Dv, Dv));   // self, the last resort
                    if (a.RelValue != 0)                                                       // at distance 0
                        Tile<TS, TV>.AddTo(o + (long)t * Dv, (float*)a.RelValue + (long)(a.RelRows / 2) * Dv, Dv);
                }
            }
        }
    }

    /// <summary>
    /// Merged mode backward for one (batch, head): P = exp(s − lse[position]) with the positions' final log-sum-exp,
    /// dS = P ⊙ (dP − dO·O) per row; a self-only position passes dO straight to its value.
    /// </summary>
    [MethodImpl(Hot)]
    private static void BackwardMergedHead<TS, TV>(in GroupedArgs a, int bh, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, perRound = a.Groups / a.Rounds;
        var h = new Head(a, bh);
        float* q = h.Q, k = h.K;
        long* queryIndex = h.QueryIndex, keyIndex = h.KeyIndex;
        byte* keyMask = h.KeyMask;
        float* dOut = (float*)a.DO + (long)bh * T * Dv, o = (float*)a.O + (long)bh * T * Dv, lse = (float*)a.PositionLse + (long)bh * T;
        float* dq = (float*)a.DQ + (long)bh * T * D, dk = (float*)a.DK + (long)bh * T * D, dv = (float*)a.DV + (long)bh * T * Dv;
        new Span<float>(dq, T * D).Clear();
        new Span<float>(dk, T * D).Clear();
        new Span<float>(dv, T * Dv).Clear();
        ClearTableGradients(a, bh);
        float* delta = x.PosSum;
        for (int t = 0; t < T; t++)
        {
            delta[t] = Tile<TS, TV>.Dot(dOut + (long)t * Dv, o + (long)t * Dv, Dv);
            if (float.IsPositiveInfinity(lse[t]) && a.SharedQk && (keyMask == null || keyMask[t] != 0))
            {
                Tile<TS, TV>.AddTo(dv + (long)t * Dv, dOut + (long)t * Dv, Dv);             // self-only: O = v (+ aⱽ at distance 0)
                if (a.DRelValue != 0) Tile<TS, TV>.AddTo((float*)a.DRelValue + ((long)bh * a.RelRows + a.RelRows / 2) * Dv, dOut + (long)t * Dv, Dv);
            }
        }
        PrepareMerged(a, bh, queryIndex, keyIndex, x);
        Permute<TS, TV>(a, bh, x, backward: true);
        for (int g = 0; g < a.Groups; g++)
        {
            x.Round = g / perRound;
            var (m, n, prev, pn) = ScoreTile<TS, TV>(a, x, bh, g, q, k);
            if (m == 0) continue;
            int* queryPos = x.QPos + x.QOff[g];
            for (int r = 0; r < m; r++)
                new Span<float>(dOut + (long)queryPos[r] * Dv, Dv).CopyTo(new Span<float>(x.DOg + (long)r * Dv, Dv));
            BackwardTile<TS, TV>(a, x, bh, g, m, n, prev, pn, dq, lse, queryPos, delta);
        }
        UnpermuteKeyGradients<TS, TV>(a, x, dk, dv);
        if (a.DRelKey != 0) Tile<TS, TV>.Scale((float*)a.DRelKey + (long)bh * a.RelRows * D, (long)a.RelRows * D, a.Scale);
    }
}
