using SparseAttention.Model;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>The training presets shipped inside the tool (presets/*.json, embedded as <c>preset.NAME.json</c>);
/// each is a <see cref="TransformerConfig"/> in its snake_case JSON form.</summary>
internal static class Presets
{
    private const string Prefix = "preset.", Suffix = ".json";

    /// <summary>Names of the shipped presets, sorted.</summary>
    public static IReadOnlyList<string> Names { get; } = typeof(Presets).Assembly.GetManifestResourceNames()
        .Where(n => n.StartsWith(Prefix, StringComparison.Ordinal) && n.EndsWith(Suffix, StringComparison.Ordinal))
        .Select(n => n[Prefix.Length..^Suffix.Length]).OrderBy(n => n, StringComparer.Ordinal).ToArray();

    /// <summary>The JSON text of preset <paramref name="name"/>, or null when there is none.</summary>
    public static string? Json(string name)
    {
        using var stream = typeof(Presets).Assembly.GetManifestResourceStream(Prefix + name + Suffix);
        if (stream is null) return null;
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }

    /// <summary>A shipped preset by name, or a JSON file by path. Errors name <c>--preset</c>.</summary>
    public static TransformerConfig Load(string nameOrPath)
    {
        string? json = Json(nameOrPath.Trim().ToLowerInvariant());
        string source = $"--preset {nameOrPath}";
        if (json is null)
        {
            if (!File.Exists(nameOrPath))
                throw new CliUsageException($"--preset: unknown preset '{nameOrPath}'; expected one of: {string.Join(", ", Names)}, or a path to a JSON file.");
            json = File.ReadAllText(nameOrPath);
        }
        try { return ConfigBinding.FromJson(json, "preset"); }
        catch (ArgumentException e) { throw new CliUsageException($"{source}: {e.Message.Replace(" (Parameter 'preset')", "")}"); }
    }
}
