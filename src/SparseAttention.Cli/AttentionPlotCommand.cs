using System.CommandLine;
using System.Text;
using ScottPlot;
using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

internal sealed class AttentionPlotCommand
{
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat), run folder (its newest checkpoint), .safetensors file or exported folder.", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON for safetensors weights that carry none." };
    private readonly Option<string?> textOption = new("--text") { HelpName = "TEXT", Description = "The text to run the model on (encoded with the checkpoint's tokenizer)." };
    private readonly Option<string?> dataOption = new("--data") { HelpName = "PATH", Description = "Take the text from this file instead, starting at --offset." };
    private readonly Option<long> offsetOption = new("--offset") { HelpName = "N", Description = "First byte of the text within --data.", DefaultValueFactory = _ => 0 };
    private readonly Option<int?> lengthOption = new("--length") { HelpName = "T", Description = "Tokens of text to use (bytes for a byte-level model; default and maximum: the model's max_seq_len)." };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.png", Description = "PNG of the attention masks; with routing heads also FILE-clusters.png.", Required = true };

    public static Command Create()
    {
        var self = new AttentionPlotCommand();
        var command = new Command("attention",
            "For each layer and head, which keys each query may attend on a text: local/static heads from their pattern, routing heads from the " +
            "clusters the model chose on that text (cells coloured by cluster; memory key/values not drawn), LSH heads from the buckets they chose " +
            "(coloured by first-round bucket), synthesizer heads as every (earlier) key; plus a picture of the clusters / buckets over positions.");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.textOption, self.dataOption, self.offsetOption, self.lengthOption, self.outOption })
            command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string? text = parse.GetValue(textOption), data = parse.GetValue(dataOption);
        if ((text is null) == (data is null)) throw new CliUsageException("--text / --data: give exactly one of them.");
        long offset = parse.GetValue(offsetOption);
        if (offset < 0) throw new CliUsageException($"--offset must be >= 0, got {offset}.");
        if (text is not null && offset != 0) throw new CliUsageException("--offset applies to --data only.");
        int? length = parse.GetValue(lengthOption);
        if (length is < 1) throw new CliUsageException($"--length must be >= 1, got {length}.");
        byte[] source = text is not null ? Encoding.UTF8.GetBytes(text) : TextData.Read(data!, "--data", minBytes: 1);
        if (source.Length == 0) throw new CliUsageException("--text: the text is empty.");
        if (offset >= source.Length) throw new CliUsageException($"--offset: {offset} is past the end of {data} ({source.Length} bytes).");

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        int maxLen = loaded.Config.MaxSeqLen;
        if (length is int l && l > maxLen) throw new CliUsageException($"--length: {l} is longer than the model's context (max_seq_len = {maxLen}).");
        var tokenizer = CliTokenizer.Of(loaded);
        int want = length ?? maxLen;
        // A token covers at most a few dozen bytes: encode only a generous prefix of a long file.
        var ids = tokenizer.Encode(source.AsSpan((int)offset, (int)Math.Min(source.Length - offset, (long)want * 256)));
        string unit = CliTokenizer.Unit(tokenizer);
        if (text is not null && length is null && ids.Length > maxLen)
            throw new CliUsageException($"--text: {ids.Length} {unit} is longer than the model's context (max_seq_len = {maxLen}); shorten it or pass --length.");
        if (ids.Length == 0) throw new CliUsageException("--text / --data: the text gives no tokens.");
        int t = Math.Min(want, ids.Length);
        var window = ids[..t];
        var labels = window.Select(id => tokenizer.Kind == TokenizerKind.Bytes
            ? Encoding.Latin1.GetString([(byte)id])                                   // one character per byte, as before
            : tokenizer.Decode([id])).ToArray();

        var heads = Compute(loaded.Model, window);
        string outPath = parse.GetValue(outOption)!;
        int clusters = Math.Max(1, (maxLen + loaded.Config.WindowSize - 1) / loaded.Config.WindowSize);
        clusters = Math.Max(clusters, heads.Where(h => h.Cluster is not null).SelectMany(h => h.Cluster!).DefaultIfEmpty(0).Max() + 1);   // LSH buckets
        AttentionRendering.MasksPng(heads, labels, clusters, outPath, $"{loaded.Describe()}: attention on {t} {unit}");
        output.WriteLine($"wrote {outPath}: {heads.Select(h => h.Layer).Distinct().Count()} layers × {loaded.Config.Heads} heads on {t} {unit}");
        if (heads.Any(h => h.Cluster is not null))
        {
            string clustersPath = Path.Combine(Path.GetDirectoryName(outPath) ?? "", Path.GetFileNameWithoutExtension(outPath) + "-clusters.png");
            AttentionRendering.ClustersPng(heads, labels, clusters, clustersPath, $"{loaded.Describe()}: routing clusters / LSH buckets over positions");
            output.WriteLine($"wrote {clustersPath}: {heads.Count(h => h.Kind == HeadGroupKind.Routing)} routing heads (colour = cluster of the query's group), " +
                             $"{heads.Count(h => h.Kind == HeadGroupKind.Lsh)} LSH heads (colour = bucket in the first hash round)");
        }
        return CliApp.Ok;
    }

    /// <summary>Runs <paramref name="model"/> on <paramref name="text"/> (one window, T ≤ max_seq_len) and returns, per layer
    /// and head in order, the keys each query may attend: static/local heads from their compiled pattern, routing
    /// heads from the groups recorded by <see cref="RoutingCapture"/> (causal rule on positions; with shared QK a
    /// token attends itself only when its group offers nothing else, as the kernel does).</summary>
    internal static List<HeadAttention> Compute(RoutingTransformerLM model, byte[] text) => Compute(model, text.Select(b => (int)b).ToArray());

    /// <summary>As <see cref="Compute(RoutingTransformerLM, byte[])"/>, on token ids of the model's tokenizer.</summary>
    internal static List<HeadAttention> Compute(RoutingTransformerLM model, int[] tokens)
    {
        var config = model.Config;
        int t = tokens.Length;
        using var capture = RoutingCapture.Start();
        using (no_grad())
        using (var scope = NewDisposeScope())
        {
            model.eval();
            model.forward(tensor(tokens.Select(id => (long)id).ToArray(), new long[] { 1, t }), null);   // (1, T) → routing recorded
        }
        var attentionLayers = model.Transformer.Blocks.Select(b => b.Attention).OfType<AttentionLayer>().ToList();
        var result = new List<HeadAttention>();
        int record = 0, lshRecord = 0;
        for (int layer = 0; layer < config.Depth; layer++)
        {
            var attention = attentionLayers[config.WeightTie ? 0 : layer];
            var plans = config.HeadGroupsForLayer(layer);              // same order as attention.Groups
            int head = 0;
            for (int gi = 0; gi < attention.Groups.Count; gi++)
            {
                var group = attention.Groups[gi];
                if (group is StaticPatternAttention staticGroup)
                {
                    using var dense = staticGroup.MaskFor(t).ToDense();                     // (Hg, T, T)
                    var all = dense.data<bool>().ToArray();
                    var kind = plans[gi].Kind;
                    for (int h = 0; h < group.Heads; h++)
                        result.Add(new HeadAttention(layer, head + h, kind, all.AsSpan(h * t * t, t * t).ToArray(), null));
                }
                else if (group is RoutingHeadGroup routing)
                {
                    if (record >= capture.Records.Count || !ReferenceEquals(capture.Records[record].Group, routing))
                        throw new InvalidOperationException($"routing of layer {layer} was not recorded.");
                    var r = capture.Records[record++];
                    for (int h = 0; h < group.Heads; h++)
                        result.Add(RoutingMask(layer, head + h, r, h, t, routing.Routing.Causal, routing.Routing.SharedQk));
                }
                else if (group is LshHeadGroup lsh)
                {
                    if (lshRecord >= capture.LshRecords.Count || !ReferenceEquals(capture.LshRecords[lshRecord].Group, lsh))
                        throw new InvalidOperationException($"LSH buckets of layer {layer} were not recorded.");
                    var r = capture.LshRecords[lshRecord++];
                    for (int h = 0; h < group.Heads; h++)
                        result.Add(new HeadAttention(layer, head + h, HeadGroupKind.Lsh, r.Allowed[0, h].data<bool>().ToArray(),
                            r.Buckets[0, h].data<long>().ToArray().Select(b => (int)b).ToArray()));
                }
                else if (group is SynthesizerHeadGroup)
                {
                    // Synthesizer heads weight every key (every earlier key when causal); their weights do not depend on a pattern.
                    var allowed = new bool[t * t];
                    for (int q = 0; q < t; q++)
                        for (int k = 0; k < t; k++) allowed[q * t + k] = !config.Causal || k <= q;
                    for (int h = 0; h < group.Heads; h++) result.Add(new HeadAttention(layer, head + h, HeadGroupKind.Synthesizer, allowed, null));
                }
                else throw new InvalidOperationException($"layer {layer}: cannot draw a head group of type {group.GetType().Name}.");
                head += group.Heads;
            }
        }
        return result;
    }

    private static HeadAttention RoutingMask(int layer, int head, RoutingRecord r, int h, int t, bool causal, bool sharedQk)
    {
        var queries = r.QueryIndices[0, h].data<long>().ToArray();      // (G, W) flattened
        var keys = r.KeyIndices[0, h].data<long>().ToArray();          // (G, W) flattened
        var clusters = r.GroupClusters[0, h].data<long>().ToArray();   // (G)
        int groups = clusters.Length, width = (int)r.QueryIndices.shape[3];
        var allowed = new bool[t * t];
        var cluster = Enumerable.Repeat(-1, t).ToArray();
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < width; i++)
            {
                long q = queries[g * width + i];
                if (q < 0) continue;
                cluster[q] = (int)clusters[g];
                bool other = false;
                for (int j = 0; j < width; j++)
                {
                    long k = keys[g * width + j];
                    if (k < 0 || (causal && k > q) || (sharedQk && k == q)) continue;
                    allowed[q * t + k] = true;
                    other = true;
                }
                if (sharedQk && !other) allowed[q * t + q] = true;           // self only when nothing else
            }
        return new HeadAttention(layer, head, HeadGroupKind.Routing, allowed, cluster);
    }
}
