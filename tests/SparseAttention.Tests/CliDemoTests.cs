using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Model;
using TorchSharp;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary><c>sparse-attn demo</c>: a tiny run end to end, the recall task's invariants, bad options.</summary>
public sealed class CliDemoTests
{
    [Fact]
    public void TinyDemoRunsEndToEndAndWritesJsonAndPictures()
    {
        string dir = Directory.CreateTempSubdirectory("sparse-attn-demo-").FullName;
        try
        {
            string json = Path.Combine(dir, "demo.json"), pictures = Path.Combine(dir, "pictures");
            var (code, stdout, stderr) = CliRunner.Run("demo", "--steps", "3", "--seq-len", "256", "--batch", "2", "--eval-sequences", "3",
                "--seed", "5", "--out", pictures, "--json", json);
            Assert.True(code == 0, $"exit code {code}; stderr:\n{stderr}");
            Assert.Contains("held-out accuracy", stdout);
            Assert.Contains("worked examples", stdout);

            using var doc = JsonDocument.Parse(File.ReadAllText(json));
            var root = doc.RootElement;
            Assert.Equal(["task", "seq_len", "models"], root.EnumerateObject().Select(p => p.Name).ToArray());
            Assert.Equal(JsonValueKind.String, root.GetProperty("task").ValueKind);
            Assert.Equal(256, root.GetProperty("seq_len").GetInt32());
            var models = root.GetProperty("models").EnumerateArray().ToArray();
            Assert.Equal(["local", "routing"], models.Select(m => m.GetProperty("name").GetString()).ToArray());
            var settings = new DemoSettings(256, 3, 2, 5, 3);
            foreach (var m in models)
            {
                Assert.Equal(["name", "params", "train_seconds", "accuracy", "chance"], m.EnumerateObject().Select(p => p.Name).ToArray());
                Assert.True(m.GetProperty("params").GetInt64() > 0);
                Assert.True(m.GetProperty("train_seconds").GetDouble() > 0);
                double accuracy = m.GetProperty("accuracy").GetDouble();
                Assert.InRange(accuracy, 0, 1);
                // 3 sequences × Queries answers: the accuracy is a multiple of 1 / (3 · Queries).
                double answers = 3 * settings.Queries;
                Assert.Equal(Math.Round(accuracy * answers), accuracy * answers, 2);
                Assert.Equal(1.0 / settings.NumValues, m.GetProperty("chance").GetDouble(), 4);
            }
            // Same size: routing heads add no parameters (k-means centroids are buffers).
            Assert.Equal(models[0].GetProperty("params").GetInt64(), models[1].GetProperty("params").GetInt64());
            using (var local = new RoutingTransformerLM(settings.Config(routing: false)))
                Assert.Equal(local.parameters().Sum(p => p.numel()), models[0].GetProperty("params").GetInt64());

            foreach (string name in new[] { "demo-curves.png", "demo-clusters.png" })
            {
                string path = Path.Combine(pictures, name);
                Assert.True(File.Exists(path), $"{name} missing");
                Assert.False(File.Exists(path + ".tmp"));
                byte[] png = File.ReadAllBytes(path);
                Assert.Equal(new byte[] { 0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A }, png[..8]);
                using var decoded = SkiaSharp.SKBitmap.Decode(path);
                Assert.NotNull(decoded);
                Assert.InRange(decoded.Width, 600, 4000);
                Assert.InRange(decoded.Height, 300, 4000);
            }
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    /// <summary>How far (in tokens) information can travel through one local layer, read off the compiled
    /// local pattern (largest query − key distance allowed) plus one token of token shift per sublayer.</summary>
    private static int ReachPerLayer(TransformerConfig config)
    {
        var local = config.HeadGroupsForLayer(0).Single(g => g.Kind == HeadGroupKind.Local);
        int seqLen = config.MaxSeqLen;
        var mask = local.Pattern!.Compile(seqLen, config.BlockSize, 1);
        using var dense = mask.ToDense();                                                  // (1, T, T)
        var allowed = dense.data<bool>().ToArray();
        int reach = 0;
        for (int q = 0; q < seqLen; q++)
            for (int k = 0; k < seqLen; k++)
                if (allowed[q * seqLen + k]) reach = Math.Max(reach, q - k);
        return reach + 2;
    }

    [Theory]
    [InlineData(256, 1)]
    [InlineData(512, 2)]
    [InlineData(1024, 3)]
    public void TaskAnswersAreTheStoredValuesAndRecordsLieBeyondTheLocalReach(int seqLen, int seed)
    {
        var settings = new DemoSettings(seqLen, 1, 1, seed, 1);
        var task = settings.Task.Validate();
        int reach = settings.Depth * ReachPerLayer(settings.Config(routing: false));
        Assert.Equal(reach, settings.LocalReach);
        var rng = new Random(seed);
        for (int n = 0; n < 50; n++)
        {
            var e = task.Sample(rng);
            var tokens = e.Tokens;
            Assert.Equal(seqLen, tokens.Length);
            Assert.All(tokens, t => Assert.InRange(t, 0, task.Vocab - 1));
            Assert.Equal(task.Queries, e.AnswerPositions.Length);
            bool IsKey(long t) => t >= RecallTask.FirstKey && t < task.FirstValue;
            bool IsValue(long t) => t >= task.FirstValue;

            // The memory: Pairs records "value key" and filler, nothing else; keys distinct.
            var memory = tokens[..task.QueryStart];
            Assert.Equal(task.Pairs, memory.Count(IsKey));
            Assert.Equal(task.Pairs, memory.Count(IsValue));
            Assert.Equal(task.Pairs, memory.Where(IsKey).Distinct().Count());
            Assert.Equal(task.QueryStart - 2 * task.Pairs, memory.Count(t => t == RecallTask.Filler));
            for (int p = 0; p < memory.Length; p++)
                if (IsKey(memory[p])) Assert.True(p > 0 && IsValue(memory[p - 1]), $"key at {p} has no value before it");

            var asked = new HashSet<long>();
            for (int i = 0; i < task.Queries; i++)
            {
                int a = e.AnswerPositions[i], r = e.RecordPositions[i];
                Assert.Equal(task.QueryStart + 3 * i + 1, a);
                Assert.Equal(RecallTask.Marker, tokens[a - 1]);
                Assert.True(IsKey(tokens[a]));
                Assert.True(asked.Add(tokens[a]), "a key is asked twice");
                // The answer is the value stored before the only earlier occurrence of the key.
                int stored = Array.IndexOf(memory, tokens[a]);
                Assert.Equal(stored, r);
                Assert.Equal(tokens[r - 1], tokens[a + 1]);
                Assert.Equal(tokens[a + 1], e.Answer(i));
                // Both tokens of the record are beyond the local model's reach from the question.
                Assert.True(a - r > reach, $"record at {r} is within the local reach {reach} of the question at {a}");
            }
        }
    }

    [Fact]
    public void TargetsScoreOnlyTheAnswers()
    {
        var task = new DemoSettings(256, 1, 1, 1, 1).Task.Validate();
        var (tokens, targets, examples) = task.Batch(3, new Random(4));
        Assert.Equal([3L, 256], tokens.shape);
        Assert.Equal([3L, 256], targets.shape);
        var t = targets.data<long>().ToArray();
        var x = tokens.data<long>().ToArray();
        for (int b = 0; b < 3; b++)
        {
            var answers = examples[b].AnswerPositions.Select(a => a + 1).ToHashSet();
            for (int p = 0; p < 256; p++)
                Assert.Equal(answers.Contains(p) ? x[b * 256 + p] : -100, t[b * 256 + p]);
        }
    }

    [Fact]
    public void LocalModelCannotSeeTheRecordsButTheRoutingModelCan()
    {
        var settings = new DemoSettings(256, 1, 1, 1, 1);
        var task = settings.Task.Validate();
        const int Sequences = 8;
        var (before, _, examples) = task.Batch(Sequences, new Random(9));                  // (B, T)
        var x = before.data<long>().ToArray();
        // Replace every record by a different one (other keys and values), the questions untouched.
        for (int b = 0; b < Sequences; b++)
            for (int p = 0; p < task.QueryStart; p++)
            {
                long t = x[b * 256 + p];
                if (t == RecallTask.Filler) continue;
                x[b * 256 + p] = t >= task.FirstValue
                    ? task.FirstValue + (t - task.FirstValue + 1) % task.NumValues
                    : RecallTask.FirstKey + (t - RecallTask.FirstKey + 1) % task.NumKeys;
            }
        var changed = tensor(x, new long[] { Sequences, 256 });
        Assert.False(changed.equal(before).all().item<bool>());
        var answers = tensor(examples.SelectMany((e, b) => e.AnswerPositions.Select(a => (long)b * 256 + a)).ToArray());
        foreach (bool routing in new[] { false, true })
        {
            random.manual_seed(3);
            using var model = new RoutingTransformerLM(settings.Config(routing));
            model.train();
            model.forward(before);                                        // initialises the k-means
            model.eval();
            using var noGrad = no_grad();
            var a = model.forward(before).Logits.reshape(-1, task.Vocab).index_select(0, answers);   // (B·Queries, V)
            var c = model.forward(changed).Logits.reshape(-1, task.Vocab).index_select(0, answers);
            double diff = (a - c).abs().max().item<float>();
            if (routing) Assert.True(diff > 1e-4, $"routing model's answers ignore the records (max change {diff})");
            else Assert.Equal(0.0, diff);
        }
    }

    [Fact]
    public void RoutingCaptureRecordsTheDemoModelsMemberships()
    {
        var settings = new DemoSettings(256, 1, 1, 1, 1);
        random.manual_seed(2);
        using var model = new RoutingTransformerLM(settings.Config(routing: true));
        var group = model.modules().OfType<RoutingHeadGroup>().First();
        var (tokens, _, _) = settings.Task.Batch(2, new Random(1));
        model.eval();
        using var noGrad = no_grad();
        model.forward(tokens);
        using var capture = RoutingCapture.Start();
        Assert.Empty(capture.Records);                                                     // forwards before the capture are not recorded
        model.forward(tokens);
        Assert.Equal(model.modules().OfType<RoutingHeadGroup>().Count(), capture.Records.Count);
        var record = capture.Records.First(r => ReferenceEquals(r.Group, group));
        var queries = record.QueryIndices;                                                 // (B, Hg, G, W)
        var clusters = record.GroupClusters;                                               // (B, Hg, G)
        Assert.Equal(4, queries.dim());
        Assert.Equal([2L, group.Heads, queries.shape[2]], clusters.shape);
        // Causal routing: every position is the query of exactly one group, in every head.
        var q = queries.data<long>().ToArray();
        long perRow = queries.shape[2] * queries.shape[3];
        for (long row = 0; row < 2 * group.Heads; row++)
        {
            var positions = q.Skip((int)(row * perRow)).Take((int)perRow).Where(p => p >= 0).OrderBy(p => p).ToArray();
            Assert.Equal(Enumerable.Range(0, 256).Select(p => (long)p).ToArray(), positions);
        }
        Assert.All(clusters.data<long>().ToArray(), v => Assert.InRange(v, -1, settings.Clusters - 1));
    }

    [Theory]
    [InlineData(new[] { "--steps", "0" }, "--steps")]
    [InlineData(new[] { "--steps", "many" }, "--steps")]
    [InlineData(new[] { "--batch", "-1" }, "--batch")]
    [InlineData(new[] { "--eval-sequences", "0" }, "--eval-sequences")]
    [InlineData(new[] { "--seq-len", "260" }, "--seq-len")]
    [InlineData(new[] { "--seq-len", "128" }, "--seq-len")]
    [InlineData(new[] { "--out", "" }, "--out")]
    public void BadOptionsExitWithUsageErrorNamingTheOption(string[] args, string option)
    {
        var (code, _, stderr) = CliRunner.Run(["demo", .. args]);
        Assert.Equal(CliApp.UsageError, code);
        string err = stderr.TrimEnd();
        Assert.StartsWith("error: ", err);
        Assert.DoesNotContain("\n", err);
        Assert.Contains(option, err);
    }
}
