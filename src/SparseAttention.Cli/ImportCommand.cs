using System.CommandLine;
using SparseAttention.Training;
using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>
/// <c>sparse-attn import</c>: weights (safetensors, torch.save state dicts, sharded indexes, exported folders, also in the
/// PyTorch routing-transformer library's layout; e.g. edited or trained in Python) → a sparse-attn checkpoint at step 0,
/// with default training options (seq_len = max_seq_len) and a fresh optimizer. Into a run folder it writes
/// <c>ckpt-00000000.sat</c> and <c>config.json</c>, so <c>train --resume</c> continues from the imported weights.
/// (<c>sample</c>, <c>eval</c> and <c>plot</c> also read all of these directly through <c>--checkpoint</c>.)
/// </summary>
internal sealed class ImportCommand
{
    private readonly Option<string> weightsOption = new("--weights") { HelpName = "FILE|DIR", Description = "Weights: .safetensors, .pt/.pth/.bin (torch.save state dict), a *.index.json of shards, or a folder with model.safetensors / pytorch_model.bin / an index and config.json.", Required = true };
    private readonly Option<string?> configOption = new("--config") { HelpName = "FILE", Description = "Configuration JSON, or RoutingTransformerLM constructor arguments for the PyTorch library's layout (default: NAME.json beside NAME.ext, else config.json beside Hugging Face-named weights)." };
    private readonly Option<string> outOption = new("--out") { HelpName = "FILE.sat|DIR", Description = "Checkpoint file to write, or a new run folder (gets ckpt-00000000.sat and config.json).", Required = true };

    public static Command Create()
    {
        var self = new ImportCommand();
        var command = new Command("import", "Turn weights (safetensors, .pt/.bin, sharded, or the PyTorch routing-transformer layout) into a sparse-attn checkpoint (step 0), e.g. to continue training them with train --resume.");
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
        // The trainer wants data (of the configuration's tokenizer); the checkpoint does not store any.
        var placeholder = TokenText.FromIds(new int[options.SeqLen + 1], TextTokenizer.For(loaded.Config));
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
