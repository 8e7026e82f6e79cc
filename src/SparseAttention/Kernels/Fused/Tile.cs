using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// Small dense building blocks over raw row-major float memory, generic over the vector width:
/// register-blocked GEMMs (A plain or transposed), an in-register transpose and the row / column
/// operations of an online softmax. Every loop is JIT-compiled fully optimised at once
/// (<see cref="MethodImplOptions.AggressiveOptimization"/>), so the first call is not tier-0 code.
/// </summary>
internal static unsafe class Tile<TS, TV> where TS : struct, ISimd<TV> where TV : unmanaged
{
    private const MethodImplOptions Hot = MethodImplOptions.AggressiveOptimization;
    private const MethodImplOptions Inline = MethodImplOptions.AggressiveInlining;

    /// <summary>C (m×n, row stride ldc) = A (m×k, lda) · B (k×n, ldb); adds to C when <paramref name="accumulate"/>.</summary>
    [MethodImpl(Hot)]
    public static void Gemm(int m, int n, int k, float* a, int lda, float* b, int ldb, float* c, int ldc, bool accumulate) =>
        Kernel(m, n, k, a, lda, 1, b, ldb, c, ldc, accumulate);

    /// <summary>C (m×n, ldc) = Aᵀ · B with A stored as (k×m, row stride lda), B (k×n, ldb); adds to C when
    /// <paramref name="accumulate"/>. Reads A where it lies (Pᵀ·dO, dSᵀ·Q, P·V from Pᵀ) instead of transposing it.</summary>
    [MethodImpl(Hot)]
    public static void GemmTransA(int m, int n, int k, float* a, int lda, float* b, int ldb, float* c, int ldc, bool accumulate) =>
        Kernel(m, n, k, a, 1, lda, b, ldb, c, ldc, accumulate);

    /// <summary>C (+)= A·B where A's element (row r, step p) is a[r·rowStride + p·stepStride].</summary>
    [MethodImpl(Hot)]
    private static void Kernel(int m, int n, int k, float* a, int rowStride, int stepStride, float* b, int ldb, float* c, int ldc, bool accumulate)
    {
        int w = TS.Width, nr = 4 * w;
        int i = 0;
        for (; i + 4 <= m; i += 4)
        {
            float* a0 = a + (long)i * rowStride;
            float* c0 = c + (long)i * ldc;
            int j = 0;
            for (; j + nr <= n; j += nr) Micro4x4(k, a0, rowStride, stepStride, b + j, ldb, c0 + j, ldc, accumulate);
            for (; j + 2 * w <= n; j += 2 * w) Micro4x2(k, a0, rowStride, stepStride, b + j, ldb, c0 + j, ldc, accumulate);
            for (; j + w <= n; j += w) Micro4x1(k, a0, rowStride, stepStride, b + j, ldb, c0 + j, ldc, accumulate);
            for (; j < n; j++)
                for (int r = 0; r < 4; r++) ScalarDot(k, a0 + (long)r * rowStride, stepStride, b + j, ldb, c0 + (long)r * ldc + j, accumulate);
        }
        for (; i < m; i++)
        {
            float* ai = a + (long)i * rowStride, ci = c + (long)i * ldc;
            int j = 0;
            for (; j + w <= n; j += w)
            {
                TV acc = TS.Zero;
                float* bp = b + j;
                long o = 0;
                for (int p = 0; p < k; p++, bp += ldb, o += stepStride) acc = TS.MulAdd(TS.Broadcast(ai[o]), TS.Load(bp), acc);
                Put(ci + j, acc, accumulate);
            }
            for (; j < n; j++) ScalarDot(k, ai, stepStride, b + j, ldb, ci + j, accumulate);
        }
    }

    [MethodImpl(Inline)]
    private static void ScalarDot(int k, float* a, int stepStride, float* b, int ldb, float* c, bool accumulate)
    {
        float s = 0;
        for (int p = 0; p < k; p++) s = MathF.FusedMultiplyAdd(a[(long)p * stepStride], b[(long)p * ldb], s);
        *c = accumulate ? *c + s : s;
    }

    // 4 rows × 4 vectors of C held in 16 registers; each step reads 4 vectors of B and 4 scalars of A.
    [MethodImpl(Hot)]
    private static void Micro4x4(int k, float* a0, int rowStride, int stepStride, float* b, int ldb, float* c0, int ldc, bool accumulate)
    {
        int w = TS.Width;
        float* a1 = a0 + rowStride, a2 = a1 + rowStride, a3 = a2 + rowStride;
        TV c00 = TS.Zero, c01 = TS.Zero, c02 = TS.Zero, c03 = TS.Zero;
        TV c10 = TS.Zero, c11 = TS.Zero, c12 = TS.Zero, c13 = TS.Zero;
        TV c20 = TS.Zero, c21 = TS.Zero, c22 = TS.Zero, c23 = TS.Zero;
        TV c30 = TS.Zero, c31 = TS.Zero, c32 = TS.Zero, c33 = TS.Zero;
        float* bp = b;
        long o = 0;
        for (int p = 0; p < k; p++, bp += ldb, o += stepStride)
        {
            TV b0 = TS.Load(bp), b1 = TS.Load(bp + w), b2 = TS.Load(bp + 2 * w), b3 = TS.Load(bp + 3 * w);
            TV x = TS.Broadcast(a0[o]);
            c00 = TS.MulAdd(x, b0, c00); c01 = TS.MulAdd(x, b1, c01); c02 = TS.MulAdd(x, b2, c02); c03 = TS.MulAdd(x, b3, c03);
            x = TS.Broadcast(a1[o]);
            c10 = TS.MulAdd(x, b0, c10); c11 = TS.MulAdd(x, b1, c11); c12 = TS.MulAdd(x, b2, c12); c13 = TS.MulAdd(x, b3, c13);
            x = TS.Broadcast(a2[o]);
            c20 = TS.MulAdd(x, b0, c20); c21 = TS.MulAdd(x, b1, c21); c22 = TS.MulAdd(x, b2, c22); c23 = TS.MulAdd(x, b3, c23);
            x = TS.Broadcast(a3[o]);
            c30 = TS.MulAdd(x, b0, c30); c31 = TS.MulAdd(x, b1, c31); c32 = TS.MulAdd(x, b2, c32); c33 = TS.MulAdd(x, b3, c33);
        }
        float* c1 = c0 + ldc, c2 = c1 + ldc, c3 = c2 + ldc;
        Put(c0, c00, accumulate); Put(c0 + w, c01, accumulate); Put(c0 + 2 * w, c02, accumulate); Put(c0 + 3 * w, c03, accumulate);
        Put(c1, c10, accumulate); Put(c1 + w, c11, accumulate); Put(c1 + 2 * w, c12, accumulate); Put(c1 + 3 * w, c13, accumulate);
        Put(c2, c20, accumulate); Put(c2 + w, c21, accumulate); Put(c2 + 2 * w, c22, accumulate); Put(c2 + 3 * w, c23, accumulate);
        Put(c3, c30, accumulate); Put(c3 + w, c31, accumulate); Put(c3 + 2 * w, c32, accumulate); Put(c3 + 3 * w, c33, accumulate);
    }

    // 4 rows × 2 vectors: 8 independent FMA chains for narrow heads (e.g. P·V with 32-wide heads at 512 bits), where
    // 4×1's four chains leave the FMA units waiting on latency.
    [MethodImpl(Hot)]
    private static void Micro4x2(int k, float* a0, int rowStride, int stepStride, float* b, int ldb, float* c0, int ldc, bool accumulate)
    {
        int w = TS.Width;
        float* a1 = a0 + rowStride, a2 = a1 + rowStride, a3 = a2 + rowStride;
        TV c00 = TS.Zero, c01 = TS.Zero, c10 = TS.Zero, c11 = TS.Zero, c20 = TS.Zero, c21 = TS.Zero, c30 = TS.Zero, c31 = TS.Zero;
        float* bp = b;
        long o = 0;
        for (int p = 0; p < k; p++, bp += ldb, o += stepStride)
        {
            TV b0 = TS.Load(bp), b1 = TS.Load(bp + w);
            TV x = TS.Broadcast(a0[o]);
            c00 = TS.MulAdd(x, b0, c00); c01 = TS.MulAdd(x, b1, c01);
            x = TS.Broadcast(a1[o]);
            c10 = TS.MulAdd(x, b0, c10); c11 = TS.MulAdd(x, b1, c11);
            x = TS.Broadcast(a2[o]);
            c20 = TS.MulAdd(x, b0, c20); c21 = TS.MulAdd(x, b1, c21);
            x = TS.Broadcast(a3[o]);
            c30 = TS.MulAdd(x, b0, c30); c31 = TS.MulAdd(x, b1, c31);
        }
        float* c1 = c0 + ldc, c2 = c1 + ldc, c3 = c2 + ldc;
        Put(c0, c00, accumulate); Put(c0 + w, c01, accumulate);
        Put(c1, c10, accumulate); Put(c1 + w, c11, accumulate);
        Put(c2, c20, accumulate); Put(c2 + w, c21, accumulate);
        Put(c3, c30, accumulate); Put(c3 + w, c31, accumulate);
    }

    [MethodImpl(Hot)]
    private static void Micro4x1(int k, float* a0, int rowStride, int stepStride, float* b, int ldb, float* c0, int ldc, bool accumulate)
    {
        float* a1 = a0 + rowStride, a2 = a1 + rowStride, a3 = a2 + rowStride;
        TV c00 = TS.Zero, c10 = TS.Zero, c20 = TS.Zero, c30 = TS.Zero;
        float* bp = b;
        long o = 0;
        for (int p = 0; p < k; p++, bp += ldb, o += stepStride)
        {
            TV b0 = TS.Load(bp);
            c00 = TS.MulAdd(TS.Broadcast(a0[o]), b0, c00);
            c10 = TS.MulAdd(TS.Broadcast(a1[o]), b0, c10);
            c20 = TS.MulAdd(TS.Broadcast(a2[o]), b0, c20);
            c30 = TS.MulAdd(TS.Broadcast(a3[o]), b0, c30);
        }
        Put(c0, c00, accumulate); Put(c0 + ldc, c10, accumulate); Put(c0 + 2 * ldc, c20, accumulate); Put(c0 + 3 * ldc, c30, accumulate);
    }

    [MethodImpl(Inline)]
    private static void Put(float* c, TV v, bool accumulate) => TS.Store(c, accumulate ? TS.Add(TS.Load(c), v) : v);

    /// <summary>dst (cols × rows, row stride ldd) = scale · srcᵀ for src (rows × cols, row stride lds):
    /// on the 256/512-bit paths 8×8 blocks transposed in registers (24 shuffles per 64 floats), scalar edges.</summary>
    [MethodImpl(Hot)]
    public static void Transpose(float* src, int rows, int cols, int lds, float* dst, int ldd, float scale)
    {
        int r0 = 0;
        if (TS.Width >= 8 && Avx.IsSupported)                                  // the 128-bit path stays 128-bit (as on ARM64)
        {
            var s = Vector256.Create(scale);
            for (; r0 + 8 <= rows; r0 += 8)
            {
                int c = 0;
                for (; c + 8 <= cols; c += 8) Transpose8x8(src + (long)r0 * lds + c, lds, dst + (long)c * ldd + r0, ldd, s);
                TransposeScalar(src, r0, r0 + 8, c, cols, lds, dst, ldd, scale);
            }
        }
        TransposeScalar(src, r0, rows, 0, cols, lds, dst, ldd, scale);
    }

    [MethodImpl(Inline)]
    private static void TransposeScalar(float* src, int r0, int r1, int c0, int c1, int lds, float* dst, int ldd, float scale)
    {
        for (int c = c0; c < c1; c++)
            for (int r = r0; r < r1; r++) dst[(long)c * ldd + r] = src[(long)r * lds + c] * scale;
    }

    [MethodImpl(Inline)]
    private static void Transpose8x8(float* src, int lds, float* dst, int ldd, Vector256<float> scale)
    {
        // Rows a … h. Unpack pairs rows, shuffle makes 4-row columns per 128-bit lane, permute joins the lanes.
        Vector256<float> a = Avx.LoadVector256(src), b = Avx.LoadVector256(src + lds), c = Avx.LoadVector256(src + 2 * lds), d = Avx.LoadVector256(src + 3 * lds);
        Vector256<float> e = Avx.LoadVector256(src + 4 * lds), f = Avx.LoadVector256(src + 5 * lds), g = Avx.LoadVector256(src + 6 * lds), h = Avx.LoadVector256(src + 7 * lds);
        Vector256<float> ab0 = Avx.UnpackLow(a, b), ab1 = Avx.UnpackHigh(a, b), cd0 = Avx.UnpackLow(c, d), cd1 = Avx.UnpackHigh(c, d);
        Vector256<float> ef0 = Avx.UnpackLow(e, f), ef1 = Avx.UnpackHigh(e, f), gh0 = Avx.UnpackLow(g, h), gh1 = Avx.UnpackHigh(g, h);
        Vector256<float> x0 = Avx.Shuffle(ab0, cd0, 0x44), x1 = Avx.Shuffle(ab0, cd0, 0xEE), x2 = Avx.Shuffle(ab1, cd1, 0x44), x3 = Avx.Shuffle(ab1, cd1, 0xEE);
        Vector256<float> y0 = Avx.Shuffle(ef0, gh0, 0x44), y1 = Avx.Shuffle(ef0, gh0, 0xEE), y2 = Avx.Shuffle(ef1, gh1, 0x44), y3 = Avx.Shuffle(ef1, gh1, 0xEE);
        Avx.Store(dst, Avx.Permute2x128(x0, y0, 0x20) * scale);
        Avx.Store(dst + ldd, Avx.Permute2x128(x1, y1, 0x20) * scale);
        Avx.Store(dst + 2 * ldd, Avx.Permute2x128(x2, y2, 0x20) * scale);
        Avx.Store(dst + 3 * ldd, Avx.Permute2x128(x3, y3, 0x20) * scale);
        Avx.Store(dst + 4 * ldd, Avx.Permute2x128(x0, y0, 0x31) * scale);
        Avx.Store(dst + 5 * ldd, Avx.Permute2x128(x1, y1, 0x31) * scale);
        Avx.Store(dst + 6 * ldd, Avx.Permute2x128(x2, y2, 0x31) * scale);
        Avx.Store(dst + 7 * ldd, Avx.Permute2x128(x3, y3, 0x31) * scale);
    }

    /// <summary>
    /// Online-softmax step over the query columns [q0, q1) of a transposed score tile sᵀ (keys × queries,
    /// row stride ld, scores in log₂ units) and its first <paramref name="keys"/> key rows: per column,
    /// m ← max(m, column max), alpha = 2^(m_old − m), s ← 2^(s − m), l ← l·alpha + Σ s. m must start
    /// finite (−float.MaxValue): a column with only −∞ scores then gets s = 0 and alpha = 1, never NaN.
    /// </summary>
    [MethodImpl(Hot)]
    public static void ColumnSoftmax(float* s, int ld, int keys, int q0, int q1, float* m, float* l, float* alpha)
    {
        int q = q0;
        for (; q + TS.Width <= q1; q += TS.Width) ColumnSoftmaxLanes<TS, TV>(s + q, ld, keys, m + q, l + q, alpha + q);
        for (; q < q1; q++) ColumnSoftmaxLanes<SimdScalar, float>(s + q, ld, keys, m + q, l + q, alpha + q);
    }

    [MethodImpl(Inline)]
    private static void ColumnSoftmaxLanes<XS, XV>(float* s, int ld, int keys, float* m, float* l, float* alpha)
        where XS : struct, ISimd<XV> where XV : unmanaged
    {
        XV mOld = XS.Load(m), m0 = mOld, m1 = mOld;
        int j = 0;
        for (; j + 2 <= keys; j += 2)                                          // two chains: max has latency
        {
            m0 = XS.Max(m0, XS.Load(s + (long)j * ld));
            m1 = XS.Max(m1, XS.Load(s + (long)(j + 1) * ld));
        }
        if (j < keys) m0 = XS.Max(m0, XS.Load(s + (long)j * ld));
        XV mx = XS.Max(m0, m1), sum0 = XS.Zero, sum1 = XS.Zero;
        for (j = 0; j + 2 <= keys; j += 2)
        {
            float* s0 = s + (long)j * ld, s1 = s0 + ld;
            XV p0 = XS.Exp2(XS.Sub(XS.Load(s0), mx)), p1 = XS.Exp2(XS.Sub(XS.Load(s1), mx));
            XS.Store(s0, p0); XS.Store(s1, p1);
            sum0 = XS.Add(sum0, p0); sum1 = XS.Add(sum1, p1);
        }
        if (j < keys)
        {
            XV p = XS.Exp2(XS.Sub(XS.Load(s + (long)j * ld), mx));
            XS.Store(s + (long)j * ld, p);
            sum0 = XS.Add(sum0, p);
        }
        XV a = XS.Exp2(XS.Sub(mOld, mx));
        XS.Store(m, mx);
        XS.Store(alpha, a);
        XS.Store(l, XS.MulAdd(XS.Load(l), a, XS.Add(sum0, sum1)));
    }

    /// <summary>
    /// One score row of the backward: p = 2^(s − lse2) (scores and lse in log₂ units; lse2 = +∞ gives 0),
    /// then ds = p·(dp − Δ)·scale written over dp, with the softmax scale folded into one FMA.
    /// </summary>
    [MethodImpl(Hot)]
    public static void ExpGrad(float* s, float* dp, int n, float lse2, float delta, float scale)
    {
        int j = 0;
        for (; j + TS.Width <= n; j += TS.Width) ExpGradLanes<TS, TV>(s + j, dp + j, lse2, delta, scale);
        for (; j < n; j++) ExpGradLanes<SimdScalar, float>(s + j, dp + j, lse2, delta, scale);
    }

    [MethodImpl(Inline)]
    private static void ExpGradLanes<XS, XV>(float* s, float* dp, float lse2, float delta, float scale)
        where XS : struct, ISimd<XV> where XV : unmanaged
    {
        XV p = XS.Exp2(XS.Sub(XS.Load(s), XS.Broadcast(lse2)));
        XS.Store(s, p);
        XS.Store(dp, XS.Mul(p, XS.MulAdd(XS.Load(dp), XS.Broadcast(scale), XS.Broadcast(-delta * scale))));
    }

    [MethodImpl(Hot)]
    public static float Max(float* x, int n)
    {
        int w = TS.Width, j = 0;
        float m = float.NegativeInfinity;
        if (n >= w)
        {
            TV acc = TS.Load(x);
            for (j = w; j + w <= n; j += w) acc = TS.Max(acc, TS.Load(x + j));
            m = TS.ReduceMax(acc);
        }
        for (; j < n; j++) m = MathF.Max(m, x[j]);
        return m;
    }

    /// <summary>x[j] = exp(x[j] − shift); returns the sum.</summary>
    [MethodImpl(Hot)]
    public static float ExpShiftSum(float* x, int n, float shift)
    {
        int w = TS.Width, j = 0;
        TV sh = TS.Broadcast(shift), acc = TS.Zero;
        for (; j + w <= n; j += w)
        {
            TV e = TS.Exp(TS.Sub(TS.Load(x + j), sh));
            TS.Store(x + j, e);
            acc = TS.Add(acc, e);
        }
        float sum = TS.ReduceSum(acc);
        for (; j < n; j++) { x[j] = FastExp.Exp(x[j] - shift); sum += x[j]; }
        return sum;
    }

    /// <summary>x[j] += y[j].</summary>
    [MethodImpl(Hot)]
    public static void AddTo(float* x, float* y, int n)
    {
        int w = TS.Width, j = 0;
        for (; j + w <= n; j += w) TS.Store(x + j, TS.Add(TS.Load(x + j), TS.Load(y + j)));
        for (; j < n; j++) x[j] += y[j];
    }

    /// <summary>Σ x[j]·y[j].</summary>
    [MethodImpl(Hot)]
    public static float Dot(float* x, float* y, int n)
    {
        int w = TS.Width, j = 0;
        TV acc = TS.Zero;
        for (; j + w <= n; j += w) acc = TS.MulAdd(TS.Load(x + j), TS.Load(y + j), acc);
        float sum = TS.ReduceSum(acc);
        for (; j < n; j++) sum += x[j] * y[j];
        return sum;
    }

    /// <summary>Σ x[j].</summary>
    [MethodImpl(Hot)]
    public static float Sum(float* x, int n)
    {
        int w = TS.Width, j = 0;
        TV acc = TS.Zero;
        for (; j + w <= n; j += w) acc = TS.Add(acc, TS.Load(x + j));
        float sum = TS.ReduceSum(acc);
        for (; j < n; j++) sum += x[j];
        return sum;
    }

    /// <summary>x[j] *= a.</summary>
    [MethodImpl(Hot)]
    public static void Scale(float* x, long n, float a)
    {
        int w = TS.Width;
        long j = 0;
        TV s = TS.Broadcast(a);
        for (; j + w <= n; j += w) TS.Store(x + j, TS.Mul(TS.Load(x + j), s));
        for (; j < n; j++) x[j] *= a;
    }

    /// <summary>dp[j] = p[j]·(dp[j] − delta) — the softmax backward with a scalar row term.</summary>
    [MethodImpl(Hot)]
    public static void SoftmaxGrad(float* p, float* dp, int n, float delta)
    {
        int w = TS.Width, j = 0;
        TV d = TS.Broadcast(delta);
        for (; j + w <= n; j += w) TS.Store(dp + j, TS.Mul(TS.Load(p + j), TS.Sub(TS.Load(dp + j), d)));
        for (; j < n; j++) dp[j] = p[j] * (dp[j] - delta);
    }
}
