namespace SparseAttention.Cli;

/// <summary>A bad command line detected by a command (not by the parser): the message names the
/// option and says what was expected and what was given.</summary>
public sealed class CliUsageException(string message) : Exception(message);
