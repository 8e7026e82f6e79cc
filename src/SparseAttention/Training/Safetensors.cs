using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>One tensor's entry in a safetensors header.</summary>
/// <param name="Name">Tensor name (for a model: its state-dict key, e.g. <c>transformer.layers.0.attn.to_q.weight</c>).</param>
/// <param name="Dtype">Safetensors dtype name (<c>F32</c>, <c>F16</c>, <c>BF16</c>, <c>I64</c>, <c>BOOL</c>, …).</param>
/// <param name="Shape">Dimensions; empty for a scalar.</param>
/// <param name="Begin">First byte of the data, relative to the start of the data buffer.</param>
/// <param name="End">One past the last byte.</param>
public sealed record SafetensorsEntry(string Name, string Dtype, long[] Shape, long Begin, long End);

/// <summary>A validated safetensors header: the entries ordered by data offset, and the <c>__metadata__</c> map.</summary>
public sealed record SafetensorsHeader(IReadOnlyList<SafetensorsEntry> Entries, IReadOnlyDictionary<string, string> Metadata);

/// <summary>
/// Strict validation of safetensors headers (Hugging Face format). Reading and writing the tensors themselves go
/// through TorchSharp.PyBridge (<see cref="WeightFiles"/>); its reader checks none of the following, so this class
/// does, before PyBridge reads a byte of data.
/// </summary>
/// <remarks>
/// Layout: an unsigned 64-bit little-endian header length N; N bytes of UTF-8 JSON — an object mapping each tensor
/// name to <c>{"dtype", "shape", "data_offsets": [begin, end]}</c>, plus an optional <c>"__metadata__"</c> object of
/// string values; then the data buffer, every tensor's bytes in row-major little-endian order. Offsets are relative
/// to the buffer, contiguous and non-overlapping, and together cover it exactly.
/// What PyBridge 1.4.4 accepts silently (found by running the malformed cases of the tests through it): trailing
/// bytes, overlapping or gapped offsets, unknown fields, duplicate names (the last wins), non-string metadata and
/// BOOL bytes other than 0/1; it allocates each tensor from the header's shape before comparing it with the byte span
/// (so a corrupt shape can exhaust memory); the rest it rejects with messages that name neither the file nor, mostly,
/// the tensor (NotImplementedException, NullReferenceException, EndOfStreamException, JsonException).
/// </remarks>
public static class Safetensors
{
    /// <summary>Largest header accepted (the reference implementation's limit, 100 MB).</summary>
    public const long MaxHeaderLength = 100_000_000;
    /// <summary>Key of the free-form string map in the header.</summary>
    public const string MetadataKey = "__metadata__";

    private static readonly (string Name, ScalarType Type, int Size)[] Dtypes =
    [
        ("F64", ScalarType.Float64, 8), ("F32", ScalarType.Float32, 4), ("F16", ScalarType.Float16, 2), ("BF16", ScalarType.BFloat16, 2),
        ("I64", ScalarType.Int64, 8), ("I32", ScalarType.Int32, 4), ("I16", ScalarType.Int16, 2), ("I8", ScalarType.Int8, 1),
        ("U8", ScalarType.Byte, 1), ("BOOL", ScalarType.Bool, 1),
    ];

    /// <summary>The dtype names this validator knows (those PyBridge reads and writes).</summary>
    public static IReadOnlyList<string> DtypeNames { get; } = Dtypes.Select(d => d.Name).ToArray();

    /// <summary>The safetensors name of <paramref name="type"/> (e.g. Float32 → <c>F32</c>).</summary>
    public static string DtypeName(ScalarType type)
    {
        foreach (var d in Dtypes) if (d.Type == type) return d.Name;
        throw new ArgumentException($"dtype {type} has no safetensors equivalent supported here ({string.Join(", ", DtypeNames)}).", nameof(type));
    }

    /// <summary>
    /// Reads and validates the header of the safetensors file in <paramref name="stream"/> (seekable, positioned at the
    /// file's start; left positioned after the header). Checks: the 8-byte header length is within the file and at most
    /// <see cref="MaxHeaderLength"/>; the header is UTF-8 JSON, an object, with no duplicate names; metadata values
    /// are strings; each entry has exactly <c>dtype</c> (a known name), <c>shape</c> (non-negative integers) and
    /// <c>data_offsets</c> (begin ≤ end); shape × item size = end − begin; sorted by offset, the entries start at 0,
    /// neither overlap nor leave gaps, and end exactly at the end of the data buffer.
    /// Throws <see cref="WeightFileException"/> "<paramref name="source"/>: problem".
    /// </summary>
    public static SafetensorsHeader ReadHeader(Stream stream, string source)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors I/O here assumes a little-endian machine.");
        WeightFileException Bad(string message, Exception? inner = null) => new($"{source}: {message}", inner);
        long fileLength = stream.Length - stream.Position;
        if (fileLength < 8) throw Bad($"truncated: {fileLength} bytes, a safetensors file starts with an 8-byte header length.");
        Span<byte> lengthField = stackalloc byte[8];
        stream.ReadExactly(lengthField);
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(lengthField);
        if (headerLength > MaxHeaderLength) throw Bad($"header length {headerLength} exceeds the limit of {MaxHeaderLength} bytes (not a safetensors file, or corrupt).");
        if (headerLength > (ulong)(fileLength - 8)) throw Bad($"truncated: the header is {headerLength} bytes but only {fileLength - 8} bytes follow the length field.");
        if (headerLength < 2) throw Bad($"header length {headerLength} is too short for a JSON object.");
        var headerBytes = new byte[headerLength];
        stream.ReadExactly(headerBytes);
        if (headerBytes[0] != (byte)'{') throw Bad("the header does not start with '{' (not a safetensors file, or corrupt).");
        string headerText;
        try { headerText = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(headerBytes); }
        catch (DecoderFallbackException e) { throw Bad("the header is not valid UTF-8.", e); }

        JsonDocument doc;
        try { doc = JsonDocument.Parse(headerText); }
        catch (JsonException e) { throw Bad($"the header is not well-formed JSON: {e.Message}", e); }
        using var _ = doc;
        if (doc.RootElement.ValueKind != JsonValueKind.Object) throw Bad($"the header must be a JSON object, got {doc.RootElement.ValueKind}.");

        long bufferLength = fileLength - 8 - (long)headerLength;
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        var entries = new List<SafetensorsEntry>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var property in doc.RootElement.EnumerateObject())
        {
            if (!seen.Add(property.Name)) throw Bad($"the header names '{property.Name}' twice.");
            if (property.Name == MetadataKey)
            {
                if (property.Value.ValueKind != JsonValueKind.Object) throw Bad($"'{MetadataKey}' must be an object of strings, got {property.Value.ValueKind}.");
                foreach (var m in property.Value.EnumerateObject())
                {
                    if (m.Value.ValueKind != JsonValueKind.String) throw Bad($"'{MetadataKey}'.'{m.Name}' must be a string, got {m.Value.ValueKind}.");
                    if (!metadata.TryAdd(m.Name, m.Value.GetString()!)) throw Bad($"'{MetadataKey}' names '{m.Name}' twice.");
                }
                continue;
            }
            entries.Add(ParseEntry(property, bufferLength, Bad));
        }

        // Sorted by offset, the entries must tile the buffer exactly: [0, e1), [e1, e2), ..., [.., bufferLength).
        var ordered = entries.OrderBy(e => e.Begin).ThenBy(e => e.End).ToList();
        long expected = 0;
        string previous = "the start of the data buffer";
        foreach (var e in ordered)
        {
            if (e.Begin < expected) throw Bad($"tensor '{e.Name}' (bytes {e.Begin}..{e.End}) overlaps {previous}, which ends at byte {expected}.");
            if (e.Begin > expected) throw Bad($"bytes {expected}..{e.Begin} of the data buffer belong to no tensor (gap before '{e.Name}').");
            expected = e.End;
            previous = $"tensor '{e.Name}'";
        }
        if (expected != bufferLength)
            throw Bad($"the tensors cover {expected} bytes but the data buffer holds {bufferLength} bytes (truncated, or trailing data).");
        return new SafetensorsHeader(ordered, metadata);
    }

    /// <summary>Throws when a BOOL tensor read from <paramref name="source"/> holds a byte other than 0 or 1 (PyBridge copies
    /// the bytes as they are, and libtorch's behaviour on such booleans is undefined).</summary>
    internal static void CheckBoolBytes(string name, Tensor t, string source)
    {
        if (t.dtype != ScalarType.Bool || t.numel() == 0) return;
        foreach (byte b in t.bytes)                                   // PyBridge's tensors are fresh and contiguous
            if (b > 1) throw new WeightFileException($"{source}: tensor '{name}' is BOOL but holds the byte {b} (expected 0 or 1).");
    }

    private static SafetensorsEntry ParseEntry(JsonProperty property, long bufferLength, Func<string, Exception?, WeightFileException> bad)
    {
        string name = property.Name;
        WeightFileException Bad(string message) => bad($"tensor '{name}': {message}", null);
        var v = property.Value;
        if (v.ValueKind != JsonValueKind.Object) throw Bad($"expected an object with dtype, shape and data_offsets, got {v.ValueKind}.");
        string? dtype = null;
        long[]? shape = null, offsets = null;
        foreach (var field in v.EnumerateObject())
        {
            switch (field.Name)
            {
                case "dtype":
                    if (field.Value.ValueKind != JsonValueKind.String) throw Bad("dtype must be a string.");
                    dtype = field.Value.GetString();
                    break;
                case "shape": shape = Integers(field.Value, "shape", Bad); break;
                case "data_offsets": offsets = Integers(field.Value, "data_offsets", Bad); break;
                default: throw Bad($"unexpected field '{field.Name}' (expected dtype, shape, data_offsets).");
            }
        }
        if (dtype is null || shape is null || offsets is null)
            throw Bad($"missing {string.Join(", ", new[] { dtype is null ? "dtype" : null, shape is null ? "shape" : null, offsets is null ? "data_offsets" : null }.OfType<string>())}.");
        int size = Dtypes.FirstOrDefault(d => d.Name == dtype).Size;
        if (size == 0) throw Bad($"unknown dtype '{dtype}'; this reader knows {string.Join(", ", DtypeNames)}.");
        if (offsets.Length != 2) throw Bad($"data_offsets must be [begin, end], got {offsets.Length} numbers.");
        long begin = offsets[0], end = offsets[1];
        if (begin > end) throw Bad($"data_offsets [{begin}, {end}] end before they begin.");
        if (end > bufferLength) throw Bad($"data_offsets [{begin}, {end}] run past the end of the data buffer ({bufferLength} bytes; file truncated?).");
        long bytes = size;
        try { foreach (long d in shape) bytes = checked(bytes * d); }
        catch (OverflowException) { throw Bad($"shape [{string.Join(", ", shape)}] is too large."); }
        if (bytes != end - begin)
            throw Bad($"shape [{string.Join(", ", shape)}] of {dtype} needs {bytes} bytes but data_offsets [{begin}, {end}] span {end - begin}.");
        return new SafetensorsEntry(name, dtype, shape, begin, end);
    }

    private static long[] Integers(JsonElement e, string what, Func<string, WeightFileException> bad)
    {
        if (e.ValueKind != JsonValueKind.Array) throw bad($"{what} must be an array of integers, got {e.ValueKind}.");
        var result = new List<long>();
        foreach (var x in e.EnumerateArray())
        {
            if (x.ValueKind != JsonValueKind.Number || !x.TryGetInt64(out long n) || n < 0)
                throw bad($"{what} must hold non-negative integers, got {x.GetRawText()}.");
            result.Add(n);
        }
        return result.ToArray();
    }
}
