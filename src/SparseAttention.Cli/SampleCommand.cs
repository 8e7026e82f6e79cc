using System.CommandLine;
using System.Diagnostics;
using System.Text;
using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn sample</c>: continues a prompt with a trained byte-level model, writing the text to stdout as it is
/// generated (the prompt first, then each new byte decoded as UTF-8 as soon as it completes a character).
/// </summary>
internal sealed class SampleCommand
{
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat), run folder (its newest checkpoint), .safetensors file or exported folder (model.safetensors + config.json).", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON for safetensors weights that carry none (or to override theirs)." };
    private readonly Option<string?> promptOption = new("--prompt") { HelpName = "TEXT", Description = "Text to continue (UTF-8 bytes, at most max_seq_len of them); without it the prompt is read from stdin." };
    private readonly Option<int> maxNewTokensOption = new("--max-new-tokens") { HelpName = "N", Description = "Bytes to generate; once the context holds max_seq_len bytes its older half is dropped and the rest re-encoded.", DefaultValueFactory = _ => 200 };
    private readonly Option<double> temperatureOption = new("--temperature") { HelpName = "T", Description = "Divide the logits by T before sampling; 0 = greedy (always the most likely byte).", DefaultValueFactory = _ => 1.0 };
    private readonly Option<int?> topKOption = new("--top-k") { HelpName = "K", Description = "Sample only among the K most likely bytes (K >= 1)." };
    private readonly Option<double?> topPOption = new("--top-p") { HelpName = "P", Description = "Nucleus sampling: only the smallest set of most likely bytes whose probability reaches P, in (0, 1]." };
    private readonly Option<ulong> seedOption = new("--seed") { HelpName = "N", Description = "Seed of the sampler: the same seed, model and options give the same text.", DefaultValueFactory = _ => 0UL };
    private readonly Option<int?> threadsOption = new("--threads") { HelpName = "N", Description = "libtorch intra-op threads (default: libtorch's choice)." };
    private readonly Option<bool> noCacheOption = new("--no-cache") { Description = "Re-encode the whole context for every new byte instead of decoding incrementally (slow; the same text — for comparison)." };

    /// <summary>Where the prompt is read from when --prompt is absent (tests set it); null = stdin when it is redirected.</summary>
    internal static TextReader? InputOverride;

    public static Command Create()
    {
        var self = new SampleCommand();
        var command = new Command("sample", "Generate text from a trained model, streaming it to stdout (statistics go to stderr).");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.promptOption, self.maxNewTokensOption, self.temperatureOption,
                     self.topKOption, self.topPOption, self.seedOption, self.threadsOption, self.noCacheOption })
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

        string prompt = parse.GetValue(promptOption) ?? ReadStdin();
        var promptBytes = Encoding.UTF8.GetBytes(prompt);
        if (promptBytes.Length == 0) throw new CliUsageException("--prompt: the prompt is empty; give at least one character.");

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        int context = loaded.Config.MaxSeqLen;
        if (promptBytes.Length > context)
            throw new CliUsageException($"--prompt: {promptBytes.Length} bytes is longer than the model's context (max_seq_len = {context} bytes).");

        output.Write(prompt);
        output.Flush();
        var decoder = new UTF8Encoding(false, false).GetDecoder();   // invalid bytes → U+FFFD, never an exception
        var chars = new char[4];
        var one = new byte[1];
        void Emit(Tensor next)                                        // (1) int64
        {
            one[0] = (byte)next[0].item<long>();
            int n = decoder.GetChars(one, 0, 1, chars, 0, flush: false);
            if (n > 0)
            {
                output.Write(chars, 0, n);
                output.Flush();
            }
        }

        var model = loaded.Model;
        bool cached = !parse.GetValue(noCacheOption) && model.SupportsCachedDecoding;
        var watch = Stopwatch.StartNew();
        using (var scope = NewDisposeScope())
        {
            var tokens = tensor(promptBytes.Select(b => (long)b).ToArray(), new long[] { 1, promptBytes.Length });   // (1, Tp)
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
        error.WriteLine($"sampled {maxNew} bytes in {seconds:F1} s ({maxNew / Math.Max(seconds, 1e-9):F0} bytes/s, {(cached ? "cached decoding" : "re-encoding the context per byte")}) from {loaded.Describe()}");
        return CliApp.Ok;
    }

    private static string ReadStdin()
    {
        var reader = InputOverride ?? (Console.IsInputRedirected ? Console.In : null);
        if (reader is null) throw new CliUsageException("--prompt: no prompt given; pass --prompt TEXT or pipe the prompt into stdin.");
        return reader.ReadToEnd();
    }
}

/// <summary>The <c>--threads</c> option shared by the inference commands.</summary>
internal static class CliThreads
{
    public static void Apply(int? threads)
    {
        if (threads is not int n) return;
        if (n <= 0) throw new CliUsageException($"--threads must be > 0, got {n}.");
        set_num_threads(n);
    }
}
