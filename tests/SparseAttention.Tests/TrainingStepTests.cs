using SparseAttention.Clustering;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>The shared training step against the same step written out by hand with TorchSharp calls.</summary>
public sealed class TrainingStepTests : TrainTestBase
{
    private static RoutingTransformerLM Fresh()
    {
        random.manual_seed(11);
        return new RoutingTransformerLM(MicroConfig);
    }

    private static Tensor Tokens(int seed) =>
        randint(0, 256, new long[] { 3, 16 }, dtype: ScalarType.Int64, generator: new Generator((ulong)seed));   // (B, T)

    private static Tensor[] State(RoutingTransformerLM model) =>
        model.state_dict().Values.Select(t => t.detach().clone()).ToArray();

    [Fact]
    public void Run_matches_a_hand_written_step_with_clipping_and_ignored_targets()
    {
        using var ours = Fresh();
        using var theirs = Fresh();
        using var step = new TrainingStep(ours, 3e-3, weightDecay: 0.05);
        using var optimizer = optim.AdamW(theirs.parameters(), 3e-3, weight_decay: 0.05);
        for (int s = 0; s < 3; s++)
        {
            var tokens = Tokens(s);
            var targets = tokens.clone();
            targets[.., ..5] = tensor(-100L);                                                // only later positions scored
            double lr = 1e-3 * (s + 1);
            using (NewDisposeScope())
            {
                var (logits, loss) = step.Run(tokens, targets, lr, clipNorm: 0.05);
                Assert.Equal(new long[] { 3, 16, 256 }, logits.shape);

                theirs.train();
                optimizer.zero_grad();
                var (theirLogits, aux) = theirs.forward(tokens, null);
                var theirLoss = LanguageModelLoss.NextToken(theirLogits, targets);
                (theirLoss + aux).backward();
                TorchSharp.torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05);
                foreach (var group in optimizer.ParamGroups) group.LearningRate = lr;
                optimizer.step();
                OnlineKMeans.UpdateAll(theirs);
                Assert.Equal(theirLoss.item<float>(), loss.item<float>());
            }
        }
        var a = State(ours);
        var b = State(theirs);
        Assert.Equal(b.Length, a.Length);
        for (int i = 0; i < a.Length; i++) Assert.True(a[i].equal(b[i]).all().item<bool>(), $"state tensor {i} differs");
        Assert.Equal(1e-3 * 3, step.Optimizer.ParamGroups.First().LearningRate);              // the last step's rate
    }

    [Fact]
    public void Accumulated_micro_batches_give_the_gradient_of_their_mean_loss()
    {
        using var ours = Fresh();
        using var theirs = Fresh();
        using var step = new TrainingStep(ours, 1e-3, weightDecay: 0);
        step.Begin();
        double total = 0;
        for (int m = 0; m < 3; m++)
            using (NewDisposeScope()) total += step.Backward(Tokens(m), accumulation: 3).Total.item<float>();

        theirs.train();
        var (l0, a0) = theirs.forward(Tokens(0), null);
        var (l1, a1) = theirs.forward(Tokens(1), null);
        var (l2, a2) = theirs.forward(Tokens(2), null);
        var mean = (LanguageModelLoss.NextToken(l0, Tokens(0)) + a0 + LanguageModelLoss.NextToken(l1, Tokens(1)) + a1
                    + LanguageModelLoss.NextToken(l2, Tokens(2)) + a2) / 3;
        mean.backward();
        Assert.Equal(mean.item<float>(), total / 3, 5);
        var ourGrads = ours.parameters().Select(p => p.grad).ToArray();
        var theirGrads = theirs.parameters().Select(p => p.grad).ToArray();
        for (int i = 0; i < ourGrads.Length; i++)
        {
            if (theirGrads[i] is null) { Assert.Null(ourGrads[i]); continue; }
            Assert.True(ourGrads[i]!.allclose(theirGrads[i]!, rtol: 1e-4, atol: 1e-6), $"gradient {i} differs");
        }
    }

    [Fact]
    public void A_non_finite_total_updates_nothing()
    {
        using var model = Fresh();
        using var step = new TrainingStep(model, 1e-3, weightDecay: 0.01);
        using (NewDisposeScope()) step.Run(Tokens(0), null, 1e-3, clipNorm: 1);           // initialises the k-means
        var before = State(model);
        step.Begin();
        using (NewDisposeScope()) step.Backward(Tokens(1));
        var (gradNorm, skipped) = step.Apply(1e-3, clipNorm: 1, skipNonFinite: true, total: double.NaN);
        Assert.True(skipped);
        Assert.True(double.IsFinite(gradNorm) && gradNorm > 0);
        var after = State(model);
        for (int i = 0; i < before.Length; i++) Assert.True(before[i].equal(after[i]).all().item<bool>(), $"state tensor {i} changed");
        Assert.All(model.parameters(), p => Assert.True(p.grad is null || p.grad.abs().sum().item<float>() == 0));

        // A finite step with the check measures the norm and updates.
        step.Begin();
        using (NewDisposeScope()) step.Backward(Tokens(1));
        var (norm, skippedAgain) = step.Apply(1e-3, clipNorm: 1, skipNonFinite: true, total: 1.0);
        Assert.False(skippedAgain);
        Assert.True(double.IsFinite(norm) && norm > 0);
        Assert.Contains(State(model).Zip(before), pair => !pair.First.equal(pair.Second).all().item<bool>());
    }
}
