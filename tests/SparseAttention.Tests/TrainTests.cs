using System.Text;
using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

public sealed class TrainConfigTests : TrainTestBase
{
    [Fact]
    public void Set_binds_valid_values_of_every_kind()
    {
        var config = ConfigBinding.Apply(new TransformerConfig(),
            ["dim=128", "causal=true", "n_local_attn_heads=[2,3]", "attn_dropout=0.25", "positional_encoding=RelativeShaw", "shared_qk=null", "dim_head=32"]);
        Assert.Equal(128, config.Dim);
        Assert.True(config.Causal);
        Assert.Equal([2, 3], config.NLocalAttnHeads);
        Assert.Equal(0.25, config.AttnDropout);
        Assert.Equal(PositionalEncoding.RelativeShaw, config.PositionalEncoding);
        Assert.Null(config.SharedQk);
        Assert.Equal(32, config.DimHead);
        Assert.Equal(new TransformerConfig().Depth, config.Depth);   // untouched keys keep their value
    }

    [Theory]
    [InlineData("no_such_key=1", "unknown key 'no_such_key'")]
    [InlineData("dim=abc", "dim expects an integer, got 'abc'")]
    [InlineData("dim=1.5", "dim expects an integer")]
    [InlineData("causal=maybe", "causal expects true or false")]
    [InlineData("positional_encoding=Sinusoid", "positional_encoding expects one of Rotary, RelativeShaw, None")]
    [InlineData("dim", "expected key=value")]
    public void Set_rejects_bad_input_and_lists_valid_keys(string assignment, string expected)
    {
        var e = Assert.Throws<ArgumentException>(() => ConfigBinding.Apply(new TransformerConfig(), [assignment]));
        Assert.Equal("set", e.ParamName);
        Assert.Contains(expected, e.Message);
        Assert.Contains("valid keys: num_tokens, dim, depth", e.Message);
        Assert.Contains("kernel", e.Message);
    }

    [Fact]
    public void Json_round_trips_and_rejects_unknown_keys()
    {
        var config = MicroConfig with { StaticHeadGroups = null, AttnDropout = 0.1 };
        var back = ConfigBinding.FromJson(ConfigBinding.ToJson(config), "x");
        Assert.Empty(ConfigBinding.Differences(config, back));
        var e = Assert.Throws<ArgumentException>(() => ConfigBinding.FromJson("{\"dim\": 8, \"dimm\": 9}", "preset"));
        Assert.Contains("unknown key 'dimm'", e.Message);
        Assert.Contains("valid keys:", e.Message);
        Assert.Equal(["dim"], ConfigBinding.Differences(config, config with { Dim = 32 }));
    }

    [Fact]
    public void Shipped_presets_load_validate_and_build_byte_level_causal_models()
    {
        var assembly = typeof(CliApp).Assembly;
        var names = assembly.GetManifestResourceNames().Where(n => n.StartsWith("preset.")).ToArray();
        foreach (var required in new[] { "tiny", "small", "tiny-local", "tiny-routing", "small-local", "small-routing" })
            Assert.Contains($"preset.{required}.json", names);
        foreach (var name in names)
        {
            using var reader = new StreamReader(assembly.GetManifestResourceStream(name)!);
            var config = ConfigBinding.FromJson(reader.ReadToEnd(), name).Validate();
            Assert.Equal(256, config.NumTokens);
            Assert.True(config.Causal);
            var kinds = Enumerable.Range(0, config.Depth).SelectMany(l => config.HeadGroupsForLayer(l)).Select(g => g.Kind).Distinct().ToArray();
            if (name.Contains("-local")) Assert.Equal([HeadGroupKind.Local], kinds);
            else if (name.Contains("-routing")) Assert.Equal([HeadGroupKind.Routing], kinds);
            else if (name.Contains("-synthesizer")) Assert.Contains(HeadGroupKind.Synthesizer, kinds);
            else if (name.Contains("-lsh")) Assert.Equal([HeadGroupKind.Local, HeadGroupKind.Lsh], kinds);
            else Assert.Equal([HeadGroupKind.Local, HeadGroupKind.Routing], kinds);
        }
        using var model = new RoutingTransformerLM(ConfigBinding.FromJson(
            new StreamReader(assembly.GetManifestResourceStream("preset.tiny.json")!).ReadToEnd(), "tiny"));
        var (logits, _) = model.forward(zeros(1, 8, dtype: ScalarType.Int64), null);
        Assert.Equal([1L, 8, 256], logits.shape);
    }

    [Fact]
    public void Learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor()
    {
        var o = new TrainingOptions { LearningRate = 1.0, WarmupSteps = 4, DecaySteps = 14, MinLrRatio = 0.1 };
        Assert.Equal(0.25, o.LearningRateAt(0), 12);
        Assert.Equal(1.0, o.LearningRateAt(3), 12);
        Assert.Equal(1.0, o.LearningRateAt(4), 12);
        Assert.Equal(0.55, o.LearningRateAt(9), 12);   // half-way: floor + (1 − floor)/2
        Assert.Equal(0.1, o.LearningRateAt(14), 12);
        Assert.Equal(0.1, o.LearningRateAt(1000), 12);
    }

    [Fact]
    public void Corpus_splits_folders_and_rejects_empty_or_short_data()
    {
        string folder = Path.Combine(Dir, "texts");
        Directory.CreateDirectory(folder);
        File.WriteAllBytes(Path.Combine(folder, "b.txt"), Text[..500]);
        File.WriteAllBytes(Path.Combine(folder, "a.txt"), Text[500..1000]);
        var corpus = ByteCorpus.Load(folder, 0.1, 16);
        Assert.Equal(2, corpus.Files);
        Assert.Equal(Text[500..1000].Concat(Text[..500]).ToArray(), corpus.Train.ToArray().Concat(corpus.Validation.ToArray()).ToArray());
        Assert.Equal(100, corpus.Validation.Length);

        string empty = Path.Combine(Dir, "empty.txt");
        File.WriteAllText(empty, "");
        Assert.Contains("is empty", Assert.Throws<ArgumentException>(() => ByteCorpus.Load(empty, 0.1, 16)).Message);
        string shortFile = Path.Combine(Dir, "short.txt");
        File.WriteAllBytes(shortFile, Text[..40]);
        Assert.Contains("at least 17 bytes", Assert.Throws<ArgumentException>(() => ByteCorpus.Load(shortFile, 0.1, 16)).Message);
    }
}

public sealed class TrainCliTests : TrainTestBase
{
    private (int Code, string Out, string Err) Train(params string[] extra)
    {
        string data = Path.Combine(Dir, "data.txt");
        if (!File.Exists(data)) File.WriteAllBytes(data, Text);
        return CliRunner.Run(["train", "--data", data, "--out", Path.Combine(Dir, "run"), "--preset", WriteMicroPreset(),
            "--batch-size", "4", "--eval-batches", "1", "--warmup", "2", "--val-fraction", "0.1", "--threads", "1", .. extra]);
    }

    [Fact]
    public void Train_writes_log_and_keeps_the_last_checkpoints()
    {
        var (code, stdout, stderr) = Train("--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--checkpoint-every", "2", "--keep-last", "2");
        Assert.True(code == 0, stderr);
        Assert.Contains("val_bpc", stdout);
        Assert.Contains("tok/s", stdout);
        Assert.Contains("eta", stdout);
        string run = Path.Combine(Dir, "run");
        Assert.Equal([4L, 6L], Checkpoint.List(run).Select(c => c.Step).ToArray());
        Assert.False(File.Exists(Checkpoint.PathFor(run, 6) + ".tmp"));
        var lines = File.ReadAllLines(Path.Combine(run, "log.jsonl")).Select(l => JsonDocument.Parse(l).RootElement).ToList();
        foreach (var line in lines)
            Assert.Equal(["step", "loss", "val_bpc", "val_loss", "bpc", "tokens_per_s", "lr", "elapsed"], line.EnumerateObject().Select(p => p.Name).ToArray());
        Assert.Equal([0L, 3L, 6L], lines.Where(l => l.GetProperty("val_bpc").ValueKind == JsonValueKind.Number).Select(l => l.GetProperty("step").GetInt64()).ToArray());
        Assert.Equal([2L, 4L, 6L], lines.Where(l => l.GetProperty("loss").ValueKind == JsonValueKind.Number).Select(l => l.GetProperty("step").GetInt64()).ToArray());
        Assert.All(lines, l => Assert.True(l.GetProperty("elapsed").GetDouble() >= 0));

        // Continuing: --resume picks the newest checkpoint; a fresh run into the same folder is refused.
        (code, stdout, stderr) = Train("--max-steps", "8", "--resume");
        Assert.True(code == 0, stderr);
        Assert.Contains("resumed", stdout);
        Assert.Equal(8L, Checkpoint.List(run)[^1].Step);
        // A run that logged steps past its newest checkpoint (e.g. killed): resuming drops those lines, so no step is logged twice.
        string log = Path.Combine(run, "log.jsonl");
        File.AppendAllText(log, "{\"step\":9,\"loss\":1.0,\"val_bpc\":null,\"tokens_per_s\":1.0,\"lr\":0.001,\"elapsed\":1.0}\n");
        (code, stdout, stderr) = Train("--max-steps", "10", "--resume", "--log-every", "1");
        Assert.True(code == 0, stderr);
        Assert.Contains("dropped 1 line(s) after step 8", stdout);
        var lossSteps = File.ReadAllLines(log).Select(l => JsonDocument.Parse(l).RootElement)
            .Where(l => l.GetProperty("loss").ValueKind == JsonValueKind.Number).Select(l => l.GetProperty("step").GetInt64()).ToArray();
        Assert.Equal(lossSteps.Distinct().Order().ToArray(), lossSteps);
        Assert.Equal([9L, 10L], lossSteps[^2..]);
        (code, _, stderr) = Train("--max-steps", "8");
        Assert.Equal(CliApp.UsageError, code);
        Assert.StartsWith("error: --out:", stderr);
        (code, _, stderr) = Train("--max-steps", "12", "--resume", "--set", "dim=32");
        Assert.Equal(CliApp.UsageError, code);
        Assert.Contains("different configuration (dim differ)", stderr);
        (code, _, stderr) = Train("--max-steps", "12", "--resume", "--lr", "0.5");
        Assert.Equal(CliApp.UsageError, code);
        Assert.Contains("--lr 0.001 in the checkpoint vs 0.5", stderr);
    }

    [Fact]
    public void Resume_from_a_corrupt_checkpoint_fails_clearly_and_leaves_the_file_alone()
    {
        Assert.Equal(0, Train("--max-steps", "2").Code);
        string path = Checkpoint.List(Path.Combine(Dir, "run"))[^1].Path;
        var bytes = File.ReadAllBytes(path);
        bytes[bytes.Length / 2] ^= 0x40;
        File.WriteAllBytes(path, bytes);
        var (code, _, stderr) = Train("--max-steps", "4", "--resume");
        Assert.Equal(CliApp.Failure, code);
        Assert.Contains("corrupt", stderr);
        Assert.Single(stderr.Trim().Split('\n'));
        Assert.Equal(bytes, File.ReadAllBytes(path));
        Assert.Single(Checkpoint.List(Path.Combine(Dir, "run")));
    }

    [Theory]
    [InlineData("--set", "no_such=1", "error: --set: unknown key 'no_such'; valid keys: num_tokens,")]
    [InlineData("--set", "heads=abc", "error: --set: heads expects an integer")]
    [InlineData("--preset", "huge", "error: --preset: unknown preset 'huge'; expected one of: long-local, long-mixed, long-mixed-8k, long-routing, small, small-local, small-routing, tiny, ")]
    [InlineData("--set", "heads=3", "error: configuration: heads: Dim (16) must be divisible by Heads (3)")]
    [InlineData("--batch-size", "0", "error: --batch-size: must be > 0, got 0.")]
    [InlineData("--seq-len", "64", "error: --seq-len: must be at most max_seq_len = 16")]
    public void Bad_options_give_one_line_naming_the_option(string option, string value, string expected)
    {
        string data = Path.Combine(Dir, "data.txt");
        File.WriteAllBytes(data, Text);
        string preset = option == "--preset" ? value : WriteMicroPreset();
        string[] args = option == "--preset"
            ? ["train", "--data", data, "--out", Path.Combine(Dir, "run"), "--max-steps", "1", "--preset", value]
            : ["train", "--data", data, "--out", Path.Combine(Dir, "run"), "--max-steps", "1", "--preset", preset, option, value];
        var (code, _, stderr) = CliRunner.Run(args);
        Assert.Equal(CliApp.UsageError, code);
        Assert.StartsWith(expected, stderr);
        Assert.Single(stderr.Trim().Split('\n'));
    }

    [Fact]
    public void Empty_corpus_and_missing_stop_condition_are_usage_errors()
    {
        string empty = Path.Combine(Dir, "empty.txt");
        File.WriteAllText(empty, "");
        var (code, _, stderr) = CliRunner.Run(["train", "--data", empty, "--out", Path.Combine(Dir, "run"), "--max-steps", "1"]);
        Assert.Equal(CliApp.UsageError, code);
        Assert.StartsWith("error: --data:", stderr);
        Assert.Contains("is empty", stderr);
        Assert.DoesNotContain("(Parameter", stderr);
        string binary = Path.Combine(Dir, "model.bin");
        File.WriteAllBytes(binary, [.. Text, 0, 1, 2, .. Text]);
        (code, _, stderr) = CliRunner.Run(["train", "--data", binary, "--out", Path.Combine(Dir, "run"), "--max-steps", "1"]);
        Assert.Equal(CliApp.UsageError, code);
        Assert.StartsWith("error: --data:", stderr);
        Assert.Contains("looks binary", stderr);
        (code, _, stderr) = CliRunner.Run(["train", "--data", empty, "--out", Path.Combine(Dir, "run")]);
        Assert.Equal(CliApp.UsageError, code);
        Assert.Contains("--max-steps / --max-minutes", stderr);
    }
}

public sealed class ValidationBpcTests : TrainTestBase
{
    /// <summary>
    /// Trainer.ValidationBitsPerCharacter equals the mean next-byte cross-entropy in bits computed here window by
    /// window (non-overlapping windows of SeqLen from the start of the validation bytes, EvalBatches × BatchSize of
    /// them at most), with log-softmax in float64. Mutation checked by hand: returning 0.8 × the value fails this test
    /// (relative error 0.2 against a tolerance of 1e-5); so does starting the windows at byte 1 or counting SeqLen
    /// predictions per window instead of SeqLen − 1.
    /// </summary>
    [Theory]
    [InlineData(3, 7)]     // 21 windows wanted, 18 available in the 300 validation bytes: batches of 7, 7, 4
    [InlineData(1, 3)]     // 3 windows
    public void Validation_bpc_equals_the_cross_entropy_computed_by_hand(int evalBatches, int batchSize)
    {
        var options = MicroOptions with { EvalBatches = evalBatches, BatchSize = batchSize };
        using var trainer = new Trainer(MicroConfig, options, TrainBytes, ValBytes);
        trainer.TrainStep();
        trainer.TrainStep();
        double bpc = trainer.ValidationBitsPerCharacter();

        int seqLen = options.SeqLen;
        int windows = Math.Min(evalBatches * batchSize, (ValBytes.Length - 1) / seqLen);
        double nats = 0;
        long predicted = 0;
        trainer.Model.eval();
        using (no_grad())
            for (int w = 0; w < windows; w++)
            {
                var window = ValBytes[(w * seqLen)..((w + 1) * seqLen)];
                var logits = trainer.Model.forward(tensor(window.Select(b => (long)b).ToArray(), new long[] { 1, seqLen }), null).Logits;
                var logProbs = logits[0].to(ScalarType.Float64).log_softmax(-1);                         // (T, 256)
                for (int t = 0; t + 1 < seqLen; t++) { nats -= logProbs[t, window[t + 1]].item<double>(); predicted++; }
            }
        trainer.Model.train();
        double expected = nats / predicted / Math.Log(2);
        Assert.True(Math.Abs(bpc - expected) <= 1e-5 * expected, $"ValidationBitsPerCharacter {bpc} vs by hand {expected} over {windows} windows");
        Assert.InRange(bpc, 1.0, 9.0);    // an untrained byte model: near log2(256) = 8
    }
}

public sealed class MappedCorpusTests : TrainTestBase
{
    /// <summary>Files above ByteCorpus.MapAbove (1 GB; here forced to 0) are memory-mapped and checked for text in pieces
    /// (here 7 bytes, so multi-byte characters straddle pieces): same split, same bytes, same training step, and the
    /// same text checks as the array path — without writing a 2 GB file.</summary>
    [Fact]
    public void Mapped_corpus_matches_the_array_corpus_and_checks_text_across_pieces()
    {
        string path = Path.Combine(Dir, "text.txt");
        var text = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat("naïve café — Grüße, 東京. ", 40)));
        File.WriteAllBytes(path, text);
        var viaArray = ByteCorpus.Load(path, 0.1, 16);
        long previousMap = ByteCorpus.MapAbove;
        int previousPiece = ByteCorpus.CheckPiece;
        try
        {
            ByteCorpus.MapAbove = 0;
            ByteCorpus.CheckPiece = 7;
            using var mapped = ByteCorpus.Load(path, 0.1, 16);
            Assert.Equal(viaArray.Train.ToArray(), mapped.Train.ToArray());
            Assert.Equal(viaArray.Validation.ToArray(), mapped.Validation.ToArray());
            Assert.Equal(text[^1], mapped.Validation[mapped.Validation.Length - 1]);

            var config = MicroConfig with { StaticHeadGroups = null, NLocalAttnHeads = [2] };
            var options = MicroOptions with { Accumulation = 1 };
            using var a = new Trainer(config, options, viaArray.Train, viaArray.Validation);
            double lossA = a.TrainStep().Loss;
            using var b = new Trainer(config, options, mapped.Train, mapped.Validation);
            Assert.Equal(lossA, b.TrainStep().Loss);

            string binary = Path.Combine(Dir, "bin.txt");
            File.WriteAllBytes(binary, [.. text[..500], 0, .. text]);
            Assert.Contains("a NUL byte at offset 500", Assert.Throws<ArgumentException>(() => ByteCorpus.Load(binary, 0.1, 16)).Message);
            string latin = Path.Combine(Dir, "latin1.txt");
            File.WriteAllBytes(latin, Enumerable.Range(0, 300).Select(i => (byte)(i % 2 == 0 ? 0xE9 : 'a')).ToArray());
            Assert.Contains("150 invalid UTF-8 sequences in 300 bytes", Assert.Throws<ArgumentException>(() => ByteCorpus.Load(latin, 0.1, 16)).Message);
        }
        finally
        {
            ByteCorpus.MapAbove = previousMap;
            ByteCorpus.CheckPiece = previousPiece;
        }
    }
}
