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

    /// <summary>Builds the root command with one subcommand per command file.</summary>
    public static RootCommand BuildRootCommand()
    {
        var root = new RootCommand("Sparse attention for long sequences: demo, train, sample, eval, plot, export/import weights, draw patterns, benchmark kernels.");
        root.Add(PatternCommand.Create());
        root.Add(BenchCommand.Create()); root.Add(TrainCommand.Create()); root.Add(DemoCommand.Create());
        root.Add(SampleCommand.Create()); root.Add(EvalCommand.Create()); root.Add(PlotCommand.Create());
        root.Add(ExportCommand.Create()); root.Add(ImportCommand.Create());
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
        try
        {
            return parsed.Invoke(config);
        }
        catch (CliUsageException e)
        {
            stderr.WriteLine($"error: {e.Message}");
            return UsageError;
        }
        catch (ArgumentException e)
        {
            // Library argument checks name their parameter; say which option that is when we know.
            stderr.WriteLine($"error: {OptionNames.Describe(e, parsed.CommandResult.Command)}");
            return UsageError;
        }
        catch (Exception e) when (e is Training.CheckpointException or Training.SafetensorsException)
        {
            // A file the user named is corrupt or does not fit: the message says which and why.
            stderr.WriteLine($"error: {e.Message}");
            return Failure;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            stderr.WriteLine($"error: {e.Message}");
            return Failure;
        }
        catch (Exception e) when (Environment.GetEnvironmentVariable("SPARSE_ATTN_TRACE") != "1")
        {
            stderr.WriteLine($"error: {e.GetType().Name}: {e.Message} (set SPARSE_ATTN_TRACE=1 for the stack trace)");
            return Failure;
        }
    }
}

/// <summary>A bad command line detected by a command (not by the parser): the message names the
/// option and says what was expected and what was given.</summary>
public sealed class CliUsageException(string message) : Exception(message);

/// <summary>Maps library parameter names (camelCase) to the command's options (kebab case).</summary>
internal static class OptionNames
{
    private static readonly Dictionary<string, string> Special = new()
    {
        ["blockSize"] = "--block",
        ["block"] = "--block",
    };

    /// <summary><c>numLocalBlocks</c> → <c>--num-local-blocks</c>.</summary>
    public static string ToOption(string parameter)
    {
        if (Special.TryGetValue(parameter, out var name)) return name;
        var sb = new System.Text.StringBuilder("--");
        foreach (char c in parameter)
        {
            if (char.IsUpper(c)) sb.Append('-').Append(char.ToLowerInvariant(c));
            else sb.Append(c);
        }
        return sb.ToString();
    }

    /// <summary>The exception's message without .NET's "(Parameter 'x')" suffix, prefixed by the
    /// option it came from when <paramref name="command"/> has such an option.</summary>
    public static string Describe(ArgumentException e, Command command)
    {
        string message = e.Message;
        if (e.ParamName is null) return message;
        message = message.Replace($" (Parameter '{e.ParamName}')", "");
        string option = ToOption(e.ParamName);
        if (!command.Options.Any(o => o.Name == option || o.Aliases.Contains(option))) return message;
        // "numVerts: x must fit" → "--num-verts: x must fit"; "blockSize must be > 0" → "--block must be > 0".
        if (message.StartsWith(e.ParamName + ": ", StringComparison.Ordinal)) return option + message[e.ParamName.Length..];
        if (message.StartsWith(e.ParamName + " ", StringComparison.Ordinal)) return option + message[e.ParamName.Length..];
        return $"{option}: {message}";
    }
}
