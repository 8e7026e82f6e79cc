using System.CommandLine;

namespace SparseAttention.Cli;

/// <summary>
/// The whole <c>sparse-attn</c> command line, callable in-process: <see cref="Run"/> parses, runs the
/// chosen subcommand and turns every user error into one line on stderr and a non-zero exit code.
/// </summary>
public static class CliApp
{
    /// <summary>Exit code of a successful run.</summary>
    public const int Ok = 0;
    /// <summary>Exit code when something failed that is not the user's input (I/O, a bug).</summary>
    public const int Failure = 1;
    /// <summary>Exit code for bad usage: parse errors, bad option values, arguments the library rejects.</summary>
    public const int UsageError = 2;

    /// <summary><c>--verbose</c> (every command): full text of internal and native (libtorch) errors, with stack traces.</summary>
    public static readonly Option<bool> VerboseOption = new("--verbose") { Description = "On an error, print its full text (libtorch's C++ frames, .NET stack trace) instead of one line.", Recursive = true };

    /// <summary>Builds the root command with one subcommand per command file.</summary>
    public static RootCommand BuildRootCommand()
    {
        var root = new RootCommand("Sparse attention for long sequences: demo, train, sample, eval, plot, export/import weights, draw patterns, benchmark kernels.");
        root.Add(VerboseOption);
        root.Add(PatternCommand.Create());
        root.Add(BenchCommand.Create()); root.Add(TrainCommand.Create()); root.Add(DemoCommand.Create());
        root.Add(SampleCommand.Create()); root.Add(EvalCommand.Create()); root.Add(PlotCommand.Create());
        root.Add(ExportCommand.Create()); root.Add(ImportCommand.Create());
        root.Add(ConfigCommand.Create()); root.Add(CompareCommand.Create());
        return root;
    }

    /// <summary>Runs the command line <paramref name="args"/>, writing results to <paramref name="stdout"/>
    /// and errors to <paramref name="stderr"/>; returns the process exit code.</summary>
    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        ArgumentNullException.ThrowIfNull(args);
        var root = BuildRootCommand();
        var config = new InvocationConfiguration { Output = stdout, Error = stderr, EnableDefaultExceptionHandler = false };
        if (args.Length == 0)
        {
            root.Parse(["--help"]).Invoke(config);
            return UsageError;
        }

        var parsed = root.Parse(args);
        if (parsed.CommandResult.Command == root && parsed.UnmatchedTokens.Count > 0)
        {
            // A mistyped command would otherwise give two errors ("required command", "unrecognized").
            stderr.WriteLine($"error: unknown command '{parsed.UnmatchedTokens[0]}'; expected one of: " +
                             $"{string.Join(", ", root.Subcommands.Select(c => c.Name))} (see sparse-attn --help).");
            return UsageError;
        }
        if (parsed.Errors.Count > 0)
        {
            // One line per error (usually one), no help dump: the message already names the option.
            foreach (var error in parsed.Errors) stderr.WriteLine($"error: {error.Message}");
            return UsageError;
        }
        bool verbose = parsed.GetValue(VerboseOption) || Environment.GetEnvironmentVariable("SPARSE_ATTN_TRACE") == "1";
        try
        {
            return parsed.Invoke(config);
        }
        catch (Exception e)
        {
            var (code, message) = Classify(e, parsed.CommandResult.Command, verbose);
            stderr.WriteLine($"error: {message}");
            return code;
        }
    }

    /// <summary>Exit code and message of an exception escaping a command, by its type: usage errors (the command line
    /// or the library's argument checks, thrown from this project's code) exit 2; everything else — I/O, corrupt files,
    /// diverged training, libtorch, bugs — exits 1. Without <paramref name="verbose"/> the message is one line.</summary>
    internal static (int Code, string Message) Classify(Exception e, Command command, bool verbose)
    {
        switch (e)
        {
            case CliUsageException:
                return (UsageError, e.Message);
            case CliFailureException or Training.CheckpointException or Training.WeightFileException or IOException or UnauthorizedAccessException:
                return (Failure, verbose ? e.ToString() : FirstLine(e.Message));
            case ArgumentException a when IsOwnArgumentCheck(a):
                // Library argument checks name their parameter; say which option that is when we know.
                return (UsageError, OptionNames.Describe(a, command));
            case System.Runtime.InteropServices.ExternalException or OutOfMemoryException:
                // libtorch's messages carry pages of C++ frames after the sentence that matters.
                return (Failure, verbose ? e.ToString() : $"libtorch: {FirstLine(e.Message)} (--verbose for the full text)");
            default:
                return (Failure, verbose ? e.ToString() : $"{e.GetType().Name}: {FirstLine(e.Message)} (--verbose for the full text and stack trace)");
        }
    }

    /// <summary>An ArgumentException thrown by this project's code (the library's checks, a command's own), not by
    /// .NET or a dependency (e.g. System.Text.Json refusing NaN is a bug, not bad usage).</summary>
    private static bool IsOwnArgumentCheck(ArgumentException e)
    {
        var assembly = e.TargetSite?.DeclaringType?.Assembly;
        return assembly == typeof(Check).Assembly || assembly == typeof(CliApp).Assembly;
    }

    /// <summary>The first line of <paramref name="message"/> that says something: libtorch puts the sentence first and
    /// C++ frames ("Exception raised from ...", "frame #0: ...") after it.</summary>
    internal static string FirstLine(string message)
    {
        foreach (var raw in message.Split('\n'))
        {
            string line = raw.Trim();
            if (line.Length == 0 || line.StartsWith("Exception raised from", StringComparison.Ordinal) || line.StartsWith("frame #", StringComparison.Ordinal))
                continue;
            return line;
        }
        return message.Trim();
    }
}
