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
    public nint O, GroupOut, Lse;    // (B, H, T, Dv); per slot (B, H, G, Wq, Dv) and (B, H, G, Wq)
    public nint DO, DQ, DK, DV;      // backward
}

/// <summary>
/// Fused attention inside content-based groups (routing clusters, LSH chunks) on raw float32 CPU
/// memory, with the rules of <see cref="GroupedAttention"/> (causal on original positions, shared-QK
/// self-attention only as a last resort, key mask, look-back to the previous group, mean over the
/// groups a query joined). Rows are read by index into small tiles instead of gathering copies of
/// the whole sequence. One task per (batch, head) walks its groups in order, so accumulation by
/// index never races and results do not depend on the thread count.
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
        public readonly int* KeyKey;
        private readonly void* memory;

        public Scratch(int wq, int n, int dim, int dimV, int seqLen)
        {
            int w = Math.Max(dim, dimV);
            long q = (long)wq * w, kv = (long)n * w, s = (long)wq * n;
            long floats = 3 * q + 5 * kv + 5 * s + seqLen;
            memory = NativeMemory.AlignedAlloc((nuint)(floats * sizeof(float) + n * sizeof(long) + n * sizeof(int)), 64);
            float* p = (float*)memory;
            Q = p; p += q; KT = p; p += kv; K = p; p += kv; VT = p; p += kv; V = p; p += kv;
            S = p; p += s; P = p; p += s; PT = p; p += s; DST = p; p += s; DOg = p; p += q; DQ = p; p += q;
            DKV = p; p += kv + s; Count = p; p += seqLen;
            KeyPos = (long*)p;
            KeyKey = (int*)(KeyPos + n);
        }

        public void Dispose() => NativeMemory.AlignedFree(memory);
    }

    private static void Run<TS, TV>(GroupedArgs a, bool backward) where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int n = a.LookBackward ? 2 * a.KeySlots : a.KeySlots;
        Parallel.For(0, a.Batch * a.Heads, new ParallelOptions { MaxDegreeOfParallelism = Math.Max(1, a.Threads) },
            () => new Scratch(a.QuerySlots, n, a.Dim, a.DimV, a.SeqLen),
            [MethodImpl(MethodImplOptions.AggressiveOptimization)] (bh, _, scratch) =>
            {
                if (backward) BackwardHead<TS, TV>(a, bh, n, scratch); else ForwardHead<TS, TV>(a, bh, n, scratch);
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

    /// <summary>Key slot positions of group g (previous group's first with look-back), −1 = none.</summary>
    private static void KeyPositions(in GroupedArgs a, long* keyIndex, int g, long* keyPos)
    {
        int wk = a.KeySlots, j = 0;
        if (a.LookBackward)
        {
            for (int s = 0; s < wk; s++) keyPos[j++] = g > 0 ? keyIndex[(long)(g - 1) * wk + s] : -1;
        }
        for (int s = 0; s < wk; s++) keyPos[j++] = keyIndex[(long)g * wk + s];
    }

    /// <summary>
    /// Scores of one group in the scratch S tile (Wq × n): scale·q·k where allowed, −∞ elsewhere,
    /// with the shared-QK rule (self only when nothing else is allowed) applied per row.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Scores<TS, TV>(in GroupedArgs a, long* queryPos, long* keyPos, int n, byte* keyMask, Scratch x)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        int wq = a.QuerySlots;
        Tile<TS, TV>.Gemm(wq, n, a.Dim, x.Q, a.Dim, x.KT, n, x.S, n, accumulate: false);      // (Wq, n)
        // Key slots that may be attended at all hold their position; empty or padded slots hold int.MaxValue,
        // which is never ≤ nor equal to a query position.
        int* key = x.KeyKey;
        for (int j = 0; j < n; j++)
        {
            long kp = keyPos[j];
            key[j] = kp >= 0 && (keyMask == null || keyMask[kp] != 0) ? (int)kp : int.MaxValue;
        }
        for (int i = 0; i < wq; i++)
        {
            float* si = x.S + (long)i * n;
            long qp = queryPos[i];
            if (qp < 0) { new Span<float>(si, n).Fill(float.NegativeInfinity); continue; }
            bool other, self;
            if (Vector512.IsHardwareAccelerated) MaskRow512(si, key, n, (int)qp, a.Causal, a.SharedQk, a.Scale, out other, out self);
            else MaskRowScalar(si, key, 0, n, (int)qp, a.Causal, a.SharedQk, a.Scale, out other, out self);
            if (self && !other)
            {
                // Nothing else is allowed: the query may attend itself (score recomputed for those slots).
                for (int j = 0; j < n; j++)
                    if (key[j] == qp)
                        si[j] = Tile<TS, TV>.Dot(x.Q + (long)i * a.Dim, x.K + (long)j * a.Dim, a.Dim) * a.Scale;
            }
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

    /// <summary>Gathers the group's query rows (Q), key rows (K and Kᵀ) and value rows (V and Vᵀ); empty slots are zero.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Gather(in GroupedArgs a, float* q, float* k, float* v, long* queryPos, long* keyPos, int n, Scratch x, bool transposedValues)
    {
        int D = a.Dim, Dv = a.DimV;
        for (int i = 0; i < a.QuerySlots; i++)
        {
            var row = new Span<float>(x.Q + (long)i * D, D);
            if (queryPos[i] >= 0) new Span<float>(q + queryPos[i] * D, D).CopyTo(row); else row.Clear();
        }
        for (int j = 0; j < n; j++)
        {
            var kRow = new Span<float>(x.K + (long)j * D, D);
            var vRow = new Span<float>(x.V + (long)j * Dv, Dv);
            if (keyPos[j] >= 0)
            {
                new Span<float>(k + keyPos[j] * D, D).CopyTo(kRow);
                new Span<float>(v + keyPos[j] * Dv, Dv).CopyTo(vRow);
            }
            else { kRow.Clear(); vRow.Clear(); }
            for (int d = 0; d < D; d++) x.KT[(long)d * n + j] = x.K[(long)j * D + d];
            if (transposedValues) for (int d = 0; d < Dv; d++) x.VT[(long)d * n + j] = x.V[(long)j * Dv + d];
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
            KeyPositions(a, keyIndex, g, x.KeyPos);
            Gather(a, q, k, v, queryPos, x.KeyPos, n, x, transposedValues: false);
            Scores<TS, TV>(a, queryPos, x.KeyPos, n, keyMask, x);
            float* lse = (float*)a.Lse + ((long)bh * a.Groups + g) * wq;
            float* groupOut = (float*)a.GroupOut + ((long)bh * a.Groups + g) * wq * Dv;
            for (int i = 0; i < wq; i++)
            {
                float* si = x.S + (long)i * n;
                float m = Tile<TS, TV>.Max(si, n);
                if (float.IsNegativeInfinity(m)) { new Span<float>(si, n).Clear(); lse[i] = float.PositiveInfinity; continue; }
                float sum = Tile<TS, TV>.ExpShiftSum(si, n, m);
                Tile<TS, TV>.Scale(si, n, 1f / sum);
                lse[i] = m + MathF.Log(sum);
            }
            Tile<TS, TV>.Gemm(wq, Dv, n, x.S, n, x.V, Dv, groupOut, Dv, accumulate: false);    // (Wq, Dv)
            for (int i = 0; i < wq; i++)
            {
                long p = queryPos[i];
                if (p < 0) { new Span<float>(groupOut + (long)i * Dv, Dv).Clear(); continue; }
                Tile<TS, TV>.AddTo(o + p * Dv, groupOut + (long)i * Dv, Dv);
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
            Gather(a, q, k, v, queryPos, x.KeyPos, n, x, transposedValues: true);
            Scores<TS, TV>(a, queryPos, x.KeyPos, n, keyMask, x);
            float* lse = (float*)a.Lse + ((long)bh * a.Groups + g) * wq;
            float* groupOut = (float*)a.GroupOut + ((long)bh * a.Groups + g) * wq * Dv;
            // dO of each slot = dOut at its position / number of slots holding that position.
            for (int i = 0; i < wq; i++)
            {
                var row = new Span<float>(x.DOg + (long)i * Dv, Dv);
                long p = queryPos[i];
                if (p < 0) { row.Clear(); continue; }
                new Span<float>(dOut + p * Dv, Dv).CopyTo(row);
                Tile<TS, TV>.Scale(x.DOg + (long)i * Dv, Dv, 1f / x.Count[p]);
            }
            Tile<TS, TV>.Gemm(wq, n, Dv, x.DOg, Dv, x.VT, n, x.P, n, accumulate: false);         // dP = dO·Vᵀ (Wq, n)
            for (int i = 0; i < wq; i++)
            {
                float* si = x.S + (long)i * n;
                Tile<TS, TV>.ExpShiftSum(si, n, lse[i]);                                          // P = exp(S − lse)
                float delta = Tile<TS, TV>.Dot(x.DOg + (long)i * Dv, groupOut + (long)i * Dv, Dv);
                Tile<TS, TV>.SoftmaxGrad(si, x.P + (long)i * n, n, delta);                        // dS in P
            }
            Tile<TS, TV>.Gemm(wq, D, n, x.P, n, x.K, D, x.DQ, D, accumulate: false);             // dQ = dS·K (Wq, D)
            for (int i = 0; i < wq; i++)
                if (queryPos[i] >= 0)
                {
                    Tile<TS, TV>.Scale(x.DQ + (long)i * D, D, a.Scale);
                    Tile<TS, TV>.AddTo(dq + queryPos[i] * D, x.DQ + (long)i * D, D);
                }
            // Key side: transpose P and dS (Wq × n → n × Wq) and multiply with dO and Q.
            float* pT = x.PT, dsT = x.DST;
            Transpose(x.S, wq, n, pT);
            Transpose(x.P, wq, n, dsT);
            Tile<TS, TV>.Gemm(n, Dv, wq, pT, wq, x.DOg, Dv, dvPart, Dv, accumulate: false);      // dV = Pᵀ·dO (n, Dv)
            ScatterKeys<TS, TV>(x.KeyPos, n, keyMask, dvPart, Dv, dv, 1f);
            Tile<TS, TV>.Gemm(n, D, wq, dsT, wq, x.Q, D, dkPart, D, accumulate: false);          // dK = dSᵀ·Q (n, D)
            ScatterKeys<TS, TV>(x.KeyPos, n, keyMask, dkPart, D, dk, a.Scale);
        }
    }

    /// <summary>Adds each key slot's row (times <paramref name="scale"/>) to its position; empty and padded slots get nothing.</summary>
    private static void ScatterKeys<TS, TV>(long* keyPos, int n, byte* keyMask, float* rows, int width, float* target, float scale)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        for (int j = 0; j < n; j++)
        {
            long p = keyPos[j];
            if (p < 0 || (keyMask != null && keyMask[p] == 0)) continue;
            if (scale != 1f) Tile<TS, TV>.Scale(rows + (long)j * width, width, scale);
            Tile<TS, TV>.AddTo(target + p * width, rows + (long)j * width, width);
        }
    }

    private static void Transpose(float* src, int rows, int cols, float* dst)
    {
        for (int i = 0; i < rows; i++)
            for (int j = 0; j < cols; j++) dst[(long)j * rows + i] = src[(long)i * cols + j];
    }
}
