using System.Text.Json.Nodes;
using SparseAttention.Model;
using SparseAttention.Training;
using Xunit;
using static TorchSharp.torch;

namespace SparseAttention.Tests;

/// <summary>
/// The PyTorch routing-transformer library's layout (<see cref="PyTorchRoutingTransformer"/>). The expected names and
/// shapes below are the library's, not this exporter's: they were listed from lucidrains/routing-transformer 1.6.1's
/// <c>RoutingTransformerLM(...).state_dict()</c> (instantiated from its source under PyTorch 1.13) for the constructor
/// arguments in each comment, and agree with reading its source (PreNorm/ReZero wrappers, Chunk around the
/// feed-forward, ReversibleBlock's f.net/g.net, MatrixMultiply's <c>tensor</c> for tied embeddings).
/// </summary>
public sealed class RoutingTransformerPyTorchLayoutTests
{
    private static TransformerConfig Base => new() { NumTokens = 256, Dim = 32, MaxSeqLen = 64, WindowSize = 16, BlockSize = 16 };

    /// <summary>The configurations and the library's constructor arguments that match them.</summary>
    public static TheoryData<string> Configurations => new() { "LocalOnly", "RoutingLocalCausal", "SharedQk", "Memkv", "WeightTie", "Reversible", "RezeroShift" };

    private static (TransformerConfig Config, string Names) Case(string name) => name switch
    {
        // depth=2, heads=2, dim_head=16, n_local_attn_heads=2, causal=True
        "LocalOnly" => (Base with { Depth = 2, Heads = 2, DimHead = 16, NLocalAttnHeads = [2], Causal = true }, LocalOnlyNames),
        // depth=2, heads=4, dim_head=8, n_local_attn_heads=2, causal=True, shared_qk=False (the library forces num_mem_kv = 1)
        "RoutingLocalCausal" => (Base with { Depth = 2, Heads = 4, DimHead = 8, NLocalAttnHeads = [2], Causal = true, SharedQk = false }, RoutingLocalCausalNames),
        // depth=1, heads=2, dim_head=16, n_local_attn_heads=1, causal=True, shared_qk=True
        "SharedQk" => (Base with { Depth = 1, Heads = 2, DimHead = 16, NLocalAttnHeads = [1], Causal = true, SharedQk = true }, SharedQkNames),
        // depth=1, heads=2, dim_head=16, n_local_attn_heads=0, causal=False, num_mem_kv=3
        "Memkv" => (Base with { Depth = 1, Heads = 2, DimHead = 16, NLocalAttnHeads = [0], NumMemKv = 3 }, MemkvNames),
        // depth=2, heads=2, dim_head=16, n_local_attn_heads=1, weight_tie=True, tie_embedding=True
        "WeightTie" => (Base with { Depth = 2, Heads = 2, DimHead = 16, NLocalAttnHeads = [1], WeightTie = true, TieEmbedding = true }, WeightTieNames),
        // depth=2, heads=2, dim_head=16, n_local_attn_heads=1, reversible=True, ff_glu=True
        "Reversible" => (Base with { Depth = 2, Heads = 2, DimHead = 16, NLocalAttnHeads = [1], Reversible = true, FfGlu = true }, ReversibleNames),
        // depth=1, heads=2, dim_head=16, n_local_attn_heads=1, use_rezero=True, shift_tokens=True, causal=True
        "RezeroShift" => (Base with { Depth = 1, Heads = 2, DimHead = 16, NLocalAttnHeads = [1], UseRezero = true, ShiftTokens = true, Causal = true }, RezeroShiftNames),
        _ => throw new ArgumentException(name),
    };

    [Theory]
    [MemberData(nameof(Configurations))]
    public void Names_and_shapes_are_those_of_the_library(string name)
    {
        var (config, names) = Case(name);
        using var scope = NewDisposeScope();
        using var model = new RoutingTransformerLM(config);
        var exported = PyTorchRoutingTransformer.Export(model)
            .Select(t => $"{t.Name} [{string.Join(",", t.Tensor.shape)}]{(t.Tensor.dtype == ScalarType.Bool ? " bool" : "")}").ToArray();
        var expected = names.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Equal(expected, exported);
    }

    /// <summary>Random weights (non-trivial norms, initialised centroids) → library layout → a .pt file → back: the same
    /// logits bit for bit, and the same state (except this project's k rows of shared-QK routing heads, which the library
    /// does not have and which nothing reads).</summary>
    [Theory]
    [MemberData(nameof(Configurations))]
    public void Export_then_import_gives_bit_identical_logits(string name)
    {
        var (config, _) = Case(name);
        random.manual_seed(17);
        using var model = Randomised(config);
        string path = Path.Combine(Path.GetTempPath(), $"sa-rt-{Guid.NewGuid():N}.pt");
        try
        {
            using (var scope = NewDisposeScope()) WeightFiles.Write(path, PyTorchRoutingTransformer.Export(model));
            using var back = new RoutingTransformerLM(config);
            using (var state = WeightFiles.Read(path))
            using (var scope = NewDisposeScope())
                WeightFiles.Load(back, PyTorchRoutingTransformer.ToProjectNames(state.ByName, config, path), path);
            var tokens = randint(0, 256, new long[] { 2, 64 });
            model.eval();
            back.eval();
            using (no_grad())
                Assert.True(model.forward(tokens, null).Logits.equal(back.forward(tokens, null).Logits).all().item<bool>(), "logits differ");
            var a = model.state_dict();
            foreach (var (key, t) in back.state_dict())
                if (!(config.ResolvedSharedQk && key.EndsWith("attn.to_k.weight")))
                    Assert.True(t.equal(a[key]).all().item<bool>(), key);
        }
        finally { File.Delete(path); }
    }

    private static RoutingTransformerLM Randomised(TransformerConfig config)
    {
        var model = new RoutingTransformerLM(config);
        using var _ = no_grad();
        foreach (var (key, t) in model.state_dict())
        {
            if (key.EndsWith("norm.weight") || key.EndsWith("norm.bias") || key.EndsWith("rezero.g")) t.copy_(rand_like(t) + 0.5);
            if (key.EndsWith("initted")) t.fill_(true);
            if (key.EndsWith("means")) t.copy_(nn.functional.normalize(randn_like(t), p: 2, dim: -1));
        }
        return model;
    }

    /// <summary>This project rotates feature pairs (i, i + D/2); the library's routing heads rotate (2i, 2i + 1). With D = 8
    /// the library's features 0..7 are this project's 0, 4, 1, 5, 2, 6, 3, 7 — in q/k rows, centroids and memory keys;
    /// values and local heads keep their order.</summary>
    [Fact]
    public void Routing_heads_follow_the_library_rotary_pairing()
    {
        var config = Base with { Depth = 1, Heads = 3, DimHead = 8, NLocalAttnHeads = [1], Causal = false, NumMemKv = 2 };
        random.manual_seed(3);
        using var model = Randomised(config);
        using var scope = NewDisposeScope();
        var theirs = PyTorchRoutingTransformer.Export(model).ToDictionary(t => t.Name, t => t.Tensor);
        var ours = model.state_dict();
        long[] order = [0, 4, 1, 5, 2, 6, 3, 7];
        const string a = "routing_transformer.layers.layers.0.0.fn.";
        for (int head = 0; head < 2; head++)
            for (int i = 0; i < 8; i++)
            {
                long ourRow = 8 + head * 8 + order[i], theirRow = head * 8 + i;   // the local head owns our rows 0..7
                Assert.True(theirs[a + "to_q.weight"][theirRow].equal(ours["transformer.layers.0.attn.to_q.weight"][ourRow]).all().item<bool>());
                Assert.True(theirs[a + "to_k.weight"][theirRow].equal(ours["transformer.layers.0.attn.to_k.weight"][ourRow]).all().item<bool>());
                Assert.True(theirs[a + "to_v.weight"][theirRow].equal(ours["transformer.layers.0.attn.to_v.weight"][8 + head * 8 + i]).all().item<bool>());
                Assert.True(theirs[a + "global_attn.kmeans.means"][head].select(-1, i).equal(ours["transformer.layers.0.attn.groups.1.routing.kmeans.means"][head].select(-1, order[i])).all().item<bool>());
                Assert.True(theirs[a + "global_attn.mem_key"][head].select(-1, i).equal(ours["transformer.layers.0.attn.groups.1.routing.mem_key"][head].select(-1, order[i])).all().item<bool>());
                Assert.True(theirs[a + "global_attn.mem_value"][head].select(-1, i).equal(ours["transformer.layers.0.attn.groups.1.routing.mem_value"][head].select(-1, i)).all().item<bool>());
            }
        // local_to_qkv = [q; k; v] rows of the local head, bias zero.
        var qkv = theirs[a + "local_to_qkv.weight"];
        Assert.True(qkv.narrow(0, 0, 8).equal(ours["transformer.layers.0.attn.to_q.weight"].narrow(0, 0, 8)).all().item<bool>());
        Assert.True(qkv.narrow(0, 8, 8).equal(ours["transformer.layers.0.attn.to_k.weight"].narrow(0, 0, 8)).all().item<bool>());
        Assert.True(qkv.narrow(0, 16, 8).equal(ours["transformer.layers.0.attn.to_v.weight"].narrow(0, 0, 8)).all().item<bool>());
        Assert.True(theirs[a + "local_to_qkv.bias"].eq(0).all().item<bool>());
        // The fixed buffers hold the library's formulas: inv_freq = 1 / 10000^(2i/D); emb = [sin(p·inv_freq), cos(p·inv_freq)].
        var invFreq = tensor(new float[] { 1f, 1f / 10f, 1f / 100f, 1f / 1000f });
        Assert.True(theirs[a + "local_attn.rel_pos.inv_freq"].allclose(invFreq, rtol: 1e-6));
        var emb = theirs["sinu_pos_emb.emb"];
        Assert.Equal(MathF.Sin(5 * 0.1f), emb[5, 1].item<float>(), 1e-6f);
        Assert.Equal(MathF.Cos(7 * 0.01f), emb[7, 6].item<float>(), 1e-6f);
    }

    [Theory]
    [InlineData("ff_mult=2", "ff_mult 2")]
    [InlineData("use_scale_norm=true", "use_scale_norm")]
    [InlineData("shift_tokens=true", "shift_tokens with a pre-norm")]
    [InlineData("emb_dim=16", "emb_dim != dim")]
    [InlineData("positional_encoding=RelativeShaw", "positional_encoding RelativeShaw")]
    [InlineData("kmeans_norm=LayerNorm", "kmeans_norm LayerNorm")]
    [InlineData("kmeans_attend_normalized=true", "kmeans_attend_normalized")]
    [InlineData("hash_items=true", "hash_items")]
    [InlineData("routing_look_back=true", "routing_look_back")]
    [InlineData("use_absolute_pos_emb=true", "use_absolute_pos_emb")]
    [InlineData("ff_activation=Relu", "ff_activation Relu")]
    [InlineData("num_clusters=2", "num_clusters 2")]
    [InlineData("lsh={\"heads\":1}", "lsh heads")]
    [InlineData("shared_qk=false;num_mem_kv=0", "num_mem_kv 0 with causal routing")]
    public void Configurations_without_a_counterpart_are_refused_in_one_line(string setting, string expected)
    {
        var config = ConfigBinding.Apply(Base with { Depth = 1, Heads = 2, DimHead = 16, NLocalAttnHeads = [1], Causal = true }, setting.Split(';')).Validate();
        using var model = new RoutingTransformerLM(config);
        var e = Assert.Throws<NotSupportedException>(() => PyTorchRoutingTransformer.Export(model));
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.Throws<NotSupportedException>(() => PyTorchRoutingTransformer.ConstructorArguments(config));
    }

    [Theory]
    [MemberData(nameof(Configurations))]
    public void Constructor_arguments_build_the_same_configuration(string name)
    {
        var (config, _) = Case(name);
        var args = PyTorchRoutingTransformer.ConstructorArguments(config);
        // Arguments whose library defaults differ from this project's are always written out.
        Assert.Equal(config.ResolvedDimHead, (int)args["dim_head"]!);
        Assert.Equal(config.ResolvedLocalAttnWindowSize, (int)args["local_attn_window_size"]!);
        Assert.Equal(config.ResolvedSharedQk, (bool)args["shared_qk"]!);
        var back = PyTorchRoutingTransformer.FromConstructorArguments(args.ToJsonString(), "args.json");
        Assert.Equal(args.ToJsonString(), PyTorchRoutingTransformer.ConstructorArguments(back).ToJsonString());
        using var a = new RoutingTransformerLM(config);
        using var b = new RoutingTransformerLM(back);
        Assert.Equal(a.state_dict().Select(kv => (kv.Key, string.Join(",", kv.Value.shape))), b.state_dict().Select(kv => (kv.Key, string.Join(",", kv.Value.shape))));
    }

    [Theory]
    [InlineData("""{"num_tokens":256,"dim":32,"depth":1,"max_seq_len":64,"pkm_layers":[1]}""", "pkm_layers")]
    [InlineData("""{"num_tokens":256,"dim":32,"depth":1,"max_seq_len":64,"use_scale_norm":true}""", "use_scale_norm")]
    [InlineData("""{"num_tokens":256,"dim":32,"depth":1,"max_seq_len":64,"emb_dim":16}""", "emb_dim != dim")]
    [InlineData("""{"num_tokens":256,"dim":32,"depth":1,"max_seq_len":64,"receives_context":true}""", "receives_context")]
    [InlineData("""{"num_tokens":256,"dim":32,"depth":1,"max_seq_len":64,"n_heads":4}""", "not RoutingTransformerLM 1.6.1 argument(s): n_heads")]
    [InlineData("""{"num_tokens":256,"dim":32,"depth":1,"max_seq_len":64,"causal":"yes"}""", "'causal' must be true or false")]
    [InlineData("""{"dim":32,"depth":1,"max_seq_len":64}""", "'num_tokens' is required")]
    public void Constructor_arguments_this_project_cannot_express_are_refused(string json, string expected)
    {
        var e = Record.Exception(() => PyTorchRoutingTransformer.FromConstructorArguments(json, "args.json"));
        Assert.True(e is ArgumentException or NotSupportedException, e?.ToString());
        Assert.Contains(expected, e!.Message);
        Assert.StartsWith("args.json: ", e.Message);
    }

    /// <summary>Library weights this project cannot hold exactly are refused, each with the tensor's name.</summary>
    [Fact]
    public void Library_weights_without_an_exact_counterpart_are_refused()
    {
        var (config, _) = Case("WeightTie");
        random.manual_seed(5);
        using var model = Randomised(config);
        using var scope = NewDisposeScope();
        Dictionary<string, Tensor> Exported() => PyTorchRoutingTransformer.Export(model).ToDictionary(t => t.Name, t => t.Tensor);
        string Refusal(Dictionary<string, Tensor> d) => Assert.Throws<WeightFileException>(() => PyTorchRoutingTransformer.ToProjectNames(d, config, "lib.pt")).Message;

        var bias = Exported();
        bias["routing_transformer.layers.layers.1.0.fn.local_to_qkv.bias"][3] = 0.5f;
        Assert.Contains("routing_transformer.layers.layers.1.0.fn.local_to_qkv.bias is not zero", Refusal(bias));
        var norms = Exported();                                          // the library ties modules, not the wrappers' norms
        norms["routing_transformer.layers.layers.1.1.norm.weight"][0] = 9f;
        Assert.Contains("routing_transformer.layers.layers.1.1.norm.weight differs from routing_transformer.layers.layers.0.1.norm.weight", Refusal(norms));
        var tied = Exported();
        tied["out.tensor"][0, 0] = 9f;
        Assert.Contains("out.tensor differs from token_emb.weight", Refusal(tied));
        var table = Exported();
        table["sinu_pos_emb.emb"][3, 3] = 2f;
        Assert.Contains("sinu_pos_emb.emb differs from the library's fixed table", Refusal(table));
        var renamed = Exported();
        renamed["norm.gamma"] = renamed["norm.weight"];
        renamed.Remove("norm.weight");
        var message = Refusal(renamed);
        Assert.Contains("missing 1 tensor(s) the model needs: norm.weight", message);
        Assert.Contains("1 unexpected tensor(s): norm.gamma", message);
        var reshaped = Exported();
        reshaped["token_emb.weight"] = zeros(255, 32);
        Assert.Contains("token_emb.weight has shape [255, 32] in the file, the model expects [256, 32]", Refusal(reshaped));
    }

    private const string LocalOnlyNames = """
        sinu_pos_emb.emb [64,16]
        token_emb.weight [256,32]
        routing_transformer.layers.layers.0.0.norm.weight [32]
        routing_transformer.layers.layers.0.0.norm.bias [32]
        routing_transformer.layers.layers.0.0.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.weight [96,32]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.bias [96]
        routing_transformer.layers.layers.0.0.fn.to_q.weight [0,32]
        routing_transformer.layers.layers.0.0.fn.to_v.weight [0,32]
        routing_transformer.layers.layers.0.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.0.1.norm.weight [32]
        routing_transformer.layers.layers.0.1.norm.bias [32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.bias [32]
        routing_transformer.layers.layers.1.0.norm.weight [32]
        routing_transformer.layers.layers.1.0.norm.bias [32]
        routing_transformer.layers.layers.1.0.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.layers.1.0.fn.local_to_qkv.weight [96,32]
        routing_transformer.layers.layers.1.0.fn.local_to_qkv.bias [96]
        routing_transformer.layers.layers.1.0.fn.to_q.weight [0,32]
        routing_transformer.layers.layers.1.0.fn.to_v.weight [0,32]
        routing_transformer.layers.layers.1.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.1.1.norm.weight [32]
        routing_transformer.layers.layers.1.1.norm.bias [32]
        routing_transformer.layers.layers.1.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.1.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.1.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.1.1.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.weight [256,32]
        out.bias [256]
        """;

    private const string RoutingLocalCausalNames = """
        sinu_pos_emb.emb [64,8]
        token_emb.weight [256,32]
        routing_transformer.layers.layers.0.0.norm.weight [32]
        routing_transformer.layers.layers.0.0.norm.bias [32]
        routing_transformer.layers.layers.0.0.fn.local_attn.rel_pos.inv_freq [4]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.bias [48]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_key [2,4,1,8]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_value [2,4,1,8]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.means [2,4,8]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.0.0.fn.to_q.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_v.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_k.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.0.1.norm.weight [32]
        routing_transformer.layers.layers.0.1.norm.bias [32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.bias [32]
        routing_transformer.layers.layers.1.0.norm.weight [32]
        routing_transformer.layers.layers.1.0.norm.bias [32]
        routing_transformer.layers.layers.1.0.fn.local_attn.rel_pos.inv_freq [4]
        routing_transformer.layers.layers.1.0.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.layers.1.0.fn.local_to_qkv.bias [48]
        routing_transformer.layers.layers.1.0.fn.global_attn.mem_key [2,4,1,8]
        routing_transformer.layers.layers.1.0.fn.global_attn.mem_value [2,4,1,8]
        routing_transformer.layers.layers.1.0.fn.global_attn.kmeans.means [2,4,8]
        routing_transformer.layers.layers.1.0.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.1.0.fn.to_q.weight [16,32]
        routing_transformer.layers.layers.1.0.fn.to_v.weight [16,32]
        routing_transformer.layers.layers.1.0.fn.to_k.weight [16,32]
        routing_transformer.layers.layers.1.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.1.1.norm.weight [32]
        routing_transformer.layers.layers.1.1.norm.bias [32]
        routing_transformer.layers.layers.1.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.1.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.1.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.1.1.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.weight [256,32]
        out.bias [256]
        """;

    private const string SharedQkNames = """
        sinu_pos_emb.emb [64,16]
        token_emb.weight [256,32]
        routing_transformer.layers.layers.0.0.norm.weight [32]
        routing_transformer.layers.layers.0.0.norm.bias [32]
        routing_transformer.layers.layers.0.0.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.bias [48]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_key [1,4,0,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_value [1,4,0,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.means [1,4,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.0.0.fn.to_q.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_v.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.0.1.norm.weight [32]
        routing_transformer.layers.layers.0.1.norm.bias [32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.weight [256,32]
        out.bias [256]
        """;

    private const string MemkvNames = """
        sinu_pos_emb.emb [64,16]
        token_emb.weight [256,32]
        routing_transformer.layers.layers.0.0.norm.weight [32]
        routing_transformer.layers.layers.0.0.norm.bias [32]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_key [2,4,3,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_value [2,4,3,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.means [2,4,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.0.0.fn.to_q.weight [32,32]
        routing_transformer.layers.layers.0.0.fn.to_v.weight [32,32]
        routing_transformer.layers.layers.0.0.fn.to_k.weight [32,32]
        routing_transformer.layers.layers.0.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.0.1.norm.weight [32]
        routing_transformer.layers.layers.0.1.norm.bias [32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.weight [256,32]
        out.bias [256]
        """;

    private const string WeightTieNames = """
        sinu_pos_emb.emb [64,16]
        token_emb.weight [256,32]
        routing_transformer.layers.layers.0.0.norm.weight [32]
        routing_transformer.layers.layers.0.0.norm.bias [32]
        routing_transformer.layers.layers.0.0.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.layers.0.0.fn.local_to_qkv.bias [48]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_key [1,4,0,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.mem_value [1,4,0,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.means [1,4,16]
        routing_transformer.layers.layers.0.0.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.0.0.fn.to_q.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_v.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_k.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.0.1.norm.weight [32]
        routing_transformer.layers.layers.0.1.norm.bias [32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.0.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.0.1.fn.fn.w2.bias [32]
        routing_transformer.layers.layers.1.0.norm.weight [32]
        routing_transformer.layers.layers.1.0.norm.bias [32]
        routing_transformer.layers.layers.1.0.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.layers.1.0.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.layers.1.0.fn.local_to_qkv.bias [48]
        routing_transformer.layers.layers.1.0.fn.global_attn.mem_key [1,4,0,16]
        routing_transformer.layers.layers.1.0.fn.global_attn.mem_value [1,4,0,16]
        routing_transformer.layers.layers.1.0.fn.global_attn.kmeans.means [1,4,16]
        routing_transformer.layers.layers.1.0.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.1.0.fn.to_q.weight [16,32]
        routing_transformer.layers.layers.1.0.fn.to_v.weight [16,32]
        routing_transformer.layers.layers.1.0.fn.to_k.weight [16,32]
        routing_transformer.layers.layers.1.0.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.1.1.norm.weight [32]
        routing_transformer.layers.layers.1.1.norm.bias [32]
        routing_transformer.layers.layers.1.1.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.1.1.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.1.1.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.1.1.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.tensor [256,32]
        """;

    private const string ReversibleNames = """
        sinu_pos_emb.emb [64,16]
        token_emb.weight [256,32]
        routing_transformer.layers.blocks.0.f.net.norm.weight [32]
        routing_transformer.layers.blocks.0.f.net.norm.bias [32]
        routing_transformer.layers.blocks.0.f.net.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.blocks.0.f.net.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.blocks.0.f.net.fn.local_to_qkv.bias [48]
        routing_transformer.layers.blocks.0.f.net.fn.global_attn.mem_key [1,4,0,16]
        routing_transformer.layers.blocks.0.f.net.fn.global_attn.mem_value [1,4,0,16]
        routing_transformer.layers.blocks.0.f.net.fn.global_attn.kmeans.means [1,4,16]
        routing_transformer.layers.blocks.0.f.net.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.blocks.0.f.net.fn.to_q.weight [16,32]
        routing_transformer.layers.blocks.0.f.net.fn.to_v.weight [16,32]
        routing_transformer.layers.blocks.0.f.net.fn.to_k.weight [16,32]
        routing_transformer.layers.blocks.0.f.net.fn.to_out.weight [32,32]
        routing_transformer.layers.blocks.0.g.net.norm.weight [32]
        routing_transformer.layers.blocks.0.g.net.norm.bias [32]
        routing_transformer.layers.blocks.0.g.net.fn.fn.w1.weight [256,32]
        routing_transformer.layers.blocks.0.g.net.fn.fn.w1.bias [256]
        routing_transformer.layers.blocks.0.g.net.fn.fn.w2.weight [32,128]
        routing_transformer.layers.blocks.0.g.net.fn.fn.w2.bias [32]
        routing_transformer.layers.blocks.1.f.net.norm.weight [32]
        routing_transformer.layers.blocks.1.f.net.norm.bias [32]
        routing_transformer.layers.blocks.1.f.net.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.blocks.1.f.net.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.blocks.1.f.net.fn.local_to_qkv.bias [48]
        routing_transformer.layers.blocks.1.f.net.fn.global_attn.mem_key [1,4,0,16]
        routing_transformer.layers.blocks.1.f.net.fn.global_attn.mem_value [1,4,0,16]
        routing_transformer.layers.blocks.1.f.net.fn.global_attn.kmeans.means [1,4,16]
        routing_transformer.layers.blocks.1.f.net.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.blocks.1.f.net.fn.to_q.weight [16,32]
        routing_transformer.layers.blocks.1.f.net.fn.to_v.weight [16,32]
        routing_transformer.layers.blocks.1.f.net.fn.to_k.weight [16,32]
        routing_transformer.layers.blocks.1.f.net.fn.to_out.weight [32,32]
        routing_transformer.layers.blocks.1.g.net.norm.weight [32]
        routing_transformer.layers.blocks.1.g.net.norm.bias [32]
        routing_transformer.layers.blocks.1.g.net.fn.fn.w1.weight [256,32]
        routing_transformer.layers.blocks.1.g.net.fn.fn.w1.bias [256]
        routing_transformer.layers.blocks.1.g.net.fn.fn.w2.weight [32,128]
        routing_transformer.layers.blocks.1.g.net.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.weight [256,32]
        out.bias [256]
        """;

    private const string RezeroShiftNames = """
        sinu_pos_emb.emb [64,16]
        token_emb.weight [256,32]
        routing_transformer.layers.layers.0.0.residual_weight [1]
        routing_transformer.layers.layers.0.0.fn.fn.local_attn.rel_pos.inv_freq [8]
        routing_transformer.layers.layers.0.0.fn.fn.local_to_qkv.weight [48,32]
        routing_transformer.layers.layers.0.0.fn.fn.local_to_qkv.bias [48]
        routing_transformer.layers.layers.0.0.fn.fn.global_attn.mem_key [1,4,0,16]
        routing_transformer.layers.layers.0.0.fn.fn.global_attn.mem_value [1,4,0,16]
        routing_transformer.layers.layers.0.0.fn.fn.global_attn.kmeans.means [1,4,16]
        routing_transformer.layers.layers.0.0.fn.fn.global_attn.kmeans.initted [] bool
        routing_transformer.layers.layers.0.0.fn.fn.to_q.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.fn.to_v.weight [16,32]
        routing_transformer.layers.layers.0.0.fn.fn.to_out.weight [32,32]
        routing_transformer.layers.layers.0.1.residual_weight [1]
        routing_transformer.layers.layers.0.1.fn.fn.fn.w1.weight [128,32]
        routing_transformer.layers.layers.0.1.fn.fn.fn.w1.bias [128]
        routing_transformer.layers.layers.0.1.fn.fn.fn.w2.weight [32,128]
        routing_transformer.layers.layers.0.1.fn.fn.fn.w2.bias [32]
        norm.weight [32]
        norm.bias [32]
        out.weight [256,32]
        out.bias [256]
        """;
}
