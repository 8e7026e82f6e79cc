using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using SparseAttention.Model;
using SparseAttention.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn eval</c>: bits per byte of a model on a text file or folder, for any tokenizer, with the per-token loss.
/// </summary>
internal sealed class EvalCommand
{
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat), run folder (its newest checkpoint), .safetensors file or exported folder.", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON for safetensors weights that carry none (or to override theirs)." };
    private readonly Option<string> dataOption = new("--data") { HelpName = "PATH", Description = "Text to score: a file, or a folder whose files are concatenated (ordinal path order, as train reads them).", Required = true };
    private readonly Option<long?> maxBytesOption = new("--max-bytes") { HelpName = "N", Description = "Score only the first N bytes of the data." };
    private readonly Option<int> batchSizeOption = new("--batch-size") { HelpName = "B", Description = "Windows per forward pass.", DefaultValueFactory = _ => 16 };
    private readonly Option<bool> jsonOption = new("--json") { Description = "Print {\"bpc\":x, \"tokens\":n, \"bytes\":m, \"loss\":l, \"tokenizer\":name, \"bucket_size\":s, \"bpc_by_position\":[...]} instead of sentences." };
    private readonly Option<int> bucketSizeOption = new("--bucket-size") { HelpName = "S", Description = "bpc by position in the window: bucket k holds the predictions of positions [k·S, (k+1)·S) of their window (position 0 is never predicted); a model that uses long context gets lower bpc in later buckets.", DefaultValueFactory = _ => 256 };
    private readonly Option<int?> threadsOption = new("--threads") { HelpName = "N", Description = "libtorch intra-op threads (default: libtorch's choice)." };
    private readonly Option<string> deviceOption = CliDevice.CreateOption();

    public static Command Create()
    {
        var self = new EvalCommand();
        var command = new Command("eval",
            "Bits per byte of a model on text. The text is encoded with the model's tokenizer (bytes, gpt2 or cl100k, from its checkpoint) and " +
            "the tokens are cut into windows of T = max_seq_len tokens that overlap by one token (window k starts at token k·(T−1); the last " +
            "may be shorter), so every token except the first is predicted exactly once, from the tokens before it in its window; " +
            "bpc = summed next-token cross-entropy / (ln 2 · the original bytes the predicted tokens stand for) — bits per byte, on one scale " +
            "for every tokenizer (for bytes, the mean next-byte cross-entropy in bits); loss = nats per predicted token; tokens = tokens predicted.");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.dataOption, self.maxBytesOption, self.batchSizeOption,
                     self.jsonOption, self.bucketSizeOption, self.threadsOption, self.deviceOption })
            command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        int batchSize = parse.GetValue(batchSizeOption);
        if (batchSize <= 0) throw new CliUsageException($"--batch-size must be > 0, got {batchSize}.");
        int bucketSize = parse.GetValue(bucketSizeOption);
        if (bucketSize <= 0) throw new CliUsageException($"--bucket-size must be > 0, got {bucketSize}.");
        long? maxBytes = parse.GetValue(maxBytesOption);
        if (maxBytes is < 2) throw new CliUsageException($"--max-bytes must be >= 2 (one byte predicted from another), got {maxBytes}.");
        CliThreads.Apply(parse.GetValue(threadsOption));
        var device = CliDevice.Parse(parse.GetValue(deviceOption)!);
        var data = TextData.Read(parse.GetValue(dataOption)!, "--data", minBytes: 2);
        if (maxBytes is long mb && mb < data.Length) data = data[..(int)mb];

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        var tokenizer = CliTokenizer.Of(loaded);
        var watch = Stopwatch.StartNew();
        if (tokenizer.Tokenize(data) is not { Length: >= 2 } text)
            throw new CliUsageException($"--data: the text gives fewer than 2 {tokenizer.Name} tokens; nothing to predict.");
        if (device.type != DeviceType.CPU) loaded.Model.to(device);
        var windows = Windows(checked((int)text.Length), loaded.Config.MaxSeqLen).Select(w => ((long)w.Start, w.Length)).ToList();
        int seqLen = loaded.Config.MaxSeqLen;
        var natsByPosition = new double[Math.Max(1, seqLen - 1)];                      // index t − 1: predictions of position t
        var bytesByPosition = new long[natsByPosition.Length];
        var (nats, tokens, bytes) = NextTokenEvaluation.Run(loaded.Model, text, windows, batchSize, natsByPosition, bytesByPosition);
        double bpc = nats / bytes / Math.Log(2), loss = nats / tokens;
        var byPosition = Buckets(natsByPosition, bytesByPosition, bucketSize);
        string unit = CliTokenizer.Unit(tokenizer);
        if (parse.GetValue(jsonOption))
        {
            // JSON has no NaN: null, and the exit code says why
            static string Number(double x) => double.IsFinite(x) ? x.ToString("R", CultureInfo.InvariantCulture) : "null";
            static string Nullable(double? x) => x is double v ? Number(v) : "null";
            output.WriteLine($"{{\"bpc\":{Number(bpc)}, \"tokens\":{tokens}, \"bytes\":{bytes}, \"loss\":{Number(loss)}, \"tokenizer\":\"{tokenizer.Name}\", " +
                             $"\"bucket_size\":{bucketSize}, \"bpc_by_position\":[{string.Join(", ", byPosition.Select(Nullable))}]}}");
        }
        else
        {
            output.WriteLine($"bpc {bpc:F4} over {tokens:N0} predicted {unit} ({windows.Count:N0} windows of up to {loaded.Config.MaxSeqLen} {unit})" +
                             (tokenizer.Kind == TokenizerKind.Bytes ? "" : $" covering {bytes:N0} bytes") +
                             $"; loss {loss:F4} nats/token; with {loaded.Describe()} in {watch.Elapsed.TotalSeconds:F1} s");
            output.WriteLine($"bpc by position in the window (buckets of {bucketSize}): " + string.Join(", ", byPosition.Select((b, k) =>
                $"{k * bucketSize}–{Math.Min((k + 1) * bucketSize, seqLen) - 1} {(b is double v ? v.ToString("F3", CultureInfo.InvariantCulture) : "–")}")));
        }
        if (!double.IsFinite(bpc))
            throw new CliFailureException($"bpc is {bpc.ToString(CultureInfo.InvariantCulture)}: {loaded.Describe()} gives NaN or infinite outputs on this data.");
        return CliApp.Ok;
    }

    /// <summary>bpc of the predictions of positions [k·S, (k+1)·S) for each bucket k (null where no byte was predicted),
    /// from nats and bytes per predicted position (index t − 1 for position t).</summary>
    internal static double?[] Buckets(double[] natsByPosition, long[] bytesByPosition, int bucketSize)
    {
        int buckets = natsByPosition.Length / bucketSize + 1;                         // positions 1 … n → buckets 0 … n / S
        var nats = new double[buckets];
        var bytes = new long[buckets];
        for (int i = 0; i < natsByPosition.Length; i++)
        {
            nats[(i + 1) / bucketSize] += natsByPosition[i];
            bytes[(i + 1) / bucketSize] += bytesByPosition[i];
        }
        return [.. Enumerable.Range(0, buckets).Select(k => bytes[k] > 0 ? nats[k] / bytes[k] / Math.Log(2) : (double?)null)];
    }

    /// <summary>Windows as described in the command's help: starts k·(T−1), length min(T, N − start), while at least 2 bytes remain.</summary>
    internal static IEnumerable<(int Start, int Length)> Windows(int dataLength, int seqLen)
    {
        int stride = Math.Max(1, seqLen - 1);
        for (long start = 0; start < dataLength - 1; start += stride)
            yield return ((int)start, (int)Math.Min(seqLen, dataLength - start));
    }
}
