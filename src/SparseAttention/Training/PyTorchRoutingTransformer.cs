using System.Text.Json;
using System.Text.Json.Nodes;
using SparseAttention.Clustering;
using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>
/// The state-dict layout and constructor arguments of the PyTorch routing-transformer library's
/// <c>RoutingTransformerLM</c> (lucidrains/routing-transformer 1.6.1): converts this project's
/// <see cref="RoutingTransformerLM"/> weights to that layout and back.
/// </summary>
/// <remarks>
/// <para>Names (read from the library's source): <c>token_emb.weight</c>; <c>sinu_pos_emb.emb</c> (its fixed rotary
/// table); per layer <c>i</c> an attention wrapper <c>routing_transformer.layers.layers.i.0</c> and a feed-forward wrapper
/// <c>….i.1</c> (reversible: <c>routing_transformer.layers.blocks.i.f.net</c> / <c>….g.net</c>), each a PreNorm
/// (<c>norm</c>, <c>fn</c>) or a ReZero (<c>residual_weight</c>, <c>fn</c>), with one more <c>fn</c> level for
/// token shift; inside the attention: <c>local_to_qkv</c> (with bias) and <c>local_attn.rel_pos.inv_freq</c> for the
/// local heads, <c>to_q</c>, <c>to_k</c> (not with shared QK), <c>to_v</c> for the routing heads, <c>to_out</c>, and
/// <c>global_attn.mem_key</c>, <c>mem_value</c>, <c>kmeans.means</c>, <c>kmeans.initted</c>; the feed-forward sits in
/// a Chunk wrapper (<c>fn.w1</c>, <c>fn.w2</c>); then <c>norm</c> and <c>out</c> (<c>out.tensor</c> with tied
/// embeddings). With weight tying the library shares attention and feed-forward modules but not the wrappers' norms.</para>
/// <para>Rotary pairing: this project rotates feature pairs (i, i + D/2) of q and k; the library rotates (i, i + D/2)
/// in local heads but adjacent pairs (2i, 2i + 1) of q, k <i>and v</i> in routing heads. The routing heads' q/k rows,
/// centroids and memory keys are therefore permuted per head so that scores and cluster assignments agree; the
/// library's rotation of the values has no counterpart here, so routing-head outputs differ (see the README table).</para>
/// </remarks>
public static class PyTorchRoutingTransformer
{
    /// <summary>The library version whose layout this follows.</summary>
    public const string LibraryVersion = "1.6.1";

    private sealed record Entry(string Name, long[] Shape, ScalarType Dtype, Func<Tensor>? Fixed = null);
    private sealed record Link(string Ours, string Theirs, long OursRow = 0, long TheirsRow = 0, long Rows = -1,
        Func<Tensor, Tensor>? ToTheirs = null, Func<Tensor, Tensor>? ToOurs = null);

    /// <summary>Why <paramref name="config"/> has no one-to-one counterpart in the library; empty when it has.</summary>
    public static IReadOnlyList<string> Unsupported(TransformerConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        var c = config;
        var reasons = new List<string>();
        void If(bool condition, string reason) { if (condition) reasons.Add(reason); }
        If(c.StaticHeadGroups is { Length: > 0 }, "static_head_groups (the library has only local and routing heads)");
        If(c.Lsh is not null, "lsh heads (the library has only local and routing heads)");
        If(c.Synthesizer is not null, "synthesizer heads (the library has only local and routing heads)");
        If(c.PositionalEncoding == PositionalEncoding.RelativeShaw, "positional_encoding RelativeShaw (the library uses rotary embeddings; the Shaw tables have no place)");
        If(c.ResolvedEmbDim != c.Dim, "emb_dim != dim (the library normalises after projecting back to emb_dim, this project before)");
        If(c.UseScaleNorm, "use_scale_norm (the library's final norm is always a LayerNorm)");
        If(c.ShiftTokens && !c.UseRezero, "shift_tokens with a pre-norm (the library normalises, then shifts; this project shifts, then normalises)");
        If(c.FfMult != 4, $"ff_mult {c.FfMult} (the library's RoutingTransformerLM does not pass ff_mult on: its hidden width is always 4·dim)");
        If(c.FfActivation != FeedForwardActivation.Gelu, $"ff_activation {c.FfActivation} (only the default GELU is a JSON constructor argument)");
        If(c.UseAbsolutePosEmb, "use_absolute_pos_emb (the library accepts the argument but builds no position embedding)");
        If(c.ReceivesContext, "receives_context (the library's cross-attention layers are routing layers with their own layout)");
        If(c.RoutingLookBack, "routing_look_back (no counterpart in the library)");
        If(c.MoeLayers is { Length: > 0 }, "moe_layers (this project's experts are feed-forwards with biases and no capacity limit; the library's are bias-free with capacity-limited top-2 gating)");
        If(c.PkmLayers is { Length: > 0 }, "pkm_layers (the product-key memory's layout is not mapped)");
        If(!c.KmeansEma, "kmeans_ema false (the library's centroids are an EMA buffer)");
        If(c.AddTimingSignal, "add_timing_signal (the library adds no timing signal)");
        If(c.InputDropout > 0 || c.TargetDropout > 0, "input_dropout / target_dropout (the library has no embedding dropout)");
        If(c.KmeansNorm != KMeansNorm.L2, "kmeans_norm LayerNorm (the library normalises with L2)");
        If(c.KmeansAttendNormalized, "kmeans_attend_normalized (the library attends with the raw q and k)");
        If(c.HashItems, "hash_items (the library clusters with k-means only)");
        If(c.SparsityClusterStridedNumHeads > 0, "sparsity_cluster_strided_num_heads (the library has no strided cluster heads)");
        If(c.MaxSeqLen % c.WindowSize != 0, $"max_seq_len {c.MaxSeqLen} not divisible by window_size {c.WindowSize} (the library asserts it)");
        bool routes = Enumerable.Range(0, c.Depth).Any(l => c.HeadGroupsForLayer(l).Any(g => g.Kind == HeadGroupKind.Routing));
        If(routes && c.Causal && !c.ResolvedSharedQk && c.ResolvedNumMemKv == 0, "num_mem_kv 0 with causal routing without shared QK (the library forces at least one memory key/value there)");
        If(c.NumClusters is int n && n * c.WindowSize != c.MaxSeqLen, $"num_clusters {c.NumClusters} (the library always has max_seq_len / window_size clusters)");
        return reasons;
    }

    /// <summary>Throws <see cref="NotSupportedException"/> (one line) when <paramref name="config"/> does not map.</summary>
    public static void RequireSupported(TransformerConfig config)
    {
        var reasons = Unsupported(config);
        if (reasons.Count > 0)
            throw new NotSupportedException($"the PyTorch routing-transformer {LibraryVersion} layout cannot express this configuration: {string.Join("; ", reasons)}.");
    }

    /// <summary>True when <paramref name="names"/> look like a state dict of the library's <c>RoutingTransformerLM</c>.</summary>
    public static bool IsLibraryLayout(IEnumerable<string> names)
    {
        var set = names.ToHashSet(StringComparer.Ordinal);
        return set.Contains("token_emb.weight") && set.Contains("sinu_pos_emb.emb") && set.Any(n => n.StartsWith("routing_transformer.layers.", StringComparison.Ordinal));
    }

    /// <summary>The keyword arguments of <c>RoutingTransformerLM(**args)</c> that build the matching model (every argument
    /// whose library default differs from this project's is written out). <c>n_local_attn_heads</c> is an int, or a list
    /// when layers differ (the library wants a tuple then).</summary>
    public static JsonObject ConstructorArguments(TransformerConfig config)
    {
        RequireSupported(config);
        var c = config;
        var local = Enumerable.Range(0, c.Depth).Select(l => LocalHeads(c, l)).ToArray();
        return new JsonObject
        {
            ["num_tokens"] = c.NumTokens, ["dim"] = c.Dim, ["depth"] = c.Depth, ["max_seq_len"] = c.MaxSeqLen,
            ["heads"] = c.Heads, ["dim_head"] = c.ResolvedDimHead, ["window_size"] = c.WindowSize,
            ["local_attn_window_size"] = c.ResolvedLocalAttnWindowSize, ["local_attn_radius_blocks"] = c.LocalAttnRadiusBlocks,
            ["causal"] = c.Causal,
            ["n_local_attn_heads"] = local.Distinct().Count() == 1 ? JsonValue.Create(local[0]) : new JsonArray(local.Select(n => (JsonNode)JsonValue.Create(n)!).ToArray()),
            ["weight_tie"] = c.WeightTie, ["tie_embedding"] = c.TieEmbedding, ["reversible"] = c.Reversible,
            ["ff_glu"] = c.FfGlu, ["ff_chunks"] = c.FfChunks,
            ["attn_dropout"] = c.AttnDropout, ["ff_dropout"] = c.FfDropout, ["attn_layer_dropout"] = c.AttnLayerDropout, ["layer_dropout"] = c.LayerDropout,
            ["kmeans_ema_decay"] = c.KmeansEmaDecay, ["commitment_factor"] = c.CommitmentFactor,
            ["num_mem_kv"] = c.ResolvedNumMemKv, ["shared_qk"] = c.ResolvedSharedQk,
            ["use_rezero"] = c.UseRezero, ["shift_tokens"] = c.ShiftTokens,
            ["rel_pos_emb"] = c.PositionalEncoding == PositionalEncoding.Rotary,
        };
    }

    /// <summary>
    /// The configuration matching <c>RoutingTransformerLM(**args)</c> for the JSON object <paramref name="json"/> (library
    /// defaults for absent arguments). Throws <see cref="NotSupportedException"/> for arguments this project cannot
    /// express and <see cref="ArgumentException"/> for malformed ones; <paramref name="source"/> names the JSON in messages.
    /// </summary>
    public static TransformerConfig FromConstructorArguments(string json, string source)
    {
        JsonObject args;
        try { args = JsonNode.Parse(json) as JsonObject ?? throw new ArgumentException($"{source}: expected a JSON object of RoutingTransformerLM arguments.", nameof(json)); }
        catch (JsonException e) { throw new ArgumentException($"{source}: not well-formed JSON: {e.Message.Split('\n')[0]}", nameof(json), e); }
        string[] known =
        [
            "num_tokens", "dim", "depth", "max_seq_len", "heads", "dim_head", "window_size", "local_attn_window_size", "local_attn_radius_blocks",
            "causal", "emb_dim", "weight_tie", "attn_dropout", "ff_dropout", "attn_layer_dropout", "layer_dropout", "ff_mult", "ff_activation",
            "ff_glu", "return_embeddings", "n_local_attn_heads", "reversible", "ff_chunks", "kmeans_ema_decay", "commitment_factor",
            "receives_context", "context_window_size", "rel_pos_emb", "_register_kmeans_update", "pkm_layers", "pkm_num_keys", "moe_layers",
            "moe_num_experts", "moe_loss_coef", "num_mem_kv", "shared_qk", "context_shared_qk", "use_rezero", "use_scale_norm",
            "tie_embedding", "use_absolute_pos_emb", "shift_tokens",
        ];
        var unknown = args.Select(kv => kv.Key).Where(k => !known.Contains(k)).ToList();
        if (unknown.Count > 0) throw new ArgumentException($"{source}: not RoutingTransformerLM {LibraryVersion} argument(s): {string.Join(", ", unknown)}.", nameof(json));

        T Get<T>(string name, T fallback)
        {
            var node = args[name];
            if (node is null) return fallback;
            try { return node.GetValue<T>(); }
            catch (Exception e) when (e is InvalidOperationException or FormatException)
            {
                throw new ArgumentException($"{source}: '{name}' must be {(typeof(T) == typeof(bool) ? "true or false" : typeof(T) == typeof(int) ? "an integer" : "a number")}, got {node.ToJsonString()}.", nameof(json), e);
            }
        }
        T Required<T>(string name) => args[name] is null ? throw new ArgumentException($"{source}: '{name}' is required.", nameof(json)) : Get<T>(name, default!);
        var refused = new List<string>();
        void Refuse(bool condition, string reason) { if (condition) refused.Add(reason); }
        Refuse(args["pkm_layers"] is JsonArray { Count: > 0 }, "pkm_layers (product-key memory layers)");
        Refuse(args["moe_layers"] is JsonArray { Count: > 0 }, "moe_layers (mixture-of-experts layers)");
        Refuse(Get("return_embeddings", false), "return_embeddings");
        Refuse(Get("receives_context", false), "receives_context");
        Refuse(Get("use_scale_norm", false), "use_scale_norm");
        Refuse(args["ff_activation"] is not null, "ff_activation (only the default GELU)");
        Refuse(Get("shift_tokens", false) && !Get("use_rezero", false), "shift_tokens without use_rezero");
        int dim = Required<int>("dim");
        Refuse(args["emb_dim"] is not null && Get("emb_dim", dim) != dim, "emb_dim != dim");
        if (refused.Count > 0) throw new NotSupportedException($"{source}: this project cannot express RoutingTransformerLM with {string.Join("; ", refused)}.");

        int depth = Required<int>("depth"), windowSize = Get("window_size", 64);
        bool causal = Get("causal", false), sharedQk = args["shared_qk"] is null ? causal : Get("shared_qk", causal);
        int[] local = args["n_local_attn_heads"] switch
        {
            null => [0],
            JsonArray list => list.Select((n, i) => n is JsonValue v && v.TryGetValue<int>(out int x) ? x
                : throw new ArgumentException($"{source}: n_local_attn_heads[{i}] must be an integer.", nameof(json))).ToArray(),
            _ => [Get("n_local_attn_heads", 0)],
        };
        var config = new TransformerConfig
        {
            NumTokens = Required<int>("num_tokens"), Dim = dim, Depth = depth, MaxSeqLen = Required<int>("max_seq_len"),
            Heads = Get("heads", 8), DimHead = Get("dim_head", 64), WindowSize = windowSize,
            LocalAttnWindowSize = args["local_attn_window_size"] is null ? windowSize : Get("local_attn_window_size", windowSize),
            LocalAttnRadiusBlocks = Get("local_attn_radius_blocks", 1), Causal = causal, NLocalAttnHeads = local,
            WeightTie = Get("weight_tie", false), TieEmbedding = Get("tie_embedding", false), Reversible = Get("reversible", false),
            FfGlu = Get("ff_glu", false), FfChunks = Get("ff_chunks", 1), FfMult = 4,
            AttnDropout = Get("attn_dropout", 0.0), FfDropout = Get("ff_dropout", 0.0),
            AttnLayerDropout = Get("attn_layer_dropout", 0.0), LayerDropout = Get("layer_dropout", 0.0),
            KmeansEmaDecay = Get("kmeans_ema_decay", 0.999), CommitmentFactor = Get("commitment_factor", 1e-4),
            SharedQk = sharedQk, NumMemKv = Math.Max(Get("num_mem_kv", 0), causal && !sharedQk ? 1 : 0),   // the library's own rule
            UseRezero = Get("use_rezero", false), ShiftTokens = Get("shift_tokens", false),
            PositionalEncoding = Get("rel_pos_emb", true) ? PositionalEncoding.Rotary : PositionalEncoding.None,
        };
        try { config.Validate(); }
        catch (ArgumentException e) { throw new ArgumentException($"{source}: {e.Message}", nameof(json), e); }
        RequireSupported(config);
        return config;
    }

    /// <summary><paramref name="model"/>'s weights by the library's names and shapes (CPU tensors owned by the caller's
    /// dispose scope), in the library's state-dict order for the parts that have one.</summary>
    public static List<(string Name, Tensor Tensor)> Export(RoutingTransformerLM model)
    {
        ArgumentNullException.ThrowIfNull(model);
        var (entries, links) = Layout(model.Config);
        var ours = model.state_dict();
        var theirs = entries.ToDictionary(e => e.Name, e => e.Fixed?.Invoke() ?? zeros(e.Shape, dtype: e.Dtype));
        using (no_grad())
            foreach (var link in links)
            {
                var source = Rows(ours[link.Ours].detach().cpu(), link.OursRow, link.Rows);
                Rows(theirs[link.Theirs], link.TheirsRow, link.Rows).copy_(link.ToTheirs?.Invoke(source) ?? source);
            }
        return entries.Select(e => (e.Name, theirs[e.Name])).ToList();
    }

    /// <summary>
    /// This project's state dict for <paramref name="config"/> from the library-layout <paramref name="theirs"/>: checks
    /// names and shapes (one error listing every missing, unexpected and mismatched tensor), that the fixed buffers hold
    /// the library's values, that <c>local_to_qkv.bias</c> is zero (this project's projections have no bias) and that tensors
    /// this project ties (weight_tie, tie_embedding) are equal. Tensors are new, owned by the caller's dispose scope.
    /// </summary>
    public static Dictionary<string, Tensor> ToProjectNames(IReadOnlyDictionary<string, Tensor> theirs, TransformerConfig config, string source)
    {
        ArgumentNullException.ThrowIfNull(theirs);
        RequireSupported(config);
        var (entries, links) = Layout(config);
        WeightFiles.RequireFit(entries.Select(e => (e.Name, e.Shape, e.Dtype)), theirs, source);
        foreach (var e in entries.Where(e => e.Fixed is not null))
        {
            using var expected = e.Fixed!();
            var actual = theirs[e.Name].to(ScalarType.Float32);
            bool zeroBias = e.Name.EndsWith("local_to_qkv.bias", StringComparison.Ordinal);
            if (zeroBias ? !actual.eq(0).all().item<bool>() : !actual.allclose(expected, rtol: 1e-4, atol: 1e-4))
                throw new WeightFileException(zeroBias
                    ? $"{source}: {e.Name} is not zero; this project's local q/k/v projections have no bias, so these weights cannot be imported exactly."
                    : $"{source}: {e.Name} differs from the library's fixed table of that name; not a RoutingTransformerLM {LibraryVersion} state dict?");
        }
        using var model = new RoutingTransformerLM(config);
        var ours = model.state_dict().ToDictionary(kv => kv.Key, kv => zeros_like(kv.Value));
        var writtenBy = new Dictionary<(string, long), string>();
        foreach (var link in links)
        {
            var value = Rows(theirs[link.Theirs], link.TheirsRow, link.Rows);
            value = link.ToOurs?.Invoke(value) ?? value;
            var target = Rows(ours[link.Ours], link.OursRow, link.Rows);
            if (writtenBy.TryGetValue((link.Ours, link.OursRow), out var first))
            {
                if (!target.equal(value.to(target.dtype)).all().item<bool>())
                    throw new WeightFileException($"{source}: {link.Theirs} differs from {first}, but this project ties them (one {link.Ours}); such weights cannot be imported exactly.");
                continue;
            }
            target.copy_(value);
            writtenBy[(link.Ours, link.OursRow)] = link.Theirs;
        }
        return ours;
    }

    private static Tensor Rows(Tensor t, long start, long count) => count < 0 ? t : t.narrow(0, start, count);

    /// <summary>Local heads of layer <paramref name="layer"/> (after sparsity_skip_first); the rest route.</summary>
    private static int LocalHeads(TransformerConfig c, int layer) =>
        c.HeadGroupsForLayer(layer).Where(g => g.Kind == HeadGroupKind.Local).Sum(g => g.Heads);

    /// <summary>The library's tensors for <paramref name="c"/> (names and shapes from its source) and how each of this
    /// project's tensors, or row range of one, corresponds to one of them.</summary>
    private static (List<Entry> Entries, List<Link> Links) Layout(TransformerConfig c)
    {
        c.Validate();
        RequireSupported(c);
        int dim = c.Dim, heads = c.Heads, dh = c.ResolvedDimHead, clusters = c.MaxSeqLen / c.WindowSize, mem = c.ResolvedNumMemKv, hidden = 4 * dim;
        bool rotary = c.PositionalEncoding == PositionalEncoding.Rotary;
        var entries = new List<Entry>();
        var links = new List<Link>();
        void Add(string theirs, long[] shape, string? ours = null, ScalarType dtype = ScalarType.Float32)
        {
            entries.Add(new Entry(theirs, shape, dtype));
            if (ours is not null) links.Add(new Link(ours, theirs));
        }

        entries.Add(new Entry("sinu_pos_emb.emb", [c.MaxSeqLen, dh], ScalarType.Float32, () => SinusoidTable(c.MaxSeqLen, dh)));
        Add("token_emb.weight", [c.NumTokens, dim], "token_emb.weight");
        // Routing heads: this project's rotary pair (i, i + D/2) is the library's (2i, 2i + 1).
        var perm = arange(dh / 2).unsqueeze(1).add(tensor(new long[] { 0, dh / 2 })).reshape(-1);    // (Dh): library index → ours
        var inverse = argsort(perm);
        Tensor Feature(Tensor x, Tensor index) => x.index_select(-1, index);                                     // (..., Dh) reordered
        Tensor HeadRows(Tensor w, Tensor index) =>                                                               // (G·Dh, dim) → (G, Dh, dim) → back
            w.reshape(-1, dh, w.shape[1]).index_select(1, index).reshape(w.shape);
        for (int layer = 0; layer < c.Depth; layer++)
        {
            string o = $"transformer.layers.{(c.WeightTie ? 0 : layer)}.";
            var (attnWrap, ffWrap) = c.Reversible
                ? ($"routing_transformer.layers.blocks.{layer}.f.net", $"routing_transformer.layers.blocks.{layer}.g.net")
                : ($"routing_transformer.layers.layers.{layer}.0", $"routing_transformer.layers.layers.{layer}.1");
            void Wrapper(string wrap, string sub)
            {
                if (c.UseRezero) Add($"{wrap}.residual_weight", [1], $"{o}{sub}_rezero.g");
                else
                {
                    Add($"{wrap}.norm.weight", [dim], $"{o}{sub}_norm.weight");
                    Add($"{wrap}.norm.bias", [dim], $"{o}{sub}_norm.bias");
                }
            }
            Wrapper(attnWrap, "attn");
            string shift = c.ShiftTokens ? ".fn" : "";
            string a = $"{attnWrap}.fn{shift}.";
            int local = LocalHeads(c, layer), routing = heads - local;
            if (local > 0)
            {
                if (rotary) entries.Add(new Entry($"{a}local_attn.rel_pos.inv_freq", [dh / 2], ScalarType.Float32, () => InverseFrequencies(dh)));
                long rows = local * dh;
                entries.Add(new Entry($"{a}local_to_qkv.weight", [3 * rows, dim], ScalarType.Float32));
                entries.Add(new Entry($"{a}local_to_qkv.bias", [3 * rows], ScalarType.Float32, () => zeros(3 * rows)));
                foreach (var (proj, i) in new[] { ("to_q", 0), ("to_k", 1), ("to_v", 2) })
                    links.Add(new Link($"{o}attn.{proj}.weight", $"{a}local_to_qkv.weight", 0, i * rows, rows));
            }
            if (routing > 0)
            {
                string g = $"{o}attn.groups.{(local > 0 ? 1 : 0)}.routing.";
                Add($"{a}global_attn.mem_key", [routing, clusters, mem, dh]);
                Add($"{a}global_attn.mem_value", [routing, clusters, mem, dh]);
                if (mem > 0)
                {
                    links.Add(new Link($"{g}mem_key", $"{a}global_attn.mem_key", ToTheirs: x => Feature(x, perm), ToOurs: x => Feature(x, inverse)));
                    links.Add(new Link($"{g}mem_value", $"{a}global_attn.mem_value"));
                }
                Add($"{a}global_attn.kmeans.means", [routing, clusters, dh]);
                links.Add(new Link($"{g}kmeans.means", $"{a}global_attn.kmeans.means", ToTheirs: x => Feature(x, perm), ToOurs: x => Feature(x, inverse)));
                Add($"{a}global_attn.kmeans.initted", [], $"{g}kmeans.initted", ScalarType.Bool);
            }
            long first = local * dh, count = routing * dh;
            Add($"{a}to_q.weight", [count, dim]);
            Add($"{a}to_v.weight", [count, dim]);
            if (!c.ResolvedSharedQk) Add($"{a}to_k.weight", [count, dim]);
            if (routing > 0)
            {
                links.Add(new Link($"{o}attn.to_q.weight", $"{a}to_q.weight", first, 0, count, w => HeadRows(w, perm), w => HeadRows(w, inverse)));
                links.Add(new Link($"{o}attn.to_v.weight", $"{a}to_v.weight", first, 0, count));
                if (!c.ResolvedSharedQk)
                    links.Add(new Link($"{o}attn.to_k.weight", $"{a}to_k.weight", first, 0, count, w => HeadRows(w, perm), w => HeadRows(w, inverse)));
            }
            Add($"{a}to_out.weight", [dim, heads * dh], $"{o}attn.to_out.weight");
            Wrapper(ffWrap, "ff");
            string f = $"{ffWrap}.fn{shift}.fn.";
            Add($"{f}w1.weight", [(c.FfGlu ? 2 : 1) * hidden, dim], $"{o}ff.w1.weight");
            Add($"{f}w1.bias", [(c.FfGlu ? 2 : 1) * hidden], $"{o}ff.w1.bias");
            Add($"{f}w2.weight", [dim, hidden], $"{o}ff.w2.weight");
            Add($"{f}w2.bias", [dim], $"{o}ff.w2.bias");
        }
        Add("norm.weight", [dim], "transformer.norm.weight");
        Add("norm.bias", [dim], "transformer.norm.bias");
        if (c.TieEmbedding) Add("out.tensor", [c.NumTokens, dim], "token_emb.weight");
        else
        {
            Add("out.weight", [c.NumTokens, dim], "to_logits.weight");
            Add("out.bias", [c.NumTokens], "to_logits.bias");
        }
        return (entries, links);
    }

    /// <summary>The library's rotary frequencies, 1 / 10000^(2i / D), computed as it does (float32).</summary>
    private static Tensor InverseFrequencies(int dh) => 1.0f / pow(10000f, arange(0, dh, 2, dtype: ScalarType.Float32) / dh);   // (D/2)

    /// <summary>The library's <c>FixedPositionalEmbedding</c> table: [sin(p·θ), cos(p·θ)] for p &lt; maxSeqLen.</summary>
    private static Tensor SinusoidTable(int maxSeqLen, int dh)
    {
        using var scope = NewDisposeScope();
        var angles = outer(arange(maxSeqLen, dtype: ScalarType.Float32), InverseFrequencies(dh));       // (T, D/2)
        return cat([angles.sin(), angles.cos()], -1).MoveToOuterDisposeScope();                        // (T, D)
    }
}
