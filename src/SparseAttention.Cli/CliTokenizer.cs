using SparseAttention.Model;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>The tokenizer of a loaded model, as its configuration records it (checkpoints of earlier versions carry no
/// <c>tokenizer</c> key and read as bytes).</summary>
internal static class CliTokenizer
{
    /// <summary>The model's tokenizer; a model whose num_tokens is not that tokenizer's vocabulary size is refused (its ids
    /// could not be encoded or decoded), naming <paramref name="option"/>.</summary>
    public static TextTokenizer Of(LoadedModel loaded, string option = "--checkpoint")
    {
        var tokenizer = TextTokenizer.For(loaded.Config);
        if (loaded.Config.NumTokens != tokenizer.VocabularySize)
            throw new CliUsageException($"{option}: {loaded.Describe()} has num_tokens = {loaded.Config.NumTokens}, but its tokenizer {tokenizer.Name} has " +
                                        $"{tokenizer.VocabularySize} tokens; give a configuration whose tokenizer key matches the model (--config).");
        return tokenizer;
    }

    /// <summary>"bytes" for a byte-level model, "gpt2 tokens" otherwise — the unit of counts in messages.</summary>
    public static string Unit(TextTokenizer tokenizer) => tokenizer.Kind == TokenizerKind.Bytes ? "bytes" : $"{tokenizer.Name} tokens";
}
