namespace SparseAttention.Training;

/// <summary>A byte-level corpus (token id = byte value, vocabulary 256) split into training and validation parts.
/// A single file larger than <see cref="MapAbove"/> bytes is memory-mapped instead of read (no 2 GB array limit);
/// dispose the corpus to unmap it.</summary>
public sealed class ByteCorpus : IDisposable
{
    private readonly IDisposable? owner;

    /// <summary>Training bytes (the first part of the corpus).</summary>
    public ByteText Train { get; }
    /// <summary>Validation bytes (the last <c>valFraction</c> of the corpus).</summary>
    public ByteText Validation { get; }
    /// <summary>Number of files read.</summary>
    public int Files { get; }

    public ByteCorpus(ByteText train, ByteText validation, int files = 1) : this(train, validation, files, null) { }

    private ByteCorpus(ByteText train, ByteText validation, int files, IDisposable? owner)
    {
        Train = train;
        Validation = validation;
        Files = files;
        this.owner = owner;
    }

    /// <summary>Files larger than this are memory-mapped (1 GB; internal and settable so tests can map small files).</summary>
    internal static long MapAbove { get; set; } = 1L << 30;

    /// <summary>Bytes checked per piece when a mapped file is checked for text.</summary>
    internal static int CheckPiece { get; set; } = 1 << 24;

    public void Dispose() => owner?.Dispose();

    /// <summary>
    /// Reads <paramref name="path"/>: one file, or every file under a folder (recursively, in ordinal path
    /// order, hidden files skipped), concatenated; the last <paramref name="valFraction"/> is validation.
    /// Both parts must hold at least <paramref name="seqLen"/> + 1 bytes.
    /// </summary>
    public static ByteCorpus Load(string path, double valFraction, int seqLen)
    {
        Check.That(valFraction > 0 && valFraction < 1, nameof(valFraction), $"must be in (0, 1), got {valFraction}.");
        Check.Positive(seqLen, nameof(seqLen));
        ByteText all;
        IDisposable? owner = null;
        int files = 1;
        if (File.Exists(path) && new FileInfo(path).Length is long size && size > MapAbove)
        {
            all = ByteText.Map(path, size, out owner);
            try
            {
                var check = new TextCheck();
                for (long at = 0; at < size; at += CheckPiece)
                {
                    int n = (int)Math.Min(CheckPiece, size - at);
                    check.Add(all.Span(at, n), last: at + n == size);
                }
                check.Require(path);
            }
            catch
            {
                owner.Dispose();
                throw;
            }
        }
        else
        {
            var (bytes, count) = ReadText(path);
            (all, files) = (bytes, count);
        }
        long valLen = (long)Math.Round(all.Length * valFraction);
        long trainLen = all.Length - valLen;
        if (valLen < seqLen + 1 || trainLen < seqLen + 1)
        {
            owner?.Dispose();
            throw new ArgumentException($"data: {path} has {all.Length} bytes; with validation fraction {valFraction} and sequence length {seqLen} " +
                $"both parts need at least {seqLen + 1} bytes (train {trainLen}, validation {valLen}).", "data");
        }
        return new ByteCorpus(all.Slice(0, trainLen), all.Slice(trainLen, valLen), files, owner);
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
            throw new ArgumentException($"data: {path} holds {total:N0} bytes; a folder is read into memory, at most {Array.MaxLength:N0} bytes (a single file of any size is memory-mapped).", "data");
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
        if (bytes.Length == 0)
            throw new ArgumentException($"data: {path} is empty ({files.Length} file(s), 0 bytes); give a text file or a folder of text files.", "data");
        var check = new TextCheck();
        check.Add(bytes, last: true);
        check.Require(path);
        return (bytes, files.Length);
    }
}
