using System.Text.Json;
using Xunit;

namespace SparseAttention.Tests;

/// <summary><c>sparse-attn bench --model</c>: the model rows and their JSON. No timing relation is asserted.</summary>
public sealed class CliBenchTests
{
    [Fact]
    public void ModelBenchWritesThreeModelRowsWithDenseAsTheBaseline()
    {
        string path = Path.Combine(Path.GetTempPath(), $"bench-model-{Guid.NewGuid():N}.json");
        try
        {
            var (code, stdout, stderr) = CliRunner.Run("bench", "--model", "--seq-lens", "256", "--runs", "1",
                "--model-dim", "64", "--model-heads", "2", "--model-depth", "1", "--json", path);
            Assert.True(code == 0, $"exit code {code}; stderr:\n{stderr}");
            Assert.Contains("model training step", stdout);
            Assert.DoesNotContain("attention bench", stdout);   // kernel rows only when --attention/--impl/--pass is given

            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var root = doc.RootElement;
            Assert.Equal(0, root.GetProperty("results").GetArrayLength());
            var rows = root.GetProperty("model_results").EnumerateArray().ToArray();
            Assert.Equal(["dense", "local", "routing"], rows.Select(r => r.GetProperty("model").GetString()).ToArray());
            foreach (var row in rows)
            {
                Assert.Equal(["model", "seq_len", "batch", "dim", "heads", "depth", "ms_per_step", "tokens_per_s", "speedup_vs_dense", "peak_rss_mb"],
                    row.EnumerateObject().Select(p => p.Name).ToArray());
                Assert.Equal(256, row.GetProperty("seq_len").GetInt64());
                Assert.Equal(1, row.GetProperty("batch").GetInt64());
                Assert.Equal(64, row.GetProperty("dim").GetInt64());
                Assert.Equal(2, row.GetProperty("heads").GetInt64());
                Assert.Equal(1, row.GetProperty("depth").GetInt64());
                Assert.True(row.GetProperty("ms_per_step").GetDouble() > 0);
                Assert.True(row.GetProperty("tokens_per_s").GetDouble() > 0);
                Assert.True(row.GetProperty("speedup_vs_dense").GetDouble() > 0);
                Assert.True(row.GetProperty("peak_rss_mb").GetDouble() > 0);
            }
            Assert.Equal(1.0, rows[0].GetProperty("speedup_vs_dense").GetDouble());
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void ModelBenchRejectsAnOddHeadWidth()
    {
        var (code, _, stderr) = CliRunner.Run("bench", "--model", "--seq-lens", "256", "--model-dim", "66", "--model-heads", "2");
        Assert.NotEqual(0, code);
        Assert.Contains("--model-dim", stderr);
    }

    [Fact]
    public void ModelBenchRunsReversibleKindsAndLeavesTheRatioEmptyWithoutDense()
    {
        string path = Path.Combine(Path.GetTempPath(), $"bench-model-{Guid.NewGuid():N}.json");
        try
        {
            var (code, _, stderr) = CliRunner.Run("bench", "--model", "--model-kinds", "local,routing-reversible", "--seq-lens", "256", "--runs", "1",
                "--model-dim", "32", "--model-heads", "2", "--model-depth", "2", "--json", path);
            Assert.True(code == 0, $"exit code {code}; stderr:\n{stderr}");
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var rows = doc.RootElement.GetProperty("model_results").EnumerateArray().ToArray();
            Assert.Equal(["local", "routing-reversible"], rows.Select(r => r.GetProperty("model").GetString()).ToArray());
            Assert.All(rows, r => Assert.Equal(JsonValueKind.Null, r.GetProperty("speedup_vs_dense").ValueKind));
            Assert.All(rows, r => Assert.True(r.GetProperty("ms_per_step").GetDouble() > 0));
        }
        finally { File.Delete(path); }
        var (badCode, _, badErr) = CliRunner.Run("bench", "--model", "--model-kinds", "local,reformer");
        Assert.Equal(2, badCode);
        Assert.Contains("--model-kinds: unknown value 'reformer'", badErr);
    }
}
