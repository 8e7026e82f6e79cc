using System.Collections;
using System.Text.Json;
using TorchSharp.PyBridge;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>A weights file that cannot be used: malformed, truncated, not a state dict, or tensors that do not fit the
/// model they are loaded into. The message is one line that names the file and the problem.</summary>
public sealed class WeightFileException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>How a state dict is stored on disk.</summary>
public enum WeightFormat
{
    /// <summary>safetensors (<c>.safetensors</c>): header JSON + raw little-endian data.</summary>
    Safetensors,
    /// <summary>PyTorch's <c>torch.save</c> zip format (<c>.pt</c>, <c>.pth</c>, <c>.bin</c>) holding a <c>state_dict</c>.</summary>
    PyTorch,
}

/// <summary>A state dict read from weight files: CPU tensors by name, in file order where the format has one.</summary>
public sealed class StateDict(IReadOnlyList<(string Name, Tensor Tensor)> tensors, IReadOnlyDictionary<string, string> metadata, string source) : IDisposable
{
    private readonly Dictionary<string, Tensor> byName = tensors.ToDictionary(t => t.Name, t => t.Tensor, StringComparer.Ordinal);

    /// <summary>Tensors in the order the file lists them.</summary>
    public IReadOnlyList<(string Name, Tensor Tensor)> Tensors { get; } = tensors;
    /// <summary>Tensors by name.</summary>
    public IReadOnlyDictionary<string, Tensor> ByName => byName;
    /// <summary>A single safetensors file's <c>__metadata__</c> map; empty for other sources.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; } = metadata;
    /// <summary>The file (or index) read, for messages.</summary>
    public string Source { get; } = source;

    public void Dispose()
    {
        foreach (var (_, t) in Tensors) t.Dispose();
    }
}

/// <summary>
/// Reads and writes state dicts as PyTorch and Hugging Face tools store them, through TorchSharp.PyBridge:
/// <c>torch.save</c> files (<c>.pt</c>/<c>.pth</c>/<c>.bin</c>), safetensors files, and sharded checkpoints
/// (<c>model.safetensors.index.json</c> / <c>pytorch_model.bin.index.json</c> + shards). Safetensors headers are
/// validated strictly first (<see cref="Safetensors.ReadHeader"/>); every error is a one-line
/// <see cref="WeightFileException"/> naming the file.
/// </summary>
/// <remarks>
/// Index files follow the Hugging Face layout: <c>{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}</c>,
/// shards beside the index. PyBridge's own <c>load_checkpoint</c> loads shards straight into a module without
/// checking that a shard holds what the index says; reading the index here lets a sharded state dict be converted
/// (e.g. from the PyTorch routing-transformer layout) and lets a bad index be reported precisely.
/// Writes are atomic (temporary file, then rename).
/// </remarks>
public static class WeightFiles
{
    /// <summary>Hugging Face file names: single safetensors file, single <c>torch.save</c> file, index suffix.</summary>
    public const string SafetensorsFileName = "model.safetensors", PyTorchFileName = "pytorch_model.bin", IndexSuffix = ".index.json";

    /// <summary>The format of <paramref name="path"/> from its name (an index: the format of its shards).</summary>
    /// <exception cref="ArgumentException">The name has no known weights extension.</exception>
    public static WeightFormat FormatOf(string path)
    {
        string name = Path.GetFileName(path);
        if (name.EndsWith(IndexSuffix, StringComparison.OrdinalIgnoreCase)) name = name[..^IndexSuffix.Length];
        string ext = Path.GetExtension(name).ToLowerInvariant();
        return ext switch
        {
            ".safetensors" => WeightFormat.Safetensors,
            ".pt" or ".pth" or ".bin" => WeightFormat.PyTorch,
            _ => throw new ArgumentException($"expected a .safetensors, .pt, .pth or .bin file (or its {IndexSuffix}), got '{path}'.", nameof(path)),
        };
    }

    /// <summary>True when <paramref name="path"/>'s name is one of the weights formats (see <see cref="FormatOf"/>).</summary>
    public static bool HasWeightsName(string path)
    {
        try { FormatOf(path); return true; }
        catch (ArgumentException) { return false; }
    }

    /// <summary>The weights of a Hugging Face-style folder, in the order <c>from_pretrained</c> prefers them
    /// (model.safetensors, its index, pytorch_model.bin, its index); null when there are none.</summary>
    public static string? FindInFolder(string folder)
    {
        foreach (var name in new[] { SafetensorsFileName, SafetensorsFileName + IndexSuffix, PyTorchFileName, PyTorchFileName + IndexSuffix })
        {
            string path = Path.Combine(folder, name);
            if (File.Exists(path)) return path;
        }
        return null;
    }

    /// <summary>Reads a weights file, an index of shards, or a folder holding one (see <see cref="FindInFolder"/>).</summary>
    public static StateDict Read(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        if (Directory.Exists(path))
            path = FindInFolder(path) ?? throw new WeightFileException($"{path} holds no {SafetensorsFileName}, {PyTorchFileName} or {IndexSuffix} index.");
        if (!File.Exists(path)) throw new WeightFileException($"{path} does not exist.");
        WeightFormat format;
        try { format = FormatOf(path); }
        catch (ArgumentException e) { throw new WeightFileException($"{path}: {e.Message}", e); }
        if (path.EndsWith(IndexSuffix, StringComparison.OrdinalIgnoreCase)) return ReadSharded(path, format);
        var (tensors, metadata) = ReadFile(path, format);
        return new StateDict(tensors, metadata, path);
    }

    private static (List<(string, Tensor)> Tensors, IReadOnlyDictionary<string, string> Metadata) ReadFile(string path, WeightFormat format)
    {
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        if (format == WeightFormat.Safetensors)
        {
            var header = Safetensors.ReadHeader(stream, path);
            stream.Position = 0;
            Dictionary<string, Tensor> loaded;
            try { loaded = TorchSharp.PyBridge.Safetensors.LoadStateDict(stream, leaveOpen: true); }
            catch (Exception e) when (e is not OutOfMemoryException) { throw new WeightFileException($"{path}: PyBridge could not read the tensors: {FirstLine(e.Message)}", e); }
            var list = header.Entries.Select(e => (e.Name, loaded[e.Name])).ToList();
            try { foreach (var (name, t) in list) Safetensors.CheckBoolBytes(name, t, path); }
            catch { foreach (var (_, t) in list) t.Dispose(); throw; }
            return (list, header.Metadata);
        }
        Hashtable table;
        try { table = PyTorchUnpickler.UnpickleStateDict(stream, leaveOpen: true); }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new WeightFileException($"{path}: not a PyTorch state_dict in torch.save's zip format ({e.GetType().Name}: {FirstLine(e.Message)}).", e);
        }
        var result = new List<(string, Tensor)>();
        string? problem = null;
        foreach (DictionaryEntry entry in table)
        {
            if (entry.Key is string name && entry.Value is Tensor t) result.Add((name, t));
            else problem ??= $"entry '{entry.Key}' is a {entry.Value?.GetType().Name ?? "null"}, not a tensor (save model.state_dict(), not the model or a training state)";
        }
        if (problem is not null)
        {
            foreach (var (_, t) in result) t.Dispose();
            throw new WeightFileException($"{path}: {problem}.");
        }
        result.Sort((a, b) => string.CompareOrdinal(a.Item1, b.Item1));                // a pickled dict comes back unordered
        return (result, new Dictionary<string, string>());
    }

    /// <summary>Reads an index and its shards; checks that the index is well formed, that every shard exists and holds
    /// exactly the tensors the index maps to it.</summary>
    private static StateDict ReadSharded(string indexPath, WeightFormat format)
    {
        WeightFileException Bad(string message, Exception? inner = null) => new($"{indexPath}: {message}", inner);
        Dictionary<string, string> weightMap;
        try
        {
            using var doc = JsonDocument.Parse(File.ReadAllText(indexPath));
            if (doc.RootElement.ValueKind != JsonValueKind.Object || !doc.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
                throw Bad("not a sharded-checkpoint index: expected a JSON object with a \"weight_map\" object (tensor name → shard file).");
            weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (var p in map.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.String) throw Bad($"weight_map['{p.Name}'] must be a shard file name, got {p.Value.ValueKind}.");
                string shard = p.Value.GetString()!;
                if (shard.Length == 0 || shard != Path.GetFileName(shard) || shard is "." or "..")
                    throw Bad($"weight_map['{p.Name}'] = '{shard}' is not a file name beside the index.");
                if (!weightMap.TryAdd(p.Name, shard)) throw Bad($"weight_map names '{p.Name}' twice.");
            }
        }
        catch (JsonException e) { throw Bad($"not well-formed JSON: {FirstLine(e.Message)}", e); }
        if (weightMap.Count == 0) throw Bad("weight_map is empty.");

        string folder = Path.GetDirectoryName(Path.GetFullPath(indexPath))!;
        var tensors = new List<(string, Tensor)>();
        try
        {
            foreach (var shard in weightMap.Values.Distinct().Order(StringComparer.Ordinal))
            {
                string shardPath = Path.Combine(folder, shard);
                if (!File.Exists(shardPath)) throw Bad($"shard {shard} (listed for '{weightMap.First(kv => kv.Value == shard).Key}') does not exist.");
                var (read, _) = ReadFile(shardPath, FormatOf(shardPath) == format ? format : throw Bad($"shard {shard} is not a {format} file like the index."));
                tensors.AddRange(read);
                var stray = read.Select(t => t.Item1).FirstOrDefault(n => !weightMap.TryGetValue(n, out var s) || s != shard);
                if (stray is not null)
                    throw new WeightFileException($"{shardPath}: holds '{stray}', which the index {Path.GetFileName(indexPath)} " +
                        (weightMap.TryGetValue(stray, out var other) ? $"maps to {other}." : "does not list."));
                var held = read.Select(t => t.Item1).ToHashSet(StringComparer.Ordinal);
                var absent = weightMap.Where(kv => kv.Value == shard && !held.Contains(kv.Key)).Select(kv => kv.Key).FirstOrDefault();
                if (absent is not null) throw Bad($"maps '{absent}' to {shard}, which does not hold it.");
            }
        }
        catch
        {
            foreach (var (_, t) in tensors) t.Dispose();
            throw;
        }
        return new StateDict(tensors, new Dictionary<string, string>(), indexPath);
    }

    /// <summary>Writes <paramref name="tensors"/> to one file, in the format its name says (<see cref="FormatOf"/>),
    /// through PyBridge, atomically. Names must be unique and non-empty.</summary>
    public static void Write(string path, IReadOnlyList<(string Name, Tensor Tensor)> tensors)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        var format = FormatOf(path);
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, t) in tensors)
        {
            Check.That(!string.IsNullOrEmpty(name) && name != Safetensors.MetadataKey, nameof(tensors), $"tensor names must be non-empty and not '{Safetensors.MetadataKey}', got '{name}'.");
            Check.That(names.Add(name), nameof(tensors), $"tensor name '{name}' appears twice.");
            ArgumentNullException.ThrowIfNull(t, name);
            if (format == WeightFormat.Safetensors) Safetensors.DtypeName(t.dtype);
        }
        using var scope = NewDisposeScope();
        // PyBridge copies each tensor's memory as it is: hand it contiguous CPU tensors, in the order given.
        var dict = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (name, t) in tensors) dict[name] = t.detach().cpu().contiguous();
        AtomicFile.Write(path, stream =>
        {
            if (format == WeightFormat.Safetensors) TorchSharp.PyBridge.Safetensors.SaveStateDict(stream, dict, leaveOpen: true);
            else PyTorchPickler.PickleStateDict(stream, dict, leaveOpen: true);
        });
    }

    /// <summary>
    /// Writes <paramref name="tensors"/> into <paramref name="folder"/> the way Hugging Face's <c>save_pretrained</c>
    /// names them: one <c>model.safetensors</c> / <c>pytorch_model.bin</c> when the data fits
    /// <paramref name="maxShardBytes"/>, else shards <c>model-00001-of-0000N.safetensors</c> (… <c>.bin</c>) of at most that
    /// size (a larger single tensor gets a shard of its own) plus the <c>.index.json</c>. Weights files of an earlier
    /// export into the folder (either format, single or sharded) are removed first. Returns the files written (index last).
    /// </summary>
    public static IReadOnlyList<string> WriteFolder(string folder, WeightFormat format, IReadOnlyList<(string Name, Tensor Tensor)> tensors, long maxShardBytes)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        Check.That(maxShardBytes > 0, nameof(maxShardBytes), $"must be positive, got {maxShardBytes}.");
        Directory.CreateDirectory(folder);
        // Weights of an earlier export in either format would be found before (or beside) the new ones.
        foreach (var name in new[] { SafetensorsFileName, PyTorchFileName })
        {
            string stemOf = Path.GetFileNameWithoutExtension(name), extOf = Path.GetExtension(name);
            foreach (var stale in Directory.EnumerateFiles(folder, $"{stemOf}*"))
                if (Path.GetFileName(stale) == name || Path.GetFileName(stale) == name + IndexSuffix || IsShardName(Path.GetFileName(stale), stemOf, extOf))
                    File.Delete(stale);
        }
        string single = format == WeightFormat.Safetensors ? SafetensorsFileName : PyTorchFileName;
        string stem = Path.GetFileNameWithoutExtension(single), ext = Path.GetExtension(single);

        static long Bytes(Tensor t) => t.numel() * t.ElementSize;
        var shards = new List<List<(string, Tensor)>> { new() };
        long size = 0;
        foreach (var item in tensors)
        {
            if (shards[^1].Count > 0 && size + Bytes(item.Tensor) > maxShardBytes) { shards.Add([]); size = 0; }
            shards[^1].Add(item);
            size += Bytes(item.Tensor);
        }
        if (shards.Count == 1)
        {
            string path = Path.Combine(folder, single);
            Write(path, tensors);
            return [path];
        }
        var written = new List<string>();
        var weightMap = new SortedDictionary<string, string>(StringComparer.Ordinal);
        for (int i = 0; i < shards.Count; i++)
        {
            string name = $"{stem}-{i + 1:D5}-of-{shards.Count:D5}{ext}";
            Write(Path.Combine(folder, name), shards[i]);
            written.Add(Path.Combine(folder, name));
            foreach (var (tensorName, _) in shards[i]) weightMap[tensorName] = name;
        }
        string index = Path.Combine(folder, single + IndexSuffix);
        var json = JsonSerializer.Serialize(new { metadata = new { total_size = tensors.Sum(t => Bytes(t.Tensor)) }, weight_map = weightMap },
            new JsonSerializerOptions { WriteIndented = true });
        AtomicFile.WriteAllText(index, json);
        written.Add(index);
        return written;
    }

    private static bool IsShardName(string name, string stem, string ext) =>
        System.Text.RegularExpressions.Regex.IsMatch(name, $"^{System.Text.RegularExpressions.Regex.Escape(stem)}-\\d{{5}}-of-\\d{{5}}{System.Text.RegularExpressions.Regex.Escape(ext)}$");

    /// <summary><paramref name="module"/>'s state dict (parameters and buffers by dotted name), detached on the CPU;
    /// floating-point tensors converted to <paramref name="floatType"/> when given (Float32, Float16, BFloat16 or Float64).
    /// The tensors belong to the caller's dispose scope.</summary>
    public static List<(string Name, Tensor Tensor)> StateOf(nn.Module module, ScalarType? floatType = null)
    {
        ArgumentNullException.ThrowIfNull(module);
        if (floatType is ScalarType ft)
            Check.That(ft is ScalarType.Float32 or ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float64, nameof(floatType),
                $"must be Float32, Float16, BFloat16 or Float64, got {ft}.");
        return module.state_dict()
            .Select(kv => (kv.Key, floatType is ScalarType f && kv.Value.is_floating_point() ? kv.Value.detach().cpu().to(f) : kv.Value.detach().cpu()))
            .ToList();
    }

    /// <summary>Writes <paramref name="module"/>'s state dict to <paramref name="path"/> (format from the name; see
    /// <see cref="StateOf"/> for <paramref name="floatType"/>).</summary>
    public static void SaveModel(nn.Module module, string path, ScalarType? floatType = null)
    {
        using var scope = NewDisposeScope();
        Write(path, StateOf(module, floatType));
    }

    /// <summary>Reads <paramref name="path"/> (see <see cref="Read"/>) into <paramref name="module"/> (see <see cref="Load"/>).</summary>
    public static void LoadModel(nn.Module module, string path)
    {
        using var state = Read(path);
        Load(module, state.ByName, state.Source);
    }

    /// <summary>
    /// Copies <paramref name="tensors"/> into <paramref name="module"/>: every state-dict entry must be there with the same
    /// shape and nothing else may be (one error lists every missing, unexpected and mismatched tensor). Floating-point
    /// tensors are converted to the module's dtype (e.g. F16 weights into a float32 model); integer and bool tensors must
    /// match exactly.
    /// </summary>
    public static void Load(nn.Module module, IReadOnlyDictionary<string, Tensor> tensors, string source)
    {
        ArgumentNullException.ThrowIfNull(module);
        ArgumentNullException.ThrowIfNull(tensors);
        var state = module.state_dict();
        RequireFit(state.Select(kv => (kv.Key, kv.Value.shape, kv.Value.dtype)), tensors, source);
        using var noGrad = no_grad();
        foreach (var (name, target) in state) target.copy_(tensors[name]);
    }

    /// <summary>Throws one <see cref="WeightFileException"/> listing every tensor of <paramref name="expected"/> missing from
    /// <paramref name="actual"/>, every unexpected tensor, and every shape or (non-float) dtype mismatch.</summary>
    public static void RequireFit(IEnumerable<(string Name, long[] Shape, ScalarType Dtype)> expected, IReadOnlyDictionary<string, Tensor> actual, string source)
    {
        var wanted = expected.ToList();
        var names = wanted.Select(w => w.Name).ToHashSet(StringComparer.Ordinal);
        var missing = wanted.Where(w => !actual.ContainsKey(w.Name)).Select(w => w.Name).ToList();
        var unexpected = actual.Keys.Where(k => !names.Contains(k)).Order(StringComparer.Ordinal).ToList();
        var mismatched = new List<string>();
        foreach (var (name, shape, dtype) in wanted)
        {
            if (!actual.TryGetValue(name, out var t)) continue;
            if (!t.shape.SequenceEqual(shape))
                mismatched.Add($"{name} has shape [{string.Join(", ", t.shape)}] in the file, the model expects [{string.Join(", ", shape)}]");
            else if (t.dtype != dtype && !(t.is_floating_point() && dtype is ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Float32 or ScalarType.Float64))
                mismatched.Add($"{name} is {t.dtype} in the file, the model expects {dtype}");
        }
        if (missing.Count + unexpected.Count + mismatched.Count == 0) return;
        static string List(IReadOnlyList<string> items) => string.Join(", ", items.Take(6)) + (items.Count > 6 ? $" and {items.Count - 6} more" : "");
        var parts = new List<string>();
        if (missing.Count > 0) parts.Add($"missing {missing.Count} tensor(s) the model needs: {List(missing)}");
        if (unexpected.Count > 0) parts.Add($"{unexpected.Count} unexpected tensor(s): {List(unexpected)}");
        if (mismatched.Count > 0) parts.Add($"{mismatched.Count} mismatched: {List(mismatched)}");
        throw new WeightFileException($"{source} does not fit the model ({string.Join("; ", parts)}); was it written for another configuration?");
    }

    private static string FirstLine(string message) => message.Split('\n')[0].Trim();
}
