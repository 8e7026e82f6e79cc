using System.CommandLine;
using SparseAttention.Hashing;
using SparseAttention.Modules;
using SparseAttention.Patterns;
using static TorchSharp.torch;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn pattern</c>: builds one static attention pattern from options, compiles it with
/// <c>pattern.Compile(--seq-len, --block, --heads)</c> and prints it (ASCII, JSON) or saves it (JSON, PNG).
/// <c>--kind lsh</c> is content-based: it runs an LSH attention head on seeded random queries and shows the buckets
/// it drew and the mask they imply (which keys each query attended in any round).
/// </summary>
internal sealed class PatternCommand
{
    /// <summary>The accepted <c>--kind</c> values, in help order.</summary>
    public static readonly string[] Kinds =
        ["all", "local", "window", "strided", "fixed", "ds-fixed", "ds-variable", "bigbird", "longformer", "sliding-window", "lsh"];

    public static readonly string[] Formats = ["ascii", "json", "png"];

    // Common options.
    private readonly Option<string> kindOption = new("--kind")
    {
        HelpName = "KIND",
        Description = "Pattern kind: " + string.Join(", ", Kinds) + ".",
        Required = true,
    };
    private readonly Option<int> seqLenOption = new("--seq-len") { HelpName = "T", Description = "Sequence length T in tokens.", DefaultValueFactory = _ => 256 };
    private readonly Option<int> blockOption = new("--block") { HelpName = "b", Description = "Block size b: tokens per query/key block (and the block of block layouts).", DefaultValueFactory = _ => 16 };
    private readonly Option<int> headsOption = new("--heads") { HelpName = "H", Description = "Number of heads H.", DefaultValueFactory = _ => 1 };
    private readonly Option<bool> causalOption = new("--causal") { Description = "Causal: a query never sees a later key (the default)." };
    private readonly Option<bool> bidirectionalOption = new("--bidirectional") { Description = "Bidirectional: queries may see later keys." };
    private readonly Option<string> formatOption = new("--format") { HelpName = "ascii|json|png", Description = "Output format: ascii (block layout), json (layout and token mask) or png (token mask, needs --out).", DefaultValueFactory = _ => "ascii" };
    private readonly Option<string?> outOption = new("--out") { HelpName = "FILE", Description = "Write to this file (atomically) instead of stdout." };
    private readonly Option<int> maxHeadsOption = new("--max-heads") { Description = "Draw at most this many heads (ascii, png); json always holds every head.", DefaultValueFactory = _ => 8 };

    // local / window.
    private readonly Option<int?> localAttnCtxOption = new("--local-attn-ctx") { HelpName = "C", Description = "local: band width C; a query sees the last C keys (bidirectional: |q - k| < C). Default: --block." };
    private readonly Option<int?> windowSizeOption = new("--window-size") { HelpName = "W", Description = "window: window size W in tokens. Default: --block." };
    private readonly Option<int> lookBackwardOption = new("--look-backward") { Description = "window: windows looked back.", DefaultValueFactory = _ => 1 };
    private readonly Option<int> lookForwardOption = new("--look-forward") { Description = "window: windows looked forward (bidirectional only).", DefaultValueFactory = _ => 0 };
    private readonly Option<bool> exactWindowSizeOption = new("--exact-windowsize") { Description = "window: limit the reach to exactly W·look-backward tokens back (W·look-forward forward)." };

    // strided / fixed (Sparse Transformer).
    private readonly Option<int?> strideOption = new("--stride") { HelpName = "L", Description = "strided, fixed: stride L. Default: --block." };
    private readonly Option<string> combineOption = new("--combine") { HelpName = "merged|multihead|interleaved", Description = "strided, fixed: how the two factorized parts combine: merged, multihead or interleaved (with --layer).", DefaultValueFactory = _ => "merged" };
    private readonly Option<int> layerOption = new("--layer") { Description = "strided, fixed with --combine interleaved: layer index (even = part A, odd = part B).", DefaultValueFactory = _ => 0 };
    private readonly Option<int> vertsizeOption = new("--vertsize") { Description = "fixed: summary cells c at the end of each stride block.", DefaultValueFactory = _ => 1 };
    private readonly Option<int> numVertsOption = new("--num-verts") { Description = "fixed: number of different summary offsets across heads.", DefaultValueFactory = _ => 1 };

    // Block layouts (DeepSpeed's parameter names). Nullable: each kind has its own default.
    private readonly Option<int?> numLocalBlocksOption = new("--num-local-blocks") { Description = "ds-fixed: blocks per local window (default 4)." };
    private readonly Option<int?> numGlobalBlocksOption = new("--num-global-blocks") { Description = "ds-fixed, bigbird: global blocks (default 1)." };
    private readonly Option<bool> horizontalGlobalAttentionOption = new("--horizontal-global-attention") { Description = "ds-fixed, ds-variable: global blocks also attend everything (bidirectional only)." };
    private readonly Option<int?> numDifferentGlobalPatternsOption = new("--num-different-global-patterns") { Description = "ds-fixed: different global patterns across heads (default 1)." };
    private readonly Option<int?> numRandomBlocksOption = new("--num-random-blocks") { Description = "ds-variable (default 0), bigbird (default 1): random blocks per block row." };
    private readonly Option<string?> localWindowBlocksOption = new("--local-window-blocks") { HelpName = "N,N,...", Description = "ds-variable: comma-separated local window sizes in blocks, e.g. 4,8 (the last repeats)." };
    private readonly Option<string?> globalBlockIndicesOption = new("--global-block-indices") { HelpName = "N,N,...", Description = "ds-variable, longformer: comma-separated global block indices, e.g. 0." };
    private readonly Option<string?> globalBlockEndIndicesOption = new("--global-block-end-indices") { HelpName = "N,N,...", Description = "ds-variable, longformer: comma-separated exclusive ends; makes --global-block-indices ranges." };
    private readonly Option<int?> numSlidingWindowBlocksOption = new("--num-sliding-window-blocks") { Description = "bigbird, longformer, sliding-window: sliding window width in blocks (default 3)." };
    private readonly Option<bool> differentLayoutPerHeadOption = new("--different-layout-per-head") { Description = "ds-fixed, ds-variable, bigbird, longformer: a different layout per head." };
    private readonly Option<int?> seedOption = new("--seed") { Description = "ds-variable, bigbird: seed of the random blocks; lsh: seed of the random input and rotations (default 0)." };

    // lsh (content-based: shown on seeded random input).
    private readonly Option<int?> bucketSizeOption = new("--bucket-size") { Description = "lsh: chunk length W (default --block)." };
    private readonly Option<int> nHashesOption = new("--n-hashes") { Description = "lsh: hash rounds.", DefaultValueFactory = _ => 1 };
    private readonly Option<int?> nBucketsOption = new("--n-buckets") { Description = "lsh: buckets per round (default ⌈T / W⌉, even; a power of two with --alsh)." };
    private readonly Option<bool> sameBucketOnlyOption = new("--same-bucket-only") { Description = "lsh: a query attends only keys of its own bucket (attend_across_buckets = false)." };
    private readonly Option<string?> alshOption = new("--alsh") { HelpName = "SimpleLsh|Xbox|SignAlsh", Description = "lsh: route separate random q and k by this MIPS transform instead of shared-QK angular LSH." };
    private readonly Option<int> headDimOption = new("--head-dim") { Description = "lsh: width of the random head vectors.", DefaultValueFactory = _ => 16 };

    private readonly Option[] common;

    /// <summary>Kind-specific options each kind accepts; giving any other kind-specific option is an error.</summary>
    private readonly Dictionary<string, Option[]> kindOptions;

    private PatternCommand()
    {
        common = [kindOption, seqLenOption, blockOption, headsOption, causalOption, bidirectionalOption, formatOption, outOption, maxHeadsOption];

        kindOptions = new()
        {
            ["all"] = [],
            ["local"] = [localAttnCtxOption],
            ["window"] = [windowSizeOption, lookBackwardOption, lookForwardOption, exactWindowSizeOption],
            ["strided"] = [strideOption, combineOption, layerOption],
            ["fixed"] = [strideOption, combineOption, layerOption, vertsizeOption, numVertsOption],
            ["ds-fixed"] = [numLocalBlocksOption, numGlobalBlocksOption, horizontalGlobalAttentionOption, numDifferentGlobalPatternsOption, differentLayoutPerHeadOption],
            ["ds-variable"] = [numRandomBlocksOption, localWindowBlocksOption, globalBlockIndicesOption, globalBlockEndIndicesOption, horizontalGlobalAttentionOption, differentLayoutPerHeadOption, seedOption],
            ["bigbird"] = [numRandomBlocksOption, numSlidingWindowBlocksOption, numGlobalBlocksOption, differentLayoutPerHeadOption, seedOption],
            ["longformer"] = [numSlidingWindowBlocksOption, globalBlockIndicesOption, globalBlockEndIndicesOption, differentLayoutPerHeadOption],
            ["sliding-window"] = [numSlidingWindowBlocksOption],
            ["lsh"] = [bucketSizeOption, nHashesOption, nBucketsOption, sameBucketOnlyOption, alshOption, headDimOption, seedOption],
        };
    }

    /// <summary>A new <c>pattern</c> command (options are per instance: a command tree is built per run).</summary>
    public static Command Create()
    {
        var self = new PatternCommand();
        var command = new Command("pattern", "Print or save a static attention pattern (block layout and token-level mask), or the buckets and implied mask of an LSH head (--kind lsh).");
        foreach (var option in self.common.Concat(self.kindOptions.Values.SelectMany(o => o)).Distinct())
        {
            if (option.HelpName is null && option.ValueType != typeof(bool)) option.HelpName = "N";
            command.Add(option);
        }
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string kind = parse.GetValue(kindOption)!.Trim().ToLowerInvariant();
        if (!kindOptions.TryGetValue(kind, out var accepted))
            throw new CliUsageException($"--kind: unknown kind '{parse.GetValue(kindOption)}'; expected one of: {string.Join(", ", Kinds)}.");
        foreach (var option in kindOptions.Values.SelectMany(o => o).Distinct())
            if (!accepted.Contains(option) && parse.GetResult(option) is { Implicit: false })
                throw new CliUsageException($"{option.Name} does not apply to --kind {kind}" +
                    (accepted.Length == 0 ? "; it takes no kind-specific options." : $"; it takes {string.Join(", ", accepted.Select(o => o.Name))}."));

        int seqLen = parse.GetValue(seqLenOption), block = parse.GetValue(blockOption), heads = parse.GetValue(headsOption);
        int maxHeads = parse.GetValue(maxHeadsOption);
        RequirePositive(seqLenOption, seqLen, "tokens");
        RequirePositive(blockOption, block, "tokens per block");
        RequirePositive(headsOption, heads, "heads");
        RequirePositive(maxHeadsOption, maxHeads, "heads to draw");
        if (parse.GetValue(causalOption) && parse.GetValue(bidirectionalOption))
            throw new CliUsageException("--causal and --bidirectional exclude each other; give at most one (causal is the default).");
        bool causal = !parse.GetValue(bidirectionalOption);

        string format = parse.GetValue(formatOption)!.Trim().ToLowerInvariant();
        if (!Formats.Contains(format))
            throw new CliUsageException($"--format: unknown format '{parse.GetValue(formatOption)}'; expected one of: {string.Join(", ", Formats)}.");
        string? outPath = parse.GetValue(outOption);
        if (format == "png" && string.IsNullOrWhiteSpace(outPath))
            throw new CliUsageException("--out: --format png writes an image file; give --out FILE.png.");

        RequireFits(kind, format, seqLen, block, heads);

        string? buckets = null;
        var pattern = kind == "lsh" ? BuildLsh(parse, seqLen, block, heads, causal, maxHeads, out buckets) : Build(kind, parse, seqLen, block, causal);
        var mask = pattern.Compile(seqLen, kind == "lsh" ? Math.Min(block, seqLen) : block, heads);

        switch (format)
        {
            case "ascii":
                Write(buckets + PatternRendering.Ascii(mask, maxHeads), outPath, output);
                break;
            case "json":
                Write(PatternRendering.Json(mask, kind), outPath, output);
                break;
            default:
                PatternRendering.Png(mask, outPath!, maxHeads);
                break;
        }
        if (outPath is not null) output.WriteLine($"wrote {outPath} ({format}, {mask.Name}, sparsity {mask.Sparsity:F3})");
        return CliApp.Ok;
    }

    private static void Write(string text, string? path, TextWriter output)
    {
        if (path is null) output.Write(text);
        else AtomicFile.WriteAllText(path, text);
    }

    private AttentionPattern Build(string kind, ParseResult parse, int seqLen, int block, bool causal)
    {
        switch (kind)
        {
            case "all":
                return new DensePattern(causal);
            case "local":
            {
                int ctx = OrBlock(parse, localAttnCtxOption, block, seqLen);
                NotLongerThanSequence(localAttnCtxOption, ctx, seqLen);
                return new LocalBandPattern(ctx, causal);
            }
            case "window":
            {
                int size = OrBlock(parse, windowSizeOption, block, seqLen);
                NotLongerThanSequence(windowSizeOption, size, seqLen);
                return new WindowPattern(size, parse.GetValue(lookBackwardOption), parse.GetValue(lookForwardOption),
                    parse.GetValue(exactWindowSizeOption), causal);
            }
            case "strided":
            {
                int stride = OrBlock(parse, strideOption, block, seqLen);
                NotLongerThanSequence(strideOption, stride, seqLen);
                return new StridedPattern(stride, causal, Combine(parse), Layer(parse));
            }
            case "fixed":
            {
                int stride = OrBlock(parse, strideOption, block, seqLen);
                NotLongerThanSequence(strideOption, stride, seqLen);
                return new FixedPattern(stride, parse.GetValue(vertsizeOption), parse.GetValue(numVertsOption), causal, Combine(parse), Layer(parse));
            }
            case "ds-fixed":
                return new DsFixedPattern(block, causal,
                    numLocalBlocks: parse.GetValue(numLocalBlocksOption) ?? 4,
                    numGlobalBlocks: parse.GetValue(numGlobalBlocksOption) ?? 1,
                    horizontalGlobalAttention: parse.GetValue(horizontalGlobalAttentionOption),
                    numDifferentGlobalPatterns: parse.GetValue(numDifferentGlobalPatternsOption) ?? 1,
                    differentLayoutPerHead: parse.GetValue(differentLayoutPerHeadOption));
            case "ds-variable":
                return new DsVariablePattern(block, causal,
                    numRandomBlocks: parse.GetValue(numRandomBlocksOption) ?? 0,
                    localWindowBlocks: IntList(parse, localWindowBlocksOption),
                    globalBlockIndices: IntList(parse, globalBlockIndicesOption),
                    globalBlockEndIndices: IntList(parse, globalBlockEndIndicesOption),
                    horizontalGlobalAttention: parse.GetValue(horizontalGlobalAttentionOption),
                    differentLayoutPerHead: parse.GetValue(differentLayoutPerHeadOption),
                    seed: parse.GetValue(seedOption) ?? 0);
            case "bigbird":
                return new BigBirdPattern(block, causal,
                    numRandomBlocks: parse.GetValue(numRandomBlocksOption) ?? 1,
                    numSlidingWindowBlocks: parse.GetValue(numSlidingWindowBlocksOption) ?? 3,
                    numGlobalBlocks: parse.GetValue(numGlobalBlocksOption) ?? 1,
                    differentLayoutPerHead: parse.GetValue(differentLayoutPerHeadOption),
                    seed: parse.GetValue(seedOption) ?? 0);
            case "longformer":
                return new LongformerPattern(block, causal,
                    numSlidingWindowBlocks: parse.GetValue(numSlidingWindowBlocksOption) ?? 3,
                    globalBlockIndices: IntList(parse, globalBlockIndicesOption),
                    globalBlockEndIndices: IntList(parse, globalBlockEndIndicesOption),
                    differentLayoutPerHead: parse.GetValue(differentLayoutPerHeadOption));
            case "sliding-window":
                return new SlidingWindowPattern(block, causal,
                    numSlidingWindowBlocks: parse.GetValue(numSlidingWindowBlocksOption) ?? 3);
            default:
                throw new InvalidOperationException($"kind '{kind}' is listed but not built."); // Kinds and Build out of step
        }
    }

    /// <summary>
    /// Runs an <see cref="LshAttention"/> head group on seeded random input (batch 1) and returns its implied mask as a
    /// pattern; <paramref name="buckets"/> gets a text listing of each drawn head's buckets per round and, for short
    /// sequences, the token-level mask.
    /// </summary>
    private AttentionPattern BuildLsh(ParseResult parse, int seqLen, int block, int heads, bool causal, int maxHeads, out string buckets)
    {
        int bucketSize = parse.GetValue(bucketSizeOption) ?? Math.Min(block, seqLen);
        int nHashes = parse.GetValue(nHashesOption), dim = parse.GetValue(headDimOption), seed = parse.GetValue(seedOption) ?? 0;
        int? nBuckets = parse.GetValue(nBucketsOption);
        if (bucketSize <= 0) throw new CliUsageException($"--bucket-size must be > 0 (tokens per chunk), got {bucketSize}.");
        if (nHashes <= 0) throw new CliUsageException($"--n-hashes must be > 0 (hash rounds), got {nHashes}.");
        if (dim <= 0) throw new CliUsageException($"--head-dim must be > 0, got {dim}.");
        AlshTransform? alsh = null;
        if (parse.GetValue(alshOption) is string name)
            alsh = Enum.TryParse<AlshTransform>(name.Trim(), ignoreCase: true, out var t) && Enum.IsDefined(t) ? t
                : throw new CliUsageException($"--alsh: unknown transform '{name}'; expected one of: {string.Join(", ", Enum.GetNames<AlshTransform>())}.");
        bool across = !parse.GetValue(sameBucketOnlyOption);
        LshAttention lsh;
        try
        {
            lsh = new LshAttention(heads, dim, seqLen, bucketSize, nHashes, nBuckets, causal, across, alsh: alsh, seed: seed);
        }
        catch (ArgumentException e) { throw new CliUsageException($"--kind lsh: {e.Message}"); }
        using var scope = NewDisposeScope();
        var gen = new Generator((ulong)seed + 1);
        var q = randn(new long[] { 1, heads, seqLen, dim }, generator: gen);
        var k = randn(new long[] { 1, heads, seqLen, dim }, generator: gen);
        var v = randn(new long[] { 1, heads, seqLen, dim }, generator: gen);
        var result = lsh.forward(q, alsh is null ? null : k, v);
        bool[] dense = lsh.AttendedMask(result)[0].contiguous().data<bool>().ToArray();     // (H, T, T)
        long[] qb = result.QueryBuckets[0].contiguous().data<long>().ToArray();              // (H, R, T)
        long[] kb = result.KeyBuckets[0].contiguous().data<long>().ToArray();

        var sb = new System.Text.StringBuilder();
        sb.AppendLine($"lsh buckets: {lsh.NBuckets} buckets, bucket_size={bucketSize}, n_hashes={nHashes}, " +
                      $"{(alsh is null ? "shared QK (angular LSH)" : $"ALSH {alsh}")}, {(causal ? "causal" : "bidirectional")}, seed={seed}; " +
                      "random N(0, 1) input, one symbol per token (0-9, a-z, A-Z, then *)");
        for (int h = 0; h < Math.Min(heads, maxHeads); h++)
            for (int r = 0; r < nHashes; r++)
            {
                sb.AppendLine($"head {h} round {r} {(alsh is null ? "buckets" : "query buckets")}: {Symbols(qb, ((long)h * nHashes + r) * seqLen, seqLen)}");
                if (alsh is not null) sb.AppendLine($"head {h} round {r} key buckets:   {Symbols(kb, ((long)h * nHashes + r) * seqLen, seqLen)}");
            }
        if (seqLen <= 128)
        {
            sb.AppendLine("token-level mask (rows = queries, columns = keys): █ attended in some round, · not");
            for (int h = 0; h < Math.Min(heads, maxHeads); h++)
            {
                sb.AppendLine($"head {h}:");
                for (int i = 0; i < seqLen; i++)
                {
                    sb.Append("  ");
                    for (int j = 0; j < seqLen; j++) sb.Append(dense[((long)h * seqLen + i) * seqLen + j] ? '█' : '·');
                    sb.AppendLine();
                }
            }
        }
        buckets = sb.ToString();
        string patternName = $"lsh(bucket_size={bucketSize}, n_hashes={nHashes}, n_buckets={lsh.NBuckets}{(alsh is null ? "" : $", alsh={alsh}")}" +
                             $"{(across ? "" : ", same bucket only")}, seed={seed})";
        return AttentionPattern.FromPredicate(patternName, causal, sameForAllHeads: false,
            (h, i, j, t) => dense[((long)h * t + i) * t + j]);
    }

    private static string Symbols(long[] values, long offset, int count)
    {
        const string digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        var chars = new char[count];
        for (int i = 0; i < count; i++) { long b = values[offset + i]; chars[i] = b < digits.Length ? digits[(int)b] : '*'; }
        return new string(chars);
    }

    private FactorizedCombine Combine(ParseResult parse)
    {
        string value = parse.GetValue(combineOption)!;
        var combine = value.Trim().ToLowerInvariant() switch
        {
            "merged" => FactorizedCombine.Merged,
            "multihead" => FactorizedCombine.MultiHead,
            "interleaved" => FactorizedCombine.Interleaved,
            _ => throw new CliUsageException($"--combine: unknown value '{value}'; expected merged, multihead or interleaved."),
        };
        if (combine != FactorizedCombine.Interleaved && parse.GetResult(layerOption) is { Implicit: false })
            throw new CliUsageException($"--layer only applies with --combine interleaved (got --combine {value}).");
        return combine;
    }

    private int Layer(ParseResult parse)
    {
        int layer = parse.GetValue(layerOption);
        if (layer < 0) throw new CliUsageException($"--layer must be >= 0, got {layer}.");
        return layer;
    }

    /// <summary>The option's value, or by default the block size (at most the sequence length).</summary>
    private static int OrBlock(ParseResult parse, Option<int?> option, int block, int seqLen) =>
        parse.GetValue(option) ?? Math.Min(block, seqLen);

    /// <summary>Most block pairs (heads × blocks²) compiled, and most token pairs (heads × T²) of a dense mask (json, png,
    /// lsh): 2^28, about a gigabyte of output or working memory. Checked before anything is allocated.</summary>
    internal const long MaxCells = 1L << 28;

    private void RequireFits(string kind, string format, int seqLen, int block, int heads)
    {
        long blocks = (seqLen + (long)block - 1) / block;
        if (Limits.Product(heads, blocks, blocks) is not long pairs || pairs > MaxCells)
            throw new CliUsageException($"--heads {heads} × (--seq-len {seqLen} / --block {block})² = {(double)heads * blocks * blocks:0.##e+0} block pairs; " +
                                        $"at most {MaxCells:N0} are compiled (lower --seq-len or --heads, or raise --block).");
        if (format is "json" or "png" || kind == "lsh")
            if (Limits.Product(heads, seqLen, seqLen) is not long cells || cells > MaxCells)
                throw new CliUsageException($"--heads {heads} × --seq-len {seqLen}² = {(double)heads * seqLen * seqLen:0.##e+0} token pairs in the dense mask " +
                                            $"{(kind == "lsh" ? "of --kind lsh" : $"that --format {format} writes")}; at most {MaxCells:N0} (lower --seq-len or --heads" +
                                            $"{(kind == "lsh" ? "" : ", or use --format ascii")}).");
    }

    private static void RequirePositive(Option<int> option, int value, string what)
    {
        if (value <= 0) throw new CliUsageException($"{option.Name} must be > 0 ({what}), got {value}.");
    }

    private static void NotLongerThanSequence(Option<int?> option, int value, int seqLen)
    {
        if (value > seqLen)
            throw new CliUsageException($"{option.Name} must be at most --seq-len ({seqLen}), got {value}; a window covering the whole sequence is --kind all.");
    }

    /// <summary>Parses "4,8" (spaces allowed) into ints; null when the option was not given.</summary>
    private int[]? IntList(ParseResult parse, Option<string?> option)
    {
        string? text = parse.GetValue(option);
        if (text is null) return null;
        var parts = text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        var values = new int[parts.Length];
        for (int i = 0; i < parts.Length; i++)
            if (!int.TryParse(parts[i], System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out values[i]))
                throw new CliUsageException($"{option.Name}: expected comma-separated integers such as 4,8; '{parts[i]}' in '{text}' is not an integer.");
        if (values.Length == 0)
            throw new CliUsageException($"{option.Name}: expected comma-separated integers such as 4,8, got '{text}'.");
        return values;
    }
}
