using System.Runtime.Intrinsics;
using SparseAttention.Kernels.Fused;
using Xunit;

namespace SparseAttention.Tests;

/// <summary>The fused kernels' float exp against Math.Exp / Math.Pow in double, for every lane width.</summary>
public class FastExpTests
{
    // Error in units of the float spacing at the exact result; a subnormal result may be off by one subnormal step.
    private const double MaxUlps = 2.5;

    /// <summary>Every implementation of one function: 512-bit, 256-bit and 128-bit lanes, scalar.</summary>
    private static IEnumerable<(string Name, Func<float, float> F)> Variants(bool exp2) =>
    [
        ("512", x => (exp2 ? FastExp.Exp2(Vector512.Create(x)) : FastExp.Exp(Vector512.Create(x))).GetElement(7)),
        ("256", x => (exp2 ? FastExp.Exp2(Vector256.Create(x)) : FastExp.Exp(Vector256.Create(x))).GetElement(3)),
        ("128", x => (exp2 ? FastExp.Exp2(Vector128.Create(x)) : FastExp.Exp(Vector128.Create(x))).GetElement(1)),
        ("scalar", x => exp2 ? FastExp.Exp2(x) : FastExp.Exp(x)),
    ];

    /// <summary>Arguments over the whole range that matters: a fine grid, both sides of the float range's ends, tiny |x|.</summary>
    private static IEnumerable<float> Arguments(float lo, float hi)
    {
        for (double x = lo; x <= hi; x += 1.0 / 512) yield return (float)x;
        for (int i = 0; i < 20000; i++) yield return lo + (hi - lo) * (float)new Random(i).NextDouble();
        for (double m = 1e-30; m < 1; m *= 1.7) { yield return (float)m; yield return (float)-m; }
    }

    private static double Ulps(float actual, double expected)
    {
        float e = (float)expected;
        double spacing = e == 0f ? float.Epsilon : MathF.BitIncrement(e) - e;
        if (float.IsPositiveInfinity(e)) return float.IsPositiveInfinity(actual) ? 0 : double.PositiveInfinity;
        return Math.Abs(actual - expected) / Math.Max(spacing, float.Epsilon);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void MatchesDoublePrecisionOverTheFloatRange(bool exp2)
    {
        // exp: e^x underflows below −103.97 and overflows above 88.72; 2^t below −150 and at 128.
        var (lo, hi) = exp2 ? (-160f, 135f) : (-110f, 95f);
        foreach (var (name, f) in Variants(exp2))
        {
            double worst = 0;
            float worstAt = 0;
            foreach (float x in Arguments(lo, hi))
            {
                double ulps = Ulps(f(x), exp2 ? Math.Pow(2, x) : Math.Exp(x));
                if (ulps > worst) (worst, worstAt) = (ulps, x);
            }
            Assert.True(worst <= MaxUlps, $"{(exp2 ? "Exp2" : "Exp")} {name}: {worst:F2} ulp at x = {worstAt:R}");
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void EdgesGiveExactZeroOneInfinityAndNaN(bool exp2)
    {
        foreach (var (name, f) in Variants(exp2))
        {
            // Very negative arguments (masked scores minus a row maximum) must weigh exactly 0, never NaN.
            foreach (float x in new[] { float.NegativeInfinity, -float.MaxValue, -1e10f, -1000f, exp2 ? -151f : -105f })
                Assert.True(f(x) == 0f, $"{name}: f({x}) = {f(x)}, expected 0");
            Assert.Equal(1f, f(0f));
            Assert.Equal(1f, f(-0f));
            foreach (float x in new[] { float.PositiveInfinity, float.MaxValue, 1e10f, exp2 ? 128f : 89f })
                Assert.True(float.IsPositiveInfinity(f(x)), $"{name}: f({x}) = {f(x)}, expected +∞");
            Assert.True(float.IsNaN(f(float.NaN)), $"{name}: NaN must stay NaN");
        }
    }

    [Fact]
    public void LanesAreIndependent()
    {
        // A different argument in every lane (including ±∞ and NaN) gives each lane its own scalar result.
        var args = new float[16];
        for (int i = 0; i < 16; i++) args[i] = -40f + 6.3f * i;
        args[2] = float.NegativeInfinity; args[5] = float.NaN; args[11] = float.PositiveInfinity;
        var wide = FastExp.Exp2(Vector512.Create(args));
        var (low, high) = (FastExp.Exp2(Vector256.Create(args, 0)), FastExp.Exp2(Vector256.Create(args, 8)));
        var quads = Enumerable.Range(0, 4).Select(i => FastExp.Exp2(Vector128.Create(args, 4 * i))).ToArray();
        // 128-bit lanes multiply-add unfused where the hardware has no FMA (SSE-only x64): there they match their own
        // single-argument result instead of the scalar one.
        bool fusedHardware = System.Runtime.Intrinsics.X86.Fma.IsSupported || System.Runtime.Intrinsics.Arm.AdvSimd.IsSupported;
        for (int i = 0; i < 16; i++)
        {
            float scalar = FastExp.Exp2(args[i]);
            Assert.Equal(scalar, wide.GetElement(i));
            Assert.Equal(scalar, i < 8 ? low.GetElement(i) : high.GetElement(i - 8));
            Assert.Equal(fusedHardware ? scalar : FastExp.Exp2(Vector128.Create(args[i])).GetElement(0), quads[i / 4].GetElement(i % 4));
        }
    }
}
