namespace SparseAttention.Cli;

/// <summary>A failure that is not the command line's fault (the run folder is in use, training diverged, a
/// resource ran out): one line on stderr, exit code 1.</summary>
public sealed class CliFailureException(string message) : Exception(message);
