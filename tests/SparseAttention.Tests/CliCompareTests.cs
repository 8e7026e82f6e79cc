using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary><c>sparse-attn compare</c> on micro configurations, and the bpc-by-position evaluation it reports.</summary>
public sealed class CliCompareTests : TrainTestBase
{
    private string Data()
    {
        string path = Path.Combine(Dir, "text.txt");
        if (!File.Exists(path)) File.WriteAllBytes(path, Text);
        return path;
    }

    /// <summary>compare with two micro configurations (routing+local, local-only) and an equal-token budget of 8 steps.</summary>
    private string[] Args(string outDir, params string[] extra)
    {
        string preset = WriteMicroPreset();
        return ["compare", "--data", Data(), "--out", outDir, "--config", $"mixed={preset}", "--config", $"local={preset}:set n_local_attn_heads=[2]",
            "--budget-tokens", "512", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2", "--warmup", "2", "--position-buckets", "3", .. extra];
    }

    private static JsonElement Results(string outDir) => JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "results.json"))).RootElement.GetProperty("results");

    /// <summary>Every figure that depends on the training (not on the clock): steps, tokens, val bpc, bpc by position, log.</summary>
    private static string Deterministic(string outDir) => string.Join("\n", Results(outDir).EnumerateArray().Select(r =>
        $"{r.GetProperty("name")} {r.GetProperty("parameters")} {r.GetProperty("steps")} {r.GetProperty("tokens")} {r.GetProperty("val_bpc").GetDouble():R} " +
        string.Join(",", r.GetProperty("bpc_by_position").EnumerateArray().Select(b => b.GetDouble().ToString("R"))) + " | " +
        string.Join(",", CompareCommand.ReadLog(Path.Combine(outDir, r.GetProperty("name").GetString()!, "log.jsonl")).Select(p => $"{p.Step}:{p.ValBpc:R}"))));

    [Fact]
    public void Equal_tokens_runs_are_reproducible_bit_for_bit_and_report_every_configuration()
    {
        string a = Path.Combine(Dir, "a"), b = Path.Combine(Dir, "b");
        var first = CliRunner.Run(Args(a));
        Assert.True(first.Code == 0, first.Err);
        Assert.Equal(0, CliRunner.Run(Args(b)).Code);
        Assert.Equal(Deterministic(a), Deterministic(b));
        var results = Results(a).EnumerateArray().ToArray();
        Assert.Equal(["mixed", "local"], results.Select(r => r.GetProperty("name").GetString()));
        foreach (var r in results)
        {
            Assert.Equal(8, r.GetProperty("steps").GetInt64());                       // ⌈512 / (4·16)⌉
            Assert.Equal(512, r.GetProperty("tokens").GetInt64());
            Assert.Equal(3, r.GetProperty("bpc_by_position").GetArrayLength());
            Assert.True(r.GetProperty("peak_rss_mb").GetDouble() > 0);
        }
        // The two models differ (routing vs local heads), so their figures must differ too.
        Assert.NotEqual(results[0].GetProperty("val_bpc").GetDouble(), results[1].GetProperty("val_bpc").GetDouble());
        Assert.Contains("mixed", first.Out);
        Assert.Contains("bpc by position", first.Out);
        Assert.True(new FileInfo(Path.Combine(a, "compare.png")).Length > 10_000);
        // Log points at steps 0, 3, 6 and the last step 8.
        Assert.Equal([0L, 3, 6, 8], CompareCommand.ReadLog(Path.Combine(a, "local", "log.jsonl")).Select(p => p.Step));
    }

    [Fact]
    public void Configurations_see_the_same_batches_and_seed()
    {
        // Two names for one configuration: identical training, so identical figures.
        string preset = WriteMicroPreset(), outDir = Path.Combine(Dir, "same");
        var r = CliRunner.Run("compare", "--data", Data(), "--out", outDir, "--config", $"one={preset}", "--config", $"two={preset}",
            "--budget-tokens", "384", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--warmup", "2", "--json");
        Assert.True(r.Code == 0, r.Err);
        var lines = Deterministic(outDir).Split('\n');
        Assert.Equal(lines[0]["one".Length..], lines[1]["two".Length..]);
        Assert.Equal(2, JsonDocument.Parse(r.Out).RootElement.GetProperty("results").GetArrayLength());   // --json prints the report
    }

    [Fact]
    public void Interrupted_comparison_resumes_to_the_uninterrupted_result_and_skips_finished_configurations()
    {
        string whole = Path.Combine(Dir, "whole"), parts = Path.Combine(Dir, "parts");
        Assert.Equal(0, CliRunner.Run(Args(whole)).Code);
        try
        {
            // Stop "local" at step 4 (between evaluations): "mixed" finishes first, "local" is left with a checkpoint.
            CompareCommand.StopAfterStep = (name, step) => name == "local" && step == 4;
            var stopped = CliRunner.Run(Args(parts));
            Assert.True(stopped.Code == 0, stopped.Err);
            Assert.Contains("local: stopped at step 4", stopped.Out);
            Assert.False(File.Exists(Path.Combine(parts, "local", "result.json")));
            Assert.False(File.Exists(Path.Combine(parts, "results.json")));
        }
        finally { CompareCommand.StopAfterStep = null; }
        var mixedResult = File.ReadAllText(Path.Combine(parts, "mixed", "result.json"));
        var resumed = CliRunner.Run(Args(parts));
        Assert.True(resumed.Code == 0, resumed.Err);
        Assert.Contains("mixed: finished earlier, skipped", resumed.Out);
        Assert.Contains("local: resumed at step 4", resumed.Out);
        Assert.Equal(mixedResult, File.ReadAllText(Path.Combine(parts, "mixed", "result.json")));
        // The stop added one evaluation at step 4; everything else, and the final figures, equal the uninterrupted run.
        var expected = Deterministic(whole).Split('\n');
        var actual = Deterministic(parts).Split('\n');
        Assert.Equal(expected[0], actual[0]);
        Assert.Equal(expected[1].Split(" | ")[0], actual[1].Split(" | ")[0]);
        Assert.Equal(expected[1].Split(" | ")[1], string.Join(",", actual[1].Split(" | ")[1].Split(',').Where(p => !p.StartsWith("4:"))));
    }

    [Fact]
    public void Parallel_child_processes_give_the_same_results_as_one_process()
    {
        string inProcess = Path.Combine(Dir, "one"), children = Path.Combine(Dir, "children");
        Assert.Equal(0, CliRunner.Run(Args(inProcess)).Code);                          // 1 thread (the test base sets it)
        var r = CliRunner.Run(Args(children, "--parallel", "2"));
        Assert.True(r.Code == 0, r.Err + r.Out);
        Assert.Contains("started (process", r.Out);
        Assert.Equal(Deterministic(inProcess), Deterministic(children));
        Assert.True(File.Exists(Path.Combine(children, "local", "run.txt")));
    }

    [Theory]
    [InlineData("--budget-minutes", "train_seconds")]
    [InlineData("--budget-cpu-minutes", "cpu_seconds")]
    public void Time_budgets_train_each_configuration_at_least_that_long_with_a_constant_rate_after_warm_up(string budget, string clock)
    {
        string outDir = Path.Combine(Dir, "time");
        var args = Args(outDir).ToList();
        int at = args.IndexOf("--budget-tokens");
        args[at] = budget;
        args[at + 1] = "0.01";
        var r = CliRunner.Run([.. args]);
        Assert.True(r.Code == 0, r.Err);
        foreach (var result in Results(outDir).EnumerateArray())
        {
            Assert.True(result.GetProperty(clock).GetDouble() >= 0.6);                // the stop rule: the budget is spent
            Assert.True(result.GetProperty("steps").GetInt64() > 0);
        }
        var plan = JsonDocument.Parse(File.ReadAllText(Path.Combine(outDir, "compare.json"))).RootElement.GetProperty("options");
        Assert.Equal(1.0, plan.GetProperty("min_lr_ratio").GetDouble());
    }

    [Theory]
    [InlineData(new[] { "--budget-tokens", "100", "--budget-minutes", "1" }, "give exactly one")]
    [InlineData(new string[0], "give exactly one")]
    [InlineData(new[] { "--budget-cpu-minutes", "1", "--budget-minutes", "1" }, "give exactly one")]
    [InlineData(new[] { "--budget-cpu-minutes", "-1" }, "--budget-cpu-minutes must be > 0, got -1")]
    [InlineData(new[] { "--budget-tokens", "0" }, "--budget-tokens must be > 0, got 0")]
    [InlineData(new[] { "--budget-tokens", "100", "--parallel", "0" }, "--parallel must be > 0, got 0")]
    [InlineData(new[] { "--budget-tokens", "100", "--position-buckets", "40" }, "--position-buckets must be at most seq_len − 1 = 15, got 40")]
    public void Bad_options_are_usage_errors_naming_the_option(string[] extra, string expected)
    {
        string preset = WriteMicroPreset();
        var r = CliRunner.Run(["compare", "--data", Data(), "--out", Path.Combine(Dir, "bad"), "--config", preset, "--config", $"x={preset}", .. extra]);
        Assert.Equal(CliApp.UsageError, r.Code);
        Assert.Contains(expected, r.Err);
    }

    [Fact]
    public void Bad_configurations_and_changed_settings_are_refused()
    {
        string preset = WriteMicroPreset();
        var one = CliRunner.Run("compare", "--data", Data(), "--out", Path.Combine(Dir, "c"), "--config", preset, "--budget-tokens", "100");
        Assert.Equal(CliApp.UsageError, one.Code);
        Assert.Contains("--config: give at least 2 configurations to compare, got 1", one.Err);
        var unknown = CliRunner.Run("compare", "--data", Data(), "--out", Path.Combine(Dir, "c"), "--config", preset, "--config", "no-such-preset", "--budget-tokens", "100");
        Assert.Equal(CliApp.UsageError, unknown.Code);
        Assert.Contains("--config no-such-preset: --preset: unknown preset 'no-such-preset'", unknown.Err);
        var badKey = CliRunner.Run("compare", "--data", Data(), "--out", Path.Combine(Dir, "c"), "--config", preset, "--config", $"y={preset}:set dimm=3", "--budget-tokens", "100");
        Assert.Equal(CliApp.UsageError, badKey.Code);
        Assert.Contains("unknown key 'dimm'", badKey.Err);
        var twice = CliRunner.Run("compare", "--data", Data(), "--out", Path.Combine(Dir, "c"), "--config", preset, "--config", preset, "--budget-tokens", "100");
        Assert.Equal(CliApp.UsageError, twice.Code);
        Assert.Contains("two configurations are named 'micro'", twice.Err);

        string outDir = Path.Combine(Dir, "changed");
        Assert.Equal(0, CliRunner.Run(Args(outDir)).Code);
        var changed = CliRunner.Run(Args(outDir).Select(a => a == "512" ? "1024" : a).ToArray());
        Assert.Equal(CliApp.UsageError, changed.Code);
        Assert.Contains("holds a comparison with other settings", changed.Err);
    }

    [Fact]
    public void Config_specs_split_overrides_at_top_level_commas_and_derive_names()
    {
        string preset = WriteMicroPreset();
        var entries = CompareCommand.ParseEntries([$"{preset}:set n_local_attn_heads=[2],dim=32", $"named={preset}"]);
        Assert.Equal("micro+n_local_attn_heads=_2_+dim=32", entries[0].Name);
        Assert.Equal([2], entries[0].Config.NLocalAttnHeads);
        Assert.Equal(32, entries[0].Config.Dim);
        Assert.Equal("named", entries[1].Name);
        Assert.Equal(MicroConfig.Dim, entries[1].Config.Dim);
    }

    [Fact]
    public void Bpc_by_position_matches_an_independent_computation_and_averages_to_val_bpc()
    {
        using var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes);
        for (int i = 0; i < 3; i++) trainer.TrainStep();
        var (bits, counts) = trainer.ValidationBitsByPosition(3);
        // Oracle: log-softmax by hand on the same windows (the first EvalBatches·BatchSize non-overlapping ones that fit).
        int seqLen = MicroOptions.SeqLen;
        long windows = Math.Min(MicroOptions.EvalBatches * MicroOptions.BatchSize, (ValBytes.Length - 1) / seqLen);
        var nats = new double[3];
        var n = new long[3];
        trainer.Model.eval();
        using (no_grad())
        {
            var ids = tensor(ValBytes[..(int)(windows * seqLen)].Select(b => (long)b).ToArray(), new long[] { windows, seqLen });    // (W, T)
            var logProbs = trainer.Model.forward(ids, null).Logits.to(ScalarType.Float64).log_softmax(-1);                          // (W, T, 256)
            for (int w = 0; w < windows; w++)
                for (int t = 1; t < seqLen; t++)
                {
                    int bucket = t * 3 / seqLen;
                    nats[bucket] -= logProbs[w, t - 1, ValBytes[w * seqLen + t]].item<double>();
                    n[bucket]++;
                }
        }
        trainer.Model.train();
        for (int k = 0; k < 3; k++)
        {
            Assert.Equal(n[k], counts[k]);
            Assert.Equal(nats[k] / n[k] / Math.Log(2), bits[k], 1e-4);
        }
        double mean = Enumerable.Range(0, 3).Sum(k => bits[k] * counts[k]) / counts.Sum();
        Assert.Equal(trainer.ValidationBitsPerCharacter(), mean, 1e-4);
        Assert.Throws<ArgumentException>(() => trainer.ValidationBitsByPosition(seqLen));
    }
}
