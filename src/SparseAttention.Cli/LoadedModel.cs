using SparseAttention.Model;

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
