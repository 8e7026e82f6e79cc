using System.Runtime.CompilerServices;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// Small dense building blocks over raw row-major float memory, generic over the vector width:
/// a register-blocked GEMM and the row operations of an online softmax.
/// </summary>
internal static unsafe class Tile<TS, TV> where TS : struct, ISimd<TV> where TV : unmanaged
{
    // Kernels are JIT-compiled fully optimised at once (no tier-0 pass over hot loops).
    private const MethodImplOptions Hot = MethodImplOptions.AggressiveOptimization;

    /// <summary>C (m×n, row stride ldc) = A (m×k, lda) · B (k×n, ldb); adds to C when <paramref name="accumulate"/>.</summary>
    [MethodImpl(Hot)]
    public static void Gemm(int m, int n, int k, float* a, int lda, float* b, int ldb, float* c, int ldc, bool accumulate)
    {
        int w = TS.Width, nr = 4 * w;
        int i = 0;
        for (; i + 4 <= m; i += 4)
        {
            float* a0 = a + (long)i * lda;
            float* c0 = c + (long)i * ldc;
            int j = 0;
            for (; j + nr <= n; j += nr) Micro4x4(k, a0, lda, b + j, ldb, c0 + j, ldc, accumulate);
            for (; j + w <= n; j += w) Micro4x1(k, a0, lda, b + j, ldb, c0 + j, ldc, accumulate);
            for (; j < n; j++)
                for (int r = 0; r < 4; r++) ScalarDot(k, a0 + (long)r * lda, b + j, ldb, c0 + (long)r * ldc + j, accumulate);
        }
        for (; i < m; i++)
        {
            float* ai = a + (long)i * lda, ci = c + (long)i * ldc;
            int j = 0;
            for (; j + w <= n; j += w)
            {
                TV acc = TS.Zero;
                float* bp = b + j;
                for (int p = 0; p < k; p++, bp += ldb) acc = TS.MulAdd(TS.Broadcast(ai[p]), TS.Load(bp), acc);
                TS.Store(ci + j, accumulate ? TS.Add(TS.Load(ci + j), acc) : acc);
            }
            for (; j < n; j++) ScalarDot(k, ai, b + j, ldb, ci + j, accumulate);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void ScalarDot(int k, float* a, float* b, int ldb, float* c, bool accumulate)
    {
        float s = 0;
        for (int p = 0; p < k; p++) s = MathF.FusedMultiplyAdd(a[p], b[(long)p * ldb], s);
        *c = accumulate ? *c + s : s;
    }

    // 4 rows × 4 vectors of C held in 16 registers; each step reads 4 vectors of B and 4 scalars of A.
    [MethodImpl(Hot)]
    private static void Micro4x4(int k, float* a0, int lda, float* b, int ldb, float* c0, int ldc, bool accumulate)
    {
        int w = TS.Width;
        float* a1 = a0 + lda, a2 = a1 + lda, a3 = a2 + lda;
        TV c00 = TS.Zero, c01 = TS.Zero, c02 = TS.Zero, c03 = TS.Zero;
        TV c10 = TS.Zero, c11 = TS.Zero, c12 = TS.Zero, c13 = TS.Zero;
        TV c20 = TS.Zero, c21 = TS.Zero, c22 = TS.Zero, c23 = TS.Zero;
        TV c30 = TS.Zero, c31 = TS.Zero, c32 = TS.Zero, c33 = TS.Zero;
        float* bp = b;
        for (int p = 0; p < k; p++, bp += ldb)
        {
            TV b0 = TS.Load(bp), b1 = TS.Load(bp + w), b2 = TS.Load(bp + 2 * w), b3 = TS.Load(bp + 3 * w);
            TV x = TS.Broadcast(a0[p]);
            c00 = TS.MulAdd(x, b0, c00); c01 = TS.MulAdd(x, b1, c01); c02 = TS.MulAdd(x, b2, c02); c03 = TS.MulAdd(x, b3, c03);
            x = TS.Broadcast(a1[p]);
            c10 = TS.MulAdd(x, b0, c10); c11 = TS.MulAdd(x, b1, c11); c12 = TS.MulAdd(x, b2, c12); c13 = TS.MulAdd(x, b3, c13);
            x = TS.Broadcast(a2[p]);
            c20 = TS.MulAdd(x, b0, c20); c21 = TS.MulAdd(x, b1, c21); c22 = TS.MulAdd(x, b2, c22); c23 = TS.MulAdd(x, b3, c23);
            x = TS.Broadcast(a3[p]);
            c30 = TS.MulAdd(x, b0, c30); c31 = TS.MulAdd(x, b1, c31); c32 = TS.MulAdd(x, b2, c32); c33 = TS.MulAdd(x, b3, c33);
        }
        float* c1 = c0 + ldc, c2 = c1 + ldc, c3 = c2 + ldc;
        Put(c0, c00, accumulate); Put(c0 + w, c01, accumulate); Put(c0 + 2 * w, c02, accumulate); Put(c0 + 3 * w, c03, accumulate);
        Put(c1, c10, accumulate); Put(c1 + w, c11, accumulate); Put(c1 + 2 * w, c12, accumulate); Put(c1 + 3 * w, c13, accumulate);
        Put(c2, c20, accumulate); Put(c2 + w, c21, accumulate); Put(c2 + 2 * w, c22, accumulate); Put(c2 + 3 * w, c23, accumulate);
        Put(c3, c30, accumulate); Put(c3 + w, c31, accumulate); Put(c3 + 2 * w, c32, accumulate); Put(c3 + 3 * w, c33, accumulate);
    }

    [MethodImpl(Hot)]
    private static void Micro4x1(int k, float* a0, int lda, float* b, int ldb, float* c0, int ldc, bool accumulate)
    {
        float* a1 = a0 + lda, a2 = a1 + lda, a3 = a2 + lda;
        TV c00 = TS.Zero, c10 = TS.Zero, c20 = TS.Zero, c30 = TS.Zero;
        float* bp = b;
        for (int p = 0; p < k; p++, bp += ldb)
        {
            TV b0 = TS.Load(bp);
            c00 = TS.MulAdd(TS.Broadcast(a0[p]), b0, c00);
            c10 = TS.MulAdd(TS.Broadcast(a1[p]), b0, c10);
            c20 = TS.MulAdd(TS.Broadcast(a2[p]), b0, c20);
            c30 = TS.MulAdd(TS.Broadcast(a3[p]), b0, c30);
        }
        Put(c0, c00, accumulate); Put(c0 + ldc, c10, accumulate); Put(c0 + 2 * ldc, c20, accumulate); Put(c0 + 3 * ldc, c30, accumulate);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Put(float* c, TV v, bool accumulate) => TS.Store(c, accumulate ? TS.Add(TS.Load(c), v) : v);

    /// <summary>x[j] = x[j]·scale + rowBias[j] (if any) + colBias (scalar, added to every element).</summary>
    [MethodImpl(Hot)]
    public static void ScaleAddBias(float* x, int n, float scale, float* rowBias, float colBias)
    {
        int w = TS.Width, j = 0;
        TV s = TS.Broadcast(scale), cb = TS.Broadcast(colBias);
        if (rowBias != null)
        {
            for (; j + w <= n; j += w) TS.Store(x + j, TS.Add(TS.MulAdd(TS.Load(x + j), s, TS.Load(rowBias + j)), cb));
            for (; j < n; j++) x[j] = x[j] * scale + rowBias[j] + colBias;
        }
        else
        {
            for (; j + w <= n; j += w) TS.Store(x + j, TS.MulAdd(TS.Load(x + j), s, cb));
            for (; j < n; j++) x[j] = x[j] * scale + colBias;
        }
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
        for (; j < n; j++) { x[j] = MathF.Exp(x[j] - shift); sum += x[j]; }
        return sum;
    }

    /// <summary>x[j] = exp(x[j] − shift[j]) (per-element shift).</summary>
    [MethodImpl(Hot)]
    public static void ExpShiftEach(float* x, int n, float* shift)
    {
        int w = TS.Width, j = 0;
        for (; j + w <= n; j += w) TS.Store(x + j, TS.Exp(TS.Sub(TS.Load(x + j), TS.Load(shift + j))));
        for (; j < n; j++) x[j] = MathF.Exp(x[j] - shift[j]);
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

    /// <summary>x[j] *= a.</summary>
    [MethodImpl(Hot)]
    public static void Scale(float* x, int n, float a)
    {
        int w = TS.Width, j = 0;
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

    /// <summary>dp[j] = p[j]·(dp[j] − delta[j]) — per-element row term (transposed layout).</summary>
    [MethodImpl(Hot)]
    public static void SoftmaxGradEach(float* p, float* dp, int n, float* delta)
    {
        int w = TS.Width, j = 0;
        for (; j + w <= n; j += w) TS.Store(dp + j, TS.Mul(TS.Load(p + j), TS.Sub(TS.Load(dp + j), TS.Load(delta + j))));
        for (; j < n; j++) dp[j] = p[j] * (dp[j] - delta[j]);
    }
}
