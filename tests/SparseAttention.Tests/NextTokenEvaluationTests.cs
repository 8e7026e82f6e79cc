using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>The shared held-out evaluation against per-window log-softmax sums computed here.</summary>
public sealed class NextTokenEvaluationTests : TrainTestBase
{
    private static RoutingTransformerLM Fresh()
    {
        random.manual_seed(5);
        var model = new RoutingTransformerLM(MicroConfig);
        model.eval();
        using (no_grad()) model.forward(tensor(TrainBytes[..64].Select(b => (long)b).ToArray(), new long[] { 4, 16 }), null);   // k-means initialised
        return model;
    }

    [Fact]
    public void Windows_of_mixed_lengths_sum_to_the_log_softmax_by_hand_for_any_batch_size()
    {
        using var model = Fresh();
        TokenText data = ValBytes;
        var windows = new List<(long Start, int Length)> { (0, 16), (15, 16), (30, 5), (100, 16), (200, 2) };
        double nats = 0;
        long predicted = 0;
        using (no_grad())
            foreach (var (start, length) in windows)
            {
                var ids = ValBytes[(int)start..((int)start + length)];
                var logProbs = model.forward(tensor(ids.Select(b => (long)b).ToArray(), new long[] { 1, length }), null)
                    .Logits[0].to(ScalarType.Float64).log_softmax(-1);                                       // (T, 256)
                for (int t = 0; t + 1 < length; t++) { nats -= logProbs[t, ids[t + 1]].item<double>(); predicted++; }
            }
        model.train();
        foreach (int batchSize in new[] { 1, 2, 7 })
        {
            var natsByPosition = new double[15];
            var bytesByPosition = new long[15];
            var result = NextTokenEvaluation.Run(model, data, windows, batchSize, natsByPosition, bytesByPosition);
            Assert.Equal(predicted, result.Tokens);
            Assert.Equal(predicted, result.Bytes);                                                        // bytes: one per token
            Assert.True(Math.Abs(result.Nats - nats) <= 1e-5 * nats, $"batch {batchSize}: {result.Nats} vs by hand {nats}");
            Assert.Equal(result.Nats, natsByPosition.Sum(), 1e-9);
            Assert.Equal(5, bytesByPosition[0]);                                                          // every window predicts position 1
            Assert.Equal(3, bytesByPosition[14]);                                                         // only the three full windows reach 15
            Assert.True(model.training, "the model's training mode is restored");
        }
    }

    [Fact]
    public void Bad_windows_and_batch_sizes_are_refused_by_name()
    {
        using var model = Fresh();
        TokenText data = ValBytes;
        Assert.Equal("windows", Assert.Throws<ArgumentException>(() => NextTokenEvaluation.Run(model, data, [(0, 1)], 4)).ParamName);
        Assert.Equal("windows", Assert.Throws<ArgumentException>(() => NextTokenEvaluation.Run(model, data, [(data.Length - 3, 4)], 4)).ParamName);
        Assert.Equal("batchSize", Assert.Throws<ArgumentException>(() => NextTokenEvaluation.Run(model, data, [(0, 4)], 0)).ParamName);
    }
}
