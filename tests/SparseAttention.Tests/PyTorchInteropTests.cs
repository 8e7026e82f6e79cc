using System.Text.Json;
using System.Text.Json.Nodes;
using SparseAttention.Cli;
using SparseAttention.Model;
using SparseAttention.Training;
using TorchSharp.PyBridge;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>torch.save files, sharded Hugging Face checkpoints, exported folders and the PyTorch routing-transformer
/// layout through the CLI and <see cref="WeightFiles"/>; PyBridge's own readers and writers serve as the independent side.</summary>
public sealed class PyTorchInteropTests : TrainedModelTestBase
{
    private static readonly byte[] Probe = TrainBytes[..16];

    /// <summary>MicroConfig with the library's feed-forward width, so it has a PyTorch routing-transformer counterpart
    /// (one local head, one causal shared-QK routing head), and the default block size: the constructor arguments carry
    /// no performance settings (block_size, kernel, compute_dtype), and another block size sums in another order.</summary>
    private static TransformerConfig LibraryConfig => MicroConfig with { FfMult = 4, BlockSize = new TransformerConfig().BlockSize };

    private string TrainLibraryCompatible(int steps = 3)
    {
        using var trainer = new Trainer(LibraryConfig, MicroOptions, TrainBytes, ValBytes);
        for (int i = 0; i < steps; i++) trainer.TrainStep();
        string path = Checkpoint.PathFor(RunDir, trainer.Step);
        Checkpoint.Save(trainer, path);
        return path;
    }

    private static void AssertSameLogits(RoutingTransformerLM expected, string checkpointOrWeights, string? config = null)
    {
        using var loaded = CheckpointLocator.Load(checkpointOrWeights, config);
        Assert.True(Logits(expected, Probe).equal(Logits(loaded.Model, Probe)).all().item<bool>(), $"logits of {checkpointOrWeights} differ");
    }

    private static void AssertOneLineFailure((int Code, string Out, string Err) result, params string[] expected)
    {
        Assert.True(result.Code == CliApp.Failure, $"exit {result.Code}, stderr: {result.Err}");
        Assert.Single(result.Err.Trim().Split('\n'));
        Assert.DoesNotContain("   at ", result.Err);
        foreach (var e in expected) Assert.True(result.Err.Contains(e), $"expected \"{e}\" in: {result.Err}");
    }

    [Fact]
    public void Pt_written_by_the_project_reads_back_bit_identically_through_PyBridge()
    {
        using var trainer = Load(TrainCheckpoint());
        string path = Path.Combine(Dir, "model.pt");
        WeightFiles.SaveModel(trainer.Model, path);
        random.manual_seed(42);
        using var other = new RoutingTransformerLM(MicroConfig);
        other.load_py(path, strict: true);                        // PyBridge's own module loader
        var expected = trainer.Model.state_dict();
        foreach (var (name, t) in other.state_dict())
        {
            Assert.Equal(expected[name].dtype, t.dtype);
            Assert.True(t.equal(expected[name]).all().item<bool>(), name);
        }
        Assert.True(Logits(other, Probe).equal(Logits(trainer.Model, Probe)).all().item<bool>());
        // And the other way: a file PyBridge's save_py wrote reads through WeightFiles.
        string pyBridgeFile = Path.Combine(Dir, "pybridge.bin");
        trainer.Model.save_py(pyBridgeFile);
        using var read = WeightFiles.Read(pyBridgeFile);
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), read.Tensors.Select(t => t.Name));
        foreach (var (name, t) in read.Tensors) Assert.True(t.equal(expected[name]).all().item<bool>(), name);
    }

    /// <summary>A torch.save file in the PyTorch routing-transformer layout, built here tensor by tensor with PyBridge's
    /// pickler (names from the library's source, values chosen by the test), plus its constructor arguments: import puts
    /// every value where the library's forward would use it.</summary>
    [Fact]
    public void A_pt_fixture_in_the_library_layout_is_imported()
    {
        const int dim = 16, dh = 8, tokens = 256, seq = 16;
        var gen = new Generator(11);
        Tensor R(params long[] shape) => randn(shape, generator: gen);
        var invFreq = 1.0f / pow(10000f, arange(0, dh, 2, dtype: ScalarType.Float32) / dh);           // (4)
        var angles = outer(arange(seq, dtype: ScalarType.Float32), invFreq);                             // (16, 4)
        const string a = "routing_transformer.layers.layers.0.0.fn.", f = "routing_transformer.layers.layers.0.1.fn.fn.";
        var fixture = new Dictionary<string, Tensor>
        {
            ["sinu_pos_emb.emb"] = cat([angles.sin(), angles.cos()], -1),
            ["token_emb.weight"] = R(tokens, dim),
            ["routing_transformer.layers.layers.0.0.norm.weight"] = R(dim) + 1, ["routing_transformer.layers.layers.0.0.norm.bias"] = R(dim),
            [a + "local_attn.rel_pos.inv_freq"] = invFreq,
            [a + "local_to_qkv.weight"] = R(3 * dh, dim), [a + "local_to_qkv.bias"] = zeros(3 * dh),
            [a + "global_attn.mem_key"] = zeros(1, 2, 0, dh), [a + "global_attn.mem_value"] = zeros(1, 2, 0, dh),
            [a + "global_attn.kmeans.means"] = nn.functional.normalize(R(1, 2, dh), p: 2, dim: -1),
            [a + "global_attn.kmeans.initted"] = tensor(true),
            [a + "to_q.weight"] = R(dh, dim), [a + "to_v.weight"] = R(dh, dim), [a + "to_out.weight"] = R(dim, 2 * dh),
            ["routing_transformer.layers.layers.0.1.norm.weight"] = R(dim) + 1, ["routing_transformer.layers.layers.0.1.norm.bias"] = R(dim),
            [f + "w1.weight"] = R(4 * dim, dim), [f + "w1.bias"] = R(4 * dim), [f + "w2.weight"] = R(dim, 4 * dim), [f + "w2.bias"] = R(dim),
            ["norm.weight"] = R(dim) + 1, ["norm.bias"] = R(dim), ["out.weight"] = R(tokens, dim), ["out.bias"] = R(tokens),
        };
        string pt = Path.Combine(Dir, "fixture.pt");
        PyTorchPickler.PickleStateDict(pt, fixture);
        File.WriteAllText(Path.Combine(Dir, "fixture.json"),
            """{"num_tokens": 256, "dim": 16, "depth": 1, "max_seq_len": 16, "heads": 2, "dim_head": 8, "window_size": 8, "n_local_attn_heads": 1, "causal": true}""");

        string run = Path.Combine(Dir, "imported");
        var (code, _, stderr) = CliRunner.Run("import", "--weights", pt, "--out", run);
        Assert.True(code == 0, stderr);
        using var trainer = Load(Checkpoint.PathFor(run, 0));
        var c = trainer.Config;
        Assert.Equal((2, 8, 8, 8, true, true, 0), (c.Heads, c.ResolvedDimHead, c.WindowSize, c.ResolvedLocalAttnWindowSize, c.Causal, c.ResolvedSharedQk, c.ResolvedNumMemKv));
        var ours = trainer.Model.state_dict();
        void Same(Tensor expected, Tensor actual, string what) => Assert.True(expected.equal(actual).all().item<bool>(), what);
        Same(fixture["token_emb.weight"], ours["token_emb.weight"], "token_emb");
        Same(fixture[a + "local_to_qkv.weight"].narrow(0, 0, dh), ours["transformer.layers.0.attn.to_q.weight"].narrow(0, 0, dh), "local q");
        Same(fixture[a + "local_to_qkv.weight"].narrow(0, dh, dh), ours["transformer.layers.0.attn.to_k.weight"].narrow(0, 0, dh), "local k");
        Same(fixture[a + "local_to_qkv.weight"].narrow(0, 2 * dh, dh), ours["transformer.layers.0.attn.to_v.weight"].narrow(0, 0, dh), "local v");
        long[] order = [0, 4, 1, 5, 2, 6, 3, 7];      // the library's routing-head feature i is this project's order[i]
        for (int i = 0; i < dh; i++)
        {
            Same(fixture[a + "to_q.weight"][i], ours["transformer.layers.0.attn.to_q.weight"][dh + order[i]], $"routing q row {i}");
            Same(fixture[a + "global_attn.kmeans.means"].select(-1, i), ours["transformer.layers.0.attn.groups.1.routing.kmeans.means"].select(-1, order[i]), $"means feature {i}");
        }
        Same(fixture[a + "to_v.weight"], ours["transformer.layers.0.attn.to_v.weight"].narrow(0, dh, dh), "routing v");
        Same(fixture[a + "to_out.weight"], ours["transformer.layers.0.attn.to_out.weight"], "to_out");
        Same(fixture["routing_transformer.layers.layers.0.0.norm.weight"], ours["transformer.layers.0.attn_norm.weight"], "attn norm");
        Same(fixture["routing_transformer.layers.layers.0.1.norm.bias"], ours["transformer.layers.0.ff_norm.bias"], "ff norm");
        Same(fixture[f + "w1.weight"], ours["transformer.layers.0.ff.w1.weight"], "w1");
        Same(fixture[f + "w2.bias"], ours["transformer.layers.0.ff.w2.bias"], "w2 bias");
        Same(fixture["norm.weight"], ours["transformer.norm.weight"], "final norm");
        Same(fixture["out.weight"], ours["to_logits.weight"], "out");
        Same(fixture["out.bias"], ours["to_logits.bias"], "out bias");
        Assert.True(ours["transformer.layers.0.attn.groups.1.routing.kmeans.initted"].item<bool>());
        // The same file also works directly wherever --checkpoint is accepted.
        var sample = CliRunner.Run("sample", "--checkpoint", pt, "--prompt", "The", "--max-new-tokens", "4", "--temperature", "0");
        Assert.True(sample.Code == 0, sample.Err);
    }

    [Fact]
    public void Export_in_the_library_layout_and_import_round_trip_through_the_cli()
    {
        string checkpoint = TrainLibraryCompatible();
        using var original = Load(checkpoint);
        // A single .pt file with its constructor arguments beside it.
        string pt = Path.Combine(Dir, "lib", "routing.pt");
        var (code, stdout, stderr) = CliRunner.Run("export", "--checkpoint", checkpoint, "--format", "routing-transformer-pytorch", "--out", pt);
        Assert.True(code == 0, stderr);
        Assert.Contains("RoutingTransformerLM constructor arguments in", stdout);
        var args = JsonNode.Parse(File.ReadAllText(Path.Combine(Dir, "lib", "routing.json")))!.AsObject();
        Assert.Equal(4, (int)args["local_attn_window_size"]!);             // written out: the library's default would be window_size (8)
        using (var state = WeightFiles.Read(pt)) Assert.True(PyTorchRoutingTransformer.IsLibraryLayout(state.ByName.Keys));
        AssertSameLogits(original.Model, pt);
        // A folder (pytorch_model.bin + config.json), sharded: every shard is a torch.save file.
        string folder = Path.Combine(Dir, "libdir");
        (code, _, stderr) = CliRunner.Run("export", "--checkpoint", checkpoint, "--format", "routing-transformer-pytorch", "--out", folder, "--max-shard-size", "20KB");
        Assert.True(code == 0, stderr);
        Assert.True(File.Exists(Path.Combine(folder, "pytorch_model.bin.index.json")));
        Assert.True(Directory.GetFiles(folder, "pytorch_model-*-of-*.bin").Length > 1);
        string imported = Path.Combine(Dir, "back");
        (code, _, stderr) = CliRunner.Run("import", "--weights", folder, "--out", imported);
        Assert.True(code == 0, stderr);
        using (var back = Load(Checkpoint.PathFor(imported, 0)))
            Assert.True(Logits(original.Model, Probe).equal(Logits(back.Model, Probe)).all().item<bool>(), "imported logits differ");
        // Re-exporting the other format into the folder removes the first one's weights (they would be found first).
        Assert.Equal(0, CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder).Code);
        Assert.Empty(Directory.GetFiles(folder, "pytorch_model*"));
        AssertSameLogits(original.Model, folder);
        // A configuration without a counterpart is refused in one line before anything is written.
        string micro = TrainCheckpoint();
        var refused = CliRunner.Run("export", "--checkpoint", micro, "--format", "routing-transformer-pytorch", "--out", Path.Combine(Dir, "no.pt"));
        AssertUsageError(refused, "--format routing-transformer-pytorch: the PyTorch routing-transformer 1.6.1 layout cannot express this configuration: ff_mult 2");
        Assert.False(File.Exists(Path.Combine(Dir, "no.pt")));
    }

    [Fact]
    public void Sharded_folders_load_like_the_single_file_and_PyBridge_reads_their_index()
    {
        string checkpoint = TrainCheckpoint();
        using var original = Load(checkpoint);
        string folder = Path.Combine(Dir, "sharded");
        var (code, stdout, stderr) = CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--max-shard-size", "10KB");
        Assert.True(code == 0, stderr);
        var shards = Directory.GetFiles(folder, "model-*-of-*.safetensors").Order(StringComparer.Ordinal).ToArray();
        Assert.True(shards.Length > 1, stdout);
        Assert.Equal(shards.Select(Path.GetFileName), Enumerable.Range(1, shards.Length).Select(i => $"model-{i:D5}-of-{shards.Length:D5}.safetensors"));
        var index = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "model.safetensors.index.json")))!;
        Assert.Equal(original.Model.state_dict().Keys.Order(StringComparer.Ordinal), index["weight_map"]!.AsObject().Select(kv => kv.Key));
        Assert.Equal(original.Model.state_dict().Values.Sum(t => t.numel() * t.ElementSize), (long)index["metadata"]!["total_size"]!);
        Assert.All(shards.SkipLast(1), s => Assert.True(new FileInfo(s).Length < 10_000 + 17_000, s));   // one 16 KB embedding may exceed the limit alone
        Assert.False(File.Exists(Path.Combine(folder, "model.safetensors")));
        AssertSameLogits(original.Model, folder);
        AssertSameLogits(original.Model, Path.Combine(folder, "model.safetensors.index.json"));
        // PyBridge's own sharded loader reads the index this project wrote.
        random.manual_seed(8);
        using var viaPyBridge = new RoutingTransformerLM(MicroConfig);
        viaPyBridge.load_checkpoint(folder, useTqdm: false);
        Assert.True(Logits(original.Model, Probe).equal(Logits(viaPyBridge, Probe)).all().item<bool>());
        // Exporting again without sharding leaves no stale shards behind.
        Assert.Equal(0, CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder).Code);
        Assert.Empty(Directory.GetFiles(folder, "model-*-of-*.safetensors"));
        Assert.False(File.Exists(Path.Combine(folder, "model.safetensors.index.json")));
    }

    /// <summary>Each broken index or shard fails in one line that names the file and the problem.</summary>
    [Theory]
    [InlineData("not json", "model.safetensors.index.json: not well-formed JSON")]
    [InlineData("{}", "expected a JSON object with a \"weight_map\" object")]
    [InlineData("{\"weight_map\": {}}", "weight_map is empty")]
    [InlineData("{\"weight_map\": {\"token_emb.weight\": 3}}", "weight_map['token_emb.weight'] must be a shard file name")]
    [InlineData("{\"weight_map\": {\"token_emb.weight\": \"../model-00001-of-00002.safetensors\"}}", "is not a file name beside the index")]
    [InlineData("missing-shard", "does not exist")]
    [InlineData("moved", "which the index model.safetensors.index.json maps to model-00002-of-00002.safetensors")]
    [InlineData("ghost", "maps 'ghost.weight' to model-00001-of-0000")]
    [InlineData("dropped", "does not list")]
    public void Malformed_indexes_and_shards_give_one_line_errors(string damage, string expected)
    {
        string checkpoint = TrainCheckpoint();
        string folder = Path.Combine(Dir, "hf");
        Assert.Equal(0, CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--max-shard-size", "36KB").Code);   // 2 shards of several tensors
        string indexPath = Path.Combine(folder, "model.safetensors.index.json");
        var index = JsonNode.Parse(File.ReadAllText(indexPath))!;
        var map = index["weight_map"]!.AsObject();
        var shards = map.Select(kv => kv.Value!.GetValue<string>()).Distinct().Order(StringComparer.Ordinal).ToArray();
        Assert.Equal(2, shards.Length);
        string firstTensor = map.First(kv => kv.Value!.GetValue<string>() == shards[0]).Key;
        switch (damage)
        {
            case "missing-shard": File.Delete(Path.Combine(folder, shards[1])); break;
            case "moved": map[firstTensor] = shards[1]; File.WriteAllText(indexPath, index.ToJsonString()); break;
            case "ghost": map["ghost.weight"] = shards[0]; File.WriteAllText(indexPath, index.ToJsonString()); break;
            case "dropped": map.Remove(firstTensor); File.WriteAllText(indexPath, index.ToJsonString()); break;
            default: File.WriteAllText(indexPath, damage); break;
        }
        AssertOneLineFailure(CliRunner.Run("sample", "--checkpoint", folder, "--prompt", "The"), expected);
    }

    [Fact]
    public void Malformed_pt_files_give_one_line_errors()
    {
        using var trainer = Load(TrainCheckpoint());
        string good = Path.Combine(Dir, "good.pt");
        WeightFiles.SaveModel(trainer.Model, good);
        var bytes = File.ReadAllBytes(good);
        string Write(string name, byte[] content)
        {
            string path = Path.Combine(Dir, name);
            File.WriteAllBytes(path, content);
            File.WriteAllText(Path.ChangeExtension(path, ".json"), ConfigBinding.ToJson(MicroConfig));
            return path;
        }
        string[] sample(string path) => ["sample", "--checkpoint", path, "--prompt", "The"];
        string truncated = Write("truncated.pt", bytes[..(bytes.Length / 2)]);
        AssertOneLineFailure(CliRunner.Run(sample(truncated)), truncated, "not a PyTorch state_dict in torch.save's zip format");
        string junk = Write("junk.bin", "hello, not weights"u8.ToArray());
        AssertOneLineFailure(CliRunner.Run(sample(junk)), junk, "not a PyTorch state_dict");
        // Wrong shapes, missing and unknown tensors in a well-formed file.
        var state = WeightFiles.StateOf(trainer.Model);
        state[0] = ("renamed." + state[0].Name, state[0].Tensor);
        int wide = state.FindIndex(1, t => t.Tensor.dim() == 2);
        state[wide] = (state[wide].Name, zeros(3, 3));
        string wrong = Path.Combine(Dir, "wrong.pt");
        WeightFiles.Write(wrong, state);
        File.WriteAllText(Path.ChangeExtension(wrong, ".json"), ConfigBinding.ToJson(MicroConfig));
        AssertOneLineFailure(CliRunner.Run(sample(wrong)), $"{wrong} does not fit the model", "missing 1 tensor(s)", "1 unexpected tensor(s): renamed.", "has shape [3, 3] in the file");
    }

    [Fact]
    public void Exported_folders_carry_a_documented_config_json_and_work_everywhere_a_checkpoint_does()
    {
        string checkpoint = TrainCheckpoint();
        string folder = Path.Combine(Dir, "hf");
        Assert.Equal(0, CliRunner.Run("export", "--checkpoint", checkpoint, "--out", folder, "--dtype", "bfloat16").Code);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "config.json")))!.AsObject();
        Assert.Equal("sparse-attn-routing-transformer", (string)config["model_type"]!);
        Assert.Equal("RoutingTransformerLM", (string)config["architectures"]![0]!);
        Assert.Equal("bfloat16", (string)config["torch_dtype"]!);
        // The configuration's own tokenizer key when it has one, else "bytes".
        var own = JsonNode.Parse(ConfigBinding.ToJson(MicroConfig))!.AsObject();
        string expectedTokenizer = own.ContainsKey("tokenizer") ? own["tokenizer"]?.ToJsonString() ?? "null" : "\"bytes\"";
        Assert.Equal(expectedTokenizer, config["tokenizer"]?.ToJsonString() ?? "null");
        Assert.All(ConfigBinding.ValidKeys, key => Assert.True(config.ContainsKey(key), key));
        Assert.Equal(MicroConfig.Dim, (int)config["dim"]!);
        using (var loaded = CheckpointLocator.Load(folder, null))
            Assert.Empty(ConfigBinding.Differences(MicroConfig, loaded.Config));

        string data = Path.Combine(Dir, "eval.txt");
        File.WriteAllBytes(data, ValBytes);
        var eval = CliRunner.Run("eval", "--checkpoint", folder, "--data", data, "--json");
        Assert.True(eval.Code == 0, eval.Err);
        var sample = CliRunner.Run("sample", "--checkpoint", folder, "--prompt", "The", "--max-new-tokens", "4");
        Assert.True(sample.Code == 0, sample.Err);
        var plot = CliRunner.Run("plot", "attention", "--checkpoint", folder, "--text", "The Senate", "--out", Path.Combine(Dir, "a.png"));
        Assert.True(plot.Code == 0, plot.Err);
        var import = CliRunner.Run("import", "--weights", folder, "--out", Path.Combine(Dir, "run2"));
        Assert.True(import.Code == 0, import.Err);

        config["model_type"] = "bert";
        File.WriteAllText(Path.Combine(folder, "config.json"), config.ToJsonString());
        AssertUsageError(CliRunner.Run("sample", "--checkpoint", folder, "--prompt", "The"), "model_type 'bert' is not a sparse-attn model");
    }
}
