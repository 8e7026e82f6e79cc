using static TorchSharp.torch;

namespace SparseAttention.Cli;

/// <summary>The <c>--threads</c> option shared by the inference commands.</summary>
internal static class CliThreads
{
    public static void Apply(int? threads)
    {
        if (threads is not int n) return;
        if (n <= 0) throw new CliUsageException($"--threads must be > 0, got {n}.");
        set_num_threads(n);
    }
}
