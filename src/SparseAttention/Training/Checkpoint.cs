using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Serialization;
using SparseAttention.Model;
using static TorchSharp.torch;

namespace SparseAttention.Training;

/// <summary>A checkpoint that cannot be used: corrupt, truncated, not a checkpoint, or for another configuration.</summary>
public sealed class CheckpointException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// One file holding everything a run needs to continue: model state (parameters and buffers, e.g. k-means
/// centroids), AdamW state (moments and step counts, via TorchSharp's <c>save_state_dict</c>), configuration,
/// training options, step, libtorch's global RNG state, the batch sampler's state (data position), tokens seen
/// and elapsed time.
/// </summary>
/// <remarks>
/// Layout: magic <c>SPATCKPT</c>, int32 format version, int64 payload length, payload, SHA-256 of the payload.
/// Payload: header JSON (string), RNG state (int32 length + bytes), model (<c>Module.save</c>), optimizer
/// (<c>save_state_dict</c>). Files are written to <c>FILE.tmp</c> and renamed over <c>FILE</c>, so a failed
/// save never damages an existing checkpoint.
/// </remarks>
public static class Checkpoint
{
    private static readonly byte[] Magic = "SPATCKPT"u8.ToArray();
    private const int Version = 1;
    /// <summary>File name pattern of the run folder's checkpoints: <c>ckpt-00000100.sat</c>.</summary>
    public const string Prefix = "ckpt-", Extension = ".sat";

    private sealed record Header(
        [property: JsonPropertyName("config")] JsonElement Config,
        [property: JsonPropertyName("options")] TrainingOptions Options,
        [property: JsonPropertyName("step")] long Step,
        [property: JsonPropertyName("sampler_state")] ulong SamplerState,
        [property: JsonPropertyName("tokens_seen")] long TokensSeen,
        [property: JsonPropertyName("elapsed_seconds")] double ElapsedSeconds);

    /// <summary>Path of the checkpoint of step <paramref name="step"/> in <paramref name="runDir"/>.</summary>
    public static string PathFor(string runDir, long step) => Path.Combine(runDir, $"{Prefix}{step:D8}{Extension}");

    /// <summary>Checkpoints in <paramref name="runDir"/> ordered by step (oldest first).</summary>
    public static IReadOnlyList<(long Step, string Path)> List(string runDir)
    {
        if (!Directory.Exists(runDir)) return [];
        return Directory.EnumerateFiles(runDir, Prefix + "*" + Extension)
            .Select(p => (Name: Path.GetFileNameWithoutExtension(p), Path: p))
            .Where(x => long.TryParse(x.Name[Prefix.Length..], out _))
            .Select(x => (long.Parse(x.Name[Prefix.Length..]), x.Path))
            .OrderBy(x => x.Item1).ToList();
    }

    /// <summary>Saves <paramref name="trainer"/> atomically to <paramref name="path"/>.</summary>
    public static void Save(Trainer trainer, string path)
    {
        ArgumentNullException.ThrowIfNull(trainer);
        using var payload = new MemoryStream();
        using (var w = new BinaryWriter(payload, Encoding.UTF8, leaveOpen: true))
        {
            var header = new Header(JsonDocument.Parse(ConfigBinding.ToJson(trainer.Config)).RootElement.Clone(), trainer.Options,
                trainer.Step, trainer.SamplerState, trainer.TokensSeen, trainer.ElapsedSeconds);
            w.Write(JsonSerializer.Serialize(header));
            using var rng = random.get_rng_state();
            var rngBytes = rng.data<byte>().ToArray();
            w.Write(rngBytes.Length);
            w.Write(rngBytes);
            trainer.Model.save(w);
            trainer.Optimizer.save_state_dict(w);
        }
        var bytes = payload.ToArray();
        var hash = SHA256.HashData(bytes);
        WriteAtomic(path, stream =>
        {
            using var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            w.Write(Magic);
            w.Write(Version);
            w.Write((long)bytes.Length);
            w.Write(bytes);
            w.Write(hash);
        });
    }

    /// <summary>Writes <paramref name="path"/> through <paramref name="write"/> into <c>path.tmp</c>, flushes it to
    /// disk and renames it over <paramref name="path"/>; if <paramref name="write"/> throws, the temporary file is
    /// removed and <paramref name="path"/> is left as it was.</summary>
    public static void WriteAtomic(string path, Action<Stream> write)
    {
        string full = Path.GetFullPath(path);
        string tmp = full + ".tmp";
        string? dir = Path.GetDirectoryName(full);
        if (!string.IsNullOrEmpty(dir)) Directory.CreateDirectory(dir);
        try
        {
            using (var stream = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None))
            {
                write(stream);
                stream.Flush(flushToDisk: true);
            }
            File.Move(tmp, full, overwrite: true);
        }
        catch
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw;
        }
    }

    /// <summary>Reads only the configuration and options stored in <paramref name="path"/> (after checking the file).</summary>
    public static (TransformerConfig Config, TrainingOptions Options, long Step) ReadHeader(string path)
    {
        var (header, _) = ReadVerified(path);
        return (ConfigOf(header, path), header.Options, header.Step);
    }

    /// <summary>
    /// Restores a trainer from <paramref name="path"/> with the given data. Throws <see cref="CheckpointException"/>
    /// when the file is corrupt or truncated, or when its model state does not fit its configuration.
    /// Restores libtorch's global RNG state too.
    /// </summary>
    public static Trainer Load(string path, byte[] train, byte[] validation)
    {
        var (header, reader) = ReadVerified(path);
        using (reader)
        {
            var config = ConfigOf(header, path);
            Trainer trainer;
            try { trainer = new Trainer(config, header.Options, train, validation); }
            catch (ArgumentException e) { throw new CheckpointException($"checkpoint {path} cannot continue on this data: {e.Message}", e); }
            try
            {
                int rngLen = reader.ReadInt32();
                var rngBytes = reader.ReadBytes(rngLen);
                trainer.Model.load(reader, strict: true);
                trainer.Optimizer.load_state_dict(reader);
                using var rng = tensor(rngBytes, dtype: ScalarType.Byte);
                random.set_rng_state(rng);
            }
            catch (Exception e) when (e is not CheckpointException)
            {
                trainer.Dispose();
                throw new CheckpointException($"checkpoint {path} does not match its configuration (model or optimizer state): {e.Message}", e);
            }
            trainer.Step = header.Step;
            trainer.SamplerState = header.SamplerState;
            trainer.TokensSeen = header.TokensSeen;
            trainer.ElapsedSeconds = header.ElapsedSeconds;
            return trainer;
        }
    }

    /// <summary>
    /// Reads only the model from <paramref name="path"/> (for sampling, evaluation, export): no optimizer is built and
    /// libtorch's global RNG is left alone. Throws <see cref="CheckpointException"/> like <see cref="Load"/>.
    /// </summary>
    public static (RoutingTransformerLM Model, TransformerConfig Config, long Step) LoadModel(string path)
    {
        var (header, reader) = ReadVerified(path);
        using (reader)
        {
            var config = ConfigOf(header, path);
            RoutingTransformerLM model;
            try { model = new RoutingTransformerLM(config); }
            catch (ArgumentException e) { throw new CheckpointException($"checkpoint {path} holds an invalid configuration: {e.Message}", e); }
            try
            {
                int rngLen = reader.ReadInt32();
                reader.ReadBytes(rngLen);                                          // the RNG state is for resuming training
                model.load(reader, strict: true);
            }
            catch (Exception e) when (e is not CheckpointException)
            {
                model.Dispose();
                throw new CheckpointException($"checkpoint {path} does not match its configuration (model state): {e.Message}", e);
            }
            return (model, config, header.Step);
        }
    }

    private static TransformerConfig ConfigOf(Header header, string path)
    {
        try { return ConfigBinding.FromJson(header.Config.GetRawText(), "config"); }
        catch (ArgumentException e) { throw new CheckpointException($"checkpoint {path} holds an unreadable configuration: {e.Message}", e); }
    }

    private static (Header Header, BinaryReader Payload) ReadVerified(string path)
    {
        byte[] file;
        try { file = File.ReadAllBytes(path); }
        catch (FileNotFoundException) { throw new CheckpointException($"checkpoint {path} does not exist."); }
        int fixedLen = Magic.Length + 4 + 8;
        if (file.Length < fixedLen || !file.AsSpan(0, Magic.Length).SequenceEqual(Magic))
            throw new CheckpointException($"{path} is not a sparse-attn checkpoint (bad magic bytes).");
        int version = BitConverter.ToInt32(file, Magic.Length);
        if (version != Version)
            throw new CheckpointException($"checkpoint {path} has format version {version}; this tool reads version {Version}.");
        long length = BitConverter.ToInt64(file, Magic.Length + 4);
        if (length < 0 || fixedLen + length + 32 != file.Length)
            throw new CheckpointException($"checkpoint {path} is truncated or corrupt: {file.Length} bytes, expected {fixedLen + length + 32}.");
        var payload = file.AsSpan(fixedLen, (int)length);
        if (!SHA256.HashData(payload).AsSpan().SequenceEqual(file.AsSpan(fixedLen + (int)length, 32)))
            throw new CheckpointException($"checkpoint {path} is corrupt: SHA-256 checksum mismatch.");
        var reader = new BinaryReader(new MemoryStream(file, fixedLen, (int)length, writable: false), Encoding.UTF8);
        Header? header;
        try { header = JsonSerializer.Deserialize<Header>(reader.ReadString()); }
        catch (Exception e) when (e is JsonException or EndOfStreamException)
        {
            reader.Dispose();
            throw new CheckpointException($"checkpoint {path} has an unreadable header: {e.Message}", e);
        }
        if (header is null || header.Options is null) { reader.Dispose(); throw new CheckpointException($"checkpoint {path} has an empty header."); }
        return (header, reader);
    }
}
