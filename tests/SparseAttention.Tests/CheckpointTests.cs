using System.Text;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>Shared pieces of the training tests: a very small byte-level model and corpus, one intra-op thread.</summary>
public abstract class TrainTestBase : IDisposable
{
    private readonly int previousThreads;
    protected readonly string Dir = Path.Combine(Path.GetTempPath(), "sa-train-" + Guid.NewGuid().ToString("N"));

    protected TrainTestBase()
    {
        previousThreads = get_num_threads();
        set_num_threads(1);
        Directory.CreateDirectory(Dir);
    }

    public void Dispose()
    {
        set_num_threads(previousThreads);
        try { Directory.Delete(Dir, recursive: true); } catch (IOException) { }
        GC.SuppressFinalize(this);
    }

    /// <summary>One local head and one routing head, 16 tokens.</summary>
    protected static TransformerConfig MicroConfig => new()
    {
        NumTokens = 256, Dim = 16, Depth = 1, Heads = 2, MaxSeqLen = 16, Causal = true, WindowSize = 8,
        NLocalAttnHeads = [1], FfMult = 2, BlockSize = 8,
    };

    protected static TrainingOptions MicroOptions => new()
    {
        SeqLen = 16, BatchSize = 4, Accumulation = 2, LearningRate = 3e-3, WarmupSteps = 2, DecaySteps = 6, EvalBatches = 2, Seed = 7,
    };

    protected static readonly byte[] Text = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat(
        "The quick brown fox jumps over the lazy dog. Fellow citizens of the Senate and House of Representatives! ", 20)));
    protected static byte[] TrainBytes => Text[..1800];
    protected static byte[] ValBytes => Text[1800..];

    protected string WriteMicroPreset()
    {
        string path = Path.Combine(Dir, "micro.json");
        File.WriteAllText(path, ConfigBinding.ToJson(MicroConfig));
        return path;
    }
}

public sealed class CheckpointTests : TrainTestBase
{
    private static Tensor Probe() => tensor(TrainBytes[..32].Select(b => (long)b).ToArray(), new long[] { 2, 16 });

    private static Tensor Logits(Trainer t)
    {
        t.Model.eval();
        using var _ = no_grad();
        var logits = t.Model.forward(Probe(), null).Logits.detach().clone();
        t.Model.train();
        return logits;
    }

    [Fact]
    public void Round_trip_gives_bit_identical_outputs_and_state()
    {
        string path = Path.Combine(Dir, "a.sat");
        using var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes);
        trainer.TrainStep();
        trainer.TrainStep();
        trainer.ElapsedSeconds = 12.5;
        Checkpoint.Save(trainer, path);
        var expected = Logits(trainer);

        using var loaded = Checkpoint.Load(path, TrainBytes, ValBytes);
        Assert.Equal(2, loaded.Step);
        Assert.Equal(trainer.SamplerState, loaded.SamplerState);
        Assert.Equal(trainer.TokensSeen, loaded.TokensSeen);
        Assert.Equal(12.5, loaded.ElapsedSeconds);
        Assert.Equal(MicroOptions, loaded.Options);
        Assert.Empty(ConfigBinding.Differences(MicroConfig, loaded.Config));
        Assert.True(expected.eq(Logits(loaded)).all().item<bool>(), "logits after load differ");
        // Buffers too (k-means centroids), not only parameters.
        var a = trainer.Model.state_dict();
        var b = loaded.Model.state_dict();
        Assert.Equal(a.Keys.Order(), b.Keys.Order());
        Assert.Contains(a.Keys, k => k.EndsWith("means"));
        foreach (var key in a.Keys) Assert.True(a[key].eq(b[key]).all().item<bool>(), key);
    }

    [Theory]
    [InlineData(0.0)]
    [InlineData(0.5)]
    public void Resume_continues_the_same_loss_curve(double randomTruncate)
    {
        var options = MicroOptions with { RandomTruncate = randomTruncate };
        // 6 steps straight (2 micro-batches each, routing centroids updated every step) ...
        var straight = new List<double>();
        using (var t = new Trainer(MicroConfig, options, TrainBytes, ValBytes))
            for (int i = 0; i < 6; i++) straight.Add(t.TrainStep().Loss);

        // ... against 3 steps, save, throw the trainer away, load, 3 more steps.
        var resumed = new List<double>();
        string path = Path.Combine(Dir, "mid.sat");
        using (var t = new Trainer(MicroConfig, options, TrainBytes, ValBytes))
        {
            for (int i = 0; i < 3; i++) resumed.Add(t.TrainStep().Loss);
            Checkpoint.Save(t, path);
            random.manual_seed(12345);   // disturb the global generator: the checkpoint must restore it
        }
        double bpcResumed;
        using (var t = Checkpoint.Load(path, TrainBytes, ValBytes))
        {
            for (int i = 0; i < 3; i++) resumed.Add(t.TrainStep().Loss);
            bpcResumed = t.ValidationBitsPerCharacter();
        }
        for (int i = 0; i < 6; i++) Assert.True(Math.Abs(straight[i] - resumed[i]) < 1e-5, $"step {i + 1}: {straight[i]} vs {resumed[i]}");
        Assert.True(straight[5] < straight[0], "loss should fall on this repetitive text");
        Assert.True(bpcResumed < 8.0, $"validation bpc {bpcResumed} is no better than uniform");
    }

    [Fact]
    public void Random_truncation_cuts_some_batches_to_uniform_lengths_and_leaves_the_rest_alone()
    {
        var lengths = new List<long>();
        using (var t = new Trainer(MicroConfig, MicroOptions with { RandomTruncate = 0.5 }, TrainBytes, ValBytes))
            for (int i = 0; i < 400; i++) lengths.Add(t.NextBatch().shape[1]);
        int full = lengths.Count(l => l == 16);
        Assert.InRange(full, 160, 240);                                            // ≈ half uncut (plus the 1/15 of cuts that land on 16)
        Assert.All(lengths, l => Assert.InRange(l, 2, 16));
        Assert.True(lengths.Where(l => l < 16).Distinct().Count() >= 12, "cut lengths should spread over [2, 15]");
        using (var off = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes))
            for (int i = 0; i < 50; i++) Assert.Equal(16, off.NextBatch().shape[1]);
        Assert.Throws<ArgumentException>(() => (MicroOptions with { RandomTruncate = 1.5 }).Validate());
    }

    [Fact]
    public void Interrupted_save_leaves_the_previous_checkpoint_loadable()
    {
        string path = Path.Combine(Dir, "ckpt.sat");
        using var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes);
        trainer.TrainStep();
        Checkpoint.Save(trainer, path);
        var before = File.ReadAllBytes(path);

        var e = Assert.Throws<IOException>(() => AtomicFile.Write(path, stream =>
        {
            stream.Write(before, 0, before.Length / 3);   // half-written new content ...
            throw new IOException("disk full (simulated)"); // ... then the writer dies
        }));
        Assert.Contains("simulated", e.Message);
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.False(File.Exists(path + ".tmp"));
        using var loaded = Checkpoint.Load(path, TrainBytes, ValBytes);
        Assert.Equal(1, loaded.Step);
    }

    [Fact]
    public void Corrupt_truncated_and_foreign_files_give_clear_errors()
    {
        string path = Path.Combine(Dir, "ckpt.sat");
        using (var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes)) Checkpoint.Save(trainer, path);
        var good = File.ReadAllBytes(path);

        var flipped = (byte[])good.Clone();
        flipped[good.Length / 2] ^= 1;
        File.WriteAllBytes(path, flipped);
        Assert.Contains("checksum mismatch", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, TrainBytes, ValBytes)).Message);

        File.WriteAllBytes(path, good[..(good.Length - 100)]);
        Assert.Contains("truncated", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, TrainBytes, ValBytes)).Message);

        File.WriteAllText(path, "hello, not a checkpoint");
        Assert.Contains("not a sparse-attn checkpoint", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, TrainBytes, ValBytes)).Message);

        Assert.Contains("does not exist", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path + ".missing", TrainBytes, ValBytes)).Message);

        // Data too short for the stored sequence length: a clear error, not a crash.
        File.WriteAllBytes(path, good);
        Assert.Contains("cannot continue on this data", Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, TrainBytes, ValBytes[..10])).Message);
    }
}

public sealed class CheckpointMismatchTests : TrainTestBase
{
    [Fact]
    public void Model_state_that_does_not_fit_the_stored_configuration_is_a_clear_error()
    {
        // A well-formed file (valid checksum) whose header says dim 32 while the tensors are dim 16.
        string path = Path.Combine(Dir, "ckpt.sat");
        using (var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes)) Checkpoint.Save(trainer, path);
        var file = File.ReadAllBytes(path);
        int fixedLen = 8 + 4 + 8;
        long length = BitConverter.ToInt64(file, 12);
        using var reader = new BinaryReader(new MemoryStream(file, fixedLen, (int)length));
        string header = reader.ReadString();
        var rest = reader.ReadBytes((int)(length - reader.BaseStream.Position));
        Assert.Contains("\"dim\":16", header);
        using var payload = new MemoryStream();
        using (var w = new BinaryWriter(payload, Encoding.UTF8, leaveOpen: true))
        {
            w.Write(header.Replace("\"dim\":16", "\"dim\":32"));
            w.Write(rest);
        }
        var bytes = payload.ToArray();
        using (var w = new BinaryWriter(File.Create(path)))
        {
            w.Write(file, 0, 12);
            w.Write((long)bytes.Length);
            w.Write(bytes);
            w.Write(System.Security.Cryptography.SHA256.HashData(bytes));
        }
        var before = File.ReadAllBytes(path);
        Assert.Equal(32, Checkpoint.ReadHeader(path).Config.Dim);
        var e = Assert.Throws<CheckpointException>(() => Checkpoint.Load(path, TrainBytes, ValBytes));
        Assert.Contains("does not match its configuration", e.Message);
        Assert.Equal(before, File.ReadAllBytes(path));
    }
}
