using System.CommandLine;
using System.Diagnostics;
using System.Text;
using SparseAttention.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn sample</c>: continues a prompt with a trained model, writing the text to stdout as it is generated (the
/// prompt first, then the bytes of each new token — a byte, or a BPE token's bytes — decoded as UTF-8 as soon as they
/// complete a character). The prompt is encoded with the tokenizer the checkpoint records.
/// </summary>
internal sealed class SampleCommand
{
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat), run folder (its newest checkpoint), .safetensors file or exported folder (model.safetensors + config.json).", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON for safetensors weights that carry none (or to override theirs)." };
    private readonly Option<string?> promptOption = new("--prompt") { HelpName = "TEXT", Description = "Text to continue (encoded with the model's tokenizer, at most max_seq_len tokens); without it the prompt is read from stdin." };
    private readonly Option<int> maxNewTokensOption = new("--max-new-tokens") { HelpName = "N", Description = "Tokens to generate (bytes for a byte-level model); once the context holds max_seq_len tokens its older half is dropped and the rest re-encoded.", DefaultValueFactory = _ => 200 };
    private readonly Option<double> temperatureOption = new("--temperature") { HelpName = "T", Description = "Divide the logits by T before sampling; 0 = greedy (always the most likely token).", DefaultValueFactory = _ => 1.0 };
    private readonly Option<int?> topKOption = new("--top-k") { HelpName = "K", Description = "Sample only among the K most likely tokens (K >= 1)." };
    private readonly Option<double?> topPOption = new("--top-p") { HelpName = "P", Description = "Nucleus sampling: only the smallest set of most likely tokens whose probability reaches P, in (0, 1]." };
    private readonly Option<ulong> seedOption = new("--seed") { HelpName = "N", Description = "Seed of the sampler: the same seed, model and options give the same text.", DefaultValueFactory = _ => 0UL };
    private readonly Option<int?> threadsOption = new("--threads") { HelpName = "N", Description = "libtorch intra-op threads (default: libtorch's choice)." };
    private readonly Option<string> deviceOption = CliDevice.CreateOption();
    private readonly Option<bool> noCacheOption = new("--no-cache") { Description = "Re-encode the whole context for every new token instead of decoding incrementally (slow; the same text — for comparison)." };

    /// <summary>Where the prompt is read from when --prompt is absent (tests set it); null = stdin when it is redirected.</summary>
    internal static TextReader? InputOverride;

    public static Command Create()
    {
        var self = new SampleCommand();
        var command = new Command("sample", "Generate text from a trained model, streaming it to stdout (statistics go to stderr).");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.promptOption, self.maxNewTokensOption, self.temperatureOption,
                     self.topKOption, self.topPOption, self.seedOption, self.threadsOption, self.deviceOption, self.noCacheOption })
            command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        var error = parse.InvocationConfiguration.Error;
        int maxNew = parse.GetValue(maxNewTokensOption);
        double temperature = parse.GetValue(temperatureOption);
        int? topK = parse.GetValue(topKOption);
        double? topP = parse.GetValue(topPOption);
        if (maxNew <= 0 || maxNew > Sampling.MaxNewTokensLimit)
            throw new CliUsageException($"--max-new-tokens must be in [1, {Sampling.MaxNewTokensLimit}], got {maxNew}.");
        if (!(temperature >= 0) || !double.IsFinite(temperature)) throw new CliUsageException($"--temperature must be finite and >= 0 (0 = greedy), got {temperature}.");
        if (topK is < 1) throw new CliUsageException($"--top-k must be >= 1, got {topK}.");
        if (topP is double p && !(p > 0 && p <= 1)) throw new CliUsageException($"--top-p must be in (0, 1], got {p}.");
        CliThreads.Apply(parse.GetValue(threadsOption));
        var device = CliDevice.Parse(parse.GetValue(deviceOption)!);

        string prompt = parse.GetValue(promptOption) ?? ReadStdin();
        var promptBytes = Encoding.UTF8.GetBytes(prompt);
        if (promptBytes.Length == 0) throw new CliUsageException("--prompt: the prompt is empty; give at least one character.");

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        var tokenizer = CliTokenizer.Of(loaded);
        string unit = CliTokenizer.Unit(tokenizer);
        int context = loaded.Config.MaxSeqLen;
        var promptIds = tokenizer.Encode(promptBytes);
        if (promptIds.Length > context)
            throw new CliUsageException($"--prompt: {promptIds.Length} {unit} is longer than the model's context (max_seq_len = {context} {unit}).");

        output.Write(prompt);
        output.Flush();
        var decoder = new UTF8Encoding(false, false).GetDecoder();   // invalid bytes → U+FFFD, never an exception
        var chars = new char[4];
        void Emit(Tensor next)                                        // (1) int64
        {
            var bytes = tokenizer.TokenBytes((int)next[0].item<long>());
            if (chars.Length < bytes.Length + 4) chars = new char[bytes.Length + 4];
            int n = decoder.GetChars(bytes, chars, flush: false);
            if (n > 0)
            {
                output.Write(chars, 0, n);
                output.Flush();
            }
        }

        var model = loaded.Model;
        if (device.type != DeviceType.CPU) model.to(device);
        bool cached = !parse.GetValue(noCacheOption) && model.SupportsCachedDecoding;
        var watch = Stopwatch.StartNew();
        using (var scope = NewDisposeScope())
        {
            var tokens = tensor(promptIds.Select(id => (long)id).ToArray(), new long[] { 1, promptIds.Length }, device: device);   // (1, Tp)
            ulong seed = parse.GetValue(seedOption);
            if (cached) Sampling.GenerateCached(model, tokens, maxNew, temperature, topK, topP, eos: null, seed: seed, onToken: Emit);
            else Sampling.Generate(model, tokens, maxNew, context, window => model.forward(window, null).Logits,
                temperature, topK, topP, eos: null, seed: seed, onToken: Emit);
        }
        int tail = decoder.GetChars([], 0, 0, chars, 0, flush: true);  // an unfinished character at the end → U+FFFD
        if (tail > 0) output.Write(chars, 0, tail);
        output.WriteLine();
        output.Flush();
        double seconds = watch.Elapsed.TotalSeconds;
        error.WriteLine($"sampled {maxNew} {unit} in {seconds:F1} s ({maxNew / Math.Max(seconds, 1e-9):F0} {unit}/s, {(cached ? "cached decoding" : "re-encoding the context per token")}) from {loaded.Describe()}");
        return CliApp.Ok;
    }

    private static string ReadStdin()
    {
        var reader = InputOverride ?? (Console.IsInputRedirected ? Console.In : null);
        if (reader is null) throw new CliUsageException("--prompt: no prompt given; pass --prompt TEXT or pipe the prompt into stdin.");
        return reader.ReadToEnd();
    }
}
