namespace SparseAttention.Training;

/// <summary>
/// A text as token ids of one <see cref="TextTokenizer"/>, with the number of original bytes each token covers (for
/// bits per byte). Byte-level text is a view of its <see cref="ByteText"/> (id = byte; no copy, memory-mapped corpora
/// stay mapped); BPE text holds its ids. A <see cref="ByteText"/> or byte array converts implicitly, so
/// <c>new Trainer(config, options, bytes, bytes)</c> trains a byte-level model as before.
/// </summary>
public sealed class TokenText
{
    private readonly ByteText? bytes;
    private readonly int[]? ids;

    /// <summary>The tokenizer that produced the ids.</summary>
    public TextTokenizer Tokenizer { get; }
    /// <summary>Number of tokens.</summary>
    public long Length { get; }
    /// <summary>Original UTF-8 bytes covered by all the tokens (= <see cref="Length"/> for bytes).</summary>
    public long ByteCount { get; }

    private TokenText(TextTokenizer tokenizer, ByteText? bytes, int[]? ids, long length, long byteCount)
    {
        Tokenizer = tokenizer;
        this.bytes = bytes;
        this.ids = ids;
        Length = length;
        ByteCount = byteCount;
    }

    /// <summary>Byte-level text: the bytes themselves (not copied).</summary>
    public static implicit operator TokenText(ByteText bytes)
    {
        ArgumentNullException.ThrowIfNull(bytes);
        return new TokenText(TextTokenizer.For(Model.TokenizerKind.Bytes), bytes, null, bytes.Length, bytes.Length);
    }

    /// <summary>Byte-level text: the whole array (not copied).</summary>
    public static implicit operator TokenText(byte[] bytes) => (ByteText)bytes;

    /// <summary>Ids produced by <paramref name="tokenizer"/> (kept, not copied); each must be in [0, vocabulary size).</summary>
    public static TokenText FromIds(int[] ids, TextTokenizer tokenizer)
    {
        ArgumentNullException.ThrowIfNull(ids);
        ArgumentNullException.ThrowIfNull(tokenizer);
        long byteCount = 0;
        foreach (int id in ids)
        {
            if ((uint)id >= (uint)tokenizer.VocabularySize)
                throw new ArgumentException($"ids: token ids of {tokenizer.Name} must be in [0, {tokenizer.VocabularySize}), got {id}.", nameof(ids));
            byteCount += tokenizer.ByteLength(id);
        }
        return new TokenText(tokenizer, null, ids, ids.Length, byteCount);
    }

    /// <summary>The id of token <paramref name="index"/>.</summary>
    public int this[long index]
    {
        get
        {
            if ((ulong)index >= (ulong)Length) throw new ArgumentOutOfRangeException(nameof(index), $"must be in [0, {Length}), got {index}.");
            return ids is not null ? ids[index] : bytes![index];
        }
    }

    /// <summary>Feeds the ids (bytes for byte-level text, int32 ids otherwise) to <paramref name="hash"/>, in 16 MiB pieces.</summary>
    internal void AppendTo(System.Security.Cryptography.IncrementalHash hash)
    {
        if (ids is not null) { hash.AppendData(System.Runtime.InteropServices.MemoryMarshal.AsBytes(ids.AsSpan())); return; }
        for (long offset = 0; offset < bytes!.Length; offset += 1 << 24)
            hash.AppendData(bytes.Span(offset, (int)Math.Min(1 << 24, bytes.Length - offset)));
    }

    /// <summary>Original bytes covered by token <paramref name="index"/> (1 for bytes).</summary>
    public int ByteLength(long index) => ids is null ? 1 : Tokenizer.ByteLength(this[index]);
}
