using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using SparseAttention.Model;

namespace SparseAttention.Training;

/// <summary>
/// Binds <see cref="TransformerConfig"/> to JSON (presets) and to <c>key=value</c> overrides, using the
/// record's snake_case JSON names. Unknown keys and values of the wrong type fail with an
/// <see cref="ArgumentException"/> that lists the valid keys.
/// </summary>
public static class ConfigBinding
{
    private static readonly JsonSerializerOptions Options = new()
    {
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        WriteIndented = true,
    };

    /// <summary>The snake_case keys of <see cref="TransformerConfig"/>, in declaration order.</summary>
    public static IReadOnlyList<string> ValidKeys { get; } = typeof(TransformerConfig)
        .GetProperties(BindingFlags.Public | BindingFlags.Instance)
        .Select(p => p.GetCustomAttribute<JsonPropertyNameAttribute>()?.Name)
        .OfType<string>()
        .ToArray();

    /// <summary>Serializes <paramref name="config"/> with its snake_case names.</summary>
    public static string ToJson(TransformerConfig config) => JsonSerializer.Serialize(config, Options);

    /// <summary>Reads a configuration from JSON; <paramref name="source"/> names it in errors (ParamName).</summary>
    public static TransformerConfig FromJson(string json, string source)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
                throw new ArgumentException($"{source}: expected a JSON object of configuration keys, got {doc.RootElement.ValueKind}.", source);
            foreach (var p in doc.RootElement.EnumerateObject())
                if (!ValidKeys.Contains(p.Name))
                    throw new ArgumentException($"{source}: unknown key '{p.Name}'; valid keys: {string.Join(", ", ValidKeys)}.", source);
            return JsonSerializer.Deserialize<TransformerConfig>(json, Options)
                   ?? throw new ArgumentException($"{source}: expected a JSON object, got null.", source);
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"{source}: invalid configuration JSON: {e.Message}", source, e);
        }
    }

    /// <summary>
    /// Applies <c>key=value</c> overrides in order. The value is read as JSON (<c>256</c>, <c>true</c>,
    /// <c>[2,2]</c>, <c>null</c>); anything that is not JSON is taken as a string (<c>positional_encoding=RelativeShaw</c>).
    /// </summary>
    /// <param name="config">The configuration to start from.</param>
    /// <param name="assignments">Strings of the form <c>key=value</c>.</param>
    /// <param name="source">Name used in errors and as the exception's ParamName (e.g. <c>set</c>).</param>
    public static TransformerConfig Apply(TransformerConfig config, IEnumerable<string> assignments, string source = "set")
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(assignments);
        var list = assignments.ToList();
        if (list.Count == 0) return config;
        var obj = JsonNode.Parse(ToJson(config))!.AsObject();
        foreach (var assignment in list)
        {
            int eq = assignment.IndexOf('=');
            if (eq <= 0)
                throw new ArgumentException($"{source}: expected key=value, got '{assignment}'; valid keys: {string.Join(", ", ValidKeys)}.", source);
            string key = assignment[..eq].Trim(), text = assignment[(eq + 1)..].Trim();
            if (!ValidKeys.Contains(key))
                throw new ArgumentException($"{source}: unknown key '{key}'; valid keys: {string.Join(", ", ValidKeys)}.", source);
            JsonNode? value;
            try { value = JsonNode.Parse(text); }
            catch (JsonException) { value = JsonValue.Create(text); }
            obj[key] = value;
            try
            {
                JsonSerializer.Deserialize<TransformerConfig>(obj.ToJsonString(), Options);
            }
            catch (Exception e) when (e is JsonException or InvalidOperationException or NotSupportedException)
            {
                string type = Describe(typeof(TransformerConfig).GetProperties()
                    .First(p => p.GetCustomAttribute<JsonPropertyNameAttribute>()?.Name == key).PropertyType);
                throw new ArgumentException($"{source}: {key} expects {type}, got '{text}'; valid keys: {string.Join(", ", ValidKeys)}.", source, e);
            }
        }
        return JsonSerializer.Deserialize<TransformerConfig>(obj.ToJsonString(), Options)!;
    }

    private static string Describe(Type t)
    {
        var inner = Nullable.GetUnderlyingType(t);
        if (inner is not null) return Describe(inner) + " or null";
        if (t == typeof(int)) return "an integer";
        if (t == typeof(double)) return "a number";
        if (t == typeof(bool)) return "true or false";
        if (t == typeof(int[])) return "a JSON array of integers such as [2,2]";
        if (t.IsEnum) return "one of " + string.Join(", ", Enum.GetNames(t).Select(n => t.GetField(n)?.GetCustomAttribute<JsonStringEnumMemberNameAttribute>()?.Name ?? n));
        if (t.IsArray) return "a JSON array";
        return "a JSON value of type " + t.Name;
    }

    /// <summary>The snake_case key of a <see cref="TransformerConfig"/> property name (e.g. <c>MaxSeqLen</c> → <c>max_seq_len</c>);
    /// other names are returned unchanged.</summary>
    public static string KeyOf(string? propertyName)
    {
        if (propertyName is null) return "";
        var p = typeof(TransformerConfig).GetProperty(propertyName);
        return p?.GetCustomAttribute<JsonPropertyNameAttribute>()?.Name ?? propertyName;
    }

    /// <summary>Keys whose values differ between two configurations (by their JSON form).</summary>
    public static IReadOnlyList<string> Differences(TransformerConfig a, TransformerConfig b)
    {
        var ja = JsonNode.Parse(ToJson(a))!.AsObject();
        var jb = JsonNode.Parse(ToJson(b))!.AsObject();
        return ValidKeys.Where(k => !JsonNode.DeepEquals(ja[k], jb[k])).ToArray();
    }
}
