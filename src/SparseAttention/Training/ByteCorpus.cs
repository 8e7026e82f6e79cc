namespace SparseAttention.Training;

/// <summary>A byte-level corpus (token id = byte value, vocabulary 256) split into training and validation parts.</summary>
public sealed class ByteCorpus
{
    /// <summary>Training bytes (the first part of the corpus).</summary>
    public byte[] Train { get; }
    /// <summary>Validation bytes (the last <c>valFraction</c> of the corpus).</summary>
    public byte[] Validation { get; }
    /// <summary>Number of files read.</summary>
    public int Files { get; }

    public ByteCorpus(byte[] train, byte[] validation, int files = 1)
    {
        Train = train;
        Validation = validation;
        Files = files;
    }

    /// <summary>
    /// Reads <paramref name="path"/>: one file, or every file under a folder (recursively, in ordinal path
    /// order, hidden files skipped), concatenated; the last <paramref name="valFraction"/> is validation.
    /// Both parts must hold at least <paramref name="seqLen"/> + 1 bytes.
    /// </summary>
    public static ByteCorpus Load(string path, double valFraction, int seqLen)
    {
        Check.That(valFraction > 0 && valFraction < 1, nameof(valFraction), $"must be in (0, 1), got {valFraction}.");
        Check.Positive(seqLen, nameof(seqLen));
        var (bytes, files) = ReadText(path);
        long valLen = (long)Math.Round(bytes.Length * valFraction);
        long trainLen = bytes.Length - valLen;
        if (valLen < seqLen + 1 || trainLen < seqLen + 1)
            throw new ArgumentException($"data: {path} has {bytes.Length} bytes; with validation fraction {valFraction} and sequence length {seqLen} " +
                $"both parts need at least {seqLen + 1} bytes (train {trainLen}, validation {valLen}).", "data");
        return new ByteCorpus(bytes[..(int)trainLen], bytes[(int)trainLen..], files);
    }

    /// <summary>
    /// The bytes of <paramref name="path"/> (a file, or every file under a folder, recursively, ordinal path order,
    /// hidden files skipped, concatenated) and the number of files. Throws <see cref="ArgumentException"/> (ParamName
    /// "data") when the path does not exist, holds no bytes, or does not look like text: any NUL byte, or more than 1 %
    /// of the bytes in invalid UTF-8 sequences.
    /// </summary>
    public static (byte[] Bytes, int Files) ReadText(string path)
    {
        string[] files;
        if (File.Exists(path)) files = [path];
        else if (Directory.Exists(path))
            files = Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories)
                .Where(f => !Path.GetRelativePath(path, f).Split(Path.DirectorySeparatorChar).Any(p => p.StartsWith('.')))
                .OrderBy(f => f, StringComparer.Ordinal).ToArray();
        else throw new ArgumentException($"data: no such file or folder: {path}", "data");
        // Sizes come from the file system and exactly that many bytes are read: a device or FIFO (size 0, endless
        // or blocking) is refused instead of read, and a file growing meanwhile cannot make the read run away.
        var sizes = files.Select(f => new FileInfo(f).Length).ToArray();
        if (files.Length == 1 && sizes[0] == 0)
            throw new ArgumentException($"data: {path} is empty (0 bytes) or not a regular file (a device or FIFO); give a text file or a folder of text files.", "data");
        long total = 0;
        foreach (long size in sizes) total = checked(total + size);
        if (total > Array.MaxLength)
            throw new ArgumentException($"data: {path} holds {total:N0} bytes; this reader takes at most {Array.MaxLength:N0} bytes per corpus.", "data");
        var bytes = new byte[total];
        long at = 0;
        for (int i = 0; i < files.Length; i++)
        {
            if (sizes[i] == 0) continue;                                   // empty files (and devices in a folder) add nothing
            using var s = new FileStream(files[i], FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
            try { s.ReadExactly(bytes, (int)at, (int)sizes[i]); }
            catch (EndOfStreamException) { throw new IOException($"{files[i]} became shorter while it was read."); }
            at += sizes[i];
        }
        int nul = Array.IndexOf(bytes, (byte)0);
        if (nul >= 0)
            throw new ArgumentException($"data: {path} looks binary (a NUL byte at offset {nul}); give UTF-8 text.", "data");
        // The decoder writes U+FFFD for each invalid sequence; the file's own U+FFFD characters (EF BF BD) are text.
        int invalid = System.Text.Encoding.UTF8.GetString(bytes).AsSpan().Count('\uFFFD') - CountEncodedReplacement(bytes);
        if (invalid > bytes.Length / 100)
            throw new ArgumentException($"data: {path} looks binary ({invalid} invalid UTF-8 sequences in {bytes.Length} bytes); give UTF-8 text.", "data");
        return (bytes, files.Length);
    }

    // U+FFFD written literally in the file (EF BF BD) is text, not an invalid sequence.
    private static int CountEncodedReplacement(byte[] bytes)
    {
        int count = 0;
        for (int i = bytes.AsSpan().IndexOf("\uFFFD"u8); i >= 0;)
        {
            count++;
            int next = bytes.AsSpan(i + 3).IndexOf("\uFFFD"u8);
            i = next < 0 ? -1 : i + 3 + next;
        }
        return count;
    }
}
