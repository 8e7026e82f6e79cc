using System.Globalization;
using SparseAttention.Model;

namespace SparseAttention.Cli;

/// <summary>
/// Sizes checked before anything is allocated: overflow-checked products and rough lower bounds of the memory a
/// request needs, compared with what this process may use. The estimates are lower bounds (what certainly must fit),
/// so a refusal is never a false alarm; a request that passes can still run out of memory.
/// </summary>
internal static class Limits
{
    /// <summary>Memory this process may use (physical memory or the container's limit), in bytes.</summary>
    public static long AvailableBytes => GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;

    /// <summary>"12.3 GB".</summary>
    public static string Gb(double bytes) => (bytes / 1e9).ToString(bytes >= 1e11 ? "N0" : "0.0", CultureInfo.InvariantCulture) + " GB";

    /// <summary>a × b × ..., or null when the product overflows a long.</summary>
    public static long? Product(params long[] factors)
    {
        try
        {
            long p = 1;
            foreach (long f in factors) p = checked(p * f);
            return p;
        }
        catch (OverflowException) { return null; }
    }

    /// <summary>A lower bound of the parameter count of <paramref name="config"/>: token embedding and output layer,
    /// and per layer the q/k/v/out projections and the feed-forward (biases, norms and extras left out).</summary>
    public static double ParameterLowerBound(TransformerConfig config)
    {
        double dim = config.Dim, inner = (double)config.Heads * (config.DimHead ?? Math.Max(1, config.Dim / Math.Max(1, config.Heads)));
        double perLayer = 4 * dim * inner + (config.FfGlu ? 3 : 2) * dim * dim * config.FfMult;
        double embeddings = (double)config.NumTokens * (config.EmbDim ?? config.Dim) * (config.TieEmbedding ? 1 : 2);
        return embeddings + perLayer * config.Depth;
    }

    /// <summary>Refuses (usage error naming <paramref name="what"/>) a model whose training state — weights, gradients
    /// and two AdamW moments, 16 bytes per float32 parameter — cannot fit in memory.</summary>
    public static void RequireTrainableModel(TransformerConfig config, string what)
    {
        double parameters = ParameterLowerBound(config);
        double bytes = parameters * 16;
        if (bytes > AvailableBytes)
            throw new CliUsageException($"{what}: dim {config.Dim}, depth {config.Depth}, ff_mult {config.FfMult} give at least " +
                $"{parameters:0.##e+0} parameters, {Gb(bytes)} with gradients and AdamW state; this machine allows {Gb(AvailableBytes)}.");
    }

    /// <summary>Refuses a micro-batch of <paramref name="batch"/> × <paramref name="seqLen"/> tokens whose logits and
    /// their gradient (8 bytes per token and vocabulary entry) alone exceed memory, or whose token count overflows.</summary>
    public static void RequireBatchFits(TransformerConfig config, int batch, int seqLen, string batchOption, string seqLenOption)
    {
        long? tokens = Product(batch, seqLen);
        double bytes = (double)batch * seqLen * (8.0 * config.NumTokens + 16.0 * config.Dim * config.Depth);
        if (tokens is null || tokens > int.MaxValue || bytes > AvailableBytes)
            throw new CliUsageException($"{batchOption} {batch} × {seqLenOption} {seqLen} = {(double)batch * seqLen:0.##e+0} tokens per micro-batch " +
                $"needs at least {Gb(bytes)} for logits and activations; this machine allows {Gb(AvailableBytes)} (and at most {int.MaxValue:N0} tokens).");
    }

    /// <summary>The value, or null (JSON null) with one warning on <paramref name="warnings"/> when it is NaN or ∞:
    /// JSON has no such numbers, and a number that is not one must not look like one.</summary>
    public static double? FiniteOrNull(double value, string name, TextWriter warnings)
    {
        if (double.IsFinite(value)) return value;
        warnings.WriteLine($"warning: {name} is {value.ToString(CultureInfo.InvariantCulture)}; written as null");
        return null;
    }
}
