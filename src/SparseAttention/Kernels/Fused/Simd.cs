using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace SparseAttention.Kernels.Fused;

/// <summary>
/// The few vector operations the fused kernels need, as static abstract members so one generic
/// kernel body is specialised by the JIT for 512-bit, 256-bit, 128-bit and scalar code.
/// </summary>
internal unsafe interface ISimd<TV> where TV : unmanaged
{
    static abstract int Width { get; }
    static abstract TV Zero { get; }
    static abstract TV Load(float* p);
    static abstract void Store(float* p, TV v);
    static abstract TV Broadcast(float x);
    /// <summary>a·b + c.</summary>
    static abstract TV MulAdd(TV a, TV b, TV c);
    static abstract TV Add(TV a, TV b);
    static abstract TV Sub(TV a, TV b);
    static abstract TV Mul(TV a, TV b);
    static abstract TV Div(TV a, TV b);
    static abstract TV Max(TV a, TV b);
    /// <summary>e^x (<see cref="FastExp"/>: float-only, inlined).</summary>
    static abstract TV Exp(TV x);
    /// <summary>2^x (<see cref="FastExp"/>).</summary>
    static abstract TV Exp2(TV x);
    static abstract float ReduceMax(TV v);
    static abstract float ReduceSum(TV v);
}

internal unsafe struct Simd512 : ISimd<Vector512<float>>
{
    public static int Width => Vector512<float>.Count;
    public static Vector512<float> Zero => Vector512<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Load(float* p) => Vector512.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector512<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Broadcast(float x) => Vector512.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> MulAdd(Vector512<float> a, Vector512<float> b, Vector512<float> c) => Vector512.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Add(Vector512<float> a, Vector512<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Sub(Vector512<float> a, Vector512<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Mul(Vector512<float> a, Vector512<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Div(Vector512<float> a, Vector512<float> b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Max(Vector512<float> a, Vector512<float> b) => Vector512.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Exp(Vector512<float> x) => FastExp.Exp(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Exp2(Vector512<float> x) => FastExp.Exp2(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(Vector512<float> v) => MathF.Max(Simd256.ReduceMax(v.GetLower()), Simd256.ReduceMax(v.GetUpper()));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(Vector512<float> v) => Vector512.Sum(v);
}

internal unsafe struct Simd256 : ISimd<Vector256<float>>
{
    public static int Width => Vector256<float>.Count;
    public static Vector256<float> Zero => Vector256<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Load(float* p) => Vector256.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector256<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Broadcast(float x) => Vector256.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> MulAdd(Vector256<float> a, Vector256<float> b, Vector256<float> c) => Vector256.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Add(Vector256<float> a, Vector256<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Sub(Vector256<float> a, Vector256<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Mul(Vector256<float> a, Vector256<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Div(Vector256<float> a, Vector256<float> b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Max(Vector256<float> a, Vector256<float> b) => Vector256.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Exp(Vector256<float> x) => FastExp.Exp(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Exp2(Vector256<float> x) => FastExp.Exp2(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(Vector256<float> v) => Simd128.ReduceMax(Vector128.Max(v.GetLower(), v.GetUpper()));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(Vector256<float> v) => Vector256.Sum(v);
}

/// <summary>128-bit lanes: ARM64 NEON, and x64 without AVX2. Multiply-add is fused where the hardware has FMA
/// (NEON, x64 with FMA) and a multiply then an add elsewhere (SSE-only x64), where a fused one would be a software call.</summary>
internal unsafe struct Simd128 : ISimd<Vector128<float>>
{
    public static int Width => Vector128<float>.Count;
    public static Vector128<float> Zero => Vector128<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Load(float* p) => Vector128.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector128<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Broadcast(float x) => Vector128.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> MulAdd(Vector128<float> a, Vector128<float> b, Vector128<float> c) => Vector128.MultiplyAddEstimate(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Add(Vector128<float> a, Vector128<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Sub(Vector128<float> a, Vector128<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Mul(Vector128<float> a, Vector128<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Div(Vector128<float> a, Vector128<float> b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Max(Vector128<float> a, Vector128<float> b) => Vector128.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Exp(Vector128<float> x) => FastExp.Exp(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Exp2(Vector128<float> x) => FastExp.Exp2(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(Vector128<float> v) => MathF.Max(MathF.Max(v[0], v[1]), MathF.Max(v[2], v[3]));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(Vector128<float> v) => Vector128.Sum(v);
}

/// <summary>One float per "vector": the portable fallback.</summary>
internal unsafe struct SimdScalar : ISimd<float>
{
    public static int Width => 1;
    public static float Zero => 0f;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Load(float* p) => *p;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, float v) => *p = v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Broadcast(float x) => x;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float MulAdd(float a, float b, float c) => MathF.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Add(float a, float b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sub(float a, float b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Mul(float a, float b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Div(float a, float b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Max(float a, float b) => MathF.Max(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Exp(float x) => FastExp.Exp(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Exp2(float x) => FastExp.Exp2(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(float v) => v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(float v) => v;
}

/// <summary>A kernel body generic over the vector width; <see cref="SimdWidth.Run"/> calls it at the width chosen for this machine.</summary>
internal interface ISimdKernel
{
    void Run<TS, TV>() where TS : struct, ISimd<TV> where TV : unmanaged;
}

/// <summary>
/// The one place the fused kernels' vector width is chosen, by capability: the widest of 512, 256 and 128 bits that the
/// runtime reports hardware-accelerated (so <c>DOTNET_EnableAVX512=0</c>, <c>DOTNET_EnableAVX2=0</c> or an ARM64 machine
/// narrow it), else one float at a time. The scalar fallback is correct but slower than the TorchSharp ops path, whose
/// libtorch code is vectorised whatever the .NET runtime allows: <see cref="AttentionKernel.Auto"/> uses the fused kernels
/// only when <see cref="Vectorised"/>.
/// </summary>
internal static class SimdWidth
{
    /// <summary>Bits per vector the kernels use: 512, 256, 128, or 32 (scalar). Fixed for the process (a static readonly,
    /// so the JIT drops the other branches of <see cref="Run"/>).</summary>
    public static readonly int Bits =
        Vector512.IsHardwareAccelerated ? 512 : Vector256.IsHardwareAccelerated ? 256 : Vector128.IsHardwareAccelerated ? 128 : 32;

    /// <summary>True when some vector width is hardware-accelerated (the fused kernels then beat the ops path).</summary>
    public static bool Vectorised => Bits > 32;

    /// <summary>Runs <paramref name="kernel"/> specialised for <see cref="Bits"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Run<TK>(ref TK kernel) where TK : struct, ISimdKernel
    {
        switch (Bits)
        {
            case 512: kernel.Run<Simd512, Vector512<float>>(); break;
            case 256: kernel.Run<Simd256, Vector256<float>>(); break;
            case 128: kernel.Run<Simd128, Vector128<float>>(); break;
            default: kernel.Run<SimdScalar, float>(); break;
        }
    }
}
