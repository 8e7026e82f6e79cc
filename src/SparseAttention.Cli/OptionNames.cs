using System.CommandLine;

namespace SparseAttention.Cli;

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
