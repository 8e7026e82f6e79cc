using System.Runtime.CompilerServices;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// Projects a few tokens onto many columns (k-means centroids, LSH rotations): out (4 × cp) = rows (4 × dim) · table
/// (dim × cp). Every output is ONE fused multiply-add chain over d = 0 … dim − 1 starting from zero, whatever the other
/// rows of the tile hold, so a token's projections — and the argmax taken from them — are bit-identical whether it is
/// projected inside a long sequence, alone, or on any thread. Incremental decoding relies on that.
/// </summary>
internal static unsafe class TokenProjection
{
    /// <summary>Tokens per call.</summary>
    public const int Rows = 4;

    /// <summary>Columns padded so that <paramref name="columns"/> fits whole micro-kernel steps (four vectors).</summary>
    public static int PaddedColumns(int columns, int width) => (columns + 4 * width - 1) / (4 * width) * (4 * width);

    /// <param name="rows">4 rows of dim floats, row stride dim (unused rows may hold anything finite).</param>
    /// <param name="table">dim × cp, row stride cp; cp a multiple of 4 vectors.</param>
    /// <param name="output">4 × cp, row stride cp.</param>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Project4<TS, TV>(float* rows, int dim, float* table, int cp, float* output)
        where TS : ISimd<TV> where TV : unmanaged
    {
        int w = TS.Width;
        for (int j = 0; j < cp; j += 4 * w)
        {
            TV a00 = TS.Zero, a01 = TS.Zero, a02 = TS.Zero, a03 = TS.Zero, a10 = TS.Zero, a11 = TS.Zero, a12 = TS.Zero, a13 = TS.Zero;
            TV a20 = TS.Zero, a21 = TS.Zero, a22 = TS.Zero, a23 = TS.Zero, a30 = TS.Zero, a31 = TS.Zero, a32 = TS.Zero, a33 = TS.Zero;
            float* col = table + j;
            for (int d = 0; d < dim; d++)
            {
                float* cd = col + (long)d * cp;
                TV c0 = TS.Load(cd), c1 = TS.Load(cd + w), c2 = TS.Load(cd + 2 * w), c3 = TS.Load(cd + 3 * w);
                TV x0 = TS.Broadcast(rows[d]);
                a00 = TS.MulAdd(x0, c0, a00); a01 = TS.MulAdd(x0, c1, a01); a02 = TS.MulAdd(x0, c2, a02); a03 = TS.MulAdd(x0, c3, a03);
                TV x1 = TS.Broadcast(rows[dim + d]);
                a10 = TS.MulAdd(x1, c0, a10); a11 = TS.MulAdd(x1, c1, a11); a12 = TS.MulAdd(x1, c2, a12); a13 = TS.MulAdd(x1, c3, a13);
                TV x2 = TS.Broadcast(rows[2 * dim + d]);
                a20 = TS.MulAdd(x2, c0, a20); a21 = TS.MulAdd(x2, c1, a21); a22 = TS.MulAdd(x2, c2, a22); a23 = TS.MulAdd(x2, c3, a23);
                TV x3 = TS.Broadcast(rows[3 * dim + d]);
                a30 = TS.MulAdd(x3, c0, a30); a31 = TS.MulAdd(x3, c1, a31); a32 = TS.MulAdd(x3, c2, a32); a33 = TS.MulAdd(x3, c3, a33);
            }
            float* s0 = output + j, s1 = s0 + cp, s2 = s1 + cp, s3 = s2 + cp;
            TS.Store(s0, a00); TS.Store(s0 + w, a01); TS.Store(s0 + 2 * w, a02); TS.Store(s0 + 3 * w, a03);
            TS.Store(s1, a10); TS.Store(s1 + w, a11); TS.Store(s1 + 2 * w, a12); TS.Store(s1 + 3 * w, a13);
            TS.Store(s2, a20); TS.Store(s2 + w, a21); TS.Store(s2 + 2 * w, a22); TS.Store(s2 + 3 * w, a23);
            TS.Store(s3, a30); TS.Store(s3 + w, a31); TS.Store(s3 + 2 * w, a32); TS.Store(s3 + 3 * w, a33);
        }
    }
}
