using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>A run folder with a checkpoint of the micro model after a few training steps, for the CLI tests.</summary>
public abstract class TrainedModelTestBase : TrainTestBase
{
    protected string RunDir => Path.Combine(Dir, "run");

    /// <summary>Trains the micro model <paramref name="steps"/> steps and saves ckpt-STEP.sat in <see cref="RunDir"/>.</summary>
    protected string TrainCheckpoint(int steps = 3)
    {
        using var trainer = new Trainer(MicroConfig, MicroOptions, TrainBytes, ValBytes);
        for (int i = 0; i < steps; i++) trainer.TrainStep();
        string path = Checkpoint.PathFor(RunDir, trainer.Step);
        Checkpoint.Save(trainer, path);
        return path;
    }

    protected static Trainer Load(string checkpoint) => Checkpoint.Load(checkpoint, TrainBytes, ValBytes);

    protected static Tensor Logits(RoutingTransformerLM model, byte[] text)
    {
        model.eval();
        using var _ = no_grad();
        return model.forward(tensor(text.Select(b => (long)b).ToArray(), new long[] { 1, text.Length }), null).Logits.detach().clone();
    }

    protected static void AssertUsageError((int Code, string Out, string Err) result, string expected)
    {
        Assert.True(result.Code == CliApp.UsageError, $"exit {result.Code}, stderr: {result.Err}");
        Assert.StartsWith("error: ", result.Err);
        Assert.Contains(expected, result.Err);
        Assert.Single(result.Err.Trim().Split('\n'));
        Assert.DoesNotContain("   at ", result.Err);
    }
}

public sealed class SafetensorsTests : TrainedModelTestBase
{
    private static readonly byte[] Probe = TrainBytes[..16];

    [Fact]
    public void Model_round_trip_gives_bit_identical_outputs_and_keeps_metadata()
    {
        using var trainer = Load(TrainCheckpoint());
        string path = Path.Combine(Dir, "m.safetensors");
        Safetensors.SaveModel(trainer.Model, path, new Dictionary<string, string> { ["config"] = ConfigBinding.ToJson(MicroConfig), ["step"] = "3" });
        Assert.False(File.Exists(path + ".tmp"));

        random.manual_seed(99);                       // a differently initialised model ...
        using var other = new RoutingTransformerLM(MicroConfig);
        Assert.False(Logits(other, Probe).equal(Logits(trainer.Model, Probe)).all().item<bool>());
        var metadata = Safetensors.LoadModel(other, path);   // ... takes every parameter and buffer from the file
        Assert.True(Logits(other, Probe).equal(Logits(trainer.Model, Probe)).all().item<bool>(), "logits differ after the round trip");
        var a = trainer.Model.state_dict();
        var b = other.state_dict();
        Assert.Contains(a.Keys, k => k.EndsWith("means"));
        Assert.Contains(a.Keys, k => k.EndsWith("initted"));
        foreach (var key in a.Keys) Assert.True(a[key].equal(b[key]).all().item<bool>(), key);
        Assert.Equal("3", metadata["step"]);
        Assert.Empty(ConfigBinding.Differences(MicroConfig, ConfigBinding.FromJson(metadata["config"], "config")));
    }

    [Fact]
    public void Layout_follows_the_format_byte_for_byte()
    {
        var values = tensor(new float[] { 1.0f, -2.5f, 3.25f });                     // (3) F32
        var ids = tensor(new long[] { 7, -1 }, new long[] { 2, 1 });                  // (2, 1) I64
        var flag = tensor(true);                                                      // () BOOL
        var bytes = Safetensors.Serialize([("values", values), ("ids", ids), ("flag", flag)], new Dictionary<string, string> { ["k"] = "v" });

        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0UL, n % 8);
        var header = JsonDocument.Parse(Encoding.UTF8.GetString(bytes, 8, (int)n).TrimEnd(' ')).RootElement;
        Assert.Equal("v", header.GetProperty("__metadata__").GetProperty("k").GetString());
        long[] Offsets(string name) => header.GetProperty(name).GetProperty("data_offsets").EnumerateArray().Select(e => e.GetInt64()).ToArray();
        Assert.Equal("F32", header.GetProperty("values").GetProperty("dtype").GetString());
        Assert.Equal([3L], header.GetProperty("values").GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()));
        Assert.Equal([0L, 12], Offsets("values"));
        Assert.Equal("I64", header.GetProperty("ids").GetProperty("dtype").GetString());
        Assert.Equal([2L, 1], header.GetProperty("ids").GetProperty("shape").EnumerateArray().Select(e => e.GetInt64()));
        Assert.Equal([12L, 28], Offsets("ids"));
        Assert.Equal("BOOL", header.GetProperty("flag").GetProperty("dtype").GetString());
        Assert.Empty(header.GetProperty("flag").GetProperty("shape").EnumerateArray());
        Assert.Equal([28L, 29], Offsets("flag"));
        Assert.Equal(8 + (long)n + 29, bytes.Length);

        var data = bytes.AsSpan(8 + (int)n);                                          // raw little-endian values
        Assert.Equal(1.0f, BinaryPrimitives.ReadSingleLittleEndian(data));
        Assert.Equal(-2.5f, BinaryPrimitives.ReadSingleLittleEndian(data[4..]));
        Assert.Equal(3.25f, BinaryPrimitives.ReadSingleLittleEndian(data[8..]));
        Assert.Equal(7L, BinaryPrimitives.ReadInt64LittleEndian(data[12..]));
        Assert.Equal(-1L, BinaryPrimitives.ReadInt64LittleEndian(data[20..]));
        Assert.Equal(1, data[28]);
    }

    [Fact]
    public void Every_supported_dtype_round_trips_including_scalars_and_empty_tensors()
    {
        var gen = new Generator(5);
        var f32 = randn(new long[] { 3, 5 }, generator: gen);
        var tensors = new List<(string, Tensor)>
        {
            ("f64", randn(new long[] { 2, 3 }, dtype: ScalarType.Float64, generator: gen)), ("f32", f32),
            ("f16", f32.to(ScalarType.Float16)), ("bf16", f32.to(ScalarType.BFloat16)),
            ("i64", tensor(new long[] { long.MinValue, 0, long.MaxValue })), ("i32", tensor(new[] { -3, 4 })),
            ("u8", tensor(new byte[] { 0, 255 })), ("bool", tensor(new[] { true, false, true })),
            ("scalar", tensor(2.5f)), ("empty", zeros(0, 4)),
        };
        using var contents = Safetensors.Parse(Safetensors.Serialize(tensors));
        Assert.Equal(tensors.Select(t => t.Item1), contents.Entries.Select(e => e.Name));
        foreach (var (name, expected) in tensors)
        {
            var actual = contents[name]!;
            Assert.Equal(expected.dtype, actual.dtype);
            Assert.Equal(expected.shape, actual.shape);
            Assert.True(expected.equal(actual).all().item<bool>(), name);
        }
        Assert.Equal(["F64", "F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F32", "F32"], contents.Entries.Select(e => e.Dtype));
    }

    /// <summary>A file with the given header text (unpadded) and data buffer.</summary>
    private static byte[] Build(string header, int dataBytes)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var file = new byte[8 + h.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)h.Length);
        h.CopyTo(file, 8);
        return file;
    }

    /// <summary>Tensors stream to and from files in pieces (so neither a file nor a tensor larger than 2 GB needs one
    /// array); here pieces of 12 bytes, which split elements of no dtype and leave a short last piece, must give the same
    /// bytes as one piece per tensor — the file is compared byte for byte with the layout written whole.</summary>
    [Fact]
    public void Piecewise_streaming_gives_the_same_file_and_tensors()
    {
        var gen = new Generator(5);
        var tensors = new List<(string, Tensor)>
        {
            ("w", randn(new long[] { 37, 11 }, generator: gen)), ("d", randn(new long[] { 5 }, dtype: ScalarType.Float64, generator: gen)),
            ("h", randn(new long[] { 7 }, generator: gen).to(ScalarType.Float16)), ("b", tensor(new[] { true, false, true, true, false })),
            ("s", tensor(1.5f)),
        };
        var whole = Safetensors.Serialize(tensors);
        long previous = Safetensors.ChunkBytes;
        try
        {
            Safetensors.ChunkBytes = 12;
            Assert.Equal(whole, Safetensors.Serialize(tensors));
            string path = Path.Combine(Dir, "pieces.safetensors");
            Safetensors.Write(path, tensors);
            Assert.Equal(whole, File.ReadAllBytes(path));
            using var contents = Safetensors.Read(path);
            foreach (var (name, expected) in tensors)
                Assert.True(expected.equal(contents[name]!).all().item<bool>(), name);
            // A bad BOOL byte in a later piece is still found.
            var bad = (byte[])whole.Clone();
            var entry = contents.Entries.Single(e => e.Name == "b");
            long dataStart = whole.Length - contents.Entries.Max(e => e.End);
            bad[dataStart + entry.Begin + 4] = 7;
            Assert.Contains("holds the byte 7", Assert.Throws<SafetensorsException>(() => Safetensors.Parse(bad)).Message);
        }
        finally { Safetensors.ChunkBytes = previous; }
    }

    [Theory]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 8, null)]                                   // valid
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 4, "run past the end of the data buffer (4 bytes")]                       // buffer short: offsets out of range
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 12, "cover 8 bytes but the data buffer holds 12")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "overlaps tensor 'a'")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", 12, "gap before 'b'")]
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "gap before 'a'")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}""", 8, "end before they begin")]
    [InlineData("""{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}""", 8, "unknown dtype 'Q4'")]
    [InlineData("""{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", 8, "needs 12 bytes but data_offsets [0, 8] span 8")]
    [InlineData("""{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""", 8, "non-negative integers")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2]}}""", 8, "missing data_offsets")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}}""", 8, "unexpected field 'extra'")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}""", 8, "names 'a' twice")]
    [InlineData("""{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 8, "must be a string")]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]""", 8, "not well-formed JSON")]
    [InlineData("""[1,2]""", 0, "does not start with '{'")]
    [InlineData("""{"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}""", 1, null)]
    public void Header_validation_names_the_problem(string header, int dataBytes, string? expected)
    {
        var file = Build(header, dataBytes);
        if (expected is null)
        {
            using var ok = Safetensors.Parse(file, "f");
            Assert.Single(ok.Entries);
            return;
        }
        var e = Assert.Throws<SafetensorsException>(() => Safetensors.Parse(file, "f.safetensors"));
        Assert.StartsWith("f.safetensors: ", e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void Truncated_files_and_absurd_header_lengths_are_refused()
    {
        var good = Safetensors.Serialize([("w", ones(4, 4))]);
        Assert.Contains("truncated: 5 bytes", Assert.Throws<SafetensorsException>(() => Safetensors.Parse(good[..5])).Message);
        Assert.Contains("truncated", Assert.Throws<SafetensorsException>(() => Safetensors.Parse(good[..20])).Message);       // header cut
        Assert.Contains("file truncated?", Assert.Throws<SafetensorsException>(() => Safetensors.Parse(good[..^1])).Message); // data cut
        var huge = (byte[])good.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(huge, ulong.MaxValue);
        Assert.Contains("exceeds the limit", Assert.Throws<SafetensorsException>(() => Safetensors.Parse(huge)).Message);
        var badBool = Build("""{"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}""", 1);
        badBool[^1] = 7;
        Assert.Contains("holds the byte 7", Assert.Throws<SafetensorsException>(() => Safetensors.Parse(badBool)).Message);
        Assert.Contains("does not exist", Assert.Throws<SafetensorsException>(() => Safetensors.Read(Path.Combine(Dir, "none.safetensors"))).Message);
    }

    [Fact]
    public void Loading_into_a_model_lists_missing_unexpected_and_mismatched_tensors()
    {
        using var model = new RoutingTransformerLM(MicroConfig);
        var state = model.state_dict().ToList();
        string bad = Path.Combine(Dir, "bad.safetensors");
        var first = state[0];
        var tensors = state.Skip(2).Select(kv => (kv.Key, kv.Value)).ToList();                       // two missing
        tensors.Add(("not.in.the.model", zeros(3)));                                                 // one unexpected
        int wide = tensors.FindIndex(t => t.Value.dim() == 2);
        tensors[wide] = (tensors[wide].Key, zeros(tensors[wide].Value.shape[0] + 1, tensors[wide].Value.shape[1]));   // one reshaped
        Safetensors.Write(bad, tensors);
        var e = Assert.Throws<SafetensorsException>(() => Safetensors.LoadModel(model, bad));
        Assert.Contains("missing 2 tensor(s) the model needs: " + first.Key, e.Message);
        Assert.Contains("1 unexpected tensor(s): not.in.the.model", e.Message);
        Assert.Contains($"1 mismatched: {tensors[wide].Key} has shape [{tensors[wide].Value.shape[0]}, {tensors[wide].Value.shape[1]}] in the file", e.Message);
    }

    [Fact]
    public void Half_precision_weights_load_into_a_float32_model()
    {
        using var trainer = Load(TrainCheckpoint());
        string path = Path.Combine(Dir, "half.safetensors");
        Safetensors.SaveModel(trainer.Model, path, floatType: ScalarType.BFloat16);
        using (var contents = Safetensors.Read(path))
        {
            Assert.All(contents.Entries.Where(e => !e.Name.EndsWith("initted")), e => Assert.Equal("BF16", e.Dtype));
            Assert.Equal("BOOL", contents.Entries.Single(e => e.Name.EndsWith("initted")).Dtype);
        }
        random.manual_seed(3);
        using var other = new RoutingTransformerLM(MicroConfig);
        Safetensors.LoadModel(other, path);
        var expected = trainer.Model.state_dict();
        foreach (var (name, t) in other.state_dict())
        {
            Assert.Equal(expected[name].dtype, t.dtype);
            if (t.is_floating_point()) Assert.True(t.equal(expected[name].to(ScalarType.BFloat16).to(t.dtype)).all().item<bool>(), name);
        }
    }

    [Fact]
    public void Export_and_import_commands_round_trip_through_safetensors()
    {
        string checkpoint = TrainCheckpoint();
        string file = Path.Combine(Dir, "out", "model.safetensors");
        var (code, stdout, stderr) = CliRunner.Run("export", "--checkpoint", RunDir, "--out", file);
        Assert.True(code == 0, stderr);
        Assert.Contains("configuration in __metadata__[\"config\"]", stdout);
        using (var contents = Safetensors.Read(file))
        {
            Assert.Equal("pt", contents.Metadata["format"]);
            Assert.Equal("3", contents.Metadata["step"]);
            Assert.Empty(ConfigBinding.Differences(MicroConfig, ConfigBinding.FromJson(contents.Metadata["config"], "c")));
        }

        // Hugging Face folder layout: model.safetensors + config.json.
        string folder = Path.Combine(Dir, "hf");
        (code, _, stderr) = CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--dtype", "float16");
        Assert.True(code == 0, stderr);
        Assert.True(File.Exists(Path.Combine(folder, "model.safetensors")));
        Assert.Empty(ConfigBinding.Differences(MicroConfig, ConfigBinding.FromJson(File.ReadAllText(Path.Combine(folder, "config.json")), "c")));
        // ... which --checkpoint reads like from_pretrained: the float16 weights score (almost) like the checkpoint.
        string data = Path.Combine(Dir, "eval.txt");
        File.WriteAllBytes(data, ValBytes);
        double Bpc(string source) => JsonDocument.Parse(CliRunner.Run("eval", "--checkpoint", source, "--data", data, "--json").Out).RootElement.GetProperty("bpc").GetDouble();
        double full = Bpc(checkpoint), half = Bpc(folder);
        Assert.True(Math.Abs(full - half) < 2e-3 * full, $"bpc {full} (checkpoint) vs {half} (float16 export)");

        // Import into a run folder: a step-0 checkpoint with the same weights (bit-identical logits).
        string imported = Path.Combine(Dir, "imported");
        (code, stdout, stderr) = CliRunner.Run("import", "--weights", file, "--out", imported);
        Assert.True(code == 0, stderr);
        Assert.Contains("train --resume", stdout);
        using (var original = Load(checkpoint))
        using (var back = Load(Checkpoint.PathFor(imported, 0)))
        {
            Assert.Equal(0, back.Step);
            Assert.True(Logits(original.Model, Probe).equal(Logits(back.Model, Probe)).all().item<bool>());
        }
        Assert.True(File.Exists(Path.Combine(imported, "config.json")));

        // Weights without a configuration need --config; a wrong configuration names the mismatch.
        string bare = Path.Combine(Dir, "bare.safetensors");
        using (var t = Load(checkpoint)) Safetensors.SaveModel(t.Model, bare);
        AssertUsageError(CliRunner.Run("import", "--weights", bare, "--out", Path.Combine(Dir, "x.sat")), "carries no model configuration");
        string wrong = Path.Combine(Dir, "wrong.json");
        File.WriteAllText(wrong, ConfigBinding.ToJson(MicroConfig with { Dim = 32 }));
        var mismatch = CliRunner.Run("import", "--weights", bare, "--config", wrong, "--out", Path.Combine(Dir, "x.sat"));
        Assert.Equal(CliApp.Failure, mismatch.Code);
        Assert.Contains("does not fit the model", mismatch.Err);
        Assert.Contains("mismatched", mismatch.Err);
        Assert.False(File.Exists(Path.Combine(Dir, "x.sat")));
        AssertUsageError(CliRunner.Run("export", "--checkpoint", checkpoint, "--out", file, "--dtype", "int8"), "--dtype: expected float32, float16 or bfloat16");
        AssertUsageError(CliRunner.Run("export", "--checkpoint", Path.Combine(Dir, "nothing"), "--out", file), "--checkpoint: no such file or folder");
    }
}
