using System.CommandLine;
using SparseAttention.Training;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn export</c>: a checkpoint's weights as safetensors — the model's state dict by its PyTorch-style names,
/// with the configuration JSON in the header's <c>__metadata__</c> ("config"), plus "format": "pt" and "step".
/// <c>--out DIR</c> writes the Hugging Face folder layout: <c>DIR/model.safetensors</c> + <c>DIR/config.json</c>.
/// </summary>
internal sealed class ExportCommand
{
    private readonly Option<string> checkpointOption = new("--checkpoint") { HelpName = "FILE|DIR", Description = "Checkpoint (ckpt-*.sat) or run folder (its newest checkpoint); safetensors input is converted too.", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON when the input is safetensors weights without one." };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.safetensors|DIR", Description = "A .safetensors file, or a folder to receive model.safetensors and config.json.", Required = true };
    private readonly Option<string> dtypeOption = new("--dtype") { HelpName = "TYPE", Description = "Storage type of floating-point tensors: float32, float16 or bfloat16 (integer and bool buffers keep theirs).", DefaultValueFactory = _ => "float32" };

    public static Command Create()
    {
        var self = new ExportCommand();
        var command = new Command("export", "Write a model's weights in the safetensors format (for Python tools); the configuration goes into the file's metadata.");
        foreach (var option in new Option[] { self.checkpointOption, self.configOption, self.outOption, self.dtypeOption }) command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string dtypeName = parse.GetValue(dtypeOption)!.Trim().ToLowerInvariant();
        ScalarType dtype = dtypeName switch
        {
            "float32" or "f32" => ScalarType.Float32,
            "float16" or "f16" or "half" => ScalarType.Float16,
            "bfloat16" or "bf16" => ScalarType.BFloat16,
            _ => throw new CliUsageException($"--dtype: expected float32, float16 or bfloat16, got '{parse.GetValue(dtypeOption)}'."),
        };
        string outPath = parse.GetValue(outOption)!;
        bool folder = !outPath.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase);
        if (!folder && Directory.Exists(outPath)) throw new CliUsageException($"--out: {outPath} is a folder; name a .safetensors file or a folder without that extension.");
        if (folder && File.Exists(outPath)) throw new CliUsageException($"--out: {outPath} is a file; a .safetensors file name or a folder was expected.");

        using var loaded = CheckpointLocator.Load(parse.GetValue(checkpointOption)!, parse.GetValue(configOption));
        string weightsPath = folder ? Path.Combine(outPath, CheckpointLocator.WeightsFileName) : outPath;
        var metadata = CheckpointLocator.ExportMetadata(loaded);
        Safetensors.SaveModel(loaded.Model, weightsPath, metadata, dtype);
        if (folder) AtomicFile.WriteAllText(Path.Combine(outPath, CheckpointLocator.ConfigFileName), metadata[CheckpointLocator.ConfigMetadataKey]);
        var state = loaded.Model.state_dict();
        long parameters = loaded.Model.parameters().Sum(p => p.numel());
        output.WriteLine($"wrote {weightsPath}: {state.Count} tensors, {parameters:N0} parameters, {dtypeName}, {new FileInfo(weightsPath).Length:N0} bytes, " +
                         $"from {loaded.Describe()}; configuration in __metadata__[\"config\"]{(folder ? $" and {Path.Combine(outPath, CheckpointLocator.ConfigFileName)}" : "")}");
        return CliApp.Ok;
    }
}

/// <summary>
/// <c>sparse-attn import</c>: safetensors weights (e.g. edited or trained in Python) → a sparse-attn checkpoint at step 0,
/// with default training options (seq_len = max_seq_len) and a fresh optimizer. Into a run folder it writes
/// <c>ckpt-00000000.sat</c> and <c>config.json</c>, so <c>train --resume</c> continues from the imported weights.
/// (<c>sample</c>, <c>eval</c> and <c>plot</c> also read safetensors directly through <c>--checkpoint</c>.)
/// </summary>
internal sealed class ImportCommand
{
    private readonly Option<string> weightsOption = new("--weights") { HelpName = "FILE|DIR", Description = "A .safetensors file, or a folder with model.safetensors (and config.json).", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON (default: config.json beside model.safetensors, else the file's __metadata__ \"config\")." };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.sat|DIR", Description = "Checkpoint file to write, or a new run folder (gets ckpt-00000000.sat and config.json).", Required = true };

    public static Command Create()
    {
        var self = new ImportCommand();
        var command = new Command("import", "Turn safetensors weights into a sparse-attn checkpoint (step 0), e.g. to continue training them with train --resume.");
        foreach (var option in new Option[] { self.weightsOption, self.configOption, self.outOption }) command.Add(option);
        command.SetAction(self.Execute);
        return command;
    }

    private int Execute(ParseResult parse)
    {
        var output = parse.InvocationConfiguration.Output;
        string outPath = parse.GetValue(outOption)!;
        bool folder = !outPath.EndsWith(Checkpoint.Extension, StringComparison.OrdinalIgnoreCase);
        string checkpointPath = folder ? Checkpoint.PathFor(outPath, 0) : outPath;
        if (folder && Checkpoint.List(outPath).Count > 0)
            throw new CliUsageException($"--out: {outPath} already holds checkpoints; choose a new folder.");

        using var loaded = CheckpointLocator.Load(parse.GetValue(weightsOption)!, parse.GetValue(configOption), "--weights");
        var options = new TrainingOptions { SeqLen = loaded.Config.MaxSeqLen };
        var placeholder = new byte[options.SeqLen + 1];      // the trainer wants data; the checkpoint does not store it
        Trainer trainer;
        try { trainer = new Trainer(loaded.Config, options, placeholder, placeholder); }
        catch (ArgumentException e) { throw new CliUsageException($"--weights: these weights cannot become a training checkpoint: {e.Message}"); }
        using (trainer)
        {
            var target = trainer.Model.state_dict();
            using (no_grad())
                foreach (var (name, tensor) in loaded.Model.state_dict()) target[name].copy_(tensor);
            Checkpoint.Save(trainer, checkpointPath);
        }
        if (folder) AtomicFile.WriteAllText(Path.Combine(outPath, "config.json"), ConfigBinding.ToJson(loaded.Config));
        output.WriteLine($"wrote {checkpointPath} (step 0, default training options, seq_len {options.SeqLen}) from {loaded.Path}" +
                         (folder ? $"; continue training with: sparse-attn train --resume --out {outPath} --data PATH --max-steps N" : ""));
        return CliApp.Ok;
    }
}
