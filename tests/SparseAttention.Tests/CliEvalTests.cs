using System.Text.Json;
using SparseAttention.Cli;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public sealed class CliEvalTests : TrainedModelTestBase
{
    [Fact]
    public void Json_bpc_equals_the_loss_computed_by_hand_on_the_same_windows()
    {
        string checkpoint = TrainCheckpoint();
        var text = Text[100..(100 + 16 * 7 + 5)];                    // 117 bytes: 7 full windows of 16 (stride 15) and a short one
        string data = Path.Combine(Dir, "eval.txt");
        File.WriteAllBytes(data, text);
        var (code, stdout, stderr) = CliRunner.Run("eval", "--checkpoint", RunDir, "--data", data, "--json", "--batch-size", "3", "--bucket-size", "5");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        Assert.Equal(["bpc", "tokens", "bytes", "loss", "tokenizer", "bucket_size", "bpc_by_position"], doc.RootElement.EnumerateObject().Select(p => p.Name).ToArray());
        Assert.Equal(text.Length - 1, doc.RootElement.GetProperty("bytes").GetInt64());    // bytes: one byte per predicted token
        Assert.Equal(text.Length - 1, doc.RootElement.GetProperty("tokens").GetInt64());   // every byte but the first, once

        // By hand: windows [0,16), [15,31), ..., each predicting its bytes 1.. from the bytes before them; log-softmax in float64.
        double nats = 0;
        long count = 0;
        var bucketNats = new double[4];                                  // positions 1–4, 5–9, 10–14, 15 of the 16-byte windows
        var bucketCount = new long[4];
        using (var trainer = Load(checkpoint))
        {
            trainer.Model.eval();
            using var _ = no_grad();
            for (int start = 0; start + 1 < text.Length; start += 15)
            {
                var window = text[start..Math.Min(start + 16, text.Length)];
                var logits = trainer.Model.forward(tensor(window.Select(b => (long)b).ToArray(), new long[] { 1, window.Length }), null).Logits;
                var logProbs = logits[0].to(ScalarType.Float64).log_softmax(-1);                // (T, 256)
                for (int t = 0; t + 1 < window.Length; t++)
                {
                    double n = -logProbs[t, window[t + 1]].item<double>();
                    nats += n;
                    count++;
                    bucketNats[(t + 1) / 5] += n;                            // the prediction of position t + 1
                    bucketCount[(t + 1) / 5]++;
                }
            }
        }
        Assert.Equal(text.Length - 1, count);
        double expected = nats / count / Math.Log(2);
        double bpc = doc.RootElement.GetProperty("bpc").GetDouble();
        Assert.True(Math.Abs(bpc - expected) <= 1e-6 * expected, $"bpc {bpc} vs by hand {expected}");
        Assert.True(bpc > 0 && bpc < 8.5, $"bpc {bpc}");
        Assert.Equal(5, doc.RootElement.GetProperty("bucket_size").GetInt32());
        var byPosition = doc.RootElement.GetProperty("bpc_by_position").EnumerateArray().Select(e => e.GetDouble()).ToArray();
        Assert.Equal(4, byPosition.Length);
        for (int k = 0; k < 4; k++)
        {
            double bucketExpected = bucketNats[k] / bucketCount[k] / Math.Log(2);
            Assert.True(Math.Abs(byPosition[k] - bucketExpected) <= 1e-6 * bucketExpected, $"bucket {k}: {byPosition[k]} vs by hand {bucketExpected}");
        }

        // A run folder means its newest checkpoint; the plain output says the same figure.
        var plain = CliRunner.Run("eval", "--checkpoint", checkpoint, "--data", data);
        Assert.Contains($"bpc {bpc:F4} over {text.Length - 1} predicted bytes (8 windows of up to 16 bytes)", plain.Out);
        Assert.Contains("bpc by position in the window (buckets of 256): 0–15 ", plain.Out);
    }

    [Fact]
    public void Windows_overlap_by_one_byte_and_cover_every_prediction_once()
    {
        Assert.Equal([(0, 16), (15, 16), (30, 5)], EvalCommand.Windows(35, 16));
        Assert.Equal([(0, 16), (15, 16)], EvalCommand.Windows(31, 16));
        Assert.Equal([(0, 2)], EvalCommand.Windows(2, 16));
        foreach (int n in new[] { 2, 3, 16, 17, 100 })
        {
            var predicted = EvalCommand.Windows(n, 16).SelectMany(w => Enumerable.Range(w.Start + 1, w.Length - 1)).ToList();
            Assert.Equal(Enumerable.Range(1, n - 1), predicted);
        }
    }

    [Fact]
    public void Missing_empty_and_binary_data_are_usage_errors()
    {
        TrainCheckpoint();
        string empty = Path.Combine(Dir, "empty.txt"), binary = Path.Combine(Dir, "b.bin"), latin = Path.Combine(Dir, "latin1.txt");
        File.WriteAllText(empty, "");
        File.WriteAllBytes(binary, [.. Text[..50], 0, 1, 2, .. Text[..50]]);
        File.WriteAllBytes(latin, Enumerable.Range(0, 300).Select(i => (byte)(i % 2 == 0 ? 0xE9 : 'a')).ToArray());
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", Path.Combine(Dir, "nope.txt")), "--data: no such file or folder");
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", empty), "is empty");
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", binary), "looks binary (a NUL byte at offset 50)");
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", latin), "invalid UTF-8 sequences");
        string good = Path.Combine(Dir, "good.txt");
        File.WriteAllBytes(good, Text);
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", Path.Combine(Dir, "none"), "--data", good), "--checkpoint: no such file or folder");
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", good, "--max-bytes", "1"), "--max-bytes must be >= 2");
    }
}
