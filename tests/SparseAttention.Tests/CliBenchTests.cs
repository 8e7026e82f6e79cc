using System.Text.Json;
using Xunit;

namespace SparseAttention.Tests;

/// <summary><c>sparse-attn bench</c>: the model rows and their JSON, the machine limits, and bad input refused before
/// anything runs. No timing relation is asserted.</summary>
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
    /// <summary>Exit code 2 and exactly one stderr line that starts with the option's name; nothing was measured.</summary>
    private static void AssertUsageError(string option, string[] args, params string[] mentions)
    {
        var (code, _, stderr) = CliRunner.Run(args);
        var lines = stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.True(code == 2, $"exit code {code}; stderr:\n{stderr}");
        Assert.True(lines.Length == 1, $"expected one line, got:\n{stderr}");
        Assert.StartsWith($"error: {option}", lines[0]);
        foreach (var m in mentions) Assert.Contains(m, lines[0]);
    }

    [Theory]
    [InlineData("--seq-lens")]
    [InlineData("--attention")]
    [InlineData("--impl")]
    [InlineData("--pass")]
    [InlineData("--model-kinds")]
    public void EmptyListsAreUsageErrors(string option) =>
        AssertUsageError(option, option == "--model-kinds" ? ["bench", "--model", option, ""] : ["bench", option, ""]);

    [Fact]
    public void EveryConfigurationIsValidatedBeforeAnyRuns()
    {
        // T = 3 is too short for bigbird's 3 sliding-window blocks of --window 128; the kinds before it would run fine,
        // so a late check would print their progress lines (and measure the GEMM rate) first.
        AssertUsageError("--seq-lens", ["bench", "--seq-lens", "3"], "T = 3", "bigbird", "--window 128");
    }

    [Fact]
    public void SizesBeyondMemoryOrTheIntRangeAreRefusedBeforeAllocating()
    {
        AssertUsageError("--seq-lens", ["bench", "--seq-lens", "1024,2000000000"], "T = 2000000000", "GB available", "limit here is T ≤");
        AssertUsageError("--seq-lens", ["bench", "--seq-lens", "99999999999"], "2147483647");
        AssertUsageError("--batch", ["bench", "--seq-lens", "1024", "--batch", "2000000000", "--heads", "2000000000"], "per token");
        AssertUsageError("--seq-lens", ["bench", "--model", "--seq-lens", "2000000000"], "--model-dim");
    }

    [Fact]
    public void KernelBenchReportsTheMachineLimitsAndWarmUpCalls()
    {
        string path = Path.Combine(Path.GetTempPath(), $"bench-limits-{Guid.NewGuid():N}.json");
        try
        {
            var (code, stdout, stderr) = CliRunner.Run("bench", "--seq-lens", "64", "--attention", "dense,strided", "--impl", "fused",
                "--pass", "forward", "--runs", "1", "--window", "8", "--json", path);
            Assert.True(code == 0, $"exit code {code}; stderr:\n{stderr}");
            Assert.Contains("% of peak", stdout);
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var root = doc.RootElement;
            Assert.True(root.GetProperty("gemm_gflops").GetDouble() > 0);
            Assert.True(root.GetProperty("bf16_gemm_gflops").GetDouble() > 0);
            Assert.True(root.GetProperty("fma_peak_gflops").GetDouble() > 0);
            Assert.Contains(root.GetProperty("fma_vector_bits").GetInt32(), new[] { 32, 256, 512 });
            var rows = root.GetProperty("results").EnumerateArray().ToArray();
            Assert.Equal(["dense", "strided"], rows.Select(r => r.GetProperty("attention").GetString()).ToArray());
            foreach (var row in rows)
            {
                double gflops = row.GetProperty("gflops").GetDouble();
                // Both fractions are the same GFLOP/s over the run's two limits (to the JSON's rounding: 2 decimals of GFLOP/s).
                foreach (var (fraction, limit) in new[] { ("peak_efficiency", "fma_peak_gflops"), ("efficiency", "gemm_gflops") })
                {
                    double expected = gflops / root.GetProperty(limit).GetDouble(), actual = row.GetProperty(fraction).GetDouble();
                    Assert.True(Math.Abs(expected - actual) <= 0.01 * expected + 1e-3, $"{fraction}: {actual} vs {expected}");
                }
                Assert.True(row.GetProperty("warmup_calls").GetInt32() >= 1);
            }
        }
        finally { File.Delete(path); }
    }
}
