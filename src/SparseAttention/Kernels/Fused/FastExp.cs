using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// exp and 2^x on float lanes, float-only and inlined (<c>Vector512.Exp</c> widens to double and is a call).
/// 2^t = 2^n · 2^f with n = round(t) and f ∈ [−½, ½]; 2^f is a degree-5 polynomial with p(0) = 1 exactly
/// (relative error below 1e-7, fitted for this file), 2^n is applied by scaling the exponent, so results
/// below the float range are exactly 0 (also for −∞), above it +∞, and NaN stays NaN.
/// </summary>
/// <remarks>
/// Softmax kernels fold their scale into the argument's FMA: exp((s − m)·scale) = 2^(s·(scale·log₂e) − m·scale·log₂e),
/// i.e. <c>Exp2(FusedMultiplyAdd(s, scaleLog2E, bias))</c>. That rounds the argument once, as computing
/// (s − m)·scale in float did before.
/// </remarks>
internal static class FastExp
{
    public const float Log2E = 1.44269504088896341f;
    private const float Log2ELow = 1.925963e-8f;   // log₂e − (float)log₂e

    // Arguments of 2^t are clamped here (results are 0 and +∞ beyond), so n is finite and f ∈ [−½, ½].
    private const float MinExp2 = -151f, MaxExp2 = 129f;
    private const float MinExp = -105f, MaxExp = 89.5f;

    // 2^f ≈ 1 + f·(C1 + f·(C2 + f·(C3 + f·(C4 + f·C5)))) on [−½, ½] (minimax in relative error, p(0) = 1).
    private const float C1 = 0.693147004f, C2 = 0.240222424f, C3 = 0.0555073395f, C4 = 0.00967151765f, C5 = 0.00132647355f;

    /// <summary>2^t per lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp2(Vector512<float> t)
    {
        if (!Avx512F.IsSupported) return Vector512.Create(Exp2(t.GetLower()), Exp2(t.GetUpper()));
        t = Clamp(t, MinExp2, MaxExp2);
        var n = Avx512F.RoundScale(t, 0);                                       // nearest integer
        return Avx512F.Scale(Poly(t - n), n);                                   // p · 2^n, rounded once
    }

    /// <summary>e^x per lane (x·log₂e carried to double-float precision, so error stays a few ulp for large |x|).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp(Vector512<float> x)
    {
        if (!Avx512F.IsSupported) return Vector512.Create(Exp(x.GetLower()), Exp(x.GetUpper()));
        x = Clamp(x, MinExp, MaxExp);
        var t = x * Vector512.Create(Log2E);
        var n = Avx512F.RoundScale(t, 0);
        var err = Vector512.FusedMultiplyAdd(x, Vector512.Create(Log2ELow), Vector512.FusedMultiplyAdd(x, Vector512.Create(Log2E), -t));
        return Avx512F.Scale(Poly(t - n + err), n);
    }

    /// <summary>2^t per lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp2(Vector256<float> t)
    {
        t = Clamp(t, MinExp2, MaxExp2);
        var n = Vector256.Round(t);
        return ScaleByPowerOfTwo(Poly(t - n), n);
    }

    /// <summary>e^x per lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp(Vector256<float> x)
    {
        x = Clamp(x, MinExp, MaxExp);
        var t = x * Vector256.Create(Log2E);
        var n = Vector256.Round(t);
        var err = Vector256.FusedMultiplyAdd(x, Vector256.Create(Log2ELow), Vector256.FusedMultiplyAdd(x, Vector256.Create(Log2E), -t));
        return ScaleByPowerOfTwo(Poly(t - n + err), n);
    }

    /// <summary>2^t per lane.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Exp2(Vector128<float> t)
    {
        t = Clamp(t, MinExp2, MaxExp2);
        var n = Vector128.Round(t);
        return ScaleByPowerOfTwo(Poly(t - n), n);
    }

    /// <summary>e^x per lane: x·log₂e and its reduction by n formed in double, which needs no fused multiply-add
    /// (SSE-only x64 has none; there the polynomial rounds each step, see <see cref="Simd128"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Exp(Vector128<float> x)
    {
        x = Clamp(x, MinExp, MaxExp);
        var (lo, hi) = Vector128.Widen(x);
        var log2e = Vector128.Create(1.4426950408889634);
        Vector128<double> tl = lo * log2e, th = hi * log2e, nl = Vector128.Round(tl), nh = Vector128.Round(th);
        return ScaleByPowerOfTwo(Poly(Vector128.Narrow(tl - nl, th - nh)), Vector128.Narrow(nl, nh));
    }

    /// <summary>2^t.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Exp2(float t)
    {
        t = MathF.Min(MathF.Max(t, MinExp2), MaxExp2);                          // NaN propagates
        float n = MathF.Round(t);
        return float.IsNaN(t) ? t : MathF.ScaleB(Poly(t - n), (int)n);
    }

    /// <summary>e^x.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Exp(float x)
    {
        x = MathF.Min(MathF.Max(x, MinExp), MaxExp);
        float t = x * Log2E, n = MathF.Round(t);
        float err = MathF.FusedMultiplyAdd(x, Log2ELow, MathF.FusedMultiplyAdd(x, Log2E, -t));
        return float.IsNaN(x) ? x : MathF.ScaleB(Poly(t - n + err), (int)n);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Clamp(Vector512<float> x, float lo, float hi) =>
        Avx512F.Min(Vector512.Create(hi), Avx512F.Max(Vector512.Create(lo), x));   // vminps/vmaxps return x (the second operand) when x is NaN

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Clamp(Vector256<float> x, float lo, float hi) => Avx.IsSupported
        ? Avx.Min(Vector256.Create(hi), Avx.Max(Vector256.Create(lo), x))
        : Vector256.Min(Vector256.Max(x, Vector256.Create(lo)), Vector256.Create(hi));   // IEEE max/min: NaN propagates

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<float> Clamp(Vector128<float> x, float lo, float hi) => Sse.IsSupported
        ? Sse.Min(Vector128.Create(hi), Sse.Max(Vector128.Create(lo), x))             // minps/maxps return x when x is NaN
        : Vector128.Min(Vector128.Max(x, Vector128.Create(lo)), Vector128.Create(hi));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector512<float> Poly(Vector512<float> f)
    {
        var p = Vector512.FusedMultiplyAdd(Vector512.Create(C5), f, Vector512.Create(C4));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(C3));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(C2));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(C1));
        return Vector512.FusedMultiplyAdd(p, f, Vector512<float>.One);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> Poly(Vector256<float> f)
    {
        var p = Vector256.FusedMultiplyAdd(Vector256.Create(C5), f, Vector256.Create(C4));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(C3));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(C2));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(C1));
        return Vector256.FusedMultiplyAdd(p, f, Vector256<float>.One);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<float> Poly(Vector128<float> f)
    {
        var p = Vector128.MultiplyAddEstimate(Vector128.Create(C5), f, Vector128.Create(C4));
        p = Vector128.MultiplyAddEstimate(p, f, Vector128.Create(C3));
        p = Vector128.MultiplyAddEstimate(p, f, Vector128.Create(C2));
        p = Vector128.MultiplyAddEstimate(p, f, Vector128.Create(C1));
        return Vector128.MultiplyAddEstimate(p, f, Vector128<float>.One);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Poly(float f) =>
        MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(MathF.FusedMultiplyAdd(
            MathF.FusedMultiplyAdd(C5, f, C4), f, C3), f, C2), f, C1), f, 1f);

    /// <summary>p·2^n for integral n ∈ [−151, 129] without AVX-512's scalef: two exact power-of-two factors
    /// (each a normal float), so a result in the subnormal range is rounded only once.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<float> ScaleByPowerOfTwo(Vector256<float> p, Vector256<float> n)
    {
        var ni = Vector256.ConvertToInt32(n);
        var half = Vector256.ShiftRightArithmetic(ni, 1);
        var bias = Vector256.Create(127);
        var s1 = Vector256.ShiftLeft(half + bias, 23).AsSingle();
        var s2 = Vector256.ShiftLeft(ni - half + bias, 23).AsSingle();
        var r = p * s1 * s2;
        return Vector256.ConditionalSelect(Vector256.Equals(n, n), r, n);      // NaN in, NaN out
    }

    /// <inheritdoc cref="ScaleByPowerOfTwo(Vector256{float}, Vector256{float})"/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<float> ScaleByPowerOfTwo(Vector128<float> p, Vector128<float> n)
    {
        var ni = Vector128.ConvertToInt32(n);
        var half = Vector128.ShiftRightArithmetic(ni, 1);
        var bias = Vector128.Create(127);
        var s1 = Vector128.ShiftLeft(half + bias, 23).AsSingle();
        var s2 = Vector128.ShiftLeft(ni - half + bias, 23).AsSingle();
        var r = p * s1 * s2;
        return Vector128.ConditionalSelect(Vector128.Equals(n, n), r, n);
    }
}
