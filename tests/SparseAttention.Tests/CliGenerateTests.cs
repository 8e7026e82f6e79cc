using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary><c>sparse-attn bench --generate</c> and <c>sample</c> with and without the decoding cache. No timing relation
/// is asserted (speed belongs to the bench output, not to tests).</summary>
public sealed class CliGenerateTests : TrainedModelTestBase
{
    [Fact]
    public void GenerateBenchReportsCachedAndUncachedRowsAndMemory()
    {
        string path = Path.Combine(Path.GetTempPath(), $"bench-generate-{Guid.NewGuid():N}.json");
        try
        {
            var (code, stdout, stderr) = CliRunner.Run("bench", "--generate", "--preset", "tiny-routing", "--set", "max_seq_len=64",
                "--positions", "5,40", "--tokens", "4", "--uncached-tokens", "1", "--rss-tokens", "150", "--json", path);
            Assert.True(code == 0, $"exit code {code}; stderr:\n{stderr}");
            Assert.Contains("cached ms/tok", stdout);
            Assert.Contains("memory over 150 cached tokens", stdout);
            using var doc = JsonDocument.Parse(File.ReadAllText(path));
            var rows = doc.RootElement.GetProperty("rows").EnumerateArray().ToArray();
            Assert.Equal([5, 40], rows.Select(r => r.GetProperty("position").GetInt32()).ToArray());
            foreach (var row in rows)
            {
                Assert.True(row.GetProperty("cached_ms_per_token").GetDouble() > 0);
                Assert.True(row.GetProperty("uncached_ms_per_token").GetDouble() > 0);
            }
            var rss = doc.RootElement.GetProperty("rss");
            Assert.Equal(150, rss.GetProperty("tokens").GetInt32());
            Assert.Equal(10, rss.GetProperty("samples").GetArrayLength());
            Assert.Equal(64, doc.RootElement.GetProperty("config").GetProperty("max_seq_len").GetInt32());
        }
        finally { File.Delete(path); }
    }

    [Theory]
    [InlineData("--positions", "60", "exceeds max_seq_len = 64")]
    [InlineData("--positions", "x", "--positions: 'x' is not a positive integer")]
    [InlineData("--tokens", "0", "--tokens must be in [1, 100000]")]
    [InlineData("--preset", "tiny-nothing", "--preset: unknown preset")]
    public void GenerateBenchRefusesBadInputInOneLine(string option, string value, string expected)
    {
        var args = new List<string> { "bench", "--generate", "--preset", "tiny-routing", "--set", "max_seq_len=64", "--tokens", "8" };
        int at = args.IndexOf(option);
        if (at >= 0) args[at + 1] = value;
        else args.AddRange([option, value]);
        var (code, _, stderr) = CliRunner.Run(args.ToArray());
        Assert.Equal(2, code);
        Assert.Contains(expected, stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }

    [Fact]
    public void ATinyTemperatureSamplesLikeGreedyInsteadOfOverflowing()
    {
        // Logits divided by 1e-300 overflow float32 (and float64 for logits above ~1.8e8); sampling works on
        // (logits − max) / T ≤ 0, so the distribution collapses onto the most likely byte: greedy decoding.
        TrainCheckpoint();
        string[] Args(string temperature) => ["sample", "--checkpoint", RunDir, "--prompt", "The", "--max-new-tokens", "30", "--temperature", temperature, "--seed", "4"];
        var tiny = CliRunner.Run(Args("1e-300"));
        var greedy = CliRunner.Run(Args("0"));
        Assert.True(tiny.Code == 0, tiny.Err);
        Assert.Equal(greedy.Out, tiny.Out);
    }

    [Fact]
    public void SamplingFromNonFiniteWeightsFailsWithOneLine()
    {
        using var trainer = Load(TrainCheckpoint());
        using (no_grad()) trainer.Model.parameters().First().view(-1)[0] = double.NaN;
        string weights = Path.Combine(Dir, "nan.safetensors");
        WeightFiles.SaveModel(trainer.Model, weights);
        File.WriteAllText(Path.ChangeExtension(weights, ".json"), ConfigBinding.ToJson(MicroConfig));   // the configuration beside the weights
        var (code, stdout, stderr) = CliRunner.Run("sample", "--checkpoint", weights, "--prompt", "The", "--temperature", "0");
        Assert.Equal(CliApp.Failure, code);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.Contains("NaN or infinite", stderr);
        Assert.False(stdout.Contains('\0'), "NUL bytes printed");
    }

    [Fact]
    public void GenerateRefusesLogitsThatAreNotFinite()
    {
        // A model whose logits are NaN must not print NUL bytes (argmax of NaN): Generate stops with a clear error.
        var prompt = zeros(new long[] { 1, 2 }, dtype: ScalarType.Int64);
        using var module = TorchSharp.torch.nn.Identity();
        var error = Assert.Throws<InvalidOperationException>(() => Model.Sampling.Generate(module, prompt, 5, 8,
            w => full(new long[] { 1, w.shape[1], 4 }, double.NaN), temperature: 0));
        Assert.Contains("non-finite logits", error.Message);
    }

    [Fact]
    public void SampleGivesTheSameTextWithAndWithoutTheCache()
    {
        TrainCheckpoint();
        string[] Args(params string[] extra) => ["sample", "--checkpoint", RunDir, "--prompt", "The quick", "--max-new-tokens", "40",
            "--temperature", "0.8", "--seed", "3", .. extra];
        var cached = CliRunner.Run(Args());
        var uncached = CliRunner.Run(Args("--no-cache"));
        Assert.True(cached.Code == 0, cached.Err);
        Assert.True(uncached.Code == 0, uncached.Err);
        Assert.Equal(uncached.Out, cached.Out);
        Assert.Contains("cached decoding", cached.Err);
        Assert.Contains("re-encoding the context", uncached.Err);
    }
}
