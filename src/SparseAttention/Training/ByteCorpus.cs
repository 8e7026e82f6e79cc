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
        string[] files;
        if (File.Exists(path)) files = [path];
        else if (Directory.Exists(path))
            files = Directory.EnumerateFiles(path, "*", SearchOption.AllDirectories)
                .Where(f => !Path.GetRelativePath(path, f).Split(Path.DirectorySeparatorChar).Any(p => p.StartsWith('.')))
                .OrderBy(f => f, StringComparer.Ordinal).ToArray();
        else throw new ArgumentException($"data: no such file or folder: {path}", "data");
        using var all = new MemoryStream();
        foreach (var f in files)
        {
            using var s = File.OpenRead(f);
            s.CopyTo(all);
        }
        var bytes = all.ToArray();
        if (bytes.Length == 0)
            throw new ArgumentException($"data: {path} is empty ({files.Length} file(s), 0 bytes); give a text file or a folder of text files.", "data");
        long valLen = (long)Math.Round(bytes.Length * valFraction);
        long trainLen = bytes.Length - valLen;
        if (valLen < seqLen + 1 || trainLen < seqLen + 1)
            throw new ArgumentException($"data: {path} has {bytes.Length} bytes; with validation fraction {valFraction} and sequence length {seqLen} " +
                $"both parts need at least {seqLen + 1} bytes (train {trainLen}, validation {valLen}).", "data");
        return new ByteCorpus(bytes[..(int)trainLen], bytes[(int)trainLen..], files.Length);
    }
}
