using System.IO.MemoryMappedFiles;
using System.Text;

namespace SparseAttention.Training;

/// <summary>
/// Read-only bytes addressed by 64-bit offsets: an array, or a window of a memory-mapped file (for corpora larger
/// than an array can hold). An array converts implicitly, so <c>new Trainer(config, options, bytes, bytes)</c> works.
/// </summary>
public sealed unsafe class ByteText
{
    private readonly byte[]? array;
    private readonly Mapping? mapping;
    private readonly long start;

    /// <summary>Number of bytes.</summary>
    public long Length { get; }

    private ByteText(byte[]? array, Mapping? mapping, long start, long length)
    {
        this.array = array;
        this.mapping = mapping;
        this.start = start;
        Length = length;
    }

    /// <summary>The whole of <paramref name="bytes"/> (not copied).</summary>
    public static implicit operator ByteText(byte[] bytes)
    {
        ArgumentNullException.ThrowIfNull(bytes);
        return new ByteText(bytes, null, 0, bytes.Length);
    }

    /// <summary>The byte at <paramref name="index"/>.</summary>
    public byte this[long index]
    {
        get
        {
            if ((ulong)index >= (ulong)Length) throw new ArgumentOutOfRangeException(nameof(index), $"must be in [0, {Length}), got {index}.");
            return array is not null ? array[start + index] : mapping!.Pointer[start + index];
        }
    }

    /// <summary><paramref name="length"/> bytes from <paramref name="offset"/> (a view, not a copy).</summary>
    public ByteText Slice(long offset, long length)
    {
        if (offset < 0 || length < 0 || offset > Length - length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, {offset} + {length}) is outside [0, {Length}).");
        return new ByteText(array, mapping, start + offset, length);
    }

    /// <summary>Bytes [offset, offset + span length) as a span (at most 2 GB at a time).</summary>
    public ReadOnlySpan<byte> Span(long offset, int length)
    {
        if (offset < 0 || length < 0 || offset > Length - length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, {offset} + {length}) is outside [0, {Length}).");
        return array is not null ? array.AsSpan((int)(start + offset), length) : new ReadOnlySpan<byte>(mapping!.Pointer + start + offset, length);
    }

    /// <summary>A copy as an array (at most <see cref="Array.MaxLength"/> bytes).</summary>
    public byte[] ToArray() => Span(0, checked((int)Length)).ToArray();

    /// <summary>Maps <paramref name="path"/> read-only; the mapping lives until <paramref name="owner"/> is disposed.</summary>
    internal static ByteText Map(string path, long length, out IDisposable owner)
    {
        var mapping = new Mapping(path, length);
        owner = mapping;
        return new ByteText(null, mapping, 0, length);
    }

    private sealed class Mapping : IDisposable
    {
        private readonly MemoryMappedFile file;
        private readonly MemoryMappedViewAccessor view;
        public readonly byte* Pointer;

        public Mapping(string path, long length)
        {
            file = MemoryMappedFile.CreateFromFile(path, FileMode.Open, null, 0, MemoryMappedFileAccess.Read);
            view = file.CreateViewAccessor(0, length, MemoryMappedFileAccess.Read);
            byte* p = null;
            view.SafeMemoryMappedViewHandle.AcquirePointer(ref p);
            Pointer = p + view.PointerOffset;
        }

        public void Dispose()
        {
            view.SafeMemoryMappedViewHandle.ReleasePointer();
            view.Dispose();
            file.Dispose();
        }
    }
}

/// <summary>Checks that bytes look like UTF-8 text, fed in pieces (so a file of any size is checked without being
/// held in one array): no NUL byte, and at most 1 % of the bytes in invalid UTF-8 sequences.</summary>
internal sealed class TextCheck
{
    private readonly CountingFallback fallback = new();
    private readonly Decoder decoder;
    private readonly char[] chars = new char[1 << 16];
    private long seen;

    public TextCheck()
    {
        decoder = new UTF8Encoding(false, false).GetDecoder();
        decoder.Fallback = fallback;
    }

    /// <summary>Offset of the first NUL byte, or −1.</summary>
    public long FirstNul { get; private set; } = -1;

    /// <summary>Invalid UTF-8 sequences so far.</summary>
    public long Invalid => fallback.Count;

    /// <summary>Feeds the next piece; <paramref name="last"/> flushes an incomplete sequence at the end.</summary>
    public void Add(ReadOnlySpan<byte> piece, bool last)
    {
        if (FirstNul < 0 && piece.IndexOf((byte)0) is int nul and >= 0) FirstNul = seen + nul;
        seen += piece.Length;
        while (true)
        {
            decoder.Convert(piece, chars, last, out int used, out _, out bool completed);
            piece = piece[used..];
            if (piece.IsEmpty && (completed || !last)) break;
        }
    }

    /// <summary>Throws the ArgumentException (ParamName "data") of <see cref="ByteCorpus.ReadText"/> when the bytes are not text.</summary>
    public void Require(string path)
    {
        if (FirstNul >= 0)
            throw new ArgumentException($"data: {path} looks binary (a NUL byte at offset {FirstNul}); give UTF-8 text.", "data");
        if (Invalid > seen / 100)
            throw new ArgumentException($"data: {path} looks binary ({Invalid} invalid UTF-8 sequences in {seen} bytes); give UTF-8 text.", "data");
    }

    /// <summary>Counts invalid sequences (each one would become one U+FFFD).</summary>
    private sealed class CountingFallback : DecoderFallback
    {
        public long Count;
        public override int MaxCharCount => 1;
        public override DecoderFallbackBuffer CreateFallbackBuffer() => new Buffer(this);

        private sealed class Buffer(CountingFallback owner) : DecoderFallbackBuffer
        {
            private bool pending;
            public override int Remaining => pending ? 1 : 0;
            public override bool Fallback(byte[] bytesUnknown, int index)
            {
                owner.Count++;
                pending = true;
                return true;
            }
            public override char GetNextChar()
            {
                if (!pending) return '\0';
                pending = false;
                return '\uFFFD';
            }
            public override bool MovePrevious() => false;
        }
    }
}
