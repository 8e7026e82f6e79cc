using SkiaSharp;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Patterns;
using Xunit;

namespace SparseAttention.Tests;

public sealed class CliPlotTests : TrainedModelTestBase
{
    private static SKBitmap Png(string path)
    {
        var bytes = File.ReadAllBytes(path);
        Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, bytes[..8]);
        var bitmap = SKBitmap.Decode(bytes);
        Assert.NotNull(bitmap);
        return bitmap;
    }

    private static bool HasColor(SKBitmap bitmap, Func<SKColor, bool> match)
    {
        for (int y = 0; y < bitmap.Height; y += 1)
            for (int x = 0; x < bitmap.Width; x += 1)
                if (match(bitmap.GetPixel(x, y))) return true;
        return false;
    }

    [Fact]
    public void Curves_draw_training_loss_and_validation_bpc_from_the_run_log()
    {
        string data = Path.Combine(Dir, "data.txt");
        File.WriteAllBytes(data, Text);
        var train = CliRunner.Run("train", "--data", data, "--out", RunDir, "--preset", WriteMicroPreset(), "--batch-size", "4", "--eval-batches", "1",
            "--warmup", "2", "--val-fraction", "0.1", "--threads", "1", "--max-steps", "6", "--log-every", "2", "--eval-every", "3");
        Assert.True(train.Code == 0, train.Err);
        string png = Path.Combine(Dir, "curves.png");
        var (code, stdout, stderr) = CliRunner.Run("plot", "curves", "--run", RunDir, "--out", png);
        Assert.True(code == 0, stderr);
        Assert.Contains("3 training points, 3 validation points", stdout);
        using var bitmap = Png(png);
        Assert.Equal((900, 540), (bitmap.Width, bitmap.Height));
        Assert.True(HasColor(bitmap, c => c.Red < 90 && c.Green > 110 && c.Blue > 160), "no training-loss line (steel blue)");
        Assert.True(HasColor(bitmap, c => c.Red > 230 && c.Green < 100 && c.Blue < 40), "no validation markers (orange red)");

        AssertUsageError(CliRunner.Run("plot", "curves", "--run", Path.Combine(Dir, "none"), "--out", png), "--run: no such log");
        File.WriteAllText(Path.Combine(Dir, "bad.jsonl"), "{\"step\":1,\"loss\":2}\nnot json\n");
        AssertUsageError(CliRunner.Run("plot", "curves", "--run", Path.Combine(Dir, "bad.jsonl"), "--out", png), "line 2 is not a log line");
    }

    [Fact]
    public void Positions_draw_bpc_by_position_from_eval_json_outputs()
    {
        TrainCheckpoint();
        string data = Path.Combine(Dir, "positions.txt");
        File.WriteAllBytes(data, Text[..200]);
        var eval = CliRunner.Run("eval", "--checkpoint", RunDir, "--data", data, "--json", "--bucket-size", "4");
        Assert.True(eval.Code == 0, eval.Err);
        string first = Path.Combine(Dir, "micro.json"), second = Path.Combine(Dir, "micro again.json");
        File.WriteAllText(first, eval.Out);
        File.WriteAllText(second, eval.Out.Replace("\"bpc_by_position\":[", "\"bpc_by_position\":[null, "));   // an empty bucket is skipped
        string png = Path.Combine(Dir, "positions.png");
        var (code, stdout, stderr) = CliRunner.Run("plot", "positions", "--eval", first, "--eval", second, "--out", png);
        Assert.True(code == 0, stderr);
        Assert.Contains("2 model(s)", stdout);
        using var bitmap = Png(png);
        Assert.Equal((900, 540), (bitmap.Width, bitmap.Height));
        Assert.True(HasColor(bitmap, c => c.Red < 60 && c.Green > 100 && c.Green < 140 && c.Blue > 160), "no first line (blue)");
        Assert.True(HasColor(bitmap, c => c.Red > 190 && c.Green < 60 && c.Blue < 60), "no second line (red)");

        AssertUsageError(CliRunner.Run("plot", "positions", "--eval", Path.Combine(Dir, "none.json"), "--out", png), "--eval: no such file");
        File.WriteAllText(Path.Combine(Dir, "old.json"), "{\"bpc\":2.0}");
        AssertUsageError(CliRunner.Run("plot", "positions", "--eval", Path.Combine(Dir, "old.json"), "--out", png), "is not an output of eval --json");
        AssertUsageError(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", data, "--bucket-size", "0"), "--bucket-size must be > 0");
    }

    [Fact]
    public void Attention_masks_follow_the_patterns_and_the_chosen_clusters()
    {
        string checkpoint = TrainCheckpoint();
        var text = Text[..16];
        List<HeadAttention> heads;
        using (var trainer = Load(checkpoint)) heads = AttentionPlotCommand.Compute(trainer.Model, text);
        Assert.Equal([(0, 0, HeadGroupKind.Local), (0, 1, HeadGroupKind.Routing)], heads.Select(h => (h.Layer, h.Head, h.Kind)));

        // Local head: exactly the configured window pattern, compiled independently here.
        var plan = MicroConfig.HeadGroupsForLayer(0)[0];
        using (var dense = plan.Pattern!.Compile(16, 8, 1).ToDense())
            Assert.Equal(dense.data<bool>().ToArray(), heads[0].Allowed);

        // Routing head: causal, every token routed, keys only from the query's own cluster, and not trivially diagonal.
        var routing = heads[1];
        Assert.All(routing.Cluster!, c => Assert.InRange(c, 0, MicroConfig.MaxSeqLen / MicroConfig.WindowSize - 1));
        int offDiagonal = 0;
        for (int q = 0; q < 16; q++)
        {
            Assert.Contains(true, routing.Allowed.AsSpan(q * 16, 16).ToArray());   // every query sees something
            for (int k = 0; k < 16; k++)
            {
                if (!routing.Allowed[q * 16 + k]) continue;
                Assert.True(k <= q, $"query {q} may attend future key {k}");
                Assert.Equal(routing.Cluster![q], routing.Cluster![k]);
                if (k != q) offDiagonal++;
            }
        }
        Assert.True(offDiagonal > 0, "routing head attends nothing but itself");

        string png = Path.Combine(Dir, "attn.png");
        var (code, stdout, stderr) = CliRunner.Run("plot", "attention", "--checkpoint", RunDir, "--text", "The quick brown", "--out", png);
        Assert.True(code == 0, stderr);
        Assert.Contains("attn-clusters.png", stdout);
        using (var masks = Png(png)) Assert.True(HasColor(masks, c => c.Red != c.Green || c.Green != c.Blue), "no cluster colours in the masks");
        using (var clusters = Png(Path.Combine(Dir, "attn-clusters.png"))) Assert.True(clusters.Width >= 720);

        string data = Path.Combine(Dir, "d.txt");
        File.WriteAllBytes(data, Text);
        (code, _, stderr) = CliRunner.Run("plot", "attention", "--checkpoint", checkpoint, "--data", data, "--offset", "40", "--length", "12", "--out", png);
        Assert.True(code == 0, stderr);
        AssertUsageError(CliRunner.Run("plot", "attention", "--checkpoint", RunDir, "--text", "0123456789abcdefg", "--out", png), "--text: 17 bytes is longer than the model's context");
        AssertUsageError(CliRunner.Run("plot", "attention", "--checkpoint", RunDir, "--data", data, "--length", "17", "--out", png), "--length: 17 is longer than the model's context");
        AssertUsageError(CliRunner.Run("plot", "attention", "--checkpoint", RunDir, "--text", "a", "--data", data, "--out", png), "give exactly one");
        AssertUsageError(CliRunner.Run("plot", "attention", "--checkpoint", RunDir, "--data", data, "--offset", "999999", "--out", png), "--offset: 999999 is past the end");
    }

    [Fact]
    public void Attention_masks_of_lsh_and_synthesizer_heads_come_from_the_forward()
    {
        var config = MicroConfig with
        {
            Heads = 4, NLocalAttnHeads = [1],
            Lsh = new SparseAttention.Model.LshSpec { Heads = 2, NHashes = 1, BucketSize = 4 },
            Synthesizer = new SynthesizerSpec { Heads = 1, Kind = SparseAttention.Modules.SynthesizerKind.Random },
        };
        TorchSharp.torch.random.manual_seed(3);
        using var model = new RoutingTransformerLM(config);
        var text = Text[..16];
        var heads = AttentionPlotCommand.Compute(model, text);
        Assert.Equal([HeadGroupKind.Local, HeadGroupKind.Lsh, HeadGroupKind.Lsh, HeadGroupKind.Synthesizer], heads.Select(h => h.Kind));
        foreach (var h in heads.Where(h => h.Kind == HeadGroupKind.Lsh))
        {
            Assert.NotNull(h.Cluster);
            for (int q = 0; q < 16; q++)
            {
                Assert.Contains(true, h.Allowed.AsSpan(q * 16, 16).ToArray());            // every query attends something
                for (int k = 0; k < 16; k++)
                    if (h.Allowed[q * 16 + k])
                    {
                        Assert.True(k <= q, $"head {h.Head}: query {q} attends later key {k}");
                        // One hash round, causal: chunks hold a single bucket, so attended keys share the query's bucket.
                        Assert.Equal(h.Cluster![q], h.Cluster![k]);
                    }
            }
        }
        var synthesizer = heads.Single(h => h.Kind == HeadGroupKind.Synthesizer);
        for (int q = 0; q < 16; q++)
            for (int k = 0; k < 16; k++) Assert.Equal(k <= q, synthesizer.Allowed[q * 16 + k]);
    }
}
