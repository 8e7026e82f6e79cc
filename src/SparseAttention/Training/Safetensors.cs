using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>A safetensors file that cannot be used: malformed header, data out of range, unknown dtype, or tensors
/// that do not fit the model they are loaded into. The message says which tensor and what was expected.</summary>
public sealed class SafetensorsException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>One tensor's entry in a safetensors header.</summary>
/// <param name="Name">Tensor name (for a model: its state-dict key, e.g. <c>transformer.layers.0.attention.to_q.weight</c>).</param>
/// <param name="Dtype">Safetensors dtype name (<c>F32</c>, <c>F16</c>, <c>BF16</c>, <c>I64</c>, <c>BOOL</c>, …).</param>
/// <param name="Shape">Dimensions; empty for a scalar.</param>
/// <param name="Begin">First byte of the data, relative to the start of the data buffer.</param>
/// <param name="End">One past the last byte.</param>
public sealed record SafetensorsEntry(string Name, string Dtype, long[] Shape, long Begin, long End);

/// <summary>The contents of a safetensors file: its tensors (in data order) and its free-form string metadata.</summary>
public sealed class SafetensorsContents : IDisposable
{
    internal SafetensorsContents(IReadOnlyList<SafetensorsEntry> entries, IReadOnlyList<Tensor> tensors, IReadOnlyDictionary<string, string> metadata)
    {
        Entries = entries;
        Tensors = tensors;
        Metadata = metadata;
    }

    /// <summary>Header entries, ordered by their data offsets.</summary>
    public IReadOnlyList<SafetensorsEntry> Entries { get; }
    /// <summary>The tensors (CPU), in the order of <see cref="Entries"/>.</summary>
    public IReadOnlyList<Tensor> Tensors { get; }
    /// <summary>The <c>__metadata__</c> map (empty when the file has none).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>The tensor named <paramref name="name"/>, or null.</summary>
    public Tensor? this[string name]
    {
        get
        {
            for (int i = 0; i < Entries.Count; i++)
                if (Entries[i].Name == name) return Tensors[i];
            return null;
        }
    }

    public void Dispose()
    {
        foreach (var t in Tensors) t.Dispose();
    }
}

/// <summary>
/// Reads and writes the safetensors format (Hugging Face), so weights move to and from Python tools
/// (<c>safetensors.torch.load_file</c> / <c>save_file</c>, <c>transformers</c>).
/// </summary>
/// <remarks>
/// Layout: an unsigned 64-bit little-endian header length N; N bytes of UTF-8 JSON — an object mapping each tensor
/// name to <c>{"dtype", "shape", "data_offsets": [begin, end]}</c>, plus an optional <c>"__metadata__"</c> object of
/// string values; then the data buffer, every tensor's bytes in row-major little-endian order. Offsets are relative
/// to the buffer, contiguous and non-overlapping, and together cover it exactly. This writer puts the tensors in
/// the order given, pads the header with spaces to a multiple of 8 bytes (as the reference writer does) and writes
/// atomically (temporary file, then rename). The reader checks all of the above and rejects anything else.
/// Reading and writing stream through the file in pieces straight into / out of the tensors' memory (no copy of
/// the whole file, no 2 GB array limit).
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

    /// <summary>The dtype names this implementation reads and writes.</summary>
    public static IReadOnlyList<string> DtypeNames { get; } = Dtypes.Select(d => d.Name).ToArray();

    /// <summary>The safetensors name of <paramref name="type"/> (e.g. Float32 → <c>F32</c>).</summary>
    public static string DtypeName(ScalarType type)
    {
        foreach (var d in Dtypes) if (d.Type == type) return d.Name;
        throw new ArgumentException($"dtype {type} has no safetensors equivalent supported here ({string.Join(", ", DtypeNames)}).", nameof(type));
    }

    /// <summary>Writes <paramref name="tensors"/> (name → tensor, any device; written in the given order) and
    /// <paramref name="metadata"/> to <paramref name="path"/>, atomically, streaming (no size limit).</summary>
    public static void Write(string path, IEnumerable<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        Validate(list);
        Checkpoint.WriteAtomic(path, stream => WriteTo(stream, list, metadata));
    }

    /// <summary>The file's bytes for <paramref name="tensors"/> and <paramref name="metadata"/> (see <see cref="Write"/>).</summary>
    public static byte[] Serialize(IEnumerable<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var list = tensors.ToList();
        Validate(list);
        using var memory = new MemoryStream();
        WriteTo(memory, list, metadata);
        return memory.ToArray();
    }

    /// <summary>Bytes copied per piece between a tensor and a stream (a tensor larger than this — or than 2 GB — goes in pieces).
    /// Internal and settable so tests can exercise the piecewise path on small tensors.</summary>
    internal static long ChunkBytes { get; set; } = 1 << 26;

    private static void Validate(List<(string Name, Tensor Tensor)> list)
    {
        RequireLittleEndian();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, t) in list)
        {
            Check.That(!string.IsNullOrEmpty(name), "tensors", "tensor names must not be empty.");
            Check.That(name != MetadataKey, "tensors", $"'{MetadataKey}' is reserved for the metadata map.");
            Check.That(names.Add(name), "tensors", $"tensor name '{name}' appears twice.");
            ArgumentNullException.ThrowIfNull(t, name);
            DtypeName(t.dtype);
        }
    }

    /// <summary>Header (8-byte length, JSON padded with spaces to a multiple of 8), then each tensor's bytes in pieces.</summary>
    private static void WriteTo(Stream stream, List<(string Name, Tensor Tensor)> list, IReadOnlyDictionary<string, string>? metadata)
    {
        using var header = new MemoryStream();
        using (var w = new Utf8JsonWriter(header))
        {
            w.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                w.WriteStartObject(MetadataKey);
                foreach (var (key, value) in metadata)
                {
                    ArgumentNullException.ThrowIfNull(value, key);
                    w.WriteString(key, value);
                }
                w.WriteEndObject();
            }
            long offset = 0;
            foreach (var (name, t) in list)
            {
                long bytes = checked(t.numel() * SizeOf(t.dtype));
                w.WriteStartObject(name);
                w.WriteString("dtype", DtypeName(t.dtype));
                w.WriteStartArray("shape");
                foreach (long d in t.shape) w.WriteNumberValue(d);
                w.WriteEndArray();
                w.WriteStartArray("data_offsets");
                w.WriteNumberValue(offset);
                w.WriteNumberValue(offset + bytes);
                w.WriteEndArray();
                w.WriteEndObject();
                offset = checked(offset + bytes);
            }
            w.WriteEndObject();
        }
        int headerLength = (int)header.Length;
        int padded = (headerLength + 7) / 8 * 8;                     // data starts 8-byte aligned
        Span<byte> length = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(length, (ulong)padded);
        stream.Write(length);
        stream.Write(header.GetBuffer(), 0, headerLength);
        for (int i = headerLength; i < padded; i++) stream.WriteByte((byte)' ');
        foreach (var (_, t) in list)
        {
            if (t.numel() == 0) continue;
            using var scope = NewDisposeScope();
            var flat = t.detach().cpu().contiguous().reshape(-1);                           // (N)
            ForEachPiece(flat, piece => stream.Write(piece));
        }
    }

    /// <summary>Calls <paramref name="action"/> on consecutive pieces of at most <see cref="ChunkBytes"/> bytes of the
    /// contiguous 1-D CPU tensor <paramref name="flat"/> (each a view of its memory: reads and writes go to the tensor).</summary>
    private static void ForEachPiece(Tensor flat, SpanAction action)
    {
        long n = flat.numel(), per = Math.Max(1, Math.Min(ChunkBytes, int.MaxValue) / SizeOf(flat.dtype));
        for (long start = 0; start < n; start += per)
        {
            using var piece = flat.narrow(0, start, Math.Min(per, n - start));             // (≤ per)
            action(piece.bytes);
        }
    }

    private delegate void SpanAction(Span<byte> bytes);

    private static int SizeOf(ScalarType type)
    {
        foreach (var d in Dtypes) if (d.Type == type) return d.Size;
        throw new ArgumentException($"dtype {type} has no safetensors equivalent supported here ({string.Join(", ", DtypeNames)}).", nameof(type));
    }

    /// <summary>Reads and validates <paramref name="path"/>; throws <see cref="SafetensorsException"/> naming the file
    /// and the problem (see <see cref="Parse(byte[], string)"/>).</summary>
    public static SafetensorsContents Read(string path)
    {
        FileStream file;
        try { file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new SafetensorsException($"{path} does not exist.", e);
        }
        using (file) return Parse(file, path);
    }

    /// <summary>
    /// Parses a whole safetensors file. Checks: the 8-byte header length is within the file and at most
    /// <see cref="MaxHeaderLength"/>; the header is UTF-8 JSON, an object, with no duplicate names; metadata values
    /// are strings; each entry has exactly <c>dtype</c> (a known name), <c>shape</c> (non-negative integers) and
    /// <c>data_offsets</c> (begin ≤ end); shape × item size = end − begin; sorted by offset, the entries start at 0,
    /// neither overlap nor leave gaps, and end exactly at the end of the data buffer; BOOL bytes are 0 or 1.
    /// </summary>
    /// <param name="file">The file's bytes.</param>
    /// <param name="source">Name used in error messages (e.g. the path).</param>
    public static SafetensorsContents Parse(byte[] file, string source = "safetensors data")
    {
        ArgumentNullException.ThrowIfNull(file);
        using var stream = new MemoryStream(file, writable: false);
        return Parse(stream, source);
    }

    /// <summary>As <see cref="Parse(byte[], string)"/>, reading <paramref name="stream"/> (seekable, positioned at the
    /// file's start) piece by piece into the tensors: no copy of the file in memory, no 2 GB limit.</summary>
    public static SafetensorsContents Parse(Stream stream, string source)
    {
        ArgumentNullException.ThrowIfNull(stream);
        RequireLittleEndian();
        SafetensorsException Bad(string message, Exception? inner = null) => new($"{source}: {message}", inner);
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

        // The entries tile the buffer in this order, so the stream is read straight through, into each tensor's memory.
        var tensors = new List<Tensor>(ordered.Count);
        try
        {
            foreach (var e in ordered)
            {
                var type = Dtypes.First(d => d.Name == e.Dtype).Type;
                var t = empty(e.Shape, dtype: type);
                tensors.Add(t);
                if (e.End == e.Begin) continue;
                using var flat = t.view(-1);                                                    // (N), shares t's memory
                ForEachPiece(flat, piece =>
                {
                    stream.ReadExactly(piece);
                    if (type == ScalarType.Bool)
                        foreach (byte b in piece)
                            if (b > 1) throw Bad($"tensor '{e.Name}' is BOOL but holds the byte {b} (expected 0 or 1).");
                });
            }
        }
        catch
        {
            foreach (var t in tensors) t.Dispose();
            throw;
        }
        return new SafetensorsContents(ordered, tensors, metadata);
    }

    private static SafetensorsEntry ParseEntry(JsonProperty property, long bufferLength, Func<string, Exception?, SafetensorsException> bad)
    {
        string name = property.Name;
        SafetensorsException Bad(string message) => bad($"tensor '{name}': {message}", null);
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

    private static long[] Integers(JsonElement e, string what, Func<string, SafetensorsException> bad)
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

    /// <summary>Writes <paramref name="module"/>'s state dict (parameters and buffers by their dotted names) to
    /// <paramref name="path"/>; floating-point tensors are converted to <paramref name="floatType"/> when given
    /// (Float32, Float16 or BFloat16), other tensors keep their dtype.</summary>
    public static void SaveModel(nn.Module module, string path, IReadOnlyDictionary<string, string>? metadata = null, ScalarType? floatType = null)
    {
        ArgumentNullException.ThrowIfNull(module);
        if (floatType is ScalarType ft)
            Check.That(ft is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64, nameof(floatType),
                $"must be Float32, Float16, BFloat16 or Float64, got {ft}.");
        using var scope = NewDisposeScope();
        var tensors = module.state_dict()
            .Select(kv => (kv.Key, floatType is ScalarType f && kv.Value.is_floating_point() ? kv.Value.to(f) : kv.Value))
            .ToList();
        Write(path, tensors, metadata);
    }

    /// <summary>
    /// Loads <paramref name="path"/> into <paramref name="module"/>: every state-dict entry must be in the file with
    /// the same shape, and the file must hold nothing else (one error lists every missing, unexpected and
    /// mismatched tensor). Floating-point tensors are converted to the module's dtype (e.g. an F16 file into a
    /// float32 model); integer and bool tensors must match exactly. Returns the file's metadata.
    /// </summary>
    public static IReadOnlyDictionary<string, string> LoadModel(nn.Module module, string path)
    {
        ArgumentNullException.ThrowIfNull(module);
        using var contents = Read(path);
        LoadModel(module, contents, path);
        return contents.Metadata;
    }

    /// <summary>As <see cref="LoadModel(nn.Module, string)"/>, from already parsed <paramref name="contents"/>.</summary>
    public static void LoadModel(nn.Module module, SafetensorsContents contents, string source)
    {
        ArgumentNullException.ThrowIfNull(module);
        ArgumentNullException.ThrowIfNull(contents);
        var state = module.state_dict();
        var byName = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        for (int i = 0; i < contents.Entries.Count; i++) byName[contents.Entries[i].Name] = contents.Tensors[i];
        var missing = state.Keys.Where(k => !byName.ContainsKey(k)).ToList();
        var unexpected = byName.Keys.Where(k => !state.ContainsKey(k)).ToList();
        var mismatched = new List<string>();
        foreach (var (name, target) in state)
        {
            if (!byName.TryGetValue(name, out var t)) continue;
            if (!t.shape.SequenceEqual(target.shape))
                mismatched.Add($"{name} has shape [{string.Join(", ", t.shape)}] in the file, the model expects [{string.Join(", ", target.shape)}]");
            else if (t.dtype != target.dtype && !(t.is_floating_point() && target.is_floating_point()))
                mismatched.Add($"{name} is {DtypeName(t.dtype)} in the file, the model expects {DtypeName(target.dtype)}");
        }
        if (missing.Count + unexpected.Count + mismatched.Count > 0)
        {
            static string List(IReadOnlyList<string> items) =>
                string.Join(", ", items.Take(6)) + (items.Count > 6 ? $" and {items.Count - 6} more" : "");
            var parts = new List<string>();
            if (missing.Count > 0) parts.Add($"missing {missing.Count} tensor(s) the model needs: {List(missing)}");
            if (unexpected.Count > 0) parts.Add($"{unexpected.Count} unexpected tensor(s): {List(unexpected)}");
            if (mismatched.Count > 0) parts.Add($"{mismatched.Count} mismatched: {List(mismatched)}");
            throw new SafetensorsException($"{source} does not fit the model ({string.Join("; ", parts)}); was it written for another configuration?");
        }
        using var noGrad = no_grad();
        foreach (var (name, target) in state) target.copy_(byName[name]);
    }

    private static void RequireLittleEndian()
    {
        if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("safetensors I/O here assumes a little-endian machine.");
    }
}
