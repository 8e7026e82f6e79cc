using System.Text;
using SparseAttention.Model;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>A model loaded for inference (sample, eval, plot, export), with where it came from.</summary>
internal sealed class LoadedModel(RoutingTransformerLM model, TransformerConfig config, string path, long? step, IDisposable owner) : IDisposable
{
    public RoutingTransformerLM Model { get; } = model;
    public TransformerConfig Config { get; } = config;
    /// <summary>The file actually read (a run folder resolves to its newest checkpoint).</summary>
    public string Path { get; } = path;
    /// <summary>Training step of a checkpoint; null for weights without one.</summary>
    public long? Step { get; } = step;

    /// <summary>"ckpt-00000100.sat (step 100)" — for messages.</summary>
    public string Describe() => System.IO.Path.GetFileName(Path) + (Step is long s ? $" (step {s})" : "");

    public void Dispose() => owner.Dispose();
}

/// <summary>
/// Finds and loads what <c>--checkpoint</c> names, the way a user of Hugging Face tools would expect:
/// a checkpoint file (<c>ckpt-*.sat</c>); a run folder (its newest checkpoint); a <c>.safetensors</c> file
/// (configuration from <c>--config</c>, else a <c>config.json</c> beside it, else the file's <c>__metadata__</c>
/// "config" entry); or a folder holding <c>model.safetensors</c> (and usually <c>config.json</c>), as written by
/// <c>sparse-attn export --out DIR</c> or <c>save_pretrained</c>.
/// </summary>
internal static class CheckpointLocator
{
    /// <summary>File name of the weights in an exported folder (the Hugging Face name).</summary>
    public const string WeightsFileName = "model.safetensors";
    /// <summary>File name of the configuration beside exported weights (the Hugging Face name).</summary>
    public const string ConfigFileName = "config.json";
    /// <summary>Metadata key holding the configuration JSON in files written by <c>export</c>.</summary>
    public const string ConfigMetadataKey = "config";
    private static readonly byte[] CheckpointMagic = "SPATCKPT"u8.ToArray();

    /// <summary>The file <paramref name="path"/> stands for (a folder → its newest checkpoint or its model.safetensors).
    /// Throws <see cref="CliUsageException"/> naming <paramref name="option"/> when there is none.</summary>
    public static string Resolve(string path, string option)
    {
        if (File.Exists(path)) return path;
        if (Directory.Exists(path))
        {
            var checkpoints = Checkpoint.List(path);
            if (checkpoints.Count > 0) return checkpoints[^1].Path;
            string weights = System.IO.Path.Combine(path, WeightsFileName);
            if (File.Exists(weights)) return weights;
            throw new CliUsageException($"{option}: {path} holds no checkpoint ({Checkpoint.Prefix}*{Checkpoint.Extension}) and no {WeightsFileName}.");
        }
        throw new CliUsageException($"{option}: no such file or folder: {path}");
    }

    /// <summary>Loads the model <paramref name="path"/> names (see the class summary), in eval mode.</summary>
    /// <param name="path">Checkpoint file, run folder, safetensors file or exported folder.</param>
    /// <param name="configPath">Configuration JSON for safetensors weights (overrides the file's own); null = find it.</param>
    /// <param name="option">Option name for error messages.</param>
    public static LoadedModel Load(string path, string? configPath, string option = "--checkpoint")
    {
        string file = Resolve(path, option);
        LoadedModel loaded;
        try
        {
            loaded = IsCheckpoint(file)
                ? LoadCheckpoint(file, configPath, option)
                : LoadSafetensors(file, configPath, option);
        }
        catch (CheckpointException e) when (Directory.Exists(path) && Checkpoint.NewestIntact(path) is string intact && intact != file)
        {
            throw new CheckpointException($"{e.Message} The newest intact checkpoint in {path} is {System.IO.Path.GetFileName(intact)}; pass {option} {intact}.", e);
        }
        loaded.Model.eval();
        return loaded;
    }

    private static bool IsCheckpoint(string file)
    {
        using var stream = File.OpenRead(file);
        var head = new byte[CheckpointMagic.Length];
        return stream.ReadAtLeast(head, head.Length, throwOnEndOfStream: false) == head.Length && head.AsSpan().SequenceEqual(CheckpointMagic);
    }

    private static LoadedModel LoadCheckpoint(string file, string? configPath, string option)
    {
        if (configPath is not null)
            throw new CliUsageException($"--config: {file} is a checkpoint, which carries its own configuration; --config is for safetensors weights.");
        var (model, config, step) = Checkpoint.LoadModel(file);
        return new LoadedModel(model, config, file, step, model);
    }

    private static LoadedModel LoadSafetensors(string file, string? configPath, string option)
    {
        SafetensorsContents contents;
        try { contents = Safetensors.Read(file); }
        catch (SafetensorsException e)
        {
            throw new SafetensorsException($"{e.Message} ({file} is neither a sparse-attn checkpoint nor a valid safetensors file.)", e);
        }
        using (contents)
        {
            var config = ConfigFor(file, contents, configPath, option);
            RoutingTransformerLM model;
            try { model = new RoutingTransformerLM(config); }
            catch (ArgumentException e) { throw new CliUsageException($"configuration of {file}: {e.Message}"); }
            try
            {
                Safetensors.LoadModel(model, contents, file);
                if (Checkpoint.FirstNonFinite(model) is string bad)
                    throw new SafetensorsException($"{file}: tensor '{bad}' holds NaN or infinite values; these weights cannot be used.");
            }
            catch
            {
                model.Dispose();
                throw;
            }
            long? step = contents.Metadata.TryGetValue("step", out var s) && long.TryParse(s, out long n) ? n : null;
            return new LoadedModel(model, config, file, step, model);
        }
    }

    /// <summary>The configuration for safetensors weights: --config, else config.json beside the file, else the metadata.</summary>
    private static TransformerConfig ConfigFor(string file, SafetensorsContents contents, string? configPath, string option)
    {
        string json, source;
        string beside = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(file))!, ConfigFileName);
        if (configPath is not null)
        {
            if (!File.Exists(configPath)) throw new CliUsageException($"--config: no such file: {configPath}");
            (json, source) = (File.ReadAllText(configPath), configPath);
        }
        else if (System.IO.Path.GetFileName(file) == WeightsFileName && File.Exists(beside))
            (json, source) = (File.ReadAllText(beside), beside);
        else if (contents.Metadata.TryGetValue(ConfigMetadataKey, out var embedded))
            (json, source) = (embedded, $"the '{ConfigMetadataKey}' metadata of {file}");
        else
            throw new CliUsageException($"{option}: {file} carries no model configuration (no '{ConfigMetadataKey}' metadata" +
                                        $"{(System.IO.Path.GetFileName(file) == WeightsFileName ? $", no {ConfigFileName} beside it" : "")}); pass --config FILE.");
        try { return ConfigBinding.FromJson(json, "config").Validate(); }
        catch (ArgumentException e)
        {
            throw new CliUsageException($"configuration from {source}: {e.Message.Replace(" (Parameter 'config')", "")}");
        }
    }

    /// <summary>Metadata written with exported weights: <c>format</c> = "pt" (what transformers checks),
    /// the configuration JSON, the training step, and the producer.</summary>
    public static Dictionary<string, string> ExportMetadata(LoadedModel loaded)
    {
        var metadata = new Dictionary<string, string>
        {
            ["format"] = "pt",
            [ConfigMetadataKey] = ConfigBinding.ToJson(loaded.Config),
            ["producer"] = "sparse-attn",
        };
        if (loaded.Step is long s) metadata["step"] = s.ToString(System.Globalization.CultureInfo.InvariantCulture);
        return metadata;
    }
}

/// <summary>Reads text data for <c>eval</c> and <c>plot</c> as <c>train</c> does (<see cref="ByteCorpus.ReadText"/>),
/// turning its errors into usage errors that name the option.</summary>
internal static class TextData
{
    public static byte[] Read(string path, string option, int minBytes)
    {
        byte[] bytes;
        try { bytes = ByteCorpus.ReadText(path).Bytes; }
        catch (ArgumentException e) { throw new CliUsageException(option + e.Message.Replace(" (Parameter 'data')", "")["data".Length..]); }
        if (bytes.Length < minBytes)
            throw new CliUsageException($"{option}: {path} has {bytes.Length} byte(s); at least {minBytes} are needed.");
        return bytes;
    }
}
