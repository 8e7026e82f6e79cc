using System.Runtime.Intrinsics;
using SparseAttention.Kernels.Fused;
using Xunit;

namespace SparseAttention.Tests;

/// <summary>
/// The fused kernels' tile operations against loops written out in double, for every vector width
/// (this machine's kernels only run the widest; the others are the fallbacks of other CPUs).
/// </summary>
public unsafe class FusedTileTests
{
    private static float[] Random(int count, int seed)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, count).Select(_ => (float)(rng.NextDouble() * 2 - 1)).ToArray();
    }

    public static TheoryData<int> Widths() => [512, 256, 128, 1];

    [Theory]
    [MemberData(nameof(Widths))]
    public void TransposeMatchesIndexArithmetic(int width)
    {
        foreach (var (rows, cols) in new[] { (8, 8), (16, 64), (37, 19), (1, 9), (9, 1), (128, 64) })
        {
            int lds = cols + 3, ldd = rows + 5;
            float[] src = Random(rows * lds, rows * 100 + cols), dst = new float[cols * ldd];
            fixed (float* s = src, d = dst)
            {
                if (width == 512) Tile<Simd512, Vector512<float>>.Transpose(s, rows, cols, lds, d, ldd, 0.5f);
                else if (width == 256) Tile<Simd256, Vector256<float>>.Transpose(s, rows, cols, lds, d, ldd, 0.5f);
                else if (width == 128) Tile<Simd128, Vector128<float>>.Transpose(s, rows, cols, lds, d, ldd, 0.5f);
                else Tile<SimdScalar, float>.Transpose(s, rows, cols, lds, d, ldd, 0.5f);
            }
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    Assert.Equal(src[r * lds + c] * 0.5f, dst[c * ldd + r]);
        }
    }

    [Theory]
    [MemberData(nameof(Widths))]
    public void GemmAndTransposedAGemmMatchDoubleLoops(int width)
    {
        foreach (var (m, n, k) in new[] { (4, 64, 8), (7, 70, 5), (13, 17, 33), (128, 64, 128), (1, 1, 1), (5, 48, 7), (9, 40, 3) })
            foreach (bool transposed in new[] { false, true })
                foreach (bool accumulate in new[] { false, true })
                {
                    int lda = (transposed ? m : k) + 2, ldb = n + 1, ldc = n + 3;
                    float[] a = Random((transposed ? k : m) * lda, m + n), b = Random(k * ldb, k), c = Random(m * ldc, 5), c0 = (float[])c.Clone();
                    fixed (float* pa = a, pb = b, pc = c)
                    {
                        if (width == 512) Run<Simd512, Vector512<float>>(transposed, m, n, k, pa, lda, pb, ldb, pc, ldc, accumulate);
                        else if (width == 256) Run<Simd256, Vector256<float>>(transposed, m, n, k, pa, lda, pb, ldb, pc, ldc, accumulate);
                        else if (width == 128) Run<Simd128, Vector128<float>>(transposed, m, n, k, pa, lda, pb, ldb, pc, ldc, accumulate);
                        else Run<SimdScalar, float>(transposed, m, n, k, pa, lda, pb, ldb, pc, ldc, accumulate);
                    }
                    for (int i = 0; i < m; i++)
                        for (int j = 0; j < n; j++)
                        {
                            double expected = accumulate ? c0[i * ldc + j] : 0;
                            for (int p = 0; p < k; p++) expected += (double)(transposed ? a[p * lda + i] : a[i * lda + p]) * b[p * ldb + j];
                            Assert.True(Math.Abs(expected - c[i * ldc + j]) < 1e-5 * (1 + k), $"{m}×{n}×{k} T={transposed} acc={accumulate} at ({i}, {j})");
                        }
                    // Columns beyond n are never written.
                    for (int i = 0; i < m; i++) Assert.Equal(c0[i * ldc + n], c[i * ldc + n]);
                }
    }

    private static void Run<TS, TV>(bool transposed, int m, int n, int k, float* a, int lda, float* b, int ldb, float* c, int ldc, bool accumulate)
        where TS : struct, ISimd<TV> where TV : unmanaged
    {
        if (transposed) Tile<TS, TV>.GemmTransA(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
        else Tile<TS, TV>.Gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
    }

    [Theory]
    [MemberData(nameof(Widths))]
    public void ColumnSoftmaxIsAnOnlineSoftmaxPerColumn(int width)
    {
        // Two steps over the same columns (as over two key blocks), then compared with one softmax over all keys.
        const int queries = 21, ld = 32, keys1 = 5, keys2 = 9;
        float[] s1 = Random(keys1 * ld, 1).Select(x => 4 * x).ToArray(), s2 = Random(keys2 * ld, 2).Select(x => 4 * x).ToArray();
        s1[2 * ld + 3] = float.NegativeInfinity;                                 // a masked score
        for (int j = 0; j < keys1; j++) s1[j * ld + 7] = float.NegativeInfinity;  // column 7 sees nothing in step 1
        float[] m = Enumerable.Repeat(-float.MaxValue, ld).ToArray(), l = new float[ld], alpha = new float[ld];
        float[] p1 = (float[])s1.Clone(), p2 = (float[])s2.Clone();
        float[] alpha1 = new float[ld];
        fixed (float* a1 = p1, a2 = p2, pm = m, pl = l, pa = alpha)
        {
            Step(width, a1, ld, keys1, pm, pl, pa);
            Array.Copy(alpha, alpha1, ld);
            Step(width, a2, ld, keys2, pm, pl, pa);
        }
        for (int q = 0; q < queries; q++)
        {
            var column = Enumerable.Range(0, keys1).Select(j => (double)s1[j * ld + q]).Concat(Enumerable.Range(0, keys2).Select(j => (double)s2[j * ld + q])).ToArray();
            double max = column.Max(), sum = column.Sum(x => Math.Pow(2, x - max));
            Assert.Equal(max, m[q], 1e-6);
            Assert.Equal(sum, l[q], 1e-5 * sum);
            // Stored weights are relative to the running maximum of their step; rescaled by the later alphas they are exact.
            for (int j = 0; j < keys1; j++) Assert.Equal(Math.Pow(2, s1[j * ld + q] - max), p1[j * ld + q] * alpha[q], 1e-6);
            for (int j = 0; j < keys2; j++) Assert.Equal(Math.Pow(2, s2[j * ld + q] - max), p2[j * ld + q], 1e-6);
        }
        Assert.Equal(1f, alpha1[7]);                                             // nothing seen yet: no NaN, no rescale
        Assert.Equal(0f, p1[2 * ld + 3]);
    }

    private static void Step(int width, float* s, int ld, int keys, float* m, float* l, float* alpha)
    {
        const int queries = 21;
        if (width == 512) Tile<Simd512, Vector512<float>>.ColumnSoftmax(s, ld, keys, 0, queries, m, l, alpha);
        else if (width == 256) Tile<Simd256, Vector256<float>>.ColumnSoftmax(s, ld, keys, 0, queries, m, l, alpha);
        else if (width == 128) Tile<Simd128, Vector128<float>>.ColumnSoftmax(s, ld, keys, 0, queries, m, l, alpha);
        else Tile<SimdScalar, float>.ColumnSoftmax(s, ld, keys, 0, queries, m, l, alpha);
    }

    /// <summary>Reports the width <see cref="SimdWidth.Run"/> specialises a kernel for.</summary>
    private struct WidthProbe : ISimdKernel
    {
        public int Bits;
        public void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged => Bits = TS.Width * 32;
    }

    private static bool Disabled(string variable) => Environment.GetEnvironmentVariable(variable) == "0";

    /// <summary>
    /// The kernels run at the widest width the runtime accelerates, and the DOTNET_Enable* switches CI sets really narrow
    /// it: a run meant to test the 128-bit or scalar path cannot silently take 256/512-bit code (and a switch the runtime
    /// ignores fails here rather than passing untested).
    /// </summary>
    [Fact]
    public void KernelsRunAtTheWidestAcceleratedWidthTheEnvironmentAllows()
    {
        var probe = new WidthProbe();
        SimdWidth.Run(ref probe);
        int widest = Vector512.IsHardwareAccelerated ? 512 : Vector256.IsHardwareAccelerated ? 256 : Vector128.IsHardwareAccelerated ? 128 : 32;
        Assert.Equal(widest, probe.Bits);
        Assert.Equal(probe.Bits > 32, SimdWidth.Vectorised);
        if (Disabled("DOTNET_EnableHWIntrinsic"))
            Assert.True(probe.Bits == 32, $"DOTNET_EnableHWIntrinsic=0 but the kernels use {probe.Bits}-bit vectors");
        else if (Disabled("DOTNET_EnableAVX2") && System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture
                 == System.Runtime.InteropServices.Architecture.X64)
            Assert.True(probe.Bits == 128, $"DOTNET_EnableAVX2=0 on x64 (SSE left) but the kernels use {probe.Bits}-bit vectors");
        // .NET 10 reads DOTNET_EnableAVX512 (DOTNET_EnableAVX512F is ignored; set both to cover older runtimes).
        if (Disabled("DOTNET_EnableAVX512F") || Disabled("DOTNET_EnableAVX512"))
            Assert.True(probe.Bits <= 256, $"AVX-512 switched off by the environment but the kernels use {probe.Bits}-bit vectors");
    }
}
