using System.Diagnostics;
using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// The reliability matrix of issue 12 ("nothing lost, nothing silent"): each hostile input gets the right exit code,
/// exactly one line on stderr, and leaves what was already in the run folder as it was. Runs use the micro model
/// (16 tokens) for a few steps so the class stays fast.
/// </summary>
public sealed class CliReliabilityTests : TrainedModelTestBase
{
    private string Data
    {
        get
        {
            string path = Path.Combine(Dir, "data.txt");
            if (!File.Exists(path)) File.WriteAllBytes(path, Text);
            return path;
        }
    }

    private (int Code, string Out, string Err) Train(string outDir, params string[] extra) =>
        CliRunner.Run(["train", "--data", Data, "--out", outDir, "--preset", WriteMicroPreset(), "--batch-size", "4", "--eval-batches", "1",
            "--warmup", "2", "--val-fraction", "0.1", "--threads", "1", .. extra]);

    /// <summary>Every file of <paramref name="dir"/> (relative path → bytes); empty when it does not exist.</summary>
    private static Dictionary<string, byte[]> Snapshot(string dir) => !Directory.Exists(dir) ? []
        : Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories).ToDictionary(f => Path.GetRelativePath(dir, f), File.ReadAllBytes);

    private static void AssertIntact(Dictionary<string, byte[]> before, string dir)
    {
        var after = Snapshot(dir);
        Assert.Equal(before.Keys.Order(), after.Keys.Order());
        foreach (var (name, bytes) in before) Assert.True(bytes.AsSpan().SequenceEqual(after[name]), $"{name} changed");
    }

    private static void AssertOneLine((int Code, string Out, string Err) r, int code, string expected)
    {
        Assert.True(r.Code == code, $"exit {r.Code} (expected {code}); stderr: {r.Err}");
        var lines = r.Err.Trim().Split('\n');
        Assert.True(lines.Length == 1, $"expected one line on stderr, got {lines.Length}:\n{r.Err}");
        Assert.StartsWith("error: ", r.Err);
        Assert.Contains(expected, r.Err);
        Assert.DoesNotContain("   at ", r.Err);
        Assert.DoesNotContain("frame #", r.Err);
    }

    private static void AssertLogIsJson(string dir)
    {
        string log = Path.Combine(dir, "log.jsonl");
        if (!File.Exists(log)) return;
        foreach (var line in File.ReadAllLines(log)) using (JsonDocument.Parse(line)) { }   // NaN would not parse
    }

    [Fact]
    public void Diverging_run_with_checkpoint_every_step_never_saves_a_non_finite_checkpoint()
    {
        string run = Path.Combine(Dir, "nan");
        var r = Train(run, "--lr", "1e9", "--checkpoint-every", "1", "--max-steps", "4", "--log-every", "1");
        AssertOneLine(r, CliApp.Failure, "training diverged");
        Assert.Contains("try a lower --lr", r.Err);
        AssertLogIsJson(run);
        foreach (var (_, path) in Checkpoint.List(run))
        {
            var (model, _, _) = Checkpoint.LoadModel(path);        // throws on NaN weights
            using (model) Assert.True(Logits(model, Text[..16]).isfinite().all().item<bool>(), $"{path} gives non-finite outputs");
        }
        // --resume never continues from a poisoned state: either there is no checkpoint or the one there is finite.
        var before = Snapshot(run);
        var resumed = Train(run, "--resume", "--max-steps", "6");
        if (Checkpoint.List(run).Count == 0) Assert.Equal(CliApp.UsageError, resumed.Code);
        Assert.NotEqual(CliApp.Ok, resumed.Code);
        Assert.All(before.Keys.Where(k => k.StartsWith(Checkpoint.Prefix)), k => Assert.True(File.Exists(Path.Combine(run, k))));
    }

    [Fact]
    public void Diverging_single_step_run_exits_1_with_valid_json_log()
    {
        string run = Path.Combine(Dir, "nan1");
        var r = Train(run, "--lr", "1e9", "--max-steps", "1");
        AssertOneLine(r, CliApp.Failure, "training diverged");
        AssertLogIsJson(run);
        Assert.Contains("written as null", r.Out + r.Err);
        Assert.Empty(Checkpoint.List(run));
        Assert.False(File.Exists(Path.Combine(run, RunLock.FileName)));
    }

    [Fact]
    public void Non_finite_step_is_skipped_before_the_optimizer_and_counted()
    {
        using var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes);
        trainer.TrainStep();
        // A NaN in one weight makes the loss NaN: the step must leave every weight (and the step count) alone.
        using (no_grad()) trainer.Model.parameters().Last().fill_(double.NaN);
        var before = trainer.Model.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.nan_to_num(nan: 12345).clone());
        var r = trainer.TrainStep();
        Assert.True(r.Skipped);
        Assert.Equal(1, trainer.Step);
        Assert.Equal(1, trainer.ConsecutiveSkippedSteps);
        Assert.Equal(1, trainer.SkippedSteps);
        foreach (var (name, t) in trainer.Model.state_dict())
            Assert.True(t.nan_to_num(nan: 12345).equal(before[name]).all().item<bool>(), $"{name} changed by a skipped step");
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Save(trainer, Path.Combine(Dir, "bad.sat")));
        Assert.Contains("refusing to save", e.Message);
        Assert.False(File.Exists(Path.Combine(Dir, "bad.sat")));
        Assert.False(File.Exists(Path.Combine(Dir, "bad.sat.tmp")));
    }

    [Fact]
    public void Eval_on_non_finite_weights_fails_with_one_line()
    {
        using var trainer = Load(TrainCheckpoint());
        using (no_grad()) trainer.Model.parameters().First().view(-1)[0] = double.NaN;
        string weights = Path.Combine(Dir, "nan.safetensors");
        WeightFiles.SaveModel(trainer.Model, weights);
        File.WriteAllText(Path.ChangeExtension(weights, ".json"), ConfigBinding.ToJson(MicroConfig));   // the configuration beside the weights
        var r = CliRunner.Run("eval", "--checkpoint", weights, "--data", Data, "--json");
        AssertOneLine(r, CliApp.Failure, "NaN or infinite");
        Assert.Equal("", r.Out);
    }

    [Fact]
    public void Second_train_into_a_locked_folder_refuses_and_touches_nothing()
    {
        Assert.Equal(0, Train(RunDir, "--max-steps", "2").Code);
        using (var self = Process.GetCurrentProcess())
            File.WriteAllText(Path.Combine(RunDir, RunLock.FileName), $"{Environment.ProcessId}\n{self.StartTime.ToUniversalTime().Ticks}\n{Environment.MachineName}\n");
        var before = Snapshot(RunDir);
        AssertOneLine(Train(RunDir, "--resume", "--max-steps", "4"), CliApp.Failure, $"is in use by another train run (PID {Environment.ProcessId}");
        AssertIntact(before, RunDir);
        string other = Path.Combine(Dir, "other");
        Directory.CreateDirectory(other);
        File.Copy(Path.Combine(RunDir, RunLock.FileName), Path.Combine(other, RunLock.FileName));
        var otherBefore = Snapshot(other);
        AssertOneLine(Train(other, "--max-steps", "2"), CliApp.Failure, "is in use");
        AssertIntact(otherBefore, other);
    }

    [Fact]
    public void Stale_lock_of_a_finished_process_is_taken_over()
    {
        Assert.Equal(0, Train(RunDir, "--max-steps", "2").Code);
        using var finished = Process.Start(new ProcessStartInfo("true") { UseShellExecute = false })!;
        finished.WaitForExit();
        File.WriteAllText(Path.Combine(RunDir, RunLock.FileName), $"{finished.Id}\n0\n{Environment.MachineName}\n");
        var r = Train(RunDir, "--resume", "--max-steps", "3");
        Assert.True(r.Code == 0, r.Err);
        Assert.Contains("removed a stale lock", r.Out);
        Assert.False(File.Exists(Path.Combine(RunDir, RunLock.FileName)));
        Assert.Equal(3L, Checkpoint.List(RunDir)[^1].Step);
    }

    public static TheoryData<string[], string> RefusedBeforeStart() => new()
    {
        { ["--data", "/dev/zero"], "--data: /dev/zero is empty (0 bytes) or not a regular file" },
        { ["--batch-size", "100000000"], "--batch-size 100000000 × --seq-len 16 = " },
        { ["--set", "dim=32768"], "--set: dim 32768, depth 1, ff_mult 2 give at least" },
        { ["--preset", "tiny-local", "--set", "max_seq_len=1"], "configuration: max_seq_len = 1 is too short to train" },
        { ["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'" },
    };

    /// <summary><c>--device</c>: a CUDA device that is not there (this build's libtorch is CPU-only) is one clear line from
    /// every command that takes the option, before anything is written; <c>--device cpu</c> trains.</summary>
    [Fact]
    public void Device_option_refuses_missing_cuda_by_name_and_trains_on_cpu()
    {
        Assert.SkipWhen(TorchSharp.torch.cuda.is_available(), "this machine has CUDA; the refusal cannot be observed");
        string run = Path.Combine(Dir, "cuda");
        AssertOneLine(Train(run, "--max-steps", "1", "--device", "cuda"), CliApp.UsageError, "--device cuda: CUDA is not available");
        Assert.False(Directory.Exists(run), "the refused run created its folder");
        AssertOneLine(Train(run, "--max-steps", "1", "--device", "cuda:1"), CliApp.UsageError, "--device cuda:1: CUDA is not available");
        foreach (string[] command in new[] { new[] { "eval", "--data", Data }, ["sample", "--prompt", "a"] })
            AssertOneLine(CliRunner.Run([command[0], "--checkpoint", run, .. command[1..], "--device", "cuda"]), CliApp.UsageError, "--device cuda: CUDA is not available");
        AssertOneLine(CliRunner.Run("bench", "--attention", "local", "--seq-lens", "64", "--device", "cuda"), CliApp.UsageError, "--device cuda: CUDA is not available");

        string cpuRun = Path.Combine(Dir, "cpu");
        var trained = Train(cpuRun, "--max-steps", "2", "--device", "cpu");
        Assert.True(trained.Code == CliApp.Ok, trained.Err);
        Assert.NotEmpty(Checkpoint.List(cpuRun));
        var evaluated = CliRunner.Run("eval", "--checkpoint", cpuRun, "--data", Data, "--device", "cpu", "--threads", "1");
        Assert.True(evaluated.Code == CliApp.Ok, evaluated.Err);
    }

    [Theory]
    [MemberData(nameof(RefusedBeforeStart))]
    public void Refused_train_leaves_no_run_folder_behind(string[] extra, string expected)
    {
        string run = Path.Combine(Dir, "refused");
        if (extra[0] == "--data" && !File.Exists(extra[1])) return;          // no /dev/zero on this system
        string[] preset = extra.Contains("--preset") ? [] : ["--preset", WriteMicroPreset()];
        string[] data = extra[0] == "--data" ? [] : ["--data", Data];
        string[] args = ["train", "--out", run, "--max-steps", "1", .. data, .. preset, .. extra];
        AssertOneLine(CliRunner.Run(args), CliApp.UsageError, expected);
        Assert.False(Directory.Exists(run), "the refused run created its folder");
    }

    [Fact]
    public void Oversized_patterns_are_refused_before_allocation()
    {
        string outFile = Path.Combine(Dir, "p.json");
        AssertOneLine(CliRunner.Run("pattern", "--kind", "all", "--heads", "1000000", "--format", "json", "--out", outFile), CliApp.UsageError,
            "--heads 1000000 × --seq-len 256² = 6.55e+10 token pairs");
        Assert.False(File.Exists(outFile));
        AssertOneLine(CliRunner.Run("pattern", "--kind", "local", "--seq-len", "1000000000"), CliApp.UsageError,
            "--heads 1 × (--seq-len 1000000000 / --block 16)² = 3.91e+15 block pairs");
        AssertOneLine(CliRunner.Run("pattern", "--kind", "lsh", "--seq-len", "20000"), CliApp.UsageError, "of --kind lsh");
    }

    [Fact]
    public void Resume_with_max_steps_at_or_below_the_checkpoint_says_so()
    {
        Assert.Equal(0, Train(RunDir, "--max-steps", "3").Code);
        var before = Snapshot(RunDir);
        AssertOneLine(Train(RunDir, "--resume", "--max-steps", "3"), CliApp.UsageError, "--max-steps 3: ckpt-00000003.sat is already at step 3");
        AssertOneLine(Train(RunDir, "--resume", "--max-steps", "2"), CliApp.UsageError, "give --max-steps above 3");
        AssertIntact(before, RunDir);
    }

    [Fact]
    public void Corrupt_newest_checkpoint_names_the_intact_one_and_from_intact_uses_it()
    {
        Assert.Equal(0, Train(RunDir, "--max-steps", "4", "--checkpoint-every", "2").Code);
        string newest = Checkpoint.PathFor(RunDir, 4);
        var bytes = File.ReadAllBytes(newest);
        bytes[bytes.Length / 2] ^= 0x40;
        File.WriteAllBytes(newest, bytes);
        var before = Snapshot(RunDir);

        AssertOneLine(CliRunner.Run("eval", "--checkpoint", RunDir, "--data", Data), CliApp.Failure,
            $"The newest intact checkpoint in {RunDir} is ckpt-00000002.sat; pass --checkpoint {Checkpoint.PathFor(RunDir, 2)}");
        AssertOneLine(Train(RunDir, "--resume", "--max-steps", "6"), CliApp.Failure,
            "The newest intact checkpoint is ckpt-00000002.sat; continue from it with --resume --from-intact");
        AssertIntact(before, RunDir);
        AssertOneLine(Train(RunDir, "--from-intact", "--max-steps", "6"), CliApp.UsageError, "--from-intact only applies with --resume");

        var r = Train(RunDir, "--resume", "--from-intact", "--max-steps", "3");
        Assert.True(r.Code == 0, r.Err);
        Assert.Contains("resumed", r.Out);
        Assert.Contains("at step 2", r.Out);
        Assert.Equal(bytes, File.ReadAllBytes(newest + ".damaged"));               // kept, renamed
        Assert.Equal([2L, 3L], Checkpoint.List(RunDir).Select(c => c.Step).ToArray());
    }

    [Fact]
    public void Errors_are_classified_by_type_and_cut_to_one_line()
    {
        var command = CliApp.BuildRootCommand();
        var native = new System.Runtime.InteropServices.ExternalException(
            "\n  [enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes.\n" +
            "Exception raised from alloc_cpu at /pytorch/c10/core/impl/alloc_cpu.cpp:116 (most recent call first):\nframe #0: c10::Error::Error()\nframe #1: foo\n");
        var (code, message) = CliApp.Classify(native, command, verbose: false);
        Assert.Equal(CliApp.Failure, code);
        Assert.Equal("libtorch: [enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes. (--verbose for the full text)", message);
        Assert.Contains("frame #1: foo", CliApp.Classify(native, command, verbose: true).Message);

        // System.Text.Json refusing NaN is an ArgumentException but not bad usage: exit 1, not 2.
        var json = Record.Exception(() => JsonSerializer.Serialize(double.NaN));
        Assert.IsAssignableFrom<ArgumentException>(json);
        Assert.Equal(CliApp.Failure, CliApp.Classify(json!, command, false).Code);
        // The library's own argument checks stay usage errors.
        var own = Record.Exception(() => new TrainingOptions { BatchSize = 0 }.Validate());
        Assert.Equal(CliApp.UsageError, CliApp.Classify(own!, command, false).Code);
        Assert.Equal(CliApp.UsageError, CliApp.Classify(new CliUsageException("x"), command, false).Code);
        Assert.Equal(CliApp.Failure, CliApp.Classify(new CliFailureException("x"), command, false).Code);
    }
}
