using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Kernels;

/// <summary>
/// Activation checkpointing for one differentiable function of tensors: the forward keeps only the inputs, the backward
/// runs the function again under autograd and differentiates that. For tensor-op paths whose intermediates are several
/// times the size of their inputs (score-sized tensors over the attended pairs), so that each layer's intermediates
/// exist only while that layer runs forward or backward instead of from the forward of every layer to its backward.
/// </summary>
/// <remarks>The function must be deterministic (no random numbers) and must reach every tensor it uses through its
/// argument array: tensors it captured would be neither differentiated nor kept alive for the backward.</remarks>
internal sealed class Recomputation : autograd.SingleTensorFunction<Recomputation>
{
    public override string Name => "Recomputation";

    /// <summary><paramref name="function"/>(<paramref name="inputs"/>), differentiable in every floating-point input
    /// that requires a gradient; a plain call when nothing needs a gradient.</summary>
    public static Tensor Of(Func<Tensor?[], Tensor> function, params Tensor?[] inputs)
    {
        if (!is_grad_enabled() || !inputs.Any(t => t is not null && t.requires_grad)) return function(inputs);
        return apply([function, .. inputs]);
    }

    public override Tensor forward(autograd.AutogradContext ctx, params object[] vars)
    {
        var function = (Func<Tensor?[], Tensor>)vars[0];
        var inputs = vars.Skip(1).Select(x => x as Tensor).ToArray();
        ctx.save_for_backward([.. inputs.OfType<Tensor>()]);
        ctx.save_data("function", function);
        ctx.save_data("present", inputs.Select(t => t is not null).ToArray());
        ctx.save_data("differentiable", inputs.Select(t => t is not null && t.requires_grad).ToArray());
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        return function(inputs).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(autograd.AutogradContext ctx, Tensor grad)
    {
        var function = (Func<Tensor?[], Tensor>)ctx.get_data("function");
        var present = (bool[])ctx.get_data("present");
        var differentiable = (bool[])ctx.get_data("differentiable");
        var saved = ctx.get_saved_variables();
        using var scope = NewDisposeScope();
        var inputs = new Tensor?[present.Length];
        for (int i = 0, next = 0; i < present.Length; i++)
            if (present[i])
                inputs[i] = differentiable[i] ? saved[next++].detach().requires_grad_(true) : saved[next++];
        var leaves = Enumerable.Range(0, inputs.Length).Where(i => differentiable[i]).ToArray();
        IList<Tensor> grads;
        using (enable_grad())
        {
            var output = function(inputs);
            grads = autograd.grad([output], [.. leaves.Select(i => inputs[i]!)], [grad], allow_unused: true);
        }
        var result = new List<Tensor> { null! };                                       // the function
        for (int i = 0, g = 0; i < inputs.Length; i++)
            result.Add(differentiable[i] ? (grads[g++] ?? zeros_like(inputs[i]!)).MoveToOuterDisposeScope() : null!);
        return result;
    }
}
