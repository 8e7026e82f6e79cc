using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention;

/// <summary>
/// Argument checks shared by every public entry point. Each failure is an
/// <see cref="ArgumentException"/> that names the argument, what was expected and what was given.
/// </summary>
internal static class Check
{
    public static void Positive(int value, string name)
    {
        if (value <= 0) throw new ArgumentException($"{name} must be > 0, got {value}.", name);
    }

    public static void NonNegative(int value, string name)
    {
        if (value < 0) throw new ArgumentException($"{name} must be >= 0, got {value}.", name);
    }

    public static void That(bool condition, string name, string message)
    {
        if (!condition) throw new ArgumentException($"{name}: {message}", name);
    }

    public static string ShapeOf(Tensor t) => "(" + string.Join(", ", t.shape) + ")";

    /// <summary>Checks rank and, where <paramref name="expected"/> is non-negative, each dimension.</summary>
    public static void Shape(Tensor t, string name, string layout, params long[] expected)
    {
        bool ok = t.dim() == expected.Length;
        for (int i = 0; ok && i < expected.Length; i++) ok = expected[i] < 0 || t.shape[i] == expected[i];
        if (!ok)
        {
            string want = string.Join(", ", expected.Select(e => e < 0 ? "*" : e.ToString()));
            throw new ArgumentException($"{name} must have shape {layout} = ({want}), got {ShapeOf(t)}.", name);
        }
    }

    public static void FloatingPoint(Tensor t, string name)
    {
        if (!t.is_floating_point())
            throw new ArgumentException($"{name} must be a floating-point tensor, got {t.dtype}.", name);
    }

    public static void SameDtype(Tensor a, string nameA, Tensor b, string nameB)
    {
        if (a.dtype != b.dtype)
            throw new ArgumentException($"{nameB} must have the dtype of {nameA} ({a.dtype}), got {b.dtype}.", nameB);
    }

    public static void Bool(Tensor t, string name)
    {
        if (t.dtype != ScalarType.Bool)
            throw new ArgumentException($"{name} must be a bool tensor (true = may attend), got {t.dtype}.", name);
    }

    /// <summary>q, k, v of shape (B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, Dv), one float dtype.</summary>
    public static void QueryKeyValue(Tensor q, Tensor k, Tensor v)
    {
        Shape(q, "q", "(B, H, Tq, D)", -1, -1, -1, -1);
        Shape(k, "k", "(B, H, Tk, D)", q.shape[0], q.shape[1], -1, q.shape[3]);
        Shape(v, "v", "(B, H, Tk, Dv)", q.shape[0], q.shape[1], k.shape[2], -1);
        FloatingPoint(q, "q");
        SameDtype(q, "q", k, "k");
        SameDtype(q, "q", v, "v");
    }

    /// <summary>Optional key mask (B, Tk), bool, true = a real key that may be attended.</summary>
    public static void KeyMask(Tensor? keyMask, long batch, long keys)
    {
        if (keyMask is null) return;
        Shape(keyMask, "keyMask", "(B, Tk)", batch, keys);
        Bool(keyMask, "keyMask");
    }
}
