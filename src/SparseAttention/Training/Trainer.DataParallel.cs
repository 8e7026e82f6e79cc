using System.Security.Cryptography;
using System.Text.Json;
using SparseAttention.Distributed;

namespace SparseAttention.Training;

public sealed partial class Trainer
{
    /// <summary>The data-parallel group this trainer is a replica in (<see cref="JoinDataParallel"/>); null = single process.</summary>
    public DataParallel? Parallel { get; private set; }

    /// <summary>
    /// Makes this trainer one replica of <paramref name="group"/>. First checks that every rank has the same configuration,
    /// hyperparameters, position (step, sampler state, tokens seen) and training and validation bytes (length and
    /// SHA-256), else throws <see cref="DataParallelMismatchException"/> on every rank; then copies rank 0's weights and
    /// buffers to every rank and sums the k-means statistics over the ranks. From then on each step trains this rank's
    /// share of a global batch of Options.BatchSize × ranks windows (<see cref="NextBatch"/>) and averages the gradients
    /// over the ranks. Call it on every rank after construction or <see cref="Checkpoint.Load"/> (each rank loads the same
    /// checkpoint).
    /// </summary>
    public void JoinDataParallel(DataParallel group)
    {
        ArgumentNullException.ThrowIfNull(group);
        group.RequireSame("training run", DescribeRun());
        group.Attach(Model);
        Parallel = group;
    }

    /// <summary>One line per configuration key, hyperparameter, position field and data fingerprint.</summary>
    private string DescribeRun()
    {
        static IEnumerable<string> Keys(string prefix, string json)
        {
            using var doc = JsonDocument.Parse(json);
            return doc.RootElement.EnumerateObject().Select(p => $"{prefix}{p.Name} = {p.Value.GetRawText()}").ToList();
        }
        static string Fingerprint(TokenText text)
        {
            using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            text.AppendTo(hash);
            return $"{text.Length} {text.Tokenizer.Name} tokens, sha256 {Convert.ToHexString(hash.GetHashAndReset())[..16]}";
        }
        return string.Join("\n", Keys("config ", ConfigBinding.ToJson(Config))
            .Concat(Keys("option ", JsonSerializer.Serialize(Options)))
            .Append($"step = {Step}").Append($"sampler_state = {SamplerState}").Append($"tokens_seen = {TokensSeen}")
            .Append($"training data = {Fingerprint(train)}").Append($"validation data = {Fingerprint(validation)}"));
    }

    /// <summary>Averages the gradients over the ranks (one bucket) and returns the step's loss sums averaged and its
    /// tokens summed over the ranks, so every rank takes the same skip / clip decisions.</summary>
    private (double LossSum, double TotalSum, long Tokens) AverageOverRanks(double lossSum, double totalSum, long tokens)
    {
        Span<double> sums = [lossSum, totalSum, tokens];
        Parallel!.AverageGradients(Model.parameters(), sums);
        return (sums[0] / Parallel.Size, sums[1] / Parallel.Size, (long)sums[2]);
    }
}
