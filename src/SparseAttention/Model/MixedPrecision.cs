using System.Text.Json.Serialization;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>The dtype the projections and the feed-forward multiply in (<see cref="TransformerConfig.ComputeDtype"/>).</summary>
[JsonConverter(typeof(JsonStringEnumConverter<ComputeDtype>))]
public enum ComputeDtype
{
    /// <summary>Every matmul in the parameters' dtype (float32 for a float32 model).</summary>
    Float32,
    /// <summary>The q/k/v/out projections and the feed-forward multiply in bfloat16: weights and activations are cast at the
    /// matmul, the parameters (master weights), their gradients, the norms, attention, the residual stream, the loss and the
    /// optimizer stay float32. Pays on CPUs with AVX512_BF16 (oneDNN), where bf16 GEMMs run several times faster than fp32.</summary>
    BFloat16,
}

/// <summary>
/// The one place where a <see cref="ComputeDtype"/> turns into casts (autocast-like, explicit): a linear layer whose
/// input and weights are cast to the compute dtype for the matmul. Autograd sees the casts, so gradients flow back to
/// the float32 master weights in float32.
/// </summary>
internal static class MixedPrecision
{
    /// <summary>The tensor dtype of a compute dtype.</summary>
    public static ScalarType ScalarTypeOf(ComputeDtype dtype) => dtype == ComputeDtype.BFloat16 ? ScalarType.BFloat16 : ScalarType.Float32;

    /// <summary>
    /// x·Wᵀ (+ b) with x, W and b cast to <paramref name="dtype"/> first when they are float32 (other dtypes, e.g. a
    /// float64 model, are left alone). The result stays in the compute dtype: the caller decides where to leave it
    /// (e.g. GELU can run on the bf16 hidden layer before the second matmul).
    /// </summary>
    /// <param name="x">(..., in).</param>
    /// <param name="weight">(out, in).</param>
    /// <param name="bias">Optional (out).</param>
    /// <param name="dtype">The compute dtype.</param>
    /// <returns>(..., out) in the compute dtype (or x's dtype when x is not float32).</returns>
    public static Tensor Linear(Tensor x, Tensor weight, Tensor? bias, ComputeDtype dtype)
    {
        if (dtype == ComputeDtype.Float32 || x.dtype is not (ScalarType.Float32 or ScalarType.BFloat16))
            return nn.functional.linear(x, weight, bias);
        var type = ScalarTypeOf(dtype);
        return nn.functional.linear(x.to(type), weight.to(type), bias?.to(type));
    }
}
