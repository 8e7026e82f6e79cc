using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using SparseAttention.Cli;
using SparseAttention.Training;
using Xunit;

namespace SparseAttention.Tests;

/// <summary><c>sparse-attn config show/list</c>, and the README's preset descriptions checked against the presets'
/// real settings so the two cannot drift.</summary>
public class CliConfigTests
{
    [Fact]
    public void ShowPrintsThePresetWithOverridesAsJson()
    {
        var (code, output, error) = CliRunner.Run("config", "show", "--preset", "tiny-routing", "--set", "dim=96", "--set", "depth=3");
        Assert.True(code == 0, error);
        var shown = JsonNode.Parse(output)!.AsObject();
        // Every key of the configuration is printed, overrides applied, the rest as the preset file says.
        Assert.Equal(ConfigBinding.ValidKeys, shown.Select(p => p.Key).ToArray());
        Assert.Equal(96, (int)shown["dim"]!);
        Assert.Equal(3, (int)shown["depth"]!);
        var preset = JsonNode.Parse(Presets.Json("tiny-routing")!)!.AsObject();
        foreach (var (key, value) in preset.Where(p => p.Key is not ("dim" or "depth")))
            Assert.True(JsonNode.DeepEquals(value, shown[key]), $"{key}: preset file has {value?.ToJsonString()}, config show printed {shown[key]?.ToJsonString()}");
    }

    [Fact]
    public void ShowOutputIsAValidPresetFile()
    {
        var (_, first, _) = CliRunner.Run("config", "show", "--preset", "tiny-lsh", "--set", "window_size=16");
        string path = Path.Combine(Path.GetTempPath(), $"config-show-{Guid.NewGuid():N}.json");
        try
        {
            File.WriteAllText(path, first);
            var (code, second, error) = CliRunner.Run("config", "show", "--preset", path);
            Assert.True(code == 0, error);
            Assert.Equal(first, second);
        }
        finally { File.Delete(path); }
    }

    [Theory]
    [InlineData("--preset", "no-such-preset", "--preset: unknown preset 'no-such-preset'")]
    [InlineData("--set", "no_such_key=1", "--set: unknown key 'no_such_key'")]
    [InlineData("--set", "dim=7", "configuration: heads: Dim (7) must be divisible by Heads (4)")]
    public void ShowRejectsBadInputWithAUsageError(string option, string value, string expected)
    {
        var (code, output, error) = CliRunner.Run("config", "show", option, value);
        Assert.Equal(CliApp.UsageError, code);
        Assert.Equal("", output);
        Assert.Contains(expected, error);
    }

    [Fact]
    public void HeadDescriptionsFollowThePresetFiles()
    {
        // Oracle from the raw JSON: local heads, LSH heads, synthesizer heads, routing = the rest (HeadGroupKind's order).
        foreach (var name in Presets.Names)
        {
            var json = JsonNode.Parse(Presets.Json(name)!)!.AsObject();
            int heads = (int)json["heads"]!, local = (int)json["n_local_attn_heads"]![0]!;
            int lsh = json["lsh"] is JsonObject l ? (int)l["heads"]! : 0;
            int synthesizer = json["synthesizer"] is JsonObject s ? (int)s["heads"]! : 0;
            int depth = (int)json["depth"]!, skip = json["sparsity_skip_first"] is JsonNode k ? (int)k : 0;
            string Layer(int layer)
            {
                int routing = heads - local - lsh - synthesizer;
                int localHere = layer < skip ? local + routing : local;              // skipped layers: routing heads turn local
                var parts = new List<string>();
                if (localHere > 0) parts.Add($"{localHere} local");
                if (lsh > 0) parts.Add($"{lsh} LSH");
                if (synthesizer > 0) parts.Add($"{synthesizer} synthesizer");
                if (layer >= skip && routing > 0) parts.Add($"{routing} routing");
                return string.Join(" + ", parts) + " heads";
            }
            var layers = Enumerable.Range(0, depth).Select(Layer).ToArray();
            string expected = layers.All(d => d == layers[0]) ? layers[0]
                : string.Join("; ", layers.Select((d, i) => (d, i)).GroupBy(x => x.d)
                    .Select(g => g.Count() == 1 ? $"layer {g.First().i}: {g.Key}" : $"layers {g.First().i}–{g.Last().i}: {g.Key}"));
            Assert.Equal(expected, ConfigCommand.DescribeHeads(Presets.Load(name).Validate()));
        }
    }

    [Fact]
    public void DescriptionListsLayersThatDiffer()
    {
        var config = Presets.Load("small") with { SparsitySkipFirst = 1 };
        Assert.Equal("layer 0: 8 local heads; layers 1–3: 4 local + 4 routing heads", ConfigCommand.DescribeHeads(config.Validate()));
    }

    [Fact]
    public void ListPrintsOneTableRowPerPreset()
    {
        var (code, output, error) = CliRunner.Run("config", "list");
        Assert.True(code == 0, error);
        var rows = output.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(Presets.Names.Count + 2, rows.Length);
        Assert.Contains("| `tiny-routing` | 4 routing heads | 64 | 2 | 128 | 32 |", rows);
        Assert.Contains("| `tiny` | 2 local + 2 routing heads | 64 | 2 | 128 | 32 |", rows);
        Assert.Empty(ReadmePresetProblems(output));
    }

    [Fact]
    public void ReadmePresetDescriptionsMatchThePresets()
    {
        string readme = File.ReadAllText(FindReadme());
        foreach (var name in Presets.Names)
            Assert.True(readme.Contains($"`{name}`", StringComparison.Ordinal), $"README does not name the shipped preset `{name}`.");
        var (problems, checkedCount) = ReadmePresetCheck(readme);
        Assert.True(problems.Count == 0, "README preset descriptions differ from the presets:\n" + string.Join("\n", problems));
        // A rewrite whose wording this check no longer finds must not pass silently.
        Assert.True(checkedCount > 0, "README: found no preset description to check (\"`NAME` ... N local + M routing heads\" or a preset table).");
    }

    [Fact]
    public void ReadmeCheckCatchesWrongDescriptions()
    {
        // The issue's bug: tiny-routing described as 2 + 2, tiny as 4 local.
        var (problems, _) = ReadmePresetCheck("A `tiny-routing` model (2 local + 2 routing heads) and a `tiny` model (4 local heads).");
        Assert.Equal(2, problems.Count);
        // A table row with a wrong context length, a wrong head split, an unknown preset.
        string table = string.Join("\n", ConfigCommand.PresetTable().Split('\n')
            .Select(l => l.Replace("| `small` | 4 local + 4 routing heads | 256 | 4 | 512 |", "| `small` | 4 local + 4 routing heads | 256 | 4 | 1024 |")
                          .Replace("| `tiny-lsh` | 2 local + 2 LSH heads |", "| `tiny-lsh` | 4 LSH heads |")));
        table += "| `huge` | 8 local heads | 1 | 1 | 1 | 1 |\n";
        Assert.Equal(3, ReadmePresetProblems(table).Count);
        Assert.Empty(ReadmePresetProblems(ConfigCommand.PresetTable()));
    }

    private static List<string> ReadmePresetProblems(string markdown) => ReadmePresetCheck(markdown).Problems;

    private const string Kinds = "local|routing|LSH|synthesizer|static";
    // "`tiny-lsh` model (2 local + 2 LSH heads": a preset name, then (same sentence, no other name) its head split.
    private static readonly Regex InlineDescription = new(
        $@"`(?<name>[a-z0-9-]+)`[^.`|]{{0,60}}?\b(?<heads>\d+ (?:{Kinds})(?: \+ \d+ (?:{Kinds}))*) heads\b");

    /// <summary>Differences between the presets and (a) sentences that describe a preset's heads, (b) rows of
    /// Markdown tables whose first header is "Preset": each column named like a <see cref="ConfigCommand.TableColumns"/>
    /// entry is compared with <c>config list</c>'s cell; other columns are free text.</summary>
    private static (List<string> Problems, int Checked) ReadmePresetCheck(string markdown)
    {
        var problems = new List<string>();
        int checkedCount = 0;
        foreach (Match m in InlineDescription.Matches(markdown))
        {
            string name = m.Groups["name"].Value;
            if (!Presets.Names.Contains(name)) continue;                // other backticked words (options, commands)
            checkedCount++;
            string actual = ConfigCommand.DescribeHeads(Presets.Load(name).Validate());
            string written = m.Groups["heads"].Value + " heads";
            if (written != actual) problems.Add($"`{name}`: README says \"{written}\", the preset has {actual}.");
        }

        string[]? header = null;
        foreach (var raw in markdown.Split('\n'))
        {
            string line = raw.Trim();
            if (!line.StartsWith('|')) { header = null; continue; }
            var cells = line.Trim('|').Split('|').Select(c => c.Trim()).ToArray();
            if (header is null)
            {
                header = cells;
                continue;
            }
            if (!header[0].Equals("Preset", StringComparison.OrdinalIgnoreCase) || cells.All(c => c.Trim('-', ':').Length == 0)) continue;
            string name = cells[0].Trim('`');
            if (!Presets.Names.Contains(name)) { problems.Add($"table row names no shipped preset: {line}"); continue; }
            checkedCount++;
            var expected = ConfigCommand.TableRow(name, Presets.Load(name).Validate());
            for (int c = 1; c < Math.Min(cells.Length, header.Length); c++)
            {
                int column = Array.FindIndex(ConfigCommand.TableColumns, h => h.Equals(header[c], StringComparison.OrdinalIgnoreCase));
                if (column > 0 && cells[c] != expected[column])
                    problems.Add($"`{name}` {header[c]}: README table says \"{cells[c]}\", the preset has \"{expected[column]}\".");
            }
        }
        return (problems, checkedCount);
    }

    private static string FindReadme()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "README.md");
            if (File.Exists(candidate) && File.Exists(Path.Combine(dir.FullName, "SparseAttention.slnx"))) return candidate;
        }
        throw new FileNotFoundException("README.md of the repository (beside SparseAttention.slnx) above " + AppContext.BaseDirectory);
    }
}
