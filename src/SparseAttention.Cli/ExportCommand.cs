using System.CommandLine;
using System.Globalization;
using SparseAttention.Training;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn export</c>: a model's weights for Python and Hugging Face tools, written through TorchSharp.PyBridge.
/// <c>--out FILE.safetensors</c> / <c>FILE.pt</c> / <c>FILE.bin</c> writes one state-dict file plus <c>FILE.json</c>
/// (the configuration); <c>--out DIR</c> writes a Hugging Face-style folder: <c>config.json</c> and
/// <c>model.safetensors</c>, sharded with an index above <c>--max-shard-size</c>. <c>--format routing-transformer-pytorch</c>
/// writes the PyTorch routing-transformer library's names instead (<see cref="PyTorchRoutingTransformer"/>), with the
/// JSON holding <c>RoutingTransformerLM</c>'s constructor arguments (a folder gets <c>pytorch_model.bin</c>).
/// </summary>
internal sealed class ExportCommand
{
    private const string NativeFormat = "sparse-attn", LibraryFormat = "routing-transformer-pytorch";
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat), run folder (its newest checkpoint), or weights (.safetensors, .pt, .bin, index or exported folder).", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON when the input is weights without one." };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE|DIR", Description = "FILE.safetensors, FILE.pt or FILE.bin (configuration in FILE.json), or a folder (Hugging Face layout: config.json + weights).", Required = true };
    private readonly Option<string> formatOption = new("--format") { HelpName = "FORMAT", Description = $"Tensor names: {NativeFormat} (this project's) or {LibraryFormat} (the PyTorch routing-transformer {PyTorchRoutingTransformer.LibraryVersion} RoutingTransformerLM's, JSON = its constructor arguments).", DefaultValueFactory = _ => NativeFormat };
    private readonly Option<string> dtypeOption = new("--dtype") { HelpName = "TYPE", Description = "Storage type of floating-point tensors: float32, float16 or bfloat16 (integer and bool buffers keep theirs).", DefaultValueFactory = _ => "float32" };
    private readonly Option<string> shardOption = new("--max-shard-size") { HelpName = "SIZE", Description = "Folders only: largest weights file before sharding (bytes, or with KB/MB/GB), as save_pretrained's max_shard_size.", DefaultValueFactory = _ => "5GB" };

    public static Command Create()
    {
        var self = new ExportCommand();
        var command = new Command("export", "Write a model's weights for PyTorch / Hugging Face tools (safetensors or torch.save state dicts, optionally in the PyTorch routing-transformer library's layout).");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.outOption, self.formatOption, self.dtypeOption, self.shardOption }) command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string dtypeName = parse.GetValue(dtypeOption)!.Trim().ToLowerInvariant();
        (ScalarType dtype, string torchDtype) = dtypeName switch
        {
            "float32" or "f32" => (ScalarType.Float32, "float32"),
            "float16" or "f16" or "half" => (ScalarType.Float16, "float16"),
            "bfloat16" or "bf16" => (ScalarType.BFloat16, "bfloat16"),
            _ => throw new CliUsageException($"--dtype: expected float32, float16 or bfloat16, got '{parse.GetValue(dtypeOption)}'."),
        };
        string format = parse.GetValue(formatOption)!.Trim().ToLowerInvariant();
        if (format is not (NativeFormat or LibraryFormat))
            throw new CliUsageException($"--format: expected {NativeFormat} or {LibraryFormat}, got '{parse.GetValue(formatOption)}'.");
        long maxShard = ParseSize(parse.GetValue(shardOption)!);
        string outPath = parse.GetValue(outOption)!;
        bool folder = !WeightFiles.HasWeightsName(outPath) || outPath.EndsWith(WeightFiles.IndexSuffix, StringComparison.OrdinalIgnoreCase);
        if (folder && Path.HasExtension(outPath) && !Directory.Exists(outPath))
            throw new CliUsageException($"--out: '{outPath}' has the extension {Path.GetExtension(outPath)}; name a .safetensors, .pt, .pth or .bin file, or a folder without an extension.");
        if (!folder && Directory.Exists(outPath)) throw new CliUsageException($"--out: {outPath} is a folder; name a weights file or a folder without a weights extension.");
        if (folder && File.Exists(outPath)) throw new CliUsageException($"--out: {outPath} is a file; a weights file name or a folder was expected.");

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        using var scope = NewDisposeScope();
        List<(string Name, Tensor Tensor)> tensors;
        string json;
        if (format == LibraryFormat)
        {
            try
            {
                json = PyTorchRoutingTransformer.ConstructorArguments(loaded.Config).ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true });
                tensors = PyTorchRoutingTransformer.Export(loaded.Model);
            }
            catch (NotSupportedException e) { throw new CliUsageException($"--format {LibraryFormat}: {e.Message}"); }
            tensors = tensors.Select(t => (t.Name, t.Tensor.is_floating_point() ? t.Tensor.to(dtype) : t.Tensor)).ToList();
        }
        else
        {
            tensors = WeightFiles.StateOf(loaded.Model, dtype);
            json = folder ? HuggingFaceConfig.ToJson(loaded.Config, torchDtype) : ConfigBinding.ToJson(loaded.Config);
        }

        IReadOnlyList<string> written;
        string configPath;
        if (folder)
        {
            written = WeightFiles.WriteFolder(outPath, format == LibraryFormat ? WeightFormat.PyTorch : WeightFormat.Safetensors, tensors, maxShard);
            configPath = Path.Combine(outPath, CheckpointLocator.ConfigFileName);
        }
        else
        {
            WeightFiles.Write(outPath, tensors);
            written = [outPath];
            configPath = Path.ChangeExtension(outPath, ".json");
        }
        AtomicFile.WriteAllText(configPath, json + "\n");
        long parameters = loaded.Model.parameters().Sum(p => p.numel());
        long bytes = written.Sum(p => new FileInfo(p).Length);
        output.WriteLine($"wrote {string.Join(", ", written.Select(p => Path.GetFileName(p)))} in {Path.GetDirectoryName(Path.GetFullPath(written[0]))}: " +
                         $"{tensors.Count} tensors ({format} names), {parameters:N0} parameters, {dtypeName}, {bytes:N0} bytes, from {loaded.Describe()}; " +
                         (format == LibraryFormat ? $"RoutingTransformerLM constructor arguments in {configPath}" : $"configuration in {configPath}"));
        return CliApp.Ok;
    }

    /// <summary>"5GB", "500MB", "10KB" (powers of 1000, as Hugging Face) or a plain byte count.</summary>
    internal static long ParseSize(string text)
    {
        string t = text.Trim().ToUpperInvariant();
        long unit = 1;
        foreach (var (suffix, factor) in new[] { ("GB", 1_000_000_000L), ("MB", 1_000_000L), ("KB", 1_000L), ("B", 1L) })
            if (t.EndsWith(suffix, StringComparison.Ordinal)) { (t, unit) = (t[..^suffix.Length].Trim(), factor); break; }
        if (!double.TryParse(t, NumberStyles.Float, CultureInfo.InvariantCulture, out double value) || !(value >= 1) || value * unit > long.MaxValue / 2)
            throw new CliUsageException($"--max-shard-size: expected a size such as 5GB, 200MB or 1000000, got '{text}'.");
        return (long)(value * unit);
    }
}
