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
/// (<c>save_state_dict</c>). Files are written through <see cref="AtomicFile"/>, so a failed
/// save never damages an existing checkpoint. Writing and reading stream through the file (no 2 GB array limit).
/// Weights holding NaN or ∞ are neither saved nor loaded.
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

    /// <summary>The newest checkpoint of <paramref name="runDir"/> that reads back intact (magic, length, SHA-256);
    /// null when there is none.</summary>
    public static string? NewestIntact(string runDir)
    {
        foreach (var (_, path) in List(runDir).Reverse())
        {
            try { ReadHeader(path); return path; }
            catch (CheckpointException) { }
        }
        return null;
    }

    /// <summary>Saves <paramref name="trainer"/> atomically to <paramref name="path"/>, streaming (no size limit);
    /// throws <see cref="CheckpointException"/> without touching <paramref name="path"/> when a weight or buffer
    /// holds NaN or ∞ (a diverged run must not replace a good checkpoint).</summary>
    public static void Save(Trainer trainer, string path)
    {
        ArgumentNullException.ThrowIfNull(trainer);
        if (FirstNonFinite(trainer.Model) is string bad)
            throw new CheckpointException($"refusing to save {path}: {bad} holds NaN or infinite values (the run diverged; try a lower --lr).");
        AtomicFile.Write(path, stream =>
        {
            using var w = new BinaryWriter(stream, Encoding.UTF8, leaveOpen: true);
            w.Write(Magic);
            w.Write(Version);
            w.Write(0L);                                                      // payload length, written below
            w.Flush();
            long start = stream.Position;
            using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            using (var hashing = new HashingWriteStream(stream, hash))
            using (var p = new BinaryWriter(hashing, Encoding.UTF8, leaveOpen: true))
            {
                var header = new Header(JsonDocument.Parse(ConfigBinding.ToJson(trainer.Config)).RootElement.Clone(), trainer.Options,
                    trainer.Step, trainer.SamplerState, trainer.TokensSeen, trainer.ElapsedSeconds);
                p.Write(JsonSerializer.Serialize(header));
                using var rng = random.get_rng_state();
                var rngBytes = rng.data<byte>().ToArray();
                p.Write(rngBytes.Length);
                p.Write(rngBytes);
                trainer.Model.save(p);
                trainer.Optimizer.save_state_dict(p);
                p.Flush();
            }
            long length = stream.Position - start;
            w.Write(hash.GetHashAndReset());
            w.Flush();
            stream.Position = Magic.Length + 4;
            w.Write(length);
            w.Flush();
        });
    }

    /// <summary>The name of the first floating-point parameter or buffer of <paramref name="module"/> holding NaN or ∞, or null.</summary>
    public static string? FirstNonFinite(nn.Module module)
    {
        ArgumentNullException.ThrowIfNull(module);
        using var scope = NewDisposeScope();
        foreach (var (name, t) in module.state_dict())
            if (t.is_floating_point() && !t.isfinite().all().item<bool>()) return name;
        return null;
    }

    private static void RequireFiniteLoaded(nn.Module model, string path)
    {
        if (FirstNonFinite(model) is string bad)
            throw new CheckpointException($"checkpoint {path} holds NaN or infinite values in {bad} (written by a run that diverged); use an earlier checkpoint.");
    }

    /// <summary>Passes writes through to a stream and into a running hash.</summary>
    private sealed class HashingWriteStream(Stream inner, IncrementalHash hash) : Stream
    {
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() => inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            hash.AppendData(buffer);
            inner.Write(buffer);
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
    public static Trainer Load(string path, TokenText train, TokenText validation, Device? device = null)
    {
        var (header, reader) = ReadVerified(path);
        using (reader)
        {
            var config = ConfigOf(header, path);
            Trainer trainer;
            try { trainer = new Trainer(config, header.Options, train, validation, device); }
            catch (ArgumentException e) { throw new CheckpointException($"checkpoint {path} cannot continue on this data: {e.Message}", e); }
            try
            {
                int rngLen = reader.ReadInt32();
                var rngBytes = reader.ReadBytes(rngLen);
                trainer.Model.load(reader, strict: true);
                trainer.Optimizer.load_state_dict(reader);
                RequireFiniteLoaded(trainer.Model, path);
                using var rng = tensor(rngBytes, dtype: ScalarType.Byte);
                random.set_rng_state(rng);
            }
            catch (Exception e)
            {
                trainer.Dispose();
                if (e is CheckpointException) throw;
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
                RequireFiniteLoaded(model, path);
            }
            catch (Exception e)
            {
                model.Dispose();
                if (e is CheckpointException) throw;
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

    /// <summary>Checks magic, version, length and SHA-256 (streaming through the file once), then returns the header and
    /// a reader positioned after it, over the file itself (no copy in memory; no size limit).</summary>
    private static (Header Header, BinaryReader Payload) ReadVerified(string path)
    {
        FileStream file;
        try { file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { throw new CheckpointException($"checkpoint {path} does not exist."); }
        var reader = new BinaryReader(file, Encoding.UTF8);
        try
        {
            int fixedLen = Magic.Length + 4 + 8;
            long fileLength = file.Length;
            if (fileLength < fixedLen || !reader.ReadBytes(Magic.Length).AsSpan().SequenceEqual(Magic))
                throw new CheckpointException($"{path} is not a sparse-attn checkpoint (bad magic bytes).");
            int version = reader.ReadInt32();
            if (version != Version)
                throw new CheckpointException($"checkpoint {path} has format version {version}; this tool reads version {Version}.");
            long length = reader.ReadInt64();
            if (length < 0 || length > fileLength || fixedLen + length + 32 != fileLength)
                throw new CheckpointException($"checkpoint {path} is truncated or corrupt: {fileLength} bytes, expected {(length < 0 || length > fileLength ? "a valid length field" : (fixedLen + length + 32).ToString(System.Globalization.CultureInfo.InvariantCulture))}.");
            using (var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256))
            {
                var buffer = new byte[1 << 20];
                for (long left = length; left > 0;)
                {
                    int n = file.Read(buffer, 0, (int)Math.Min(buffer.Length, left));
                    if (n <= 0) throw new CheckpointException($"checkpoint {path} is truncated.");
                    hash.AppendData(buffer, 0, n);
                    left -= n;
                }
                if (!hash.GetHashAndReset().AsSpan().SequenceEqual(reader.ReadBytes(32)))
                    throw new CheckpointException($"checkpoint {path} is corrupt: SHA-256 checksum mismatch.");
            }
            file.Position = fixedLen;
        }
        catch
        {
            reader.Dispose();
            throw;
        }
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
