using System.Diagnostics;

namespace SparseAttention.Training;

/// <summary>
/// A <see cref="ByteCorpus"/> tokenized once, in memory: the training and validation parts are cut from the bytes first
/// (the same split for every tokenizer, so models of any vocabulary are evaluated on the same held-out text) and each
/// part is then tokenized on its own. Dispose to release the bytes (a memory-mapped file).
/// </summary>
public sealed class TokenCorpus : IDisposable
{
    /// <summary>The corpus as bytes, split into training and validation parts.</summary>
    public ByteCorpus Bytes { get; }
    /// <summary>The tokenizer of <see cref="Train"/> and <see cref="Validation"/>.</summary>
    public TextTokenizer Tokenizer { get; }
    /// <summary>Tokens of the training bytes.</summary>
    public TokenText Train { get; }
    /// <summary>Tokens of the validation bytes.</summary>
    public TokenText Validation { get; }
    /// <summary>Number of files read.</summary>
    public int Files => Bytes.Files;
    /// <summary>Wall-clock seconds spent tokenizing (0 for bytes: a view, no work).</summary>
    public double TokenizeSeconds { get; }

    private TokenCorpus(ByteCorpus bytes, TextTokenizer tokenizer, TokenText train, TokenText validation, double seconds)
    {
        Bytes = bytes;
        Tokenizer = tokenizer;
        Train = train;
        Validation = validation;
        TokenizeSeconds = seconds;
    }

    /// <summary>
    /// Reads <paramref name="path"/> as <see cref="ByteCorpus.Load"/> does (the last <paramref name="valFraction"/> of the
    /// bytes is validation) and tokenizes both parts with <paramref name="tokenizer"/>. Both parts must hold at least
    /// <paramref name="seqLen"/> + 1 tokens; otherwise an <see cref="ArgumentException"/> with ParamName "data".
    /// </summary>
    public static TokenCorpus Load(string path, double valFraction, int seqLen, TextTokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        var bytes = ByteCorpus.Load(path, valFraction, seqLen);
        try
        {
            var watch = Stopwatch.StartNew();
            TokenText train = tokenizer.Tokenize(bytes.Train), validation = tokenizer.Tokenize(bytes.Validation);
            double seconds = tokenizer.Kind == Model.TokenizerKind.Bytes ? 0 : watch.Elapsed.TotalSeconds;
            if (train.Length < seqLen + 1 || validation.Length < seqLen + 1)
                throw new ArgumentException($"data: {path} gives {train.Length} training and {validation.Length} validation {tokenizer.Name} tokens; " +
                                            $"with sequence length {seqLen} both parts need at least {seqLen + 1} tokens.", "data");
            return new TokenCorpus(bytes, tokenizer, train, validation, seconds);
        }
        catch
        {
            bytes.Dispose();
            throw;
        }
    }

    public void Dispose() => Bytes.Dispose();
}
