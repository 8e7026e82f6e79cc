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

/// <summary>Safetensors and torch.save files through <see cref="WeightFiles"/> (PyBridge reads and writes the tensors;
/// the strict header validation is this project's).</summary>
public sealed class SafetensorsTests : TrainedModelTestBase
{
    private static readonly byte[] Probe = TrainBytes[..16];

    [Theory]
    [InlineData("m.safetensors")]
    [InlineData("m.pt")]
    [InlineData("m.bin")]
    public void Model_round_trip_gives_bit_identical_outputs_and_state(string name)
    {
        using var trainer = Load(TrainCheckpoint());
        string path = Path.Combine(Dir, name);
        WeightFiles.SaveModel(trainer.Model, path);
        Assert.False(File.Exists(path + ".tmp"));

        random.manual_seed(99);                       // a differently initialised model ...
        using var other = new RoutingTransformerLM(MicroConfig);
        Assert.False(Logits(other, Probe).equal(Logits(trainer.Model, Probe)).all().item<bool>());
        WeightFiles.LoadModel(other, path);           // ... takes every parameter and buffer from the file
        Assert.True(Logits(other, Probe).equal(Logits(trainer.Model, Probe)).all().item<bool>(), "logits differ after the round trip");
        var a = trainer.Model.state_dict();
        var b = other.state_dict();
        Assert.Contains(a.Keys, k => k.EndsWith("means"));
        Assert.Contains(a.Keys, k => k.EndsWith("initted"));
        foreach (var key in a.Keys) Assert.True(a[key].equal(b[key]).all().item<bool>(), key);
    }

    /// <summary>PyBridge writes what the format says (the header checked field by field, the data byte by byte), and its
    /// output passes the strict validation (no padding or ordering is required that PyBridge does not produce).</summary>
    [Fact]
    public void Written_safetensors_follow_the_format_byte_for_byte()
    {
        var values = tensor(new float[] { 1.0f, -2.5f, 3.25f });                     // (3) F32
        var ids = tensor(new long[] { 7, -1 }, new long[] { 2, 1 });                  // (2, 1) I64
        var flag = tensor(true);                                                      // () BOOL
        string path = Path.Combine(Dir, "layout.safetensors");
        WeightFiles.Write(path, [("values", values), ("ids", ids), ("flag", flag)]);
        var bytes = File.ReadAllBytes(path);

        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        var header = JsonDocument.Parse(Encoding.UTF8.GetString(bytes, 8, (int)n).TrimEnd(' ')).RootElement;
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

        using var stream = File.OpenRead(path);
        var parsed = Safetensors.ReadHeader(stream, path);
        Assert.Equal(["values", "ids", "flag"], parsed.Entries.Select(e => e.Name));
    }

    [Theory]
    [InlineData("d.safetensors")]
    [InlineData("d.pt")]
    public void Every_supported_dtype_round_trips_including_scalars_and_empty_tensors(string name)
    {
        var gen = new Generator(5);
        var f32 = randn(new long[] { 3, 5 }, generator: gen);
        var tensors = new List<(string, Tensor)>
        {
            ("f64", randn(new long[] { 2, 3 }, dtype: ScalarType.Float64, generator: gen)), ("f32", f32),
            ("f16", f32.to(ScalarType.Float16)), ("bf16", f32.to(ScalarType.BFloat16)),
            ("i64", tensor(new long[] { long.MinValue, 0, long.MaxValue })), ("i32", tensor(new[] { -3, 4 })),
            ("u8", tensor(new byte[] { 0, 255 })), ("bool", tensor(new[] { true, false, true })),
            ("scalar", tensor(2.5f)), ("empty", zeros(0, 4)), ("strided", f32.t()),
        };
        string path = Path.Combine(Dir, name);
        WeightFiles.Write(path, tensors);
        using var contents = WeightFiles.Read(path);
        Assert.Equal(tensors.Select(t => t.Item1).Order(StringComparer.Ordinal), contents.Tensors.Select(e => e.Name).Order(StringComparer.Ordinal));
        foreach (var (tensorName, expected) in tensors)
        {
            var actual = contents.ByName[tensorName];
            Assert.Equal(expected.dtype, actual.dtype);
            Assert.Equal(expected.shape, actual.shape);
            Assert.True(expected.equal(actual).all().item<bool>(), tensorName);
        }
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

    private string WriteFile(string name, byte[] bytes)
    {
        string path = Path.Combine(Dir, name);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    /// <summary>Each case goes through the reader the tools use (<see cref="WeightFiles.Read"/>: this project's header
    /// validation, then PyBridge for the data). The comment says what PyBridge 1.4.4 alone does with the file.</summary>
    [Theory]
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 8, null)]                                   // valid
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 4, "run past the end of the data buffer (4 bytes")]  // PyBridge: EndOfStreamException
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 12, "cover 8 bytes but the data buffer holds 12")]  // PyBridge: accepted
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "overlaps tensor 'a'")] // accepted
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", 12, "gap before 'b'")] // accepted
    [InlineData("""{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "gap before 'a'")]                        // accepted
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}""", 8, "end before they begin")]                 // NotImplementedException
    [InlineData("""{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}""", 8, "unknown dtype 'Q4'")]                     // NotImplementedException
    [InlineData("""{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}""", 8, "needs 12 bytes but data_offsets [0, 8] span 8")] // NotImplementedException
    [InlineData("""{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}""", 8, "non-negative integers")]               // libtorch exception
    [InlineData("""{"a":{"dtype":"F32","shape":[2]}}""", 8, "missing data_offsets")]                                      // NullReferenceException
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}}""", 8, "unexpected field 'extra'")]    // accepted
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}""", 8, "names 'a' twice")] // accepted, last wins
    [InlineData("""{"__metadata__":{"k":1},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}""", 8, "must be a string")] // accepted
    [InlineData("""{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]""", 8, "not well-formed JSON")]                   // JsonException
    [InlineData("""[1,2]""", 0, "does not start with '{'")]                                                               // JsonException
    [InlineData("""{"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}""", 1, null)]
    public void Header_validation_names_the_file_and_the_problem(string header, int dataBytes, string? expected)
    {
        string path = WriteFile("f.safetensors", Build(header, dataBytes));
        if (expected is null)
        {
            using var ok = WeightFiles.Read(path);
            Assert.Single(ok.Tensors);
            return;
        }
        var e = Assert.Throws<WeightFileException>(() => WeightFiles.Read(path));
        Assert.StartsWith(path + ": ", e.Message);
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void Truncated_files_absurd_header_lengths_and_bad_bools_are_refused()
    {
        string goodPath = Path.Combine(Dir, "good.safetensors");
        WeightFiles.Write(goodPath, [("w", ones(4, 4))]);
        var good = File.ReadAllBytes(goodPath);
        string Refused(string name, byte[] bytes) => Assert.Throws<WeightFileException>(() => WeightFiles.Read(WriteFile(name, bytes))).Message;
        Assert.Contains("truncated: 5 bytes", Refused("t5.safetensors", good[..5]));
        Assert.Contains("truncated", Refused("t20.safetensors", good[..20]));             // header cut
        Assert.Contains("file truncated?", Refused("t1.safetensors", good[..^1]));        // data cut
        var huge = (byte[])good.Clone();
        BinaryPrimitives.WriteUInt64LittleEndian(huge, ulong.MaxValue);
        Assert.Contains("exceeds the limit", Refused("huge.safetensors", huge));
        var badBool = Build("""{"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}""", 1);
        badBool[^1] = 7;                                                                  // PyBridge alone accepts this
        Assert.Contains("holds the byte 7", Refused("bool.safetensors", badBool));
        Assert.Contains("does not exist", Assert.Throws<WeightFileException>(() => WeightFiles.Read(Path.Combine(Dir, "none.safetensors"))).Message);
    }

    [Fact]
    public void Loading_into_a_model_lists_missing_unexpected_and_mismatched_tensors()
    {
        using var model = new RoutingTransformerLM(MicroConfig);
        var state = model.state_dict().ToList();
        var first = state[0];
        var tensors = state.Skip(2).Select(kv => (kv.Key, kv.Value)).ToList();                       // two missing
        tensors.Add(("not.in.the.model", zeros(3)));                                                 // one unexpected
        int wide = tensors.FindIndex(t => t.Value.dim() == 2);
        tensors[wide] = (tensors[wide].Key, zeros(tensors[wide].Value.shape[0] + 1, tensors[wide].Value.shape[1]));   // one reshaped
        foreach (var name in new[] { "bad.safetensors", "bad.pt" })
        {
            string bad = Path.Combine(Dir, name);
            WeightFiles.Write(bad, tensors);
            var e = Assert.Throws<WeightFileException>(() => WeightFiles.LoadModel(model, bad));
            Assert.StartsWith(bad + " does not fit the model", e.Message);
            Assert.Contains("missing 2 tensor(s) the model needs: " + first.Key, e.Message);
            Assert.Contains("1 unexpected tensor(s): not.in.the.model", e.Message);
            Assert.Contains($"1 mismatched: {tensors[wide].Key} has shape [{tensors[wide].Value.shape[0]}, {tensors[wide].Value.shape[1]}] in the file", e.Message);
        }
    }

    [Fact]
    public void Half_precision_weights_load_into_a_float32_model()
    {
        using var trainer = Load(TrainCheckpoint());
        string path = Path.Combine(Dir, "half.safetensors");
        WeightFiles.SaveModel(trainer.Model, path, floatType: ScalarType.BFloat16);
        using (var stream = File.OpenRead(path))
        {
            var header = Safetensors.ReadHeader(stream, path);
            Assert.All(header.Entries.Where(e => !e.Name.EndsWith("initted")), e => Assert.Equal("BF16", e.Dtype));
            Assert.Equal("BOOL", header.Entries.Single(e => e.Name.EndsWith("initted")).Dtype);
        }
        random.manual_seed(3);
        using var other = new RoutingTransformerLM(MicroConfig);
        WeightFiles.LoadModel(other, path);
        var expected = trainer.Model.state_dict();
        foreach (var (name, t) in other.state_dict())
        {
            Assert.Equal(expected[name].dtype, t.dtype);
            if (t.is_floating_point()) Assert.True(t.equal(expected[name].to(ScalarType.BFloat16).to(t.dtype)).all().item<bool>(), name);
        }
    }

    /// <summary>Earlier versions exported one .safetensors file with the configuration in <c>__metadata__["config"]</c>
    /// (and no JSON beside it); such files still load. The file is rebuilt here with that header.</summary>
    [Fact]
    public void Files_with_the_configuration_in_their_metadata_still_load()
    {
        using var trainer = Load(TrainCheckpoint());
        string plain = Path.Combine(Dir, "plain.safetensors");
        WeightFiles.SaveModel(trainer.Model, plain);
        var bytes = File.ReadAllBytes(plain);
        int n = (int)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        var header = System.Text.Json.Nodes.JsonNode.Parse(Encoding.UTF8.GetString(bytes, 8, n))!.AsObject();
        header["__metadata__"] = new System.Text.Json.Nodes.JsonObject { ["format"] = "pt", ["config"] = ConfigBinding.ToJson(MicroConfig), ["step"] = "3" };
        var newHeader = Encoding.UTF8.GetBytes(header.ToJsonString());
        var file = new byte[8 + newHeader.Length + bytes.Length - 8 - n];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)newHeader.Length);
        newHeader.CopyTo(file, 8);
        bytes.AsSpan(8 + n).CopyTo(file.AsSpan(8 + newHeader.Length));
        string old = Path.Combine(Dir, "old", "export.safetensors");
        Directory.CreateDirectory(Path.GetDirectoryName(old)!);
        File.WriteAllBytes(old, file);
        using var loaded = CheckpointLocator.Load(old, null);
        Assert.Equal(3, loaded.Step);
        Assert.True(Logits(trainer.Model, Probe).equal(Logits(loaded.Model, Probe)).all().item<bool>());
    }

    [Fact]
    public void Export_and_import_commands_round_trip_through_safetensors()
    {
        string checkpoint = TrainCheckpoint();
        string file = Path.Combine(Dir, "out", "weights.safetensors");
        var (code, stdout, stderr) = CliRunner.Run("export", "--checkpoint", RunDir, "--out", file);
        Assert.True(code == 0, stderr);
        string sidecar = Path.Combine(Dir, "out", "weights.json");
        Assert.Contains($"configuration in {sidecar}", stdout);
        Assert.Empty(ConfigBinding.Differences(MicroConfig, ConfigBinding.FromJson(File.ReadAllText(sidecar), "c")));

        // Hugging Face folder layout: model.safetensors + config.json.
        string folder = Path.Combine(Dir, "hf");
        (code, _, stderr) = CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--dtype", "float16");
        Assert.True(code == 0, stderr);
        Assert.True(File.Exists(Path.Combine(folder, "model.safetensors")));
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
        using (var t = Load(checkpoint)) WeightFiles.SaveModel(t.Model, bare);
        AssertUsageError(CliRunner.Run("import", "--weights", bare, "--out", Path.Combine(Dir, "x.sat")), "carries no model configuration");
        string wrong = Path.Combine(Dir, "wrong.json");
        File.WriteAllText(wrong, ConfigBinding.ToJson(MicroConfig with { Dim = 32 }));
        var mismatch = CliRunner.Run("import", "--weights", bare, "--config", wrong, "--out", Path.Combine(Dir, "x.sat"));
        Assert.Equal(CliApp.Failure, mismatch.Code);
        Assert.Contains("does not fit the model", mismatch.Err);
        Assert.Contains("mismatched", mismatch.Err);
        Assert.Single(mismatch.Err.Trim().Split('\n'));
        Assert.False(File.Exists(Path.Combine(Dir, "x.sat")));
        AssertUsageError(CliRunner.Run("export", "--checkpoint", checkpoint, "--out", file, "--dtype", "int8"), "--dtype: expected float32, float16 or bfloat16");
        AssertUsageError(CliRunner.Run("export", "--checkpoint", Path.Combine(Dir, "nothing"), "--out", file), "--checkpoint: no such file or folder");
        AssertUsageError(CliRunner.Run("export", "--checkpoint", checkpoint, "--out", Path.Combine(Dir, "w.onnx")), "--out: '");
        AssertUsageError(CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--format", "onnx"), "--format: expected sparse-attn or routing-transformer-pytorch");
        AssertUsageError(CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--max-shard-size", "lots"), "--max-shard-size: expected a size");
    }
}
