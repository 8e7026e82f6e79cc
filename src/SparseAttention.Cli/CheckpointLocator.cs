using SparseAttention.Model;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// Finds and loads what <c>--checkpoint</c> names, the way a user of Hugging Face tools would expect:
/// a checkpoint file (<c>ckpt-*.sat</c>); a run folder (its newest checkpoint); a weights file (<c>.safetensors</c>,
/// or a <c>torch.save</c> state dict <c>.pt</c>/<c>.pth</c>/<c>.bin</c>) or a shard index (<c>*.index.json</c>); or a
/// Hugging Face-style folder holding <c>model.safetensors</c>, <c>pytorch_model.bin</c> or a sharded index, with
/// <c>config.json</c>, as <c>sparse-attn export --out DIR</c> writes it. Weights in the PyTorch routing-transformer
/// library's layout (<see cref="PyTorchRoutingTransformer"/>) are recognised by their names and converted; their JSON is
/// that library's constructor arguments.
/// </summary>
/// <remarks>The configuration of weights comes from <c>--config</c>, else <c>NAME.json</c> beside <c>NAME.ext</c>
/// (what <c>export</c> writes next to a single file), else <c>config.json</c> beside Hugging Face-named weights, else a
/// safetensors file's <c>__metadata__</c> "config" (files exported by earlier versions).</remarks>
internal static class CheckpointLocator
{
    /// <summary>File name of the configuration in a Hugging Face-style folder.</summary>
    public const string ConfigFileName = "config.json";
    /// <summary>Metadata key holding the configuration JSON in safetensors files exported by earlier versions.</summary>
    public const string ConfigMetadataKey = "config";
    private static readonly byte[] CheckpointMagic = "SPATCKPT"u8.ToArray();

    /// <summary>The file <paramref name="path"/> stands for (a folder → its newest checkpoint or its weights).
    /// Throws <see cref="CliUsageException"/> naming <paramref name="option"/> when there is none.</summary>
    public static string Resolve(string path, string option)
    {
        if (File.Exists(path)) return path;
        if (Directory.Exists(path))
        {
            var checkpoints = Checkpoint.List(path);
            if (checkpoints.Count > 0) return checkpoints[^1].Path;
            return WeightFiles.FindInFolder(path)
                ?? throw new CliUsageException($"{option}: {path} holds no checkpoint ({Checkpoint.Prefix}*{Checkpoint.Extension}) and no {WeightFiles.SafetensorsFileName}, {WeightFiles.PyTorchFileName} or sharded {WeightFiles.IndexSuffix} index.");
        }
        throw new CliUsageException($"{option}: no such file or folder: {path}");
    }

    /// <summary>Loads the model <paramref name="path"/> names (see the class summary), in eval mode.</summary>
    /// <param name="path">Checkpoint file, run folder, weights file, shard index or Hugging Face-style folder.</param>
    /// <param name="configPath">Configuration JSON for weights (overrides the one found beside them); null = find it.</param>
    /// <param name="option">Option name for error messages.</param>
    public static LoadedModel Load(string path, string? configPath, string option = "--checkpoint")
    {
        string file = Resolve(path, option);
        LoadedModel loaded;
        try
        {
            loaded = IsCheckpoint(file)
                ? LoadCheckpoint(file, configPath, option)
                : LoadWeights(file, configPath, option);
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
            throw new CliUsageException($"--config: {file} is a checkpoint, which carries its own configuration; --config is for weights files.");
        var (model, config, step) = Checkpoint.LoadModel(file);
        return new LoadedModel(model, config, file, step, model);
    }

    private static LoadedModel LoadWeights(string file, string? configPath, string option)
    {
        if (!WeightFiles.HasWeightsName(file))
            throw new WeightFileException($"{file} is neither a sparse-attn checkpoint nor a valid safetensors file or PyTorch state_dict (expected ckpt-*.sat, .safetensors, .pt, .pth, .bin or {WeightFiles.IndexSuffix}).");
        StateDict state;
        try { state = WeightFiles.Read(file); }
        catch (WeightFileException e)
        {
            throw new WeightFileException($"{e.Message} ({file} is neither a sparse-attn checkpoint nor a valid safetensors file or PyTorch state_dict.)", e);
        }
        using (state)
        {
            bool library = PyTorchRoutingTransformer.IsLibraryLayout(state.ByName.Keys);
            var (json, source) = ConfigJsonFor(file, state, configPath, option, library);
            TransformerConfig config;
            try
            {
                config = library ? PyTorchRoutingTransformer.FromConstructorArguments(json, source)
                                 : ConfigBinding.FromJson(HuggingFaceConfig.Strip(json, source), "config").Validate();
            }
            catch (Exception e) when (e is ArgumentException or NotSupportedException)
            {
                throw new CliUsageException($"configuration from {source}: {(e is ArgumentException a ? ConfigCommand.Plain(a) : e.Message)}");
            }
            // The model lives outside any dispose scope (its parameters must outlive this call); converted tensors do not.
            RoutingTransformerLM model;
            try { model = new RoutingTransformerLM(config); }
            catch (ArgumentException e) { throw new CliUsageException($"configuration of {file}: {e.Message}"); }
            try
            {
                using (var scope = TorchSharp.torch.NewDisposeScope())
                    WeightFiles.Load(model, library ? PyTorchRoutingTransformer.ToProjectNames(state.ByName, config, file) : state.ByName, file);
                if (Checkpoint.FirstNonFinite(model) is string bad)
                    throw new WeightFileException($"{file}: tensor '{bad}' holds NaN or infinite values; these weights cannot be used.");
            }
            catch
            {
                model.Dispose();
                throw;
            }
            long? step = state.Metadata.TryGetValue("step", out var s) && long.TryParse(s, out long n) ? n : null;
            return new LoadedModel(model, config, file, step, model);
        }
    }

    /// <summary>The JSON describing weights <paramref name="file"/> and where it came from (see the class remarks).</summary>
    private static (string Json, string Source) ConfigJsonFor(string file, StateDict state, string? configPath, string option, bool library)
    {
        if (configPath is not null)
        {
            if (!File.Exists(configPath)) throw new CliUsageException($"--config: no such file: {configPath}");
            return (File.ReadAllText(configPath), configPath);
        }
        string full = System.IO.Path.GetFullPath(file), folder = System.IO.Path.GetDirectoryName(full)!, name = System.IO.Path.GetFileName(full);
        bool index = name.EndsWith(WeightFiles.IndexSuffix, StringComparison.OrdinalIgnoreCase);
        string sidecar = System.IO.Path.ChangeExtension(full, ".json");
        if (!index && File.Exists(sidecar)) return (File.ReadAllText(sidecar), sidecar);
        string beside = System.IO.Path.Combine(folder, ConfigFileName);
        bool huggingFaceName = index || name is WeightFiles.SafetensorsFileName or WeightFiles.PyTorchFileName;
        if (huggingFaceName && File.Exists(beside)) return (File.ReadAllText(beside), beside);
        if (!library && state.Metadata.TryGetValue(ConfigMetadataKey, out var embedded)) return (embedded, $"the '{ConfigMetadataKey}' metadata of {file}");
        throw new CliUsageException($"{option}: {file} carries no model configuration (no {System.IO.Path.GetFileName(sidecar)} beside it" +
                                    $"{(huggingFaceName ? $", no {ConfigFileName}" : "")}{(library ? "" : $", no '{ConfigMetadataKey}' metadata")}); pass --config FILE.");
    }
}
