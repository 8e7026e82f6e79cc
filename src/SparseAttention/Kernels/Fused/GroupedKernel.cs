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
    public nint Q, K, V;             // (B, H, T, D), (B, H, T, D), (B, H, T, Dv); padded keys already zero
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
}

/// <summary>
/// Fused attention inside content-based groups (routing clusters, LSH chunks) on raw float32 CPU
/// memory, with the rules of <see cref="GroupedAttention"/> (causal on original positions, shared-QK
/// self-attention only as a last resort, key mask, look-back to the previous group, mean over the
/// groups a query joined). Rows are read by index into small tiles instead of gathering copies of
/// the whole sequence. One task per (batch, head) walks its groups in order, so accumulation by
/// index never races and results do not depend on the thread count.
/// Merged mode (<see cref="GroupedArgs.Rounds"/> &gt; 0, LSH rounds): instead of the mean over groups, each position
/// keeps a running max and sum over every row it gets in any group (online softmax across groups), look-back follows
/// explicit previous-group links, optional labels and exact de-duplication apply per pair, and the backward uses the
/// positions' final log-sum-exp.
/// </summary>
internal static unsafe class GroupedKernel
{
    public static void Forward(in GroupedArgs args)
    {
        if (Vector512.IsHardwareAccelerated) Run<Simd512, Vector512<float>>(args, backward: false);
        else if (Vector256.IsHardwareAccelerated) Run<Simd256, Vector256<float>>(args, backward: false);
        else Run<SimdScalar, float>(args, backward: false);
    }

    public static void Backward(in GroupedArgs args)
    {
        if (Vector512.IsHardwareAccelerated) Run<Simd512, Vector512<float>>(args, backward: true);
        else if (Vector256.IsHardwareAccelerated) Run<Simd256, Vector256<float>>(args, backward: true);
        else Run<SimdScalar, float>(args, backward: true);
    }

    /// <summary>Per-thread tiles sized for one group: Wq query slots × n key slots.</summary>
    private sealed class Scratch : IDisposable
    {
        public readonly float* Q, KT, K, VT, V, S, P, PT, DST, DOg, DQ, DKV, Count;
        public readonly long* KeyPos;
        public readonly int* KeyKey, QSlot;
        public readonly float* PosMax, PosSum;   // merged mode: per position running max and sum (T each)
        public readonly int* QueryGroup, KeyGroup; // merged mode with dedup: group of each position per round (R·T each)
        // Merged mode, set per (batch, head) and group: labels (R·T) or null, look-back links (G), the group's round.
        public long* QueryLabels, KeyLabels, PreviousGroup;
        public int Round;
        private readonly void* memory;

        public Scratch(int wq, int n, int dim, int dimV, int seqLen, int rounds = 0)
        {
            int w = Math.Max(dim, dimV);
            long q = (long)wq * w, kv = (long)n * w, s = (long)wq * n;
            long floats = 3 * q + 5 * kv + 5 * s + seqLen + (rounds > 0 ? 2L * seqLen : 0);
            long ints = n + wq + 2L * rounds * seqLen;
            memory = NativeMemory.AlignedAlloc((nuint)(floats * sizeof(float) + n * sizeof(long) + ints * sizeof(int)), 64);
            float* p = (float*)memory;
            Q = p; p += q; KT = p; p += kv; K = p; p += kv; VT = p; p += kv; V = p; p += kv;
            S = p; p += s; P = p; p += s; PT = p; p += s; DST = p; p += s; DOg = p; p += q; DQ = p; p += q;
            DKV = p; p += kv + s; Count = p; p += seqLen;
            if (rounds > 0) { PosMax = p; p += seqLen; PosSum = p; p += seqLen; }
            KeyPos = (long*)p;
            KeyKey = (int*)(KeyPos + n);
            QSlot = KeyKey + n;
            QueryGroup = QSlot + wq;
            KeyGroup = QueryGroup + (long)rounds * seqLen;
        }

        public void Dispose() => NativeMemory.AlignedFree(memory);
    }

    private static void Run<TS, TV>(GroupedArgs a, bool backward) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int n = a.LookBackward ? 2 * a.KeySlots : a.KeySlots;
        Parallel.For(0, a.Batch * a.Heads, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, a.Threads) },
            () => new Scratch(a.QuerySlots, n, a.Dim, a.DimV, a.SeqLen, a.Rounds),
            [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh, _, scratch) =>
            {
                if (a.Rounds > 0)
                {
                    if (backward) BackwardMergedHead<TS, TV>(a, bh, n, scratch); else ForwardMergedHead<TS, TV>(a, bh, n, scratch);
                }
                else if (backward) BackwardHead<TS, TV>(a, bh, n, scratch); else ForwardHead<TS, TV>(a, bh, n, scratch);
                return scratch;
            },
            scratch => scratch.Dispose());
    }

    /// <summary>How many valid query slots hold each position of this (batch, head).</summary>
    private static void CountSlots(in GroupedArgs a, long* queryIndex, float* count)
    {
        new Span<float>(count, a.SeqLen).Clear();
        long slots = (long)a.Groups * a.QuerySlots;
        for (long i = 0; i < slots; i++) if (queryIndex[i] >= 0) count[queryIndex[i]] += 1f;
    }

    /// <summary>Key slot positions of group g (previous group's first with look-back), −1 = none. The previous group
    /// is g − 1, or previousGroup[g] when given (merged mode).</summary>
    private static void KeyPositions(in GroupedArgs a, long* keyIndex, int g, long* keyPos, long* previousGroup = null)
    {
        int wk = a.KeySlots, j = 0;
        if (a.LookBackward)
        {
            long prev = previousGroup != null ? previousGroup[g] : g - 1;
            for (int s = 0; s < wk; s++) keyPos[j++] = prev >= 0 ? keyIndex[prev * wk + s] : -1;
        }
        for (int s = 0; s < wk; s++) keyPos[j++] = keyIndex[(long)g * wk + s];
    }

    /// <summary>
    /// Compacts group g: the m query slots holding a position (slot numbers in QSlot) and the nk key slots that may
    /// be attended at all — not empty, not padded — (their positions in KeyKey, slot order kept). Empty query slots
    /// have no output and other key slots are never allowed, so the group's tiles only need these rows.
    /// </summary>
    private static (int M, int Nk) Compact(in GroupedArgs a, long* queryPos, long* keyPos, int n, byte* keyMask, Scratch x)
    {
        int m = 0, nk = 0;
        for (int i = 0; i < a.QuerySlots; i++) if (queryPos[i] >= 0) x.QSlot[m++] = i;
        for (int j = 0; j < n; j++)
        {
            long kp = keyPos[j];
            if (kp >= 0 && (keyMask == null || keyMask[kp] != 0)) x.KeyKey[nk++] = (int)kp;
        }
        return (m, nk);
    }

    /// <summary>
    /// Scores of one compacted group in the scratch S tile (m × nk): scale·q·k where allowed, −∞ elsewhere,
    /// with the shared-QK rule (self only when nothing else is allowed) applied per row.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Scores<TS, TV>(in GroupedArgs a, long* queryPos, int m, int nk, Scratch x)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        Tile<TS, TV>.Gemm(m, nk, a.Dim, x.Q, a.Dim, x.KT, nk, x.S, nk, accumulate: false);     // (m, nk)
        int* key = x.KeyKey;
        for (int r = 0; r < m; r++)
        {
            float* si = x.S + (long)r * nk;
            int qp = (int)queryPos[x.QSlot[r]];
            bool other, self;
            if (Vector512.IsHardwareAccelerated) MaskRow512(si, key, nk, qp, a.Causal, a.SharedQk, a.Scale, out other, out self);
            else MaskRowScalar(si, key, 0, nk, qp, a.Causal, a.SharedQk, a.Scale, out other, out self);
            if (a.Rounds > 0) { MergedRules(a, si, key, nk, qp, x); continue; }             // merged mode: self handled per position
            if (self && !other)
            {
                // Nothing else is allowed: the query may attend itself (score recomputed for those slots).
                for (int j = 0; j < nk; j++)
                    if (key[j] == qp)
                        si[j] = Tile<TS, TV>.Dot(x.Q + (long)r * a.Dim, x.K + (long)j * a.Dim, a.Dim) * a.Scale;
            }
        }
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

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
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

    /// <summary>Gathers the compacted group's query rows (Q), key rows (K and Kᵀ) and value rows (V and, if asked, Vᵀ).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Gather(in GroupedArgs a, float* q, float* k, float* v, long* queryPos, int m, int nk, Scratch x, bool transposedValues)
    {
        int D = a.Dim, Dv = a.DimV;
        for (int r = 0; r < m; r++)
            new Span<float>(q + queryPos[x.QSlot[r]] * D, D).CopyTo(new Span<float>(x.Q + (long)r * D, D));
        for (int j = 0; j < nk; j++)
        {
            long p = x.KeyKey[j];
            float* kRow = x.K + (long)j * D, vRow = x.V + (long)j * Dv;
            new Span<float>(k + p * D, D).CopyTo(new Span<float>(kRow, D));
            new Span<float>(v + p * Dv, Dv).CopyTo(new Span<float>(vRow, Dv));
            for (int d = 0; d < D; d++) x.KT[(long)d * nk + j] = kRow[d];
            if (transposedValues) for (int d = 0; d < Dv; d++) x.VT[(long)d * nk + j] = vRow[d];
        }
    }

    private static void ForwardHead<TS, TV>(in GroupedArgs a, int bh, int n, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, wq = a.QuerySlots, b = bh / a.Heads;
        float* q = (float*)a.Q + (long)bh * T * D, k = (float*)a.K + (long)bh * T * D, v = (float*)a.V + (long)bh * T * Dv;
        long* queryIndex = (long*)a.QueryIndex + (long)bh * a.Groups * wq;
        long* keyIndex = (long*)a.KeyIndex + (long)bh * a.Groups * a.KeySlots;
        byte* keyMask = a.KeyMask == 0 ? null : (byte*)a.KeyMask + (long)b * T;
        float* o = (float*)a.O + (long)bh * T * Dv;
        new Span<float>(o, T * Dv).Clear();
        CountSlots(a, queryIndex, x.Count);
        for (int g = 0; g < a.Groups; g++)
        {
            long* queryPos = queryIndex + (long)g * wq;
            float* lse = (float*)a.Lse + ((long)bh * a.Groups + g) * wq;
            new Span<float>(lse, wq).Fill(float.PositiveInfinity);                              // empty slots: no key, zero output
            KeyPositions(a, keyIndex, g, x.KeyPos);
            var (m, nk) = Compact(a, queryPos, x.KeyPos, n, keyMask, x);
            if (m == 0 || nk == 0) continue;
            Gather(a, q, k, v, queryPos, m, nk, x, transposedValues: false);
            Scores<TS, TV>(a, queryPos, m, nk, x);
            for (int r = 0; r < m; r++)
            {
                float* si = x.S + (long)r * nk;
                float mx = Tile<TS, TV>.Max(si, nk);
                if (float.IsNegativeInfinity(mx)) { new Span<float>(si, nk).Clear(); continue; }
                float sum = Tile<TS, TV>.ExpShiftSum(si, nk, mx);
                Tile<TS, TV>.Scale(si, nk, 1f / sum);
                lse[x.QSlot[r]] = mx + MathF.Log(sum);
            }
            Tile<TS, TV>.Gemm(m, Dv, nk, x.S, nk, x.V, Dv, x.DOg, Dv, accumulate: false);       // (m, Dv)
            for (int r = 0; r < m; r++)
            {
                Tile<TS, TV>.AddTo(o + queryPos[x.QSlot[r]] * Dv, x.DOg + (long)r * Dv, Dv);
            }
        }
        for (int t = 0; t < T; t++)
            if (x.Count[t] > 1f) Tile<TS, TV>.Scale(o + (long)t * Dv, Dv, 1f / x.Count[t]);     // mean over groups
    }

    private static void BackwardHead<TS, TV>(in GroupedArgs a, int bh, int n, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, wq = a.QuerySlots, b = bh / a.Heads;
        float* q = (float*)a.Q + (long)bh * T * D, k = (float*)a.K + (long)bh * T * D, v = (float*)a.V + (long)bh * T * Dv;
        long* queryIndex = (long*)a.QueryIndex + (long)bh * a.Groups * wq;
        long* keyIndex = (long*)a.KeyIndex + (long)bh * a.Groups * a.KeySlots;
        byte* keyMask = a.KeyMask == 0 ? null : (byte*)a.KeyMask + (long)b * T;
        float* dOut = (float*)a.DO + (long)bh * T * Dv;
        float* dq = (float*)a.DQ + (long)bh * T * D, dk = (float*)a.DK + (long)bh * T * D, dv = (float*)a.DV + (long)bh * T * Dv;
        new Span<float>(dq, T * D).Clear();
        new Span<float>(dk, T * D).Clear();
        new Span<float>(dv, T * Dv).Clear();
        CountSlots(a, queryIndex, x.Count);
        float* dkPart = x.DKV, dvPart = x.DKV;   // used one after the other
        for (int g = 0; g < a.Groups; g++)
        {
            long* queryPos = queryIndex + (long)g * wq;
            KeyPositions(a, keyIndex, g, x.KeyPos);
            var (m, nk) = Compact(a, queryPos, x.KeyPos, n, keyMask, x);
            if (m == 0 || nk == 0) continue;                                                    // no allowed pair: no gradient
            Gather(a, q, k, v, queryPos, m, nk, x, transposedValues: true);
            Scores<TS, TV>(a, queryPos, m, nk, x);
            float* lse = (float*)a.Lse + ((long)bh * a.Groups + g) * wq;
            // dO of each slot = dOut at its position / number of slots holding that position.
            for (int r = 0; r < m; r++)
            {
                long p = queryPos[x.QSlot[r]];
                new Span<float>(dOut + p * Dv, Dv).CopyTo(new Span<float>(x.DOg + (long)r * Dv, Dv));
                Tile<TS, TV>.Scale(x.DOg + (long)r * Dv, Dv, 1f / x.Count[p]);
            }
            Tile<TS, TV>.Gemm(m, nk, Dv, x.DOg, Dv, x.VT, nk, x.P, nk, accumulate: false);      // dP = dO·Vᵀ (m, nk)
            for (int r = 0; r < m; r++)
                Tile<TS, TV>.ExpShiftSum(x.S + (long)r * nk, nk, lse[x.QSlot[r]]);                // P = exp(S − lse)
            // The slots' outputs O = P·V (for delta = dO·O), recomputed into DQ (m × Dv) rather than kept from the forward.
            Tile<TS, TV>.Gemm(m, Dv, nk, x.S, nk, x.V, Dv, x.DQ, Dv, accumulate: false);
            for (int r = 0; r < m; r++)
            {
                float delta = Tile<TS, TV>.Dot(x.DOg + (long)r * Dv, x.DQ + (long)r * Dv, Dv);
                Tile<TS, TV>.SoftmaxGrad(x.S + (long)r * nk, x.P + (long)r * nk, nk, delta);      // dS in P
            }
            Tile<TS, TV>.Gemm(m, D, nk, x.P, nk, x.K, D, x.DQ, D, accumulate: false);           // dQ = dS·K (m, D)
            for (int r = 0; r < m; r++)
            {
                Tile<TS, TV>.Scale(x.DQ + (long)r * D, D, a.Scale);
                Tile<TS, TV>.AddTo(dq + queryPos[x.QSlot[r]] * D, x.DQ + (long)r * D, D);
            }
            // Key side: transpose P and dS (m × nk → nk × m) and multiply with dO and Q.
            float* pT = x.PT, dsT = x.DST;
            Transpose(x.S, m, nk, pT);
            Transpose(x.P, m, nk, dsT);
            Tile<TS, TV>.Gemm(nk, Dv, m, pT, m, x.DOg, Dv, dvPart, Dv, accumulate: false);      // dV = Pᵀ·dO (nk, Dv)
            ScatterKeys<TS, TV>(x.KeyKey, nk, dvPart, Dv, dv, 1f);
            Tile<TS, TV>.Gemm(nk, D, m, dsT, m, x.Q, D, dkPart, D, accumulate: false);          // dK = dSᵀ·Q (nk, D)
            ScatterKeys<TS, TV>(x.KeyKey, nk, dkPart, D, dk, a.Scale);
        }
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
    private static void ForwardMergedHead<TS, TV>(in GroupedArgs a, int bh, int n, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, wq = a.QuerySlots, b = bh / a.Heads, perRound = a.Groups / a.Rounds;
        float* q = (float*)a.Q + (long)bh * T * D, k = (float*)a.K + (long)bh * T * D, v = (float*)a.V + (long)bh * T * Dv;
        long* queryIndex = (long*)a.QueryIndex + (long)bh * a.Groups * wq;
        long* keyIndex = (long*)a.KeyIndex + (long)bh * a.Groups * a.KeySlots;
        byte* keyMask = a.KeyMask == 0 ? null : (byte*)a.KeyMask + (long)b * T;
        float* o = (float*)a.O + (long)bh * T * Dv, lse = (float*)a.PositionLse + (long)bh * T;
        new Span<float>(o, T * Dv).Clear();
        new Span<float>(x.PosMax, T).Fill(float.NegativeInfinity);
        new Span<float>(x.PosSum, T).Clear();
        PrepareMerged(a, bh, queryIndex, keyIndex, x);
        for (int g = 0; g < a.Groups; g++)
        {
            long* queryPos = queryIndex + (long)g * wq;
            x.Round = g / perRound;
            KeyPositions(a, keyIndex, g, x.KeyPos, x.PreviousGroup);
            var (m, nk) = Compact(a, queryPos, x.KeyPos, n, keyMask, x);
            if (m == 0 || nk == 0) continue;
            Gather(a, q, k, v, queryPos, m, nk, x, transposedValues: false);
            Scores<TS, TV>(a, queryPos, m, nk, x);
            for (int r = 0; r < m; r++)
            {
                float* si = x.S + (long)r * nk;
                long p = queryPos[x.QSlot[r]];
                float mx = Tile<TS, TV>.Max(si, nk);
                if (float.IsNegativeInfinity(mx)) { new Span<float>(si, nk).Clear(); continue; }
                float old = x.PosMax[p];
                if (mx > old)
                {
                    if (x.PosSum[p] > 0)
                    {
                        float alpha = MathF.Exp(old - mx);
                        x.PosSum[p] *= alpha;
                        Tile<TS, TV>.Scale(o + p * Dv, Dv, alpha);
                    }
                    x.PosMax[p] = mx;
                }
                x.PosSum[p] += Tile<TS, TV>.ExpShiftSum(si, nk, x.PosMax[p]);                    // row ← exp(s − max so far)
            }
            Tile<TS, TV>.Gemm(m, Dv, nk, x.S, nk, x.V, Dv, x.DOg, Dv, accumulate: false);       // (m, Dv)
            for (int r = 0; r < m; r++) Tile<TS, TV>.AddTo(o + queryPos[x.QSlot[r]] * Dv, x.DOg + (long)r * Dv, Dv);
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
                    new Span<float>(v + (long)t * Dv, Dv).CopyTo(new Span<float>(o + (long)t * Dv, Dv));   // self, the last resort
            }
        }
    }

    /// <summary>
    /// Merged mode backward for one (batch, head): P = exp(s − lse[position]) with the positions' final log-sum-exp,
    /// dS = P ⊙ (dP − dO·O) per row; a self-only position passes dO straight to its value.
    /// </summary>
    private static void BackwardMergedHead<TS, TV>(in GroupedArgs a, int bh, int n, Scratch x) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int T = a.SeqLen, D = a.Dim, Dv = a.DimV, wq = a.QuerySlots, b = bh / a.Heads, perRound = a.Groups / a.Rounds;
        float* q = (float*)a.Q + (long)bh * T * D, k = (float*)a.K + (long)bh * T * D, v = (float*)a.V + (long)bh * T * Dv;
        long* queryIndex = (long*)a.QueryIndex + (long)bh * a.Groups * wq;
        long* keyIndex = (long*)a.KeyIndex + (long)bh * a.Groups * a.KeySlots;
        byte* keyMask = a.KeyMask == 0 ? null : (byte*)a.KeyMask + (long)b * T;
        float* dOut = (float*)a.DO + (long)bh * T * Dv, o = (float*)a.O + (long)bh * T * Dv, lse = (float*)a.PositionLse + (long)bh * T;
        float* dq = (float*)a.DQ + (long)bh * T * D, dk = (float*)a.DK + (long)bh * T * D, dv = (float*)a.DV + (long)bh * T * Dv;
        new Span<float>(dq, T * D).Clear();
        new Span<float>(dk, T * D).Clear();
        new Span<float>(dv, T * Dv).Clear();
        float* delta = x.PosSum;
        for (int t = 0; t < T; t++)
        {
            delta[t] = Tile<TS, TV>.Dot(dOut + (long)t * Dv, o + (long)t * Dv, Dv);
            if (float.IsPositiveInfinity(lse[t]) && a.SharedQk && (keyMask == null || keyMask[t] != 0))
                Tile<TS, TV>.AddTo(dv + (long)t * Dv, dOut + (long)t * Dv, Dv);             // self-only: O = v
        }
        PrepareMerged(a, bh, queryIndex, keyIndex, x);
        float* dkPart = x.DKV, dvPart = x.DKV;   // used one after the other
        for (int g = 0; g < a.Groups; g++)
        {
            long* queryPos = queryIndex + (long)g * wq;
            x.Round = g / perRound;
            KeyPositions(a, keyIndex, g, x.KeyPos, x.PreviousGroup);
            var (m, nk) = Compact(a, queryPos, x.KeyPos, n, keyMask, x);
            if (m == 0 || nk == 0) continue;
            Gather(a, q, k, v, queryPos, m, nk, x, transposedValues: true);
            Scores<TS, TV>(a, queryPos, m, nk, x);
            for (int r = 0; r < m; r++)
            {
                long p = queryPos[x.QSlot[r]];
                new Span<float>(dOut + p * Dv, Dv).CopyTo(new Span<float>(x.DOg + (long)r * Dv, Dv));
            }
            Tile<TS, TV>.Gemm(m, nk, Dv, x.DOg, Dv, x.VT, nk, x.P, nk, accumulate: false);      // dP = dO·Vᵀ (m, nk)
            for (int r = 0; r < m; r++)
            {
                long p = queryPos[x.QSlot[r]];
                Tile<TS, TV>.ExpShiftSum(x.S + (long)r * nk, nk, lse[p]);                        // P = exp(S − lse), 0 if lse = +∞
                Tile<TS, TV>.SoftmaxGrad(x.S + (long)r * nk, x.P + (long)r * nk, nk, delta[p]);   // dS in P
            }
            Tile<TS, TV>.Gemm(m, D, nk, x.P, nk, x.K, D, x.DQ, D, accumulate: false);           // dQ = dS·K (m, D)
            for (int r = 0; r < m; r++)
            {
                Tile<TS, TV>.Scale(x.DQ + (long)r * D, D, a.Scale);
                Tile<TS, TV>.AddTo(dq + queryPos[x.QSlot[r]] * D, x.DQ + (long)r * D, D);
            }
            Transpose(x.S, m, nk, x.PT);
            Transpose(x.P, m, nk, x.DST);
            Tile<TS, TV>.Gemm(nk, Dv, m, x.PT, m, x.DOg, Dv, dvPart, Dv, accumulate: false);    // dV = Pᵀ·dO (nk, Dv)
            ScatterKeys<TS, TV>(x.KeyKey, nk, dvPart, Dv, dv, 1f);
            Tile<TS, TV>.Gemm(nk, D, m, x.DST, m, x.Q, D, dkPart, D, accumulate: false);        // dK = dSᵀ·Q (nk, D)
            ScatterKeys<TS, TV>(x.KeyKey, nk, dkPart, D, dk, a.Scale);
        }
    }

    /// <summary>Adds each compacted key's row (times <paramref name="scale"/>) to its position.</summary>
    private static void ScatterKeys<TS, TV>(int* keyPos, int nk, float* rows, int width, float* target, float scale)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        for (int j = 0; j < nk; j++)
        {
            if (scale != 1f) Tile<TS, TV>.Scale(rows + (long)j * width, width, scale);
            Tile<TS, TV>.AddTo(target + (long)keyPos[j] * width, rows + (long)j * width, width);
        }
    }

    private static void Transpose(float* src, int rows, int cols, float* dst)
    {
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++) dst[(long)j * rows + i] = src[(long)i * cols + j];
    }
}
