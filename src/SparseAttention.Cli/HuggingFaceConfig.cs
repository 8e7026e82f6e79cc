using System.Text.Json;
using System.Text.Json.Nodes;
using SparseAttention.Model;
using SparseAttention.Training;

namespace SparseAttention.Cli;

/// <summary>
/// The <c>config.json</c> of an exported Hugging Face-style folder: this project's configuration keys plus
/// <c>model_type</c>, <c>architectures</c>, <c>torch_dtype</c> and <c>tokenizer</c> (the configuration's own
/// <c>tokenizer</c> key when it has one, else "bytes").
/// </summary>
internal static class HuggingFaceConfig
{
    /// <summary>The <c>model_type</c> written and accepted.</summary>
    public const string ModelType = "sparse-attn-routing-transformer";
    private static readonly string[] Extras = ["model_type", "architectures", "torch_dtype", "tokenizer"];

    /// <summary>config.json text for <paramref name="config"/> stored as <paramref name="torchDtype"/> (e.g. "float16").</summary>
    public static string ToJson(TransformerConfig config, string torchDtype)
    {
        var keys = JsonNode.Parse(ConfigBinding.ToJson(config))!.AsObject();
        var result = new JsonObject
        {
            ["model_type"] = ModelType,
            ["architectures"] = new JsonArray("RoutingTransformerLM"),
            ["torch_dtype"] = torchDtype,
        };
        if (!keys.ContainsKey("tokenizer")) result["tokenizer"] = "bytes";
        foreach (var (key, value) in keys) result[key] = value?.DeepClone();
        return result.ToJsonString(new JsonSerializerOptions { WriteIndented = true });
    }

    /// <summary><paramref name="json"/> without the Hugging Face keys that are not configuration keys (a plain configuration
    /// passes through); a <c>model_type</c> other than <see cref="ModelType"/> is refused.</summary>
    public static string Strip(string json, string source)
    {
        JsonObject? node;
        try { node = JsonNode.Parse(json) as JsonObject; }
        catch (JsonException) { return json; }                      // ConfigBinding reports malformed JSON
        if (node is null) return json;
        if (node["model_type"] is JsonNode type && type.GetValueKind() == JsonValueKind.String && type.GetValue<string>() != ModelType)
            throw new CliUsageException($"configuration from {source}: model_type '{type.GetValue<string>()}' is not a sparse-attn model ('{ModelType}').");
        foreach (var key in Extras)
            if (!ConfigBinding.ValidKeys.Contains(key)) node.Remove(key);
        return node.ToJsonString();
    }
}
