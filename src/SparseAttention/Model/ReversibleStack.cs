using SparseAttention.Clustering;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Model;

/// <summary>
/// Reversible layers (RevNet coupling, Gomez et al. 2017, as in the Reformer) with the memory saving that is the
/// point of them: the forward keeps no activations, only the last pair (y1, y2); the backward walks the layers in
/// reverse, rebuilds each layer's inputs from its outputs (x2 = y2 − g(y1), x1 = y1 − f(x2)) and recomputes the
/// two branches with autograd to get the gradients. Memory for activations is one layer's worth instead of Depth
/// layers' worth; the price is one extra forward of every layer.
/// </summary>
/// <remarks>
/// <para>A recompute must compute the same function as the forward did, so per executed layer the tape keeps:
/// the global RNG state before each branch (dropout masks replay exactly; the RNG is put back afterwards) and every
/// k-means module's centroids as they stood before the branch (a forward that initialised the centroids or moved
/// them with <see cref="OnlineKMeans.UpdateOnForward"/> routed with the old ones). Recomputes run with k-means
/// updates suspended, so statistics are accumulated once per forward. LayerDrop decisions are drawn in the forward,
/// at the same points of the RNG stream as in the plain path, and recorded.</para>
/// <para>Parameter gradients are accumulated into <c>.grad</c> by a nested backward over each recomputed branch;
/// the parameters are also passed to the autograd function so that it runs even when the input itself does not
/// require a gradient. The reconstruction x = y − branch(·) is exact in real arithmetic and accurate to rounding in
/// floating point, so gradients match the plain autograd path to a small tolerance, not bit for bit.</para>
/// </remarks>
internal static class ReversibleStack
{
    /// <summary>Everything one call needs: the layers to run and the non-differentiable inputs.</summary>
    internal sealed record Plan(IReadOnlyList<TransformerBlock> Blocks, int[] Schedule, double LayerDropout, bool Training,
        Tensor? InputMask, Tensor? ContextMask, int ParameterCount);

    /// <summary>Runs the layers of <paramref name="plan"/> on <paramref name="x"/> (B, T, Dim).</summary>
    /// <returns>(y1, y2) each (B, T, Dim), and the summed auxiliary loss.</returns>
    public static (Tensor Y1, Tensor Y2, Tensor AuxLoss) Run(Plan plan, Tensor x, Tensor? context, IReadOnlyList<Tensor> parameters)
    {
        var args = new List<object?> { x, context };
        args.AddRange(parameters);
        args.Add(plan with { ParameterCount = parameters.Count });
        var outputs = Function.apply(args.ToArray()!);
        return (outputs[0], outputs[1], outputs[2]);
    }

    /// <summary>What the forward records for one executed layer.</summary>
    private sealed record Step(int Block, Tensor RngBeforeAttention, Tensor RngBeforeFeedForward, (OnlineKMeans KMeans, Tensor Means)[] Centroids)
    {
        public void Dispose()
        {
            RngBeforeAttention.Dispose();
            RngBeforeFeedForward.Dispose();
            foreach (var (_, means) in Centroids) means.Dispose();
        }
    }

    private sealed class Function : autograd.MultiTensorFunction<Function>
    {
        public override string Name => "ReversibleStack";

        public override List<Tensor> forward(autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            var context = vars[1] as Tensor;
            var plan = (Plan)vars[^1];
            var steps = new List<Step>();
            using var scope = NewDisposeScope();
            var aux = zeros(Array.Empty<long>(), dtype: x.dtype, device: x.device);
            Tensor x1 = x.clone(), x2 = x.clone();                                    // (B, T, Dim) each; fresh, so outputs never alias the input
            foreach (int index in plan.Schedule)
            {
                if (plan.Training && plan.LayerDropout > 0 && rand(1).item<float>() < plan.LayerDropout) continue;
                var block = plan.Blocks[index];
                var centroids = OnlineKMeans.All(block).Select(k => (k, k.StoredMeans.DetachFromDisposeScope())).ToArray();
                var rngAttention = get_rng_state().DetachFromDisposeScope();
                Tensor y1, y2, sum;
                using (NewDisposeScope())                                             // frees this layer's temporaries now, not at the end
                {
                    var (f, loss) = block.AttentionBranch(x2, plan.InputMask, context, plan.ContextMask);
                    y1 = (x1 + f).MoveToOuterDisposeScope();
                    var rngFeedForward = get_rng_state().DetachFromDisposeScope();
                    var (g, gLoss) = block.FeedForwardBranch(y1, plan.InputMask);
                    y2 = (x2 + g).MoveToOuterDisposeScope();
                    sum = (aux + loss + gLoss).MoveToOuterDisposeScope();
                    steps.Add(new Step(index, rngAttention, rngFeedForward, centroids));
                }
                Replace(ref x1, y1);
                Replace(ref x2, y2);
                Replace(ref aux, sum);
            }
            // TorchSharp's zero-filling of missing output gradients uses tensors that the caller's dispose scope
            // may already have freed; missing gradients are handled in backward instead.
            ctx.set_materialize_grads(false);
            ctx.save_for_backward(context is null ? [x1, x2] : [x1, x2, context]);
            ctx.save_data("steps", steps);
            ctx.save_data("plan", plan);
            return [x1.MoveToOuterDisposeScope(), x2.MoveToOuterDisposeScope(), aux.MoveToOuterDisposeScope()];
        }

        public override List<Tensor> backward(autograd.AutogradContext ctx, List<Tensor> gradOutputs)
        {
            var saved = ctx.get_saved_variables();
            var steps = (List<Step>)ctx.get_data("steps");
            var plan = (Plan)ctx.get_data("plan");
            // vars at forward time: x, context, parameters…, plan — one gradient entry each.
            var result = new List<Tensor>();
            Tensor dx;
            Tensor? dContext = null;
            var callerRng = get_rng_state();
            try
            {
                using var scope = NewDisposeScope();
                Tensor y1 = saved[0].detach(), y2 = saved[1].detach();                 // (B, T, Dim): outputs of the layer being undone
                Tensor dy1 = Defined(gradOutputs[0])?.clone() ?? zeros_like(y1);
                Tensor dy2 = Defined(gradOutputs[1])?.clone() ?? zeros_like(y2);
                var dAux = Defined(gradOutputs[2]) ?? zeros(Array.Empty<long>(), dtype: y1.dtype, device: y1.device);
                Tensor? context = saved.Count > 2 ? saved[2] : null;
                for (int s = steps.Count - 1; s >= 0; s--)
                {
                    var step = steps[s];
                    var block = plan.Blocks[step.Block];
                    using var suspended = OnlineKMeans.SuspendUpdates(block);
                    Tensor x1, x2, dx1, dx2;
                    using (NewDisposeScope())                                         // frees this layer's recompute now
                    {
                        // Feed-forward branch: y2 = x2 + g(y1).
                        var y1Leaf = y1.detach().requires_grad_(true);
                        Tensor g;
                        set_rng_state(step.RngBeforeFeedForward);
                        using (enable_grad())
                        {
                            var (gOut, gLoss) = block.FeedForwardBranch(y1Leaf, plan.InputMask);
                            g = gOut;
                            var surrogate = (gOut * dy2).sum() + (gLoss * dAux).sum();   // ∂/∂θ = dy2·∂g/∂θ + dAux·∂loss/∂θ
                            surrogate.backward();
                        }
                        x2 = (y2 - g.detach()).detach();
                        dx1 = dy1 + y1Leaf.grad!;                                       // y1 feeds g as well as the output

                        // Attention branch: y1 = x1 + f(x2).
                        var x2Leaf = x2.requires_grad_(true);
                        var contextLeaf = context?.detach().requires_grad_(context.requires_grad);
                        Tensor f;
                        set_rng_state(step.RngBeforeAttention);
                        var restored = step.Centroids.Select(c => c.KMeans.RouteWith(c.Means)).ToList();
                        try
                        {
                            using (enable_grad())
                            {
                                var (fOut, loss) = block.AttentionBranch(x2Leaf, plan.InputMask, contextLeaf, plan.ContextMask);
                                f = fOut;
                                var surrogate = (fOut * dx1).sum() + (loss * dAux).sum();  // ∂/∂θ = dy1·∂f/∂θ + dAux·∂loss/∂θ
                                surrogate.backward();
                            }
                        }
                        finally { restored.ForEach(r => r.Dispose()); }
                        x1 = (y1 - f.detach()).detach().MoveToOuterDisposeScope();
                        dx2 = (dy2 + x2Leaf.grad!).MoveToOuterDisposeScope();             // x2 feeds f as well as y2
                        x2 = x2.detach().MoveToOuterDisposeScope();
                        dx1 = dx1.MoveToOuterDisposeScope();
                        if (contextLeaf?.grad is Tensor cg)
                            dContext = (dContext is null ? cg.clone() : dContext + cg).MoveToOuterDisposeScope();
                    }
                    Replace(ref y1, x1);
                    Replace(ref y2, x2);
                    Replace(ref dy1, dx1);
                    Replace(ref dy2, dx2);
                }
                dx = (dy1 + dy2).MoveToOuterDisposeScope();                             // the stream was duplicated: x1 = x2 = x
                dContext = dContext?.MoveToOuterDisposeScope();
            }
            finally
            {
                set_rng_state(callerRng);
                callerRng.Dispose();
                steps.ForEach(s => s.Dispose());
            }
            result.Add(dx);
            result.Add(dContext!);
            for (int i = 0; i < plan.ParameterCount; i++) result.Add(null!);           // accumulated into .grad above
            result.Add(null!);
            return result;
        }

        private static Tensor? Defined(Tensor? t) => t is null || t.IsInvalid ? null : t;

        /// <summary>Frees <paramref name="slot"/>'s tensor and puts <paramref name="value"/> there (the carried tensors
        /// of the layer loops are owned by the loop).</summary>
        private static void Replace(ref Tensor slot, Tensor value)
        {
            slot.Dispose();
            slot = value;
        }
    }
}
