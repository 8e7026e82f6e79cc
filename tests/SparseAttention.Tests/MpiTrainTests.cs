using System.Diagnostics;
using System.Text;
using SparseAttention.Cli;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// <c>sparse-attn train</c> under Open MPI's <c>mpirun</c> (data-parallel): 2 ranks with batch b against one process
/// with batch 2b, resume, mismatched ranks, failing and killed ranks, and runs without MPI. Open MPI comes from
/// scripts/ensure-openmpi.sh (installs it when missing and root); when it cannot, these tests fail saying so.
/// </summary>
public sealed class MpiTrainTests : IDisposable
{
    private static readonly Lazy<string?> OpenMpiProblem = new(EnsureOpenMpi);
    private readonly string dir = Path.Combine(Path.GetTempPath(), "sa-mpi-" + Guid.NewGuid().ToString("N"));
    private readonly string data;
    private static string Cli => Path.Combine(AppContext.BaseDirectory, "sparse-attn.dll");

    public MpiTrainTests()
    {
        Directory.CreateDirectory(dir);
        data = Path.Combine(dir, "data.txt");
        // Varied text (not one sentence repeated), so different windows give different gradients.
        var text = new StringBuilder();
        var random = new Random(5);
        string[] words = ["the", "union", "congress", "people", "state", "of", "and", "nation", "law", "year", "peace", "trade", "war", "we", "must"];
        while (text.Length < 40_000) text.Append(words[random.Next(words.Length)]).Append(random.Next(9) == 0 ? ". " : " ");
        File.WriteAllText(data, text.ToString());
    }

    public void Dispose()
    {
        try { Directory.Delete(dir, recursive: true); } catch (IOException) { }
    }

    /// <summary>A small routing model (2 layers × 4 routing heads, 4 clusters of 32 of 128 tokens): a fast k-means
    /// decay (0.5) so a centroid update that is not summed over the ranks shows, dropout off, a learning rate that moves
    /// the weights in a few steps.</summary>
    private string[] TrainArgs(string run, int batch, int steps, params string[] extra) =>
    [
        "train", "--data", data, "--out", run, "--preset", "tiny-routing", "--set", "dim=32", "--set", "kmeans_ema_decay=0.5",
        "--set", "attn_dropout=0", "--set", "ff_dropout=0", "--batch-size", batch.ToString(), "--max-steps", steps.ToString(),
        "--lr", "3e-3", "--warmup", "1", "--threads", "1", "--eval-every", "1000", "--eval-batches", "1", "--log-every", "1",
        .. extra,
    ];

    [Fact]
    public void Two_ranks_with_batch_b_train_like_one_process_with_batch_2b_and_resume_alike()
    {
        string single = Path.Combine(dir, "single"), parallel = Path.Combine(dir, "parallel");
        Assert.Equal(0, InProcess(TrainArgs(single, 4, 3)));
        var r = Mpirun(2, TrainArgs(parallel, 2, 3));
        Assert.True(r.Code == 0, r.Describe());
        Assert.Contains("data-parallel over MPI: 2 rank(s), each trains 2 of every 4 windows", r.Out);
        Assert.Single(Checkpoint.List(parallel));                                   // rank 0 alone saved
        AssertSameState(Checkpoint.List(single)[^1].Path, Checkpoint.List(parallel)[^1].Path, 3);

        // Both continue from their checkpoints: every rank loads the same file.
        Assert.Equal(0, InProcess(TrainArgs(single, 4, 5, "--resume")));
        r = Mpirun(2, TrainArgs(parallel, 2, 5, "--resume"));
        Assert.True(r.Code == 0, r.Describe());
        Assert.Contains("resumed", r.Out);
        AssertSameState(Checkpoint.List(single)[^1].Path, Checkpoint.List(parallel)[^1].Path, 5);
    }

    [Fact]
    public void Ranks_started_with_different_configurations_are_refused_before_training()
    {
        string run = Path.Combine(dir, "mismatch");
        var r = Mpirun(["-np", "1", "dotnet", Cli, .. TrainArgs(run, 2, 3), ":", "-np", "1", "dotnet", Cli, .. TrainArgs(run, 2, 3, "--set", "depth=1")]);
        Assert.NotEqual(0, r.Code);
        Assert.Contains("rank 1's training run differs from rank 0's: 'config depth = 1' here, 'config depth = 2' on rank 0", r.Err);
        Assert.False(Directory.Exists(run), "a refused run must not create its run folder");
    }

    [Fact]
    public void A_rank_that_fails_at_start_stops_every_rank()
    {
        string run = Path.Combine(dir, "fails");
        var missing = TrainArgs(run, 2, 3).Select(a => a == data ? Path.Combine(dir, "no-such-file.txt") : a).ToArray();
        var r = Mpirun(["-np", "1", "dotnet", Cli, .. TrainArgs(run, 2, 3), ":", "-np", "1", "dotnet", Cli, .. missing]);
        Assert.NotEqual(0, r.Code);
        Assert.Contains("error: rank 1 of 2: --data", r.Err);
        Assert.Empty(Checkpoint.List(run));
    }

    [Fact]
    public async Task A_killed_rank_stops_the_job_and_the_last_checkpoint_stays_loadable()
    {
        string run = Path.Combine(dir, "killed");
        using var mpirun = StartMpirun(["-np", "2", "dotnet", Cli, .. TrainArgs(run, 2, 100_000, "--checkpoint-every", "2")]);
        var output = mpirun.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        var errors = mpirun.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        try
        {
            var clock = Stopwatch.StartNew();
            while (Checkpoint.List(run).Count < 2 && !mpirun.HasExited && clock.Elapsed < TimeSpan.FromMinutes(2)) Thread.Sleep(100);
            Assert.True(Checkpoint.List(run).Count >= 2, $"no checkpoints after {clock.Elapsed}");
            int rank1 = RankProcess(mpirun.Id, 1) ?? throw new InvalidOperationException($"rank 1's process not found among the children of mpirun {mpirun.Id}");
            Process.GetProcessById(rank1).Kill();
            Assert.True(mpirun.WaitForExit(TimeSpan.FromSeconds(60)), "mpirun kept running (rank 0 hung) after rank 1 was killed");
            Assert.NotEqual(0, mpirun.ExitCode);
        }
        finally
        {
            if (!mpirun.HasExited) mpirun.Kill(entireProcessTree: true);
        }
        Assert.Contains("step", await output);
        string newest = Checkpoint.List(run)[^1].Path;
        Assert.Equal(newest, Checkpoint.NewestIntact(run));
        using var corpus = ByteCorpus.Load(data, 0.05, 128);
        using var trainer = Checkpoint.Load(newest, corpus.Train, corpus.Validation);
        Assert.True(trainer.Step >= 2, await errors);
    }

    [Fact]
    public void Without_mpirun_train_never_loads_libmpi()
    {
        // A libmpi.so.40 that cannot load, first on the search path: a run that touched MPI would fail.
        string fake = Path.Combine(dir, "fake-mpi");
        Directory.CreateDirectory(fake);
        File.WriteAllText(Path.Combine(fake, "libmpi.so.40"), "not a library");
        var plain = Child(TrainArgs(Path.Combine(dir, "plain"), 2, 2), new() { ["LD_LIBRARY_PATH"] = fake });
        Assert.True(plain.Code == 0, plain.Describe());
        Assert.DoesNotContain("data-parallel", plain.Out);
        Assert.Single(Checkpoint.List(Path.Combine(dir, "plain")));

        // Started as if by mpirun but libmpi unusable: a clear error, not N independent runs.
        var launched = Child(TrainArgs(Path.Combine(dir, "launched"), 2, 2), new() { ["LD_LIBRARY_PATH"] = fake, ["OMPI_COMM_WORLD_SIZE"] = "2" });
        Assert.Equal(CliApp.Failure, launched.Code);
        Assert.Contains("started by mpirun (OMPI_COMM_WORLD_SIZE is set) but libmpi.so.40 cannot be loaded", launched.Err);
    }

    /// <summary>Same step, sampler position and tokens; every parameter and buffer (k-means centroids included) equal
    /// within float tolerance; the centroids were initialised and have moved.</summary>
    private void AssertSameState(string singlePath, string parallelPath, long step)
    {
        using var corpus = ByteCorpus.Load(data, 0.05, 128);
        using var a = Checkpoint.Load(singlePath, corpus.Train, corpus.Validation);
        using var b = Checkpoint.Load(parallelPath, corpus.Train, corpus.Validation);
        Assert.Equal(step, a.Step);
        Assert.Equal(a.Step, b.Step);
        Assert.Equal(a.SamplerState, b.SamplerState);
        Assert.Equal(a.TokensSeen, b.TokensSeen);
        var left = a.Model.state_dict();
        var right = b.Model.state_dict();
        Assert.Equal(left.Keys.Order(), right.Keys.Order());
        int centroids = 0;
        foreach (var (name, x) in left)
        {
            var y = right[name];
            if (x.dtype == ScalarType.Bool) { Assert.True(x.equal(y).all().item<bool>(), name); continue; }
            double diff = (x - y).abs().max().item<float>(), scale = x.abs().max().item<float>();
            Assert.True(diff <= 1e-4 + 1e-4 * scale, $"{name}: max |single − parallel| = {diff:E2} (max |single| = {scale:E2})");
            if (name.EndsWith("means", StringComparison.Ordinal)) centroids++;
        }
        Assert.True(centroids >= 2, "expected k-means centroids in the state");
    }

    private int InProcess(string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int previous = get_num_threads();
        try { return CliApp.Run(args, stdout, stderr) is var code && code == 0 ? 0 : throw new InvalidOperationException($"exit {code}: {stderr}"); }
        finally { set_num_threads(previous); }
    }

    private sealed record Result(int Code, string Out, string Err)
    {
        public string Describe() => $"exit {Code}\nstdout:\n{Out}\nstderr:\n{Err}";
    }

    /// <summary>mpirun -np <paramref name="ranks"/> sparse-attn <paramref name="args"/>.</summary>
    private static Result Mpirun(int ranks, string[] args) => Mpirun(["-np", ranks.ToString(), "dotnet", Cli, .. args]);

    private static Result Mpirun(string[] mpirunArgs)
    {
        using var p = StartMpirun(mpirunArgs);
        return Finish(p, TimeSpan.FromMinutes(3));
    }

    private static Process StartMpirun(string[] mpirunArgs)
    {
        Assert.True(OpenMpiProblem.Value is null, OpenMpiProblem.Value);
        var start = new ProcessStartInfo("mpirun") { RedirectStandardOutput = true, RedirectStandardError = true };
        // One slot per rank whatever the core count, no core binding (the machine is shared), root allowed (CI runs as root).
        foreach (var a in new[] { "--oversubscribe", "--bind-to", "none" }.Concat(mpirunArgs)) start.ArgumentList.Add(a);
        start.Environment["OMPI_ALLOW_RUN_AS_ROOT"] = "1";
        start.Environment["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1";
        return Process.Start(start)!;
    }

    private static Result Child(string[] args, Dictionary<string, string> environment)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Cli);
        foreach (var a in args) start.ArgumentList.Add(a);
        foreach (var (k, v) in environment) start.Environment[k] = v;
        using var p = Process.Start(start)!;
        return Finish(p, TimeSpan.FromMinutes(2));
    }

    private static Result Finish(Process p, TimeSpan timeout)
    {
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{p.StartInfo.FileName} did not finish within {timeout} (hung): {stderr.Result}");
        }
        p.WaitForExit();
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>PID of the child of <paramref name="mpirun"/> whose environment says it is rank <paramref name="rank"/>.</summary>
    private static int? RankProcess(int mpirun, int rank)
    {
        foreach (var proc in Directory.EnumerateDirectories("/proc").Select(Path.GetFileName).Where(n => n!.All(char.IsDigit)))
        {
            try
            {
                var stat = File.ReadAllText($"/proc/{proc}/stat");
                var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');        // state, ppid, …
                if (int.Parse(fields[1]) != mpirun) continue;
                var environment = File.ReadAllText($"/proc/{proc}/environ").Split('\0');
                if (environment.Contains($"OMPI_COMM_WORLD_RANK={rank}")) return int.Parse(proc!);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }   // gone meanwhile, or not ours
        }
        return null;
    }

    /// <summary>Runs scripts/ensure-openmpi.sh (installs Open MPI when missing and root); its error text, or null.</summary>
    private static string? EnsureOpenMpi()
    {
        string? root = null;
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null && root is null; d = d.Parent)
            if (File.Exists(Path.Combine(d.FullName, "scripts", "ensure-openmpi.sh"))) root = d.FullName;
        if (root is null) return "scripts/ensure-openmpi.sh not found above " + AppContext.BaseDirectory;
        var start = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(Path.Combine(root, "scripts", "ensure-openmpi.sh"));
        using var p = Process.Start(start)!;
        var err = p.StandardError.ReadToEndAsync();
        string output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return p.ExitCode == 0 ? null : $"Open MPI is needed for the data-parallel tests and scripts/ensure-openmpi.sh could not provide it: {err.Result}{output}";
    }
}
